"""The digits demos: scikit-learn's 8×8 handwritten digits (1797, bundled with scikit-learn: no download), written
once under a cache folder and then read through the same code as user data. Three tasks, three configs:

- text-to-image (Stable Diffusion), ``data=digits``: PNGs captioned "a handwritten digit 3", read as an image
  folder (``data=image_folder``) or as tar shards (``data=webdataset``): :class:`DigitCaptionsDataModule`;
- image-to-image (LBM), ``data=digits_pairs``: a digit (source) and an inverted, blurred or relit copy (target)
  in tar shards, read as ``data=paired_shards``: :class:`DigitTranslationDataModule`;
- image-text retrieval (CLIP / Qwen3-VL embedders), ``data=digits_retrieval``: the text-to-image demo's PNGs
  paired with their captions in JSONL, read as ``data=image_pairs``: :class:`DigitRetrievalDataModule`.

All three draw their images through :class:`SklearnDigits` (one loader, one drawing: the same digit gives the same
pixels in every demo). Every written folder is named by the options that shape its content, built in a temporary
folder renamed into place, and reused as it is when it already exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from lightning_lora.checks import choice, fraction, optional_positive_int, positive_int
from lightning_lora.data.image_pairs import ImagePairsDataModule
from lightning_lora.data.images import (
    CAPTIONED_IMAGES,
    METADATA_FILE,
    ImageFolderDataModule,
    read_image_folder,
    split_records,
)
from lightning_lora.data.shards import PairedShardsDataModule, WebDatasetDataModule, shard_pattern, write_shards
from lightning_lora.errors import UserError
from lightning_lora.extras import missing_line
from lightning_lora.fileio import atomic_directory


# --------------------------------------------------------------------------- the images all three demos draw
class SklearnDigits:
    """The first ``num_images`` (all when None) of scikit-learn's 8×8 digits, with their labels and drawn images.

    ``demo`` names the config in the error raised when scikit-learn is missing.
    """

    def __init__(self, num_images: int | None, demo: str) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # the demo extra; train.run checks `requires` before this
            raise UserError(missing_line("sklearn", f"data={demo}")) from None
        digits = load_digits()
        count = len(digits.images) if num_images is None else min(num_images, len(digits.images))
        self.pixels, self.labels = digits.images[:count], digits.target[:count]

    def __len__(self) -> int:
        return len(self.pixels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def draw(self, i: int, image_size: int, invert: bool) -> Image.Image:
        """Digit ``i`` as an RGB square of ``image_size`` px: ink 0..16 scaled to 0..255 (``invert``: dark ink on
        white, as paper; sklearn's are light on dark), the grey image upscaled bicubic."""
        grey = np.clip(self.pixels[i] / 16.0 * 255.0, 0, 255).astype(np.uint8)
        if invert:
            grey = 255 - grey
        return Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")


def digit_caption(label: int) -> str:
    return f"a handwritten digit {label}"


# --------------------------------------------------------------------------- text-to-image (data=digits)
CAPTION_FORMATS = ("folder", "shards")


class _AlreadyBuilt(Exception):
    """Another process wrote the same demo folder while this one was writing."""


def write_digit_captions(root: str | os.PathLike, num_images: int | None = 256, image_size: int = 64,
                         invert: bool = True) -> Path:
    """Write sklearn's 8×8 digits (1797, bundled with scikit-learn: no download) as an image folder.

    ``root/<variant>/NNNN.png`` (grey upscaled to ``image_size`` px, bicubic, saved as RGB; ``invert`` gives
    dark ink on white) and ``metadata.jsonl`` captions "a handwritten digit 3". The first ``num_images``
    images are used (all when None). Written once, atomically (a whole directory renamed into place), and
    reused: an existing complete folder is returned untouched.
    """
    optional_positive_int(num_images, "data.num_images", got=True)
    positive_int(image_size, "data.image_size", got=True)
    folder = Path(root).expanduser().resolve() / f"n{num_images or 'all'}_s{image_size}_{'inv' if invert else 'raw'}"
    if (folder / METADATA_FILE).is_file():
        return folder
    digits = SklearnDigits(num_images, "digits")
    try:
        with atomic_directory(folder) as tmp:
            _write_caption_folder(tmp, digits, image_size, invert)
            if (folder / METADATA_FILE).is_file():  # another process finished first: keep its copy
                raise _AlreadyBuilt
    except _AlreadyBuilt:
        pass
    return folder


def _write_caption_folder(tmp: Path, digits: SklearnDigits, image_size: int, invert: bool) -> None:
    """The PNGs and metadata.jsonl (caption and label per file) of ``digits`` into ``tmp``."""
    lines = []
    for i in range(len(digits)):
        name = f"{i:04d}.png"
        digits.draw(i, image_size, invert).save(tmp / name, format="PNG")
        label = digits.label(i)
        lines.append(json.dumps({"file_name": name, "text": digit_caption(label), "label": label}))
    (tmp / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_digit_caption_shards(folder: Path, val_fraction: float = 0.1, per_shard: int = 64
                               ) -> tuple[str, str | None]:
    """The captions folder as tar shards (``png`` + ``txt`` per sample), split as the folder module splits it.

    Returns the brace patterns of the train and validation shards; written once next to the folder.
    """
    records = read_image_folder(folder)
    train, val = split_records(records, val_fraction)
    out = folder.with_name(f"{folder.name}-shards-v{val_fraction:g}-p{per_shard}")
    patterns = {}
    for split, chosen in (("train", train), ("validation", val)):
        if not chosen:
            patterns[split] = None
            continue
        count = -(-len(chosen) // per_shard)
        pattern = str(out / f"{split}-%04d.tar")
        if all((out / (f"{split}-%04d.tar" % i)).is_file() for i in range(count)):
            patterns[split] = shard_pattern(pattern, count)
            continue
        samples = ({"__key__": r.path.stem, "png": r.path.read_bytes(), "txt": r.caption} for r in chosen)
        patterns[split] = write_shards(samples, pattern, per_shard)
    return patterns["train"], patterns["validation"]


class ReadThroughDataModule(pl.LightningDataModule):
    """A demo set written once and read through the data module users' own files go through (``self.inner``,
    set by the subclass), so the demo exercises the same reading code."""

    inner: pl.LightningDataModule

    def setup(self, stage: str | None = None) -> None:
        self.inner.trainer = self.trainer
        self.inner.setup(stage)

    def train_dataloader(self) -> DataLoader:
        self.inner.trainer = self.trainer
        return self.inner.train_dataloader()

    def val_dataloader(self) -> DataLoader | list:
        self.inner.trainer = self.trainer
        return self.inner.val_dataloader()


class DigitCaptionsDataModule(ReadThroughDataModule):
    """The text-to-image demo (``data=digits``): sklearn's handwritten digits as captioned images, no download.

    Built once under ``root`` by :func:`write_digit_captions`, then read through the same code as user data:
    ``format="folder"`` via :class:`ImageFolderDataModule`, ``format="shards"`` writes tar shards once and
    reads them via :class:`~lightning_lora.data.shards.WebDatasetDataModule` (``samples_per_epoch`` applies
    only there). Other keyword arguments (batch size, workers, transforms, ...) go to that module.
    """

    requires: ClassVar[tuple[str, ...]] = ("sklearn",)  # the digits come with scikit-learn: the [demo] extra

    batch_kind: ClassVar[str] = CAPTIONED_IMAGES

    def __init__(self, root: str, format: str = "folder", num_images: int | None = 256, image_size: int = 64,
                 invert: bool = True, resolution: int = 32, val_fraction: float = 0.1, per_shard: int = 64,
                 samples_per_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        choice(format, "data.format", CAPTION_FORMATS)
        self.format = format
        self.folder = write_digit_captions(root, num_images=num_images, image_size=image_size, invert=invert)
        if format == "folder":
            self.inner = ImageFolderDataModule(str(self.folder), val_fraction=val_fraction, resolution=resolution,
                                               **kwargs)
        else:
            positive_int(per_shard, "data.per_shard", got=True)
            train, val = write_digit_caption_shards(self.folder, val_fraction, per_shard)
            self.inner = WebDatasetDataModule(train, val, image_key="png", caption_key="txt", resolution=resolution,
                                              samples_per_epoch=samples_per_epoch, **kwargs)


# --------------------------------------------------------------------------- image-to-image (data=digits_pairs)
TRANSLATION_TRANSFORMS = ("invert", "blur", "relight")


def translation_target(source: Image.Image, transform: str) -> Image.Image:
    """The demo's target for a source digit: inverted, blurred, or relit (a warm light from the left)."""
    from PIL import ImageFilter, ImageOps

    if transform == "invert":
        return ImageOps.invert(source)
    if transform == "blur":
        return source.filter(ImageFilter.GaussianBlur(radius=max(1.0, source.width / 16)))
    array = np.asarray(source, dtype=np.float32) / 255.0
    ramp = np.linspace(1.0, 0.35, source.width, dtype=np.float32)[None, :, None]
    tint = np.array([1.0, 0.85, 0.6], dtype=np.float32)
    return Image.fromarray(np.clip(array * ramp * tint * 255.0, 0, 255).round().astype(np.uint8))


def _split_keys(keys: list[str], val_fraction: float) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: :func:`~lightning_lora.data.images.split_records`' rule (the
    ``round(n * val_fraction)`` smallest SHA-1s, at least one when the fraction is positive and n >= 2) applied to
    the shard keys ("0003") rather than the file names ("0003.png"), so the shards keep their own split."""
    k = round(len(keys) * val_fraction)
    if val_fraction > 0 and len(keys) >= 2:
        k = min(max(k, 1), len(keys) - 1)
    val = set(sorted(keys, key=lambda key: hashlib.sha1(key.encode()).hexdigest())[:k])
    return {"train": [key for key in keys if key not in val], "validation": [key for key in keys if key in val]}


def write_digit_translation_shards(root: str | os.PathLike, num_images: int | None = 256, image_size: int = 64,
                                   transform: str = "invert", val_fraction: float = 0.1, per_shard: int = 64
                                   ) -> tuple[str, str | None]:
    """sklearn's digits (bundled: no download) as paired tar shards: ``NNNN.source.png`` (dark ink on white,
    upscaled to ``image_size``, bicubic) + ``NNNN.target.png`` (``translation_target``). Validation is the
    ``val_fraction`` of samples with the smallest hash of their key. Written once under ``root`` (the whole
    folder renamed into place) and reused. Returns the train and validation brace patterns."""
    choice(transform, "data.transform", TRANSLATION_TRANSFORMS)
    optional_positive_int(num_images, "data.num_images", got=True)
    positive_int(image_size, "data.image_size", got=True)
    positive_int(per_shard, "data.per_shard", got=True)
    fraction(val_fraction, "data.val_fraction")
    digits = SklearnDigits(num_images, "digits_pairs")  # loaded even when built: the count names the shards
    splits = _split_keys([f"{i:04d}" for i in range(len(digits))], val_fraction)
    folder = Path(root).expanduser().resolve() / (
        f"pairs_n{num_images or 'all'}_s{image_size}_{transform}_v{val_fraction:g}_p{per_shard}")
    counts = {split: -(-len(chosen) // per_shard) for split, chosen in splits.items()}
    patterns = {split: shard_pattern(str(folder / f"{split}-%04d.tar"), n) if n else None
                for split, n in counts.items()}
    if (folder / "done").is_file():
        return patterns["train"], patterns["validation"]

    def samples(chosen: list[str]) -> Iterator[dict[str, Any]]:
        for key in chosen:
            source = digits.draw(int(key), image_size, invert=True)  # always dark ink on white: no invert option
            yield {"__key__": key, "source.png": source, "target.png": translation_target(source, transform),
                   "json": {"label": digits.label(int(key))}}

    with atomic_directory(folder) as tmp:
        for split, chosen in splits.items():
            if chosen:
                write_shards(samples(chosen), str(tmp / f"{split}-%04d.tar"), per_shard)
        (tmp / "done").write_text("ok\n")
    return patterns["train"], patterns["validation"]


class DigitTranslationDataModule(PairedShardsDataModule):
    """The image-to-image demo (``data=digits_pairs``): digit → inverted/blurred/relit digit, built once by
    :func:`write_digit_translation_shards` under ``root`` and read as ``data=paired_shards`` reads user shards."""

    requires: ClassVar[tuple[str, ...]] = ("sklearn",)  # the digits come with scikit-learn: the [demo] extra

    def __init__(self, root: str, num_images: int | None = 256, image_size: int = 64, transform: str = "invert",
                 val_fraction: float = 0.1, per_shard: int = 64, **kwargs: Any) -> None:
        train, val = write_digit_translation_shards(root, num_images, image_size, transform, val_fraction, per_shard)
        kwargs.setdefault("source_key", "source.png")
        kwargs.setdefault("target_key", "target.png")
        super().__init__(train, val, **kwargs)


# ------------------------------------------------------------------------- image-text retrieval (data=digits_retrieval)
RETRIEVAL_DIRECTIONS = ("image_to_text", "text_to_image")


def _caption_labels(folder: Path) -> dict[str, int]:
    """File name -> digit, from the ``label`` field :func:`write_digit_captions` puts in metadata.jsonl."""
    labels = {}
    for line in (folder / METADATA_FILE).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            labels[row["file_name"]] = int(row["label"])
    return labels


def write_digit_retrieval_pairs(root: str | os.PathLike, num_images: int | None = 256, image_size: int = 64,
                                invert: bool = True, direction: str = "image_to_text", num_negatives: int = 0,
                                val_fraction: float = 0.1) -> tuple[Path, Path | None]:
    """Write the retrieval demo as ``train.jsonl`` / ``val.jsonl`` (written once, reused) and return their paths.

    The images are :func:`write_digit_captions`'s (shared with ``data=digits`` under the same ``root``), split
    as that module splits them. ``image_to_text``: the query is a digit's image and the positive its caption
    "a handwritten digit 3" (identical captions in a batch are the same document, which the loss's duplicate
    masking handles); ``text_to_image`` the reverse. ``num_negatives`` hard negatives per pair: captions of the
    next digits (image_to_text) or images of other digits (text_to_image).
    """
    choice(direction, "data.direction", RETRIEVAL_DIRECTIONS)
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or not 0 <= num_negatives <= 9:
        raise UserError(f"data.num_negatives={num_negatives!r} must be an integer from 0 to 9")
    images = write_digit_captions(root, num_images=num_images, image_size=image_size, invert=invert)
    out = images.with_name(f"{images.name}-pairs-{direction}-neg{num_negatives}-v{val_fraction:g}")
    train_file, val_file = out / "train.jsonl", out / "val.jsonl"
    if train_file.is_file():
        return train_file, (val_file if val_file.is_file() else None)
    records = read_image_folder(images)
    labels = _caption_labels(images)
    by_label: dict[int, list[str]] = {}
    for r in records:
        by_label.setdefault(labels[r.name], []).append(r.name)

    def pair(name: str) -> dict:
        label, image = labels[name], f"../{images.name}/{name}"  # relative to the JSONL folder
        if direction == "image_to_text":
            negs = [digit_caption((label + k) % 10) for k in range(1, num_negatives + 1)]
            return {"query_image": image, "positive": digit_caption(label), "negatives": negs}
        others = [(label + k) % 10 for k in range(1, 10) if by_label.get((label + k) % 10)]
        negs = [{"image": f"../{images.name}/{by_label[d][0]}"} for d in others[:num_negatives]]
        return {"query": digit_caption(label), "positive_image": image, "negatives": negs}

    train, val = split_records(records, val_fraction)
    with atomic_directory(out) as tmp:
        for file, chosen in (("train.jsonl", train), ("val.jsonl", val)):
            if chosen:
                (tmp / file).write_text("".join(json.dumps(pair(r.name)) + "\n" for r in chosen), encoding="utf-8")
    return train_file, (val_file if val_file.is_file() else None)


class DigitRetrievalDataModule(ImagePairsDataModule):
    """The image-text retrieval demo (``data=digits_retrieval``): written once as JSONL under ``root`` by
    :func:`write_digit_retrieval_pairs`, then read through the same code as user data (``data=image_pairs``)."""

    requires: ClassVar[tuple[str, ...]] = ("sklearn",)  # the digits come with scikit-learn: the [demo] extra

    def __init__(self, root: str, num_images: int | None = 256, image_size: int = 64, invert: bool = True,
                 direction: str = "image_to_text", num_negatives: int = 0, val_fraction: float = 0.1,
                 **kwargs: Any) -> None:
        optional_positive_int(num_images, "data.num_images", got=True)
        train, val = write_digit_retrieval_pairs(root, num_images=num_images, image_size=image_size, invert=invert,
                                                 direction=direction, num_negatives=num_negatives,
                                                 val_fraction=val_fraction)
        super().__init__(train_path=str(train), val_path=str(val) if val else None, **kwargs)


__all__ = [
    "CAPTION_FORMATS",
    "RETRIEVAL_DIRECTIONS",
    "TRANSLATION_TRANSFORMS",
    "DigitCaptionsDataModule",
    "DigitRetrievalDataModule",
    "DigitTranslationDataModule",
    "SklearnDigits",
    "digit_caption",
    "translation_target",
    "write_digit_caption_shards",
    "write_digit_captions",
    "write_digit_retrieval_pairs",
    "write_digit_translation_shards",
]
