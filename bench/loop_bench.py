"""Training-loop overhead, memory, latency and sizes; one command, its section of ``bench/results.md`` replaced.

1. Throughput: ``LoRAAdaptationModule`` under the Lightning ``Trainer`` vs a hand-written PyTorch + PEFT loop
   (``get_peft_model`` on the same submodules, the trainable parameters filtered by ``requires_grad``, AdamW, then
   ``zero_grad / backward / step / lr_scheduler.step`` per batch) on the same model, data loader, batch, objective
   and seed. Each run builds a fresh model; runs alternate (L P, P L, ...) in one process per model; the steps after
   warm-up are timed end-of-step to end-of-step (data loading included in both) on two clocks, the process's CPU
   time (immune to other processes on a shared machine) and the wall; a run's rate is 1 / its median step.
   Ratio = median over runs of Lightning steps/s / the same for the plain loop.
   Both in fp32, one torch thread per child (--threads), no gradient clipping, no logger, no checkpointing.
   A third run per round puts the plain loop's PEFT head in the barest LightningModule (training step + AdamW +
   per-step LambdaLR): "bare / plain" is Lightning's own cost, "ours / bare" that of ``LoRAAdaptationModule``.
2. Memory: peak RSS of a child process training LoRA vs fully fine-tuning the same submodules (plain loop), and
   the bytes of AdamW's state.
3. Forward latency (eval, no grad) of the adapted submodule on a captured training input: base, with an unmerged
   adapter, and merged (``merge_and_unload``), timed alternately.
4. Sizes on disk: the adapter snapshot (every format the family writes), a resumable Lightning checkpoint
   (adapter + optimizer + loop state) and the base weights.

    python bench/loop_bench.py                                  # every model below, ~10 min on 2 CPU cores
    python bench/loop_bench.py --models minilm sd_tiny --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import header, write_section

HERE = Path(__file__).resolve().parent
MODELS: dict[str, list[str]] = {
    "minilm": ["model=minilm", "data=code_search", "data.batch_size=16"],
    "clip_tiny": ["model=clip_tiny", "data=digits_retrieval", "data.batch_size=16"],
    "qwen3_vl_tiny": ["model=qwen3_vl_tiny", "data=digits_retrieval", "data.batch_size=8"],
    "sd_tiny": ["model=sd_tiny", "data=digits", "data.batch_size=8"],
    "lbm_tiny": ["model=lbm_tiny", "data=digits_pairs", "data.batch_size=8"],
    "trellis_slat_tiny": ["model=trellis_slat_tiny", "data=trellis_demo", "data.batch_size=4"],
}
PARTS = ("throughput", "memory", "latency")
STEPS = {"minilm": (2, 8)}  # (warm-up, timed); others use --warmup/--steps
THREADS = 1  # set from --threads in the parent


# ---------------------------------------------------------------------------------------------- building
def compose(model: str, out: Path) -> Any:
    from omegaconf import open_dict

    from lightning_lora.config import compose_config

    cfg = compose_config([*MODELS[model], "trainer.precision=32-true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def build(cfg: Any, seed: int = 0) -> tuple[Any, Any]:
    """(head, datamodule), freshly built after seeding; the data is set up for fitting."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    pl.seed_everything(seed, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    pl.seed_everything(seed, verbose=False)
    return instantiate(cfg.model), datamodule


def spec():
    from lightning_lora.adapters import AdapterSpec

    return AdapterSpec(r=8, alpha=16, dropout=0.0)


def plain_peft(head: Any, full: bool = False) -> list[Any]:
    """The seed's way: PEFT into the head's default submodules (or all their weights for full fine-tuning),
    everything else frozen; returns the trainable parameters."""
    from peft import LoraConfig, get_peft_model

    head.requires_grad_(False)
    available, targets = head.adaptable_submodules(), head.default_targets()
    for name in head.default_submodules():
        if full:
            available[name].requires_grad_(True)
        else:
            s = spec()
            get_peft_model(available[name], LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0,
                                                       target_modules=list(targets[name])))
    head.train()
    return [p for p in head.parameters() if p.requires_grad]


def _optimizer(params: list[Any]):
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


CLOCKS = ("cpu", "wall")


