"""Merging an adapter into its base weights (and back), with a strength ``scale``."""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_adapter_scale(model: nn.Module, scale: float) -> None:
    """Multiply every LoRA update by ``scale`` (1.0 restores alpha/r); applies to the active adapters."""
    for layer in lora_layers(model):
        for name in layer.active_adapters:
            layer.set_scale(name, scale)


def merge_adapter(peft_model: PeftModel, scale: float = 1.0) -> PeftModel:
    """W <- W + scale·(alpha/r)·B·A in place, keeping the LoRA layers so ``unmerge_adapter`` can undo it.

    Merging twice is a no-op (PEFT keeps a merged flag per layer).
    """
    if not any(layer.merged for layer in lora_layers(peft_model)):
        set_adapter_scale(peft_model, scale)
    peft_model.merge_adapter()
    return peft_model


def unmerge_adapter(peft_model: PeftModel) -> PeftModel:
    """Undo ``merge_adapter`` (restores the base weights up to float rounding) and reset the scale to 1."""
    peft_model.unmerge_adapter()
    set_adapter_scale(peft_model, 1.0)
    return peft_model


def merge_and_unload(peft_model: PeftModel, scale: float = 1.0) -> nn.Module:
    """Fold the adapter into the base weights and return the plain base module (no PEFT layers left)."""
    set_adapter_scale(peft_model, scale)
    return peft_model.merge_and_unload()
