"""Merging an adapter into its base weights (and back), with a strength ``scale``."""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from lightning_lora.adapters.finite import require_finite
from lightning_lora.checks import finite
from lightning_lora.errors import UserError


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_adapter_scale(model: nn.Module, scale: float) -> None:
    """Multiply every LoRA update by ``scale`` (1.0 restores alpha/r); applies to the active adapters."""
    finite(scale, "scale", hint=" (1.0 = as trained)")
    for layer in lora_layers(model):
        for name in layer.active_adapters:
            layer.set_scale(name, scale)


def check_merge(model: nn.Module) -> None:
    """Refuse (before any weight changes) a merge whose result would hold NaN/Inf, naming the first such layer: a
    NaN factor, or a scale that overflows the weight's dtype."""
    import torch

    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or layer.merged:
            continue
        weight = layer.get_base_layer().weight
        with torch.no_grad():
            for adapter in layer.active_adapters:
                if adapter in getattr(layer, "lora_A", {}):
                    merged = weight + layer.get_delta_weight(adapter).to(weight.dtype)
                    require_finite([(name.removeprefix("base_model.model."), merged)], "the merged weight of layer",
                                   hint=f" in {str(weight.dtype).removeprefix('torch.')} (scale too large, or a "
                                        "NaN/Inf factor); nothing was merged")


def merge_adapter(peft_model: PeftModel, scale: float = 1.0) -> PeftModel:
    """W <- W + scale·(alpha/r)·B·A in place, keeping the LoRA layers so ``unmerge_adapter`` can undo it.

    Merging twice is a no-op (PEFT keeps a merged flag per layer).
    """
    if not any(layer.merged for layer in lora_layers(peft_model)):
        set_adapter_scale(peft_model, scale)
    try:
        check_merge(peft_model)
    except UserError:
        set_adapter_scale(peft_model, 1.0)
        raise
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
    try:
        check_merge(peft_model)
    except UserError:
        set_adapter_scale(peft_model, 1.0)  # the refused merge leaves the model as it was given
        raise
    return peft_model.merge_and_unload()
