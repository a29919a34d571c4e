"""Real-size SD 1.5 training step: ours (cached latents and text embeddings) vs diffusers' LoRA script loop.

The pipeline is SD 1.5's at its released sizes (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters)
with random weights, built offline from the config dicts below and saved once as a diffusers folder (``--folder``,
about 4.3 GB), so both loops load exactly what a user's SD 1.5 folder gives them. The tokenizer is the byte-level
stand-in of ``models/sd_tiny.py`` (no vocabulary ships in any package); captions are padded to 77 tokens either way,
so the text encoder does the same work.

Both loops: 256 px, batch 1, LoRA r=16 alpha=16 (gaussian init) on the UNet's to_q/to_k/to_v/to_out.0, AdamW
(lr 1e-4, betas 0.9/0.999, weight decay 1e-2, eps 1e-8), constant learning rate, gradient norm clipped at 1.0,
fp32, the same seed and the same images (``--images`` random pictures, one caption each, shuffled).

- ``diffusers``: the training loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` written out
  without accelerate (one CPU process: ``accelerator.backward`` is ``loss.backward``): frozen UNet/VAE/text encoder,
  ``unet.add_adapter(LoraConfig(...))``, then per step: VAE encode + ``latent_dist.sample()`` x scaling factor,
  ``randn_like`` noise, uniform integer timesteps, ``add_noise``, the text encoder on the caption's ids, epsilon
  target, UNet, fp32 MSE, ``loss.item()`` for the progress bar, backward, clip, AdamW step, scheduler step,
  ``zero_grad``.
- ``ours``: ``DiffusionHead(cache_latents=True, cache_text_embeddings=True)`` (``model.cache_latents=true``) in
  ``LoRAAdaptationModule`` under the Lightning ``Trainer`` (``precision=32-true``, ``gradient_clip_val=1.0``, no
  logger/checkpoints/progress bar). Once an image has been seen, its VAE posterior and its caption's embedding come
  from the caches (exact: the latent is re-sampled from the cached posterior every step).
- ``ours-cl``: ``ours`` with ``model.channels_last=true`` (UNet and VAE in channels-last memory format) and AdamW
  ``fused=True`` (``+optimizer.fused=true``).

Each run is a fresh child process (its own load, ``--warmup`` steps, then ``--steps`` timed steps, the median
taken); the variants alternate within a round, in reverse order every other round; the ratio is the median over
rounds of ours / diffusers throughput in the same round. The warm-up of ``ours`` sees every image once (it fills the
caches): the timed steps are the steady state of a run's second and later epochs. The ``diffusers`` child also
times its step's parts (VAE encode, text encoder, UNet forward + backward + optimizer) for the profile table.

    python bench/sd_step_bench.py --threads 1              # ~15-25 min on a shared 2-core VM; builds the folder once
    python bench/sd_step_bench.py --scale tiny --rounds 1  # smoke run on the tiny SD preset (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _results import header, write_section

HERE = Path(__file__).resolve().parent
RESULT = "SD_STEP_RESULT "
VARIANTS = ("ours", "diffusers", "ours-cl")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 16
ADAMW = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # the script's defaults
# SD 1.5's released configs (stable-diffusion-v1-5: unet/, vae/, text_encoder/, scheduler/ config.json)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT_EXTRA = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
SD15_DDPM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, steps_offset=1, prediction_type="epsilon")


def default_folder() -> Path:
    cache = os.environ.get("LIGHTNING_LORA_CACHE") or Path.home() / ".cache" / "lightning_lora"
    return Path(cache) / "bench" / "sd15_random_weights"


# ---------------------------------------------------------------------------------------------- the folder
def build_folder(path: Path, seed: int = 0) -> Path:
    """SD 1.5 at its released sizes with random weights, saved as a diffusers pipeline folder (once)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from sd_bench import SD15_TEXT, SD15_UNET
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lightning_lora.fileio import atomic_directory
    from lightning_lora.models.sd_tiny import MARKER, _byte_vocab

    if (path / MARKER).is_file():
        return path
    torch.manual_seed(seed)
    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **SD15_TEXT_EXTRA,
                                                                                 **special)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDPMScheduler(**SD15_DDPM),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_directory(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return path


def images(n: int, size: int, seed: int) -> list[dict[str, Any]]:
    """``n`` random pictures in [-1, 1] (what the script's ToTensor + Normalize([0.5], [0.5]) gives) with captions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(3, size, size, generator=g) * 2 - 1, "text": f"a photo of thing {i}"}
            for i in range(n)]


# ---------------------------------------------------------------------------------------------- the loops
def run_diffusers(job: dict[str, Any]) -> dict[str, Any]:
    """diffusers' train_text_to_image_lora.py loop (fp32, one process), timed per step and per part."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = job["folder"]
    torch.manual_seed(job["seed"])
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, **ADAMW)
    rows = images(job["images"], job["resolution"], job["seed"])
    for row in rows:  # the script tokenizes in its dataset transform, before the loop
        row["input_ids"] = tokenizer(row["text"], max_length=tokenizer.model_max_length, padding="max_length",
                                     truncation=True, return_tensors="pt").input_ids[0]
    loader = torch.utils.data.DataLoader(
        [{"pixel_values": r["pixel_values"], "input_ids": r["input_ids"]} for r in rows], shuffle=True,
        batch_size=job["batch"], generator=torch.Generator().manual_seed(job["seed"]))
    total = job["warmup"] + job["steps"]
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    times, parts, step, train_loss = [], [], 0, 0.0
    unet.train()
    while step < total:
        for batch in loader:
            start = time.perf_counter()
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            encoded = time.perf_counter()
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            texted = time.perf_counter()
            target = noise  # the folder's scheduler predicts epsilon
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            train_loss += loss.item()  # the script gathers the loss for its log every step
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            end = time.perf_counter()
            if step >= job["warmup"]:
                times.append(end - start)
                parts.append((encoded - start, texted - encoded, end - texted))
            step += 1
            if step >= total:
                break
    return {"times": times, "parts": [statistics.median(p[i] for p in parts) for i in range(3)],
            "loss": float(loss.detach()), "trainable": sum(p.numel() for p in lora_layers)}


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    """Our SD head with both caches, in LoRAAdaptationModule under the Lightning Trainer."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_lora.heads.diffusion import DiffusionHead
    from lightning_lora.module import LoRAAdaptationModule

    class Clock(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, *args: Any) -> None:
            self.ends.append(time.perf_counter())

    tuned = job["variant"] == "ours-cl"
    pl.seed_everything(job["seed"], verbose=False)
    head = DiffusionHead(job["folder"], resolution=job["resolution"], cache_latents=True, cache_text_embeddings=True,
                         channels_last=tuned)
    module = LoRAAdaptationModule(head, {"r": RANK, "alpha": RANK, "init": "gaussian", "targets": TARGETS},
                                  optimizer=lambda ps: torch.optim.AdamW(ps, **ADAMW, fused=tuned or None),
                                  scheduler={"name": "constant"})
    loader = torch.utils.data.DataLoader(images(job["images"], job["resolution"], job["seed"]), shuffle=True,
                                         batch_size=job["batch"],
                                         generator=torch.Generator().manual_seed(job["seed"]))
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=job["warmup"] + job["steps"],
                         gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
                         default_root_dir=job["work"])
    trainer.fit(module, loader)
    # a step = the batch's hooks, forward, backward, clipping and optimizer step (start to end of the same batch)
    times = [e - s for s, e in zip(clock.starts, clock.ends, strict=True)][job["warmup"]:]
    return {"times": times, "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def adamw_step_ms(params: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of one AdamW step over ``params`` LoRA-shaped parameters: the CPU default (a loop over the
    tensors) vs ``fused=True``."""
    import torch

    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(RANK, 320)) for _ in range(max(1, params // (RANK * 320)))]
        for p in ps:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(ps, **ADAMW, fused=fused or None)
        optimizer.step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        out["fused" if fused else "default"] = 1000 * statistics.median(times)
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    out = run_diffusers(job) if job["variant"] == "diffusers" else run_ours(job)
    with open("/proc/self/status", encoding="ascii") as f:
        peak = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    return {**out, "variant": job["variant"], "seconds": statistics.median(out["times"]),
            "wall": time.perf_counter() - started, "peak_gib": peak / 2**30}


def child(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{job['variant']} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


# ---------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace, runs: list[list[dict[str, Any]]], adamw: dict[str, float], wall: float,
           load: float) -> str:
    variants = list(args.variants)
    by = {v: [r for rnd in runs for r in rnd if r["variant"] == v] for v in variants}
    rate = {v: statistics.median(args.batch / r["seconds"] for r in rs) for v, rs in by.items()}

    def ratio(v: str) -> float:  # paired per round, then the median
        return statistics.median(next(r for r in rnd if r["variant"] == v)["seconds"] /
                                 next(r for r in rnd if r["variant"] == "diffusers")["seconds"] for rnd in runs) ** -1

    labels = {"diffusers": "diffusers `train_text_to_image_lora.py` loop (VAE + text encoder every step)",
              "ours": "ours: DiffusionHead, latents + text embeddings cached",
              "ours-cl": "ours + channels-last UNet/VAE + fused AdamW"}
    lines = [
        *header("sd_step_bench", ["diffusers", "transformers", "peft", "lightning"],
                machine=f"device=cpu torch threads per child={args.threads or 'default'}"),
        f"wall time: {wall:.0f} s; load average (1 min) {load:.1f} at the start (a shared machine: other processes "
        "slow every step down alike, hence alternating runs and medians)", "",
        f"SD 1.5 at its released sizes{' (scale tiny: the sd_tiny preset instead)' if args.scale == 'tiny' else ''}, "
        f"random weights; {args.resolution} px, batch {args.batch}, {args.images} images; LoRA r={RANK} alpha={RANK} "
        f"on the UNet's {'/'.join(TARGETS)}; fp32; AdamW, clipping at 1.0; {args.rounds} alternating rounds, each "
        f"run a fresh process: {args.warmup} warm-up + median of {args.steps} timed steps (steady state: ours has "
        "seen every image once).", "",
        "| loop | images/s (median of rounds) | s/step per round | vs diffusers (median of per-round ratios) | "
        "peak RSS | last loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        rs = by[v]
        per_round = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        vs = "1.00" if v == "diffusers" or "diffusers" not in variants else f"{ratio(v):.2f}x"
        lines.append(f"| {labels[v]} | {rate[v]:.3f} | {per_round} | {vs} | "
                     f"{max(r['peak_gib'] for r in rs):.1f} GiB | {rs[-1]['loss']:.4f} |")
    if by.get("diffusers"):
        parts = [statistics.median(r["parts"][i] for r in by["diffusers"]) for i in range(3)]
        total = sum(parts)
        lines += ["", "Where the diffusers loop's step goes (median seconds over its timed steps and rounds; what "
                  "ours skips once cached is the first two):", "",
                  "| VAE encode | text encoder | UNet forward + backward + clip + AdamW |", "| --- | --- | --- |",
                  "| " + " | ".join(f"{p:.3f} s ({p / total:.0%})" for p in parts) + " |"]
    lines += ["", f"AdamW step over the {by[variants[0]][0]['trainable']:,} LoRA parameters (median of 20, in the "
              f"parent, same threads): default (a loop over the tensors) {adamw['default']:.1f} ms, fused "
              f"{adamw['fused']:.1f} ms."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (>= images: fills our caches)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (median)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument("--scale", choices=("real", "tiny"), default="real")
    parser.add_argument("--folder", default=None, help="the random-weight SD 1.5 folder (built when missing)")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="file whose sd_step_bench section is replaced")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(RESULT + json.dumps(run_job(json.loads(args.job))), flush=True)
        return 0
    if args.warmup < args.images // args.batch:
        parser.error("--warmup must cover one pass over --images (our caches fill in it)")
    if args.scale == "tiny":
        from lightning_lora.models.sd_tiny import ensure_tiny_sd

        folder = Path(ensure_tiny_sd(Path(args.folder or default_folder().with_name("sd_tiny"))))
        args.resolution = min(args.resolution, 32)
    else:
        folder = build_folder(Path(args.folder) if args.folder else default_folder())
    import tempfile

    start, load = time.perf_counter(), os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="sd_step_bench_")
    runs = []
    for i in range(args.rounds):
        order = list(args.variants) if i % 2 == 0 else list(reversed(args.variants))
        results = []
        for variant in order:
            job = {"variant": variant, "folder": str(folder), "work": work, **{k: getattr(args, k) for k in (
                "warmup", "steps", "images", "batch", "resolution", "seed", "threads")}}
            results.append(child(job))
            print(f"round {i + 1} {variant}: {results[-1]['seconds']:.3f} s/step "
                  f"(run {results[-1]['wall']:.0f} s, peak {results[-1]['peak_gib']:.1f} GiB)", flush=True)
        runs.append(results)
    trainable = runs[0][0]["trainable"]
    if args.threads:  # the optimizer timing below runs here, with the children's thread count
        import torch

        torch.set_num_threads(args.threads)
    text = report(args, runs, adamw_step_ms(trainable), time.perf_counter() - start, load)
    print(text)
    write_section("sd_step_bench", text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
