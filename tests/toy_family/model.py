"""The toy family's model: a stack of residual blocks, each with attention-style projections and an MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class ToyBlock(nn.Module):
    """One block: a gated mix of ``to_q``/``to_v`` projections and an MLP (the LoRA targets), residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.to_q, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sigmoid(self.to_q(x)) * self.to_v(x) + self.mlp(x)


class ToyModel(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.out = nn.Linear(dim, dim)
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            # non-reentrant, so LoRA gradients flow although the block's input needs no grad
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint and self.training else block(x)
        return self.out(x)
