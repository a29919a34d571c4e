"""Diffusion family: LoRA training of diffusers UNets; here the latent base and text-to-image (Stable Diffusion).

``DiffusionHead`` (Stable Diffusion): the objective of diffusers' ``train_text_to_image_lora.py``: VAE latents ×
scaling factor, DDPM noising at a uniform integer timestep (plus optional ``noise_offset``), an epsilon or
v-prediction target (the scheduler's own, or ``prediction_type``), mean-squared error in fp32, optionally
min-SNR-γ weighted per sample. VAE latent distributions and text embeddings can be cached; both caches are
exact (latents are re-sampled from the cached distribution each time; a cache entry is keyed by the image's
pixels or the caption's text).

``LatentHead`` is what every latent-diffusion head shares (``DiffusionHead`` here, LBM's ``BridgeHead`` in
``heads/bridge.py``): the frozen VAE (posterior cache, decoding), the frozen dtype, and reading a snapshot's PEFT
directories back for the family's own export formats.

``lightning-lora sample sd`` draws one picture with a diffusers pipeline folder and LoRAs folded in at a scale.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from lightning_lora import options
from lightning_lora.checks import choice
from lightning_lora.errors import UserError
from lightning_lora.heads.base import StepOutput, TaskHead

if TYPE_CHECKING:
    from lightning_lora.publish import CardContext

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya's LoCon set: every convolution of the ResNet blocks and of the down/upsamplers
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
#: seed 002's own save (Step 6 / its complete example): ``torch.save(get_peft_model_state_dict(unet), ...)`` of a UNet
#: adapted in place (``unet.add_adapter``), read back with ``set_peft_model_state_dict(unet_new, torch.load(...))``
SEED_STATE_FILE = "lora_weights.pth"
#: Stable Diffusion 1.5 on the Hub (its home since runwayml/stable-diffusion-v1-5 was taken down)
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --------------------------------------------------------------------------- loading
def pipeline_files(variant: str | None = None) -> tuple[str, ...]:
    """The files of a Stable Diffusion repository the head (and ``sample sd``) reads: configs, tokenizer, and one
    weights file per network in the chosen ``variant`` (not every variant, EMA copy and ``.bin`` of the repo)."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return ("model_index.json", "*/*.json", "tokenizer/*", f"unet/diffusion_pytorch_model{suffix}",
            f"vae/diffusion_pytorch_model{suffix}", f"text_encoder/model{suffix}")


def check_pipeline_folder(pretrained: str | Path | None, revision: str | None = None, variant: str | None = None,
                          key: str = "model.pretrained", *, parts: tuple[str, ...] = PIPELINE_PARTS,
                          files: tuple[str, ...] | None = None, what: str = "Stable Diffusion",
                          example: str = SD15_HUB_ID) -> Path:
    """The folder of a diffusers pipeline (local, or a Hub id whose ``files`` are fetched into the cache), with
    every one of ``parts`` the head loads (Stable Diffusion's by default)."""
    from lightning_lora import hub

    if not pretrained:
        raise UserError(f"{key} is required: pass {key}=<diffusers {what} folder or Hub id, e.g. {example}>")
    if revision and hub.is_hub_name(pretrained) and "@" not in str(pretrained):
        pretrained = f"{pretrained}@{revision}"
    path = hub.resolve(pretrained, key=key, allow_patterns=files or pipeline_files(variant))
    if not path.is_dir():
        raise UserError(f"{key}: no folder at {path} (give a diffusers {what} folder or a Hub id such as "
                        f"{example})")
    for part in parts:
        if not (path / part).is_dir():
            raise UserError(f"{key}={path} has no {part}/ folder; a {what} pipeline folder "
                            f"holds {', '.join(p + '/' for p in parts)}")
    return path


def load_pipeline_parts(path: Path, revision: str | None = None, variant: str | None = None) -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and the DDPM training scheduler, as diffusers' script loads them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lightning_lora.models.embedders import quiet_transformers

    kw = {"revision": revision, "variant": variant}
    try:
        with quiet_transformers():  # no "Loading weights" bar for the text encoder among the run's own lines
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        return {
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            "text_encoder": text_encoder,
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
        }
    except (OSError, ValueError) as e:  # a missing weights file / variant, a bad config
        raise load_error("model.pretrained", path, e) from None


def load_error(key: str, path: Path, error: BaseException) -> UserError:
    """One line for a pipeline part that does not load (a missing weights file or variant, a bad config)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"{key}={path}: cannot load the pipeline: {first[:200]}")


def parse_frozen_dtype(name: str | None) -> torch.dtype | None:
    valid = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name is None:
        return None
    return valid[choice(name, "model.frozen_dtype", valid, also=["null"])]


# --------------------------------------------------------------------------- objective pieces
def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights per sample: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def _pixel_key(image: torch.Tensor) -> str:
    """The cache key of one image: its pixels and its shape (an aspect-ratio bucket's crop is its own entry)."""
    digest = hashlib.blake2b(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=16)
    digest.update(str(tuple(image.shape)).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- what the heads share
class LatentHead(TaskHead):
    """A head over a frozen VAE: scaled latents from the posterior (exactly cacheable), decoding, the frozen
    dtype, and the modules of an adapter snapshot for the family's own export formats."""

    family: ClassVar[str] = "diffusion"
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"
    fsdp_blocks: ClassVar[tuple[str, ...]] = ("BasicTransformerBlock", "ResnetBlock2D")
    requires: ClassVar[tuple[str, ...]] = ("diffusers",)  # the UNet, VAE and schedulers: the [sd] extra

    def _init_vae(self, vae: nn.Module, resolution: int, cache_latents: bool) -> None:
        self.vae = vae
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % self.vae_factor:
            raise UserError(f"model.resolution={resolution} is not divisible by the VAE's downscale factor "
                            f"{self.vae_factor}; use e.g. {resolution // self.vae_factor * self.vae_factor or 8}")
        self.resolution, self.cache_latents = resolution, cache_latents
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def modelspec_resolution(self) -> str | None:
        return f"{self.resolution}x{self.resolution}"

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents sampled from the posterior (the posterior's mean/std are cached per image)."""
        h, w = pixels.shape[-2:]
        if h % self.vae_factor or w % self.vae_factor:
            raise UserError(f"image size {h}x{w} is not divisible by the VAE's downscale factor {self.vae_factor}; "
                            "set data.resolution to a multiple of it")
        if self.cache_latents:
            keys = [_pixel_key(p) for p in pixels]
            todo = [i for i, k in enumerate(keys) if k not in self._latent_cache]
            if todo:
                mean, std = self._posterior(pixels[todo])
                for i, m, s in zip(todo, mean.cpu(), std.cpu(), strict=True):
                    self._latent_cache[keys[i]] = (m, s)
            mean = torch.stack([self._latent_cache[k][0] for k in keys]).to(pixels.device)
            std = torch.stack([self._latent_cache[k][1] for k in keys]).to(pixels.device)
        else:
            mean, std = self._posterior(pixels)
        eps = torch.randn(mean.shape, generator=generator).to(mean)
        latents = mean + std * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in about [-1, 1] (float32) from scaled latents (the inverse of ``encode_images``' scaling)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    @staticmethod
    def snapshot_modules(snapshot: Path, adapters: dict[str, PeftModel],
                         magnitudes: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Every LoRA module of a snapshot's PEFT directories as ``Factors``, by ``<submodule>.<module path>``;
        with ``magnitudes`` given, DoRA's magnitude vectors go there under the same names (else DoRA is refused)."""
        from lightning_lora.adapters.formats import read_lora

        modules = {}
        for sub in adapters:
            lora = read_lora(snapshot / sub, dora=magnitudes is not None)
            for name, factors in lora.modules.items():
                modules[canonical_name(f"{sub}.{name}")] = factors
            for name, magnitude in lora.magnitudes.items():
                magnitudes[canonical_name(f"{sub}.{name}")] = magnitude  # type: ignore[index]
        return modules


def cast_frozen(name: str | None, *parts: nn.Module) -> None:
    """Cast the frozen networks (LoRA weights are made fp32 again after injection by the module)."""
    if (dtype := parse_frozen_dtype(name)) is not None:
        for part in parts:
            part.to(dtype)


def enable_unet_checkpointing(unet: nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    # Non-reentrant, so LoRA gradients flow although the checkpointed inputs need no grad.
    unet.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=False))


# --------------------------------------------------------------------------- the head
class DiffusionHead(LatentHead):
    """LoRA on a Stable Diffusion UNet (and optionally its text encoder), from a local diffusers folder.

    ``previews`` (prompts, seeds, num_inference_steps, guidance_scale, every_n_steps) drives the validation
    images the ``SamplePreviews`` callback logs; ``resolution`` is the training/preview image size.
    """

    # the CLIP text encoder's layers too, for when it trains
    fsdp_blocks: ClassVar[tuple[str, ...]] = (*LatentHead.fsdp_blocks, "CLIPEncoderLayer")
    sample_command: ClassVar[str | None] = "sd"
    sample_help: ClassVar[str] = "a Stable Diffusion picture with LoRAs folded in at a scale"
    #: the pipeline's text encoders, as their folders (and LoRA files' prefixes) name them
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: kohya metadata ``ss_base_model_version`` and the kohya prefix of each text encoder's modules
    kohya_version: ClassVar[str] = "sd_v1"
    kohya_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te_"}
    #: what ``sample <command> --pretrained`` takes, and its default guidance scale
    sample_what: ClassVar[str] = "Stable Diffusion"
    sample_example: ClassVar[str] = SD15_HUB_ID
    sample_guidance: ClassVar[float] = 7.5
    modelspec_architecture: ClassVar[str] = "stable-diffusion-v1/lora"
    hub_library: ClassVar[str] = "diffusers"
    #: the model card's loading code: the diffusers pipeline class, and (library, class, subfolder) per PEFT part
    card_pipeline: ClassVar[str] = "StableDiffusionPipeline"
    card_parts: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("diffusers", "UNet2DConditionModel", "unet"), ("transformers", "CLIPTextModel", "text_encoder"))

    def __init__(
        self,
        pretrained: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        name: str | None = None,
        resolution: int = 512,
        prediction_type: str | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        train_text_encoder: bool = False,
        targets: dict[str, list[str]] | None = None,
        conv_targets: list[str] | tuple[str, ...] = UNET_CONV_TARGETS,
        cache_latents: bool = False,
        cache_text_embeddings: bool = True,
        frozen_dtype: str | None = None,
        channels_last: bool = False,
        previews: dict[str, Any] | None = None,
        prior_loss_weight: float = 1.0,
        trigger: str | None = None,
    ) -> None:
        super().__init__()
        from lightning_lora import hub
        from lightning_lora.checks import number

        self.prior_loss_weight = number(prior_loss_weight, "model.prior_loss_weight", low=0)

        path = self.check_folder(pretrained, revision, variant)
        if prediction_type is not None:
            choice(prediction_type, "model.prediction_type", PREDICTION_TYPES, also=["null"])
        if snr_gamma is not None and snr_gamma <= 0:
            raise UserError(f"model.snr_gamma={snr_gamma} must be > 0 (5.0 is the paper's value) or null")
        parts = self.load_parts(path, variant)  # the revision, if any, chose the cached snapshot
        self.unet, self.text_encoder = parts["unet"], parts["text_encoder"]
        self.tokenizer, self.noise_scheduler = parts["tokenizer"], parts["scheduler"]
        if prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        if self.noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"{path}/scheduler predicts {self.noise_scheduler.config.prediction_type!r}; set "
                            f"model.prediction_type to one of {', '.join(PREDICTION_TYPES)}")
        cast_frozen(frozen_dtype, *self.frozen_networks(parts, frozen_dtype))
        if channels_last:  # NHWC convolutions; on CPUs oneDNN's convolutions are faster in this layout
            for part in (self.unet, parts["vae"]):
                part.to(memory_format=torch.channels_last)
        self._init_vae(parts["vae"], resolution, cache_latents)
        # a Hub id is what other tools (and the adapter's metadata) should name, not this machine's cache path
        self.pretrained, short = hub.identity(pretrained, path)
        self.revision, self.name = revision, name or short
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset
        self.train_text_encoder = train_text_encoder
        self.targets = {"unet": list(UNET_TARGETS), "text_encoder": list(TEXT_ENCODER_TARGETS), **(targets or {})}
        self.unet_conv_targets = list(conv_targets)
        self.cache_text_embeddings = cache_text_embeddings and not train_text_encoder
        self.previews = dict(previews or {})
        self.trigger = trigger or None  # the words in the captions that call up what the adapter learns
        self._text_cache: dict[str, torch.Tensor] = {}
        self._pipeline_cache: list[Any] = []  # built on first use; a list keeps it out of the module tree

    # ------------------------------------------------------------------ loading (SDXL's head overrides these)
    @classmethod
    def check_folder(cls, pretrained: str | Path | None, revision: str | None = None, variant: str | None = None,
                     key: str = "model.pretrained") -> Path:
        return check_pipeline_folder(pretrained, revision, variant, key)

    def load_parts(self, path: Path, variant: str | None) -> dict[str, Any]:
        return load_pipeline_parts(path, None, variant)

    def frozen_networks(self, parts: Mapping[str, Any], frozen_dtype: str | None) -> list[nn.Module]:
        """The networks ``model.frozen_dtype`` casts."""
        return [parts["unet"], parts["vae"], parts["text_encoder"]]

    # ------------------------------------------------------------------ TaskHead
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def default_targets(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.targets.items()}

    def default_submodules(self) -> list[str]:
        return ["unet", "text_encoder"] if self.train_text_encoder else ["unet"]

    def conv_targets(self) -> dict[str, list[str]]:
        return {"unet": list(self.unet_conv_targets)}

    def base_model_identity(self) -> dict[str, str]:
        return {"name": self.name, "path": self.pretrained, **({"revision": self.revision} if self.revision else {})}

    def trigger_phrase(self) -> str | None:
        return self.trigger

    def enable_gradient_checkpointing(self) -> None:
        enable_unet_checkpointing(self.unet)
        self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def batch_kinds(cls, preset: Mapping[str, Any]) -> tuple[str, ...]:
        from lightning_lora.data.images import CAPTIONED_IMAGES

        return (CAPTIONED_IMAGES,)

    @classmethod
    def build_tiny(cls, path: Path, preset: Mapping[str, Any]) -> str:
        """A tiny Stable Diffusion folder in diffusers' layout (``models/sd_tiny.py``)."""
        from lightning_lora.models.sd_tiny import ensure_tiny_sd

        return ensure_tiny_sd(path)

    # ------------------------------------------------------------------ encoders
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Last hidden state of the text encoder; frozen encoders are run without grad and cached per caption."""
        device = self.unet.device
        if not self.cache_text_embeddings:
            with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
                return self.text_encoder(self.tokenize(captions).to(device))[0]
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:
            with torch.no_grad():
                hidden = self.text_encoder(self.tokenize(missing).to(device))[0]
            self._text_cache.update(zip(missing, hidden.detach(), strict=True))
        return torch.stack([self._text_cache[c] for c in captions]).to(device)

    # ------------------------------------------------------------------ objective
    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The UNet's text conditioning for a batch: encoder hidden states and any further UNet arguments."""
        return self.encode_text(batch["text"]), {}

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                       per_row: bool = False) -> torch.Tensor:
        """The batch's loss (``per_row``: each row's, min-SNR weighted when on; a batch with prior-preservation rows
        still gives one value, the weighted sum of its two means)."""
        pixels, captions = batch["pixel_values"], batch["text"]
        if len(captions) != pixels.shape[0]:
            raise UserError(f"batch has {pixels.shape[0]} images but {len(captions)} captions")
        latents = self.encode_images(pixels, generator)
        hidden, extra = self.conditioning(batch)
        n, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=generator
                                                           ).to(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (n,), generator=generator).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        if not torch.is_autocast_enabled():  # a frozen fp16/bf16 UNet in a 32-true run takes its own dtype
            noisy, hidden = noisy.to(self.unet.dtype), hidden.to(self.unet.dtype)
        pred = self.unet(noisy, t, hidden, **extra).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, t.cpu()).to(per_sample)
            weights = min_snr_weights(snr, self.snr_gamma, self.prediction_type)
        else:
            weights = torch.ones_like(per_sample)
        prior = batch.get("prior_mask")
        if prior is None or not bool(prior.any()):
            return per_sample * weights if per_row else (per_sample * weights).mean()
        # DreamBooth prior preservation (data=dreambooth), as train_dreambooth_lora.py: the instance rows' loss
        # (min-SNR weighted when on) + prior_loss_weight x the class rows' plain MSE
        prior = prior.to(per_sample.device)
        return (per_sample[~prior] * weights[~prior]).mean() + self.prior_loss_weight * per_sample[prior].mean()

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        return StepOutput(self.diffusion_loss(batch), batch_size=batch["pixel_values"].shape[0])

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # Fixed timesteps and noise per batch: the validation loss is comparable across evaluations. Per row (each
        # image once, by index), unless prior-preservation rows make the loss a weighted sum of two means.
        seed = 1234 + int(batch["index"][0]) if "index" in batch else 1234
        out = {"loss": self.diffusion_loss(batch, torch.Generator().manual_seed(seed), per_row=True)}
        if out["loss"].ndim and "index" in batch:
            out["index"] = torch.as_tensor(batch["index"])
        return out

    # ------------------------------------------------------------------ sampling
    def pipeline(self):
        """A StableDiffusionPipeline over this head's own modules (no copies), with a DDIM sampler."""
        if not self._pipeline_cache:
            from lightning_lora.models.embedders import quiet_transformers

            with quiet_transformers():  # the pipeline's import asks for torchvision image processors it never uses
                from diffusers import DDIMScheduler, StableDiffusionPipeline

            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=DDIMScheduler.from_config(self.noise_scheduler.config), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            self._pipeline_cache.append(pipe)
        return self._pipeline_cache[0]

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], num_inference_steps: int = 25,
               guidance_scale: float = 7.5, resolution: int | None = None) -> torch.Tensor:
        """Images [len(prompts)·len(seeds), 3, H, W] in [0, 1], prompt-major, one generator per image."""
        pipe = self.pipeline()
        size = resolution or self.resolution
        device = self.unet.device
        all_prompts = [p for p in prompts for _ in seeds]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for _ in prompts for s in seeds]
        # Start noise drawn on the CPU so a seed gives the same picture on every device.
        shape = (len(all_prompts), self.unet.config.in_channels, size // self.vae_factor, size // self.vae_factor)
        latents = torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device, self.unet.dtype)
        out = pipe(prompt=all_prompts, height=size, width=size, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, latents=latents, output_type="pt")
        return out.images.float().cpu()

    def preview_images(self) -> torch.Tensor | None:
        """The configured validation prompts × seeds with the current weights, [prompts, seeds, 3, H, W]
        (None when no prompt is configured)."""
        prompts = list(self.previews.get("prompts") or [])
        if not prompts:
            return None
        seeds = list(self.previews.get("seeds") or [0])
        images = self.sample(prompts, seeds, int(self.previews.get("num_inference_steps", 25)),
                             float(self.previews.get("guidance_scale", 7.5)))
        return images.view(len(prompts), len(seeds), *images.shape[1:])

    # ------------------------------------------------------------------ exports
    def export_adapters(self, snapshot: Path, adapters: dict[str, PeftModel], step: int,
                        run_dir: Path | None = None) -> list[Path]:
        """diffusers ``pytorch_lora_weights.safetensors``, a kohya-style file and seed 002's ``lora_weights.pth``
        (the UNet's, as ``get_peft_model_state_dict`` names them for a UNet adapted in place) next to the PEFT
        directories. DoRA: the diffusers file carries the magnitude vectors and no kohya file is written."""
        from lightning_lora.adapters.formats import write_diffusers, write_kohya
        from lightning_lora.adapters.io import in_place_state, save_tensor_dict

        magnitudes: dict[str, torch.Tensor] = {}
        modules = self.snapshot_modules(snapshot, adapters, magnitudes)
        written = [write_diffusers(snapshot / DIFFUSERS_FILE, modules, magnitudes=magnitudes)]
        # DoRA: diffusers' loader reads lora_magnitude_vector keys but drops kohya's dora_scale: no kohya file then
        if not magnitudes:
            written.append(write_kohya(snapshot / KOHYA_FILE, modules, metadata=self._kohya_metadata(modules, step),
                                       text_prefixes=self.kohya_text_prefixes))
        if "unet" in adapters and self.text_encoders == ("text_encoder",):
            # seed 002 (SD 1.x) saves the UNet's only (its text-encoder LoRA is a PeftModel of its own)
            written.append(save_tensor_dict(snapshot / SEED_STATE_FILE, in_place_state(adapters["unet"])))
        return written

    def _kohya_metadata(self, modules: Mapping[str, Any], step: int) -> dict[str, str]:
        """kohya's ``ss_*`` description: network args (the most common conv rank/alpha), base version, name."""
        from lightning_lora.adapters.factors import is_spatial

        conv = [f for f in modules.values() if is_spatial(f.weight_shape)]
        args = {}
        if conv:
            args = {"conv_dim": Counter(f.rank for f in conv).most_common(1)[0][0],
                    "conv_alpha": Counter(f.alpha for f in conv).most_common(1)[0][0]}
        described = self.file_metadata(step)  # modelspec.* and the run's ss_* keys
        args = {**json.loads(described.get("ss_network_args", "{}")), **args}
        return {**described, "ss_network_args": json.dumps(args, sort_keys=True),
                "ss_base_model_version": self.kohya_version, "ss_output_name": self.name}

    @classmethod
    def card_usage(cls, card: CardContext) -> list[tuple[str, str]]:
        """diffusers' ``load_lora_weights`` on the pipeline (kohya's file for A1111/ComfyUI), and PEFT on the UNet
        (and text encoder) alone."""
        previews = card.model.get("previews") or {}
        prompt = next(iter(previews.get("prompts") or []), "a picture")
        if card.trigger and card.trigger not in prompt:
            prompt = f"{card.trigger}, {prompt}"
        size = int(card.model.get("resolution") or 512)
        steps = int(previews.get("num_inference_steps") or 25)
        usage = [("diffusers", "\n".join([
            "import torch",
            f"from diffusers import {cls.card_pipeline}",
            "",
            f'pipe = {cls.card_pipeline}.from_pretrained("{card.base}"'
            + (', safety_checker=None, requires_safety_checker=False)' if cls.text_encoders == ("text_encoder",)
               else ")"),
            f'pipe.load_lora_weights("{card.repo_id}", weight_name="{DIFFUSERS_FILE}")',
            f"# A1111 / ComfyUI / kohya tools: {KOHYA_FILE} (kohya keys, modelspec.* and ss_* metadata)",
            f'image = pipe("{prompt}", height={size}, width={size}, num_inference_steps={steps}, '
            "generator=torch.Generator().manual_seed(0)).images[0]",
            'image.save("lora.png")']))]
        present = [part for part in cls.card_parts if f"{part[2]}/adapter_config.json" in card.files]
        if present:
            imports = {"from peft import PeftModel", *(f"from {lib} import {cls_}" for lib, cls_, _ in present)}
            lines = [*sorted(imports), ""]
            for _, model_cls, sub in present:
                lines += [f'{sub} = {model_cls}.from_pretrained("{card.base}", subfolder="{sub}")',
                          f'{sub} = PeftModel.from_pretrained({sub}, "{card.repo_id}", subfolder="{sub}")']
            usage.append(("PEFT", "\n".join(lines)))
        return usage

    # ------------------------------------------------------------------ lightning-lora sample sd
    @classmethod
    def add_sample_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pretrained", required=True,
                            help=f"diffusers {cls.sample_what} folder or Hub id (e.g. {cls.sample_example}[@revision])")
        options.add_lora_folding(parser, "diffusers/kohya/PEFT/lightning_lora file, or a run's adapters/final")
        parser.add_argument("--prompt", required=True)
        parser.add_argument("--steps", type=options.positive_int, default=25)
        parser.add_argument("--guidance", type=options.finite_float, default=cls.sample_guidance)
        parser.add_argument("--resolution", type=int, default=None,
                            help="a positive multiple of 8 (default: the UNet's sample size x VAE factor)")
        parser.add_argument("--seed", type=int, default=0)
        options.add_image_output(parser)

    @classmethod
    def run_sample(cls, args: argparse.Namespace) -> int:
        """One picture from the folder's own pipeline (its scheduler), LoRAs folded into the weights."""
        from lightning_lora.adapters.finite import require_finite
        from lightning_lora.fileio import atomic_write_bytes

        out = options.image_out(args)
        if args.resolution is not None:  # the pipeline's own rule, before anything loads (the VAE's after)
            check_sample_size(args.resolution, 8)
        folder = cls.check_folder(args.pretrained, key="--pretrained")
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        pipe = cls.load_sample_pipeline(folder, args)
        pipe.to(options.device(args.device))
        for line in apply_loras(pipe, options.scaled_loras(args), allow_partial=args.allow_partial,
                                verbose=args.verbose, parts=("unet", *cls.text_encoders)):
            print(line)
        size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        check_sample_size(size, pipe.vae_scale_factor)
        image = pipe(args.prompt, height=size, width=size, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(args.seed),
                     output_type="pt").images[0]
        require_finite([(out.name, image)], "the sampled picture", hint="; nothing was written")
        atomic_write_bytes(out, options.image_bytes(image, out))
        print(f"wrote {out} ({size}x{size}, {args.steps} steps, guidance {args.guidance:g}, seed {args.seed})")
        return 0


    @classmethod
    def load_sample_pipeline(cls, folder: Path, args: argparse.Namespace) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def check_sample_size(size: int, vae_factor: int) -> int:
    """``--resolution``: a positive multiple of 8 (the pipeline's rule) and of the VAE's downscale factor."""
    step = math.lcm(8, int(vae_factor))
    if size <= 0 or size % step:
        raise UserError(f"--resolution={size} must be a positive multiple of {step}, e.g. "
                        f"{max(step, size // step * step)}")
    return size


# --------------------------------------------------------------------------- LoRAs on a plain pipeline
#: the pipeline parts a Stable Diffusion LoRA file's module names map to (``unet.<path>``, ``text_encoder.<path>``)
LORA_PARTS = ("unet", "text_encoder")


def canonical_name(module: str) -> str:
    """CLIP layers under their ``text_model.`` path, as SD LoRA files name them (transformers 5's
    CLIPTextModel has no ``text_model`` level; files from every other tool do)."""
    head, _, rest = module.partition(".")
    if head.startswith("text_encoder") and not rest.startswith("text_model."):
        return f"{head}.text_model.{rest}"
    return module


def pipeline_layers(pipe: Any, parts: tuple[str, ...] = LORA_PARTS) -> dict[str, nn.Module]:
    """Every weight-bearing layer of the pipeline's UNet and text encoder(s), by ``unet.<path>`` /
    ``text_encoder.<path>``, text-encoder layers also under their ``text_model.`` name."""
    from lightning_lora.adapters.fold import named_layers

    return named_layers({part: getattr(pipe, part) for part in parts}, rename=canonical_name)


def apply_loras(pipe: Any, loras: list[tuple[Path, float]], allow_partial: bool = False, verbose: bool = False,
                parts: tuple[str, ...] = LORA_PARTS) -> list[str]:
    """Fold LoRAs into a pipeline's UNet/text-encoder weights (see ``adapters.fold``); SDXL names its two text
    encoders in ``parts``."""
    from lightning_lora.adapters.fold import fold_loras

    return fold_loras(pipeline_layers(pipe, parts), loras, allow_partial, what="a UNet or text-encoder layer",
                      where="the pipeline", inside=(DIFFUSERS_FILE,), verbose=verbose)
