"""Load and save TRELLIS denoiser checkpoints: ``<name>.json`` + ``<name>.safetensors`` or a ``.pt`` state dict.

The JSON is TRELLIS's ``{"name": ClassName, "args": {...}}`` (a training run's ``config.json`` with
``models.denoiser`` works too). Weights are loaded with ``strict=True`` after our own key/shape check, so a
checkpoint of another model or size fails with one line naming the first offending key. ``safetensors`` is
imported lazily, only when such a file is read or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.errors import UserError
from lightning_lora.models.trellis.sparse_structure_flow import SparseStructureFlowModel
from lightning_lora.models.trellis.structured_latent_flow import ElasticSLatFlowModel, SLatFlowModel

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "SparseStructureFlowModel": SparseStructureFlowModel,
    "SLatFlowModel": SLatFlowModel,
    "ElasticSLatFlowModel": ElasticSLatFlowModel,
}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _one_line(err: BaseException) -> str:
    """Error type and first sentence: library messages can run to paragraphs."""
    text = str(err).strip().splitlines()
    first = text[0].split(". ")[0] if text else ""
    return f"{type(err).__name__}: {first}".rstrip(": ")


def resolve_paths(path: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(weights file, json file) for ``path`` = a stem, ``<stem>.json``, or a weights file."""
    p = Path(path)
    if p.suffix == ".json":
        stem = p.with_suffix("")
        candidates = [stem.with_name(stem.name + s) for s in WEIGHT_SUFFIXES]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise UserError(f"no weights next to {p}: expected {candidates[0].name} or {candidates[1].name}")
        return weights, p
    if p.suffix in WEIGHT_SUFFIXES:
        weights, cfg = p, Path(config) if config is not None else p.with_suffix(".json")
    else:  # a bare stem, as TRELLIS's from_pretrained takes
        candidates = [p.with_name(p.name + s) for s in WEIGHT_SUFFIXES]
        weights = next((c for c in candidates if c.is_file()), candidates[0])
        cfg = Path(config) if config is not None else p.with_name(p.name + ".json")
    if not weights.is_file():
        raise UserError(f"checkpoint file not found: {weights}")
    if not cfg.is_file():
        raise UserError(f'model config not found: {cfg} (TRELLIS\'s {{"name": ..., "args": ...}} JSON)')
    return weights, cfg


def read_config(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read model config {path}: {_one_line(err)}") from None
    if isinstance(data, dict) and isinstance(data.get("models"), dict) and "denoiser" in data["models"]:
        data = data["models"]["denoiser"]  # a TRELLIS training config.json
    ok = isinstance(data, dict) and isinstance(data.get("name"), str) and isinstance(data.get("args", {}), dict)
    if not ok:
        raise UserError(f'model config {path} must be a JSON object {{"name": ClassName, "args": {{...}}}}')
    return data["name"], dict(data.get("args", {}))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt/truncated/foreign files raise many types; all mean "unreadable"
        raise UserError(f"cannot read checkpoint {path}: {_one_line(err)}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"checkpoint {path} is not a flat state dict of named tensors")
    return dict(sd)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise a one-line UserError for the first missing, unexpected or wrongly shaped key."""
    expected = model.state_dict(keep_vars=True)
    for key, ref in expected.items():
        if key not in sd:
            raise UserError(f"checkpoint {source} does not fit {type(model).__name__}: missing key {key!r}")
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise UserError(
                f"checkpoint {source} does not fit {type(model).__name__}: {key!r} has shape "
                f"{list(sd[key].shape)} in the checkpoint, {list(ref.shape)} in the model"
            )
    for key in sd:
        if key not in expected:
            raise UserError(f"checkpoint {source} does not fit {type(model).__name__}: unexpected key {key!r}")


def build_trellis_model(name: str, args: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
    """Instantiate a denoiser class by its TRELLIS name with its JSON args."""
    cls = MODEL_CLASSES.get(name)
    if cls is None:
        raise UserError(f"unknown TRELLIS model name {name!r}; valid: {', '.join(MODEL_CLASSES)}")
    try:
        with torch.device(device) if device is not None else nullcontext():
            return cls(**args)
    except TypeError as err:
        raise UserError(f"bad args for {name}: {_one_line(err)}") from None


def load_trellis_model(
    path: str | os.PathLike, config: str | os.PathLike | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build the class named in the JSON and load the weights strictly, as fp32 on ``device``.

    ``path``: ``<stem>`` (TRELLIS ``from_pretrained`` style), ``<stem>.json``, ``<stem>.safetensors`` or a
    ``.pt``/``.pth`` state dict (read with ``weights_only=True``). ``config`` overrides the JSON next to it.
    """
    weights, cfg = resolve_paths(path, config)
    name, args = read_config(cfg)
    model = build_trellis_model(name, args, device="meta")  # no wasted random init of ~0.5B parameters
    sd = read_state_dict(weights)
    check_state_dict(model, sd, weights)
    # Fresh fp32 copies: tensors from safetensors are views into the file buffer, and CPU matmul kernels gave
    # last-bit differences on them versus ordinary allocations; copies also free the file buffer.
    sd = {
        k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
        for k, v in sd.items()
    }
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def save_trellis_model(model: nn.Module, path: str | os.PathLike, fmt: str = "safetensors") -> Path:
    """Write ``<stem>.json`` and ``<stem>.safetensors`` (or ``<stem>.pt``); returns the weights path."""
    if fmt not in ("safetensors", "pt"):
        raise UserError(f"checkpoint format must be 'safetensors' or 'pt', got {fmt!r}")
    name = type(model).__name__
    if name not in MODEL_CLASSES or not hasattr(model, "config"):
        raise UserError(f"cannot save {name}: not a TRELLIS denoiser of this package ({', '.join(MODEL_CLASSES)})")
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (*WEIGHT_SUFFIXES, ".json") else p
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_name(stem.name + "." + fmt)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(weights))
    else:
        torch.save(sd, weights)
    config = {"name": name, "args": model.config}
    stem.with_name(stem.name + ".json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return weights
