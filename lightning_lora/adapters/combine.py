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
from lightning_lora.adapters.finite import require_finite
from lightning_lora.adapters.svd import factorize
from lightning_lora.checks import finite
from lightning_lora.errors import UserError

COMBINE_METHODS = ("concat", "svd")


def _check_shapes(inputs: Sequence[tuple[Mapping[str, Factors], float]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (_, w) in enumerate(inputs):
        finite(w, f"the weight of adapter {i + 1}", hint=" (e.g. 0.5)")
    for i, (mods, _) in enumerate(inputs):
        for name, f in mods.items():
            if name in shapes and shapes[name] != f.weight_shape:
                raise UserError(f"module {name!r} has shape {list(shapes[name])} in adapter 1 but "
                                f"{list(f.weight_shape)} in adapter {i + 1}; the adapters are for different models")
            shapes.setdefault(name, f.weight_shape)
    return shapes


def _check_overlap(inputs: Sequence[tuple[Mapping[str, Factors], float]], allow_disjoint: bool) -> None:
    if not allow_disjoint:
        check_combinable([(f"adapter {i + 1}", mods, "", {}) for i, (mods, _) in enumerate(inputs)],
                         how="allow_disjoint=True")


def combine_concat(inputs: Sequence[tuple[Mapping[str, Factors], float]], allow_disjoint: bool = False
                   ) -> dict[str, Factors]:
    """Exactly Σ wᵢ·ΔWᵢ per module (modules missing from an input contribute nothing from it). An input that shares
    no module with the others is refused unless ``allow_disjoint`` (it is likely an adapter for another model)."""
    _check_overlap(inputs, allow_disjoint)
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
                conv_rank: int | None = None, device: str = "cpu", allow_disjoint: bool = False
                ) -> dict[str, Factors]:
    """The exact weighted sum per module, re-factorised by truncated SVD at ``rank`` (``None``: exact rank);
    ``allow_disjoint`` as in :func:`combine_concat`."""
    _check_overlap(inputs, allow_disjoint)
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
        require_finite([(name, total)], "the weighted sum of module", hint="; are the weights too large?")
        out[name] = factorize(total, r, device=device)[0]
    return out


def merge_into(weight: torch.Tensor, parts: Sequence[tuple[Factors, float]], name: str = "weight") -> torch.Tensor:
    """W + Σ wᵢ·scaleᵢ·Bᵢ·Aᵢ, computed in float32 and returned in W's dtype; a result that is not finite in that
    dtype (a weight of 1e39, a factor that overflows) is refused naming ``name``."""
    merged = weight.to(torch.float32).clone()
    for f, w in parts:
        if f.weight_shape != tuple(weight.shape):
            raise UserError(f"adapter makes a delta of shape {list(f.weight_shape)} for a weight of shape "
                            f"{list(weight.shape)}")
        finite(w, f"the weight of the adapter merged into {name}")
        merged += w * f.delta()
    merged = merged.to(weight.dtype)
    weights = ", ".join(f"{w:g}" for _, w in parts)
    require_finite([(name, merged)], "the merged weight", hint=f" in {str(weight.dtype).removeprefix('torch.')} "
                   f"(weights {weights}: too large? or a NaN in the base); nothing was merged or written")
    return merged


def check_combinable(sets: Sequence[tuple[str, Mapping[str, Factors], str, Mapping[str, object]]],
                     how: str = "--allow-disjoint") -> None:
    """Refuse to combine adapters that cannot be for one model: (label, modules, family, base model) each; one that
    shares no module with the others, or two whose metadata name different families or base models. ``how`` is
    what the error tells the user to pass to combine them anyway."""
    for key in ("family", "name", "base"):
        seen: dict[str, str] = {}
        for label, _, family, base in sets:
            value = family if key == "family" else str((base or {}).get(key) or "")
            if value:
                seen.setdefault(value, label)
        if len(seen) > 1:
            (v1, l1), (v2, l2) = list(seen.items())[:2]
            what = "family" if key == "family" else f"base model ({key})"
            raise UserError(f"{l1} and {l2} disagree on the {what}: {v1!r} vs {v2!r}; pass {how} to "
                            "combine them anyway")
    if len(sets) < 2:
        return
    for i, (label, mods, _, _) in enumerate(sets):
        others = {m for j, (_, other, _, _) in enumerate(sets) if j != i for m in other}
        if mods and not set(mods) & others:
            raise UserError(f"{label} shares no module with the other adapters (e.g. {next(iter(mods))!r} vs "
                            f"{sorted(others)[0]!r}): are they for different models? pass {how} to combine "
                            "them anyway")
