"""A tiny LBM built from configs and saved in the released layout, plus a "tuned" copy with a known delta.

The folder (``config.yaml`` + ``model.safetensors`` with ``denoiser.*``/``vae.vae_model.*`` keys) is read by
``models.lbm.load_lbm`` exactly as a released LBM folder is; its config carries ``unet:``/``vae:``/``scheduler:``
sections because its architecture is not LBM's. The denoiser has LBM's structure at toy size (a plain down
block, a cross-attention down/up block whose ``attn2`` sees no text, linear projections); the VAE has two levels
(latents at 1/2 resolution).

Two changes make the random base usable: the VAE's posterior is made nearly a point (the log-variance half of
``quant_conv`` is set to -12, so std ≈ 0.0025, as a trained VAE's is small) and its scaling factor brings the
latents of the digits demo to about unit scale.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from lightning_lora.models.lbm import WEIGHTS_FILE, build_modules, check_lbm_folder, load_lbm, save_lbm_folder

TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": [32, 64],  # attn2 sees the image tokens themselves (LBM passes no text)
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [2, 4],  # the number of heads, as LBM/SDXL pass it: head size 16
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 5.0,  # posterior means of the digits have std ~0.2 under this random encoder
}
# The LBM keys of a released config (the relighting model's values), plus the architecture sections.
TINY_CONFIG: dict[str, Any] = {
    "backbone_signature": "lightning_lora/lbm_tiny",
    "vae_num_channels": 4,
    "unet_input_channels": 4,
    "timestep_sampling": "custom_timesteps",
    "selected_timesteps": [250, 500, 750, 1000],
    "prob": [0.25, 0.25, 0.25, 0.25],
    "conditioning_images_keys": [],
    "conditioning_masks_keys": [],
    "source_key": "source_image",
    "target_key": "target_image",
    "bridge_noise_sigma": 0.005,
    "latent_loss_type": "l2",
    "latent_loss_weight": 1.0,
    "pixel_loss_type": "lpips",
    "pixel_loss_weight": 0.0,
}
LOGVAR_BIAS = -12.0


def build_tiny_lbm(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(denoiser, VAE, config) of the tiny LBM, random with ``seed``."""
    config = {**TINY_CONFIG, "unet": dict(TINY_UNET), "vae": dict(TINY_VAE), "scheduler": {"num_train_timesteps": 1000}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser, vae, _ = build_modules(config["unet"], config["vae"], config["scheduler"])
    with torch.no_grad():  # a nearly deterministic posterior: logvar = LOGVAR_BIAS whatever the image
        half = vae.config.latent_channels
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(LOGVAR_BIAS)
    return denoiser, vae, config


def ensure_tiny_lbm(path: str | os.PathLike, seed: int = 0) -> str:
    """The tiny LBM folder at ``path``, built (atomically) the first time and reused afterwards."""
    path = Path(path).expanduser()
    if (path / WEIGHTS_FILE).is_file() and (path / "config.yaml").is_file():
        return str(path)
    denoiser, vae, config = build_tiny_lbm(seed)
    save_lbm_folder(path, denoiser, vae, config)
    return str(path)


def spectrum(k: int, decay: float) -> torch.Tensor:
    """Singular values 1, decay, decay², ... (k of them)."""
    return decay ** torch.arange(k, dtype=torch.float64)


def optimal_error(k: int, rank: int, decay: float) -> float:
    """Eckart–Young: relative Frobenius error of the best rank-``rank`` approximation of a matrix with
    singular values ``spectrum(k, decay)``."""
    s2 = spectrum(k, decay) ** 2
    return math.sqrt(float(s2[rank:].sum() / s2.sum())) if rank < k else 0.0


def write_tuned_copy(base: str | os.PathLike, out: str | os.PathLike, *, seed: int = 1, decay: float = 0.8,
                     relative: float = 0.1) -> dict[str, int]:
    """A "fully fine-tuned" copy of an LBM folder: every denoiser weight with 2+ dims gets a known delta.

    Each delta is U·diag(s)·Vᵀ over the weight flattened to [out, rest] (convolutions flattened as the
    extractor flattens them), with random orthonormal U, V and singular values ``decay**i`` scaled so that
    ‖ΔW‖ = ``relative``·‖W‖. So the best rank-r LoRA of that weight has relative error
    ``optimal_error(min(out, rest), r, decay)``. Returns {module name: min(out, rest)} for the changed weights.
    """
    import shutil

    folder, config_file, _ = check_lbm_folder(base, "base")
    parts = load_lbm(folder, "base")
    g = torch.Generator().manual_seed(seed)
    sizes: dict[str, int] = {}
    with torch.no_grad():
        for name, p in parts.denoiser.named_parameters():
            if not name.endswith(".weight") or p.ndim < 2:
                continue
            flat = p.reshape(p.shape[0], -1).double()
            k = min(flat.shape)
            u = torch.linalg.qr(torch.randn(flat.shape[0], k, generator=g, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(flat.shape[1], k, generator=g, dtype=torch.float64))[0]
            s = spectrum(k, decay)
            delta = (u * s) @ v.T
            delta *= relative * flat.norm() / delta.norm()
            p.add_(delta.reshape(p.shape).to(p.dtype))
            sizes[name[: -len(".weight")]] = k
    out = Path(out).expanduser()
    save_lbm_folder(out, parts.denoiser, parts.vae, parts.config)
    if config_file.name != "config.yaml":  # keep the original config's name and content
        (out / "config.yaml").unlink()
        shutil.copy(config_file, out / config_file.name)
    return sizes


__all__ = ["TINY_CONFIG", "TINY_UNET", "TINY_VAE", "build_tiny_lbm", "ensure_tiny_lbm", "optimal_error", "spectrum",
           "write_tuned_copy"]
