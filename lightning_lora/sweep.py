"""Sweep summary: a Hydra callback that tabulates every job of a multirun when the sweep ends.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``. At ``on_multirun_end`` (in the process that
launched the sweep, whatever the sweeper or launcher) it reads each job directory under the sweep root: the job's
overrides from ``.hydra/overrides.yaml`` and its numbers from the ``metrics.json`` that ``train.run`` writes. It
writes ``sweep_summary.csv`` at the sweep root (atomically) and prints the same rows as a Markdown table.
A job that failed wrote ``failed.json`` (``record_failure``: ``train.main`` does, instead of ending the sweep) and is
listed as ``failed`` with its one-line reason; a job with neither file (still running under an asynchronous
launcher, or killed) as ``missing``. When a job failed, the sweep ends with one ``error:`` line and exit status 2
(1 when a job failed on a bug), after the summary is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_lora.fileio import atomic_write_text

SUMMARY_FILE = "sweep_summary.csv"
#: written into a job's directory when the job failed: {"reason": one line, "user_error": bool}
FAILURE_FILE = "failed.json"
COLUMNS = ("job", "overrides", "monitor", "metric", "trainable_params", "adapter_bytes", "wall_seconds",
           "global_step", "status", "run_dir", "reason")


def record_failure(job_dir: str | Path, reason: str, user_error: bool = True) -> Path:
    """Mark the sweep job in ``job_dir`` as failed with its one-line ``reason`` (read by ``collect_jobs``)."""
    return atomic_write_text(Path(job_dir) / FAILURE_FILE,
                             json.dumps({"reason": reason, "user_error": user_error}, indent=2) + "\n")


@dataclass
class JobRow:
    job: str
    overrides: list[str]
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else "failed" if self.failure else "missing"

    @property
    def reason(self) -> str:
        return str(self.failure.get("reason", "")) if self.status == "failed" else ""

    @property
    def monitor(self) -> str:
        return str(self.metrics.get("monitor") or "")

    @property
    def metric(self) -> float | None:
        value = (self.metrics.get("after") or {}).get(self.monitor)
        return None if value is None else float(value)

    def record(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "job": self.job, "overrides": " ".join(self.overrides), "monitor": self.monitor,
            "metric": "" if self.metric is None else repr(self.metric),
            "trainable_params": m.get("trainable_params", ""), "adapter_bytes": m.get("adapter_bytes", ""),
            "wall_seconds": m.get("wall_seconds", ""), "global_step": m.get("global_step", ""),
            "status": self.status, "run_dir": str(self.run_dir), "reason": self.reason,
        }


def _job_key(row: JobRow) -> tuple[int, int | str]:
    return (0, int(row.job)) if row.job.isdigit() else (1, row.job)


def _read_json(path: Path) -> dict[str, Any]:
    """A job's JSON record, {} when absent; written atomically by train, so only a foreign file can be broken."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def collect_jobs(sweep_dir: str | Path) -> list[JobRow]:
    """One row per job directory under ``sweep_dir`` (any depth: ``hydra.sweep.subdir`` may nest), by job number."""
    root = Path(sweep_dir)
    rows = []
    for overrides_file in root.glob("**/.hydra/overrides.yaml"):
        run_dir = overrides_file.parent.parent
        overrides = [str(o) for o in (OmegaConf.load(overrides_file) or [])]
        metrics, failure = _read_json(run_dir / "metrics.json"), _read_json(run_dir / FAILURE_FILE)
        job = run_dir.relative_to(root).as_posix() if run_dir != root else "0"
        rows.append(JobRow(job=job, overrides=overrides, run_dir=run_dir, metrics=metrics, failure=failure))
    return sorted(rows, key=_job_key)


def varying_overrides(rows: list[JobRow]) -> list[list[str]]:
    """Each job's overrides that are not shared by every job (the swept values), in the job's own order."""
    if not rows:
        return []
    common = set(rows[0].overrides).intersection(*(r.overrides for r in rows[1:])) if len(rows) > 1 else set()
    return [[o for o in r.overrides if o not in common] for r in rows]


def to_csv(rows: list[JobRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.record())
    return buffer.getvalue()


def best_job(rows: list[JobRow]) -> JobRow | None:
    """The job with the best monitored metric: lowest for a loss, highest otherwise (as train's table reads)."""
    scored = [r for r in rows if r.metric is not None and not math.isnan(r.metric)]
    if not scored:
        return None
    lower = scored[0].monitor.endswith("loss")
    return (min if lower else max)(scored, key=lambda r: r.metric)


def to_markdown(rows: list[JobRow]) -> str:
    monitor = next((r.monitor for r in rows if r.monitor), "metric")
    lines = [f"| job | overrides | {monitor} | trainable params | adapter bytes | wall s | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, swept in zip(rows, varying_overrides(rows), strict=True):
        m = row.metrics
        metric = "" if row.metric is None else f"{row.metric:.4f}"
        params = f"{m['trainable_params']:,}" if "trainable_params" in m else ""
        size = f"{m['adapter_bytes']:,}" if "adapter_bytes" in m else ""
        status = f"{row.status}: {row.reason}" if row.reason else row.status
        lines.append(f"| {row.job} | {' '.join(swept) or '-'} | {metric} | {params} | {size} | "
                     f"{m.get('wall_seconds', '')} | {status} |")
    if (best := best_job(rows)) is not None:
        lines.append(f"\nbest: job {best.job} ({best.monitor} = {best.metric:.4f})")
    return "\n".join(lines)


def write_summary(sweep_dir: str | Path, echo: bool = True) -> Path | None:
    """Write ``sweep_summary.csv`` under ``sweep_dir`` (and print the Markdown table); None when no job ran."""
    rows = collect_jobs(sweep_dir)
    if not rows:
        return None
    path = atomic_write_text(Path(sweep_dir) / SUMMARY_FILE, to_csv(rows))
    if echo:
        print(f"\nSweep summary ({len(rows)} jobs): {path}\n{to_markdown(rows)}", flush=True)
    return path


def failure_line(rows: list[JobRow], summary: Path) -> tuple[str, int] | None:
    """The sweep's closing line and exit status when a job failed (2; 1 when one failed on a bug)."""
    bad = [r for r in rows if r.status == "failed"]
    if not bad:
        return None
    first = bad[0]
    swept = dict(zip((r.job for r in rows), varying_overrides(rows), strict=True))[first.job]
    label = f"job {first.job}" + (f" ({' '.join(swept)})" if swept else "")
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    code = 1 if any(r.failure.get("user_error") is False for r in bad) else 2
    return f"{len(bad)} of {len(rows)} sweep jobs failed: {label}: {first.reason}{more}; see {summary}", code


class SweepSummary(Callback):
    """``hydra.callbacks.sweep_summary``: ``sweep_summary.csv`` + a printed table at the end of every multirun."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # hydra.sweep.dir resolves as the launcher resolved it (Hydra caches ${now:...} within the process).
        sweep_dir = Path(str(config.hydra.sweep.dir))
        path = write_summary(sweep_dir, echo=self.echo)
        if path is not None and (failure := failure_line(collect_jobs(sweep_dir), path)) is not None:
            # a Hydra callback's exception only becomes a warning: exiting is how the sweep's status says it
            print(f"error: {failure[0]}", file=sys.stderr, flush=True)
            sys.exit(failure[1])
