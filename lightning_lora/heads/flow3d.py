"""3D flow family: TRELLIS-style rectified-flow training of the sparse-structure and structured-latent denoisers.

Objective (as TRELLIS trains it): t ~ sigmoid(N(mean, std)) (logit-normal), x_t = (1 - t)·x0 + (σ_min +
(1 - σ_min)·t)·ε, target velocity v* = (1 - σ_min)·ε - x0, loss = mean squared error over every element (dense)
or every voxel feature of the batch (sparse). Classifier-free guidance is trained by replacing a sample's
condition with zeros with probability ``p_uncond``; noisy conditioning adds Gaussian noise to the condition
tokens before that drop (training only).

The condition tokens come with the batch (``cond``, precomputed) or are computed on the fly from condition
images (``cond_image``) by a frozen DINOv2-with-registers model loaded from a local folder
(``image_encoder``), as TRELLIS's image-conditioned trainers do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from lightning_lora.adapters import save_adapter_file
from lightning_lora.errors import UserError
from lightning_lora.heads.base import StepOutput, TaskHead

COND_NOISE_SCHEDULES = ("none", "fixed", "uniform", "lognormal")
T_SCHEDULES = ("logit_normal", "uniform")
DEFAULT_TARGETS = ("to_q", "to_kv", "to_out", "to_qkv")
DINO_MODEL_TYPES = ("dinov2_with_registers", "dinov2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint_strict(model: nn.Module, path: str | Path) -> None:
    """Load released weights (``<name>.safetensors``, its ``.json``, or a ``.pt`` state dict) into ``model``,
    naming the first key or shape that does not fit."""
    from lightning_lora.models.trellis.loading import check_state_dict, read_state_dict

    path = Path(path).expanduser()
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
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
        self.pretrained = str(Path(pretrained).expanduser()) if pretrained else None
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
        if not path:
            raise UserError("model.image_encoder.pretrained is required: a local DINOv2-with-registers folder "
                            "(e.g. a download of facebook/dinov2-with-registers-large)")
        folder = Path(path)
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
class FlowMatching3DHead(TaskHead):
    """Rectified-flow LoRA training of a TRELLIS denoiser (dense sparse-structure or sparse structured-latent).

    ``denoiser`` is the model (built by Hydra from the preset's class and args); ``ckpt`` loads released
    weights into it with every key and shape checked. Without a checkpoint, ``random_base_std > 0`` fills the
    layers TRELLIS initialises to zero (adaLN gates, output layer) so a random stand-in base is not a constant
    function that no adapter could change (the tiny presets use this).

    ``image_encoder`` (``{pretrained: PATH, image_size: 518}``, see ``DinoImageEncoder``) encodes batches that
    carry condition images (``cond_image``, from ``data.cond=images``) on the fly; batches with precomputed
    tokens (``cond``) do not need it. The encoder is frozen, never adapted, and not in adapter files or
    resumable checkpoints (those hold trainable tensors only).
    """

    family: ClassVar[str] = "flow3d"
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"

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
        name: str | None = None,
        random_base_std: float = 0.0,
        image_encoder: Any = None,
    ) -> None:
        super().__init__()
        if t_schedule not in T_SCHEDULES:
            raise UserError(f"model.t_schedule={t_schedule!r} is unknown; valid: {', '.join(T_SCHEDULES)}")
        if cond_noise_schedule not in COND_NOISE_SCHEDULES:
            valid = ", ".join(COND_NOISE_SCHEDULES)
            raise UserError(f"model.cond_noise_schedule={cond_noise_schedule!r} is unknown; valid: {valid}")
        if not 0.0 <= p_uncond < 1.0:
            raise UserError(f"model.p_uncond={p_uncond} must be in [0, 1)")
        self.denoiser = denoiser
        self.ckpt = str(ckpt) if ckpt else None
        if self.ckpt:
            load_checkpoint_strict(denoiser, self.ckpt)
        elif random_base_std > 0:
            fill_zero_weights(denoiser, random_base_std)
        self.targets = list(targets)
        self.sigma_min, self.t_schedule, self.t_mean, self.t_std = sigma_min, t_schedule, t_mean, t_std
        self.p_uncond = p_uncond
        self.cond_noise = (cond_noise_schedule, cond_noise_std, cond_noise_std_min, cond_noise_std_max)
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
        batch = cond.shape[0]
        schedule, std, lo, hi = self.cond_noise
        if schedule != "none":
            if schedule == "fixed":
                sigma = torch.full((batch,), std)
            elif schedule == "uniform":
                sigma = lo + (hi - lo) * torch.rand(batch, generator=generator)
            else:  # lognormal around std, kept inside [lo, hi]
                sigma = (math.log(max(std, 1e-8)) + torch.randn(batch, generator=generator)).exp().clamp(lo, hi)
            noise = torch.randn(cond.shape, generator=generator).to(cond.device)
            cond = cond + sigma.to(cond.device).view(-1, *([1] * (cond.ndim - 1))) * noise
        if self.p_uncond > 0:
            keep = (torch.rand(batch, generator=generator) >= self.p_uncond).to(cond.device)
            cond = cond * keep.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
        return cond

    # ------------------------------------------------------------------ objective
    @property
    def sparse(self) -> bool:
        """Structured-latent models take sparse voxels; the sparse-structure model a dense grid."""
        from lightning_lora.models.trellis import SparseStructureFlowModel

        return not isinstance(self.denoiser, SparseStructureFlowModel)

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

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        rows = (batch["cond"] if "cond" in batch else batch["cond_image"]).shape[0]
        return StepOutput(self.flow_loss(batch), batch_size=rows)

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

    # ------------------------------------------------------------------ TRELLIS-style adapter files
    def export_adapters(self, snapshot: Path, adapters: dict[str, PeftModel], step: int,
                        run_dir: Path | None = None) -> list[Path]:
        """``<run>/lora_ckpts/denoiser_lora_stepNNNNNNN.safetensors``: PEFT keys, r/alpha/targets in metadata."""
        if run_dir is None or "denoiser" not in adapters:
            return []
        path = run_dir / "lora_ckpts" / f"denoiser_lora_step{step:07d}.safetensors"
        identity = self.base_model_identity()
        return [save_adapter_file(path, {"": adapters["denoiser"]}, family=self.family, base_model=identity)]
