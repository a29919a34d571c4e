"""LoRA extraction benchmark: full SVD vs the certified randomized method on synthetic UNet-shaped pairs.

Pairs (no diffusers needed; tensors are made lazily, one weight at a time, from per-weight seeds):
``sd15-powerlaw`` and ``sdxl-powerlaw``, the 282 / 794 conv/linear weights of the SD 1.5 / SDXL UNet with full-rank
deltas whose singular values fall as a power law σᵢ ∝ i^-α (``--exponents``), so each module's optimum is known
exactly; ``sd15-lowrank``, the earlier pair (rank-64 delta plus noise). Each method runs in its own child process
(``--memory``, on by default: a second run measures its peak RSS while extracting, resetting the kernel's
high-water mark after each synthetic tensor is made, which takes several copies of it); times are CPU seconds per
module with one thread (``--threads 1``), so other processes on a shared machine do not inflate them, making the
tensors excluded.
Speed-ups are on the modules both methods ran (``--full-stride`` runs the full SVD on a subset). The markdown
section (date, machine, versions, the exact command, the table) replaces the previous one between
``<!-- extract_bench:start -->`` and ``<!-- extract_bench:end -->`` in ``bench/results.md``.

    python bench/extract_bench.py --threads 1                      # SD 1.5 power-law pair, α = 0.5, 0.75, 1.0
    python bench/extract_bench.py --threads 1 --pairs sd15-powerlaw sdxl-powerlaw --full-exponents 0.75 \
        --frontier 1.001 1.02 --full-stride 4 --sdxl-stride 4     # what bench/results.md shows
    python bench/extract_bench.py --methods randomized --limit 40 --no-write   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
from _results import write_section  # the shared section writer of bench/results.md

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- UNet shapes
def unet_shapes(chans: list[int], layers: list[int], ctx: int, heads_linear: bool, add_embed: int = 0,
                ) -> dict[str, tuple[int, ...]]:
    """The conv/linear ``*.weight`` shapes of a diffusers ``UNet2DConditionModel``: ``chans`` per level, ``layers``
    transformer blocks per attention (0: no attention at that level), ``ctx`` the text width, ``heads_linear`` the
    SDXL-style linear proj_in/proj_out (SD 1.5: 1×1 convs), ``add_embed`` the SDXL text-time embedding's input."""
    shapes: dict[str, tuple[int, ...]] = {}
    temb = 4 * chans[0]

    def resnet(p: str, cin: int, cout: int) -> None:
        shapes[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
        shapes[f"{p}.time_emb_proj.weight"] = (cout, temb)
        shapes[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            shapes[f"{p}.conv_shortcut.weight"] = (cout, cin, 1, 1)

    def transformer(p: str, c: int, depth: int) -> None:
        proj = (c, c) if heads_linear else (c, c, 1, 1)
        shapes[f"{p}.proj_in.weight"] = proj
        for b in range(depth):
            t = f"{p}.transformer_blocks.{b}"
            for a, kv in (("attn1", c), ("attn2", ctx)):
                shapes[f"{t}.{a}.to_q.weight"] = (c, c)
                shapes[f"{t}.{a}.to_k.weight"] = (c, kv)
                shapes[f"{t}.{a}.to_v.weight"] = (c, kv)
                shapes[f"{t}.{a}.to_out.0.weight"] = (c, c)
            shapes[f"{t}.ff.net.0.proj.weight"] = (8 * c, c)  # GEGLU
            shapes[f"{t}.ff.net.2.weight"] = (c, 4 * c)
        shapes[f"{p}.proj_out.weight"] = proj

    levels = len(chans)
    shapes["conv_in.weight"] = (chans[0], 4, 3, 3)
    shapes["time_embedding.linear_1.weight"] = (temb, chans[0])
    shapes["time_embedding.linear_2.weight"] = (temb, temb)
    if add_embed:
        shapes["add_embedding.linear_1.weight"] = (temb, add_embed)
        shapes["add_embedding.linear_2.weight"] = (temb, temb)
    cin = chans[0]
    for i, c in enumerate(chans):
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
            if layers[i]:
                transformer(f"down_blocks.{i}.attentions.{j}", c, layers[i])
        if i < levels - 1:
            shapes[f"down_blocks.{i}.downsamplers.0.conv.weight"] = (c, c, 3, 3)
        cin = c
    top = chans[-1]
    resnet("mid_block.resnets.0", top, top)
    transformer("mid_block.attentions.0", top, max(layers[-1], 1))
    resnet("mid_block.resnets.1", top, top)
    rev, rev_layers = chans[::-1], layers[::-1]
    for i, out in enumerate(rev):
        prev, inp = rev[max(i - 1, 0)], rev[min(i + 1, levels - 1)]
        for j in range(3):
            skip = inp if j == 2 else out
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + skip, out)
            if rev_layers[i]:
                transformer(f"up_blocks.{i}.attentions.{j}", out, rev_layers[i])
        if i < levels - 1:
            shapes[f"up_blocks.{i}.upsamplers.0.conv.weight"] = (out, out, 3, 3)
    shapes["conv_out.weight"] = (4, chans[0], 3, 3)
    return shapes


def sd15_unet_shapes() -> dict[str, tuple[int, ...]]:
    """The 282 conv/linear weights of diffusers' SD 1.5 UNet (859M parameters)."""
    return unet_shapes([320, 640, 1280, 1280], [1, 1, 1, 0], ctx=768, heads_linear=False)


def sdxl_unet_shapes() -> dict[str, tuple[int, ...]]:
    """The conv/linear weights of diffusers' SDXL base UNet (transformer depths 0/2/10, text width 2048, linear
    projections, the text-time embedding of 2816 inputs)."""
    return unet_shapes([320, 640, 1280], [0, 2, 10], ctx=2048, heads_linear=True, add_embed=2816)


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


class PowerLaw(Synthetic):
    """A lazy pair whose deltas have singular values σᵢ = 0.1·i^(-exponent), i = 1 … min(out, in·k), full rank.

    The delta is L·diag(σ)·R with L, R orthogonal: two rounds of random signs, an orthonormal DCT and a random
    permutation on each side (O(mn log) to make, exact singular values). So the Eckart–Young optimum at rank r is
    known without an SVD: √(Σ_{i>r} σᵢ² / Σ σᵢ²).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], tuned: bool, exponent: float):
        super().__init__(shapes, tuned)
        self.exponent = exponent

    def spectrum(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        k = min(shape[0], math.prod(shape[1:]))
        return 0.1 * torch.arange(1, k + 1, dtype=torch.float64) ** (-self.exponent)

    def optimum(self, key: str, rank: int) -> float:
        s2 = self.spectrum(key) ** 2
        return math.sqrt(float(s2[rank:].sum() / s2.sum()))

    def get(self, key: str) -> torch.Tensor:
        import numpy as np
        from scipy.fft import dct

        shape = self.shapes[key]
        g = torch.Generator().manual_seed(1000 + self.index[key])
        out, rest = shape[0], math.prod(shape[1:])
        w = torch.randn(out, rest, generator=g) * 0.02
        if self.tuned:
            rng = np.random.default_rng(1000 + self.index[key])
            s = self.spectrum(key).numpy()
            x = np.zeros((out, rest), dtype=np.float32)
            x[np.arange(s.size), np.arange(s.size)] = s
            for _ in range(2):
                signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(out, 1))
                x = dct(x * signs, axis=0, norm="ortho")[rng.permutation(out)]
                signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(1, rest))
                x = dct(x * signs, axis=1, norm="ortho")[:, rng.permutation(rest)]
            w += torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return w.reshape(shape)


PAIRS = ("sd15-lowrank", "sd15-powerlaw", "sdxl-powerlaw")


def make_pair(pair: str, exponent: float | None, limit: int, stride: int = 1) -> tuple[Synthetic, Synthetic]:
    shapes = sdxl_unet_shapes() if pair.startswith("sdxl") else sd15_unet_shapes()
    if limit:
        shapes = dict(list(shapes.items())[:limit])
    shapes = dict(list(shapes.items())[::stride])
    if pair == "sd15-lowrank":
        return Synthetic(shapes, False), Synthetic(shapes, True)
    return PowerLaw(shapes, False, exponent), PowerLaw(shapes, True, exponent)


# ---------------------------------------------------------------------------- one method (child process)
def peak_rss_mb() -> float:
    """This process's peak RSS in MB since the last ``reset_peak_rss`` (VmHWM), else its whole peak (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Give free heap memory back to the kernel (glibc's malloc_trim), then set this process's peak RSS (VmHWM) to
    its current RSS (Linux ≥ 4.0); False where the peak cannot be reset. After it the RSS is live memory, not what
    making the last synthetic tensor left free, so a peak read later is the extraction's own."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(args: argparse.Namespace) -> None:
    from lightning_lora.adapters import svd
    from lightning_lora.adapters.extract import extract_lora
    from lightning_lora.adapters.factors import Factors

    method = args.child
    if method == "read":  # reading the pair and making the deltas only: the memory every method needs
        from lightning_lora.adapters import extract

        method = "full"

        def no_svd(delta: torch.Tensor, rank, **_):
            r = min(rank, *delta.shape[:2])
            return (Factors(torch.zeros(r, *delta.shape[1:]), torch.zeros(delta.shape[0], r, *(1,) * (delta.ndim - 2)),
                            1.0), svd.ModuleResult("", tuple(delta.shape), r, 1.0, 0.0))

        extract.factorize = no_svd
    if method == "full-main":  # the full SVD as main had it: LAPACK on wide matrices as they are (~5x slower)
        method = "full"

        def full_as_is(matrix: torch.Tensor, rank: int):
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            return u[:, :rank], s[:rank], vh[:rank], s

        svd._full_svd = full_as_is
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tuned = make_pair(args.pair, args.exponent, args.limit, args.stride)
    times: dict[str, float] = {}

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    making = [0.0]  # seconds spent making the synthetic tensors, subtracted per module
    # --memory: the peak RSS while extracting, reset after each tensor is made (making one takes several copies of
    # it, which reading a checkpoint does not) and read when its module is done. Its own run: the reset gives free
    # memory back to the kernel, so the method's next allocations fault their pages in again (~8% slower)
    watermark = [args.child_memory and reset_peak_rss(), 0.0]

    def timed_get(get):
        def wrapped(key: str) -> torch.Tensor:
            t = clock()
            out = get(key)
            if watermark[0]:
                reset_peak_rss()
            making[0] += clock() - t
            return out
        return wrapped

    base.get, tuned.get = timed_get(base.get), timed_get(tuned.get)

    def timed(names):  # CPU seconds per module: with one thread, robust to other processes on a shared machine
        for name in names:
            t, made = clock(), making[0]
            yield name
            times[name] = clock() - t - (making[0] - made)
            if watermark[0]:
                watermark[1] = max(watermark[1], peak_rss_mb())

    t0 = time.perf_counter()
    result = extract_lora(base, tuned, rank=args.rank, conv_rank=args.rank, min_diff=0.0, method=method,
                          device=args.device, progress=timed,
                          max_error_ratio=args.ratio)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    known = isinstance(tuned, PowerLaw)
    print(json.dumps({
        "method": args.child, "ratio": args.ratio, "seconds": seconds,
        "extracting_rss_mb": watermark[1] if watermark[0] else None,
        "times": times,
        "errors": {r.name: r.rel_error for r in result.results},
        "optimum": {r.name: (tuned.optimum(f"{r.name}.weight", r.rank) if known else r.optimum)
                    for r in result.results},
        "optimum_known": known, "fallbacks": result.fallbacks,
    }))


