"""A minimal sparse voxel tensor: integer coords ``(batch, x, y, z)`` with one feature row per active voxel.

It replaces TRELLIS's spconv/torchsparse-backed ``SparseTensor`` with plain tensors. Rows are batch-major
(all rows of item 0, then item 1, ...), which is what the per-item attention and the upsample cache rely on.
Tensors derived from the same coords (``replace``) share one ``cache`` dict, so neighbour maps and the
downsample->upsample mapping are computed once per coordinate set.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_lora.errors import UserError

_PRIVATE = object()  # marks the validation-free internal constructor path


def gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source[index]`` along dim 0 for an ``index`` that repeats rows, with a backward that sums the repeats in a
    fixed order. On CPU the backward of ``source[index]`` (an accumulating ``index_put``) adds them with racing
    atomics across threads (PyTorch lists it as non-deterministic), so identical runs drifted apart by ~1e-8
    after a few dozen steps; ``index_select``'s backward adds in index order there. On CUDA it is the other way
    round (``index_select``'s backward uses atomics, ``index_put``'s sorts), so each device keeps its fixed one."""
    return source.index_select(0, index) if source.device.type == "cpu" else source[index]


class SparseTensor:
    """Sparse voxels: ``coords`` LongTensor ``[N, 4]`` = (batch, x, y, z) and ``feats`` ``[N, ...]``.

    ``resolution``, when given, is the grid size: spatial coords must lie in ``[0, resolution)``.
    ``batch_size`` defaults to ``max(batch) + 1``; every item must have at least one voxel.
    """

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        resolution: int | None = None,
        batch_size: int | None = None,
        *,
        _cache: dict[str, Any] | None = None,
        _counts: torch.Tensor | None = None,
        _token: object = None,
    ) -> None:
        if _token is not _PRIVATE:
            coords, batch_size, _counts = _validate(coords, feats, resolution, batch_size)
        self.coords: torch.Tensor = coords
        self.feats: torch.Tensor = feats
        self.resolution = resolution
        self.batch_size: int = int(batch_size) if batch_size is not None else int(_counts.numel())
        self.counts: torch.Tensor = _counts  # voxels per batch item, int64 [B]
        self.cache: dict[str, Any] = {} if _cache is None else _cache

    # --- construction helpers -------------------------------------------------------------------------
    @classmethod
    def _trusted(
        cls,
        coords: torch.Tensor,
        feats: torch.Tensor,
        resolution: int | None,
        counts: torch.Tensor,
        cache: dict[str, Any] | None = None,
    ) -> SparseTensor:
        """Build without re-validating: for coords produced by our own ops."""
        return cls(coords, feats, resolution, int(counts.numel()), _cache=cache, _counts=counts, _token=_PRIVATE)

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same voxels (and shared caches), new features."""
        if feats.shape[0] != self.coords.shape[0]:
            n = self.coords.shape[0]
            raise UserError(f"replace: feats has {feats.shape[0]} rows, expected {n} (one per voxel)")
        return SparseTensor._trusted(self.coords, feats, self.resolution, self.counts, self.cache)

    # --- shape / layout ------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``[batch_size, *feature_shape]`` like TRELLIS."""
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def batch_index(self) -> torch.Tensor:
        return self.coords[:, 0]

    @property
    def layout(self) -> list[slice]:
        """Row range of each batch item."""
        ends = torch.cumsum(self.counts, 0).tolist()
        starts = [0, *ends[:-1]]
        return [slice(s, e) for s, e in zip(starts, ends, strict=True)]

    def broadcast(self, per_item: torch.Tensor) -> torch.Tensor:
        """Expand a ``[B, C]`` per-item tensor to one row per voxel ``[N, C]``."""
        if per_item.shape[0] != self.batch_size:
            raise UserError(f"per-item tensor has batch {per_item.shape[0]}, sparse tensor has {self.batch_size}")
        return gather_rows(per_item, self.batch_index)

    # --- moves ---------------------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseTensor:
        """Move to a device and/or cast features (coords stay int64). Caches are dropped on a device move."""
        feats = self.feats.to(device=device, dtype=dtype)
        if feats.device == self.feats.device:
            return SparseTensor._trusted(self.coords, feats, self.resolution, self.counts, self.cache)
        return SparseTensor._trusted(self.coords.to(feats.device), feats, self.resolution, self.counts.to(feats.device))

    def type(self, dtype: torch.dtype) -> SparseTensor:
        return self.replace(self.feats.type(dtype))

    def float(self) -> SparseTensor:
        return self.type(torch.float32)

    def half(self) -> SparseTensor:
        return self.type(torch.float16)

    def double(self) -> SparseTensor:
        return self.type(torch.float64)

    def __repr__(self) -> str:
        return (
            f"SparseTensor(voxels={self.coords.shape[0]}, batch_size={self.batch_size}, "
            f"feats={tuple(self.feats.shape)}, "
            f"dtype={self.dtype}, resolution={self.resolution})"
        )


