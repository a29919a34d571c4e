"""Image–text pairs for contrastive fine-tuning of CLIP / Qwen3-VL embedders: a JSONL reader, a DataModule,
and a digits demo set (sklearn's handwritten digits, no download).

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
from typing import Any

from lightning_lora.data.pairs import PairsDataModule, _abs, _check_positive_int, read_jsonl
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_directory

FIELDS_HINT = ("each line needs 'query' and/or 'query_image', 'positive' and/or 'positive_image', optionally "
               "'negatives' (texts or {text, image} objects)")
KNOWN_FIELDS = ("query", "positive", "negatives", "query_image", "positive_image")


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

    def load_pairs(self) -> tuple[list[dict], list[dict]]:
        if self.train_path is None:
            raise UserError("data.train_path: not set; give a JSONL file of image/text pairs")
        train = read_image_pairs_jsonl(self.train_path)
        val = read_image_pairs_jsonl(self.val_path) if self.val_path is not None else []
        return train, val


# --------------------------------------------------------------------------- the digits demo
DIRECTIONS = ("image_to_text", "text_to_image")


def make_digit_pairs(root: str | os.PathLike, num_images: int | None = 256, image_size: int = 64,
                     invert: bool = True, direction: str = "image_to_text", num_negatives: int = 0,
                     val_fraction: float = 0.1) -> tuple[Path, Path | None]:
    """Write the digits demo as ``train.jsonl`` / ``val.jsonl`` (written once, reused) and return their paths.

    The images are :func:`lightning_lora.data.images.make_digits`'s (shared with ``data=digits`` under the
    same ``root``), split as that module splits them. ``image_to_text``: the query is a digit's image and
    the positive its caption "a handwritten digit 3" (identical captions in a batch are the same document,
    which the loss's duplicate masking handles); ``text_to_image`` the reverse. ``num_negatives`` hard
    negatives per pair: captions of the next digits (image_to_text) or images of other digits (text_to_image).
    """
    from lightning_lora.data.images import digits_caption, make_digits, read_image_folder, split_records

    if direction not in DIRECTIONS:
        raise UserError(f"data.direction={direction!r} is unknown; valid: {', '.join(DIRECTIONS)}")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or not 0 <= num_negatives <= 9:
        raise UserError(f"data.num_negatives={num_negatives!r} must be an integer from 0 to 9")
    images = make_digits(root, num_images=num_images, image_size=image_size, invert=invert)
    out = images.with_name(f"{images.name}-pairs-{direction}-neg{num_negatives}-v{val_fraction:g}")
    train_file, val_file = out / "train.jsonl", out / "val.jsonl"
    if train_file.is_file():
        return train_file, (val_file if val_file.is_file() else None)
    records = read_image_folder(images)
    labels = {}
    for line in (images / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            labels[row["file_name"]] = int(row["label"])
    by_label: dict[int, list[str]] = {}
    for r in records:
        by_label.setdefault(labels[r.name], []).append(r.name)

    def pair(name: str) -> dict:
        label, image = labels[name], f"../{images.name}/{name}"  # relative to the JSONL folder
        if direction == "image_to_text":
            negs = [digits_caption((label + k) % 10) for k in range(1, num_negatives + 1)]
            return {"query_image": image, "positive": digits_caption(label), "negatives": negs}
        others = [(label + k) % 10 for k in range(1, 10) if by_label.get((label + k) % 10)]
        negs = [{"image": f"../{images.name}/{by_label[d][0]}"} for d in others[:num_negatives]]
        return {"query": digits_caption(label), "positive_image": image, "negatives": negs}

    train, val = split_records(records, val_fraction)
    with atomic_directory(out) as tmp:
        for file, chosen in (("train.jsonl", train), ("val.jsonl", val)):
            if chosen:
                (tmp / file).write_text("".join(json.dumps(pair(r.name)) + "\n" for r in chosen), encoding="utf-8")
    return train_file, (val_file if val_file.is_file() else None)


class DigitsPairsDataModule(ImagePairsDataModule):
    """The digits image–text demo (``data=digits_retrieval``): written once as JSONL under ``root`` by
    :func:`make_digit_pairs`, then read through the same code as user data (``data=image_pairs``)."""

    def __init__(self, root: str, num_images: int | None = 256, image_size: int = 64, invert: bool = True,
                 direction: str = "image_to_text", num_negatives: int = 0, val_fraction: float = 0.1,
                 **kwargs: Any) -> None:
        if num_images is not None:
            _check_positive_int(num_images, "data.num_images")
        train, val = make_digit_pairs(root, num_images=num_images, image_size=image_size, invert=invert,
                                      direction=direction, num_negatives=num_negatives, val_fraction=val_fraction)
        super().__init__(train_path=str(train), val_path=str(val) if val else None, **kwargs)


__all__ = [
    "DIRECTIONS",
    "DigitsPairsDataModule",
    "ImagePairsDataModule",
    "make_digit_pairs",
    "parse_image_pair",
    "read_image_pairs_jsonl",
]
