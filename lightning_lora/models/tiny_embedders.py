"""Tiny CLIP and Qwen3-VL models built from configs and saved as real local folders (tests and demos).

They load through exactly the code path a user's folder takes (``config.json``, ``model.safetensors``,
tokenizer files, ``preprocessor_config.json``). No vocabulary ships in any package, so both tokenizers are
byte-level with no merges (one token per UTF-8 byte): CLIP's ``CLIPTokenizer`` over the byte alphabet (as
``models/sd_tiny.py``), Qwen's a ``tokenizers`` byte-level BPE with Qwen's special tokens, saved as
``tokenizer.json``. Each folder is written atomically once and reused afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_lora.fileio import atomic_directory

#: written last by save_pretrained, so a folder that has it is complete
MARKER = "config.json"
#: Qwen's special tokens in the tiny vocabulary, after the 256 byte tokens, in this order
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


def _write_once(path: str | os.PathLike, build) -> str:
    path = Path(path).expanduser()
    if (path / MARKER).is_file():
        return str(path)
    with atomic_directory(path) as tmp:
        build(tmp)
    return str(path)


def _save(out: str | os.PathLike, tokenizer, processor, model) -> None:
    from lightning_lora.models.embedders import quiet_transformers

    with quiet_transformers():
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
        model.save_pretrained(out, safe_serialization=True)


# --------------------------------------------------------------------------- CLIP
def build_tiny_clip(out: str | os.PathLike, seed: int = 0, max_length: int = 32, image_size: int = 32) -> None:
    """2-layer text and vision towers (width 32, 4 heads), 8-px patches on 32-px images, 16-d projection."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from lightning_lora.models.sd_tiny import _byte_vocab

    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=max_length, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], projection_dim=16,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    _save(out, tokenizer, processor, model)


def ensure_tiny_clip(path: str | os.PathLike, seed: int = 0) -> str:
    """The tiny CLIP folder at ``path`` (``model=clip_tiny``), built the first time."""
    return _write_once(path, lambda tmp: build_tiny_clip(tmp, seed))


# --------------------------------------------------------------------------- Qwen3-VL
def build_qwen_tokenizer():
    """A byte-level BPE (no merges) with Qwen's chat and vision special tokens; pads with ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(QWEN_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right",
        extra_special_tokens=list(QWEN_SPECIALS[1:]), model_max_length=8192,
    )


def build_tiny_qwen3_vl(out: str | os.PathLike, seed: int = 0) -> None:
    """Language model: 2 layers, width 32, 4 query / 2 KV heads of 8; vision: 2 blocks, width 32, 8-px patches,
    merge 2 (a 32×32 image is 4 patches per side, 4 image tokens), one deepstack layer; images 16–32 px a side."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLModel

    tokenizer = build_qwen_tokenizer()
    ids = dict(zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIALS)), strict=True))
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=8192,
            pad_token_id=ids["<|endoftext|>"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLModel(config)
    processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                         max_pixels=32 * 32, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    _save(out, tokenizer, processor, model)


def ensure_tiny_qwen3_vl(path: str | os.PathLike, seed: int = 0) -> str:
    """The tiny Qwen3-VL folder at ``path`` (``model=qwen3_vl_tiny``), built the first time."""
    return _write_once(path, lambda tmp: build_tiny_qwen3_vl(tmp, seed))


#: the tiny folder builder of each embedder class that has one (by class name), for ``EmbeddingHead.build_tiny``
TINY_BUILDERS = {"ClipEmbedder": ensure_tiny_clip, "Qwen3VLEmbedder": ensure_tiny_qwen3_vl}

__all__ = [
    "TINY_BUILDERS",
    "build_qwen_tokenizer",
    "build_tiny_clip",
    "build_tiny_qwen3_vl",
    "ensure_tiny_clip",
    "ensure_tiny_qwen3_vl",
]
