"""``SLatFlowModel`` / ``ElasticSLatFlowModel``: TRELLIS's sparse DiT denoiser over structured latents (64^3).

Input voxels go through sparse conv res-blocks that downsample by ``patch_size`` (2 -> a 32^3 token grid), the
transformer blocks with absolute position embeddings of the coarse coords, and res-blocks that upsample back with
U-Net style skip concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.errors import UserError
from lightning_lora.models.trellis.blocks import (
    AbsolutePositionEmbedder,
    LayerNorm32,
    ModulatedSparseTransformerCrossBlock,
    TimestepEmbedder,
)
from lightning_lora.models.trellis.sparse import SparseTensor
from lightning_lora.models.trellis.sparse_conv import SparseConv3d
from lightning_lora.models.trellis.sparse_spatial import SparseDownsample, SparseUpsample
from lightning_lora.models.trellis.sparse_structure_flow import (
    cast_modules,
    check_common_args,
    check_t_cond,
    init_trellis_weights,
    torso_dtype,
)


class SparseResBlock3d(nn.Module):
    """Res-block on sparse voxels; optional 2x down/upsample happens first, then norm-SiLU-conv twice.

    The timestep conditions the second norm as ``norm2(h) * (1 + scale) + shift`` (note: scale first in the chunk).
    Linear layers are plain ``nn.Linear`` applied to the feature rows (same keys as TRELLIS's ``SparseLinear``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        downsample: bool = False,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        if downsample and upsample:
            raise ValueError("SparseResBlock3d cannot downsample and upsample at the same time")
        self.channels, self.emb_channels = channels, emb_channels
        self.out_channels = out_channels or channels
        self.downsample, self.upsample = downsample, upsample
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(self.out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, self.out_channels, 3)
        self.conv2 = SparseConv3d(self.out_channels, self.out_channels, 3)
        nn.init.zeros_(self.conv2.conv.weight)  # TRELLIS zero_module: the block starts as its skip path
        nn.init.zeros_(self.conv2.conv.bias)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels))
        self.skip_connection: nn.Module = (
            nn.Linear(channels, self.out_channels) if channels != self.out_channels else nn.Identity()
        )
        self.updown: nn.Module | None = None
        if downsample:
            self.updown = SparseDownsample(2)
        elif upsample:
            self.updown = SparseUpsample(2)

    def forward(self, x: SparseTensor, emb: torch.Tensor) -> SparseTensor:
        scale, shift = self.emb_layers(emb).type(x.dtype).chunk(2, dim=1)
        if self.updown is not None:
            x = self.updown(x)
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = F.silu(self.norm2(h.feats) * (1 + x.broadcast(scale)) + x.broadcast(shift))
        h = self.conv2(x.replace(h)).feats
        return x.replace(h + self.skip_connection(x.feats))


