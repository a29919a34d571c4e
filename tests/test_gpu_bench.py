"""``bench/gpu_bench.py``: the tiny scale runs every model on a CPU in seconds (in one process, and one configuration
in a child process); the real-size run is the ``gpu`` test."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_bench.py"
LABELS = {"SD 1.5 UNet", "TRELLIS-L sparse-structure flow", "TRELLIS-L structured-latent flow",
          "Qwen3-VL-2B (shape)"}


def run_bench(args: list[str], out: Path, timeout: int) -> list[dict[str, str]]:
    """Run the script, check it wrote one ``## gpu_bench`` section to ``out``, and return its table's rows."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.count("## gpu_bench ") == 1 and "machine: " in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in table[2:]]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def check_rows(rows: list[dict[str, str]], models: set[str], per_model: int | None = None) -> None:
    """Every model has ``per_model`` rows (when given), each with a finite time and loss; LoRA trains a part."""
    assert {r["model"] for r in rows} == models
    assert per_model is None or all(sum(r["model"] == m for r in rows) == per_model for m in models)
    for r in rows:
        seconds = number(r["s/step (median)"])
        assert math.isfinite(seconds) and seconds > 0, r
        assert math.isfinite(number(r["last loss"])), r
        trainable, total = number(r["trainable params"]), number(r["total params"])
        if r["training"].startswith("LoRA"):
            assert 0 < trainable < total, r
        else:
            assert trainable <= total, r


def test_tiny_scale_times_every_model_on_cpu(tmp_path) -> None:
    out = tmp_path / "results.md"
    rows = run_bench(["--device", "cpu", "--scale", "tiny", "--steps", "1", "--warmup", "1"], out, timeout=300)
    check_rows(rows, LABELS, per_model=4)  # LoRA and full, gradient checkpointing off and on
    assert "all in one process" in out.read_text()


@pytest.mark.slow  # the one-process smoke above covers the code; this adds only the child process
def test_tiny_configuration_in_a_child_process(tmp_path) -> None:
    out = tmp_path / "results.md"
    args = ["--device", "cpu", "--scale", "tiny", "--steps", "1", "--warmup", "0", "--models", "trellis_slat",
            "--modes", "lora", "--checkpointing", "on", "--isolate", "config"]
    rows = run_bench(args, out, timeout=300)
    check_rows(rows, {"TRELLIS-L structured-latent flow"}, per_model=1)
    assert "each configuration in its own process" in out.read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_size_benchmark_on_cuda(tmp_path) -> None:
    out = tmp_path / "results.md"
    rows = [r for r in run_bench(["--steps", "3"], out, timeout=3600) if r["s/step (median)"] != "OOM"]
    loras = [r for r in rows if r["training"].startswith("LoRA")]
    check_rows(loras, LABELS, per_model=2)  # LoRA must fit on any GPU this runs on; full fine-tuning may be OOM
    full = [r for r in rows if r["training"] == "full"]
    check_rows(full, {r["model"] for r in full})
    text = out.read_text()
    assert "device=cuda " in text and "max_memory_allocated" in text
