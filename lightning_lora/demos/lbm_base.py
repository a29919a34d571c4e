"""The LBM demo base: the tiny LBM (``models/lbm_tiny.py``'s denoiser layout) trained FULLY on sklearn's digits to
perform one translation, digit -> inverted digit (``data=digits_pairs``' ``invert``), at 16 px.

Recipe (deterministic on one machine: fixed seeds, fixed data order, single-threaded data):
1. the VAE as an autoencoder (L1 + a small KL) on the digits drawn plain and under every translation of
   ``data=digits_pairs`` (a codec, not the translator: it must carry the targets a LoRA is taught later, as an
   LBM's SDXL VAE carries any picture); its ``scaling_factor`` is then set so the latents have unit variance;
2. the denoiser with the head's own objective (``BridgeHead.bridge_loss``: the Brownian bridge from the source's
   latent to the target's, LBM's timesteps and bridge noise from the folder's config) on (digit, inverted digit)
   pairs, with the digits of ``held_out()`` left out.
The result is written atomically in the released LBM layout (``config.yaml`` + ``model.safetensors``), which
``model.pretrained=...`` and ``lightning-lora sample lbm --pretrained`` load.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_lora.data.digits import TRANSLATION_TRANSFORMS, SklearnDigits, translation_target
from lightning_lora.demos.vae import vae_step
from lightning_lora.models.lbm import WEIGHTS_FILE, build_modules, save_lbm_folder
from lightning_lora.models.lbm_tiny import TINY_CONFIG, TINY_UNET

RESOLUTION = 16  # sklearn's 8x8 digits at twice their size: latents 4x8x8, cheap on two CPU cores
BASE_TRANSFORM = "invert"  # the one translation the base performs
#: the last digits of sklearn's 1797: never trained on, by the base or by the demo's LoRA (``data.num_images``)
HELD_OUT = (1700, 1797)
MARKER = "config.yaml"

#: the tiny LBM's UNet at the base's latent size (RESOLUTION / 2)
BASE_UNET: dict[str, Any] = {**TINY_UNET, "sample_size": RESOLUTION // 2}
BASE_VAE: dict[str, Any] = {  # two levels (latents at 1/2), no attention: its training dominates on a CPU
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": RESOLUTION,
    "mid_block_add_attention": False,
    "scaling_factor": 1.0,  # set from the trained encoder's latents
}
#: LBM's own keys: the tiny model's (the relighting model's values) under this base's name
BASE_CONFIG: dict[str, Any] = {**TINY_CONFIG, "backbone_signature": "lightning_lora/lbm_digits_base"}


def to_pixels(images: list) -> torch.Tensor:
    """PIL RGB images as one tensor in [-1, 1] [N, 3, H, W] (as the data modules read them)."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1


def digit_pairs(transform: str, start: int, stop: int, size: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, targets) of ``data=digits_pairs`` for sklearn's digits ``start..stop-1``: dark ink on white, and
    its ``transform``ed copy, drawn at ``size`` px by the same functions the data module writes its shards with."""
    digits = SklearnDigits(stop, "digits_pairs")
    sources = [digits.draw(i, size, invert=True) for i in range(start, min(stop, len(digits)))]
    return to_pixels(sources), to_pixels([translation_target(s, transform) for s in sources])


def train_vae(vae: torch.nn.Module, pixels: torch.Tensor, steps: int, g: torch.Generator, log=print) -> float:
    """Train ``vae`` as an autoencoder on ``pixels``; return the scaling factor giving unit-variance latents."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(steps):
        loss = vae_step(vae, opt, pixels[torch.randint(0, len(pixels), (32,), generator=g)], g)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: l1+kl {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 512]).latent_dist.mean for i in range(0, len(pixels), 512)])
    return float(1.0 / means.std())


def train_denoiser(head: Any, sources: torch.Tensor, targets: torch.Tensor, steps: int, g: torch.Generator,
                   log=print) -> None:
    """Train the whole denoiser of a ``BridgeHead`` with its own objective on (source, target) pairs."""
    denoiser = head.denoiser
    denoiser.train().requires_grad_(True)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-3, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / steps)))  # noqa: E731
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * lr_at(step)
        idx = torch.randint(0, len(sources), (32,), generator=g)
        loss, _ = head.bridge_loss({"source": sources[idx], "target": targets[idx]}, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"denoiser step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    denoiser.eval().requires_grad_(False)


def train_base(vae_steps: int = 500, unet_steps: int = 1000, seed: int = 0, log=print):
    """(denoiser, VAE, config) of the trained base (see the module's recipe)."""
    from lightning_lora.heads.bridge import BridgeHead

    config = {**BASE_CONFIG, "unet": dict(BASE_UNET), "vae": dict(BASE_VAE), "scheduler": {"num_train_timesteps": 1000}}
    torch.manual_seed(seed)
    denoiser, vae, _ = build_modules(config["unet"], config["vae"], config["scheduler"])
    g = torch.Generator().manual_seed(seed)
    sources, targets = digit_pairs(BASE_TRANSFORM, 0, HELD_OUT[0])
    codec = torch.cat([sources, *(digit_pairs(t, 0, HELD_OUT[0])[1] for t in TRANSLATION_TRANSFORMS)])
    scale = train_vae(vae, codec, vae_steps, g, log)
    vae.register_to_config(scaling_factor=scale)
    config["vae"]["scaling_factor"] = scale
    log(f"vae scaling_factor {scale:.4f}")
    # the head reads the folder as every tool does, so the base is trained with the objective LoRAs train with
    with tempfile.TemporaryDirectory() as tmp:
        save_lbm_folder(Path(tmp) / "base", denoiser, vae, config)
        head = BridgeHead(str(Path(tmp) / "base"), resolution=RESOLUTION, cache_latents=True)
    train_denoiser(head, sources, targets, unet_steps, g, log)
    return head.denoiser, head.vae, config


def ensure_lbm_digits_base(path: str | os.PathLike, vae_steps: int = 500, unet_steps: int = 1000,
                           seed: int = 0, log=print) -> str:
    """The base's folder at ``path``, trained and written (atomically) the first time."""
    path = Path(path).expanduser()
    if (path / MARKER).is_file() and (path / WEIGHTS_FILE).is_file():
        return str(path)
    with torch.random.fork_rng(devices=[]):
        denoiser, vae, config = train_base(vae_steps, unet_steps, seed, log)
    save_lbm_folder(path, denoiser, vae, config)
    return str(path)
