"""Per-step cost of NanGuard's gradient check on each tiny preset: a loop over every named parameter checking each
gradient tensor (what NanGuard did before issue 21) vs NanGuard's one-pass check of the trainable gradients.

Each preset's module gets one backward on a real batch; then both checks run alternately (``--repeats`` each, one
torch thread) and the medians are reported. Nothing here is non-finite: this is the price every healthy step pays.

    python bench/hook_cost.py
    python bench/hook_cost.py --models sd_tiny lbm_tiny --repeats 100
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import header, write_section

HERE = Path(__file__).resolve().parent
MODELS = ("clip_tiny", "qwen3_vl_tiny", "sd_tiny", "lbm_tiny", "trellis_slat_tiny")


def per_tensor_check(module: Any) -> str | None:
    """The earlier check: every named parameter walked, each gradient checked on its own."""
    import torch

    for name, p in module.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


def measure(model: str, repeats: int) -> dict[str, Any]:
    import loop_bench as lb

    from lightning_lora.callbacks.nan_guard import NanGuard
    from lightning_lora.module import LoRAAdaptationModule

    cfg = lb.compose(model, Path(tempfile.mkdtemp(prefix="hook_cost_")) / "run")
    head, datamodule = lb.build(cfg, cfg.seed)
    module = LoRAAdaptationModule(head, lb.spec())
    head.training_step(next(iter(datamodule.train_dataloader()))).loss.backward()
    guard = NanGuard()
    trainer = type("NoScaler", (), {"precision_plugin": None})  # the guard only asks for a gradient scaler
    checks = {"per tensor": lambda: per_tensor_check(module), "one pass": lambda: guard._gradient_problem(trainer,
                                                                                                       module)}
    times: dict[str, list[float]] = {k: [] for k in checks}
    for name, check in checks.items():  # warm-up (the guard lists the trainable parameters once)
        assert check() is None, name
    for i in range(repeats):
        for name in (list(checks) if i % 2 == 0 else list(reversed(checks))):
            start = time.perf_counter()
            checks[name]()
            times[name].append(time.perf_counter() - start)
    return {"model": model, "trainable": sum(1 for p in module.parameters() if p.requires_grad),
            "tensors": sum(1 for _ in module.parameters()),
            **{k: 1000 * statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(HERE / "results.md"), help="file whose hook_cost section is replaced")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = ["| model | trainable tensors / all | per-tensor check ms | one pass ms | saved per step ms |",
            "| --- | --- | --- | --- | --- |"]
    for model in args.models:
        r = measure(model, args.repeats)
        rows.append(f"| {model} | {r['trainable']} / {r['tensors']} | {r['per tensor']:.3f} | {r['one pass']:.3f} | "
                    f"{r['per tensor'] - r['one pass']:.3f} |")
        print(rows[-1], flush=True)
    text = "\n".join([*header("hook_cost", ["lightning", "peft"], machine="torch threads=1 device=cpu"), "",
                      f"NanGuard's gradient check per training step (median of {args.repeats} alternating calls, "
                      "healthy gradients after one backward):", "", *rows]) + "\n"
    print(text)
    write_section("hook_cost", text, args.out)


if __name__ == "__main__":
    main()
