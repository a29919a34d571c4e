"""Real-size training steps on a GPU: SD 1.5 UNet, TRELLIS-image-large flow models and a Qwen3-VL-2B-shaped model,
built from their configs with random weights; LoRA r=16 vs full fine-tuning, gradient checkpointing off and on.
A Markdown table replaces this script's section of ``bench/results.md`` (or of ``--out``).

Models (``--models``):

- ``sd15``: diffusers ``UNet2DConditionModel`` with the published SD 1.5 UNet config (``sd_bench.SD15_UNET``),
  the DDPM epsilon objective on 4x64x64 latents with a [B, 77, 768] text context (no VAE, no text encoder);
- ``trellis_ss`` / ``trellis_slat``: the TRELLIS-image-large sparse-structure (8x16^3 latent) and structured-latent
  (sphere-shell voxels at 64^3, a few thousand per item) flow models with hyper-parameters read from
  ``conf/model/trellis_{ss,slat}.yaml``, under the project's ``FlowMatching3DHead`` with [B, 1374, 1024] tokens;
- ``qwen3_vl_2b``: transformers' ``Qwen3VLModel`` with Qwen3-VL-2B's sizes (2.1B parameters, vision tower
  included), text-only batches of random tokens, last-token pooling and InfoNCE between the batch's two halves.

LoRA goes in through ``LoRAAdaptationModule`` (the project's own injection, fp32 LoRA weights, frozen base) with
the preset's default targets. The TRELLIS models use the real head; the SD and Qwen heads load only from a local
folder, so a small bench head here holds the model built in memory and the same targets and objective. Full
fine-tuning trains every weight of the adapted submodule (the UNet, the denoiser, Qwen's language model).

On CUDA each configuration runs in its own child process (a clean CUDA allocator and an OOM that cannot leak into
the next row; ``--isolate none`` runs all in this process, the default on a CPU): warm-up steps, then the median of
the timed steps (forward, backward, AdamW step), ``torch.cuda.synchronize()`` around each; the peak is
``torch.cuda.max_memory_allocated()`` of the whole child (weights, gradients, optimizer state, activations); on a
CPU it is the process's peak RSS (``VmHWM``). An out-of-memory configuration is recorded as OOM. Weights are fp32
(the presets' ``use_fp16`` is only recorded by the TRELLIS models, as in training); steps run under bf16 autocast.

``real_size_bench.py`` runs these builders (plus CLIP ViT-B/32) at real size on a CPU, with small inputs, a bf16
frozen base where asked (``build``), and the peak RSS of each child.

    python bench/gpu_bench.py                                       # everything, on cuda
    python bench/gpu_bench.py --models sd15 qwen3_vl_2b --modes lora --steps 5
    python bench/gpu_bench.py --device cpu --scale tiny --steps 1 --warmup 1 --out /tmp/t.md   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from _results import header, write_section
from torch import nn

from lightning_lora.heads.base import StepOutput, TaskHead

HERE = Path(__file__).resolve().parent
CONF = HERE.parent / "conf" / "model"
ADAPTER = {"r": 16, "alpha": 32}  # conf/adapter/r16.yaml
# --scale tiny: the tiny models' narrowest targeted layers are 16 wide (Qwen3-VL's k_proj), and a rank must stay
# below a layer's smaller side
TINY_ADAPTER = {"r": 8, "alpha": 16}
MODELS = ("sd15", "trellis_ss", "trellis_slat", "qwen3_vl_2b")
LABELS = {"sd15": "SD 1.5 UNet", "trellis_ss": "TRELLIS-L sparse-structure flow",
          "trellis_slat": "TRELLIS-L structured-latent flow", "qwen3_vl_2b": "Qwen3-VL-2B (shape)"}
BATCH = {"sd15": 8, "trellis_ss": 8, "trellis_slat": 4, "qwen3_vl_2b": 8}
RESULT = "GPU_BENCH_RESULT "  # prefix of the child's result line (libraries may print to stdout too)

# SD 1.5's DDPM training scheduler (scheduler/scheduler_config.json of the released pipeline)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
# Qwen3-VL-2B-Instruct's config.json sizes; the tiny one as models/tiny_embedders.py builds it (smaller vocabulary)
QWEN_2B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    ),
    vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                       deepstack_visual_indexes=[5, 11, 17]),
)
QWEN_TINY = dict(
    text_config=dict(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                         "mrope_interleaved": True},
    ),
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                       temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
                       deepstack_visual_indexes=[0]),
)
QWEN_SPECIAL_START = 151643  # Qwen's special tokens (<|endoftext|>, vision markers, ...) start here


# ---------------------------------------------------------------------------------------------- bench heads
class UNetEpsilonHead(TaskHead):
    """DiffusionHead's objective on given latents and text states: DDPM noising, epsilon target, fp32 MSE.

    DiffusionHead itself loads a whole pipeline folder (VAE, text encoder, tokenizer); here the UNet alone is
    built in memory, and the batch already holds what the frozen VAE and text encoder would give.
    """

    family: ClassVar[str] = "diffusion"

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        from lightning_lora.heads.diffusion import UNET_TARGETS

        self.unet, self.targets = unet, list(UNET_TARGETS)
        self.noise_scheduler = DDPMScheduler(**SD15_SCHEDULER)

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def default_targets(self) -> dict[str, list[str]]:
        return {"unet": self.targets}

    def enable_gradient_checkpointing(self) -> None:
        from lightning_lora.heads.diffusion import enable_unet_checkpointing

        enable_unet_checkpointing(self.unet)  # exactly what DiffusionHead does

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        latents, hidden = batch["latents"], batch["hidden"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if not torch.is_autocast_enabled():  # a frozen bf16 UNet takes its own dtype, as in DiffusionHead
            noisy, hidden = noisy.to(self.unet.dtype), hidden.to(self.unet.dtype)
        pred = self.unet(noisy, t, hidden).sample
        return StepOutput(F.mse_loss(pred.float(), noise.float()), batch_size=latents.shape[0])


class LastTokenHead(TaskHead):
    """EmbeddingHead's Qwen3-VL path on token ids: the last token's final state, InfoNCE (T=0.05) of the batch's
    first half against its second half. LoRA goes into the language model only, as the preset's default."""

    family: ClassVar[str] = "embedding"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from lightning_lora.models.embedders import QWEN_LANGUAGE_TARGETS

        self.model, self.targets = model, list(QWEN_LANGUAGE_TARGETS)

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"language": self.model.language_model, "vision": self.model.visual}

    def default_targets(self) -> dict[str, list[str]]:
        return {"language": self.targets}

    def enable_gradient_checkpointing(self) -> None:
        from lightning_lora.models.embedders import checkpoint_activations

        checkpoint_activations(self.model)  # as Qwen3VLEmbedder does

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        from lightning_lora.heads.embedding import info_nce
        from lightning_lora.models.embedders import pool

        hidden = self.model(**batch, use_cache=False).last_hidden_state
        emb = F.normalize(pool(hidden, batch["attention_mask"], "last").float(), dim=-1)
        half = emb.shape[0] // 2
        return StepOutput(info_nce(emb[:half], emb[half:2 * half], 0.05), batch_size=emb.shape[0])


