"""3D flow family: TRELLIS-style rectified-flow training of the sparse-structure and structured-latent denoisers.

Objective (as TRELLIS trains it): t ~ sigmoid(N(mean, std)) (logit-normal), x_t = (1 - t)·x0 + (σ_min +
(1 - σ_min)·t)·ε, target velocity v* = (1 - σ_min)·ε - x0, loss = mean squared error over every element (dense)
or every voxel feature of the batch (sparse). Classifier-free guidance is trained by replacing a sample's
condition with zeros with probability ``p_uncond``; noisy conditioning adds Gaussian noise to the condition
tokens before that drop (training only).

The condition tokens come with the batch (``cond``, precomputed) or are computed on the fly from condition
images (``cond_image``) by a frozen DINOv2-with-registers model loaded from a local folder
(``image_encoder``), as TRELLIS's image-conditioned trainers do.

``lightning-lora sample flow3d`` samples latents (and, for the demo's tiny presets, a picture of the voxels)
from condition tokens or an image, with an optional LoRA at a scale; ``lightning-lora encode-cond ROOT``
precomputes a data root's condition tokens (``cond_tokens/<sha256>.npz``) so that training reads them
(``data.cond=tokens``) instead of running DINOv2 on a render every step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from lightning_lora import options
from lightning_lora.adapters import save_adapter_file, save_lora_state_dict
from lightning_lora.checks import choice, dotted_function, fraction
from lightning_lora.errors import UserError
from lightning_lora.heads.base import HeadCommand, StepOutput, TaskHead, refuse_dora

if TYPE_CHECKING:
    from lightning_lora.publish import CardContext

COND_NOISE_SCHEDULES = ("none", "fixed", "uniform", "lognormal")
#: std of log σ around log(cond_noise_std) in the lognormal schedule (zadaianchuk/TRELLIS@cbcc337
#: trellis/trainers/flow_matching/mixins/noisy_image_conditioned.py, ``_sample_noise_std``)
LOGNORMAL_SPREAD = 0.5
T_SCHEDULES = ("logit_normal", "uniform")
DEFAULT_TARGETS = ("to_q", "to_kv", "to_out", "to_qkv")
LATENTS = ("ss", "slat")
DINO_MODEL_TYPES = ("dinov2_with_registers", "dinov2")
#: the released TRELLIS models' condition encoder (torch.hub's dinov2_vitl14_reg) as a transformers model
DINO_HUB_ID = "facebook/dinov2-with-registers-large"
#: a tiny stand-in base fills the layers TRELLIS initialises to zero with N(0, this²) (see ``build_tiny``)
TINY_BASE_STD = 0.05
#: what ``sample flow3d --cond`` reads as an image (anything else: a .npz of tokens)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: the preset whose image encoder ``encode-cond`` uses when none is given (the released models' DINOv2)
ENCODE_COND_PRESET = "trellis_slat"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint_strict(model: nn.Module, path: str | Path) -> None:
    """Load released weights (``<name>.safetensors``, its ``.json``, or a ``.pt`` state dict; local, or a Hub file
    such as ``microsoft/TRELLIS-image-large/ckpts/<name>.safetensors`` with its ``.json``) into ``model``, naming
    the first key or shape that does not fit."""
    from lightning_lora import hub
    from lightning_lora.models.trellis.loading import check_state_dict, read_state_dict

    spec = str(path)
    if spec.endswith(".json"):
        spec = spec[: -len(".json")] + ".safetensors"
    elif hub.is_hub_name(spec) and not Path(spec).suffix:  # a TRELLIS stem, as its from_pretrained takes
        spec += ".safetensors"
    path = hub.resolve(spec, key="model.ckpt", companions=(".json",) if spec.endswith(".safetensors") else ())
    if not path.is_file():
        raise UserError(f"model.ckpt: checkpoint not found: {path}")
    state = read_state_dict(path)
    check_state_dict(model, state, path)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})


def fill_zero_weights(model: nn.Module, std: float, seed: int = 0) -> None:
    """Give every all-zero weight matrix N(0, std) entries (deterministically)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def takes_sparse_voxels(denoiser: type[nn.Module] | nn.Module) -> bool:
    """Structured-latent denoisers take sparse voxels; the sparse-structure denoiser a dense grid."""
    from lightning_lora.models.trellis import SparseStructureFlowModel

    cls = denoiser if isinstance(denoiser, type) else type(denoiser)
    return not issubclass(cls, SparseStructureFlowModel)


def latent_of(denoiser: type[nn.Module] | nn.Module) -> str:
    """The latent a denoiser trains on, as ``data.kind`` names it: ``slat`` (sparse) or ``ss`` (dense)."""
    return "slat" if takes_sparse_voxels(denoiser) else "ss"


