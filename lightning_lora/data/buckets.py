"""Aspect-ratio buckets (``data.buckets``): every image trains near its own shape instead of a square crop.

Buckets are the (width, height) sizes, multiples of ``step``, whose area fits a pixel budget (``pixels``, default
``resolution²``) with a side ratio of at most ``max_ratio``: for each width the tallest height that fits, the
same shape turned, and the square. An image goes to the bucket nearest its aspect ratio (in log ratio; ties to
the smaller width), is resized to cover it and cropped to it (``images.ImageTransform``); the crop's top-left
corner and the original size are kept in the batch for SDXL's micro-conditioning.

Batches hold one bucket each:
- map-style data (image folders): ``BucketSampler`` orders indices so that every run of ``batch_size`` belongs to
  one bucket (a bucket's remainder is filled with its own images again; validation counts each image once, by
  its index), shuffles those runs with a seed drawn from torch's RNG when a pass starts (as ``RandomSampler``),
  and gives each process its share of the runs. It is a ``DistributedSampler``, so Lightning keeps it under
  DDP, and a plain sampler under a ``BatchSampler``, so ``ExactResume`` wraps and skips it like any other (exact
  resume);
- streams (tar shards): ``BucketGroups`` holds back samples per bucket and lets a bucket's samples through in runs
  of ``batch_size`` as it fills; the DataLoader's batches of that size are then single-bucket. What is left when a
  pass ends goes out padded with the bucket's own samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler

from lightning_lora.checks import number, optional_positive_int, positive_int
from lightning_lora.errors import UserError

Size = tuple[int, int]  # (width, height), as PIL gives it


@dataclass(frozen=True)
class BucketSpec:
    """The bucket grid: ``pixels`` per image at most, sides multiples of ``step``, side ratio at most ``max_ratio``."""

    pixels: int
    step: int = 64
    max_ratio: float = 2.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, resolution: int) -> BucketSpec | None:
        """None when buckets are off (no config, or ``enabled: false``)."""
        if not config or not config.get("enabled", False):
            return None
        unknown = sorted(set(config) - {"enabled", "pixels", "step", "max_ratio"})
        if unknown:
            raise UserError(f"data.buckets.{unknown[0]} is unknown; valid: enabled, pixels, step, max_ratio")
        pixels = optional_positive_int(config.get("pixels"), "data.buckets.pixels", hint=" or null (resolution²)")
        step = positive_int(config.get("step", 64), "data.buckets.step", hint=" (e.g. 64)")
        ratio = number(config.get("max_ratio", 2.0), "data.buckets.max_ratio", low=1)
        spec = cls(pixels or resolution * resolution, step, float(ratio))
        if spec.pixels < step * step:
            raise UserError(f"data.buckets.pixels={spec.pixels} is below one {step}x{step} bucket; "
                            f"use at least {step * step} or a smaller data.buckets.step")
        return spec

    def sizes(self) -> list[Size]:
        """Every bucket, sorted by width."""
        side = math.isqrt(self.pixels) // self.step * self.step
        found = {(side, side)}
        for width in range(self.step, self.pixels // self.step + 1, self.step):
            height = self.pixels // width // self.step * self.step
            if height >= self.step and max(width / height, height / width) <= self.max_ratio:
                found |= {(width, height), (height, width)}  # both orientations of every shape
        return sorted(found)

    def nearest(self, size: Size, sizes: Sequence[Size] | None = None) -> Size:
        """The bucket whose aspect ratio is nearest ``size``'s (width, height)."""
        ratio = math.log(size[0] / size[1])
        return min(sizes or self.sizes(), key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), b[0]))


def bucket_groups(buckets: Sequence[Size]) -> dict[Size, list[int]]:
    """Positions of the samples by bucket, in their order."""
    groups: dict[Size, list[int]] = {}
    for i, bucket in enumerate(buckets):
        groups.setdefault(tuple(bucket), []).append(i)
    return groups


class BucketSampler(DistributedSampler):
    """Indices in single-bucket runs of ``batch_size`` (see the module docstring). ``shuffle=False`` (validation):
    buckets in size order, each in its own order. The pass's seed comes from torch's RNG as the pass starts, so
    every process, seeded alike, draws the same plan and takes runs ``rank, rank + world, ...`` (the plan is
    padded with its first runs to a multiple of ``world``: every process gets as many batches)."""

    def __init__(self, buckets: Sequence[Size], batch_size: int, shuffle: bool = True, rank: int = 0,
                 world: int = 1) -> None:
        # DistributedSampler's own state is not used: it is the type Lightning leaves in place under DDP
        self.buckets, self.batch_size, self.shuffle = [tuple(b) for b in buckets], batch_size, shuffle
        self.rank, self.num_replicas, self.epoch, self.seed, self.drop_last = rank, world, 0, 0, False
        self.dataset = self.buckets

    def runs(self, generator: torch.Generator | None) -> list[list[int]]:
        """The whole pass's batches (every process's), in order."""
        runs: list[list[int]] = []
        for _, members in sorted(bucket_groups(self.buckets).items()):
            if generator is not None:
                members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            short = -len(members) % self.batch_size
            members = members + [members[i % len(members)] for i in range(short)]
            runs += [members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        if generator is not None:
            runs = [runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()]
        short = -len(runs) % self.num_replicas
        return runs + [runs[i % len(runs)] for i in range(short)]

    def __iter__(self) -> Iterator[int]:
        generator = None
        if self.shuffle:  # one draw from torch's RNG, as RandomSampler: seed_everything and ExactResume fix it
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        for run in self.runs(generator)[self.rank::self.num_replicas]:
            yield from run

    def __len__(self) -> int:
        runs = sum(-(-len(m) // self.batch_size) for m in bucket_groups(self.buckets).values())
        return -(-runs // self.num_replicas) * self.batch_size


class BucketGroups:
    """A stream stage after the transform: samples held back per bucket (the size of their ``pixel_values``) and let
    through ``batch_size`` at a time, so that consecutive runs of ``batch_size`` share a bucket; the rest, padded
    with the bucket's own samples, when the stream ends."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        waiting: dict[tuple[int, ...], list[dict]] = {}
        for sample in src:
            held = waiting.setdefault(tuple(sample["pixel_values"].shape[-2:]), [])
            held.append(sample)
            if len(held) == self.batch_size:
                yield from held
                held.clear()
        for held in waiting.values():
            if held:
                yield from (held[i % len(held)] for i in range(self.batch_size))


__all__ = ["BucketGroups", "BucketSampler", "BucketSpec", "bucket_groups"]
