"""`EmptyEpochGuard`: a training epoch that yields no batch stops the run, naming the data and what was skipped.

Without it, a stream that yields nothing (an empty shard; every image unreadable with ``skip_unreadable``) makes
Lightning loop through empty epochs forever under ``max_epochs=-1`` (no step is ever taken, so ``max_steps`` never
arrives), and a sized loader of length 0 ends ``fit`` at once with exit 0 and an untrained adapter.

The guard names no data module. It asks the data module, when it has them, for two optional methods:

- ``data_source() -> str``: where the training samples come from, as the user wrote it
  (``data.train_shards='/x/*.tar'``);
- ``skipped_samples() -> Mapping[str, int]``: how many training samples one pass drops, by reason
  (``{"unreadable image": 12}``). DataLoader workers keep their own counts, so a module may count again in this
  process when asked; this runs only on the way to the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_lora.errors import UserError


class NoTrainingBatch(UserError):
    """A training epoch yielded no batch: the message names the data source and the samples skipped, by reason."""


def data_source(datamodule: Any) -> str:
    """The data module's own words for where its training samples come from, else its class name."""
    describe = getattr(datamodule, "data_source", None)
    if callable(describe):
        return str(describe())
    return f"the training data ({type(datamodule).__name__})" if datamodule is not None else "the training data"


def skipped_summary(datamodule: Any) -> str:
    """``12 skipped: unreadable image, 1 skipped: unreadable shard``, or what it means when nothing was skipped."""
    count = getattr(datamodule, "skipped_samples", None)
    try:
        skipped: Mapping[str, int] = count() if callable(count) else {}
    except Exception:  # the count is a courtesy on the way to the error; a failure of its own must not hide it
        skipped = {}
    parts = [f"{n} skipped: {reason}" for reason, n in skipped.items() if n]
    return ", ".join(parts) or "none skipped: the source holds no training sample"


def no_batch_error(trainer: pl.Trainer) -> NoTrainingBatch:
    datamodule = getattr(trainer, "datamodule", None)
    return NoTrainingBatch(f"{data_source(datamodule)}: the epoch yielded no training batch "
                           f"({skipped_summary(datamodule)})")


class EmptyEpochGuard(Callback):
    """Raise `NoTrainingBatch` at the end of a training epoch that yielded no batch, or at the end of a ``fit`` whose
    training loader has no batch at all (Lightning then skips training). Put it first among the callbacks, so that
    nothing is written for such an epoch (adapter snapshots, checkpoints, the final adapter)."""

    def __init__(self) -> None:
        self._batches = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._batches += 1

    @staticmethod
    def _resumed_batches(trainer: pl.Trainer) -> int:
        # batches of this epoch done before a mid-epoch resume (restored from the checkpoint): not an empty epoch
        progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
        return int(getattr(getattr(progress, "current", None), "ready", 0) or 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches == 0 and self._resumed_batches(trainer) == 0:
            raise no_batch_error(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.num_training_batches == 0:  # a sized loader of length 0 (limit_train_batches=0 leaves it unset)
            raise no_batch_error(trainer)
