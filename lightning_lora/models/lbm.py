"""LBM (latent bridge matching) checkpoints: the released folder layout, read into diffusers modules.

A released LBM folder (``jasperai/LBM_relighting``, ``LBM_normals``, ``LBM_depth``) holds one YAML config and
``model.safetensors``, the state dict of LBM's ``LBMModel``:

- ``denoiser.*``: a diffusers ``UNet2DConditionModel`` with SDXL blocks, called without any text (so every
  ``attn2`` attends to the image tokens, as ``attn1`` does);
- ``vae.vae_model.*``: the SDXL ``AutoencoderKL``;
- ``num_iterations``: a training counter (ignored here).

A single weights file stands for a folder too (the LBM LoRA scripts' ``exact_base.ckpt``/``.safetensors``): a
``.safetensors`` file, or a weights-only torch file holding the same keys: bare, as the scripts'
``create_exact_base_model.py`` saves them (``{"model_state_dict": ..., "source_config": <the LBM config>, ...}``), or
as a Lightning checkpoint's ``state_dict`` under LBM's training wrapper (``model.denoiser.*``, as
``gojasper/LBM``'s training checkpoints are; its ``convert_checkpoint_to_safetensors.py`` strips that ``model.``).
Its config is ``<stem>.yaml`` or ``config.yaml`` beside it, else the checkpoint's own ``source_config``; without
either, LBM's released architecture and LBM's default settings apply.

The architectures are not in the folder: LBM builds the UNet in code and takes the VAE config and the
flow-matching scheduler config from SDXL on the Hub. Here they are constants (``LBM_UNET``, ``SDXL_VAE``,
``FLOW_SCHEDULER``), so nothing is downloaded; a config may carry ``unet:``, ``vae:`` and ``scheduler:``
sections (diffusers config dicts) that replace them, which is how the tiny model of ``models/lbm_tiny.py``
describes itself. The LBM keys the head uses (``bridge_noise_sigma``, ``selected_timesteps``, ``prob``,
``timestep_sampling``, ``logit_mean``/``logit_std``, ``latent_loss_type``/``weight``, ``pixel_loss_type``/
``weight``) are read from the same file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_SUFFIXES = (".yaml", ".yml")
CONFIG_JSON = "config.json"
DENOISER_PREFIX = "denoiser."
VAE_PREFIX = "vae.vae_model."
IGNORED_KEYS = ("num_iterations",)

# LBM's denoiser (src/lbm/inference/utils.py of gojasper/LBM): SDXL's UNet blocks without the added
# (text/time-id) embeddings; attention_head_dim is passed as the number of heads, as in SDXL's config.
LBM_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": [320, 640, 1280],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# FlowMatchEulerDiscreteScheduler built from SDXL's scheduler config: 1000 steps, shift 1, so sigma(t) = t/1000.
FLOW_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000}


@dataclass
class LBMParts:
    """The modules and settings of one LBM folder."""

    denoiser: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    scheduler: Any  # diffusers FlowMatchEulerDiscreteScheduler (training sigmas)
    config: dict[str, Any] = field(default_factory=dict)  # the folder's config file, as read
    path: Path | None = None
    config_file: Path | None = None  # None: a single weights file without a config (LBM's own architecture)


#: what an LBM repository on the Hub holds that the loader reads: its config and weights
LBM_FILES = ("*.yaml", "*.yml", "*.json", "*.safetensors")


# --------------------------------------------------------------------------- the folder
#: the prefix LBM's Lightning training wrapper puts before the model's keys (``self.model = LBMModel(...)``)
LIGHTNING_PREFIX = "model."
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_lbm_folder(pretrained: str | os.PathLike | None, key: str = "model.pretrained",
                     ) -> tuple[Path, Path | None, Path]:
    """(folder or file, config file, weights file) of an LBM folder (local, or a Hub id such as
    jasperai/LBM_relighting, fetched into the cache) or of a single LBM weights file (config: ``None`` when none is
    beside it); a missing part is a one-line error."""
    from lightning_lora import hub

    if not pretrained:
        raise UserError(f"{key} is required: pass {key}=<LBM folder with a .yaml config and {WEIGHTS_FILE}, an LBM "
                        "weights file (.safetensors/.ckpt), or a Hub id such as jasperai/LBM_relighting>")
    path = hub.resolve(pretrained, key=key, allow_patterns=LBM_FILES)
    if path.is_file():
        return path, config_beside(path), path
    if not path.is_dir():
        raise UserError(f"{key}: no folder at {path} (give an LBM folder: a .yaml config + {WEIGHTS_FILE}, "
                        "as jasperai/LBM_relighting ships, a single LBM .safetensors/.ckpt file, or a Hub id)")
    configs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CONFIG_SUFFIXES)
    if not configs and (path / CONFIG_JSON).is_file():
        configs = [path / CONFIG_JSON]
    if not configs:
        raise UserError(f"{key}={path} has no config file (.yaml, or {CONFIG_JSON}); an LBM folder holds its "
                        f"config next to {WEIGHTS_FILE}")
    if len(configs) > 1:
        raise UserError(f"{key}={path} has {len(configs)} config files ({', '.join(p.name for p in configs)}); "
                        "keep the one that belongs to the weights")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        others = sorted(p.name for p in path.glob("*.safetensors"))
        if len(others) == 1:
            weights = path / others[0]
        else:
            found = f" (found {', '.join(others)}; which one?)" if others else ""
            raise UserError(f"{key}={path} has no {WEIGHTS_FILE}{found}")
    return path, configs[0], weights


def config_beside(weights: Path) -> Path | None:
    """The config of a single LBM weights file: ``<stem>.yaml``/``.yml``, else ``config.yaml``/``.yml``/``.json``
    in its folder; None (LBM's released architecture) when there is none. Any other YAML there (a training config)
    is not taken for it."""
    names = [weights.stem + s for s in CONFIG_SUFFIXES] + ["config" + s for s in CONFIG_SUFFIXES] + [CONFIG_JSON]
    return next((weights.with_name(n) for n in names if weights.with_name(n).is_file()), None)


#: where a torch checkpoint keeps the model's tensors: the LBM LoRA scripts' ``exact_base.ckpt``, Lightning's
STATE_KEYS = ("model_state_dict", "state_dict")
#: where the LBM LoRA scripts' ``exact_base.ckpt`` keeps the LBM config it was built from
EMBEDDED_CONFIG = "source_config"


def read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors, the LBM config stored in the file or None) of an LBM weights file: safetensors, or a weights-only
    torch file (tensors and plain containers only; anything else is refused unread), bare, the scripts'
    ``{"model_state_dict": ..., "source_config": ...}``, or a Lightning ``state_dict`` with LBM's ``model.``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if file.suffix.lower() not in TORCH_SUFFIXES:
        try:
            return load_file(str(file)), None
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0][:160]})") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (code in the pickle), RuntimeError, EOFError, BadZipFile, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{file}: not a weights-only torch file ({first[:160]})") from None
    embedded = None
    if isinstance(obj, dict):
        found = obj.get(EMBEDDED_CONFIG)
        embedded = found if isinstance(found, dict) else None
        inner = next((k for k in STATE_KEYS if isinstance(obj.get(k), dict)), None)
        obj = obj[inner] if inner else obj
    if not isinstance(obj, dict):
        raise UserError(f"{file}: expected a mapping of tensor names to tensors, got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    wrapped = not any(k.startswith(DENOISER_PREFIX) for k in state) and any(
        k.startswith(LIGHTNING_PREFIX + DENOISER_PREFIX) for k in state)
    if wrapped:  # a training checkpoint: the LBM model is the Lightning module's ``model``
        state = {k[len(LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    return state, embedded


def read_config(file: Path) -> dict[str, Any]:
    try:
        if file.suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
        else:
            import yaml

            data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{file}: not a readable config ({first[:160]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a mapping of settings, got {type(data).__name__}")
    return data


def architecture(config: dict[str, Any], file: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """UNet, VAE and scheduler configs: LBM's own unless the file has ``unet:``/``vae:``/``scheduler:``."""
    for section in ("unet", "vae", "scheduler"):
        if section in config and not isinstance(config[section], dict):
            raise UserError(f"{file}: '{section}' must be a mapping of diffusers config values")
    if config.get("conditioning_images_keys") or config.get("conditioning_masks_keys"):
        raise UserError(f"{file}: conditioning images/masks concatenated to the latents are not supported; only "
                        "source -> target models (conditioning_images_keys: [])")
    unet = dict(config.get("unet") or LBM_UNET)
    vae = dict(config.get("vae") or SDXL_VAE)
    if "unet" not in config:
        unet["in_channels"] = int(config.get("unet_input_channels", unet["in_channels"]))
        unet["out_channels"] = int(config.get("vae_num_channels", unet["out_channels"]))
    if unet["in_channels"] != vae["latent_channels"] or unet["out_channels"] != vae["latent_channels"]:
        raise UserError(f"{file}: the denoiser maps {unet['in_channels']} -> {unet['out_channels']} channels but the "
                        f"VAE has {vae['latent_channels']} latent channels")
    return unet, vae, dict(config.get("scheduler") or FLOW_SCHEDULER)


def build_modules(unet: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any], file: Path | None = None):
    """Randomly initialised denoiser and VAE, and the training scheduler, from their configs."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    where = f"{file}: " if file else ""
    try:
        return (UNet2DConditionModel.from_config(unet), AutoencoderKL.from_config(vae),
                FlowMatchEulerDiscreteScheduler.from_config(scheduler))
    except (TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{where}cannot build the LBM modules from the config: {first[:200]}") from None


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, file: Path,
               hint: str = "") -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise UserError(f"{file}: {len(missing)} tensors of the {prefix[:-1]} are missing, e.g. {prefix}{missing[0]}; "
                        f"is it a checkpoint of this architecture?{hint}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{file}: {prefix}{key} has shape {list(state[key].shape)} but the model needs "
                            f"{list(value.shape)} (the config does not describe these weights{hint})")
    module.load_state_dict(state, strict=True)


def load_lbm(pretrained: str | os.PathLike | None, key: str = "model.pretrained") -> LBMParts:
    """Denoiser, VAE and scheduler of an LBM folder (weights loaded strictly from ``model.safetensors``) or of a
    single LBM weights file."""
    path, config_file, weights = check_lbm_folder(pretrained, key)
    state, embedded = read_weights(weights)
    config = read_config(config_file) if config_file is not None else dict(embedded or {})
    denoiser, vae, scheduler = build_modules(*architecture(config, config_file or weights), config_file or weights)
    parts: dict[str, dict[str, torch.Tensor]] = {DENOISER_PREFIX: {}, VAE_PREFIX: {}}
    unexpected = []
    for name, tensor in state.items():
        prefix = next((p for p in parts if name.startswith(p)), None)
        if prefix is not None:
            parts[prefix][name[len(prefix):]] = tensor
        elif name not in IGNORED_KEYS:
            unexpected.append(name)
    if unexpected:
        raise UserError(f"{weights}: {len(unexpected)} tensors belong to no LBM part, e.g. {unexpected[0]!r} "
                        f"(expected {DENOISER_PREFIX}*, {VAE_PREFIX}*)")
    hint = "" if config_file is not None or embedded else (
        f"; no config beside it, so LBM's released architecture was assumed: put its config as {weights.stem}.yaml "
        "or config.yaml beside it")
    _load_part(denoiser, parts[DENOISER_PREFIX], DENOISER_PREFIX, weights, hint)
    _load_part(vae, parts[VAE_PREFIX], VAE_PREFIX, weights, hint)
    denoiser.eval()
    vae.eval()
    return LBMParts(denoiser, vae, scheduler, config, path, config_file)


def lbm_state_dict(denoiser: torch.nn.Module, vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The released checkpoint's keys for a denoiser and a VAE."""
    state = {DENOISER_PREFIX + k: v.detach().contiguous() for k, v in denoiser.state_dict().items()}
    state.update({VAE_PREFIX + k: v.detach().contiguous() for k, v in vae.state_dict().items()})
    state["num_iterations"] = torch.tensor(0.0)
    return state