# ---------------------------------------------------------------------------------------------- models + inputs
def trellis_denoiser(preset: str) -> nn.Module:
    """The denoiser of ``conf/model/<preset>.yaml``, built on the current default device."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(CONF / f"{preset}.yaml").denoiser)


def shell_coords(batch: int, res: int) -> torch.Tensor:
    """Surface voxels of a sphere per item (radius 0.28-0.32 of the grid), batch-major [N, 4]: about 4.5k voxels
    per item at 64^3, the thin-shell occupancy a structured latent has."""
    axis = torch.arange(res)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = (grid.float() - (res - 1) / 2).norm(dim=1)
    rows = []
    for b in range(batch):
        radius = res * (0.28 + 0.04 * b / max(batch - 1, 1))
        xyz = grid[(dist - radius).abs() < 0.5]
        rows.append(torch.cat([torch.full((xyz.shape[0], 1), b), xyz], dim=1))
    return torch.cat(rows)


def build_sd15(tiny: bool, batch: int, device: str, latent_size: int | None = None
               ) -> tuple[TaskHead, dict[str, Any], str]:
    """``latent_size``: the latents' side (default: the config's sample size, 64 = 512 px for SD 1.5)."""
    from diffusers import UNet2DConditionModel
    from sd_bench import SD15_UNET  # bench/ is on sys.path (this file runs as a script; tests add it)

    config = SD_TINY_UNET if tiny else SD15_UNET
    with torch.device(device):
        head = UNetEpsilonHead(UNet2DConditionModel(**config))
    size, ctx = latent_size or config["sample_size"], config["cross_attention_dim"]
    batch_ = {"latents": torch.randn(batch, 4, size, size, device=device),
              "hidden": torch.randn(batch, 77, ctx, device=device)}
    return head, batch_, f"latents 4x{size}x{size}, context 77x{ctx}"


def build_trellis(kind: str, tiny: bool, batch: int, device: str) -> tuple[TaskHead, dict[str, Any], str]:
    from lightning_lora.heads.flow3d import FlowMatching3DHead, fill_zero_weights

    preset = f"trellis_{kind}_tiny" if tiny else f"trellis_{kind}"
    with torch.device(device):
        denoiser = trellis_denoiser(preset)
    # no zero-initialised layer (adaLN gates, output) may cut the gradient to the LoRA weights
    fill_zero_weights(denoiser, 0.02)
    head = FlowMatching3DHead(denoiser, name=preset)
    tokens = 16 if tiny else 1374  # DINOv2-L/14 with registers on a 518-px image: 37*37 patches + CLS + 4
    cond = torch.randn(batch, tokens, denoiser.cond_channels, device=device)
    res, ch = denoiser.resolution, denoiser.in_channels
    if kind == "ss":
        return head, {"x0": torch.randn(batch, ch, res, res, res, device=device), "cond": cond}, \
            f"latent {ch}x{res}^3, cond {tokens}x{denoiser.cond_channels}"
    coords = shell_coords(batch, res).to(device)
    feats = torch.randn(coords.shape[0], ch, device=device)
    what = f"{coords.shape[0] // batch} voxels/item at {res}^3, cond {tokens}x{denoiser.cond_channels}"
    return head, {"coords": coords, "feats": feats, "cond": cond}, what


def build_qwen(tiny: bool, batch: int, device: str, length: int | None = None
               ) -> tuple[TaskHead, dict[str, Any], str]:
    """``length``: tokens per item (default 512; 32 with ``tiny``)."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    config = Qwen3VLConfig(**(QWEN_TINY if tiny else QWEN_2B), attn_implementation="sdpa")
    with torch.device(device):
        head = LastTokenHead(Qwen3VLModel(config))
    length = length or (32 if tiny else 512)
    high = min(config.text_config.vocab_size, QWEN_SPECIAL_START)  # ordinary text tokens only
    ids = torch.randint(0, high, (batch, length), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": torch.zeros_like(ids, dtype=torch.int)}  # text only: no image tokens
    return head, inputs, f"{length} tokens (text only), last-token pooling, InfoNCE"


Builder = Callable[[bool, int, str], tuple[TaskHead, dict[str, Any], str]]  # (tiny, batch, device) -> head, batch, what
BUILDERS: dict[str, Builder] = {
    "sd15": build_sd15,
    "trellis_ss": lambda tiny, batch, device: build_trellis("ss", tiny, batch, device),
    "trellis_slat": lambda tiny, batch, device: build_trellis("slat", tiny, batch, device),
    "qwen3_vl_2b": build_qwen,
}


# ---------------------------------------------------------------------------------------------- one configuration
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(model: str, tiny: bool, batch: int, device: str, frozen_dtype: str | None = None,
          builders: Mapping[str, Builder] | None = None) -> tuple[TaskHead, dict[str, Any], str]:
    """The model's head (random weights) and one batch from ``builders`` (default ``BUILDERS``).

    ``frozen_dtype`` (``float32``/``bfloat16``, default fp32) is the dtype the weights are created in, as loading
    a bf16 checkpoint gives them: no fp32 copy ever exists, so the peak memory is that of a real bf16 run. LoRA
    weights become fp32 again in ``LoRAAdaptationModule``; the batch's floating tensors stay fp32, as a data loader
    gives them (the heads cast what enters the frozen model). TRELLIS keeps its norms and embedders fp32 and
    casts only the torso (``convert_to_fp16``), so a bf16 default dtype does not describe it: refused here.
    """
    dtype = getattr(torch, frozen_dtype or "float32")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"frozen dtype {frozen_dtype!r}: float32 or bfloat16")
    if dtype != torch.float32 and model.startswith("trellis"):
        raise ValueError(f"{model}: a {frozen_dtype} frozen base is not supported here (TRELLIS casts only its "
                         "torso); use float32")
    with default_dtype(dtype):
        head, inputs, what = (builders or BUILDERS)[model](tiny, batch, device)
    inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    return head, inputs, what


