"""Lightning callbacks and plugins: adapter-only snapshots, atomic checkpoint files, sample previews, a NaN/Inf
guard, a stop for an epoch that yields no batch, a checkpoint on SIGTERM, exact mid-epoch resume (generator states,
data order), an EMA of the LoRA weights, the console (a progress bar of steps, no third-party noise), and the push
to the Hub after the run."""

from lightning_lora.callbacks.adaptation import AdaptationReport
from lightning_lora.callbacks.adapter_checkpoint import AdapterCheckpoint
from lightning_lora.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_lora.callbacks.console import StepProgressBar, quiet_lightning
from lightning_lora.callbacks.ema import LoRAEMA
from lightning_lora.callbacks.empty_epoch import EmptyEpochGuard, NoTrainingBatch
from lightning_lora.callbacks.nan_guard import NanGuard, TrainingDiverged
from lightning_lora.callbacks.preemption import PreemptionCheckpoint
from lightning_lora.callbacks.push import PushToHub
from lightning_lora.callbacks.resume_state import ExactResume
from lightning_lora.callbacks.sample_previews import SamplePreviews

__all__ = ["AdaptationReport", "AdapterCheckpoint",
           "AtomicCheckpointIO", "EmptyEpochGuard", "ExactResume", "LoRAEMA", "NanGuard", "NoTrainingBatch",
           "PreemptionCheckpoint", "PushToHub", "SamplePreviews", "StepProgressBar", "TrainingDiverged",
           "quiet_lightning"]