def save_lbm_folder(folder: str | os.PathLike, denoiser: torch.nn.Module, vae: torch.nn.Module,
                    config: dict[str, Any]) -> Path:
    """Write ``config.yaml`` + ``model.safetensors`` in the released layout (atomically, as a whole folder)."""
    import yaml
    from safetensors.torch import save

    from lightning_lora.fileio import atomic_directory, atomic_write_bytes, atomic_write_text

    folder = Path(folder).expanduser()
    with atomic_directory(folder) as tmp:
        atomic_write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        atomic_write_bytes(tmp / WEIGHTS_FILE, save(lbm_state_dict(denoiser, vae), metadata={"format": "pt"}))
    return folder


def denoiser_layers(denoiser: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every weight-bearing layer of the denoiser by its checkpoint name (``denoiser.<path>``)."""
    return {DENOISER_PREFIX + name: m for name, m in denoiser.named_modules()
            if name and isinstance(getattr(m, "weight", None), torch.Tensor)}


__all__ = [
    "DENOISER_PREFIX",
    "FLOW_SCHEDULER",
    "LBM_UNET",
    "SDXL_VAE",
    "VAE_PREFIX",
    "WEIGHTS_FILE",
    "LBMParts",
    "architecture",
    "build_modules",
    "check_lbm_folder",
    "config_beside",
    "denoiser_layers",
    "lbm_state_dict",
    "load_lbm",
    "read_config",
    "read_weights",
    "save_lbm_folder",
]
