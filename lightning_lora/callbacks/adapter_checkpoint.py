"""`AdapterCheckpoint`: adapter-only snapshots during training and at the end, on bounded disk.

Writes ``<dirpath>/step_NNNNNNN/`` every ``every_n_steps`` optimizer steps (and/or at the end of every
``every_n_epochs``-th epoch) and ``<dirpath>/final/`` when fitting ends; each holds one PEFT directory per adapted
submodule; the head adds its family's own formats (inside the snapshot, or under ``run_dir`` for families whose
tools expect that, like TRELLIS's lora_ckpts/). With ``keep_last=K`` only the K newest step snapshots stay: an
older ``step_*`` directory is removed together with the family files its snapshot wrote elsewhere (the list is
kept in the resumable checkpoints, so a resumed run still removes them); ``final/`` and what it wrote are never
removed. Only global rank 0 writes and removes, and every directory appears atomically; under FSDP every rank
first joins the gather of the sharded tensors (``strategies.full_params``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_lora.checks import non_negative_int
from lightning_lora.errors import UserError
from lightning_lora.strategies import full_params

STEP_DIR = re.compile(r"^step_(\d{7})$")


class AdapterCheckpoint(Callback):
    def __init__(self, dirpath: str | Path, every_n_steps: int = 0, save_final: bool = True,
                 run_dir: str | Path | None = None, keep_last: int | None = None, every_n_epochs: int = 0) -> None:
        if every_n_steps < 0:
            raise UserError(f"callbacks.adapter_checkpoint.every_n_steps={every_n_steps} must be >= 0 (0 = off)")
        non_negative_int(every_n_epochs, "callbacks.adapter_checkpoint.every_n_epochs")
        if keep_last is not None and keep_last != -1:
            non_negative_int(keep_last, "callbacks.adapter_checkpoint.keep_last")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.save_final = save_final
        self.run_dir = Path(run_dir) if run_dir else None  # where family formats that live outside go
        self.keep_last = None if keep_last in (None, -1) else keep_last  # None: keep every snapshot
        self.last_written: Path | None = None
        self._last_step = -1
        #: optimizer step -> files a step snapshot wrote outside its directory (what removing it must remove too)
        self._outside: dict[int, list[str]] = {}
        self._final_files: set[str] = set()

    @staticmethod
    def step_dirname(step: int) -> str:
        return f"step_{step:07d}"

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        # Every rank enters: under FSDP rank 0 holds only its shard of each LoRA tensor until all ranks gather.
        with full_params(trainer, pl_module):
            if trainer.is_global_zero:
                target = self.dirpath / name
                written = pl_module.save_adapters(target, step=trainer.global_step, run_dir=self.run_dir)
                self.last_written = target
                outside = [str(p) for p in written if not Path(p).resolve().is_relative_to(target.resolve())]
                if name == "final":
                    self._final_files.update(outside)
                else:
                    self._outside[trainer.global_step] = outside
                    self._remove_old_snapshots()
        trainer.strategy.barrier("adapter_checkpoint")

    def _remove_old_snapshots(self) -> None:
        """Keep the ``keep_last`` newest step snapshots (and their family files); ``final`` is never touched."""
        if self.keep_last is None:
            return
        present = {int(m.group(1)) for p in self.dirpath.glob("step_*") if (m := STEP_DIR.match(p.name)) and p.is_dir()}
        steps = sorted(present | set(self._outside))
        # max(0, ...): with fewer snapshots than keep_last a negative slice end would still drop the oldest ones
        for step in steps[:max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(self.dirpath / self.step_dirname(step), ignore_errors=True)
            for file in self._outside.pop(step, []):
                if file not in self._final_files:
                    Path(file).unlink(missing_ok=True)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # With gradient accumulation several batches end at the same optimizer step: write once per step.
        step = trainer.global_step
        if step > 0 and step != self._last_step:
            self._last_step = step
            self._write(trainer, pl_module, self.step_dirname(step))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._snapshot(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_final:
            self._write(trainer, pl_module, "final")

    # the family files of the snapshots still on disk, so a resumed run removes them when they get old
    def state_dict(self) -> dict[str, Any]:
        return {"outside": {str(step): files for step, files in self._outside.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._outside = {int(step): list(files) for step, files in state_dict.get("outside", {}).items()}
