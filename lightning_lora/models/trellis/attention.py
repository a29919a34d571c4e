"""Multi-head attention as TRELLIS lays it out (``to_qkv`` / ``to_q`` + ``to_kv`` / ``to_out``), on SDPA.

All projections are plain ``nn.Linear`` applied to dense tensors (for sparse inputs: the ``[N, C]`` feature
rows), so PEFT's LoRA layers can wrap them by name. Variable-length sparse attention pads the per-item token
runs to ``[B, Lmax]`` and masks padded keys; padded query rows are dropped afterwards.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.models.trellis.sparse import SparseTensor


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least fp32 (TRELLIS's ``.float()``), but keep fp64 so double-precision tests stay exact."""
    return torch.promote_types(x.dtype, torch.float32)


class MultiHeadRMSNorm(nn.Module):
    """Per-head L2 normalisation times ``gamma [H, d] * sqrt(d)`` (TRELLIS's q/k "RMS" norm; no eps)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.to(compute_dtype(x)), dim=-1) * self.gamma * self.scale
        return y.to(x.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L, H, d]`` in and out; softmax scale ``1/sqrt(d)`` like every TRELLIS backend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Dense attention over ``[B, L, C]`` tokens; ``type="cross"`` attends to a ``[B, Lc, ctx_channels]`` context."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        type: Literal["self", "cross"] = "self",  # TRELLIS's argument name
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        if type not in ("self", "cross"):
            raise ValueError(f"attention type must be 'self' or 'cross', got {type!r}")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.ctx_channels = ctx_channels if ctx_channels is not None else channels
        self._type = type
        self.qk_rms_norm = qk_rms_norm
        if type == "self":
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(self.ctx_channels, 2 * channels, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    # The projections work on any leading shape [..., C]; heads are split as [..., n, H, d].
    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.to_qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(-3)
        return (*self._norm_qk(q, k), v)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (self.num_heads, self.head_dim))
        return self.q_rms_norm(q) if self.qk_rms_norm else q

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(context).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(-3)
        return (self.k_rms_norm(k) if self.qk_rms_norm else k), v

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk_rms_norm:
            return self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self._type == "self":
            q, k, v = self.project_qkv(x)
        else:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self.project_q(x)
            k, v = self.project_kv(context)
        return self.to_out(_sdpa(q, k, v).flatten(-2))


def pad_index(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row -> (item, position) for packing the batch-major rows into ``[B, Lmax]``."""
    starts = torch.cumsum(x.counts, 0) - x.counts
    b = x.batch_index
    pos = torch.arange(b.numel(), device=b.device) - starts[b]
    return b, pos, int(x.counts.max())


def to_padded(t: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, batch: int, lmax: int) -> torch.Tensor:
    out = t.new_zeros(batch, lmax, *t.shape[1:])
    return out.index_put((b, pos), t)


class SparseMultiHeadAttention(MultiHeadAttention):
    """Full attention within each batch item of a SparseTensor (TRELLIS ``attn_mode="full"``).

    Self-attention: each voxel attends to the voxels of its own item. Cross-attention: each voxel attends to
    its item's dense context ``[B, Lc, ctx_channels]``. Returns a SparseTensor on the same voxels.
    """

    def forward(self, x: SparseTensor, context: torch.Tensor | None = None) -> SparseTensor:  # type: ignore[override]
        b, pos, lmax = pad_index(x)
        batch = x.batch_size
        if self._type == "self":
            q, k, v = (to_padded(t, b, pos, batch, lmax) for t in self.project_qkv(x.feats))
            mask = None
            if batch > 1 and bool((x.counts != lmax).any()):
                # key padding mask [B, 1, 1, Lmax]; every real query keeps >= 1 real key, so no NaN rows
                valid = torch.arange(lmax, device=x.device)[None] < x.counts[:, None]
                mask = valid[:, None, None, :]
            h = _sdpa(q, k, v, mask)
        else:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = to_padded(self.project_q(x.feats), b, pos, batch, lmax)
            k, v = self.project_kv(context)
            h = _sdpa(q, k, v)
        return x.replace(self.to_out(h[b, pos].flatten(-2)))
