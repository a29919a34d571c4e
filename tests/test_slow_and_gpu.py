"""Tests outside the default run: the full default job (slow) and the CUDA path (gpu)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from lightning_lora.train import run


@pytest.mark.slow
def test_default_job_improves_retrieval(tmp_path) -> None:
    """The README's demo: pretrained MiniLM on the stdlib code-search task, no overrides (about 4 minutes)."""
    run_dir = tmp_path / "default"
    proc = run_cli([f"hydra.run.dir={run_dir}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert after["val/recall@1"] - before["val/recall@1"] >= 0.05
    assert after["val/mrr@10"] > before["val/mrr@10"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])  # 16-mixed: GradScaler over fp32 LoRA weights
def test_mixed_precision_run_on_cuda_keeps_lora_fp32(fast_cfg, precision) -> None:
    metrics, objects = run(fast_cfg(["trainer.accelerator=gpu", f"trainer.precision={precision}"]))
    assert metrics["global_step"] == 4
    lora = {n: p for n, p in objects["module"].named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.is_cuda for p in lora.values())
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
