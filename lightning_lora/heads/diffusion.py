"""Diffusion family: LoRA training of diffusers UNets, text-to-image (Stable Diffusion) and image-to-image (LBM).

``DiffusionHead`` (Stable Diffusion): the objective of diffusers' ``train_text_to_image_lora.py``: VAE latents ×
scaling factor, DDPM noising at a uniform integer timestep (plus optional ``noise_offset``), an epsilon or
v-prediction target (the scheduler's own, or ``prediction_type``), mean-squared error in fp32, optionally
min-SNR-γ weighted per sample. VAE latent distributions and text embeddings can be cached; both caches are
exact (latents are re-sampled from the cached distribution each time; a cache entry is keyed by the image's
pixels or the caption's text).

``BridgeHead`` (LBM, latent bridge matching): a UNet that carries a source image's latent to a target image's
latent along a Brownian bridge, trained and sampled as ``gojasper/LBM`` does (see the class).

Both share ``LatentHead``: the frozen VAE (posterior cache, decoding), the frozen dtype, and reading a
snapshot's PEFT directories back for the family's own export formats.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from lightning_lora.errors import UserError
from lightning_lora.heads.base import StepOutput, TaskHead

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya's LoCon set: every convolution of the ResNet blocks and of the down/upsamplers
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


# --------------------------------------------------------------------------- loading
def check_pipeline_folder(pretrained: str | Path | None) -> Path:
    """The folder of a diffusers Stable Diffusion pipeline, with every part the head loads."""
    if not pretrained:
        raise UserError("model.pretrained is required: pass model.pretrained=<local diffusers SD folder>")
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise UserError(f"model.pretrained: no folder at {path} (give a local diffusers Stable Diffusion folder)")
    for part in PIPELINE_PARTS:
        if not (path / part).is_dir():
            raise UserError(f"model.pretrained={path} has no {part}/ folder; a Stable Diffusion pipeline folder "
                            f"holds {', '.join(p + '/' for p in PIPELINE_PARTS)}")
    return path


def load_pipeline_parts(path: Path, revision: str | None = None, variant: str | None = None) -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and the DDPM training scheduler, as diffusers' script loads them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"revision": revision, "variant": variant}
    try:
        return {
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
        }
    except (OSError, ValueError) as e:  # a missing weights file / variant, a bad config
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"model.pretrained={path}: cannot load the pipeline: {first[:200]}") from None


def _dtype(name: str | None) -> torch.dtype | None:
    valid = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name is None:
        return None
    if name not in valid:
        raise UserError(f"model.frozen_dtype={name!r} is unknown; valid: null, {', '.join(valid)}")
    return valid[name]


# --------------------------------------------------------------------------- objective pieces
def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights per sample: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def _pixel_key(image: torch.Tensor) -> str:
    return hashlib.blake2b(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).hexdigest()


# --------------------------------------------------------------------------- what the heads share
class LatentHead(TaskHead):
    """A head over a frozen VAE: scaled latents from the posterior (exactly cacheable), decoding, the frozen
    dtype, and the modules of an adapter snapshot for the family's own export formats."""

    family: ClassVar[str] = "diffusion"
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"

    def _init_vae(self, vae: nn.Module, resolution: int, cache_latents: bool) -> None:
        self.vae = vae
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % self.vae_factor:
            raise UserError(f"model.resolution={resolution} is not divisible by the VAE's downscale factor "
                            f"{self.vae_factor}; use e.g. {resolution // self.vae_factor * self.vae_factor or 8}")
        self.resolution, self.cache_latents = resolution, cache_latents
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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
    def snapshot_modules(snapshot: Path, adapters: dict[str, PeftModel]) -> dict[str, Any]:
        """Every LoRA module of a snapshot's PEFT directories as ``Factors``, by ``<submodule>.<module path>``."""
        from lightning_lora.adapters.formats import read_lora

        modules = {}
        for sub in adapters:
            for name, factors in read_lora(snapshot / sub).modules.items():
                modules[canonical_name(f"{sub}.{name}")] = factors
        return modules