# --------------------------------------------------------------------------- flow matching pieces
def sample_t(n: int, schedule: str, mean: float, std: float, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    if schedule == "uniform":
        return torch.rand(n, generator=generator).to(device)
    return torch.sigmoid(torch.randn(n, generator=generator) * std + mean).to(device)


def noise_and_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sigma_min: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for rows of ``x0`` with per-row ``t`` (broadcast over trailing dims)."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * eps
    return x_t, (1 - sigma_min) * eps - x0


def euler_sample(model: nn.Module, noise: Any, cond: torch.Tensor, steps: int = 25, cfg_strength: float = 3.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), rescale_t: float = 1.0, sigma_min: float = 1e-5
                 ) -> Any:
    """Euler over the flow from t=1 (noise) to t=0 with classifier-free guidance inside ``cfg_interval``.

    ``noise`` is a dense tensor or a sparse tensor (anything with ``replace(feats)``/``feats``); returns the
    same kind with the sampled latent.
    """
    sparse = hasattr(noise, "feats")
    x = noise
    ts = torch.linspace(1, 0, steps + 1)
    ts = rescale_t * ts / (1 + (rescale_t - 1) * ts)
    neg = torch.zeros_like(cond)
    batch = cond.shape[0]
    for t, t_prev in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        t_in = torch.full((batch,), 1000 * t, device=cond.device)
        v = _values(model(x, t_in, cond), sparse)
        if cfg_strength > 0 and cfg_interval[0] <= t <= cfg_interval[1]:
            v = (1 + cfg_strength) * v - cfg_strength * _values(model(x, t_in, neg), sparse)
        x = x.replace(x.feats - (t - t_prev) * v) if sparse else x - (t - t_prev) * v
    return x


def _values(out: Any, sparse: bool) -> torch.Tensor:
    return out.feats if sparse else out


# --------------------------------------------------------------------------- image conditioning
class DinoImageEncoder(nn.Module):
    """Frozen DINOv2(-with-registers) condition encoder, as TRELLIS's ``ImageConditionedMixin.encode_image``.

    Images [B, 3, H, W] in [0, 1] (RGB composited on black) are resized to ``image_size`` when they are not
    that size already, normalised with the ImageNet mean/std, and run through the model; the tokens are the
    last block's output before the model's final norm (DINOv2's ``x_prenorm``: CLS, register and patch
    tokens) under a layer norm without affine parameters. A 518-pixel image gives [B, 1374, 1024] with
    DINOv2-L/14 with registers. The model stays in eval mode with gradients off; it is never adapted.
    """

    def __init__(self, pretrained: str | Path | None = None, image_size: int = 518, model: nn.Module | None = None
                 ) -> None:
        super().__init__()
        if not int(image_size) > 0:
            raise UserError(f"model.image_encoder.image_size={image_size} must be a positive number of pixels")
        self.image_size = int(image_size)
        self.pretrained = str(pretrained) if pretrained else None
        self.model = model if model is not None else self._load(self.pretrained)
        config = getattr(self.model, "config", None)
        if getattr(config, "model_type", None) not in DINO_MODEL_TYPES:
            raise UserError(f"model.image_encoder: {type(self.model).__name__} is not a DINOv2 model")
        self.hidden_size = int(config.hidden_size)
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load(path: str | None) -> nn.Module:
        from lightning_lora import hub

        if not path:
            raise UserError("model.image_encoder.pretrained is required: a DINOv2-with-registers folder or Hub id "
                            f"(e.g. {DINO_HUB_ID})")
        folder = hub.resolve(path, key="model.image_encoder.pretrained", allow_patterns=("*.json", "*.safetensors"))
        if not (folder / "config.json").is_file():
            what = "no such directory" if not folder.is_dir() else "no Hugging Face model folder (config.json) at"
            raise UserError(f"model.image_encoder.pretrained: {what} {folder}")
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"model.image_encoder.pretrained: unreadable config {folder / 'config.json'} "
                            f"({' '.join(str(exc).split())})") from None
        if config.model_type not in DINO_MODEL_TYPES:
            raise UserError(f"model.image_encoder.pretrained: {folder} holds a {config.model_type!r} model, not "
                            f"DINOv2 ({' or '.join(DINO_MODEL_TYPES)})")
        from lightning_lora.models.embedders import quiet_transformers

        try:
            with quiet_transformers():
                return AutoModel.from_pretrained(folder, config=config, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"model.image_encoder.pretrained: cannot load the weights in {folder} "
                            f"({' '.join(str(exc).split())})") from None

    def train(self, mode: bool = True) -> DinoImageEncoder:
        return super().train(False)  # frozen: no dropout or drop-path, whatever the module around it does

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"condition images must be [B, 3, H, W]; got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        hidden = self.model.encoder(self.model.embeddings(x.to(dtype)))[0]  # the last block, before the final norm
        tokens = F.layer_norm(hidden.float(), hidden.shape[-1:])
        return tokens.to(images.dtype) if images.is_floating_point() else tokens


def build_image_encoder(spec: Any) -> DinoImageEncoder | None:
    """``model.image_encoder``: None, a folder path, ``{pretrained: PATH, image_size: 518}`` or a module."""
    if spec is None or isinstance(spec, DinoImageEncoder):
        return spec
    if isinstance(spec, str | Path):
        return DinoImageEncoder(spec)
    if isinstance(spec, nn.Module):
        return DinoImageEncoder(model=spec)
    if isinstance(spec, Mapping):
        known = {"pretrained", "image_size"}
        if unknown := sorted(set(spec) - known):
            raise UserError(f"model.image_encoder.{unknown[0]} is unknown; valid: {', '.join(sorted(known))}")
        if "pretrained" in spec and not spec["pretrained"]:
            return None  # {pretrained: null}: off, like image_encoder: null
        return DinoImageEncoder(spec.get("pretrained"), spec.get("image_size") or 518)
    raise UserError(f"model.image_encoder must be a folder path or {{pretrained: PATH, image_size: N}}; got {spec!r}")


