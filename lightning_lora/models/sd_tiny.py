"""A tiny Stable Diffusion pipeline built from configs and saved as a real diffusers folder.

Tests and demos load it through exactly the code path a user's SD 1.x folder takes (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). No tokenizer vocabulary ships in any
package, so the CLIP tokenizer is byte-level: one token per UTF-8 byte (as CLIP's BPE before any merge).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_lora.fileio import atomic_directory

#: what makes a folder a usable tiny pipeline (written last, so a half-built folder is never reused)
MARKER = "model_index.json"


def _byte_vocab() -> dict[str, int]:
    """CLIP's printable stand-ins for the 256 bytes, each alone and word-final, plus the two specials."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tiny_pipeline(seed: int = 0, max_length: int = 32):
    """UNet 32/64 channels (one cross-attention level), 2-level VAE (latents at 1/2 resolution), 2-layer CLIP."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_length, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32,
    )
    # SD 1.x's own noise schedule (scaled-linear betas), with DDIM for few-step sampling.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def ensure_tiny_sd(path: str | os.PathLike, seed: int = 0) -> str:
    """The tiny pipeline's folder at ``path``, built (atomically) the first time."""
    path = Path(path).expanduser()
    if (path / MARKER).is_file():
        return str(path)
    pipe = build_tiny_pipeline(seed)
    with atomic_directory(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return str(path)
