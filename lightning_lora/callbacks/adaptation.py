"""`AdaptationReport`: a figure that is neither the model nor its loss, measured before training and after it.

The measure is a callable ``measure(head) -> dict | None`` named in the config (a demo's judge), or else the head's
own ``adaptation_measure()`` (default: None, nothing to report). Its dict holds ``metric`` (the figure's name),
``value`` (a float), optionally ``images`` ([rows, cols, 3, H, W] in [0, 1]) and further float entries kept side
by side. The report (``result``) is ``{metric, before, after, <entry>: {before, after}, ...}``; ``train.run``
writes it into ``metrics.json`` as ``adaptation`` and prints it; the two image sets become
``<run_dir>/samples/before_after.png`` (the "before" rows above the "after" rows), also sent to every configured
logger that takes images. Measured on global rank 0, in
eval mode without gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lora.callbacks.sample_previews import image_grid, png_bytes
from lightning_lora.callbacks.trackers import log_image
from lightning_lora.fileio import atomic_write_bytes

Measure = Callable[[Any], "dict[str, Any] | None"]


class AdaptationReport(Callback):
    def __init__(self, dirpath: str | Path, measure: Measure | None = None) -> None:
        self.dirpath, self.measure = Path(dirpath), measure
        self.before: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        if not trainer.is_global_zero:
            return None
        head = pl_module.head
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                return self.measure(head) if self.measure is not None else head.adaptation_measure()
        finally:
            pl_module.train(was_training)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.before is None:
            return
        after = self._measure(trainer, pl_module)
        if after is None:
            return
        self.result = report(self.before, after)
        if self.before.get("images") is not None and after.get("images") is not None:
            grid = image_grid(torch.cat([self.before["images"], after["images"]]))
            atomic_write_bytes(self.dirpath / "before_after.png", png_bytes(grid))
            log_image(trainer.loggers, "samples/before_after", grid, trainer.global_step)


def report(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``{metric, before, after}`` plus every other float entry the two measurements share, each before/after."""
    out: dict[str, Any] = {"metric": after["metric"], "before": float(before["value"]),
                           "after": float(after["value"])}
    for key, value in after.items():
        if key not in ("metric", "value", "images") and isinstance(value, (int, float)) and key in before:
            out[key] = {"before": float(before[key]), "after": float(value)}
    return out


def report_line(result: dict[str, Any]) -> str:
    """One console line: ``adaptation: red style share 0.03 -> 0.91 (digit_accuracy 0.85 -> 0.83)``."""
    extra = ", ".join(f"{k} {v['before']:.3g} -> {v['after']:.3g}" for k, v in result.items()
                      if isinstance(v, dict))
    return (f"adaptation: {result['metric']} {result['before']:.3g} -> {result['after']:.3g}"
            + (f" ({extra})" if extra else ""))