def _cast_frozen(frozen_dtype: str | None, *parts: nn.Module) -> None:
    """Cast the frozen networks (LoRA weights are made fp32 again after injection by the module)."""
    if (dtype := _dtype(frozen_dtype)) is not None:
        for part in parts:
            part.to(dtype)


def _enable_unet_checkpointing(unet: nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    # Non-reentrant, so LoRA gradients flow although the checkpointed inputs need no grad.
    unet.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=False))


# --------------------------------------------------------------------------- the head
class DiffusionHead(LatentHead):
    """LoRA on a Stable Diffusion UNet (and optionally its text encoder), from a local diffusers folder.

    ``previews`` (prompts, seeds, num_inference_steps, guidance_scale, every_n_steps) drives the validation
    images the ``SamplePreviews`` callback logs; ``resolution`` is the training/preview image size.
    """

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
        previews: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        path = check_pipeline_folder(pretrained)
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise UserError(f"model.prediction_type={prediction_type!r} is unknown; valid: null, "
                            f"{', '.join(PREDICTION_TYPES)}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise UserError(f"model.snr_gamma={snr_gamma} must be > 0 (5.0 is the paper's value) or null")
        parts = load_pipeline_parts(path, revision, variant)
        self.unet, self.text_encoder = parts["unet"], parts["text_encoder"]
        self.tokenizer, self.noise_scheduler = parts["tokenizer"], parts["scheduler"]
        if prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        if self.noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"{path}/scheduler predicts {self.noise_scheduler.config.prediction_type!r}; set "
                            f"model.prediction_type to one of {', '.join(PREDICTION_TYPES)}")
        _cast_frozen(frozen_dtype, self.unet, parts["vae"], self.text_encoder)
        self._init_vae(parts["vae"], resolution, cache_latents)
        self.pretrained, self.revision, self.name = str(path), revision, name or path.name
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset
        self.train_text_encoder = train_text_encoder
        self.targets = {"unet": list(UNET_TARGETS), "text_encoder": list(TEXT_ENCODER_TARGETS), **(targets or {})}
        self.unet_conv_targets = list(conv_targets)
        self.cache_text_embeddings = cache_text_embeddings and not train_text_encoder
        self.previews = dict(previews or {})
        self._text_cache: dict[str, torch.Tensor] = {}
        self._pipeline_cache: list[Any] = []  # built on first use; a list keeps it out of the module tree

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

    def enable_gradient_checkpointing(self) -> None:
        _enable_unet_checkpointing(self.unet)
        self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

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

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        pixels, captions = batch["pixel_values"], batch["text"]
        if len(captions) != pixels.shape[0]:
            raise UserError(f"batch has {pixels.shape[0]} images but {len(captions)} captions")
        latents = self.encode_images(pixels, generator)
        hidden = self.encode_text(captions)
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
        pred = self.unet(noisy, t, hidden).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is None:
            return per_sample.mean()
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, t.cpu()).to(per_sample)
        return (per_sample * min_snr_weights(snr, self.snr_gamma, self.prediction_type)).mean()

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        return StepOutput(self.diffusion_loss(batch), batch_size=batch["pixel_values"].shape[0])

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # Fixed timesteps and noise per batch: the validation loss is comparable across evaluations.
        seed = 1234 + int(batch["index"][0]) if "index" in batch else 1234
        return {"loss": self.diffusion_loss(batch, torch.Generator().manual_seed(seed))}

    # ------------------------------------------------------------------ sampling
    def pipeline(self):
        """A StableDiffusionPipeline over this head's own modules (no copies), with a DDIM sampler."""
        if not self._pipeline_cache:
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
        """diffusers ``pytorch_lora_weights.safetensors`` and a kohya-style file next to the PEFT directories."""
        from lightning_lora.adapters.extract import is_spatial
        from lightning_lora.adapters.formats import write_diffusers, write_kohya

        modules = self.snapshot_modules(snapshot, adapters)
        conv = [f for f in modules.values() if is_spatial(f.weight_shape)]
        args = {}
        if conv:
            args = {"conv_dim": Counter(f.rank for f in conv).most_common(1)[0][0],
                    "conv_alpha": Counter(f.alpha for f in conv).most_common(1)[0][0]}
        metadata = {"ss_network_args": json.dumps(args), "ss_base_model_version": "sd_v1",
                    "ss_output_name": self.name}
        return [write_diffusers(snapshot / DIFFUSERS_FILE, modules),
                write_kohya(snapshot / KOHYA_FILE, modules, metadata=metadata)]


