"""Lightning checkpoint files written atomically (temporary name, then rename), read without unpickling code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_bytes


def _first_line(exc: BaseException) -> str:
    text = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())
    return text[:200] or type(exc).__name__


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
        except pickle.UnpicklingError:
            raise UserError(f"resume: {path} refused: it holds pickled objects that would run code when loaded "
                            "(only tensors and plain values are read, weights_only=True)") from None
        except Exception as exc:
            raise UserError(f"resume: {path} is not a checkpoint of this project (tensors and plain values, read "
                            f"with weights_only=True): {type(exc).__name__}: {_first_line(exc)}") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise UserError(f"resume: {path} is not a Lightning training checkpoint (it has no state_dict)")
        return checkpoint
