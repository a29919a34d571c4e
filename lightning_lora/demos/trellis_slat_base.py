"""The TRELLIS SLat demo base: the ``trellis_slat_demo`` preset's structured-latent flow denoiser trained FULLY
(every weight) on the demo's red, blue and grey-ramp patterns (``demos/trellis_patterns.py``), with the head's own
rectified-flow objective (``FlowMatching3DHead.flow_loss``: the one a LoRA run trains with).

Recipe (deterministic on one machine: fixed seeds, fixed data order): ``per_pattern`` objects of each base pattern
held in memory, batches of ``batch_size`` objects drawn at random, AdamW at ``lr`` with a linear warm-up and a
cosine decay to a tenth, gradients clipped to norm 1. The result is a TRELLIS checkpoint pair (``denoiser.json`` +
``denoiser.safetensors``), what ``model.ckpt`` and every tool here load.
"""

from __future__ import annotations

import os

import torch

from lightning_lora.demos.trellis_base import ensure_base, preset_head, train_flow
from lightning_lora.demos.trellis_patterns import BASE_PATTERNS, pattern_objects

PRESET = "trellis_slat_demo"


def demo_head(ckpt: str | None = None):
    """The ``trellis_slat_demo`` preset's head: a random denoiser, or the weights at ``ckpt``."""
    return preset_head(PRESET, ckpt)


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
    return train_flow(head, len(objects), lambda rows: sparse_batch(objects, rows.tolist()), steps, batch_size, lr,
                      seed, log)


def ensure_trellis_slat_base(folder: str | os.PathLike, steps: int = 2000, seed: int = 0, log=print) -> str:
    """``<folder>/denoiser.safetensors`` (with its ``.json``), trained and written (atomically) the first time."""
    return ensure_base(folder, lambda: train_base(steps, seed=seed, log=log))
