"""Helpers the ``conf/strategy/`` presets instantiate: the FSDP wrapping policy of each family.

FSDP shards a model unit by unit; each unit is all-gathered for its forward and backward and freed after. A LoRA
model should be cut at its transformer/attention blocks (and residual blocks), so that each unit holds one block's
frozen weights plus that block's adapter, and the all-gather of one block overlaps the compute of the previous.
The classes are named by their class name rather than imported, so one policy serves every family and a
family whose libraries are not installed costs nothing. ``use_orig_params=True`` (Lightning's default, kept in the
preset) lets frozen and trainable parameters share a unit (pytorch#91167; peft#1702).

``full_params`` gives the callbacks that read weights outside a training step (adapter snapshots, sample previews)
the whole tensors that FSDP otherwise keeps in shards, one per rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: the blocks of each family (class names), as in ``conf/strategy/fsdp.yaml``
FAMILY_BLOCKS: dict[str, list[str]] = {
    # BERT/MiniLM, CLIP (text and vision towers), Qwen3-VL (language decoder and vision blocks)
    "embedding": ["BertLayer", "CLIPEncoderLayer", "Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"],
    # SD 1.5 / LBM UNets (attention and residual blocks) and the CLIP text encoder when it trains
    "diffusion": ["BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer"],
    # TRELLIS sparse-structure and structured-latent flow transformers
    "flow3d": ["ModulatedTransformerCrossBlock", "ModulatedSparseTransformerCrossBlock", "SparseResBlock3d"],
}


def block_names(families: Mapping[str, Iterable[str]] | None = None) -> frozenset[str]:
    """The union of the block class names of every family (``FAMILY_BLOCKS`` when none are given)."""
    return frozenset(name for names in (families or FAMILY_BLOCKS).values() for name in names)


class BlockMatcher:
    """Is this module one of the named blocks? (A class, not a lambda, so the policy pickles under ddp_spawn.)"""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def __call__(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.names

    def __repr__(self) -> str:
        return f"BlockMatcher({sorted(self.names)})"


def block_wrap_policy(**families: list[str]):
    """An FSDP ``auto_wrap_policy`` that makes each named block (of any family given) one FSDP unit.

    ``families`` maps a family to its block class names (``embedding=[BertLayer, ...]``); none = ``FAMILY_BLOCKS``.
    Also usable as Lightning's ``activation_checkpointing_policy`` (non-reentrant checkpointing per block).
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    return CustomPolicy(BlockMatcher(block_names(families or None)))


def shards_parameters(trainer: pl.Trainer) -> bool:
    """Does this trainer's strategy keep parameters in shards (Lightning's FSDP), so that reading them whole or
    running a forward outside a training step is a collective every rank must join?"""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def _fsdp_root(trainer: pl.Trainer, pl_module: nn.Module) -> nn.Module:
    """The FSDP-wrapped module (Lightning wraps the LightningModule), or the module itself when it wrapped nothing."""
    root = trainer.strategy.model
    return pl_module if root is None else root


def _can_offload(root: nn.Module) -> bool:
    """May FSDP move the gathered parameters to the CPU? Not for NO_SHARD units (refused; FSDP turns every strategy
    into NO_SHARD on one device), nor when they already are on the CPU (the "copy" would be the gathered tensor
    itself, which FSDP then frees under the views)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    units = FullyShardedDataParallel.fsdp_modules(root)
    return bool(units) and all(
        unit.sharding_strategy != ShardingStrategy.NO_SHARD and unit.compute_device.type != "cpu" for unit in units
    )


@contextlib.contextmanager
def full_params(trainer: pl.Trainer, pl_module: nn.Module, forward: bool = False) -> Iterator[None]:
    """Whole (unsharded, full-precision) parameters inside the block under FSDP; a no-op under any other strategy.

    Under FSDP this is a collective: every rank must enter it at the same point, also ranks that then write nothing.
    ``forward=False`` (reading weights: adapter snapshots): every unit is gathered for global rank 0 alone, unit by
    unit onto the CPU from an accelerator, as Lightning's full state dict does; the other ranks keep their shards.
    ``forward=True`` (a forward runs inside on every rank: previews): only the root unit's own parameters are gathered,
    on every rank; the block units gather theirs in their own forward as in training (FSDP cannot start the forward
    of a unit whose parameters are summoned), under the precision plugin's forward context, since they come in
    FSDP's compute dtype.
    """
    if not shards_parameters(trainer):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = _fsdp_root(trainer, pl_module)
    with contextlib.ExitStack() as stack:
        if forward:
            stack.enter_context(FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False))
            stack.enter_context(trainer.strategy.precision_plugin.forward_context())
        else:
            stack.enter_context(FullyShardedDataParallel.summon_full_params(
                root, recurse=True, writeback=False, rank0_only=True, offload_to_cpu=_can_offload(root)))
        yield