def _validate(
    coords: Any, feats: Any, resolution: int | None, batch_size: int | None
) -> tuple[torch.Tensor, int, torch.Tensor]:
    if not isinstance(coords, torch.Tensor) or coords.dtype.is_floating_point or coords.dtype.is_complex:
        kind = coords.dtype if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise UserError(f"SparseTensor coords must be an integer tensor, got {kind}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise UserError(f"SparseTensor coords must have shape [N, 4] (batch, x, y, z), got {list(coords.shape)}")
    if not isinstance(feats, torch.Tensor) or feats.dim() < 1 or feats.shape[0] != coords.shape[0]:
        got = list(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise UserError(f"SparseTensor feats must have one row per voxel ([{coords.shape[0]}, C]), got {got}")
    if coords.shape[0] == 0:
        raise UserError("SparseTensor needs at least one voxel, got coords of shape [0, 4]")
    coords = coords.to(device=feats.device, dtype=torch.long)
    if resolution is not None and int(resolution) < 1:
        raise UserError(f"SparseTensor resolution must be a positive int, got {resolution}")
    lo = int(coords.min())
    if lo < 0:
        row = int((coords < 0).any(1).nonzero()[0])
        raise UserError(f"SparseTensor coords must be >= 0, got {coords[row].tolist()} at row {row}")
    if resolution is not None:
        bad = (coords[:, 1:] >= resolution).any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise UserError(
                f"SparseTensor coords {coords[row].tolist()} at row {row} lie outside the grid: x, y, z must be in "
                f"[0, {resolution})"
            )
    size = int(coords[:, 1:].max()) + 1
    b, x, y, z = coords.unbind(1)
    codes, _ = torch.sort(((b * size + x) * size + y) * size + z)
    if bool((codes[1:] == codes[:-1]).any()):
        dup = int(codes[1:][codes[1:] == codes[:-1]][0])
        raise UserError(f"SparseTensor coords must be unique, voxel {_decode(dup, size)} appears more than once")
    if bool((b[1:] < b[:-1]).any()):
        row = int((b[1:] < b[:-1]).nonzero()[0]) + 1
        raise UserError(
            f"SparseTensor rows must be sorted by batch index; row {row} has batch {int(b[row])} after "
            f"{int(b[row - 1])}"
        )
    n_items = int(b[-1]) + 1
    if batch_size is None:
        batch_size = n_items
    elif n_items > batch_size:
        raise UserError(f"SparseTensor batch index {n_items - 1} is out of range for batch_size={batch_size}")
    counts = torch.bincount(b, minlength=batch_size)
    if bool((counts == 0).any()):
        item = int((counts == 0).nonzero()[0])
        raise UserError(f"SparseTensor batch item {item} has no voxels; every item in [0, {batch_size}) needs one")
    return coords, int(batch_size), counts


def _decode(code: int, size: int) -> list[int]:
    z, code = code % size, code // size
    y, code = code % size, code // size
    x, b = code % size, code // size
    return [b, x, y, z]
