"""``SparseStructureFlowModel``: TRELLIS's dense DiT denoiser over the 16^3 sparse-structure latent grid."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.errors import UserError
from lightning_lora.models.trellis.blocks import (
    AbsolutePositionEmbedder,
    ModulatedTransformerCrossBlock,
    TimestepEmbedder,
)
from lightning_lora.models.trellis.sparse_conv import SubMConv3d

# Module types whose parameters TRELLIS's convert_to_fp16 casts (norms stay fp32).
FP16_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv3d, SubMConv3d)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, X, Y, Z] -> [B, C*p^3, X/p, Y/p, Z/p]``; channel = c*p^3 + (i*p + j)*p + k (TRELLIS order)."""
    if p == 1:
        return x
    b, c, *dims = x.shape
    x = x.reshape(b, c, dims[0] // p, p, dims[1] // p, p, dims[2] // p, p)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * p**3, *(d // p for d in dims))


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if p == 1:
        return x
    b, cp, *dims = x.shape
    x = x.reshape(b, cp // p**3, p, p, p, *dims)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cp // p**3, *(d * p for d in dims))


def cast_modules(root: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of the FP16_MODULES under ``root`` (TRELLIS's convert_module_to_f16/f32)."""
    for m in root.modules():
        if isinstance(m, FP16_MODULES):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)


def torso_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the first transformer Linear: TRELLIS's ``self.dtype`` without a separate flag to keep in sync."""
    for m in model.blocks.modules():
        if isinstance(m, nn.Linear):
            return m.weight.dtype
    return torch.float32


def check_common_args(pe_mode: str, model_channels: int, num_heads: int) -> None:
    if pe_mode != "ape":
        raise UserError(f"pe_mode={pe_mode!r} is not supported by this port; valid: 'ape' (the released configs)")
    if model_channels % num_heads:
        raise UserError(f"model_channels={model_channels} must be divisible by num_heads={num_heads}")


def init_trellis_weights(model: nn.Module, share_mod: bool) -> None:
    """TRELLIS's initialize_weights: xavier Linears, N(0, .02) timestep MLP, zeroed adaLN and output layer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    mods = [model.adaLN_modulation] if share_mod else [blk.adaLN_modulation for blk in model.blocks]
    for mod in mods:
        nn.init.zeros_(mod[-1].weight)
        nn.init.zeros_(mod[-1].bias)
    nn.init.zeros_(model.out_layer.weight)
    nn.init.zeros_(model.out_layer.bias)


def check_t_cond(t: torch.Tensor, cond: torch.Tensor, batch: int, cond_channels: int) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != (batch,):
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise UserError(f"t must have shape [{batch}] (one timestep per item, already scaled by 1000), got {got}")
    cond_ok = isinstance(cond, torch.Tensor) and cond.dim() == 3 and cond.shape[0] == batch
    if not cond_ok or cond.shape[2] != cond_channels:
        got = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise UserError(f"cond must have shape [{batch}, L, {cond_channels}], got {got}")


class SparseStructureFlowModel(nn.Module):
    """Velocity model on the dense latent ``[B, in_channels, R, R, R]``: ``forward(x, t, cond) -> same shape``.

    ``use_fp16`` is accepted and recorded but the weights stay fp32: use autocast for mixed precision. Call
    ``convert_to_fp16()`` to cast the transformer Linears as TRELLIS does (then the torso runs in fp16).
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        pe_mode: Literal["ape", "rope"] = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ) -> None:
        self.config: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.model_channels, self.cond_channels, self.num_blocks = model_channels, cond_channels, num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.mlp_ratio, self.patch_size, self.pe_mode = mlp_ratio, patch_size, pe_mode
        self.use_fp16, self.use_checkpoint, self.share_mod = use_fp16, use_checkpoint, share_mod
        self.qk_rms_norm, self.qk_rms_norm_cross = qk_rms_norm, qk_rms_norm_cross
        check_common_args(pe_mode, model_channels, self.num_heads)
        if resolution % patch_size:
            raise UserError(f"resolution={resolution} must be divisible by patch_size={patch_size}")

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        grid = resolution // patch_size
        axes = torch.meshgrid(*[torch.arange(grid)] * 3, indexing="ij")
        pos = torch.stack(axes, dim=-1).reshape(-1, 3)
        # A persistent buffer, as in TRELLIS, so released checkpoints (which contain it) load strictly.
        self.register_buffer("pos_emb", AbsolutePositionEmbedder(model_channels, 3)(pos))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(
                model_channels,
                cond_channels,
                num_heads=self.num_heads,
                mlp_ratio=mlp_ratio,
                use_checkpoint=use_checkpoint,
                qk_rms_norm=qk_rms_norm,
                qk_rms_norm_cross=qk_rms_norm_cross,
                share_mod=share_mod,
            )
            for _ in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)
        init_trellis_weights(self, share_mod)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The torso's compute dtype: that of the blocks' weights (fp32 unless converted or ``.double()``)."""
        return torso_dtype(self)

    def convert_to_fp16(self) -> None:
        cast_modules(self.blocks, torch.float16)

    def convert_to_fp32(self) -> None:
        cast_modules(self.blocks, torch.float32)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        expected = [x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else "B", self.in_channels]
        expected += [self.resolution] * 3
        if not isinstance(x, torch.Tensor) or list(x.shape) != expected:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"x must have shape {expected} (B, in_channels, resolution^3), got {got}")
        check_t_cond(t, cond, x.shape[0], self.cond_channels)
        b, p = x.shape[0], self.patch_size
        h = patchify(x, p)
        h = h.reshape(b, h.shape[1], -1).transpose(1, 2)  # tokens in x, y, z raster order
        h = self.input_layer(h) + self.pos_emb[None].to(h.dtype)
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, h, cond = t_emb.type(self.dtype), h.type(self.dtype), cond.type(self.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)
        h = F.layer_norm(h.type(x.dtype), h.shape[-1:])  # eps 1e-5, no affine
        h = self.out_layer(h)
        grid = self.resolution // p
        h = h.transpose(1, 2).reshape(b, h.shape[2], grid, grid, grid)
        return unpatchify(h, p).contiguous()
