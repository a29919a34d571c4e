"""Lightning callbacks and plugins: adapter-only snapshots, atomic checkpoint files, sample previews."""

from lightning_lora.callbacks.adapter_checkpoint import AdapterCheckpoint
from lightning_lora.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_lora.callbacks.sample_previews import SamplePreviews

__all__ = ["AdapterCheckpoint", "AtomicCheckpointIO", "SamplePreviews"]
