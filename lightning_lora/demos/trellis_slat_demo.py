"""The TRELLIS SLat demo (``experiment=demo_trellis_slat``): a LoRA teaches the patterns base
(``demos/trellis_slat_base.py``) a colour pattern it never generated (stripes), judged by colour distance to every
pattern's template (``demos/trellis_patterns.py``) before and after.

- :class:`PatternsDataModule` (``data=trellis_patterns``): objects of the chosen patterns written once as a TRELLIS
  data root and read through the same code as user data (``TrellisDataModule``, structured latents);
- :class:`PatternMeasure`: the ``AdaptationReport`` measure: samples every pattern's condition tokens on a few given
  structures, and reports the share of the new pattern's samples judged to be that pattern (the figure) and each
  old pattern's share alongside; the pictures are the voxels in their decoded colours, one row per pattern.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_lora.checks import choice, positive_int
from lightning_lora.data.trellis import TrellisDataModule, trellis_batch_kind
from lightning_lora.demos.trellis_patterns import (
    BASE_PATTERNS,
    MEASURE_SIZE,
    NEW_PATTERN,
    PATTERNS,
    RESOLUTION,
    SOLIDS,
    class_shares,
    colour_picture,
    judge,
    pattern_conditions,
    patterns_digest,
    solid_coords,
    write_patterns_root,
)
from lightning_lora.errors import UserError

#: the seed of the judged samples' condition noise: not one the data sets are written with (0 and up)
MEASURE_COND_SEED = 1000


def _patterns(value: Sequence[str], key: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not patterns:
        raise UserError(f"{key}: must name at least one pattern of {', '.join(PATTERNS)}, got none")
    for pattern in patterns:
        choice(pattern, key, PATTERNS)
    return patterns


class PatternsDataModule(TrellisDataModule):
    """``per_pattern`` objects of each of ``patterns`` (written once under ``root``) as TRELLIS structured latents
    with their pattern's condition tokens."""

    @classmethod
    def batch_kind(cls, cfg: Mapping[str, Any]) -> str:
        return trellis_batch_kind("slat", "tokens")

    def __init__(self, root: str, patterns: Sequence[str] = (NEW_PATTERN,), per_pattern: int = 96, seed: int = 0,
                 **kwargs: Any) -> None:
        patterns = _patterns(patterns, "data.patterns")
        positive_int(per_pattern, "data.per_pattern", got=True)
        name = f"{'-'.join(patterns)}_n{per_pattern}_s{seed}_{patterns_digest(patterns, seed)}"
        folder = write_patterns_root(Path(root).expanduser() / name, patterns, per_pattern, seed)
        super().__init__(str(folder), kind="slat", resolution=RESOLUTION, **kwargs)


class PatternMeasure:
    """``measure(head)``: ``seeds_per_class`` samples of each pattern's condition tokens (``new`` first, then
    ``kept``), sample ``j`` on the surface of solid ``j mod 3`` (sphere, box, cylinder), judged: ``value`` = the share
    of ``new``'s samples judged ``new``; ``<pattern>_share`` for every pattern; ``mean_cosine`` the mean similarity to
    the most similar template; ``images`` = ``shown_per_class`` coloured voxel pictures per pattern (a row each)."""

    def __init__(self, new: str = NEW_PATTERN, kept: Sequence[str] = BASE_PATTERNS, seeds_per_class: int = 6,
                 steps: int = 25, cfg_strength: float = 3.0, shown_per_class: int = 3, seed: int = 0) -> None:
        choice(new, "new", PATTERNS)
        self.patterns = (new, *[p for p in _patterns(kept, "kept") if p != new])
        self.seeds = positive_int(seeds_per_class, "seeds_per_class", got=True)
        self.steps = positive_int(steps, "steps", got=True)
        self.cfg_strength, self.seed = float(cfg_strength), int(seed)
        self.shown = min(positive_int(shown_per_class, "shown_per_class", got=True), self.seeds)

    def conditions(self) -> torch.Tensor:
        """[patterns x seeds, T, D]: the judged samples' condition tokens, pattern by pattern."""
        return torch.from_numpy(np.concatenate([pattern_conditions(p, self.seeds, MEASURE_COND_SEED)
                                                for p in self.patterns]))

    def structures(self) -> list[np.ndarray]:
        """The voxels [N, 3] each judged sample is drawn on (the same solids for every pattern)."""
        return [solid_coords(SOLIDS[j % len(SOLIDS)], MEASURE_SIZE) for _ in self.patterns for j in range(self.seeds)]

    def sample(self, head: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """(coords, feats) of the head's samples for :meth:`conditions` (one batch, noise from ``seed``)."""
        device = next(head.denoiser.parameters()).device
        structures = self.structures()
        coords = torch.cat([torch.cat([torch.full((len(c), 1), i), torch.from_numpy(c).long()], 1)
                            for i, c in enumerate(structures)])
        latent = head.sample(self.conditions().to(device), coords=coords.to(device), steps=self.steps,
                             cfg_strength=self.cfg_strength, seed=self.seed)
        feats = latent.feats.float().cpu().numpy()
        batch = coords[:, 0].numpy()
        return [(c, feats[batch == i]) for i, c in enumerate(structures)]

    def judge(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        named, scores = judge(samples)
        shares = class_shares(named, self.patterns, self.seeds)
        rows = [[torch.from_numpy(colour_picture(*samples[i * self.seeds + j])) for j in range(self.shown)]
                for i in range(len(self.patterns))]
        return {"metric": f"{self.patterns[0]} share (colour pattern judge)", "value": shares[self.patterns[0]],
                **{f"{p}_share": v for p, v in shares.items() if p != self.patterns[0]},
                "mean_cosine": float(np.mean(scores)), "named": named,
                "images": torch.stack([torch.stack(row) for row in rows])}

    def __call__(self, head: Any) -> dict[str, Any]:
        return self.judge(self.sample(head))


def judge_base(weights: str | Path, seeds_per_class: int = 6) -> dict[str, Any]:
    """:class:`PatternMeasure` on the base checkpoint at ``weights`` (no adapter): every pattern's share."""
    from lightning_lora.demos.trellis_slat_base import demo_head

    head = demo_head(str(weights)).eval()
    with torch.no_grad():
        return PatternMeasure(seeds_per_class=seeds_per_class)(head)
