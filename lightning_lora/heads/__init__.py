"""Task heads, one file per model family, each implementing `heads.base.TaskHead`."""

from lightning_lora.heads.base import StepOutput, TaskHead

__all__ = ["StepOutput", "TaskHead"]
