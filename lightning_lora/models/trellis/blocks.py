"""Building blocks shared by the TRELLIS flow denoisers: embedders, norms, the FFN and the adaLN DiT blocks.

Key names follow TRELLIS (``adaLN_modulation.1``, ``norm2``, ``self_attn``, ``cross_attn``, ``mlp.mlp.{0,2}``) so
released checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_lora.models.trellis.attention import MultiHeadAttention, SparseMultiHeadAttention, compute_dtype
from lightning_lora.models.trellis.sparse import SparseTensor


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32 and cast back, as TRELLIS's ``LayerNorm32``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of ``t`` (callers pass ``1000 * t``; cos half first) followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AbsolutePositionEmbedder(nn.Module):
    """Fixed sin/cos embedding of integer positions ``[N, in_channels]`` -> ``[N, channels]`` (no parameters).

    Per axis ``[sin(p*f), cos(p*f)]`` with ``f = 1/10000**(i/fd)``, ``fd = channels // in_channels // 2``; axes are
    concatenated in order and zero-padded up to ``channels``.
    """

    def __init__(self, channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels, self.in_channels = channels, in_channels
        self.freq_dim = channels // in_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        freqs = 1.0 / (10000 ** (torch.arange(self.freq_dim, dtype=torch.float32, device=x.device) / self.freq_dim))
        angles = torch.outer(x.reshape(-1).float(), freqs)
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(n, -1)
        if emb.shape[1] < self.channels:
            emb = torch.cat([emb, emb.new_zeros(n, self.channels - emb.shape[1])], dim=-1)
        return emb


class FeedForwardNet(nn.Module):
    """``Linear(C, rC) -> GELU(tanh) -> Linear(rC, C)`` on dense rows (keys ``mlp.0`` and ``mlp.2``)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """DiT block: adaLN-modulated self-attention, plain cross-attention (affine ``norm2``, no gate), gated FFN.

    ``mod`` is the timestep embedding ``[B, C]`` or, with ``share_mod``, the model-level modulation ``[B, 6C]``.
    """

    attn_cls: type[MultiHeadAttention] = MultiHeadAttention

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
        share_mod: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = self.attn_cls(
            channels, num_heads=num_heads, type="self", qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm
        )
        self.cross_attn = self.attn_cls(
            channels,
            num_heads=num_heads,
            ctx_channels=ctx_channels,
            type="cross",
            qkv_bias=qkv_bias,
            qk_rms_norm=qk_rms_norm_cross,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def modulation(self, mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each ``[B, C]``."""
        return (mod if self.share_mod else self.adaLN_modulation(mod)).chunk(6, dim=1)

    def _forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (m.unsqueeze(1) for m in self.modulation(mod))
        x = x + gate1 * self.self_attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate2 * self.mlp(self.norm3(x) * (1 + scale2) + shift2)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mod, context, use_reentrant=False)
        return self._forward(x, mod, context)


class ModulatedSparseTransformerCrossBlock(ModulatedTransformerCrossBlock):
    """The same block on a SparseTensor: per-item modulation is broadcast to the voxels of each item."""

    attn_cls = SparseMultiHeadAttention

    def _forward(self, x: SparseTensor, mod: torch.Tensor, context: torch.Tensor) -> SparseTensor:  # type: ignore[override]
        shift1, scale1, gate1, shift2, scale2, gate2 = (x.broadcast(m) for m in self.modulation(mod))
        h = x.feats
        h = h + gate1 * self.self_attn(x.replace(self.norm1(h) * (1 + scale1) + shift1)).feats
        h = h + self.cross_attn(x.replace(self.norm2(h)), context).feats
        h = h + gate2 * self.mlp(self.norm3(h) * (1 + scale2) + shift2)
        return x.replace(h)
