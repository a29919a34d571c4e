"""Datasets for contrastive fine-tuning: JSONL pairs and the built-in stdlib code-search task."""

from lightning_lora.data.code_search import CodeSearchDataModule, build_code_search_pairs
from lightning_lora.data.pairs import PairsDataModule, collate_pairs, read_pairs_jsonl

__all__ = [
    "CodeSearchDataModule",
    "PairsDataModule",
    "build_code_search_pairs",
    "collate_pairs",
    "read_pairs_jsonl",
]
