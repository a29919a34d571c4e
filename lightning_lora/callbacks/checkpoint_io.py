"""Lightning checkpoint files written atomically (temporary name, then rename)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_lora.fileio import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """A killed save leaves the previous ``last.ckpt`` intact instead of a truncated file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        # Our checkpoints hold tensors and plain values only, so they always load without unpickling code.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
