"""`SamplePreviews`: pictures from the model being trained, every N optimizer steps, beside the base model's.

The head draws them (``head.preview_images()`` -> [prompts, seeds, 3, H, W] in [0, 1], or None when it has
nothing to show); this callback lays them out as one grid (a row per prompt, a column per seed), logs it to every
configured logger that takes images (``trackers.log_image``) and writes ``<run_dir>/samples/base.png`` (adapters
disabled, once) and ``step_NNNNNNN.png`` (with the LoRA EMA's weights when a ``LoRAEMA`` callback keeps one for
previews).
Sampling runs in eval mode without gradients on global rank 0, between optimizer steps; under FSDP every rank
samples too (each forward gathers the sharded weights from all ranks, ``strategies.full_params``) and rank 0 alone
writes.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lora.callbacks.ema import LoRAEMA
from lightning_lora.callbacks.trackers import log_image
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_bytes
from lightning_lora.strategies import full_params, shards_parameters


def image_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """[rows, cols, 3, H, W] in [0, 1] -> one [3, rows·(H+pad)-pad, cols·(W+pad)-pad] picture (white gaps)."""
    rows, cols, c, h, w = images.shape
    grid = torch.ones(c, rows * (h + pad) - pad, cols * (w + pad) - pad)
    for i in range(rows):
        for j in range(cols):
            grid[:, i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = images[i, j]
    return grid.clamp(0, 1)


def png_bytes(picture: torch.Tensor) -> bytes:
    from PIL import Image

    array = (picture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class SamplePreviews(Callback):
    def __init__(self, dirpath: str | Path, every_n_steps: int = 0, base: bool = True, final: bool = True) -> None:
        if every_n_steps < 0:
            raise UserError(f"callbacks.sample_previews.every_n_steps={every_n_steps} must be >= 0 (0 = off)")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.base, self.final = every_n_steps, base, final
        self.written: list[Path] = []
        self._last_step = -1

    def idle_for(self, head_class: type | None) -> bool:
        """Nothing to do in a run of ``head_class``: its heads never draw (``TaskHead.draws_previews``)."""
        return head_class is not None and not getattr(head_class, "draws_previews", True)

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, step: int,
              disable_adapters: bool = False) -> None:
        # A forward under FSDP is a collective (each unit gathers its shards from every rank): then all ranks sample.
        if trainer.is_global_zero or shards_parameters(trainer):
            images = self._sample(trainer, pl_module, disable_adapters)
            if trainer.is_global_zero and images is not None:
                grid = image_grid(images)
                self.written.append(atomic_write_bytes(self.dirpath / f"{name}.png", png_bytes(grid)))
                log_image(trainer.loggers, f"samples/{'base' if disable_adapters else 'lora'}", grid, step)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the sampler's activations must not stay reserved for training
        trainer.strategy.barrier("sample_previews")

    @staticmethod
    def _sample(trainer: pl.Trainer, pl_module: pl.LightningModule, disable_adapters: bool) -> torch.Tensor | None:
        was_training = pl_module.training
        # PEFT's disable_adapter() sets requires_grad on every LoRA tensor when it re-enables the adapter,
        # which would undo a trainable subset (adapter.trainable): keep the flags as they were.
        flags = [(p, p.requires_grad) for p in pl_module.parameters()]
        pl_module.eval()
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                stack.enter_context(full_params(trainer, pl_module, forward=True))
                if disable_adapters:
                    for peft in pl_module.adapters.values():
                        stack.enter_context(peft.disable_adapter())
                else:  # an EMA of the LoRA weights, when one is kept for previews (callbacks/ema.py)
                    for ema in (cb for cb in trainer.callbacks if isinstance(cb, LoRAEMA) and cb.previews):
                        stack.enter_context(ema.applied(pl_module))
                return pl_module.head.preview_images()
        finally:
            pl_module.train(was_training)
            for p, flag in flags:
                p.requires_grad_(flag)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.base and (self.every_n_steps or self.final):
            self._draw(trainer, pl_module, "base", trainer.global_step, disable_adapters=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._draw(trainer, pl_module, f"step_{step:07d}", step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._draw(trainer, pl_module, f"step_{trainer.global_step:07d}", trainer.global_step)