class SLatFlowModel(nn.Module):
    """Velocity model on a SparseTensor with ``in_channels`` features: ``forward(x, t, cond) -> SparseTensor``.

    ``x.coords`` must lie in ``[0, resolution)``. ``use_fp16`` is accepted and recorded but weights stay fp32 (use
    autocast); ``convert_to_fp16()`` casts the io blocks' and transformer's Linears/convs as TRELLIS does.
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
        num_io_res_blocks: int = 2,
        io_block_channels: list[int] | None = None,
        pe_mode: Literal["ape", "rope"] = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        use_skip_connection: bool = True,
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
        self.num_io_res_blocks = num_io_res_blocks
        self.io_block_channels = [int(c) for c in io_block_channels] if io_block_channels is not None else None
        self.config["io_block_channels"] = self.io_block_channels  # plain list: Hydra passes a ListConfig
        self.use_fp16, self.use_checkpoint, self.share_mod = use_fp16, use_checkpoint, share_mod
        self.use_skip_connection = use_skip_connection
        self.qk_rms_norm, self.qk_rms_norm_cross = qk_rms_norm, qk_rms_norm_cross
        check_common_args(pe_mode, model_channels, self.num_heads)
        io = self.io_block_channels
        if io is not None:
            stages = math.log2(patch_size) if patch_size > 0 else -1
            if stages != int(stages) or len(io) != stages:
                raise UserError(
                    f"io_block_channels={io} needs one entry per 2x stage of patch_size={patch_size} "
                    f"(log2(patch_size) entries, patch_size a power of 2)"
                )

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.pos_embedder = AbsolutePositionEmbedder(model_channels)  # no parameters: computed per input
        self.input_layer = nn.Linear(in_channels, model_channels if io is None else io[0])
        self.input_blocks = nn.ModuleList()
        if io is not None:
            for chs, next_chs in zip(io, [*io[1:], model_channels], strict=True):
                self.input_blocks.extend(
                    SparseResBlock3d(chs, model_channels, out_channels=chs) for _ in range(num_io_res_blocks - 1)
                )
                self.input_blocks.append(SparseResBlock3d(chs, model_channels, out_channels=next_chs, downsample=True))
        self.blocks = nn.ModuleList(
            ModulatedSparseTransformerCrossBlock(
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
        self.out_blocks = nn.ModuleList()  # registered after the transformer, as in TRELLIS (same key order)
        if io is not None:
            mult = 2 if use_skip_connection else 1
            for chs, prev_chs in zip(reversed(io), [model_channels, *reversed(io[1:])], strict=True):
                self.out_blocks.append(
                    SparseResBlock3d(prev_chs * mult, model_channels, out_channels=chs, upsample=True)
                )
                self.out_blocks.extend(
                    SparseResBlock3d(chs * mult, model_channels, out_channels=chs) for _ in range(num_io_res_blocks - 1)
                )
        self.out_layer = nn.Linear(model_channels if io is None else io[0], out_channels)
        init_trellis_weights(self, share_mod)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The torso's compute dtype: that of the blocks' weights (fp32 unless converted or ``.double()``)."""
        return torso_dtype(self)

    def convert_to_fp16(self) -> None:
        for part in (self.input_blocks, self.blocks, self.out_blocks):
            cast_modules(part, torch.float16)

    def convert_to_fp32(self) -> None:
        for part in (self.input_blocks, self.blocks, self.out_blocks):
            cast_modules(part, torch.float32)

    def _check_input(self, x: SparseTensor) -> None:
        if not isinstance(x, SparseTensor):
            raise UserError(f"x must be a SparseTensor, got {type(x).__name__}")
        if x.feats.dim() != 2 or x.feats.shape[1] != self.in_channels:
            raise UserError(f"x.feats must have shape [N, {self.in_channels}], got {list(x.feats.shape)}")
        bad = (x.coords[:, 1:] >= self.resolution).any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise UserError(
                f"x.coords {x.coords[row].tolist()} at row {row} lie outside the grid: x, y, z must be in "
                f"[0, {self.resolution})"
            )

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor) -> SparseTensor:
        self._check_input(x)
        check_t_cond(t, cond, x.batch_size, self.cond_channels)
        dtype = self.dtype
        h = x.replace(self.input_layer(x.feats).type(dtype))
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, cond = t_emb.type(dtype), cond.type(dtype)

        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb)
            skips.append(h.feats)
        if self.pe_mode == "ape":
            h = h.replace(h.feats + self.pos_embedder(h.coords[:, 1:]).type(dtype))
        for block in self.blocks:
            h = block(h, t_emb, cond)
        for block, skip in zip(self.out_blocks, reversed(skips), strict=True):
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip], dim=1))
            h = block(h, t_emb)
        feats = F.layer_norm(h.feats, h.feats.shape[-1:])  # eps 1e-5, no affine
        return h.replace(self.out_layer(feats.type(x.dtype)))


class ElasticSLatFlowModel(SLatFlowModel):
    """Same parameters as SLatFlowModel; adds TRELLIS's ``with_mem_ratio`` switch for per-block checkpointing.

    TRELLIS drives it from a CUDA memory controller; here it is a plain context manager a caller may use.
    """

    @contextmanager
    def with_mem_ratio(self, mem_ratio: float = 1.0) -> Iterator[float]:
        """Checkpoint the first blocks so roughly ``mem_ratio`` of the activation memory is kept."""
        if mem_ratio >= 1.0:
            yield 1.0
            return
        n = len(self.blocks)
        n_ckpt = min(math.ceil((1 - mem_ratio) * n) + 1, n)
        before = [blk.use_checkpoint for blk in self.blocks]
        for i, blk in enumerate(self.blocks):
            blk.use_checkpoint = i < n_ckpt
        try:
            yield 1 - (n_ckpt - 1) / n
        finally:
            for blk, flag in zip(self.blocks, before, strict=True):
                blk.use_checkpoint = flag
