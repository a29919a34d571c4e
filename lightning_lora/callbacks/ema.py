"""`LoRAEMA`: an exponential moving average of the trainable tensors only (the LoRA factors, and a head's extra
parameters), not of the whole module: Lightning's weight averaging copies the frozen base too.

Every ``every_n_steps`` optimizer steps the average moves towards the weights: ``ema -= (1 - d) · (ema - w)``, with
the decay ``d`` of diffusers' ``EMAModel.get_decay`` at the update count ``n`` (counted from 1):
``k = n - update_after_step - 1``; ``d = 0`` while ``k <= 0`` (the average is the weights); otherwise
``d = 1 - (1 + k / inv_gamma) ** -power`` with ``warmup`` (``EMAModel(use_ema_warmup=True)``) or
``(1 + k) / (10 + k)`` without it; then ``d = max(min(d, decay), min_decay)``. The average lives in fp32 on the
weights' device and is saved in the resumable checkpoints (a resumed run continues it bit for bit). When fitting
ends it is written as its own snapshot, ``<dirpath>/final_ema/``, with every format the family writes (formats a
family puts outside a snapshot, TRELLIS's ``lora_ckpts/``, go inside it here), and ``SamplePreviews`` draws with it
(``previews: true``). ``enabled: false`` (the shipped default) makes it do nothing and save nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lora.checks import boolean, fraction, non_negative_int, number, positive_int
from lightning_lora.errors import UserError
from lightning_lora.strategies import shards_parameters

EMA_SNAPSHOT = "final_ema"


def ema_decay(update: int, decay: float, update_after_step: int = 0, warmup: bool = False, inv_gamma: float = 1.0,
              power: float = 2 / 3, min_decay: float = 0.0) -> float:
    """The decay of update number ``update`` (1, 2, ...), as diffusers' ``EMAModel.get_decay`` computes it."""
    step = max(0, update - update_after_step - 1)
    if step <= 0:
        return 0.0
    current = 1 - (1 + step / inv_gamma) ** -power if warmup else (1 + step) / (10 + step)
    return max(min(current, decay), min_decay)


class LoRAEMA(Callback):
    def __init__(self, dirpath: str | Path, enabled: bool = True, decay: float = 0.9999, every_n_steps: int = 1,
                 update_after_step: int = 0, warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
                 min_decay: float = 0.0, previews: bool = True) -> None:
        key = "callbacks.ema"
        self.enabled = boolean(enabled, f"{key}.enabled")
        self.decay = fraction(decay, f"{key}.decay", interval="[0, 1]")
        self.min_decay = fraction(min_decay, f"{key}.min_decay", interval="[0, 1]")
        self.every_n_steps = positive_int(every_n_steps, f"{key}.every_n_steps")
        self.update_after_step = non_negative_int(update_after_step, f"{key}.update_after_step")
        self.warmup = boolean(warmup, f"{key}.warmup")
        self.inv_gamma = number(inv_gamma, f"{key}.inv_gamma", low=0, low_open=True)
        self.power = number(power, f"{key}.power", low=0, low_open=True)
        self.previews = boolean(previews, f"{key}.previews")
        self.dirpath = Path(dirpath)
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0  # averaging steps taken (diffusers' optimization_step)
        self._last_step = -1
        self._loaded: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the average
    @staticmethod
    def _trainable(pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return ema_decay(self.updates, self.decay, self.update_after_step, self.warmup, self.inv_gamma, self.power,
                         self.min_decay)

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule) -> None:
        """One averaging step over the trainable tensors (what ``on_train_batch_end`` does every N steps)."""
        self.updates += 1
        keep = self.current_decay()
        for name, param in self._trainable(pl_module).items():
            self.shadow[name].sub_((1 - keep) * (self.shadow[name] - param.detach().float()))

    @contextlib.contextmanager
    def applied(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """The module's trainable tensors replaced by their average inside the block, restored after it."""
        if not self.enabled or not self.shadow:
            yield
            return
        params = self._trainable(pl_module)
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit" and shards_parameters(trainer):
            raise UserError("callbacks.ema.enabled=true is not supported with strategy=fsdp (each rank holds only a "
                            "shard of every LoRA tensor); use strategy=ddp or single")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        params = self._trainable(pl_module)
        loaded, self._loaded = self._loaded, None
        if loaded is not None:  # a resumed run: the checkpoint's average, exactly
            if set(loaded["shadow"]) != set(params):
                raise UserError("resume: the checkpoint's EMA (callbacks.ema) holds other tensors than this run "
                                "trains; resume with the same adapter settings")
            self.shadow = {n: loaded["shadow"][n].to(params[n].device, torch.float32).clone() for n in params}
            self.updates, self._last_step = int(loaded["updates"]), int(loaded["last_step"])
        elif not self.shadow:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches end at one optimizer step: average once per step
        if self.enabled and step > 0 and step != self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            self.update(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not self.shadow:
            return
        if trainer.is_global_zero:
            target = self.dirpath / EMA_SNAPSHOT
            with self.applied(pl_module):
                pl_module.save_adapters(target, step=trainer.global_step, run_dir=target)
        trainer.strategy.barrier("ema_snapshot")

    @property
    def idle(self) -> bool:
        """Off (``enabled: false``): it averages, saves and stores nothing (``train.run`` then leaves it out)."""
        return not self.enabled

    # ------------------------------------------------------------------ resumable checkpoints
    def state_dict(self) -> dict[str, Any]:
        if not self.enabled or not self.shadow:
            return {}  # Lightning stores nothing for an empty state: a run without EMA keeps its checkpoints
        return {"shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}, "updates": self.updates,
                "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._loaded = state_dict