def _now() -> tuple[float, float]:
    """(CPU seconds of this process, all its threads; wall seconds). The CPU clock does not run while another
    process on a shared machine has the core, so it measures the work a loop does; the wall clock is what a user
    waits, preemption included."""
    return time.process_time(), time.perf_counter()


def _rates(ends: list[tuple[float, float]], warmup: int) -> dict[str, float]:
    """Steps per second per clock from the median step (end of step to end of step after warm-up): a burst of load
    from another process moves a mean, hardly a median."""
    out = {}
    for i, clock in enumerate(CLOCKS):
        steps = [b[i] - a[i] for a, b in zip(ends[warmup - 1:], ends[warmup:], strict=False)]
        out[clock] = 1.0 / statistics.median(steps)
    return out


# ---------------------------------------------------------------------------------------------- the two loops
def run_plain(cfg: Any, warmup: int, steps: int, full: bool = False) -> dict[str, Any]:
    import lightning.pytorch as pl

    head, datamodule = build(cfg, cfg.seed)
    params = plain_peft(head, full=full)
    loaded_rss_mb = _rss_mb()
    optimizer, lr_scheduler = _optimizer(params)
    ends, loss, saved = [], None, None
    pl.seed_everything(cfg.seed, verbose=False)  # the same shuffled batches as the Lightning run (and any mode)
    data = iter(datamodule.train_dataloader())
    for _ in range(warmup + steps):
        try:
            batch = next(data)
        except StopIteration:
            data = iter(datamodule.train_dataloader())
            batch = next(data)
        if saved is None:  # first step: what autograd keeps for backward (activations; parameters excluded)
            saved, loss = _saved_bytes(head, batch)
        else:
            loss = head.training_step(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        ends.append(_now())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if hasattr(t, "numel"))
    grads = sum(p.numel() * p.element_size() for p in params)
    return {"steps_per_s": _rates(ends, warmup), "loss": float(loss.detach()), "optimizer_state_bytes": state,
            "trainable_params": sum(p.numel() for p in params), "loaded_rss_mb": loaded_rss_mb,
            "saved_activation_bytes": saved, "grad_bytes": grads}


def _saved_bytes(head: Any, batch: Any) -> tuple[int, Any]:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one training step."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in head.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head.training_step(batch).loss
    return sum(seen.values()), loss


