"""LightningDataModules per family: text pairs (JSONL, stdlib code search), captioned images (folders, tar
shards, the digits demo), and TRELLIS latents (in ``data.trellis``)."""

from lightning_lora.data.code_search import CodeSearchDataModule, build_code_search_pairs
from lightning_lora.data.image_pairs import DigitsPairsDataModule, ImagePairsDataModule, read_image_pairs_jsonl
from lightning_lora.data.images import (
    DigitsDataModule,
    ImageFolderDataModule,
    ImageTransform,
    collate_images,
    load_rgb,
    make_digits,
    read_image_folder,
)
from lightning_lora.data.pairs import PairsDataModule, collate_pairs, read_pairs_jsonl
from lightning_lora.data.shards import (
    DigitPairsDataModule,
    PairedShardsDataModule,
    WebDatasetDataModule,
    expand_shards,
    write_shards,
)

__all__ = [
    "CodeSearchDataModule",
    "DigitPairsDataModule",
    "DigitsDataModule",
    "DigitsPairsDataModule",
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
    "make_digits",
    "read_image_folder",
    "read_image_pairs_jsonl",
    "read_pairs_jsonl",
    "write_shards",
]
