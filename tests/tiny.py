"""Tiny stand-in models and heads for tests (built from code, no downloads)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lora.heads.base import StepOutput, TaskHead


class Attention(nn.Module):
    """TRELLIS-style attention names: to_qkv (self) and to_q / to_kv (cross), to_out."""

    def __init__(self, dim: int, cross: bool = False) -> None:
        super().__init__()
        self.cross = cross
        if cross:
            self.to_q, self.to_kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.size(-1) ** 0.5, dim=-1)
        return self.to_out(att @ v)


class TinyDenoiser(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"self_attn": Attention(dim), "cross_attn": Attention(dim, cross=True)}) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block["self_attn"](h)
            h = h + block["cross_attn"](h, context)
        return self.out(self.norm(h))


class TinyHead(TaskHead):
    """Regress a fixed random map with the tiny denoiser: enough signal for every LoRA layer to move."""

    family = "tiny"

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.denoiser = TinyDenoiser(dim)
        self.target_map = nn.Linear(4, 4)
        self.target_map.requires_grad_(False)

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def default_targets(self) -> dict[str, list[str]]:
        return {"denoiser": ["to_q", "to_kv", "to_out", "to_qkv"]}

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        pred = self.denoiser(batch["x"], batch["context"])
        loss = torch.nn.functional.mse_loss(pred, self.target_map(batch["x"]))
        return StepOutput(loss, batch_size=batch["x"].size(0))


def tiny_batch(n: int = 8, seq: int = 5, dim: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, seq, 4, generator=g), "context": torch.randn(n, 3, dim, generator=g)}


class TinyData(pl.LightningDataModule):
    """Random regression batches for TinyHead (fixed seed, so runs are repeatable)."""

    def __init__(self, n: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(3)
        self.items = [
            {"x": torch.randn(5, 4, generator=g), "context": torch.randn(3, 16, generator=g)} for _ in range(self.n)
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.items[:16], batch_size=self.batch_size)