# --------------------------------------------------------------------------- LBM: latent bridge matching
BRIDGE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LBM_FILE = "denoiser_lora.safetensors"
TIMESTEP_SAMPLINGS = ("custom_timesteps", "uniform", "log_normal")
LATENT_LOSSES = ("l2", "l1")
PIXEL_LOSSES = ("lpips", "l2", "l1")


# LBM's LBMConfig defaults, used when neither the head's arguments nor the folder's config set a value.
BRIDGE_DEFAULTS: dict[str, Any] = {
    "bridge_noise_sigma": 0.001, "timestep_sampling": "custom_timesteps", "logit_mean": 0.0, "logit_std": 1.0,
    "latent_loss_type": "l2", "latent_loss_weight": 1.0, "pixel_loss_type": "lpips", "pixel_loss_weight": 0.0,
}


def _check_bridge_settings(settings: dict[str, Any], prefix: str) -> None:
    """One-line errors for bad bridge settings (explicit ones before the model loads, the merged ones after)."""
    choices = {"timestep_sampling": TIMESTEP_SAMPLINGS, "latent_loss_type": LATENT_LOSSES,
               "pixel_loss_type": PIXEL_LOSSES}
    for key, value in settings.items():
        if key in choices:
            if value not in choices[key]:
                raise UserError(f"{prefix}{key}={value!r} is unknown; valid: {', '.join(choices[key])}")
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{prefix}{key}={value!r} must be a number") from None
        if key != "logit_mean" and not number >= 0:
            raise UserError(f"{prefix}{key}={value!r} must be >= 0")


def _setting(value: Any, config: dict[str, Any], key: str, default: Any) -> Any:
    """An explicit head argument, else the LBM folder config's value, else LBM's default."""
    if value is not None:
        return value
    found = config.get(key)
    return default if found is None else found


def bridge_interpolant(z_source: torch.Tensor, z_target: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                       bridge_noise_sigma: float) -> torch.Tensor:
    """x_σ = σ·z_source + (1-σ)·z_target + b·√(σ(1-σ))·ε: the Brownian bridge from the target latent (σ=0) to
    the source latent (σ=1); at σ=1 exactly the source latent. ``sigma`` broadcasts ([B, 1, 1, 1])."""
    xt = sigma * z_source + (1.0 - sigma) * z_target + bridge_noise_sigma * (sigma * (1.0 - sigma)).sqrt() * noise
    return torch.where(sigma == 1.0, z_source, xt)


def latent_mask(mask: torch.Tensor, factor: int, channels: int) -> torch.Tensor:
    """A pixel mask [B, 1|C, H, W] (non-zero = valid) at latent resolution: a latent pixel is valid when every
    pixel it covers is (max-pooling of the invalid pixels, as LBM does), repeated over the latent channels."""
    invalid = ~mask[:, :1].bool()
    pooled = F.max_pool2d(invalid.float(), factor, factor).bool()
    return (~pooled).expand(-1, channels, -1, -1)


