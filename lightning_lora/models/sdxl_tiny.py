"""A tiny Stable Diffusion XL pipeline built from configs and saved as a real diffusers folder.

The layout of ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/``, ``vae/``, ``text_encoder/`` a CLIP text
model, ``text_encoder_2/`` a CLIP text model with projection, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``)
at toy sizes: the UNet takes SDXL's added conditioning (``text_time``: the second encoder's pooled projection and
six size/crop numbers), its cross-attention width is the two encoders' widths together. Both tokenizers are the
byte-level CLIP tokenizer of ``sd_tiny.py``; the second pads with ``!`` as SDXL's does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_lora.fileio import atomic_directory
from lightning_lora.models.sd_tiny import MARKER, _byte_vocab

TEXT_WIDTH = 32  # each encoder's hidden size; the UNet's cross-attention sees both: 64
TIME_EMBED_DIM = 8  # per added time id (SDXL: 256)


def _text_encoder(vocab: dict[str, int], max_length: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=TEXT_WIDTH,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_tiny_sdxl_pipeline(seed: int = 0, max_length: int = 32):
    """UNet 32/64 channels (cross-attention at the second level, two transformer layers), 2-level VAE (latents at
    1/2 resolution), two 2-layer CLIP encoders, SDXL's Euler scheduler settings."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="!")
    text_encoder = _text_encoder(vocab, max_length, projection=False)
    text_encoder_2 = _text_encoder(vocab, max_length, projection=True)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_WIDTH, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM, projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32, scaling_factor=0.13025,
        force_upcast=True,  # as SDXL's VAE: it overflows in float16
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def ensure_tiny_sdxl(path: str | os.PathLike, seed: int = 0) -> str:
    """The tiny SDXL pipeline's folder at ``path``, built (atomically) the first time."""
    path = Path(path).expanduser()
    if (path / MARKER).is_file():
        return str(path)
    pipe = build_tiny_sdxl_pipeline(seed)
    with atomic_directory(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return str(path)
