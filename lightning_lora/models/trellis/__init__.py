"""Pure-PyTorch TRELLIS (v1) flow denoisers with TRELLIS's argument names and state-dict keys.

No spconv / flash-attn / xformers: sparse convs gather neighbours through hashed coords, attention runs on
``torch.nn.functional.scaled_dot_product_attention``. Every attention projection is a plain ``nn.Linear``
(``to_qkv``, ``to_q``, ``to_kv``, ``to_out``) on dense tensors, so PEFT LoRA can target it by name.
"""

from lightning_lora.models.trellis.attention import MultiHeadAttention, MultiHeadRMSNorm, SparseMultiHeadAttention
from lightning_lora.models.trellis.blocks import (
    AbsolutePositionEmbedder,
    FeedForwardNet,
    LayerNorm32,
    ModulatedSparseTransformerCrossBlock,
    ModulatedTransformerCrossBlock,
    TimestepEmbedder,
)
from lightning_lora.models.trellis.loading import (
    MODEL_CLASSES,
    build_trellis_model,
    load_trellis_model,
    save_trellis_model,
)
from lightning_lora.models.trellis.sparse import SparseTensor
from lightning_lora.models.trellis.sparse_conv import SparseConv3d, SubMConv3d, neighbour_pairs, submanifold_conv3d
from lightning_lora.models.trellis.sparse_spatial import (
    SparseDownsample,
    SparseUpsample,
    sparse_downsample,
    sparse_upsample,
)
from lightning_lora.models.trellis.sparse_structure_flow import SparseStructureFlowModel
from lightning_lora.models.trellis.structured_latent_flow import ElasticSLatFlowModel, SLatFlowModel, SparseResBlock3d

# Adapter targets of the public TRELLIS LoRA forks (all plain nn.Linear here).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_kv", "to_out", "to_qkv")
#: the same list under the name the LoRA fork's ``trellis.utils.lora_utils`` gives it (zadaianchuk/TRELLIS)
TRELLIS_LORA_TARGET_MODULES: list[str] = list(DEFAULT_LORA_TARGETS)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "MODEL_CLASSES",
    "TRELLIS_LORA_TARGET_MODULES",
    "AbsolutePositionEmbedder",
    "ElasticSLatFlowModel",
    "FeedForwardNet",
    "LayerNorm32",
    "ModulatedSparseTransformerCrossBlock",
    "ModulatedTransformerCrossBlock",
    "MultiHeadAttention",
    "MultiHeadRMSNorm",
    "SLatFlowModel",
    "SparseConv3d",
    "SparseDownsample",
    "SparseMultiHeadAttention",
    "SparseResBlock3d",
    "SparseStructureFlowModel",
    "SparseTensor",
    "SparseUpsample",
    "SubMConv3d",
    "TimestepEmbedder",
    "build_trellis_model",
    "load_trellis_model",
    "neighbour_pairs",
    "save_trellis_model",
    "sparse_downsample",
    "sparse_upsample",
    "submanifold_conv3d",
]