def prepare(head: TaskHead, mode: str, checkpointing: bool, adapter: dict[str, int] = ADAPTER) -> nn.Module:
    """The module whose trainable parameters the optimizer steps: LoRA via the project's module, or full."""
    if mode == "lora":
        from lightning_lora.module import LoRAAdaptationModule

        return LoRAAdaptationModule(head, adapter, gradient_checkpointing=checkpointing)
    head.requires_grad_(False)
    for name in head.default_submodules():
        head.adaptable_submodules()[name].requires_grad_(True)
    head.train()
    if checkpointing:
        head.enable_gradient_checkpointing()
    return head


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(head: TaskHead, module: nn.Module, batch: dict[str, Any], device: str, bf16: bool, warmup: int,
               steps: int, slow: float | None = None) -> tuple[list[float], float]:
    """Seconds of each timed step (forward + backward + AdamW step + zero_grad) and the last loss.

    ``slow`` (seconds): a warm-up step at least this long is timed and is the last step (what a warm-up saves is
    small next to such a step); otherwise timing stops once the timed steps add up to this long."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times: list[float] = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = head.training_step(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds = time.perf_counter() - start
        if step >= warmup or (slow is not None and seconds >= slow):
            times.append(seconds)
        if slow is not None and sum(times) >= slow:
            break
    return times, float(loss.detach())


def proc_status_bytes(key: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith(f"{key}:")), None)
    except OSError:
        return None


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` is not per child on Linux: exec keeps the high-water mark of the memory the process had before
    (the parent's, copied at fork or shared through vfork), so a child of a 1 GiB parent reports at least 1 GiB.
    """
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int:
    """This process's resident set now, in bytes (0 where there is no ``/proc``)."""
    return proc_status_bytes("VmRSS") or 0


