"""One module's LoRA as two factors and a scale (``Factors``), the unit that extraction, combination,
validation and every file layout of ``formats`` read and write; kept apart so that files and arithmetic
need not import the SVD extraction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """One module's LoRA: ``down`` [r, in, *k], ``up`` [out, r, 1...]; the update is scale·up@down."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def alpha(self) -> float:
        """The alpha that gives ``scale`` with plain (non-rs) LoRA: alpha/r = scale."""
        return float(self.scale * self.rank)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔŴ = scale·B·A in the weight's shape (convs reshaped)."""
        up = self.up.reshape(self.up.shape[0], self.rank).to(dtype)
        down = self.down.reshape(self.rank, -1).to(dtype)
        return (self.scale * (up @ down)).reshape(self.weight_shape)

    def numel(self) -> int:
        return self.down.numel() + self.up.numel()


def is_spatial(shape: Sequence[int]) -> bool:
    """A conv with a kernel bigger than 1 (uses the conv rank); 1×1 convs count as linear."""
    return len(shape) > 2 and math.prod(shape[2:]) > 1
