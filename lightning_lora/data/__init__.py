"""LightningDataModules per family: text pairs (JSONL, stdlib code search), captioned images (folders, tar
shards), image-text pairs, the digits demos (``data.digits``), and TRELLIS latents (in ``data.trellis``)."""

from lightning_lora.data.code_search import CodeSearchDataModule, build_code_search_pairs
from lightning_lora.data.digits import (
    DigitCaptionsDataModule,
    DigitRetrievalDataModule,
    DigitTranslationDataModule,
    write_digit_captions,
)
from lightning_lora.data.image_pairs import ImagePairsDataModule, read_image_pairs_jsonl
from lightning_lora.data.images import (
    ImageFolderDataModule,
    ImageTransform,
    collate_images,
    load_rgb,
    read_image_folder,
)
from lightning_lora.data.pairs import PairsDataModule, collate_pairs, read_pairs_jsonl
from lightning_lora.data.shards import (
    PairedShardsDataModule,
    WebDatasetDataModule,
    expand_shards,
    write_shards,
)

__all__ = [
    "CodeSearchDataModule",
    "DigitCaptionsDataModule",
    "DigitRetrievalDataModule",
    "DigitTranslationDataModule",
    "ImageFolderDataModule",
    "ImagePairsDataModule",
    "ImageTransform",
    "PairedShardsDataModule",
    "PairsDataModule",
    "WebDatasetDataModule",
    "build_code_search_pairs",
    "collate_images",
    "collate_pairs",
    "expand_shards",
    "load_rgb",
    "read_image_folder",
    "read_image_pairs_jsonl",
    "read_pairs_jsonl",
    "write_digit_captions",
    "write_shards",
]
