"""`PreemptionCheckpoint`: SIGTERM (a pre-empted job) writes ``last.ckpt`` before the process exits.

Lightning installs a SIGTERM handler during ``fit``: it only sets ``trainer.received_sigterm``, and the loop
raises ``SIGTERMException`` at the end of the current batch (or validation batch). Nothing is saved by
default. This callback saves the resumable checkpoint in ``on_exception`` for that exception only (every
process takes part, as ``save_checkpoint`` needs), so ``resume=last`` loses no step. ``train.main`` then
exits with status 143 (128 + SIGTERM) and one line saying where to resume from.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(Callback):
    def __init__(self, dirpath: str | Path | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath) if dirpath else None  # default: the ModelCheckpoint's dirpath
        self.filename = filename
        self.saved: Path | None = None
        self.saved_step: int | None = None

    def _target(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath / self.filename
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return Path(cb.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        target = self._target(trainer)
        trainer.save_checkpoint(target)  # atomic through AtomicCheckpointIO; every rank must call it
        self.saved, self.saved_step = target, trainer.global_step
