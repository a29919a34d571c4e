"""Sparse 2x down/upsampling exactly as TRELLIS's ``SparseDownsample`` / ``SparseUpsample``.

Downsample: ``coords // 2``, merge duplicates with ``unique`` over a batch-major linear code (so the output is
sorted by (batch, x, y, z)) and average-pool the features. TRELLIS pools with
``scatter_reduce(zeros, 'mean')`` whose default ``include_self=True`` counts the zero initial value, so each
coarse voxel gets ``sum / (n + 1)`` rather than the mean. The released weights were trained with that, so
it is reproduced here. Upsample copies each coarse row back to its fine voxels through the cached mapping.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora.models.trellis.sparse import SparseTensor, gather_rows
from lightning_lora.models.trellis.sparse_conv import linear_code

_UP_KEY = "upsample_{factor}"


def sparse_downsample(x: SparseTensor, factor: int = 2) -> SparseTensor:
    """Pool to a ``factor``-times coarser grid; the result remembers how to undo it (see sparse_upsample)."""
    coarse = x.coords.clone()
    coarse[:, 1:] = torch.div(coarse[:, 1:], factor, rounding_mode="floor")
    size = int(coarse[:, 1:].max()) + 1
    codes, idx = torch.unique(linear_code(coarse, size), sorted=True, return_inverse=True)
    n_out = codes.numel()
    summed = x.feats.new_zeros(n_out, *x.feats.shape[1:]).index_add(0, idx, x.feats)
    count = torch.bincount(idx, minlength=n_out).to(x.feats.dtype)
    pooled = summed / (count + 1).view(-1, *([1] * (x.feats.dim() - 1)))  # TRELLIS's sum/(n+1) quirk
    b, code = codes // size**3, codes % size**3
    new_coords = torch.stack([b, code // size**2, (code // size) % size, code % size], dim=-1)
    counts = torch.bincount(b, minlength=x.batch_size)
    res = None if x.resolution is None else -(-x.resolution // factor)
    out = SparseTensor._trusted(new_coords, pooled, res, counts)
    out.cache[_UP_KEY.format(factor=factor)] = (x.coords, x.counts, x.resolution, x.cache, idx)
    return out


def sparse_upsample(x: SparseTensor, factor: int = 2) -> SparseTensor:
    """Nearest-neighbour unpooling back onto the fine voxels recorded by the matching sparse_downsample."""
    entry = x.cache.get(_UP_KEY.format(factor=factor))
    if entry is None:
        raise ValueError("sparse_upsample needs a tensor produced by sparse_downsample (no upsample cache found)")
    coords, counts, resolution, fine_cache, idx = entry
    # each coarse row goes to up to factor**3 fine voxels: gather_rows sums their gradients in a fixed order
    return SparseTensor._trusted(coords, gather_rows(x.feats, idx), resolution, counts, fine_cache)


class SparseDownsample(nn.Module):
    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_downsample(x, self.factor)


class SparseUpsample(nn.Module):
    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_upsample(x, self.factor)
