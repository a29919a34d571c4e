"""The TRELLIS SLat demo base: the ``trellis_slat_demo`` preset's structured-latent flow denoiser trained FULLY
(every weight) on the demo's red, blue and grey-ramp patterns (``demos/trellis_patterns.py``), with the head's own
rectified-flow objective (``FlowMatching3DHead.flow_loss``: the one a LoRA run trains with).

Recipe (deterministic on one machine: fixed seeds, fixed data order): ``per_pattern`` objects of each base pattern
held in memory, batches of ``batch_size`` objects drawn at random, AdamW at ``lr`` with a linear warm-up and a
cosine decay to a tenth, gradients clipped to norm 1. The result is a TRELLIS checkpoint pair (``denoiser.json`` +
``denoiser.safetensors``), what ``model.ckpt`` and every tool here load.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from lightning_lora.demos.trellis_patterns import BASE_PATTERNS, pattern_objects
from lightning_lora.fileio import atomic_directory

PRESET = "trellis_slat_demo"
WEIGHTS = "denoiser.safetensors"
WARMUP = 100


def demo_head(ckpt: str | None = None):
    """The ``trellis_slat_demo`` preset's head: a random denoiser, or the weights at ``ckpt``."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from lightning_lora.config import compose_config

    cfg = compose_config([f"model={PRESET}"])
    with open_dict(cfg):
        cfg.model.ckpt = ckpt  # replaces the built-base path before it is resolved
    return instantiate(cfg.model)


def sparse_batch(objects: list, rows: list[int]) -> dict[str, torch.Tensor]:
    """The objects at ``rows`` as one sparse batch (``data.trellis.collate_trellis``'s layout)."""
    coords = [torch.cat([torch.full((len(objects[r][0]), 1), i), torch.from_numpy(objects[r][0]).long()], 1)
              for i, r in enumerate(rows)]
    return {"coords": torch.cat(coords), "feats": torch.cat([torch.from_numpy(objects[r][1]) for r in rows]),
            "cond": torch.stack([torch.from_numpy(objects[r][2]) for r in rows])}


def train_base(steps: int = 2000, batch_size: int = 8, lr: float = 2e-3, per_pattern: int = 96, seed: int = 0,
               log=print):
    """The trained head (see the module's recipe)."""
    torch.manual_seed(seed)
    head = demo_head()
    objects = [obj for pattern in BASE_PATTERNS for obj in pattern_objects(pattern, per_pattern, seed)]
    params = list(head.denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    start = time.perf_counter()
    for step in range(steps):
        warm = min(1.0, (step + 1) / WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        rows = torch.randint(len(objects), (batch_size,), generator=generator).tolist()
        loss = head.flow_loss(sparse_batch(objects, rows), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}: flow loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    return head.eval().requires_grad_(False)


def ensure_trellis_slat_base(folder: str | os.PathLike, steps: int = 2000, seed: int = 0, log=print) -> str:
    """``<folder>/denoiser.safetensors`` (with its ``.json``), trained and written (atomically) the first time."""
    from lightning_lora.models.trellis.loading import save_trellis_model

    folder = Path(folder).expanduser()
    if (folder / WEIGHTS).is_file():
        return str(folder / WEIGHTS)
    with torch.random.fork_rng(devices=[]):
        head = train_base(steps, seed=seed, log=log)
    with atomic_directory(folder) as tmp:
        save_trellis_model(head.denoiser, tmp / "denoiser")
    return str(folder / WEIGHTS)
