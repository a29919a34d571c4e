"""The toy family's data: random inputs and the targets of a fixed random linear map (seeded, so repeatable)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader


class ToyDataModule(pl.LightningDataModule):
    def __init__(self, num_samples: int = 64, dim: int = 16, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_samples, self.dim, self.batch_size, self.seed = num_samples, dim, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.num_samples, self.dim, generator=g)
        y = x @ torch.randn(self.dim, self.dim, generator=g) / self.dim**0.5
        self.items = [{"x": a, "y": b} for a, b in zip(x, y, strict=True)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.items[:16], batch_size=self.batch_size)
