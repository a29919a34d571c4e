"""Image–text pairs for contrastive fine-tuning of CLIP / Qwen3-VL embedders: a JSONL reader and a DataModule
(the digits demo, ``data=digits_retrieval``, lives in ``digits.py``).

One JSONL line per pair::

    {"query": "a red cat", "positive_image": "img/cat.jpg"}
    {"query_image": "img/dog.jpg", "positive": "a dog on grass", "negatives": ["a cat", {"image": "img/x.png"}]}
    {"query": "what is shown?", "query_image": "q.png", "positive": "a bridge", "positive_image": "bridge.png"}

``query``/``positive`` are text (optional when the side has an image); ``query_image``/``positive_image``
are image paths, relative to the JSONL file's folder or absolute; ``negatives`` is a list whose entries are
text or ``{"text": ..., "image": ...}`` objects. Every image path is checked when the file is read (at
``setup``): a missing file is a one-line error naming the file, the JSONL line and the field.

Batches are those of :mod:`lightning_lora.data.pairs` (same collate)::

    {"query": [item], "positive": [item], "negatives": [[item]] (only when some pair has them), "index": int64 [B]}

where an item is a ``str`` when text-only, else ``{"text": str | None, "image": "<absolute path>"}``. Images
stay paths in the batch: the embedder opens them (lazily, in its own process), so batches are small to move
between DataLoader workers and the decoding error, if any, names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from lightning_lora.data.pairs import PairsDataModule, _abs, read_jsonl
from lightning_lora.errors import UserError

FIELDS_HINT = ("each line needs 'query' and/or 'query_image', 'positive' and/or 'positive_image', optionally "
               "'negatives' (texts or {text, image} objects)")
KNOWN_FIELDS = ("query", "positive", "negatives", "query_image", "positive_image")
#: batches whose items may be images: only embedders with a vision tower take them
IMAGE_TEXT_PAIRS = "image-text pairs"


def _image_path(value: Any, base: Path, where: str, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: field '{field}' must be an image path (a non-empty string), got {value!r}")
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise UserError(f"{where}: {field} file not found: {path}")
    return str(path.resolve())


def _item(text: Any, image: Any, base: Path, where: str, field: str, image_field: str) -> str | dict:
    """One side of a pair as a batch item: the text, or ``{"text", "image"}`` when it has an image."""
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: field '{field}' must be a string, got {type(text).__name__}; {FIELDS_HINT}")
    if image is None:
        if text is None:
            raise UserError(f"{where}: needs '{field}' or '{image_field}'; {FIELDS_HINT}")
        return text
    return {"text": text or None, "image": _image_path(image, base, where, image_field)}


def parse_image_pair(obj: Any, base: Path, where: str) -> dict:
    """Check one decoded JSONL line (image paths resolved against ``base``) and return the canonical pair."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}; {FIELDS_HINT}")
    pair = {
        "query": _item(obj.get("query"), obj.get("query_image"), base, where, "query", "query_image"),
        "positive": _item(obj.get("positive"), obj.get("positive_image"), base, where, "positive", "positive_image"),
    }
    negatives = obj.get("negatives") or []
    if not isinstance(negatives, list):
        raise UserError(f"{where}: field 'negatives' must be a list; {FIELDS_HINT}")
    items = []
    for k, neg in enumerate(negatives):
        field = f"negatives[{k}]"
        if isinstance(neg, str):
            items.append(neg)
        elif isinstance(neg, dict) and set(neg) <= {"text", "image"}:
            items.append(_item(neg.get("text"), neg.get("image"), base, where, f"{field}.text", f"{field}.image"))
        else:
            raise UserError(f"{where}: {field} must be a string or an object with 'text' and/or 'image'; "
                            f"got {json.dumps(neg)[:80]}")
    pair["negatives"] = items
    return pair


def read_image_pairs_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read image/text pairs, one JSON object per line (blank lines skipped); image paths are checked."""
    folder = _abs(path).parent  # relative image paths are relative to the file
    return read_jsonl(path, lambda obj, where: parse_image_pair(obj, folder, where), FIELDS_HINT)


class ImagePairsDataModule(PairsDataModule):
    """Train/val image–text pairs from JSONL files (``data=image_pairs``); everything else as ``data=pairs``."""

    batch_kind: ClassVar[str] = IMAGE_TEXT_PAIRS

    def load_pairs(self) -> tuple[list[dict], list[dict]]:
        if self.train_path is None:
            raise UserError("data.train_path: not set; give a JSONL file of image/text pairs")
        train = read_image_pairs_jsonl(self.train_path)
        val = read_image_pairs_jsonl(self.val_path) if self.val_path is not None else []
        return train, val


__all__ = [
    "IMAGE_TEXT_PAIRS",
    "ImagePairsDataModule",
    "parse_image_pair",
    "read_image_pairs_jsonl",
]
