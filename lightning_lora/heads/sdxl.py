"""Stable Diffusion XL: LoRA on the UNet and optionally on either text encoder (``model=sdxl``, ``model=sdxl_tiny``).

The objective is Stable Diffusion's (``heads/diffusion.py``) with SDXL's conditioning, as diffusers'
``train_text_to_image_lora_sdxl.py`` and ``StableDiffusionXLPipeline.encode_prompt`` build it: each encoder's
penultimate hidden states side by side, the second encoder's pooled projection (``text_embeds``), and six
``time_ids``: original (height, width), crop (top, left), target (height, width). The batch gives the first two
(``original_size``, ``crop_top_left``: ``data.crop_coords``, always with ``data.buckets``); without them, or with
``micro_conditioning: false``, the image counts as uncropped at its own size.

The VAE: SDXL's overflows in float16 (its config's ``force_upcast``), so with ``frozen_dtype: float16`` it stays
float32 unless ``vae`` names a replacement (e.g. ``madebyollin/sdxl-vae-fp16-fix``), which is cast with the rest.

Exports: diffusers' ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` keys and kohya's ``lora_unet_`` /
``lora_te1_`` / ``lora_te2_`` (what ``StableDiffusionXLPipeline.load_lora_weights`` and SDXL tools read).
``lightning-lora sample sdxl`` draws one picture with LoRAs folded in.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.errors import UserError
from lightning_lora.heads.diffusion import (
    PIPELINE_PARTS,
    DiffusionHead,
    check_pipeline_folder,
    enable_unet_checkpointing,
    load_error,
)

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_PARTS = (*PIPELINE_PARTS, "text_encoder_2", "tokenizer_2")
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def sdxl_pipeline_files(variant: str | None = None) -> tuple[str, ...]:
    """The files of an SDXL repository the head reads: configs, both tokenizers, one weights file per network in
    the chosen ``variant`` (not the repository's other variants, ``.bin`` copies, ONNX/OpenVINO exports or
    the refiner-ready ``sd_xl_base_1.0.safetensors``)."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return ("model_index.json", "*/*.json", "tokenizer/*", "tokenizer_2/*", f"unet/diffusion_pytorch_model{suffix}",
            f"vae/diffusion_pytorch_model{suffix}", f"text_encoder/model{suffix}", f"text_encoder_2/model{suffix}")


class SDXLHead(DiffusionHead):
    """LoRA on an SDXL UNet (and optionally its text encoders) from a diffusers folder or Hub id.

    Arguments as ``DiffusionHead`` plus ``train_text_encoder_2`` (null: as ``train_text_encoder``), ``vae`` (a
    replacement VAE folder or Hub id) and ``micro_conditioning`` (use the batch's original size and crop)."""

    sample_command: ClassVar[str | None] = "sdxl"
    sample_help: ClassVar[str] = "a Stable Diffusion XL picture with LoRAs folded in at a scale"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    kohya_version: ClassVar[str] = "sdxl_base_v1-0"
    kohya_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    sample_what: ClassVar[str] = "Stable Diffusion XL"
    sample_example: ClassVar[str] = SDXL_HUB_ID
    sample_guidance: ClassVar[float] = 5.0  # diffusers' SDXL pipeline's default
    modelspec_architecture: ClassVar[str] = "stable-diffusion-xl-v1-base/lora"
    card_pipeline: ClassVar[str] = "StableDiffusionXLPipeline"
    card_parts: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("diffusers", "UNet2DConditionModel", "unet"), ("transformers", "CLIPTextModel", "text_encoder"),
        ("transformers", "CLIPTextModelWithProjection", "text_encoder_2"))

    def __init__(self, *args: Any, vae: str | None = None, train_text_encoder_2: bool | None = None,
                 micro_conditioning: bool = True, **kwargs: Any) -> None:
        self._vae_source = vae  # read by load_parts, which the base's __init__ calls
        super().__init__(*args, **kwargs)
        self.train_text_encoder_2 = self.train_text_encoder if train_text_encoder_2 is None else train_text_encoder_2
        self.cache_text_embeddings = kwargs.get("cache_text_embeddings", True) and not (
            self.train_text_encoder or self.train_text_encoder_2)
        self.micro_conditioning = bool(micro_conditioning)
        self.targets.setdefault("text_encoder_2", list(self.targets["text_encoder"]))

    # ------------------------------------------------------------------ loading
    @classmethod
    def check_folder(cls, pretrained: str | Path | None, revision: str | None = None, variant: str | None = None,
                     key: str = "model.pretrained") -> Path:
        return check_pipeline_folder(pretrained, revision, variant, key, parts=SDXL_PARTS,
                                     files=sdxl_pipeline_files(variant), what="Stable Diffusion XL",
                                     example=SDXL_HUB_ID)

    def load_parts(self, path: Path, variant: str | None) -> dict[str, Any]:
        """Both tokenizers and text encoders, UNet, VAE (``vae`` replaces it) and the DDPM training scheduler."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from lightning_lora import hub
        from lightning_lora.models.embedders import quiet_transformers

        kw = {"variant": variant}
        try:
            with quiet_transformers():
                parts = {
                    "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                    "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                                  **kw),
                }
            parts.update({
                "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
                "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            })
            if self._vae_source is None:
                parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        except (OSError, ValueError) as e:
            raise load_error("model.pretrained", path, e) from None
        if self._vae_source is not None:
            vae_path = hub.resolve(self._vae_source, key="model.vae", allow_patterns=VAE_FILES)
            try:
                parts["vae"] = AutoencoderKL.from_pretrained(vae_path)
            except (OSError, ValueError) as e:
                raise load_error("model.vae", vae_path, e) from None
        if not getattr(parts["unet"].config, "addition_embed_type", None) == "text_time":
            raise UserError(f"model.pretrained={path}: its UNet takes no SDXL size/crop conditioning "
                            "(addition_embed_type is not text_time); is it a Stable Diffusion 1.x/2.x folder? "
                            "use model=sd15 for those")
        self.tokenizer_2, self.text_encoder_2 = parts["tokenizer_2"], parts["text_encoder_2"]
        return parts

    def frozen_networks(self, parts: Mapping[str, Any], frozen_dtype: str | None) -> list[nn.Module]:
        """The UNet and text encoders; the VAE too unless it is SDXL's own in float16 (it overflows there)."""
        keep_vae = frozen_dtype == "float16" and self._vae_source is None and \
            getattr(parts["vae"].config, "force_upcast", False)
        vae = [] if keep_vae else [parts["vae"]]
        return [parts["unet"], parts["text_encoder"], parts["text_encoder_2"], *vae]

    @classmethod
    def build_tiny(cls, path: Path, preset: Mapping[str, Any]) -> str:
        """A tiny SDXL folder in diffusers' layout (``models/sdxl_tiny.py``)."""
        from lightning_lora.models.sdxl_tiny import ensure_tiny_sdxl

        return ensure_tiny_sdxl(path)

    # ------------------------------------------------------------------ TaskHead
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def default_submodules(self) -> list[str]:
        return ["unet", *(["text_encoder"] if self.train_text_encoder else []),
                *(["text_encoder_2"] if self.train_text_encoder_2 else [])]

    def enable_gradient_checkpointing(self) -> None:
        enable_unet_checkpointing(self.unet)
        for encoder in (self.text_encoder, self.text_encoder_2):
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ conditioning
    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states of both encoders side by side [B, L, D1 + D2], and the second encoder's
        pooled projection [B, P] (``StableDiffusionXLPipeline.encode_prompt`` with ``clip_skip=None``)."""
        device, hidden = self.unet.device, []
        pooled = None
        for tokenizer, encoder, trains in ((self.tokenizer, self.text_encoder, self.train_text_encoder),
                                           (self.tokenizer_2, self.text_encoder_2, self.train_text_encoder_2)):
            ids = tokenizer(list(captions), max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids.to(device)
            with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
                out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's text_embeds
        return torch.cat(hidden, dim=-1), pooled

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(hidden states, pooled) per caption; frozen encoders are run without grad and cached per caption."""
        if not self.cache_text_embeddings:
            return self._encode_uncached(captions)
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:
            with torch.no_grad():
                hidden, pooled = self._encode_uncached(missing)
            for caption, h, p in zip(missing, hidden.detach(), pooled.detach(), strict=True):
                self._text_cache[caption] = (h, p)
        device = self.unet.device
        return (torch.stack([self._text_cache[c][0] for c in captions]).to(device),
                torch.stack([self._text_cache[c][1] for c in captions]).to(device))

    def time_ids(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """[B, 6]: original (h, w), crop (top, left), target (h, w) per sample."""
        pixels = batch["pixel_values"]
        n, (h, w) = pixels.shape[0], pixels.shape[-2:]
        target = torch.tensor([[h, w]] * n)
        if self.micro_conditioning and "original_size" in batch and "crop_top_left" in batch:
            original, crop = batch["original_size"].cpu(), batch["crop_top_left"].cpu()
        else:
            original, crop = target, torch.zeros(n, 2, dtype=torch.long)
        return torch.cat([original, crop, target], dim=1).to(self.unet.device, torch.float32)

    def conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        hidden, pooled = self.encode_text(batch["text"])
        time_ids = self.time_ids(batch)
        if not torch.is_autocast_enabled():  # a frozen fp16/bf16 UNet in a 32-true run takes its own dtype
            pooled, time_ids = pooled.to(self.unet.dtype), time_ids.to(self.unet.dtype)
        return hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    # ------------------------------------------------------------------ sampling
    def pipeline(self):
        """A StableDiffusionXLPipeline over this head's own modules (no copies), with a DDIM sampler."""
        if not self._pipeline_cache:
            from lightning_lora.models.embedders import quiet_transformers

            with quiet_transformers():
                from diffusers import DDIMScheduler, StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            )
            pipe.set_progress_bar_config(disable=True)
            self._pipeline_cache.append(pipe)
        return self._pipeline_cache[0]

    @classmethod
    def load_sample_pipeline(cls, folder: Path, args: argparse.Namespace) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(folder)


__all__ = ["SDXL_HUB_ID", "SDXLHead", "sdxl_pipeline_files"]
