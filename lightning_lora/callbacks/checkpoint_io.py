"""Lightning checkpoint files written atomically (temporary name, then rename), read without unpickling code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_lora.errors import UserError, pickle_runs_code
from lightning_lora.fileio import atomic_write_bytes


def _empty(path: str | Path) -> bool:
    try:
        return Path(path).stat().st_size == 0
    except OSError:
        return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """A killed save leaves the previous ``last.ckpt`` intact instead of a truncated file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        # Our checkpoints hold tensors and plain values only, so they always load without unpickling code;
        # anything else (a pickle that needs code, a damaged or foreign file) is refused with one line.
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise UserError(f"resume: no checkpoint at {path}") from None
        except Exception as exc:
            # weights_only refuses code and garbage alike (an UnpicklingError either way): tell them apart
            if isinstance(exc, pickle.UnpicklingError) and pickle_runs_code(path):
                raise UserError(f"resume: {path} refused: it holds pickled objects that would run code when loaded "
                                "(only tensors and plain values are read, weights_only=True)") from None
            # the unpickler's own words (list index out of range, a key error) say nothing to a user
            what = "an empty file" if _empty(path) else "damaged, cut short, or not a file torch.save wrote"
            raise UserError(f"resume: {path} is not a readable checkpoint ({what})") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise UserError(f"resume: {path} is not a Lightning training checkpoint (it has no state_dict)")
        return checkpoint
