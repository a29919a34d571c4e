"""Lightning callbacks and plugins: adapter-only snapshots, atomic checkpoint files."""

from lightning_lora.callbacks.adapter_checkpoint import AdapterCheckpoint
from lightning_lora.callbacks.checkpoint_io import AtomicCheckpointIO

__all__ = ["AdapterCheckpoint", "AtomicCheckpointIO"]
