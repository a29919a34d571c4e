"""Helpers the ``conf/strategy/`` presets instantiate: the FSDP wrapping policy from the heads' block classes.

FSDP shards a model unit by unit; each unit is all-gathered for its forward and backward and freed after. A LoRA
model should be cut at its transformer/attention blocks (and residual blocks), so that each unit holds one block's
frozen weights plus that block's adapter, and the all-gather of one block overlaps the compute of the previous.
The classes are named by their class name rather than imported (each head lists its own in
``TaskHead.fsdp_blocks``), so one policy serves every family and a family whose libraries are not installed costs
nothing. ``use_orig_params=True`` (Lightning's default, kept in the
preset) lets frozen and trainable parameters share a unit (pytorch#91167; peft#1702).

``full_params`` gives the callbacks that read weights outside a training step (adapter snapshots, sample previews)
the whole tensors that FSDP otherwise keeps in shards, one per rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

def block_names(blocks: Iterable[str] | None = None) -> frozenset[str]:
    """``blocks``, or when none are given the union of every registered head's ``fsdp_blocks``."""
    if blocks is not None:
        return frozenset(blocks)
    from lightning_lora.heads import registered_heads

    return frozenset(name for head in registered_heads() for name in head.fsdp_blocks)


class BlockMatcher:
    """Is this module one of the named blocks? (A class, not a lambda, so the policy pickles under ddp_spawn.)

    ``names=None`` means every registered head's blocks, looked up at the first call: in a process started by
    ``ddp_spawn`` that is after the LightningModule, and so its head's module, has been unpickled.
    """

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self._names = None if names is None else frozenset(names)

    @property
    def names(self) -> frozenset[str]:
        if self._names is None:
            self._names = block_names()
        return self._names

    def __call__(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.names

    def __repr__(self) -> str:
        return f"BlockMatcher({sorted(self.names)})"


def block_wrap_policy(blocks: list[str] | None = None):
    """An FSDP ``auto_wrap_policy`` that makes each named block one FSDP unit.

    ``blocks``: block class names (``[BertLayer, ...]``); None = every head's ``fsdp_blocks``
    (``conf/strategy/fsdp.yaml``'s ``auto_wrap_policy.blocks``). Also usable as Lightning's
    ``activation_checkpointing_policy`` (non-reentrant checkpointing per block).
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    return CustomPolicy(BlockMatcher(blocks))


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