def parameter_counts(head: TaskHead) -> tuple[int, int]:
    """(every parameter of the base, those of the submodules full fine-tuning trains), before any LoRA."""
    subs = head.adaptable_submodules()
    full = {id(p): p.numel() for name in head.default_submodules() for p in subs[name].parameters()}
    return sum(p.numel() for p in head.parameters()), sum(full.values())


def run_job(job: dict[str, Any], builders: Mapping[str, Builder] | None = None) -> dict[str, Any]:
    """Build, adapt and time one configuration; OOM comes back as a result, anything else raises.

    Optional keys: ``frozen_dtype`` (LoRA only, see ``build``) and ``slow`` (see ``time_steps``)."""
    device, cuda = job["device"], job["device"].startswith("cuda")
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    frozen = job.get("frozen_dtype") if job["mode"] == "lora" else None
    try:
        head, batch, inputs = build(job["model"], job["scale"] == "tiny", job["batch"], device, frozen, builders)
        params, full_trainable = parameter_counts(head)
        adapter = TINY_ADAPTER if job["scale"] == "tiny" else ADAPTER
        module = prepare(head, job["mode"], job["checkpointing"], adapter).to(device)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        rss_built = current_rss()
        times, loss = time_steps(head, module, batch, device, job["bf16"], job["warmup"], job["steps"],
                                 job.get("slow"))
    except torch.OutOfMemoryError:
        return {**job, "status": "OOM"}
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    return {**job, "status": "ok", "inputs": inputs, "s_per_step": statistics.median(times), "loss": loss,
            "timed_steps": len(times), "trainable": trainable, "total": total, "params": params,
            "full_trainable": full_trainable, "rss_built_mib": rss_built / 2**20, "peak_mib": peak / 2**20,
            **({"gpu": torch.cuda.get_device_name(device),
                "gpu_gib": torch.cuda.get_device_properties(device).total_memory / 2**30} if cuda else {})}


def run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    """``run_job`` in a child process; a crash becomes a ``failed`` result carrying the end of its stderr."""
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1].removeprefix(RESULT))
    # an OOM outside the timed steps (building), or one a library reports as a plain error (cuBLAS workspace)
    oom = any(text in done.stderr for text in ("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED"))
    return {**job, "status": "OOM" if oom else "failed", "error": done.stderr[-3000:]}