class BridgeHead(LatentHead):
    """LoRA on an LBM denoiser (latent bridge matching, image to image), from a local LBM folder.

    The folder is a released LBM model's (one ``.yaml`` config + ``model.safetensors``; ``models/lbm.py``).
    Training follows ``gojasper/LBM``'s ``LBMModel.forward``: with z = VAE(target) and z_s = VAE(source),
    a timestep t from ``timesteps`` (with ``timestep_probs``; LBM: 250/500/750/1000 equiprobable), σ = the
    flow-matching scheduler's sigma at t (t/1000), x_t = σ·z_s + (1-σ)·z + b·√(σ(1-σ))·ε (b =
    ``bridge_noise_sigma``), the denoiser predicts z_s − z from (x_t, t) with no text, and the loss is the latent
    L2 (or L1), masked by the batch's optional ``mask``, times ``latent_loss_weight``, plus optionally
    ``pixel_loss_weight`` × a pixel loss (LPIPS, L2 or L1) between VAE.decode(x_t − σ·pred) and the target image
    on a random crop of at most ``pixel_loss_max_size`` pixels. Settings left null come from the folder's config.

    Sampling (``translate``): Euler from z_s over σ = linspace(1, 1/N, N) then 0, adding the bridge noise
    between steps; ``num_inference_steps`` = 1 by default (LBM's one-step translation).

    Batches: ``source``, ``target`` [B, 3, H, W] in [-1, 1], optional ``mask`` [B, 1, H, W], ``index``.
    Previews: the first ``previews.num_samples`` validation pairs (training pairs when there is no validation
    data), one row each: source | prediction | target.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        name: str | None = None,
        resolution: int = 512,
        bridge_noise_sigma: float | None = None,
        timestep_sampling: str | None = None,
        timesteps: list[int] | None = None,
        timestep_probs: list[float] | None = None,
        logit_mean: float | None = None,
        logit_std: float | None = None,
        latent_loss_type: str | None = None,
        latent_loss_weight: float | None = None,
        pixel_loss_type: str | None = None,
        pixel_loss_weight: float | None = None,
        pixel_loss_max_size: int = 512,
        num_inference_steps: int = 1,
        targets: dict[str, list[str]] | None = None,
        conv_targets: list[str] | tuple[str, ...] = UNET_CONV_TARGETS,
        cache_latents: bool = False,
        frozen_dtype: str | None = None,
        previews: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from lightning_lora.models.lbm import load_lbm

        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise UserError(f"model.num_inference_steps={num_inference_steps!r} must be a positive integer (LBM: 1)")
        if pixel_loss_max_size < 8:
            raise UserError(f"model.pixel_loss_max_size={pixel_loss_max_size} must be at least 8 pixels")
        _dtype(frozen_dtype)
        given = {"bridge_noise_sigma": bridge_noise_sigma, "timestep_sampling": timestep_sampling,
                 "logit_mean": logit_mean, "logit_std": logit_std, "latent_loss_type": latent_loss_type,
                 "latent_loss_weight": latent_loss_weight, "pixel_loss_type": pixel_loss_type,
                 "pixel_loss_weight": pixel_loss_weight}
        _check_bridge_settings({k: v for k, v in given.items() if v is not None}, "model.")  # before loading
        parts = load_lbm(pretrained)
        settings = {k: _setting(v, parts.config, k, BRIDGE_DEFAULTS[k]) for k, v in given.items()}
        _check_bridge_settings(settings, f"{parts.config_file}: ")  # what the folder's config adds
        self.bridge_noise_sigma = float(settings["bridge_noise_sigma"])
        self.timestep_sampling = str(settings["timestep_sampling"])
        self.logit_mean, self.logit_std = float(settings["logit_mean"]), float(settings["logit_std"])
        self.latent_loss_type, self.pixel_loss_type = settings["latent_loss_type"], settings["pixel_loss_type"]
        self.latent_loss_weight = float(settings["latent_loss_weight"])
        self.pixel_loss_weight = float(settings["pixel_loss_weight"])

        self.denoiser, self.scheduler = parts.denoiser, parts.scheduler
        _cast_frozen(frozen_dtype, self.denoiser, parts.vae)
        self._init_vae(parts.vae, resolution, cache_latents)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.train_timesteps = self.scheduler.timesteps.detach().float().cpu()
        self.train_sigmas = self.scheduler.sigmas[: len(self.train_timesteps)].detach().float().cpu()
        self._init_timesteps(_setting(timesteps, parts.config, "selected_timesteps", [250, 500, 750, 1000]),
                             _setting(timestep_probs, parts.config, "prob", None))
        self.lpips = None
        if self.pixel_loss_weight > 0 and self.pixel_loss_type == "lpips":
            self.lpips = self._lpips()
            if self.lpips is None:  # skipped, with the warning
                self.pixel_loss_weight = 0.0
        self.pixel_loss_max_size, self.num_inference_steps = pixel_loss_max_size, num_inference_steps
        self.pretrained = str(parts.path)
        self.name = name or (parts.path.name if parts.path else "lbm")
        self.targets = {"denoiser": list(BRIDGE_TARGETS), **(targets or {})}
        self.denoiser_conv_targets = list(conv_targets)
        self.previews = dict(previews or {})
        self._preview_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _init_timesteps(self, timesteps: Any, probs: Any) -> None:
        """The discrete timesteps (custom_timesteps) as indices into the scheduler's, and their probabilities."""
        values = [float(t) for t in (timesteps or [])]
        if self.timestep_sampling != "custom_timesteps":
            self.timestep_index, self.timestep_probs = torch.zeros(0, dtype=torch.long), torch.zeros(0)
            return
        if not values:
            raise UserError("model.timesteps is empty; give the discrete timesteps to train at, e.g. "
                            "[250,500,750,1000]")
        index = []
        for t in values:
            hits = (self.train_timesteps == t).nonzero().flatten()
            if len(hits) != 1:
                lo, hi = int(self.train_timesteps.min()), int(self.train_timesteps.max())
                raise UserError(f"model.timesteps: {t:g} is not a timestep of the scheduler (integers {lo}..{hi})")
            index.append(int(hits[0]))
        p = torch.full((len(values),), 1.0 / len(values)) if probs is None else torch.tensor(
            [float(x) for x in probs], dtype=torch.float64)
        if len(p) != len(values) or (p < 0).any() or abs(float(p.sum()) - 1.0) > 1e-6:
            raise UserError(f"model.timestep_probs={[float(x) for x in p]} must be {len(values)} non-negative numbers "
                            f"summing to 1 (one per timestep in {values})")
        self.timestep_index, self.timestep_probs = torch.tensor(index), p.float()

    @staticmethod
    def _lpips() -> nn.Module | None:
        try:
            import lpips
        except ImportError as exc:  # lpips itself, or torchvision which it imports
            why = "the lpips package is not installed" if exc.name in (None, "lpips") else f"lpips needs {exc.name}"
            warnings.warn(f"model.pixel_loss_weight > 0 with pixel_loss_type=lpips, but {why}: training without the "
                          "pixel term (pip install lpips, or use model.pixel_loss_type=l2|l1)", stacklevel=3)
            return None
        net = lpips.LPIPS(net="vgg", verbose=False)
        net.requires_grad_(False)
        return net.eval()

    # ------------------------------------------------------------------ TaskHead
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def default_targets(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.targets.items()}

    def conv_targets(self) -> dict[str, list[str]]:
        return {"denoiser": list(self.denoiser_conv_targets)}

    def base_model_identity(self) -> dict[str, str]:
        return {"name": self.name, "path": self.pretrained, "objective": "bridge"}

    def enable_gradient_checkpointing(self) -> None:
        _enable_unet_checkpointing(self.denoiser)

    # ------------------------------------------------------------------ objective
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas), each [n], drawn as LBM draws them (custom set, uniform, or logit-normal)."""
        if self.timestep_sampling == "custom_timesteps":
            choice = torch.multinomial(self.timestep_probs, n, replacement=True, generator=generator)
            index = self.timestep_index[choice]
        elif self.timestep_sampling == "uniform":
            index = torch.randint(0, len(self.train_timesteps), (n,), generator=generator)
        else:
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator))
            index = (u * self.num_train_timesteps).long().clamp(max=len(self.train_timesteps) - 1)
        return self.train_timesteps[index], self.train_sigmas[index]

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction (z_source − z_target) at ``timesteps``, with no text (LBM passes none)."""
        if not torch.is_autocast_enabled():
            sample = sample.to(self.denoiser.dtype)
        return self.denoiser(sample, timesteps.to(sample.device), encoder_hidden_states=None).sample.float()

    def _pairs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        for key in ("source", "target"):
            if key not in batch:
                raise UserError(f"batch has no {key!r} images (found {', '.join(batch)}); LBM training needs paired "
                                "data, e.g. data=paired_shards or data=digits_pairs")
        source, target = batch["source"], batch["target"]
        if source.shape[0] != target.shape[0]:
            raise UserError(f"batch has {source.shape[0]} source but {target.shape[0]} target images")
        if source.shape[-2:] != target.shape[-2:]:  # as LBM: the source is resized to the target's size
            source = F.interpolate(source, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return source, target

    def bridge_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-term logs) of one batch; RNG draws in this order: target latents, source latents,
        timesteps, bridge noise (then the pixel-loss crop)."""
        source, target = self._pairs(batch)
        z = self.encode_images(target, generator)
        z_source = self.encode_images(source, generator)
        t, sigma = self.sample_timesteps(z.shape[0], generator)
        sigma = sigma.to(z).view(-1, 1, 1, 1)
        noise = torch.randn(z.shape, generator=generator).to(z)
        xt = bridge_interpolant(z_source, z, sigma, noise, self.bridge_noise_sigma)
        pred = self.denoise(xt, t)
        goal = z_source - z
        mask = None if batch.get("mask") is None else latent_mask(batch["mask"].to(z.device), self.vae_factor,
                                                                   z.shape[1])
        m = torch.ones_like(goal) if mask is None else mask.to(goal)
        diff = pred * m - goal * m
        per_sample = (diff.pow(2) if self.latent_loss_type == "l2" else diff.abs()).flatten(1).mean(1)
        latent = per_sample.mean()
        loss = self.latent_loss_weight * latent
        logs = {"latent_loss": latent.detach()}
        if self.pixel_loss_weight > 0:
            pixel = self.pixel_loss(xt - sigma * pred, target, batch.get("mask"), generator)
            loss = loss + self.pixel_loss_weight * pixel
            logs["pixel_loss"] = pixel.detach()
        return loss, logs

    def pixel_loss(self, denoised: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """LPIPS/L2/L1 between the decoded denoised latent and the target image, on one random crop of at most
        ``pixel_loss_max_size`` pixels (the same crop for the whole batch, as LBM)."""
        f = self.vae_factor
        size = max(1, self.pixel_loss_max_size // f)
        h, w = denoised.shape[-2:]
        top = int(torch.randint(0, max(h - size, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(0, max(w - size, 0) + 1, (1,), generator=generator))
        crop = denoised[..., top: top + size, left: left + size]
        pixels = (slice(None), slice(None), slice(top * f, (top + size) * f), slice(left * f, (left + size) * f))
        decoded = self.decode_latents(crop).clamp(-1, 1)
        goal = target[pixels].to(decoded)
        valid = torch.ones_like(goal) if mask is None else mask[pixels].to(decoded).expand_as(goal)
        if self.pixel_loss_type == "lpips":
            return self.lpips(decoded * valid, goal * valid).mean()
        diff = decoded * valid - goal * valid
        return (diff.pow(2) if self.pixel_loss_type == "l2" else diff.abs()).mean()

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        if len(self._preview_pairs) < int(self.previews.get("num_samples", 0)):
            self._keep_previews(batch)
        loss, logs = self.bridge_loss(batch)
        return StepOutput(loss, batch_size=batch["target"].shape[0], logs=logs)

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss with fixed draws per batch, and each pair's one-step translation error in latent space."""
        self._keep_previews(batch)
        seed = 1234 + int(batch["index"][0]) if "index" in batch else 1234
        loss, _ = self.bridge_loss(batch, torch.Generator().manual_seed(seed))
        source, target = self._pairs(batch)
        g = torch.Generator().manual_seed(seed + 1)
        z, z_source = self.encode_images(target, g), self.encode_images(source, g)
        predicted = self.bridge_sample(z_source, 1, g)
        out = {"loss": loss, "onestep_loss": (predicted - z).pow(2).flatten(1).mean(1)}
        if "index" in batch:
            out["index"] = batch["index"]
        return out

    def validation_metrics(self, collected: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"onestep_loss": float(collected["onestep_loss"].mean())} if "onestep_loss" in collected else {}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def bridge_sample(self, z_source: torch.Tensor, num_steps: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler from the source latent over σ = linspace(1, 1/N, N), then 0 (the flow-matching scheduler's
        step: x += (σ_next − σ)·pred), with the bridge noise b·√(σ(1−σ))·ε added before every step but the
        first (LBM's sampler)."""
        steps = num_steps or self.num_inference_steps
        sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).float()  # as LBM's np.linspace
        sigmas = torch.cat([sigmas, torch.zeros(1)])
        x = z_source.float()
        n = x.shape[0]
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            pred = self.denoise(x, (sigma * self.num_train_timesteps).repeat(n))
            x = x + (sigma_next - sigma) * pred
            if i < steps - 1:
                noise = torch.randn(x.shape, generator=generator).to(x)
                x = x + self.bridge_noise_sigma * (sigma_next * (1 - sigma_next)).sqrt() * noise
        return x

    @torch.no_grad()
    def translate(self, source: torch.Tensor, num_steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """Target-domain images [B, 3, H, W] in [-1, 1] for source images in [-1, 1] (seeded draws on the CPU)."""
        generator = torch.Generator().manual_seed(int(seed))
        device = next(self.denoiser.parameters()).device
        z_source = self.encode_images(source.to(device), generator)
        return self.decode_latents(self.bridge_sample(z_source, num_steps, generator)).clamp(-1, 1)

    def _keep_previews(self, batch: dict[str, Any]) -> None:
        want = int(self.previews.get("num_samples", 0))
        if len(self._preview_pairs) >= want:
            return
        source, target = self._pairs(batch)
        for s, t in zip(source, target, strict=True):
            if len(self._preview_pairs) < want:
                self._preview_pairs.append((s.detach().float().cpu(), t.detach().float().cpu()))

    def preview_images(self) -> torch.Tensor | None:
        """[pairs, 3, 3, H, W] in [0, 1]: source | prediction | target for each kept pair (None before any)."""
        if not self._preview_pairs:
            return None
        source = torch.stack([s for s, _ in self._preview_pairs])
        target = torch.stack([t for _, t in self._preview_pairs])
        steps = int(self.previews.get("num_inference_steps") or self.num_inference_steps)
        predicted = self.translate(source, steps, seed=int(self.previews.get("seed", 0))).cpu()
        return ((torch.stack([source, predicted, target], dim=1) + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ exports
    def export_adapters(self, snapshot: Path, adapters: dict[str, PeftModel], step: int,
                        run_dir: Path | None = None) -> list[Path]:
        """``denoiser_lora.safetensors``: every adapter in one self-describing file whose module names are the
        released checkpoint's keys (``denoiser.<module>``), so ``lightning-lora merge/validate/sample lbm`` and
        ``adapter.init_from`` take it as is (r/alpha per module in its metadata)."""
        from lightning_lora.adapters.io import save_adapter_file

        return [save_adapter_file(snapshot / LBM_FILE, adapters, family=self.family,
                                  base_model=self.base_model_identity())]


class TinyBridgeHead(BridgeHead):
    """``model=lbm_tiny``: a BridgeHead over the tiny LBM folder at ``pretrained``, built there on first use."""

    def __init__(self, pretrained: str, seed: int = 0, **kwargs: Any) -> None:
        from lightning_lora.models.lbm_tiny import ensure_tiny_lbm

        super().__init__(ensure_tiny_lbm(pretrained, seed=seed), **kwargs)


def lbm_layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """The denoiser's weight-bearing layers under their checkpoint names (``denoiser.<path>``) and bare paths,
    so LoRAs named either way (PEFT directories, extracted files, kohya or diffusers keys) resolve."""
    from lightning_lora.models.lbm import DENOISER_PREFIX, denoiser_layers

    named = denoiser_layers(denoiser)
    return {**named, **{k[len(DENOISER_PREFIX):]: m for k, m in named.items()}}


def apply_lbm_loras(denoiser: nn.Module, loras: list[tuple[Path, float]], allow_partial: bool = False) -> list[str]:
    """Fold LoRAs (any format ``read_lora`` knows, or a run's adapter snapshot) into an LBM denoiser."""
    return fold_loras(lbm_layers(denoiser), loras, allow_partial, what="a denoiser layer", where="the denoiser",
                      prefixes=("denoiser",), inside=(LBM_FILE, "denoiser"))


# --------------------------------------------------------------------------- LoRAs on a plain pipeline
def canonical_name(module: str) -> str:
    """CLIP layers under their ``text_model.`` path, as SD LoRA files name them (transformers 5's
    CLIPTextModel has no ``text_model`` level; files from every other tool do)."""
    head, _, rest = module.partition(".")
    if head.startswith("text_encoder") and not rest.startswith("text_model."):
        return f"{head}.text_model.{rest}"
    return module


def pipeline_layers(pipe: Any) -> dict[str, nn.Module]:
    """Every weight-bearing layer of the pipeline's UNet and text encoder, by ``unet.<path>`` /
    ``text_encoder.<path>``, text-encoder layers also under their ``text_model.`` name."""
    layers = {}
    for part in ("unet", "text_encoder"):
        for name, module in getattr(pipe, part).named_modules():
            if name and hasattr(module, "weight"):
                layers[f"{part}.{name}"] = module
                layers.setdefault(canonical_name(f"{part}.{name}"), module)
    return layers

def lora_source(path: Path, inside: tuple[str, ...] = (DIFFUSERS_FILE,)) -> Path:
    """A run's adapter snapshot (``adapters/final``) holds a file every tool reads (``inside``, the first one
    present); anything else is read as is."""
    if path.is_dir():
        for name in inside:
            if (path / name).exists():
                return path / name
    return path


def fold_loras(layers: dict[str, nn.Module], loras: list[tuple[Path, float]], allow_partial: bool = False, *,
               what: str = "a UNet or text-encoder layer", where: str = "the pipeline",
               prefixes: tuple[str, ...] = (), inside: tuple[str, ...] = (DIFFUSERS_FILE,)) -> list[str]:
    """Fold each LoRA (any format ``read_lora`` knows) into the weights of ``layers`` (by module name):
    W += weight · alpha/r · B·A. A file whose modules match no layer is an error; one that matches only
    some is an error unless ``allow_partial``. Returns one report line per LoRA."""
    from lightning_lora.adapters.combine import merge_into
    from lightning_lora.adapters.formats import read_lora, resolve_modules

    reports = []
    for path, weight in loras:
        lora = read_lora(lora_source(path, inside))
        matched: dict[str, str] = {}
        missing: list[str] = []
        for name in lora.modules:
            try:
                matched.update(resolve_modules([name], layers, where=where.removeprefix("the "),
                                               prefixes=(*lora.submodules, *prefixes)))
            except UserError:
                missing.append(name)
        total = len(lora.modules)
        if not matched:
            raise UserError(f"--lora {path}: none of its {total} modules matches {what} (e.g. {missing[0]!r}); "
                            "is it a LoRA for another model?")
        if missing and not allow_partial:
            raise UserError(f"--lora {path}: only {len(matched)} of {total} modules match {where} (first "
                            f"unmatched: {missing[0]!r}); pass --allow-partial to apply the matching ones")
        with torch.no_grad():
            for name, layer in matched.items():
                f, w = lora.modules[name], layers[layer].weight
                if f.weight_shape != tuple(w.shape):
                    raise UserError(f"--lora {path}: module {name!r} makes a delta of shape {list(f.weight_shape)} "
                                    f"but {layer} has shape {list(w.shape)}")
                w.copy_(merge_into(w, [(f, weight)]))
        reports.append(f"{path} (weight {weight:g}): {len(matched)} of {total} modules applied")
    return reports


def apply_loras(pipe: Any, loras: list[tuple[Path, float]], allow_partial: bool = False) -> list[str]:
    """Fold LoRAs into a Stable Diffusion pipeline's UNet/text-encoder weights (see ``fold_loras``)."""
    return fold_loras(pipeline_layers(pipe), loras, allow_partial)
