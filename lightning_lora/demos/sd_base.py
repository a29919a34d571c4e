"""The Stable Diffusion demo base: the tiny diffusers pipeline (``models/sd_tiny.py``) trained FULLY on sklearn's
digits in the ``plain`` style, captioned "a handwritten digit 3", so that it draws the requested digit.

Recipe (deterministic on one machine: fixed seeds, fixed data order, single-threaded data):
1. the VAE as an autoencoder (L1 + a small KL) on the digits at 16 px in every style (a codec, not the generator);
   its ``scaling_factor`` is then set so the latents have unit variance (as SD's 0.18215 does for its own VAE);
2. the UNet and the text encoder together with SD's own objective (epsilon, scaled-linear DDPM noise), captions
   dropped to "" 10% of the time so that classifier-free guidance works.
The result is written atomically as a real diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_lora.demos.digit_styles import draw_styled, styled_caption
from lightning_lora.demos.vae import vae_step
from lightning_lora.fileio import atomic_directory

RESOLUTION = 16  # sklearn's 8x8 digits at twice their size: latents 4x8x8, cheap on two CPU cores
MARKER = "model_index.json"


def digit_tensors(style: str, size: int = RESOLUTION) -> tuple[torch.Tensor, list[int]]:
    """All 1797 sklearn digits in ``style`` as pixels in [-1, 1] [N, 3, size, size], with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.asarray(draw_styled(p, size, style), dtype=np.float32) for p in digits.images]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, [int(t) for t in digits.target]


def small_vae(seed: int = 0):
    """A lighter VAE than the tiny preset's (16/32 channels, no attention): its training dominates on a CPU."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=RESOLUTION,
        mid_block_add_attention=False,
    )


def train_base(vae_steps: int = 300, unet_steps: int = 3000, seed: int = 0, log=print):
    """The trained pipeline (see the module's recipe)."""
    from lightning_lora.models.sd_tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed)
    pipe.vae = small_vae(seed)
    pixels, labels = digit_tensors("plain")
    # The VAE is a general image codec (as SD's, trained on all images): it sees both styles, or it could not carry
    # a colour the UNet never saw (a grey-only decoder paints every latent grey). The UNet sees plain digits only.
    codec_pixels = torch.cat([pixels, digit_tensors("red")[0]])
    g = torch.Generator().manual_seed(seed)
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder

    # 1. the VAE
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(vae_steps):
        idx = torch.randint(0, len(codec_pixels), (16,), generator=g)
        loss = vae_step(vae, opt, codec_pixels[idx], g)
        if step % 100 == 0 or step == vae_steps - 1:
            log(f"vae step {step}: l1+kl {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        stds = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.std for i in range(0, len(pixels), 256)])
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"vae scaling_factor {scale:.4f}")

    # 2. the UNet and the text encoder together: a random encoder maps captions that differ in one byte to nearly
    # the same states, and a UNet trained on those ignores the caption (measured: judge accuracy at chance)
    captions = [*sorted({styled_caption(t, "plain") for t in labels}), ""]
    ids = pipe.tokenizer(captions, max_length=pipe.tokenizer.model_max_length, padding="max_length",
                         truncation=True, return_tensors="pt").input_ids
    caption_of = torch.tensor([captions.index(styled_caption(t, "plain")) for t in labels])
    scheduler = pipe.scheduler
    unet.train()
    text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / unet_steps)))  # noqa: E731
    start = time.perf_counter()
    for step in range(unet_steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * lr_at(step)
        idx = torch.randint(0, len(pixels), (32,), generator=g)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
        which = caption_of[idx].clone()
        which[torch.rand(len(idx), generator=g) < 0.1] = len(captions) - 1  # "" for classifier-free guidance
        cond = text_encoder(ids[which])[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return pipe


def ensure_sd_digits_base(path: str | os.PathLike, vae_steps: int = 300, unet_steps: int = 3000, seed: int = 0,
                          log=print) -> str:
    """The base's folder at ``path``, trained and written (atomically) the first time."""
    path = Path(path).expanduser()
    if (path / MARKER).is_file():
        return str(path)
    with torch.random.fork_rng(devices=[]):
        pipe = train_base(vae_steps, unet_steps, seed, log)
    with atomic_directory(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return str(path)