def run_here(job: dict[str, Any]) -> dict[str, Any]:
    """``run_job`` in this process, freeing its model and resetting the CUDA peak afterwards."""
    result = run_job(job)
    gc.collect()
    if job["device"].startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


# ---------------------------------------------------------------------------------------------- report
def row(r: dict[str, Any]) -> str:
    rank = (TINY_ADAPTER if r.get("scale") == "tiny" else ADAPTER)["r"]
    mode = f"LoRA r={rank}" if r["mode"] == "lora" else "full"
    first = f"| {LABELS[r['model']]} | {r.get('inputs', '')} | {mode} | {'on' if r['checkpointing'] else 'off'} | " \
            f"{r['batch']} |"
    if r["status"] != "ok":
        return f"{first} {r['status']} | | | | | |"
    return (f"{first} {r['s_per_step']:.4f} | {r['batch'] / r['s_per_step']:.2f} | {r['peak_mib']:,.0f} | "
            f"{r['trainable']:,} | {r['total']:,} | {r['loss']:.4f} |")


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cuda = args.device.startswith("cuda")
    ok = next((r for r in results if "gpu" in r), None)
    gpu = f" {ok['gpu']} ({ok['gpu_gib']:.1f} GiB)" if ok else ""
    where = "each configuration in its own process" if args.isolate == "config" else "all in one process"
    # on a CPU without isolation the process's peak RSS only grows: it is not per configuration
    memory = "peak GPU MiB (max_memory_allocated)" if cuda else \
        "peak RSS MiB" + (" (process so far)" if args.isolate == "none" else "")
    lines = [
        *header("gpu_bench", ["diffusers", "transformers", "peft"],
                machine=f"device={args.device}{gpu}; CUDA {torch.version.cuda or '-'}"),
        f"setup: scale={args.scale}, fp32 weights, {'bf16 autocast' if args.precision == 'bf16' else 'fp32'}, AdamW, "
        f"LoRA r={ADAPTER['r']} alpha={ADAPTER['alpha']} on the presets' targets via LoRAAdaptationModule; "
        f"{args.warmup} warm-up + median of {args.steps} steps; {where}; torch threads {args.threads or 'default'}",
        "",
        f"| model | inputs | training | grad ckpt | batch | s/step (median) | items/s | {memory} | trainable params "
        "| total params | last loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(lines + [row(r) for r in results]) + "\n"


def jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"model": model, "mode": mode, "checkpointing": ckpt == "on", "device": args.device,
             "scale": args.scale, "batch": args.batch or (4 if args.scale == "tiny" else BATCH[model]),
             "bf16": args.precision == "bf16", "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
            for model in args.models for mode in args.modes for ckpt in args.checkpointing]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--batch", type=int, default=None, help="items per step for every model (default: "
                        f"{', '.join(f'{m} {b}' for m, b in BATCH.items())}; 4 with --scale tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast or plain fp32")
    parser.add_argument("--scale", choices=("real", "tiny"), default="real",
                        help="tiny: a few layers of small width, to smoke-test the script on a CPU in seconds")
    parser.add_argument("--isolate", choices=("config", "none"), default=None,
                        help="config: a child process per configuration (default on cuda); none: everything in "
                        "this process (default on cpu, where starting a child costs more than a tiny run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --scale tiny, where more threads only contend)")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="file whose gpu_bench section the table "
                        "replaces")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(RESULT + json.dumps(run_job(json.loads(args.job))), flush=True)
        return 0
    if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 2):
        parser.error("--steps must be >= 1, --warmup >= 0 and --batch >= 2 (InfoNCE needs two halves)")
    args.isolate = args.isolate or ("config" if args.device.startswith("cuda") else "none")
    args.threads = args.threads if args.threads is not None else (1 if args.scale == "tiny" else 0)
    results = []
    for job in jobs(args):
        result = run_isolated(job) if args.isolate == "config" else run_here(job)
        print(row(result), flush=True)
        if result["status"] == "failed":
            print(result["error"], file=sys.stderr)
        results.append(result)
    text = report(results, args)
    print(text)
    write_section("gpu_bench", text, args.out)
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
