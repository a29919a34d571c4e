"""Weighted combination of LoRAs into one, and folding LoRAs into base weights.

``concat`` is exact: for Σ wᵢ·sᵢ·Bᵢ·Aᵢ it stacks the A rows and the B columns, with each input's weight
wᵢ and scale sᵢ = alpha/r folded into its B columns, so the result has rank Σ rᵢ and scale 1.
``svd`` forms the exact weighted sum per module and re-factorises it at a given rank (Eckart–Young optimal).
Up and down factors are never averaged separately (that adds cross terms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_lora.adapters.factors import Factors, is_spatial
from lightning_lora.adapters.svd import factorize
from lightning_lora.errors import UserError

COMBINE_METHODS = ("concat", "svd")


def _check_shapes(inputs: Sequence[tuple[Mapping[str, Factors], float]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (mods, _) in enumerate(inputs):
        for name, f in mods.items():
            if name in shapes and shapes[name] != f.weight_shape:
                raise UserError(f"module {name!r} has shape {list(shapes[name])} in adapter 1 but "
                                f"{list(f.weight_shape)} in adapter {i + 1}; the adapters are for different models")
            shapes.setdefault(name, f.weight_shape)
    return shapes


def combine_concat(inputs: Sequence[tuple[Mapping[str, Factors], float]]) -> dict[str, Factors]:
    """Exactly Σ wᵢ·ΔWᵢ per module (modules missing from an input contribute nothing from it)."""
    shapes = _check_shapes(inputs)
    out = {}
    for name in shapes:
        parts = [(mods[name], w) for mods, w in inputs if name in mods and w != 0.0]
        if not parts:
            continue
        down = torch.cat([f.down.to(torch.float32) for f, _ in parts], dim=0)
        up = torch.cat([f.up.to(torch.float32) * (w * f.scale) for f, w in parts], dim=1)
        out[name] = Factors(down=down.contiguous(), up=up.contiguous(), scale=1.0)
    return out


def combine_svd(inputs: Sequence[tuple[Mapping[str, Factors], float]], rank: int | None,
                conv_rank: int | None = None, device: str = "cpu") -> dict[str, Factors]:
    """The exact weighted sum per module, re-factorised by truncated SVD at ``rank`` (``None``: exact rank)."""
    shapes = _check_shapes(inputs)
    out = {}
    for name, shape in shapes.items():
        total = torch.zeros(shape, dtype=torch.float32)
        for mods, w in inputs:
            if name in mods:
                total += w * mods[name].delta()
        if rank is None:  # the rank of the sum is at most the sum of the ranks
            r = sum(mods[name].rank for mods, _ in inputs if name in mods)
        else:
            r = conv_rank if (conv_rank is not None and is_spatial(shape)) else rank
        out[name] = factorize(total, r, device=device)[0]
    return out


def merge_into(weight: torch.Tensor, parts: Sequence[tuple[Factors, float]]) -> torch.Tensor:
    """W + Σ wᵢ·scaleᵢ·Bᵢ·Aᵢ, computed in float32 and returned in W's dtype."""
    merged = weight.to(torch.float32).clone()
    for f, w in parts:
        if f.weight_shape != tuple(weight.shape):
            raise UserError(f"adapter makes a delta of shape {list(f.weight_shape)} for a weight of shape "
                            f"{list(weight.shape)}")
        merged += w * f.delta()
    return merged.to(weight.dtype)
