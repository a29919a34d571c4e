"""`AdapterCheckpoint`: adapter-only snapshots during training and at the end.

Writes ``<dirpath>/step_NNNNNNN/`` every ``every_n_steps`` optimizer steps and ``<dirpath>/final/`` when
fitting ends; each holds one PEFT directory per adapted submodule; the head adds its family's own formats
(inside the snapshot, or under ``run_dir`` for families whose tools expect that, like TRELLIS's lora_ckpts/).
Only global rank 0 writes, and every directory appears atomically; under FSDP every rank first joins the gather of
the sharded tensors (``strategies.full_params``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_lora.errors import UserError
from lightning_lora.strategies import full_params


class AdapterCheckpoint(Callback):
    def __init__(self, dirpath: str | Path, every_n_steps: int = 0, save_final: bool = True,
                 run_dir: str | Path | None = None) -> None:
        if every_n_steps < 0:
            raise UserError(f"callbacks.adapter_checkpoint.every_n_steps={every_n_steps} must be >= 0 (0 = off)")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.save_final = save_final
        self.run_dir = Path(run_dir) if run_dir else None  # where family formats that live outside go
        self.last_written: Path | None = None
        self._last_step = -1

    @staticmethod
    def step_dirname(step: int) -> str:
        return f"step_{step:07d}"

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        # Every rank enters: under FSDP rank 0 holds only its shard of each LoRA tensor until all ranks gather.
        with full_params(trainer, pl_module):
            if trainer.is_global_zero:
                target = self.dirpath / name
                pl_module.save_adapters(target, step=trainer.global_step, run_dir=self.run_dir)
                self.last_written = target
        trainer.strategy.barrier("adapter_checkpoint")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # With gradient accumulation several batches end at the same optimizer step: write once per step.
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._write(trainer, pl_module, self.step_dirname(step))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_final:
            self._write(trainer, pl_module, "final")
