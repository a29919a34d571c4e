"""Submanifold sparse 3D convolution by gather-GEMM-scatter, loading spconv's ``SubMConv3d`` weights unchanged.

spconv 2.x stores the kernel as ``[out, k, k, k, in]`` (KRSC) and computes a cross-correlation:
``out[p] = bias + sum_{a,b,c} W[:, a, b, c, :] @ x[p + (a, b, c) - k//2]`` over active neighbours only,
with outputs only at the input's active sites. That equals a dense ``conv3d(padding=k//2)`` with weight
``W.permute(0, 4, 1, 2, 3)`` read at the active sites, when inactive voxels hold zeros.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_lora.models.trellis.sparse import SparseTensor

Pairs = list[tuple[torch.Tensor, torch.Tensor] | None]


def kernel_offsets(kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``k**3`` spatial offsets ``[K, 3]`` in the kernel's (a, b, c) raster order (c fastest)."""
    r = torch.arange(kernel_size, device=device) - kernel_size // 2
    grid = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def linear_code(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Collision-free int64 key of (batch, x, y, z) for coords in ``[0, size)``; batch is most significant."""
    b, x, y, z = coords.unbind(-1)
    return ((b * size + x) * size + y) * size + z


def neighbour_pairs(coords: torch.Tensor, kernel_size: int) -> Pairs:
    """For each kernel offset, the (input_row, output_row) pairs whose voxels are both active.

    Vectorised over voxels: coords are hashed to linear codes, sorted once, and every neighbour is
    looked up with ``searchsorted``. ``None`` marks an offset without any pair.
    """
    size = int(coords[:, 1:].max()) + 1
    codes = linear_code(coords, size)
    sorted_codes, perm = torch.sort(codes)
    offsets = kernel_offsets(kernel_size, coords.device)  # [K, 3]
    nb = coords[:, None, 1:] + offsets[None]  # [N, K, 3]
    inside = ((nb >= 0) & (nb < size)).all(-1)
    nb_codes = linear_code(torch.cat([coords[:, None, :1].expand(-1, offsets.shape[0], 1), nb], -1), size)
    pos = torch.searchsorted(sorted_codes, nb_codes).clamp_(max=codes.numel() - 1)
    hit = inside & (sorted_codes[pos] == nb_codes)
    src = perm[pos]  # the neighbour's row, valid where hit
    pairs: Pairs = []
    for k in range(offsets.shape[0]):
        out_rows = hit[:, k].nonzero().squeeze(1)
        pairs.append((src[out_rows, k], out_rows) if out_rows.numel() else None)
    return pairs


def submanifold_conv3d(
    x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None, pairs: Pairs | None = None
) -> torch.Tensor:
    """Features ``[N, out]`` of a submanifold conv with spconv weight ``[out, k, k, k, in]``."""
    out_ch, k = weight.shape[0], weight.shape[1]
    if pairs is None:
        pairs = neighbour_pairs(x.coords, k)
    w = weight.reshape(out_ch, k**3, weight.shape[-1])
    feats = x.feats
    centre = (k**3) // 2
    out: torch.Tensor | None = None
    for i, pair in enumerate(pairs):
        if pair is None:
            continue
        src, dst = pair
        if i == centre:  # every voxel is its own neighbour: no gather/scatter needed
            contrib = feats @ w[:, i].t()
            out = contrib if out is None else out + contrib
            continue
        contrib = feats[src] @ w[:, i].t()  # dtype follows autocast, so the accumulator is made from it
        out = (contrib.new_zeros(feats.shape[0], out_ch) if out is None else out).index_add(0, dst, contrib)
    if out is None:  # no pairs at all (cannot happen for valid coords: the centre tap always hits)
        out = feats.new_zeros(feats.shape[0], out_ch)
    if bias is not None:
        out = out + bias
    return out


class SubMConv3d(nn.Module):
    """Holds ``weight [out, k, k, k, in]`` and ``bias [out]`` under spconv's names; stride 1, dilation 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"submanifold conv needs an odd kernel_size, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same fan-in scaling as nn.Conv3d's default init; the released weights overwrite it anyway.
        fan_in = self.in_channels * self.kernel_size**3
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        key = f"subm_pairs_k{self.kernel_size}"
        pairs = x.cache.get(key)
        if pairs is None:  # once per coordinate set: shared by every conv at this resolution
            pairs = x.cache[key] = neighbour_pairs(x.coords, self.kernel_size)
        return x.replace(submanifold_conv3d(x, self.weight, self.bias, pairs))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


class SparseConv3d(nn.Module):
    """TRELLIS's ``sp.SparseConv3d(k=3)`` wrapper: the parameters live under ``.conv`` (keys ``conv.weight``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.conv = SubMConv3d(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.conv(x)
