"""Sweep summary: a Hydra callback that tabulates every job of a multirun when the sweep ends.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``. At ``on_multirun_end`` (in the process that
launched the sweep, whatever the sweeper or launcher) it reads each job directory under the sweep root: the job's
overrides from ``.hydra/overrides.yaml`` and its numbers from the ``metrics.json`` that ``train.run`` writes. It
writes ``sweep_summary.csv`` at the sweep root (atomically) and prints the same rows as a Markdown table.
A job without ``metrics.json`` (failed, or still running under an asynchronous launcher) is listed as ``missing``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_lora.fileio import atomic_write_text

SUMMARY_FILE = "sweep_summary.csv"
COLUMNS = ("job", "overrides", "monitor", "metric", "trainable_params", "adapter_bytes", "wall_seconds",
           "global_step", "status", "run_dir")


@dataclass
class JobRow:
    job: str
    overrides: list[str]
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else "missing"

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
            "status": self.status, "run_dir": str(self.run_dir),
        }


def _job_key(row: JobRow) -> tuple[int, int | str]:
    return (0, int(row.job)) if row.job.isdigit() else (1, row.job)


def collect_jobs(sweep_dir: str | Path) -> list[JobRow]:
    """One row per job directory under ``sweep_dir`` (any depth: ``hydra.sweep.subdir`` may nest), by job number."""
    root = Path(sweep_dir)
    rows = []
    for overrides_file in root.glob("**/.hydra/overrides.yaml"):
        run_dir = overrides_file.parent.parent
        overrides = [str(o) for o in (OmegaConf.load(overrides_file) or [])]
        metrics_file = run_dir / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        except json.JSONDecodeError:  # written atomically by train.run, so only a foreign file can be broken
            metrics = {}
        job = run_dir.relative_to(root).as_posix() if run_dir != root else "0"
        rows.append(JobRow(job=job, overrides=overrides, run_dir=run_dir, metrics=metrics))
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
        lines.append(f"| {row.job} | {' '.join(swept) or '-'} | {metric} | {params} | {size} | "
                     f"{m.get('wall_seconds', '')} | {row.status} |")
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


class SweepSummary(Callback):
    """``hydra.callbacks.sweep_summary``: ``sweep_summary.csv`` + a printed table at the end of every multirun."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # hydra.sweep.dir resolves as the launcher resolved it (Hydra caches ${now:...} within the process).
        write_summary(Path(str(config.hydra.sweep.dir)), echo=self.echo)