def _bare_module(head: Any) -> Any:
    """The least a LightningModule can be over the plain loop's PEFT head: a training step returning the loss,
    AdamW + a constant LambdaLR stepped per batch. Separates Lightning's own cost from ``LoRAAdaptationModule``'s."""
    import lightning.pytorch as pl

    class Bare(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = head
            self.trainable = plain_peft(head)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.head.training_step(batch).loss

        def configure_optimizers(self) -> Any:
            optimizer, lr_scheduler = _optimizer(self.trainable)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    return Bare()


def shipped_trainer(cfg: Any, max_steps: int, clock: Any, run: int) -> Any:
    """The Trainer ``python -m lightning_lora.train`` builds from the composed config (``conf/trainer/default.yaml``,
    the callbacks of ``conf/callbacks/default.yaml`` that ``train.trainer_callbacks`` keeps, the TensorBoard logger,
    atomic checkpoint IO), bounded to ``max_steps`` with no validation and, like the plain loop, no gradient
    clipping; in a run directory of its own (its snapshots and checkpoints are written after the timed steps)."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from lightning_lora.callbacks import AtomicCheckpointIO
    from lightning_lora.train import _instantiate_all, trainer_callbacks

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = f"{cfg.paths.output_dir}/shipped_{run}"
    return instantiate(cfg.trainer, max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
                       gradient_clip_val=None, accelerator="cpu", devices=1,
                       callbacks=[*trainer_callbacks(cfg), clock],
                       logger=_instantiate_all(cfg.get("logger")) or False, plugins=[AtomicCheckpointIO()])


def run_lightning(cfg: Any, warmup: int, steps: int, ckpt: Path | None = None, bare: bool = False,
                  shipped: int | None = None) -> dict[str, Any]:
    """Our module (or the bare one) under a Trainer with nothing else on, or under the shipped Trainer (``shipped``:
    the run's number, for its directory)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_lora.module import LoRAAdaptationModule, ScheduleSpec

    class Clock(Callback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []

        def on_train_batch_end(self, *args: Any) -> None:
            self.ends.append(_now())

    head, datamodule = build(cfg, cfg.seed)
    module = _bare_module(head) if bare else LoRAAdaptationModule(
        head, spec(), scheduler=ScheduleSpec("constant"),
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0))
    clock = Clock()
    if shipped is not None:
        trainer = shipped_trainer(cfg, warmup + steps, clock, shipped)
    else:
        trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=warmup + steps,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                             callbacks=[clock], default_root_dir=cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, verbose=False)  # the loader shuffles as in the plain loop
    trainer.fit(module, datamodule)
    out = {"steps_per_s": _rates(clock.ends, warmup),
           "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    if ckpt is not None:
        trainer.save_checkpoint(ckpt)
        out["module"] = module
    return out


# ---------------------------------------------------------------------------------------------- children
def child_throughput(model: str, rounds: int, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    from lightning_lora.fileio import path_bytes

    work = Path(tempfile.mkdtemp(prefix="loop_bench_"))
    cfg = compose(model, work / "run")
    kinds = ("lightning", "shipped", "bare", "plain")
    rates: dict[str, dict[str, list[float]]] = {c: {k: [] for k in kinds} for c in CLOCKS}
    for i in range(rounds):
        for kind in (kinds if i % 2 == 0 else tuple(reversed(kinds))):
            if kind == "plain":
                res = run_plain(cfg, warmup, steps)
            else:
                res = run_lightning(cfg, warmup, steps, bare=kind == "bare",
                                    shipped=i if kind == "shipped" else None)
            for c in CLOCKS:
                rates[c][kind].append(res["steps_per_s"][c])
    # sizes: a resumable checkpoint and an adapter snapshot of a short Lightning run
    ckpt = work / "last.ckpt"
    res = run_lightning(cfg, 1, 1, ckpt=ckpt)
    module = res.pop("module")
    module.save_adapters(work / "adapter", step=2, run_dir=work / "run")
    peft_bytes = sum(path_bytes(work / "adapter" / name) for name in module.adapters)
    base_bytes = sum(t.numel() * t.element_size() for k, t in module.head.state_dict().items() if "lora_" not in k)
    pretrained = cfg.model.get("pretrained")
    on_disk = path_bytes(pretrained) if pretrained and Path(str(pretrained)).exists() else None
    return {"rates": rates, "trainable_params": res["trainable_params"], "ckpt_bytes": ckpt.stat().st_size,
            "adapter_bytes": path_bytes(work / "adapter"), "peft_bytes": peft_bytes, "base_bytes": base_bytes,
            "base_disk_bytes": on_disk, "batch": int(cfg.data.batch_size), "threads": torch.get_num_threads()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_memory(model: str, full: bool, steps: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="loop_bench_mem_"))
    cfg = compose(model, work / "run")
    res = run_plain(cfg, 1, steps, full=full)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": peak, "loaded_rss_mb": res["loaded_rss_mb"], "trainable_params": res["trainable_params"],
            "optimizer_state_bytes": res["optimizer_state_bytes"], "grad_bytes": res["grad_bytes"],
            "saved_activation_bytes": res["saved_activation_bytes"]}


def child_latency(model: str, repeats: int) -> dict[str, Any]:
    import torch

    work = Path(tempfile.mkdtemp(prefix="loop_bench_lat_"))
    cfg = compose(model, work / "run")
    head, datamodule = build(cfg, cfg.seed)
    name = head.default_submodules()[0]
    sub = head.adaptable_submodules()[name]
    captured: list[tuple[Any, Any]] = []
    handle = sub.register_forward_pre_hook(lambda m, a, k: captured.append((a, k)) if not captured else None,
                                           with_kwargs=True)
    head.eval()
    with torch.no_grad():
        head.training_step(next(iter(datamodule.train_dataloader())))
    handle.remove()
    args, kwargs = captured[0]
    base = copy.deepcopy(sub).eval()
    plain_peft(head)
    unmerged = copy.deepcopy(sub).eval()
    with torch.no_grad():  # a trained-looking adapter (B = 0 would still cost the same, but be a no-op)
        for n, p in unmerged.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    merged = merge_and_strip(copy.deepcopy(unmerged))
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(*args, **kwargs)
        for i in range(repeats):
            order = list(models) if i % 2 == 0 else list(reversed(models))
            for k in order:
                start = time.perf_counter()
                models[k](*args, **kwargs)
                times[k].append(time.perf_counter() - start)
        ref = _first_tensor(models["unmerged"](*args, **kwargs))
        err = float((_first_tensor(models["merged"](*args, **kwargs)) - ref).abs().max())
    return {"submodule": name, "ms": {k: 1000 * statistics.median(v) for k, v in times.items()}, "merge_err": err}


def merge_and_strip(model: Any) -> Any:
    """Fold every LoRA layer into its base weight and put the plain base layer back (what a merged export is)."""
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model



def _first_tensor(out: Any):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "feats"):  # TRELLIS SparseTensor
        return out.feats
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


# ---------------------------------------------------------------------------------------------- main
def _child(kind: str, *args: str) -> dict[str, Any] | None:
    """Run one measurement in a fresh process; None (and its error on stderr) when it fails."""
    cmd = [sys.executable, __file__, "--threads", str(THREADS), "--child", kind, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{kind} {' '.join(args)} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--memory-models", nargs="+", default=["minilm", "sd_tiny"], choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="runs of each loop per model (alternating)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (MiniLM: 8)")
    parser.add_argument("--repeats", type=int, default=30, help="forward passes per variant for latency")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (1: no OpenMP oversubscription "
                        "when the machine is shared)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="what to measure (sizes come with throughput)")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="file whose loop_bench section is replaced")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        kind, model, *rest = args.child
        if kind == "throughput":
            out = child_throughput(model, int(rest[0]), int(rest[1]), int(rest[2]))
        elif kind == "memory":
            out = child_memory(model, rest[0] == "full", int(rest[1]))
        else:
            out = child_latency(model, int(rest[0]))
        print(json.dumps(out))
        return

    global THREADS
    THREADS = args.threads
    started = time.time()
    speed: dict[str, list[str]] = {c: [
        "| model | batch | LoRA params | Lightning steps/s (median) | plain PEFT steps/s (median) | ratio | "
        "shipped Trainer / plain | bare LightningModule / plain | ours / bare | runs (L; shipped; bare; P) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"] for c in CLOCKS}
    sizes = ["| model | adapter snapshot (all formats) | PEFT dir(s) | resumable checkpoint | base (fp32 tensors) | "
             "base on disk |", "| --- | --- | --- | --- | --- | --- |"]
    for model in args.models if "throughput" in args.parts else ():
        warmup, steps = STEPS.get(model, (args.warmup, args.steps))
        r = _child("throughput", model, str(args.rounds), str(warmup), str(steps))
        if r is None:
            for c in CLOCKS:
                speed[c].append(f"| {model} | failed |")
            continue
        for c in CLOCKS:
            rates = r["rates"][c]
            lm, sm, bm, pm = (statistics.median(rates[k]) for k in ("lightning", "shipped", "bare", "plain"))
            runs = "; ".join(", ".join(f"{x:.2f}" for x in rates[k]) for k in ("lightning", "shipped", "bare", "plain"))
            speed[c].append(f"| {model} | {r['batch']} | {r['trainable_params']:,} | {lm:.3f} | {pm:.3f} | "
                            f"{lm / pm:.3f} | {sm / pm:.3f} | {bm / pm:.3f} | {lm / bm:.3f} | {runs} |")
            print(c, speed[c][-1], flush=True)
        sizes.append(f"| {model} | {_mib(r['adapter_bytes'])} | {_mib(r['peft_bytes'])} | {_mib(r['ckpt_bytes'])} | "
                     f"{_mib(r['base_bytes'])} | {_mib(r['base_disk_bytes'])} |")
        print(sizes[-1], flush=True)
    memory = ["| model | mode | trainable params | optimizer state | gradients | saved activations (1 step) | "
              "training tensors | RSS after load | peak RSS | peak - load |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ratios = []
    for model in args.memory_models if "memory" in args.parts else ():
        got = {}
        for mode in ("lora", "full"):
            got[mode] = m = _child("memory", model, mode, "6")
            if m is None:
                memory.append(f"| {model} | {mode} | failed |")
                continue
            m["tensors"] = m["optimizer_state_bytes"] + m["grad_bytes"] + m["saved_activation_bytes"]
            memory.append(f"| {model} | {mode} | {m['trainable_params']:,} | {_mib(m['optimizer_state_bytes'])} | "
                          f"{_mib(m['grad_bytes'])} | {_mib(m['saved_activation_bytes'])} | {_mib(m['tensors'])} | "
                          f"{m['loaded_rss_mb']:.0f} MB | {m['peak_rss_mb']:.0f} MB | "
                          f"{m['peak_rss_mb'] - m['loaded_rss_mb']:.0f} MB |")
            print(memory[-1], flush=True)
        lo, fu = got["lora"], got["full"]
        if lo is None or fu is None:
            continue
        ratios.append(f"{model}: peak RSS LoRA/full {lo['peak_rss_mb'] / fu['peak_rss_mb']:.3f}, training memory "
                      f"over the loaded model LoRA/full "
                      f"{(lo['peak_rss_mb'] - lo['loaded_rss_mb']) / (fu['peak_rss_mb'] - fu['loaded_rss_mb']):.3f}, "
                      f"optimizer state LoRA/full {lo['optimizer_state_bytes'] / fu['optimizer_state_bytes']:.4f}, "
                      f"training tensors (optimizer state + gradients + saved activations) LoRA/full "
                      f"{lo['tensors'] / fu['tensors']:.3f}")
    latency = ["| model | submodule | base ms | unmerged ms | merged ms | unmerged / base | merged / base | "
               "max abs diff merged vs unmerged |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in args.models if "latency" in args.parts else ():
        r = _child("latency", model, str(args.repeats))
        if r is None:
            latency.append(f"| {model} | failed |")
            continue
        ms = r["ms"]
        latency.append(f"| {model} | {r['submodule']} | {ms['base']:.3f} | {ms['unmerged']:.3f} | {ms['merged']:.3f} | "
                       f"{ms['unmerged'] / ms['base']:.3f} | {ms['merged'] / ms['base']:.3f} | {r['merge_err']:.2e} |")
        print(latency[-1], flush=True)
    parts = {
        "throughput": [
            f"Training throughput, LoRA r=8 alpha=16 on the family's default targets, fp32, AdamW; {args.rounds} "
            f"alternating runs per loop, {args.warmup} warm-up + {args.steps} timed steps (MiniLM 2 + 8). Lightning "
            "= `LoRAAdaptationModule` under a Trainer with nothing else on; shipped = the same module under the "
            "Trainer `python -m lightning_lora.train` builds (conf/trainer/default.yaml, every default callback, "
            "TensorBoard logger; no gradient clipping, as in the plain loop). Rates on the CPU clock (the process's "
            "CPU seconds, all threads: what the loop costs, whatever else the machine runs):",
            "", *speed["cpu"], "",
            "The same runs on the wall clock (what a user waits, including time other processes held the core; on a "
            "shared machine it scatters more):", "", *speed["wall"], "",
            "Sizes on disk (adapter snapshot after a Lightning run; resumable checkpoint = adapter + AdamW + loop "
            "state):", "", *sizes, ""],
        "memory": [
            "Peak memory (max RSS of a child process, 6 plain-loop steps on the same batches) and AdamW state, LoRA "
            "vs full fine-tuning of the same submodules. Training tensors = AdamW state + gradients + activations "
            "saved for backward in one step (parameters excluded); on CPU the peak RSS also holds what glibc's "
            "allocator keeps, so it is the coarser of the two:", "", *memory, "", *(f"- {x}" for x in ratios), ""],
        "latency": [
            f"Forward latency of the adapted submodule (eval, no grad, captured training input, median of "
            f"{args.repeats} alternating calls):", "", *latency, ""],
    }
    text = "\n".join([
        *header("loop_bench", ["lightning", "peft"], machine=f"torch threads per child={args.threads} device=cpu"),
        f"wall time: {time.time() - started:.0f} s", "",
        *(line for part in PARTS if part in args.parts for line in parts[part]),
    ]) + "\n"
    print(text)
    write_section("loop_bench", text, args.out)


if __name__ == "__main__":
    main()
