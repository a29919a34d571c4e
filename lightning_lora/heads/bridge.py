"""LBM (latent bridge matching) in the diffusion family: image-to-image LoRA training of a released LBM denoiser.

``BridgeHead`` carries a source image's latent to a target image's latent along a Brownian bridge, trained and
sampled as ``gojasper/LBM`` does (see the class); it shares the frozen VAE and the export helpers of the
latent-diffusion heads (``heads/diffusion.py``'s ``LatentHead``). ``lightning-lora sample lbm`` translates one
image with LoRAs folded into the denoiser at a scale.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from lightning_lora import options
from lightning_lora.checks import choice, positive_int
from lightning_lora.errors import UserError
from lightning_lora.heads.base import StepOutput, refuse_dora
from lightning_lora.heads.diffusion import (
    UNET_CONV_TARGETS,
    LatentHead,
    cast_frozen,
    enable_unet_checkpointing,
    parse_frozen_dtype,
)

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
            choice(value, f"{prefix}{key}", choices[key])
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


def _sample_size(spec: str | None) -> tuple[int, int] | None:
    """``--size``: WIDTHxHEIGHT, or one number for a square (None: the source's own size)."""
    if spec is None:
        return None
    parts = spec.lower().split("x")
    try:
        size = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        size = (0, 0)
    if min(size) <= 0:
        raise UserError(f"--size {spec!r}: give WIDTHxHEIGHT in pixels (e.g. 640x480) or one number")
    return size


class BridgeHead(LatentHead):
    """LoRA on an LBM denoiser (latent bridge matching, image to image), from a local LBM folder.

    The folder is a released LBM model's (one ``.yaml`` config + ``model.safetensors``; ``models/lbm.py``), or a
    single LBM weights file (``exact_base.ckpt``) with its config beside it.
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

    sample_command: ClassVar[str | None] = "lbm"
    sample_help: ClassVar[str] = "an LBM image-to-image translation with LoRAs folded in at a scale"
    modelspec_architecture: ClassVar[str] = "lbm/lora"

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
        from lightning_lora import hub
        from lightning_lora.models.lbm import load_lbm

        positive_int(num_inference_steps, "model.num_inference_steps", hint=" (LBM: 1)")
        if pixel_loss_max_size < 8:
            raise UserError(f"model.pixel_loss_max_size={pixel_loss_max_size} must be at least 8 pixels")
        parse_frozen_dtype(frozen_dtype)
        given = {"bridge_noise_sigma": bridge_noise_sigma, "timestep_sampling": timestep_sampling,
                 "logit_mean": logit_mean, "logit_std": logit_std, "latent_loss_type": latent_loss_type,
                 "latent_loss_weight": latent_loss_weight, "pixel_loss_type": pixel_loss_type,
                 "pixel_loss_weight": pixel_loss_weight}
        _check_bridge_settings({k: v for k, v in given.items() if v is not None}, "model.")  # before loading
        parts = load_lbm(pretrained)
        settings = {k: _setting(v, parts.config, k, BRIDGE_DEFAULTS[k]) for k, v in given.items()}
        _check_bridge_settings(settings, f"{parts.config_file or parts.path}: ")  # what the folder's config adds
        self.bridge_noise_sigma = float(settings["bridge_noise_sigma"])
        self.timestep_sampling = str(settings["timestep_sampling"])
        self.logit_mean, self.logit_std = float(settings["logit_mean"]), float(settings["logit_std"])
        self.latent_loss_type, self.pixel_loss_type = settings["latent_loss_type"], settings["pixel_loss_type"]
        self.latent_loss_weight = float(settings["latent_loss_weight"])
        self.pixel_loss_weight = float(settings["pixel_loss_weight"])

        self.denoiser, self.scheduler = parts.denoiser, parts.scheduler
        cast_frozen(frozen_dtype, self.denoiser, parts.vae)
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
        # a Hub id is what other tools (and the adapter's metadata) should name, not this machine's cache path
        self.pretrained, short = hub.identity(pretrained, parts.path)
        self.name = name or short
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
        enable_unet_checkpointing(self.denoiser)

    @classmethod
    def check_adapter(cls, spec: Any, preset: Mapping[str, Any]) -> None:
        refuse_dora(spec, f"the LBM file {LBM_FILE} (read by lightning-lora sample/merge lbm)")

    @classmethod
    def batch_kinds(cls, preset: Mapping[str, Any]) -> tuple[str, ...]:
        from lightning_lora.data.shards import IMAGE_PAIRS

        return (IMAGE_PAIRS,)

    @classmethod
    def build_tiny(cls, path: Path, preset: Mapping[str, Any]) -> str:
        """A tiny LBM folder in the released layout (``models/lbm_tiny.py``)."""
        from lightning_lora.models.lbm_tiny import ensure_tiny_lbm

        return ensure_tiny_lbm(path)

    # ------------------------------------------------------------------ lightning-lora sample lbm
    @classmethod
    def add_sample_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pretrained", "--base_model_path", dest="pretrained", required=True,
                            help="LBM folder (a .yaml config + model.safetensors), a single LBM weights file "
                                 "(.safetensors/.ckpt, config as <stem>.yaml or config.yaml beside it), or a Hub id")
        options.add_lora_folding(parser, "lightning_lora/PEFT/kohya/diffusers file, an extracted LoRA, or a run's "
                                         "adapters/final")
        parser.add_argument("--source", "--source_image", dest="source", required=True,
                            help="source image (.png/.jpg/...)")
        parser.add_argument("--steps", "--num_inference_steps", dest="steps", type=int, default=1,
                            help="Euler steps over the bridge (LBM: 1)")
        parser.add_argument("--size", default=None, help="WIDTHxHEIGHT to resize the source to (default: its own "
                                                         "size, rounded down to the VAE's factor)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior draw and the bridge noise")
        options.add_image_output(parser)

    @classmethod
    def run_sample(cls, args: argparse.Namespace) -> int:
        """One LBM translation (source image -> target domain) with LoRAs folded into the denoiser at a scale."""
        from PIL import Image

        from lightning_lora.adapters.finite import require_finite
        from lightning_lora.data.images import describe_error, load_rgb, to_tensor
        from lightning_lora.fileio import atomic_write_bytes
        from lightning_lora.models.lbm import check_lbm_folder

        out = options.image_out(args)
        if args.steps < 1:
            raise UserError(f"--steps={args.steps} must be >= 1 (LBM translates in 1)")
        source_path = Path(args.source)
        if not source_path.is_file():
            raise UserError(f"--source: file not found: {source_path}")
        try:
            image = load_rgb(source_path)
        except Exception as exc:
            raise UserError(f"--source {source_path}: unreadable image ({describe_error(exc)})") from None
        size = _sample_size(args.size)
        check_lbm_folder(args.pretrained, "--pretrained")
        head = cls(args.pretrained, pixel_loss_weight=0.0, num_inference_steps=args.steps)
        head.eval().to(options.device(args.device))
        for line in apply_lbm_loras(head.denoiser, options.scaled_loras(args), allow_partial=args.allow_partial,
                                    verbose=args.verbose):
            print(line)
        f = head.vae_factor
        w, h = size or image.size
        w, h = max(f, w // f * f), max(f, h // f * f)  # the VAE needs multiples of its downscale factor
        if (w, h) != image.size:
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        result = head.translate(to_tensor(image)[None], args.steps, seed=args.seed)[0]
        require_finite([(out.name, result)], "the translated picture", hint="; nothing was written")
        atomic_write_bytes(out, options.image_bytes((result + 1) / 2, out))
        print(f"wrote {out} ({w}x{h}, {args.steps} step{'s' if args.steps != 1 else ''}, seed {args.seed})")
        return 0

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

    def bridge_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None, per_row: bool = False,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-term logs) of one batch (``per_row``: each pair's loss, whose mean is the batch's); RNG draws
        in this order: target latents, source latents, timesteps, bridge noise (then the pixel-loss crop)."""
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
        loss = self.latent_loss_weight * (per_sample if per_row else latent)
        logs = {"latent_loss": latent.detach()}
        if self.pixel_loss_weight > 0:
            pixel = self.pixel_loss(xt - sigma * pred, target, batch.get("mask"), generator)  # per pair
            loss = loss + self.pixel_loss_weight * (pixel if per_row else pixel.mean())
            logs["pixel_loss"] = pixel.mean().detach()
        return loss, logs

    def pixel_loss(self, denoised: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """LPIPS/L2/L1 per pair between the decoded denoised latent and the target image, on one random crop of at
        most ``pixel_loss_max_size`` pixels (the same crop for the whole batch, as LBM)."""
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
            return self.lpips(decoded * valid, goal * valid).flatten(1).mean(1)
        diff = decoded * valid - goal * valid
        return (diff.pow(2) if self.pixel_loss_type == "l2" else diff.abs()).flatten(1).mean(1)

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        if len(self._preview_pairs) < int(self.previews.get("num_samples", 0)):
            self._keep_previews(batch)
        loss, logs = self.bridge_loss(batch)
        return StepOutput(loss, batch_size=batch["target"].shape[0], logs=logs)

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss with fixed draws per batch, and each pair's one-step translation error in latent space."""
        self._keep_previews(batch)
        seed = 1234 + int(batch["index"][0]) if "index" in batch else 1234
        loss, _ = self.bridge_loss(batch, torch.Generator().manual_seed(seed), per_row=True)  # each pair once
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
                                  base_model=self.base_model_identity(), extra=self.file_metadata(step))]



def lbm_layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """The denoiser's weight-bearing layers under their checkpoint names (``denoiser.<path>``) and bare paths,
    so LoRAs named either way (PEFT directories, extracted files, kohya or diffusers keys) resolve."""
    from lightning_lora.models.lbm import DENOISER_PREFIX, denoiser_layers

    named = denoiser_layers(denoiser)
    return {**named, **{k[len(DENOISER_PREFIX):]: m for k, m in named.items()}}


def apply_lbm_loras(denoiser: nn.Module, loras: list[tuple[Path, float]], allow_partial: bool = False,
                    verbose: bool = False) -> list[str]:
    """Fold LoRAs (any format ``read_lora`` knows, or a run's adapter snapshot) into an LBM denoiser."""
    from lightning_lora.adapters.fold import fold_loras

    return fold_loras(lbm_layers(denoiser), loras, allow_partial, what="a denoiser layer", where="the denoiser",
                      prefixes=("denoiser",), inside=(LBM_FILE, "denoiser"), verbose=verbose)