def child(args: argparse.Namespace, method: str, pair: str, exponent: float | None, limit: int, ratio: float,
          stride: int = 1, memory: bool = False) -> dict:
    """One method's run in a child process; ``memory`` (with ``--memory`` on): its peak RSS while extracting too,
    from a second run (the run that measures it is slower), or from the same run for ``read``, which times nothing."""
    measure = memory and args.memory
    run = _child_run(args, method, pair, exponent, limit, ratio, stride, measure and method == "read")
    if measure and method != "read":
        run["extracting_rss_mb"] = _child_run(args, method, pair, exponent, limit, ratio, stride,
                                              True)["extracting_rss_mb"]
    return run


def _child_run(args: argparse.Namespace, method: str, pair: str, exponent: float | None, limit: int,
               ratio: float, stride: int, memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--pair", pair, "--rank", str(args.rank), "--limit",
           str(limit), "--device", args.device, "--threads", str(args.threads), "--clock", args.clock,
           "--ratio", str(ratio), "--stride", str(stride)] + (["--child-memory"] if memory else [])
    if exponent is not None:
        cmd += ["--exponent", str(exponent)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_cell(run: dict) -> str:
    extracting = run.get("extracting_rss_mb")
    return f"{extracting:.0f}" if extracting is not None else "-"


def row(pair: str, exponent: float | None, label: str, run: dict, full: dict | None) -> str:
    ref = run["optimum"]
    if not run["optimum_known"] and full is not None:
        ref = {n: full["errors"][n] for n in run["errors"] if n in full["errors"]}
    ratios = [run["errors"][n] / ref[n] for n in run["errors"] if ref.get(n)]
    est = "" if run["optimum_known"] or full is not None else " (est.)"
    seconds = sum(run["times"].values())
    speed = ""
    if full is not None and run is not full:
        common = [n for n in full["times"] if n in run["times"]]
        speed = f"{sum(full['times'][n] for n in common) / max(sum(run['times'][n] for n in common), 1e-9):.1f}x"
        if len(common) < len(run["times"]):
            speed += f" ({len(common)} modules)"
    return (f"| {pair} | {exponent if exponent is not None else '-'} | {label} | {len(run['errors'])} | "
            f"{seconds:.1f} | {speed or '-'} | {rss_cell(run)} | "
            f"{sum(ratios) / max(len(ratios), 1):.5f}{est} | {max(ratios, default=float('nan')):.5f}{est} | "
            f"{run['fallbacks']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["sd15-powerlaw"], choices=PAIRS)
    p.add_argument("--exponents", nargs="+", type=float, default=[0.5, 0.75, 1.0],
                   help="power-law exponents α of the deltas' singular values σᵢ ∝ i^-α")
    p.add_argument("--methods", nargs="+", default=["full", "randomized"],
                   choices=["read", "full-main", "full", "randomized"],
                   help="full-main: the full SVD as at main (wide matrices not transposed), timed beside the others; "
                        "read: reading the pair and making the deltas only (the peak RSS every method starts from)")
    p.add_argument("--ratios", nargs="+", type=float, default=[1.01],
                   help="--max-error-ratio values of the randomized method (several: the speed/error frontier)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="only the first N weights (0: all)")
    p.add_argument("--full-limit", type=int, default=0,
                   help="the full SVD on the first N weights only (0: the same as --limit); speed-ups are then on "
                        "those modules")
    p.add_argument("--stride", type=int, default=1, help="every N-th weight only (both methods)")
    p.add_argument("--sdxl-stride", type=int, default=1, help="the SDXL pair: every N-th of those weights only")
    p.add_argument("--full-stride", type=int, default=1,
                   help="the full SVD on every N-th of those weights only (it is long on 2 cores); speed-ups are "
                        "then on the weights both methods ran")
    p.add_argument("--frontier", nargs="+", type=float, default=[],
                   help="more --max-error-ratio values, on the SD 1.5 power-law pair at the first exponent only "
                        "(the speed/error frontier)")
    p.add_argument("--full-exponents", nargs="+", type=float, default=None,
                   help="run the full SVD at these exponents only (default: every one); the others' speed-ups use "
                        "the full SVD's time at another exponent (its cost is set by the shapes, not the spectrum)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: CPU seconds (with one thread, robust to other processes); wall: elapsed seconds (to see "
                        "what two threads give, on a quiet machine)")
    p.add_argument("--results", default=str(HERE / "results.md"))
    p.add_argument("--no-write", action="store_true", help="print the section without writing results.md")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="each method's peak RSS while extracting, from a run of its own (not for main's full SVD or "
                        "the --frontier ratios)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pair", default="sd15-powerlaw", help=argparse.SUPPRESS)
    p.add_argument("--exponent", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, default=1.01, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args)
    lines, fulls, mains = [], {}, {}
    for pair in args.pairs:
        timed_full = args.full_exponents
        exponents = sorted(args.exponents, key=lambda e: timed_full is not None and e not in timed_full)
        stride = args.stride * (args.sdxl_stride if pair.startswith("sdxl") else 1)
        for exponent in [None] if pair == "sd15-lowrank" else exponents:  # those with a full SVD run first
            own_full = args.full_exponents is None or exponent in args.full_exponents
            if "full-main" in args.methods and own_full and pair == "sd15-powerlaw":
                old = child(args, "full-main", pair, exponent, args.full_limit or args.limit, 1.01,
                            stride * args.full_stride)
                lines.append(row(pair, exponent, "full SVD as at main (wide matrices as is)", old, old))
                mains[pair] = old
                print(lines[-1], flush=True)
            if "read" in args.methods and own_full:  # the peak RSS of reading alone, beside the others'
                read = child(args, "read", pair, exponent, args.limit, 1.01, stride, memory=True)
                lines.append(f"| {pair} | {exponent} | reading the pair and making the deltas only | "
                             f"{len(read['errors'])} | {sum(read['times'].values()):.1f} | - | "
                             f"{rss_cell(read)} | - | - | - |")
                print(lines[-1], flush=True)
            if "full" in args.methods and own_full:
                full = child(args, "full", pair, exponent, args.full_limit or args.limit, 1.01,
                             stride * args.full_stride, memory=True)
                full["exponent"] = exponent
                lines.append(row(pair, exponent, "full SVD", full, full))
                if "full-main" in args.methods and pair == "sd15-powerlaw":
                    common = [n for n in old["times"] if n in full["times"]]
                    gain = sum(old["times"][n] for n in common) / max(sum(full["times"][n] for n in common), 1e-9)
                    lines[-1] = lines[-1].replace("| - |", f"| {gain:.1f}x vs main's |", 1)
                print(lines[-1], flush=True)
                fulls[pair] = full
            full = fulls.get(pair)
            if full is not None and full["exponent"] != exponent:
                # only its times are used then: errors and optimum are per exponent
                full = {**full, "errors": {}, "optimum": {}}
            if "randomized" in args.methods:
                frontier = args.frontier if pair == "sd15-powerlaw" and exponent == exponents[0] else []
                for ratio in args.ratios + frontier:
                    run = child(args, "randomized", pair, exponent, args.limit, ratio, stride,
                                memory=ratio in args.ratios)
                    label = f"randomized, max ratio {ratio:g}"
                    if full is not None and full["exponent"] != exponent:
                        label += f" (vs the full SVD timed at exponent {full['exponent']})"
                    lines.append(row(pair, exponent, label, run, full))
                    if pair in mains:  # the speed-up over main's full SVD too
                        common = [n for n in mains[pair]["times"] if n in run["times"]]
                        gain = sum(mains[pair]["times"][n] for n in common) / max(
                            sum(run["times"][n] for n in common), 1e-9)
                        cells = lines[-1].split(" | ")
                        cells[5] += f"; {gain:.1f}x vs main's full SVD"
                        lines[-1] = " | ".join(cells)
                    print(lines[-1], flush=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else ""
    import peft
    import scipy

    header = [
        f"## extract_bench {dt.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"threads={args.threads or torch.get_num_threads()} device={args.device} {gpu} "
        f"load average at the end {os.getloadavg()[0]:.1f}".replace("  ", " "),
        f"versions: python {platform.python_version()}, torch {torch.__version__}, peft {peft.__version__}, "
        f"scipy {scipy.__version__}",
        f"command: `python bench/extract_bench.py {' '.join(sys.argv[1:])}`",
        "",
        f"Pairs (synthetic, made lazily one weight at a time; extraction rank {args.rank} for linear and conv): "
        "`sd15-lowrank` SD 1.5 UNet weights (282), delta of rank 64 plus noise with 10% of its energy; "
        "`sd15-powerlaw` / `sdxl-powerlaw` SD 1.5 (282) / SDXL (794) UNet weights, full-rank deltas with singular "
        "values σᵢ ∝ i^-α (α = exponent), so the optimum is known exactly. "
        + ("Seconds: CPU seconds of the extraction (one thread, so other processes on the machine do not count), "
           if args.clock == "cpu" else "Seconds: elapsed seconds of the extraction, ")
        + "making the tensors excluded. "
        "Peak RSS MB while extracting: from the kernel's high-water mark in a run of its own, reset after each "
        "synthetic tensor is made, with free heap memory given back first (making a tensor takes several copies of "
        "it, which reading a checkpoint does not; that reset slows the method, so the times come from another run). "
        "err/opt: each module's relative error over its Eckart–Young optimum (est.: over the method's own bound).",
        "",
        "| pair | exponent | method | modules | seconds | speed-up vs full | peak RSS MB while extracting "
        "| mean err/opt | worst err/opt | full-SVD fallbacks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("extract_bench", text, args.results)


if __name__ == "__main__":
    main()
