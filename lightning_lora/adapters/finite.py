"""Refusing non-finite and non-float adapter tensors: what is read is named with its module, what would be written
is checked before the write (one line naming the first bad tensor; nothing written)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_lora.errors import UserError


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values ``tensor`` holds (0 for integer tensors, which cannot hold any)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def require_finite(named: Iterable[tuple[str, torch.Tensor]], what: str, hint: str = "") -> None:
    """UserError naming the first of ``named`` that holds NaN/Inf: ``"<what> <name> has N non-finite values"``."""
    for name, tensor in named:
        if bad := count_non_finite(tensor):
            raise UserError(f"{what} {name!r} has {bad} non-finite value{'s' if bad != 1 else ''} (NaN/Inf) of "
                            f"{tensor.numel()}{hint}")


def require_float(name: str, tensor: torch.Tensor, source: str) -> None:
    """An adapter factor must be floating point: an int8/bool tensor would be loaded as if it held weights."""
    if not tensor.is_floating_point():
        raise UserError(f"{source}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}; adapter tensors "
                        "must be floating point (float32, float16 or bfloat16)")

