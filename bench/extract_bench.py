"""LoRA extraction benchmark on an SD-1.5-UNet-sized pair of synthetic checkpoints (no diffusers needed).

The 282 conv/linear weights of the SD 1.5 UNet (diffusers names and shapes, 859M parameters) are synthesised
lazily, one at a time, from a per-weight seed: base = random, tuned = base + a decaying-spectrum rank-64 delta +
noise carrying 10% of its energy. Each method runs in its own child process so its peak RSS is its own.
Results are appended to ``bench/results.md``. On a busy machine pass ``--threads 1``: torch's multi-threaded
SVD can be tens of times slower when other processes compete for the cores.

    python bench/extract_bench.py                                   # full and randomized, all 282 weights
    python bench/extract_bench.py --methods randomized --limit 40   # a quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- SD 1.5 UNet shapes
def sd15_unet_shapes() -> dict[str, tuple[int, ...]]:
    """The 282 ``*.weight`` tensors with ndim >= 2 of diffusers' SD 1.5 ``UNet2DConditionModel``."""
    shapes: dict[str, tuple[int, ...]] = {}
    temb, ctx = 1280, 768
    chans = [320, 640, 1280, 1280]

    def resnet(p: str, cin: int, cout: int) -> None:
        shapes[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
        shapes[f"{p}.time_emb_proj.weight"] = (cout, temb)
        shapes[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            shapes[f"{p}.conv_shortcut.weight"] = (cout, cin, 1, 1)

    def transformer(p: str, c: int) -> None:
        shapes[f"{p}.proj_in.weight"] = (c, c, 1, 1)
        t = f"{p}.transformer_blocks.0"
        for a, kv in (("attn1", c), ("attn2", ctx)):
            shapes[f"{t}.{a}.to_q.weight"] = (c, c)
            shapes[f"{t}.{a}.to_k.weight"] = (c, kv)
            shapes[f"{t}.{a}.to_v.weight"] = (c, kv)
            shapes[f"{t}.{a}.to_out.0.weight"] = (c, c)
        shapes[f"{t}.ff.net.0.proj.weight"] = (8 * c, c)  # GEGLU
        shapes[f"{t}.ff.net.2.weight"] = (c, 4 * c)
        shapes[f"{p}.proj_out.weight"] = (c, c, 1, 1)

    shapes["conv_in.weight"] = (320, 4, 3, 3)
    shapes["time_embedding.linear_1.weight"] = (temb, 320)
    shapes["time_embedding.linear_2.weight"] = (temb, temb)
    cin = 320
    for i, c in enumerate(chans):
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
            if i < 3:
                transformer(f"down_blocks.{i}.attentions.{j}", c)
        if i < 3:
            shapes[f"down_blocks.{i}.downsamplers.0.conv.weight"] = (c, c, 3, 3)
        cin = c
    resnet("mid_block.resnets.0", 1280, 1280)
    transformer("mid_block.attentions.0", 1280)
    resnet("mid_block.resnets.1", 1280, 1280)
    rev = chans[::-1]
    for i, out in enumerate(rev):
        prev, inp = rev[max(i - 1, 0)], rev[min(i + 1, 3)]
        for j in range(3):
            skip = inp if j == 2 else out
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + skip, out)
            if i > 0:
                transformer(f"up_blocks.{i}.attentions.{j}", out)
        if i < 3:
            shapes[f"up_blocks.{i}.upsamplers.0.conv.weight"] = (out, out, 3, 3)
    shapes["conv_out.weight"] = (4, 320, 3, 3)
    return shapes


class Synthetic:
    """A lazy checkpoint: ``get(key)`` makes the tensor from a per-key seed (base, or base + delta).

    The delta is U·diag(s)·V with s = logspace(0, -1.5, 64) and random U, V, plus Gaussian noise carrying
    10% of its energy, so rank 32 has a non-trivial optimum error and a flat tail (the hard case for a sketch).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], tuned: bool, delta_rank: int = 64, noise: float = 0.1):
        self.shapes, self.tuned, self.delta_rank, self.noise = shapes, tuned, delta_rank, noise
        self.index = {k: i for i, k in enumerate(shapes)}

    def __iter__(self):
        return iter(self.shapes)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def get(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        g = torch.Generator().manual_seed(1000 + self.index[key])
        out, rest = shape[0], math.prod(shape[1:])
        w = torch.randn(out, rest, generator=g) * 0.02
        if self.tuned:
            k = min(self.delta_rank, out, rest)
            s = torch.logspace(0, -1.5, k) * 0.01
            u = torch.randn(out, k, generator=g) / math.sqrt(out)
            v = torch.randn(k, rest, generator=g) / math.sqrt(rest)
            delta = (u * s) @ v
            # noise carrying `noise` (10%) of the low-rank part's energy
            std = self.noise ** 0.5 * float(delta.norm()) / math.sqrt(delta.numel())
            w += delta + std * torch.randn(out, rest, generator=g)
        return w.reshape(shape)


# ---------------------------------------------------------------------------- one method (child process)
def run_child(args: argparse.Namespace) -> None:
    from lightning_lora.adapters.extract import extract_lora

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = sd15_unet_shapes()
    if args.limit:
        shapes = dict(list(shapes.items())[: args.limit])
    base, tuned = Synthetic(shapes, False), Synthetic(shapes, True)
    t0 = time.perf_counter()
    result = extract_lora(base, tuned, rank=args.rank, conv_rank=args.rank, min_diff=0.0, method=args.child,
                          device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # time spent synthesising the tensors is included; measure it alone to subtract
    t1 = time.perf_counter()
    for key in shapes:
        tuned.get(key), base.get(key)
    synth = time.perf_counter() - t1
    errors = {r.name: r.rel_error for r in result.results}
    print(json.dumps({
        "method": args.child, "modules": len(result.results), "seconds": seconds, "synth_seconds": synth,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "errors": errors, "fallbacks": result.fallbacks,
        "optimum": {r.name: r.optimum for r in result.results},
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["full", "randomized"], choices=["full", "randomized"])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="only the first N weights (0: all 282)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--results", default=str(HERE / "results.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args)
    runs = {}
    for method in args.methods:
        cmd = [sys.executable, __file__, "--child", method, "--rank", str(args.rank), "--limit", str(args.limit),
               "--device", args.device, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = []
    full = runs.get("full")
    for method, r in runs.items():
        errs = list(r["errors"].values())
        worst = max(r["errors"], key=r["errors"].get)
        ref = full["errors"] if full else r["optimum"]  # exact optimum from the full SVD when it ran
        ratios = [r["errors"][k] / ref[k] for k in r["errors"] if ref.get(k)]
        lines.append(
            f"| {method} | {r['modules']} | {r['seconds']:.1f} | {r['seconds'] - r['synth_seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {sum(errs) / len(errs):.4f} | {r['errors'][worst]:.4f} | "
            f"{max(ratios):.4f}{'' if full else ' (est.)'} | {r['fallbacks']} |")
    if full and "randomized" in runs:
        f_t = full["seconds"] - full["synth_seconds"]
        r_t = runs["randomized"]["seconds"] - runs["randomized"]["synth_seconds"]
        lines.append(f"\nSpeed-up of randomized over full SVD (synthesis excluded): {f_t / max(r_t, 1e-9):.1f}x")
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else ""
    import peft

    header = [
        f"\n## extract_bench {dt.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"threads={args.threads or torch.get_num_threads()} device={args.device} {gpu}".rstrip(),
        f"versions: python {platform.python_version()}, torch {torch.__version__}, peft {peft.__version__}",
        f"pair: synthetic SD 1.5 UNet weights (282 conv/linear), limit={args.limit or 'all'}, "
        f"delta rank 64 (decaying spectrum) + noise (10% of its energy); extraction rank {args.rank} (linear and conv)",
        "",
        "| method | modules | seconds | seconds w/o synthesis | peak RSS MB | mean rel err | worst rel err "
        "| worst err / optimum | full-SVD fallbacks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    text = "\n".join(header + lines) + "\n"
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
