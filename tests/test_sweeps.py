"""Sweeps: the sweep summary callback, a real 2-job multirun, and the Optuna search preset."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import FAST, run_cli
from omegaconf import OmegaConf

from lightning_lora.config import compose_config
from lightning_lora.sweep import SUMMARY_FILE, SweepSummary, collect_jobs, varying_overrides

HAS_OPTUNA_SWEEPER = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


def _fake_job(root: Path, job: str, overrides: list[str], metrics: dict | None) -> Path:
    run_dir = root / job
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def _metrics(value: float, params: int, size: int, seconds: float) -> dict:
    return {"before": {}, "after": {"val/recall@1": value, "val/loss": 1.0}, "monitor": "val/recall@1",
            "global_step": 2, "trainable_params": params, "adapter_bytes": size, "wall_seconds": seconds}


def _read_summary(root: Path) -> list[dict[str, str]]:
    with (root / SUMMARY_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


def test_summary_lists_every_job_in_order_and_marks_missing_ones(tmp_path, capsys) -> None:
    common = ["model=minilm", "trainer.max_steps=2"]
    for job, r, m in [("10", 16, _metrics(0.5, 400, 4000, 3.5)), ("2", 4, _metrics(0.75, 100, 1000, 1.25)),
                      ("3", 8, None)]:
        _fake_job(tmp_path, job, [f"adapter.r={r}", *common], m)
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))

    rows = _read_summary(tmp_path)
    assert [r["job"] for r in rows] == ["2", "3", "10"]  # by job number, not as text
    assert [r["status"] for r in rows] == ["ok", "missing", "ok"]
    assert rows[0]["overrides"] == "adapter.r=4 model=minilm trainer.max_steps=2"
    assert (float(rows[0]["metric"]), int(rows[0]["trainable_params"]), int(rows[0]["adapter_bytes"]),
            float(rows[0]["wall_seconds"])) == (0.75, 100, 1000, 1.25)
    assert rows[1]["metric"] == "" and rows[1]["trainable_params"] == ""
    assert not list(tmp_path.glob(".tmp-*"))  # written through a temporary file and a rename
    out = capsys.readouterr().out
    assert "| job | overrides | val/recall@1 |" in out
    assert "| 2 | adapter.r=4 | 0.7500 | 100 | 1,000 | 1.25 | ok |" in out
    assert "best: job 2 (val/recall@1 = 0.7500)" in out


def test_summary_of_a_loss_picks_the_lowest_and_handles_nested_subdirs(tmp_path, capsys) -> None:
    for job, loss in [("a/0", 0.3), ("a/1", 0.2)]:
        m = {"after": {"val/loss": loss}, "monitor": "val/loss", "trainable_params": 1, "adapter_bytes": 1,
             "wall_seconds": 1.0}
        _fake_job(tmp_path, job, [f"optimizer.lr={loss}"], m)
    SweepSummary(echo=True).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert [r["job"] for r in _read_summary(tmp_path)] == ["a/0", "a/1"]
    assert "best: job a/1 (val/loss = 0.2000)" in capsys.readouterr().out
    assert varying_overrides(collect_jobs(tmp_path)) == [["optimizer.lr=0.3"], ["optimizer.lr=0.2"]]


def test_two_job_sweep_writes_a_two_row_summary(tmp_path, tiny_bert, cache_dir) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli([
        "-m", "adapter.r=2,4", f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *FAST,
        "trainer.max_steps=2", "validate_before=false", f"hydra.sweep.dir={sweep}",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_summary(sweep)
    assert len(rows) == 2 and [r["job"] for r in rows] == ["0", "1"]
    for row, r in zip(rows, (2, 4), strict=True):
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert row["status"] == "ok" and f"adapter.r={r}" in row["overrides"].split()
        assert row["monitor"] == metrics["monitor"] == "val/recall@1"
        assert float(row["metric"]) == metrics["after"]["val/recall@1"]
        assert int(row["trainable_params"]) == metrics["trainable_params"] > 0
        assert int(row["adapter_bytes"]) == metrics["adapter_bytes"] > 0
        assert float(row["wall_seconds"]) == metrics["wall_seconds"] > 0
        assert int(row["global_step"]) == 2
    assert int(rows[1]["trainable_params"]) == 2 * int(rows[0]["trainable_params"])  # LoRA params are linear in r
    ranks = [json.loads((sweep / row["job"] / "adapters/final/encoder/adapter_config.json").read_text())["r"]
             for row in rows]
    assert ranks == [2, 4]  # each job trained its own rank
    assert f"Sweep summary (2 jobs): {sweep / SUMMARY_FILE}" in proc.stdout
    assert "| job | overrides | val/recall@1 | trainable params | adapter bytes | wall s | status |" in proc.stdout
    assert "| 0 | adapter.r=2 |" in proc.stdout and "| 1 | adapter.r=4 |" in proc.stdout


@pytest.mark.skipif(not HAS_OPTUNA_SWEEPER, reason="needs hydra-optuna-sweeper==1.3.0 (optuna 2.10.1)")
def test_optuna_search_config_composes() -> None:
    cfg = compose_config(["hparams_search=rank_alpha_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert set(sweeper.params) == {"adapter.r", "adapter.alpha", "optimizer.lr", "adapter.dropout"}
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == 1234
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.validate_before is False
    assert cfg.hydra.callbacks.sweep_summary._target_ == "lightning_lora.sweep.SweepSummary"


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="needs hydra-submitit-launcher==1.2.0")
def test_submitit_slurm_launcher_composes_with_the_summary_callback() -> None:
    overrides = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                 "hydra.launcher.timeout_min=60"]
    cfg = compose_config(overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.gpus_per_node) == ("gpu", 1)
    assert cfg.hydra.callbacks.sweep_summary._target_ == "lightning_lora.sweep.SweepSummary"


@pytest.mark.skipif(not HAS_OPTUNA_SWEEPER, reason="needs hydra-optuna-sweeper==1.3.0 (optuna 2.10.1)")
def test_optuna_search_runs_two_trials_and_gets_the_metric(tmp_path, tiny_bert, cache_dir) -> None:
    sweep = tmp_path / "optuna"
    proc = run_cli([
        "hparams_search=rank_alpha_optuna", "hydra.sweeper.n_trials=2", f"model.pretrained={tiny_bert}",
        f"paths.cache_dir={cache_dir}", *FAST, "trainer.max_steps=2", f"hydra.sweep.dir={sweep}",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        keys = {o.split("=")[0] for o in row["overrides"].split()}
        assert {"adapter.r", "adapter.alpha", "optimizer.lr", "adapter.dropout"} <= keys
    # the sweeper saw the values train.main returned: its best is the best job's monitored metric
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(float(r["metric"]) for r in rows))
