"""The utility API TRELLIS-style LoRA code uses, as thin functions over this room.

``get_lora_config``, ``apply_lora_to_model``, ``load_lora_weights``, ``save_lora_weights``,
``merge_lora_weights``, ``print_trainable_parameters`` and ``LoRAModelWrapper`` behave as the seed
tutorial shows, with two differences that prevent silent mistakes: a file written by
``save_lora_weights`` describes itself (r, alpha and targets need not be repeated when loading), and
``strict=True`` (the default) refuses an adapter whose keys do not all fit.
"""

from __future__ import annotations

import os
from pathlib import Path

from peft import LoraConfig, PeftModel
from torch import nn

from lightning_lora.adapters.inject import count_parameters, inject_adapter
from lightning_lora.adapters.io import (
    CONFIG_NAME,
    adapter_source,
    describes_itself,
    load_adapter_state,
    load_peft_dir,
    read_adapter_file,
    read_tensor_file,
    save_adapter_file,
    save_peft_dir,
)
from lightning_lora.adapters.merge import merge_and_unload
from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.errors import UserError

DEFAULT_TARGETS = ["to_q", "to_kv", "to_out", "to_qkv"]


def get_lora_config(r: int = 64, lora_alpha: float = 128, lora_dropout: float = 0.0,
                    target_modules: list[str] | None = None, init: str = "kaiming", **kwargs) -> LoraConfig:
    """A validated PEFT ``LoraConfig`` (TRELLIS attention targets by default)."""
    spec = AdapterSpec(r=r, alpha=lora_alpha, dropout=lora_dropout, init=init)
    return spec.lora_config(list(target_modules or DEFAULT_TARGETS), **kwargs)


def apply_lora_to_model(model: nn.Module, r: int = 64, lora_alpha: float = 128, lora_dropout: float = 0.0,
                        target_modules: list[str] | None = None, **kwargs) -> PeftModel:
    """Freeze ``model`` and add a trainable LoRA adapter to it."""
    config = get_lora_config(r, lora_alpha, lora_dropout, target_modules, **kwargs)
    return inject_adapter(model, config, where=type(model).__name__)


def load_lora_weights(model: nn.Module, lora_path: str | os.PathLike, r: int | None = None,
                      lora_alpha: float | None = None, target_modules: list[str] | None = None,
                      strict: bool = True, trainable: bool = False) -> PeftModel:
    """Add the adapter at ``lora_path`` to ``model``.

    ``lora_path`` is a PEFT directory, a self-describing ``.safetensors`` from ``save_lora_weights``, or a
    bare tensor file (``.safetensors``/``.pt``; ``r``, ``lora_alpha`` and ``target_modules`` required then).
    """
    path = _one_part(adapter_source(lora_path))
    if path.is_dir():
        return load_peft_dir(model, path, trainable=trainable, strict=strict)
    tensors, metadata = read_tensor_file(path)
    if describes_itself(metadata):
        configs, states, _ = read_adapter_file(path)
        if len(configs) != 1:
            raise UserError(f"{path} holds adapters for {sorted(configs)}; load it into the head, not one module")
        (config,), (state,) = configs.values(), states.values()
    else:
        if r is None or lora_alpha is None:
            raise UserError(f"{path} does not describe itself; pass r= and lora_alpha= (and target_modules=)")
        config, state = get_lora_config(r, lora_alpha, target_modules=target_modules), tensors
    config.inference_mode = not trainable
    peft_model = inject_adapter(model, config, where=type(model).__name__)
    load_adapter_state(peft_model, state, strict=strict, source=str(path))
    return peft_model


def _one_part(path: Path) -> Path:
    """A run's snapshot (``adapters/final``) with one PEFT directory per submodule stands for its only one; with
    several, the caller must say which (one model takes one adapter here)."""
    if not path.is_dir() or (path / CONFIG_NAME).is_file():
        return path
    parts = sorted(d for d in path.iterdir() if (d / CONFIG_NAME).is_file())
    if len(parts) > 1:
        raise UserError(f"{path} holds adapters for {[d.name for d in parts]}; give one of them, e.g. {parts[0]}")
    return parts[0] if parts else path


def save_lora_weights(model: PeftModel, path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Save only the adapter: a ``.safetensors`` path gives one self-describing file, anything else a
    PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_adapter_file(path, {"": model}, base_model={"name": base_model} if base_model else None)
    return save_peft_dir(model, path, base_model=base_model)


def merge_lora_weights(model: PeftModel, scale: float = 1.0) -> nn.Module:
    """Fold the adapter into the base weights (W + scale·alpha/r·B·A) and return the plain model."""
    return merge_and_unload(model, scale)


def print_trainable_parameters(model: nn.Module, name: str = "Model") -> str:
    """Print (and return) total, trainable and frozen parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = count_parameters(name, model).trainable
    text = (f"{name} Parameters:\n  Total:     {total:,}\n"
            f"  Trainable: {trainable:,} ({100.0 * trainable / max(total, 1):.2f}%)\n"
            f"  Frozen:    {total - trainable:,}")
    print(text)
    return text


class LoRAModelWrapper:
    """Hold a model with a LoRA adapter: ``load``, ``get_model``, ``save``, ``merge``."""

    def __init__(self, model: PeftModel):
        self.model = model

    @classmethod
    def load(cls, base_model: nn.Module, lora_path: str | os.PathLike, r: int | None = None,
             lora_alpha: float | None = None, target_modules: list[str] | None = None,
             strict: bool = True) -> LoRAModelWrapper:
        return cls(load_lora_weights(base_model, lora_path, r, lora_alpha, target_modules, strict=strict))

    def get_model(self) -> PeftModel:
        return self.model

    def save(self, path: str | os.PathLike) -> Path:
        return save_lora_weights(self.model, path)

    def merge(self, scale: float = 1.0) -> nn.Module:
        return merge_lora_weights(self.model, scale)
