"""Helpers the ``conf/strategy/`` presets instantiate: the FSDP wrapping policy of each family.

FSDP shards a model unit by unit; each unit is all-gathered for its forward and backward and freed after. A LoRA
model should be cut at its transformer/attention blocks (and residual blocks), so that each unit holds one block's
frozen weights plus that block's adapter, and the all-gather of one block overlaps the compute of the previous.
The classes are named by their class name rather than imported, so one policy serves every family and a
family whose libraries are not installed costs nothing. ``use_orig_params=True`` (Lightning's default, kept in the
preset) lets frozen and trainable parameters share a unit (pytorch#91167; peft#1702).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

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
