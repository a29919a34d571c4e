"""The TRELLIS demo (``experiment=demo_trellis``): a LoRA teaches the shapes base (``demos/trellis_base.py``) a
class it never generated (tori), judged by voxel IoU (``demos/trellis_shapes.py``) before and after.

- :class:`ShapesDataModule` (``data=trellis_shapes``): objects of the chosen classes written once as a TRELLIS data
  root and read through the same code as user data (``TrellisDataModule``);
- :class:`ShapeClassMeasure`: the ``AdaptationReport`` measure: samples every class's condition tokens with a few
  seeds, and reports the share of the new class's samples judged to be that class (the figure) and each old
  class's share alongside; the pictures are front/side/top voxel projections, one row per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_lora.checks import choice, positive_int
from lightning_lora.data.trellis import SHAPES, TrellisDataModule, trellis_batch_kind, voxel_picture
from lightning_lora.demos.trellis_shapes import (
    BASE_SHAPES,
    NEW_SHAPE,
    RESOLUTION,
    class_shares,
    judge_latents,
    shape_conditions,
    shapes_digest,
    write_shapes_root,
)
from lightning_lora.errors import UserError

#: the seed of the judged samples' condition noise: not one the data sets are written with (0 and up)
MEASURE_COND_SEED = 1000


def _shapes(value: Sequence[str], key: str) -> tuple[str, ...]:
    shapes = (value,) if isinstance(value, str) else tuple(value)
    if not shapes:
        raise UserError(f"{key}: must name at least one shape of {', '.join(SHAPES)}, got none")
    for shape in shapes:
        choice(shape, key, SHAPES)
    return shapes


class ShapesDataModule(TrellisDataModule):
    """``per_shape`` objects of each of ``shapes`` (written once under ``root``) as TRELLIS SS latents with their
    class's condition tokens."""

    @classmethod
    def batch_kind(cls, cfg: Mapping[str, Any]) -> str:
        return trellis_batch_kind("ss", "tokens")

    def __init__(self, root: str, shapes: Sequence[str] = (NEW_SHAPE,), per_shape: int = 64, seed: int = 0,
                 **kwargs: Any) -> None:
        shapes = _shapes(shapes, "data.shapes")
        positive_int(per_shape, "data.per_shape", got=True)
        name = f"{'-'.join(shapes)}_n{per_shape}_s{seed}_{shapes_digest(shapes, seed)}"
        folder = write_shapes_root(Path(root).expanduser() / name, shapes, per_shape, seed)
        super().__init__(str(folder), kind="ss", resolution=RESOLUTION, **kwargs)


class ShapeClassMeasure:
    """``measure(head)``: ``seeds_per_class`` samples of each class's condition tokens (``new`` first, then ``kept``),
    judged: ``value`` = the share of ``new``'s samples judged ``new``; ``<class>_share`` for every class; ``images``
    = ``shown_per_class`` voxel pictures per class (a row each)."""

    def __init__(self, new: str = NEW_SHAPE, kept: Sequence[str] = BASE_SHAPES, seeds_per_class: int = 8,
                 steps: int = 25, cfg_strength: float = 3.0, shown_per_class: int = 4, seed: int = 0) -> None:
        choice(new, "new", SHAPES)
        self.shapes = (new, *[s for s in _shapes(kept, "kept") if s != new])
        self.seeds = positive_int(seeds_per_class, "seeds_per_class", got=True)
        self.steps = positive_int(steps, "steps", got=True)
        self.cfg_strength, self.seed = float(cfg_strength), int(seed)
        self.shown = min(positive_int(shown_per_class, "shown_per_class", got=True), self.seeds)

    def conditions(self) -> torch.Tensor:
        """[classes x seeds, T, D]: the judged samples' condition tokens, class by class."""
        return torch.from_numpy(np.concatenate([shape_conditions(s, self.seeds, MEASURE_COND_SEED)
                                                for s in self.shapes]))

    def sample(self, head: Any) -> np.ndarray:
        """The head's latents for :meth:`conditions` (one batch, noise from ``seed``: as ``sample flow3d`` draws)."""
        device = next(head.denoiser.parameters()).device
        latents = head.sample(self.conditions().to(device), steps=self.steps, cfg_strength=self.cfg_strength,
                              seed=self.seed)
        return latents.float().cpu().numpy()

    def judge(self, latents: np.ndarray) -> dict[str, Any]:
        named, scores, grids = judge_latents(latents)
        shares = class_shares(named, self.shapes, self.seeds)
        rows = [[picture_tensor(grids[i * self.seeds + j]) for j in range(self.shown)] for i in range(len(self.shapes))]
        return {"metric": f"{self.shapes[0]} share (voxel IoU judge)", "value": shares[self.shapes[0]],
                **{f"{s}_share": v for s, v in shares.items() if s != self.shapes[0]},
                "mean_iou": float(np.mean(scores)), "named": named,
                "images": torch.stack([torch.stack(row) for row in rows])}

    def __call__(self, head: Any) -> dict[str, Any]:
        return self.judge(self.sample(head))


def picture_tensor(grid: np.ndarray, panel: int = 48) -> torch.Tensor:
    """One grid's voxel picture (front, side, top) as [3, H, W] in [0, 1]."""
    grey = np.asarray(voxel_picture([grid], panel=panel), dtype=np.float32) / 255.0
    return torch.from_numpy(grey)[None].expand(3, -1, -1).contiguous()


def judge_base(weights: str | Path, seeds_per_class: int = 8) -> dict[str, Any]:
    """:class:`ShapeClassMeasure` on the base checkpoint at ``weights`` (no adapter): every class's share."""
    from lightning_lora.demos.trellis_base import demo_head

    head = demo_head(str(weights)).eval()
    with torch.no_grad():
        return ShapeClassMeasure(seeds_per_class=seeds_per_class)(head)
