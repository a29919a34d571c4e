"""`NanGuard`: a non-finite loss or LoRA gradient stops the run (or skips that optimizer step).

The check runs after backward and before the optimizer step (``on_before_optimizer_step``), so a bad step
never reaches the weights: with ``action: stop`` the run ends with `TrainingDiverged` (one line naming the
step, the last adapter snapshot and the last checkpoint, which were written before and stay intact); with
``action: skip`` the step's gradients are dropped (set to ``None``, so AdamW leaves those parameters and their
moments alone) and training goes on, up to ``max_skips`` times in a row. All processes decide together.

Under fp16 mixed precision the gradient scaler already skips steps with inf/nan gradients (that is how it
finds its scale), so only the loss is checked there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_lora.checks import choice
from lightning_lora.errors import UserError

ACTIONS = ("stop", "skip")


class TrainingDiverged(UserError):
    """A non-finite loss or gradient stopped training; the message names the step and what is intact."""


def _describe(value: float) -> str:
    return "nan" if math.isnan(value) else ("+inf" if value > 0 else "-inf")


#: devices whose fused check (the one autocast's GradScaler runs) takes the gradients as they are
_FUSED_CHECK_DEVICES = ("cpu", "cuda")


def _any_non_finite(grads: list[torch.Tensor]) -> bool:
    """Whether some element of ``grads`` is nan or inf.

    One fused kernel call per device and dtype (``_amp_foreach_non_finite_check_and_unscale_`` with an inverse
    scale of 1, which writes every value back unchanged): on a small model's step, each extra tensor op costs
    more than the check itself. Elsewhere (another device, a tensor subclass or a sparse gradient), max |g| per
    tensor in one foreach pass: it is nan or inf exactly when some element is."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        if type(g) is not torch.Tensor or g.layout != torch.strided or g.device.type not in _FUSED_CHECK_DEVICES:
            peaks = torch._foreach_max(torch._foreach_abs(grads))
            return not bool(torch.stack([x.float() for x in peaks]).isfinite().all())
        groups.setdefault((g.device, g.dtype), []).append(g)
    found: dict[torch.device, torch.Tensor] = {}
    for (device, _), group in groups.items():
        flag = found.setdefault(device, torch.zeros(1, device=device))
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
    return any(bool(flag) for flag in found.values())


class NanGuard(Callback):
    def __init__(self, action: str = "stop", check_gradients: bool = True, max_skips: int = 10) -> None:
        choice(action, "callbacks.nan_guard.action", ACTIONS)
        if max_skips < 1:
            raise UserError(f"callbacks.nan_guard.max_skips={max_skips} must be >= 1")
        self.action = action
        self.check_gradients = check_gradients
        self.max_skips = max_skips
        self.skipped_steps: list[int] = []
        self._loss_problem: str | None = None
        self._skips_in_a_row = 0
        self._trained_of: pl.LightningModule | None = None
        self._trained_params: list[tuple[str, torch.nn.Parameter]] = []

    # ------------------------------------------------------------------ checks
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach().float())
        if not math.isfinite(value):
            self._loss_problem = f"loss is {_describe(value)}"

    def _trained(self, pl_module: pl.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        """The module's trainable parameters by name, listed once: walking a large base model's module tree on
        every step costs more than the check itself."""
        if self._trained_of is not pl_module:
            self._trained_of = pl_module
            self._trained_params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        return self._trained_params

    def _gradient_problem(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        if not self.check_gradients or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return None
        named = [(n, p.grad) for n, p in self._trained(pl_module) if p.grad is not None and p.grad.numel()]
        if not named:
            return None
        # one pass for all gradients; the slow loop below only runs to name the first bad one
        if not _any_non_finite([g for _, g in named]):
            return None
        for name, grad in named:
            if not torch.isfinite(grad).all():
                kind = "nan" if torch.isnan(grad).any() else "inf"
                return f"gradient of {name} has {kind} values"
        return None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        problem = self._loss_problem or self._gradient_problem(trainer, pl_module)
        self._loss_problem = None
        bad = problem is not None
        if trainer.world_size > 1:  # all processes decide together (one process: no tensor, no collective)
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._skips_in_a_row = 0
            return
        problem = problem or "another process saw a non-finite loss or gradient"
        step = trainer.global_step + 1  # the optimizer step being taken (steps count from 1)
        if self.action == "skip" and self._skips_in_a_row < self.max_skips:
            self._skips_in_a_row += 1
            self.skipped_steps.append(step)
            optimizer.zero_grad(set_to_none=True)
            if trainer.is_global_zero:
                print(f"warning: step {step}: {problem}; step skipped (nan_guard.action=skip)", flush=True)
            return
        why = (f"{self.max_skips} steps in a row were skipped; " if self.action == "skip" else "")
        raise TrainingDiverged(
            f"training stopped at step {step} (epoch {trainer.current_epoch}): {problem}; {why}"
            f"nothing of this step was applied. Last good adapter: {self._last_adapter(trainer)}; "
            f"last checkpoint: {self._last_checkpoint(trainer)} (lower optimizer.lr, set "
            "trainer.gradient_clip_val, or use callbacks.nan_guard.action=skip)"
        )

    # ------------------------------------------------------------------ what is intact
    @staticmethod
    def _last_adapter(trainer: pl.Trainer) -> str:
        from lightning_lora.callbacks.adapter_checkpoint import AdapterCheckpoint

        for cb in trainer.callbacks:
            if isinstance(cb, AdapterCheckpoint) and cb.last_written is not None:
                return str(cb.last_written)
            if isinstance(cb, AdapterCheckpoint):
                snapshots = sorted(cb.dirpath.glob("step_*")) if cb.dirpath.is_dir() else []
                if snapshots:
                    return str(snapshots[-1])
        return "none written yet"

    @staticmethod
    def _last_checkpoint(trainer: pl.Trainer) -> str:
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.last_model_path and Path(cb.last_model_path).is_file():
                    return cb.last_model_path
                if cb.dirpath and (last := Path(cb.dirpath) / "last.ckpt").is_file():
                    return str(last)
        return "none written yet"
