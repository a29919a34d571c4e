"""The TRELLIS demo base: the ``trellis_ss_demo`` preset's sparse-structure flow denoiser trained FULLY (every
weight) on the demo's spheres, boxes and cylinders (``demos/trellis_shapes.py``), with the head's own
rectified-flow objective (``FlowMatching3DHead.flow_loss``: the one a LoRA run trains with).

Recipe (deterministic on one machine: fixed seeds, fixed data order): ``per_shape`` objects of each base class
held in memory, AdamW at ``lr`` with a linear warm-up and a cosine decay to a tenth, gradients clipped to norm 1.
The result is a TRELLIS checkpoint pair (``denoiser.json`` + ``denoiser.safetensors``), what ``model.ckpt`` and
every tool here load.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_lora.demos.trellis_shapes import BASE_SHAPES, shape_objects
from lightning_lora.fileio import atomic_directory

PRESET = "trellis_ss_demo"
WEIGHTS = "denoiser.safetensors"
WARMUP = 100


def preset_head(preset: str, ckpt: str | None = None):
    """A demo preset's head: a random denoiser, or the weights at ``ckpt``."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from lightning_lora.config import compose_config

    cfg = compose_config([f"model={preset}"])
    with open_dict(cfg):
        cfg.model.ckpt = ckpt  # replaces the built-base path before it is resolved
    return instantiate(cfg.model)


def demo_head(ckpt: str | None = None):
    """The ``trellis_ss_demo`` preset's head: a random denoiser, or the weights at ``ckpt``."""
    return preset_head(PRESET, ckpt)


def train_flow(head, count: int, batch_of: Callable[[torch.Tensor], dict[str, torch.Tensor]], steps: int,
               batch_size: int, lr: float, seed: int, log=print):
    """Train every weight of ``head.denoiser`` with ``head.flow_loss`` on random batches of ``count`` objects
    (``batch_of(rows)``): AdamW at ``lr``, linear warm-up, cosine decay to a tenth, gradients clipped to norm 1."""
    params = list(head.denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    start = time.perf_counter()
    for step in range(steps):
        warm = min(1.0, (step + 1) / WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        rows = torch.randint(count, (batch_size,), generator=generator)
        loss = head.flow_loss(batch_of(rows), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}: flow loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    return head.eval().requires_grad_(False)


def ensure_base(folder: str | os.PathLike, train: Callable[[], Any]) -> str:
    """``<folder>/denoiser.safetensors`` (with its ``.json``): ``train()``'s denoiser, trained under a forked RNG
    and written (atomically) the first time."""
    from lightning_lora.models.trellis.loading import save_trellis_model

    folder = Path(folder).expanduser()
    if (folder / WEIGHTS).is_file():
        return str(folder / WEIGHTS)
    with torch.random.fork_rng(devices=[]):
        head = train()
    with atomic_directory(folder) as tmp:
        save_trellis_model(head.denoiser, tmp / "denoiser")
    return str(folder / WEIGHTS)


def train_base(steps: int = 2000, batch_size: int = 16, lr: float = 2e-3, per_shape: int = 64, seed: int = 0,
               log=print):
    """The trained head (see the module's recipe)."""
    torch.manual_seed(seed)
    head = demo_head()
    objects = [shape_objects(shape, per_shape, seed) for shape in BASE_SHAPES]
    x0 = torch.from_numpy(np.concatenate([latents for latents, _, _ in objects]))
    cond = torch.from_numpy(np.concatenate([tokens for _, tokens, _ in objects]))
    return train_flow(head, len(x0), lambda rows: {"x0": x0[rows], "cond": cond[rows]}, steps, batch_size, lr,
                      seed, log)


def ensure_trellis_ss_base(folder: str | os.PathLike, steps: int = 2000, seed: int = 0, log=print) -> str:
    """``<folder>/denoiser.safetensors`` (with its ``.json``), trained and written (atomically) the first time."""
    return ensure_base(folder, lambda: train_base(steps, seed=seed, log=log))