# --------------------------------------------------------------------------- the head
def checked_coords(array: np.ndarray, res: int, where: str) -> torch.Tensor:
    """Voxel coords [N, 3] inside a ``res``³ grid as [N, 4] (batch index 0 + xyz); else one line naming ``where``."""
    xyz = torch.from_numpy(np.asarray(array)).long()
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0 or xyz.min() < 0 or xyz.max() >= res:
        span = f", range [{int(xyz.min())}, {int(xyz.max())}]" if xyz.numel() else ""
        raise UserError(f"{where}: coords must be a non-empty [N, 3] inside [0, {res}); got shape "
                        f"{tuple(xyz.shape)}{span}")
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)


def _colour_rule(spec: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``model.previews.colours``: ``pca`` (``data.trellis.feature_colours``) or the dotted path of a function
    features [N, C] -> colours [N, 3] in [0, 1], resolved at once so a wrong name fails before any weight loads."""
    if spec == "pca":
        from lightning_lora.data.trellis import feature_colours

        return feature_colours
    if (rule := dotted_function(spec)) is not None:
        return rule
    raise UserError(f"model.previews.colours={spec!r} is unknown; valid: pca (each sample's principal feature "
                    "directions) or the dotted path of a function features [N, C] -> colours [N, 3] in [0, 1]")


class FlowMatching3DHead(TaskHead):
    """Rectified-flow LoRA training of a TRELLIS denoiser (dense sparse-structure or sparse structured-latent).

    ``denoiser`` is the model (built by Hydra from the preset's class and args); ``ckpt`` loads released
    weights into it with every key and shape checked (the tiny presets' is a random stand-in, ``build_tiny``).
    ``latent`` (``ss`` | ``slat``) says which latent that denoiser trains on; the data presets' ``kind`` follows
    it, and a value that does not fit the denoiser is an error.

    ``image_encoder`` (``{pretrained: PATH, image_size: 518}``, see ``DinoImageEncoder``) encodes batches that
    carry condition images (``cond_image``, from ``data.cond=images``) on the fly; batches with precomputed
    tokens (``cond``) do not need it. The encoder is frozen, never adapted, and not in adapter files or
    resumable checkpoints (those hold trainable tensors only).
    """

    family: ClassVar[str] = "flow3d"
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"
    fsdp_blocks: ClassVar[tuple[str, ...]] = ("ModulatedTransformerCrossBlock", "ModulatedSparseTransformerCrossBlock",
                                              "SparseResBlock3d")
    sample_command: ClassVar[str | None] = "flow3d"
    sample_help: ClassVar[str] = "TRELLIS latents from condition tokens (Euler flow sampler with CFG)"
    modelspec_architecture: ClassVar[str] = "trellis/lora"

    def __init__(
        self,
        denoiser: nn.Module,
        ckpt: str | None = None,
        targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
        sigma_min: float = 1e-5,
        t_schedule: str = "logit_normal",
        t_mean: float = 1.0,
        t_std: float = 1.0,
        p_uncond: float = 0.1,
        cond_noise_schedule: str = "none",
        cond_noise_std: float = 0.1,
        cond_noise_std_min: float = 0.0,
        cond_noise_std_max: float = 0.2,
        cond_noise_at_inference: bool = False,
        name: str | None = None,
        image_encoder: Any = None,
        latent: str | None = None,
        previews: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        choice(t_schedule, "model.t_schedule", T_SCHEDULES)
        choice(cond_noise_schedule, "model.cond_noise_schedule", COND_NOISE_SCHEDULES)
        fraction(p_uncond, "model.p_uncond")
        if latent is not None and choice(latent, "model.latent", LATENTS) != latent_of(denoiser):
            raise UserError(f"model.latent={latent} but model.denoiser is a {type(denoiser).__name__}, which trains "
                            f"on {latent_of(denoiser)} latents")
        self.previews = dict(previews or {})
        if self.previews.get("decode", "demo") != "demo":
            raise UserError(f"model.previews.decode={self.previews['decode']!r} is unknown; valid: demo (the demo's "
                            "stand-in SS encoding, inverted)")
        self._colours = _colour_rule(self.previews.get("colours", "pca"))
        self.denoiser = denoiser
        self.ckpt = str(ckpt) if ckpt else None
        if self.ckpt:
            load_checkpoint_strict(denoiser, self.ckpt)
        self.targets = list(targets)
        self.sigma_min, self.t_schedule, self.t_mean, self.t_std = sigma_min, t_schedule, t_mean, t_std
        self.p_uncond = p_uncond
        self.cond_noise = (cond_noise_schedule, cond_noise_std, cond_noise_std_min, cond_noise_std_max)
        if not isinstance(cond_noise_at_inference, bool):
            raise UserError(f"model.cond_noise_at_inference={cond_noise_at_inference!r} must be true or false")
        self.cond_noise_at_inference = cond_noise_at_inference
        self.name = name or type(denoiser).__name__
        self.image_encoder = build_image_encoder(image_encoder)
        cond_channels = getattr(denoiser, "cond_channels", None)
        if self.image_encoder is not None and cond_channels and self.image_encoder.hidden_size != cond_channels:
            raise UserError(
                f"model.image_encoder gives {self.image_encoder.hidden_size}-dim tokens but the denoiser takes "
                f"cond_channels={cond_channels} (the released models take DINOv2-L/14 with registers: 1024)"
            )

    # ------------------------------------------------------------------ TaskHead
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def default_targets(self) -> dict[str, list[str]]:
        return {"denoiser": self.targets}

    def base_model_identity(self) -> dict[str, str]:
        identity = {"name": self.name, **({"path": self.ckpt} if self.ckpt else {})}
        if self.image_encoder is not None and self.image_encoder.pretrained:
            identity["image_encoder"] = self.image_encoder.pretrained
        return identity

    def enable_gradient_checkpointing(self) -> None:
        if not hasattr(self.denoiser, "use_checkpoint"):
            super().enable_gradient_checkpointing()
        self.denoiser.use_checkpoint = True
        for block in self.denoiser.modules():
            if hasattr(block, "use_checkpoint"):
                block.use_checkpoint = True

    @classmethod
    def check_adapter(cls, spec: Any, preset: Mapping[str, Any]) -> None:
        refuse_dora(spec, "the TRELLIS LoRA fork's lora_ckpts/ files (loaded into a plain LoRA config)")

    @classmethod
    def batch_kinds(cls, preset: Mapping[str, Any]) -> tuple[str, ...]:
        """The preset's latent (from its denoiser class) with condition tokens; with condition images too when the
        preset has an image encoder (``image_encoder.pretrained``) to encode them."""
        from hydra.utils import get_class

        from lightning_lora.data.trellis import trellis_batch_kind

        latent = latent_of(get_class(str(preset["denoiser"]["_target_"])))
        encoder = preset.get("image_encoder")
        encodes = bool(encoder.get("pretrained") if isinstance(encoder, Mapping) else encoder)
        return tuple(trellis_batch_kind(latent, cond) for cond in (("tokens", "images") if encodes else ("tokens",)))

    @classmethod
    def build_tiny(cls, path: Path, preset: Mapping[str, Any]) -> str:
        """A random stand-in base of the preset's denoiser, saved once as a TRELLIS checkpoint pair
        (``<path>/<class>-<hash of its config>/denoiser.json + .safetensors``, so another size gets its own
        file): seeded, and the layers TRELLIS initialises to zero (adaLN gates, output layer) are filled with
        N(0, ``TINY_BASE_STD``²) so the base is not a constant function that no adapter could change."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from lightning_lora.fileio import atomic_directory
        from lightning_lora.models.trellis.loading import save_trellis_model

        spec = OmegaConf.to_container(preset["denoiser"], resolve=True) if OmegaConf.is_config(
            preset["denoiser"]) else dict(preset["denoiser"])
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        folder = path / f"{str(spec['_target_']).rsplit('.', 1)[-1]}-{digest}"
        weights = folder / "denoiser.safetensors"
        if not weights.is_file():
            torch.manual_seed(0)  # the resolver keeps the caller's random state (config.tiny_base)
            denoiser = instantiate(spec)
            fill_zero_weights(denoiser, TINY_BASE_STD)
            with atomic_directory(folder) as tmp:
                save_trellis_model(denoiser, tmp / "denoiser")
        return str(weights)

    # ------------------------------------------------------------------ conditioning
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Condition tokens [B, T, D] for images [B, 3, H, W] in [0, 1] (RGB composited on black)."""
        if self.image_encoder is None:
            raise UserError("the batch holds condition images (data.cond=images) but the model has no image "
                            "encoder; set model.image_encoder.pretrained=<DINOv2-with-registers folder> or use "
                            "data.cond=tokens")
        return self.image_encoder(images)

    def cond_tokens(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch's condition tokens: precomputed (``cond``) or encoded from ``cond_image``."""
        if "cond" in batch:
            return batch["cond"]
        if "cond_image" in batch:
            return self.encode_images(batch["cond_image"])
        raise UserError(f"a {self.family} batch needs 'cond' (tokens) or 'cond_image'; it has {', '.join(batch)}")

    def condition(self, cond: torch.Tensor, generator: torch.Generator | None = None, train: bool = True
                  ) -> torch.Tensor:
        """Noisy conditioning (train only), then the classifier-free-guidance drop to all-zero tokens."""
        if not train:
            return cond
        cond = self.noisy(cond, generator)
        if self.p_uncond > 0:
            keep = (torch.rand(cond.shape[0], generator=generator) >= self.p_uncond).to(cond.device)
            cond = cond * keep.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
        return cond

    def noisy(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``cond`` plus Gaussian noise of a per-sample σ from ``cond_noise_schedule`` (``none``: unchanged)."""
        schedule, std, lo, hi = self.cond_noise
        if schedule == "none":
            return cond
        batch = cond.shape[0]
        if schedule == "fixed":
            sigma = torch.full((batch,), std)
        elif schedule == "uniform":
            sigma = lo + (hi - lo) * torch.rand(batch, generator=generator)
        else:  # lognormal around std, kept inside [lo, hi]
            log_sigma = math.log(max(std, 1e-8)) + LOGNORMAL_SPREAD * torch.randn(batch, generator=generator)
            sigma = log_sigma.exp().clamp(lo, hi)
        noise = torch.randn(cond.shape, generator=generator).to(cond.device)
        return cond + sigma.to(cond.device).view(-1, *([1] * (cond.ndim - 1))) * noise

    # ------------------------------------------------------------------ objective
    @property
    def sparse(self) -> bool:
        """Structured-latent models take sparse voxels; the sparse-structure model a dense grid."""
        return takes_sparse_voxels(self.denoiser)

    def flow_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                  train: bool = True) -> torch.Tensor:
        if ("x0" in batch) == self.sparse:
            kind, need = ("dense", "slat") if "x0" in batch else ("sparse", "ss")
            raise UserError(f"{self.name} cannot train on {kind} latents; use data.kind={need}")
        cond = self.condition(self.cond_tokens(batch), generator, train)
        n = cond.shape[0]
        t = sample_t(n, self.t_schedule, self.t_mean, self.t_std, generator, cond.device)
        if "x0" in batch:  # dense sparse-structure latent [B, C, R, R, R]
            x0 = batch["x0"]
            eps = torch.randn(x0.shape, generator=generator).to(x0)
            x_t, target = noise_and_target(x0, t, eps, self.sigma_min)
            pred = self.denoiser(x_t, 1000 * t, cond)
        else:  # sparse structured latent: per-voxel t from the voxel's batch index
            from lightning_lora.models.trellis import SparseTensor

            coords, feats = batch["coords"], batch["feats"]
            eps = torch.randn(feats.shape, generator=generator).to(feats)
            x_t, target = noise_and_target(feats, t[coords[:, 0]], eps, self.sigma_min)
            pred = self.denoiser(SparseTensor(coords, x_t, batch_size=n), 1000 * t, cond).feats
        return F.mse_loss(pred.float(), target.float())

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> int:
        return (batch["cond"] if "cond" in batch else batch["cond_image"]).shape[0]

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return StepOutput(self.flow_loss(batch), batch_size=self.batch_rows(batch))

    def validation_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Fixed t, noise and no condition dropout: the validation loss is comparable across evaluations.
        generator = torch.Generator().manual_seed(1234)
        return {"loss": self.flow_loss(batch, generator, train=False)}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, coords: torch.Tensor | None = None, steps: int = 25,
               cfg_strength: float = 3.0, cfg_interval: tuple[float, float] = (0.0, 1.0), rescale_t: float = 1.0,
               seed: int = 0) -> Any:
        """Sample latents for ``cond`` tokens: dense (sparse-structure) or on ``coords`` [N, 4] (structured)."""
        generator = torch.Generator().manual_seed(seed)
        if self.cond_noise_at_inference:  # the noisy-conditioning trainers' option: sample from noisy tokens too
            cond = self.noisy(cond, generator).to(cond.dtype)
        model = self.denoiser
        channels = getattr(model, "in_channels", None) or model.out_channels
        if coords is None:
            res = model.resolution
            noise = torch.randn((cond.shape[0], channels, res, res, res), generator=generator).to(cond)
        else:
            from lightning_lora.models.trellis import SparseTensor

            feats = torch.randn((coords.shape[0], channels), generator=generator).to(cond)
            noise = SparseTensor(coords.to(cond.device), feats, batch_size=cond.shape[0])
        return euler_sample(model, noise, cond, steps, cfg_strength, tuple(cfg_interval), rescale_t, self.sigma_min)

    def voxel_rgb(self, feats: np.ndarray) -> np.ndarray:
        """[N, 3] in [0, 1]: structured-latent features [N, C] as the colours pictures draw them
        (``model.previews.colours``: their principal directions, or the preset's own decoder)."""
        rgb = np.asarray(self._colours(np.asarray(feats)), dtype=np.float32)
        if rgb.shape != (len(feats), 3):
            raise UserError(f"model.previews.colours gave colours of shape {list(rgb.shape)} for {len(feats)} voxels; "
                            "it must map features [N, C] to colours [N, 3] in [0, 1]")
        return np.clip(rgb, 0.0, 1.0)

    # ------------------------------------------------------------------ previews (callbacks.SamplePreviews)
    def preview_conditions(self) -> list[torch.Tensor]:
        """The fixed condition token sets of the previews, each [1, T, D]: ``previews.cond`` files (tokens
        ``.npz``, or images when the head has an image encoder), then ``previews.num_random`` seeded random sets."""
        conds = []
        for path in self.previews.get("cond") or []:
            if Path(path).suffix.lower() in IMAGE_SUFFIXES:
                from lightning_lora.data.trellis import read_cond_image

                if self.image_encoder is None:
                    raise UserError(f"model.previews.cond: {path} is an image; set model.image_encoder.pretrained "
                                    "to encode it, or give tokens (.npz with tokens [T, D])")
                conds.append(self.encode_images(read_cond_image(Path(path), self.image_encoder.image_size)[None]))
                continue
            tokens = torch.from_numpy(options.npz_array(str(path), "tokens", "model.previews.cond")).float()
            conds.append(tokens[None] if tokens.ndim == 2 else tokens[:1])
        width = getattr(self.denoiser, "cond_channels", None)
        count = int(self.previews.get("num_random", 0) or 0)
        for i in range(count if width else 0):
            g = torch.Generator().manual_seed(1000 + i)
            conds.append(torch.randn(1, int(self.previews.get("num_tokens", 8)), int(width), generator=g))
        return conds

    def preview_coords(self, count: int) -> list[torch.Tensor]:
        """The voxels each of ``count`` preview conditions samples a structured latent on, each [N, 4] (batch index
        0 + xyz): ``previews.coords`` files (coords [N, 3], e.g. a data root's latents), one per condition, or one
        for all; [] when none is given."""
        paths = [str(p) for p in self.previews.get("coords") or []]
        if paths and len(paths) not in (1, count):
            raise UserError(f"model.previews.coords names {len(paths)} files for {count} preview conditions: give one "
                            "(used for every condition) or one per condition (previews.cond files, then num_random)")
        res = self.denoiser.resolution
        voxels = [checked_coords(options.npz_array(p, "coords", "model.previews.coords"), res, p) for p in paths]
        return voxels * count if len(voxels) == 1 else voxels

    def preview_images(self) -> torch.Tensor | None:
        """Voxel pictures (front, side and top projections) of samples, a row per condition and a column per seed,
        [conds, seeds, 3, H, W]; None without conditions. Sparse-structure samples are drawn through the demo's
        stand-in SS encoding inverted (``data.trellis.decode_demo_ss``, which the tiny presets and data=trellis_demo
        use); structured latents are sampled on ``previews.coords`` (none given: None) and drawn in the colours of
        their features (``voxel_rgb``)."""
        from lightning_lora.data.trellis import decode_demo_ss, voxel_colour_picture, voxel_picture

        conds = self.preview_conditions()
        voxels = self.preview_coords(len(conds)) if self.sparse else []
        if not conds or (self.sparse and not voxels):
            return None
        device = next(self.denoiser.parameters()).device
        seeds = [int(s) for s in self.previews.get("seeds") or [0]]
        steps, cfg_strength = int(self.previews.get("steps", 10)), float(self.previews.get("cfg_strength", 3.0))
        rows = []
        for i, cond in enumerate(conds):
            row = []
            for seed in seeds:
                latent = self.sample(cond.to(device), coords=voxels[i] if self.sparse else None, steps=steps,
                                     cfg_strength=cfg_strength, seed=seed)
                if self.sparse:
                    rgb = self.voxel_rgb(latent.feats.float().cpu().numpy())
                    picture = voxel_colour_picture(voxels[i][:, 1:].numpy(), rgb, self.denoiser.resolution, panel=64)
                    row.append(torch.from_numpy(picture))
                else:
                    picture = voxel_picture(decode_demo_ss(latent[0].float().cpu().numpy()), panel=64)
                    row.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).expand(3, -1, -1))
            rows.append(torch.stack(row))
        return torch.stack(rows)

    # ------------------------------------------------------------------ TRELLIS-style adapter files
    def export_adapters(self, snapshot: Path, adapters: dict[str, PeftModel], step: int,
                        run_dir: Path | None = None) -> list[Path]:
        """``<run>/lora_ckpts/denoiser_lora_stepNNNNNNN.safetensors`` (PEFT keys, r/alpha/targets in metadata) and
        its ``.pt`` twin, written as the LoRA fork's trainer writes it (zadaianchuk/TRELLIS
        ``LoRAMixin.save_lora_only``): ``torch.save`` of the PeftModel's own ``state_dict()`` entries holding
        ``lora_`` or ``modules_to_save`` (``base_model.model.<path>.lora_A.default.weight``), every tensor of which
        the fork's ``load_lora_weights`` loads with ``load_state_dict`` on a freshly adapted model (``strict=False``,
        as seed 000 advises: ``strict=True`` also demands the frozen base weights, which no LoRA-only file holds)."""
        if run_dir is None or "denoiser" not in adapters:
            return []
        stem = run_dir / "lora_ckpts" / f"denoiser_lora_step{step:07d}"
        identity = self.base_model_identity()
        return [save_adapter_file(stem.with_suffix(".safetensors"), {"": adapters["denoiser"]}, family=self.family,
                                  base_model=identity, extra=self.file_metadata(step)),
                save_lora_state_dict(adapters["denoiser"], stem.with_suffix(".pt"))]

    @classmethod
    def published_files(cls, run_dir: Path, snapshot: Path, step: int | None) -> dict[str, Path]:
        """The snapshot's ``lora_ckpts/denoiser_lora_stepNNNNNNN.{safetensors,pt}`` (written under the run)."""
        if step is None:
            return {}
        stem = run_dir / "lora_ckpts" / f"denoiser_lora_step{step:07d}"
        return {p.name: p for p in (stem.with_suffix(".safetensors"), stem.with_suffix(".pt")) if p.is_file()}

    @classmethod
    def card_usage(cls, card: CardContext) -> list[tuple[str, str]]:
        """The TRELLIS LoRA fork's way (``load_state_dict`` of the ``.pt`` on a freshly adapted denoiser) and PEFT's."""
        config = json.loads((card.snapshot / "denoiser" / "adapter_config.json").read_text()) \
            if (card.snapshot / "denoiser" / "adapter_config.json").is_file() else {}
        pt = next((name for name in card.files if name.endswith(".pt")), None)
        usage = []
        if pt is not None:
            usage.append(("TRELLIS LoRA fork", "\n".join([
                "import torch",
                "from huggingface_hub import hf_hub_download",
                "from peft import LoraConfig, get_peft_model",
                "",
                "# denoiser: the TRELLIS flow model the adapter was trained on, with its released weights loaded",
                f"model = get_peft_model(denoiser, LoraConfig(r={config.get('r')}, "
                f"lora_alpha={config.get('lora_alpha')}, target_modules={config.get('target_modules')!r}))",
                f'state = torch.load(hf_hub_download("{card.repo_id}", "{pt}"), weights_only=True)',
                "model.load_state_dict(state, strict=False)  # LoRA tensors only: the base weights stay"])))
        usage.append(("PEFT", "\n".join([
            "from peft import PeftModel",
            "",
            "# denoiser: the TRELLIS flow model the adapter was trained on, with its released weights loaded",
            f'model = PeftModel.from_pretrained(denoiser, "{card.repo_id}", subfolder="denoiser")'])))
        return usage

    # ------------------------------------------------------------------ lightning-lora sample flow3d
    @classmethod
    def add_sample_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default="trellis_slat_tiny",
                            help="model preset (trellis_ss, trellis_slat, *_tiny)")
        parser.add_argument("--ckpt", help="base weights (required by the released presets)")
        parser.add_argument("--lora", help="adapter file or PEFT directory for the denoiser, or a run's "
                                                   "adapters/final")
        parser.add_argument("--scale", type=options.finite_float, default=1.0, help="LoRA strength (1.0 = as trained)")
        parser.add_argument("--cond", required=True, help=".npz with tokens [T, D] (or [B, T, D]), or an image "
                                                          "(.png/.jpg) with --image-encoder")
        parser.add_argument("--image-encoder", help="local DINOv2-with-registers folder that encodes an image --cond")
        parser.add_argument("--image-size", type=int, default=None,
                            help="pixels the image is resized to for the encoder (default: the preset's, 518)")
        parser.add_argument("--coords", help=".npz with coords [N, 3]: the voxels a structured latent is sampled on")
        parser.add_argument("--steps", type=options.positive_int, default=25)
        parser.add_argument("--cfg", type=options.finite_float, default=3.0, help="classifier-free guidance strength")
        parser.add_argument("--cfg-interval", type=options.finite_float, nargs=2, default=[0.0, 1.0],
                            metavar=("LO", "HI"))
        parser.add_argument("--rescale-t", type=options.finite_float, default=1.0)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--out", required=True, help="output .npz (latent, or coords + feats)")
        pictures = parser.add_mutually_exclusive_group()
        pictures.add_argument("--png", help="also draw the sampled voxels (front, side, top) here; by default "
                                            "<out>.png for the demo presets (*_tiny, *_demo)")
        pictures.add_argument("--no-png", action="store_true", help="no picture, even for a tiny preset")
        parser.add_argument("--overwrite", action="store_true")

    @classmethod
    def run_sample(cls, args: argparse.Namespace) -> int:
        """Sample TRELLIS latents with an optional LoRA: cond tokens (or an image) in, latents (.npz) and, for the
        demo's tiny presets or with --png, a picture of the sampled voxels out."""
        from hydra.utils import get_class, instantiate
        from omegaconf import open_dict

        from lightning_lora.adapters import load_lora_weights, set_adapter_scale
        from lightning_lora.adapters.finite import require_finite
        from lightning_lora.config import compose_config
        from lightning_lora.data.trellis import (
            colour_image,
            decode_demo_ss,
            read_cond_image,
            voxel_colour_picture,
            voxel_picture,
            write_npz,
        )
        from lightning_lora.data.trellis import png_bytes as image_png_bytes
        from lightning_lora.fileio import atomic_write_bytes

        out = Path(args.out)
        options.check_out(out, args.overwrite)
        cond_path = Path(args.cond)
        image_cond = cond_path.suffix.lower() in IMAGE_SUFFIXES
        if image_cond and not args.image_encoder:
            raise UserError(f"--cond {cond_path} is an image: pass --image-encoder DIR (a local DINOv2-with-registers "
                            "folder) to encode it, or give precomputed tokens (.npz with tokens [T, D])")
        if image_cond and not cond_path.is_file():
            raise UserError(f"--cond: file not found: {cond_path}")
        cfg = compose_config([f"model={args.model}", *([f"model.ckpt={args.ckpt}"] if args.ckpt else [])])
        if args.image_encoder:
            with open_dict(cfg):
                cfg.model.image_encoder = {"pretrained": str(args.image_encoder),
                                           "image_size": args.image_size or cfg.model.image_encoder.image_size}
        dense = not takes_sparse_voxels(get_class(cfg.model.denoiser._target_))
        # the presets whose latents are the procedural demo sets' stand-in encoding (tiny ones, the demo base)
        demo = args.model.endswith(("_tiny", "_demo"))
        png = Path(args.png) if args.png else out.with_suffix(".png") if demo and not args.no_png else None
        if png is not None:
            if dense and not demo:
                raise UserError(f"--png: {args.model} samples a sparse-structure latent, which becomes voxels only "
                                "through TRELLIS's SS decoder (not part of this tool); the picture is drawn for the "
                                "demo presets (*_tiny, *_demo), whose stand-in encoding it inverts")
            options.check_out(png, args.overwrite, "--png")
        head = instantiate(cfg.model)
        if args.lora:
            from lightning_lora.adapters.formats import read_lora

            read_lora(args.lora)  # a damaged or unsafe file fails here in one line that names it
            load_lora_weights(head.denoiser, args.lora)
            set_adapter_scale(head.denoiser, args.scale)
        head.eval()
        if image_cond:
            cond = head.encode_images(read_cond_image(cond_path, head.image_encoder.image_size)[None])
        else:
            cond = torch.from_numpy(options.npz_array(args.cond, "tokens", "--cond")).float()
            cond = cond[None] if cond.ndim == 2 else cond
        coords = None
        if head.sparse:
            coords = cls._sample_coords(args, head.denoiser.resolution, cond)
        latent = head.sample(cond, coords=coords, steps=args.steps, cfg_strength=args.cfg,
                             cfg_interval=tuple(args.cfg_interval), rescale_t=args.rescale_t, seed=args.seed)
        arrays = {"coords": coords[:, 1:].numpy(), "feats": latent.feats.float().numpy()} if coords is not None else {
            "latent": latent.float().numpy()}
        require_finite(((k, torch.from_numpy(v)) for k, v in arrays.items()), f"the sampled {out.name}:",
                       hint=f" (--scale {args.scale:g}, --cfg {args.cfg:g}: too large?); nothing was written")
        write_npz(out, **arrays)
        print(f"wrote {out} ({', '.join(f'{k} {tuple(v.shape)}' for k, v in arrays.items())})")
        if png is not None:
            if coords is not None:  # a structured latent lives on the given voxels: its features are the sample
                rgb = head.voxel_rgb(arrays["feats"])
                picture = colour_image(voxel_colour_picture(arrays["coords"], rgb, head.denoiser.resolution))
                drawn = f"{len(rgb)} voxels coloured by model.previews.colours={head.previews.get('colours', 'pca')}"
            else:  # the demo's stand-in SS encoding, inverted: occupancy per sampled latent
                grids = [decode_demo_ss(item) for item in arrays["latent"]]
                picture = voxel_picture(grids)
                drawn = f"{', '.join(str(int(g.sum())) for g in grids)} voxels"
            atomic_write_bytes(png, image_png_bytes(picture))
            print(f"wrote {png} ({picture.width}x{picture.height}: front, side and top views of {drawn})")
        return 0

    # ------------------------------------------------------------------ lightning-lora encode-cond
    @classmethod
    def commands(cls) -> tuple[HeadCommand, ...]:
        return (HeadCommand("encode-cond", "precompute a TRELLIS data root's DINOv2 condition tokens "
                            "(cond_tokens/<sha256>.npz, read with data.cond=tokens)", cls.add_encode_cond_arguments,
                            cls.run_encode_cond),)

    @classmethod
    def add_encode_cond_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("root", help="a TRELLIS data root: metadata.csv and renders_cond/<sha256>/")
        parser.add_argument("--image-encoder", metavar="ID_OR_DIR",
                            help="DINOv2 with registers: a Hugging Face Hub id or a local folder (default: the "
                                 f"{ENCODE_COND_PRESET} preset's model.image_encoder.pretrained)")
        parser.add_argument("--image-size", type=int, default=None,
                            help="pixels each view is resized to (default: the preset's, 518)")
        parser.add_argument("--device", default="cpu", help="cpu or cuda (the encoder's forward)")
        parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                            help="the stored tokens' type (float16 halves the disk; training reads either)")
        parser.add_argument("--overwrite", action="store_true",
                            help="encode objects whose tokens exist too (default: skip them, so a run resumes)")

    @classmethod
    def run_encode_cond(cls, args: argparse.Namespace) -> int:
        """Encode the first condition render of every rendered object of ``args.root`` (the view validation reads;
        ``data.cond=images`` draws a random one per step instead) as ``data.cond=images`` would, and write its
        tokens [T, D] to ``cond_tokens/<sha256>.npz``, each file atomically; objects already written are skipped."""
        from tqdm.auto import tqdm

        from lightning_lora.data.trellis import (
            COND_DIR,
            RENDERS_DIR,
            cond_views,
            read_cond_image,
            rendered_objects,
            write_npz,
        )

        root = Path(args.root).expanduser()
        if not root.is_dir():
            raise UserError(f"encode-cond: no such directory: {root}")
        objects = rendered_objects(root)
        if not objects:
            raise UserError(f"encode-cond: {root / 'metadata.csv'} lists no rendered objects")
        out = root / COND_DIR
        todo = [sha for sha in objects if args.overwrite or not (out / f"{sha}.npz").is_file()]
        shape = ""
        if todo:
            encoder = cls._encode_cond_encoder(args).to(options.device(args.device))
            for sha in tqdm(todo, desc="encode-cond", unit="object", file=sys.stderr, disable=None):
                view = cond_views(root / RENDERS_DIR / sha)[0]
                image = read_cond_image(view, encoder.image_size)[None].to(encoder.mean.device)
                tokens = encoder(image)[0].to(getattr(torch, args.dtype)).cpu().numpy()
                write_npz(out / f"{sha}.npz", tokens=tokens)
                shape = f" of tokens {list(tokens.shape)} ({args.dtype})"
        print(f"encoded {len(todo)} objects{shape}, skipped {len(objects) - len(todo)} already encoded; {out}")
        return 0

    @staticmethod
    def _encode_cond_encoder(args: argparse.Namespace) -> DinoImageEncoder:
        """The DINOv2 of ``--image-encoder`` (else the released preset's), at ``--image-size`` (else the preset's)."""
        from lightning_lora.config import compose_config

        preset = compose_config([f"model={ENCODE_COND_PRESET}"]).model.image_encoder
        pretrained = args.image_encoder or preset.pretrained
        if not pretrained:
            raise UserError("encode-cond: --image-encoder is required: a DINOv2-with-registers Hub id or local "
                            "folder (TRELLIS uses dinov2_vitl14_reg, e.g. facebook/dinov2-with-registers-large)")
        return DinoImageEncoder(pretrained, args.image_size or preset.image_size)

    @staticmethod
    def _sample_coords(args: argparse.Namespace, res: int, cond: torch.Tensor) -> torch.Tensor:
        """``--coords`` as [N, 4] (batch index 0 + xyz), checked against the grid and the condition."""
        if not args.coords:
            raise UserError(f"{args.model} samples on given voxels: pass --coords FILE.npz with coords [N, 3]")
        coords = checked_coords(options.npz_array(args.coords, "coords", "--coords"), res, f"--coords {args.coords}")
        if cond.shape[0] != 1:
            raise UserError(f"--coords holds one shape; --cond must be one [T, D] token set, got {tuple(cond.shape)}")
        return coords
