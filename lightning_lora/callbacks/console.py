"""What a training run prints: a progress bar that counts what bounds the run, and no third-party noise.

``StepProgressBar`` is Lightning's rich bar, except that a run bounded by optimizer steps (``trainer.max_steps``
with no epoch limit) shows one bar of steps across epochs (``Steps 120/180``) instead of ``Epoch 0/-2``, which
restarts at every epoch and prints ``max_epochs - 1`` = -2. ``quiet_lightning`` hides Lightning's product tips
and one known deprecation warning that Lightning's own code triggers; both are exact matches, so every other
message and warning still shows.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

#: the loggers Lightning's ``rank_zero_info`` writes to (its own switch for console messages)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: how Lightning marks an advertisement for its other products ("💡 Tip: ... try installing litlogger")
LIGHTNING_TIP = "💡 Tip:"


class _NoLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP)


def quiet_lightning() -> None:
    """Hide Lightning's product tips and the torch deprecation its data loop triggers (idempotent)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoLightningTips) for f in logger.filters):
            logger.addFilter(_NoLightningTips())
    # Lightning's CombinedLoader builds torch's LeafSpec, which torch now deprecates in favour of
    # TreeSpec.is_leaf(); the FutureWarning names Lightning's file and nothing the user wrote.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


class StepProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar``; a run bounded by steps shows a bar of optimizer steps (see module doc).

    A training batch redraws the bar (and reads the logged metrics for it) at most ``refresh_rate`` times a second,
    and always at the last batch of an epoch or of the run: per batch, a small model's step is milliseconds, and
    a redraw every batch costs a few percent of it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drawn_at = -math.inf

    def _redraw_due(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        now = time.monotonic()
        last = batch_idx + 1 >= trainer.num_training_batches or (
            trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
        if last or now - self._drawn_at >= 1 / max(self.refresh_rate, 1e-9):
            self._drawn_at = now
            return True
        return False

    @staticmethod
    def counts_steps(trainer: pl.Trainer) -> bool:
        """Whether ``max_steps`` alone bounds the run (Lightning keeps ``max_epochs=-1`` then)."""
        return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)

    def _steps_description(self) -> str:
        return f"{'Steps':{len(self.validation_description)}}"  # as wide as "Validation": the columns align

    def _initialize_train_progress_bar_id(self) -> None:
        if not self.counts_steps(self.trainer):
            return super()._initialize_train_progress_bar_id()
        self.train_progress_bar_id = self._add_task(self.trainer.max_steps, self._steps_description())
        self._update(self.train_progress_bar_id, self.trainer.global_step)  # a resumed run starts where it was

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.counts_steps(trainer):
            return super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is None:  # one bar for the whole run
            self._initialize_train_progress_bar_id()
        self.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._redraw_due(trainer, batch_idx):
            return None
        if not self.counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)  # with accumulation: once per N batches
        self._update_metrics(trainer, pl_module)
        self.refresh()
