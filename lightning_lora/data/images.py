"""Image + caption data for Stable Diffusion LoRA: the transforms and an image folder.

Every module here yields the same batch (what ``heads/diffusion.py`` consumes)::

    pixel_values  float32 [B, 3, H, W] in [-1, 1]   (Normalize([0.5], [0.5]) as diffusers)
    text          list[str]                         (captions; the head tokenizes)
    index         int64 [B]                         (stable sample ids; validation drops repeats by them)

The transforms follow diffusers' ``train_text_to_image_lora.py``: resize the shorter side to ``resolution``,
centre crop (``center_crop``) or random crop (training), optional horizontal flip (training), to tensor,
normalise. Validation is deterministic: centre crop, no flip. Randomness comes from torch's global RNG, so
Lightning's ``seed_everything`` (and the DataLoader's per-worker seeding) fixes it.

Tar shards (``data=webdataset``) live in ``shards.py``; they share the transforms and the image decoding. The
digits demo (``data=digits``) lives in ``digits.py``.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from lightning_lora.checks import choice, fraction, non_negative_int, optional_positive_int, positive_int
from lightning_lora.data.buckets import BucketSampler, BucketSpec
from lightning_lora.data.captions import CaptionPolicy
from lightning_lora.data.pairs import jsonl_values
from lightning_lora.data.text import read_utf8
from lightning_lora.errors import UserError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
METADATA_FILE = "metadata.jsonl"
#: images with captions, what text-to-image heads train on
CAPTIONED_IMAGES = "captioned images"
# The names diffusers' --image_interpolation_mode accepts, mapped to PIL filters.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
Caption = str | tuple[str, ...]


# --------------------------------------------------------------------------- decoding and transforms
def load_rgb(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Decode an image file (path or bytes) to an RGB PIL image.

    EXIF orientation is applied; transparent images (RGBA, LA, P with a transparent colour) are composited
    onto white instead of dropping alpha (which leaves whatever colour the transparent pixels hold); 16-bit
    greyscale is scaled to 8 bits; everything else goes through ``Image.convert("RGB")``.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    image = ImageOps.exif_transpose(image) or image
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(array / scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def describe_error(exc: BaseException) -> str:
    """A short reason for a failed decode (PIL's own message names an in-memory buffer by its address)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    return f"{type(exc).__name__}: {exc}"


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1] (ToTensor then Normalize([0.5], [0.5]))."""
    array = np.array(image, dtype=np.uint8, copy=True)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255.0)
    return tensor.sub_(0.5).div_(0.5)


@dataclass(frozen=True)
class CropParams:
    """One draw of the random parts of the transform: resized size, crop corner, flip (and the crop's size)."""

    size: tuple[int, int]  # (width, height) after the resize
    top: int
    left: int
    flip: bool
    out: tuple[int, int] | None = None  # (width, height) of the crop; None: the square resolution

    def crop_top_left(self, resolution: int) -> tuple[int, int]:
        """(top, left) of the crop in the resized image as the picture shows it, i.e. after the flip (SDXL's
        ``crop_coords_top_left``: diffusers' script flips before it crops)."""
        width = self.out[0] if self.out else resolution
        return self.top, (self.size[0] - self.left - width) if self.flip else self.left


class ImageTransform:
    """Resize the shorter side to ``resolution``, crop a square, maybe flip, normalise to [-1, 1].

    ``train=False`` gives the validation transform: always a centre crop and never a flip. Random draws use
    torch's global RNG (``torch.randint``/``torch.rand``), as torchvision's transforms do.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 interpolation: str = "lanczos", train: bool = True) -> None:
        positive_int(resolution, "data.resolution", got=True)
        choice(interpolation, "data.interpolation", INTERPOLATIONS)
        self.resolution, self.interpolation = resolution, interpolation
        self.center_crop = center_crop or not train
        self.random_flip = random_flip and train
        self.train = train

    def params(self, size: tuple[int, int], bucket: tuple[int, int] | None = None) -> CropParams:
        """Draw the resize/crop/flip for an image of ``size`` = (width, height); with a ``bucket`` (width, height)
        the image is resized to cover the bucket and cropped to it (``buckets.py``)."""
        if bucket is not None:
            return self._bucket_params(size, bucket)
        width, height = size
        res = self.resolution
        # torchvision's Resize(int): the shorter side becomes res, the longer one int(res * long / short).
        new = (res, int(res * height / width)) if width <= height else (int(res * width / height), res)
        if self.center_crop:
            top, left = round((new[1] - res) / 2.0), round((new[0] - res) / 2.0)
        else:
            top = int(torch.randint(0, new[1] - res + 1, (1,)).item())
            left = int(torch.randint(0, new[0] - res + 1, (1,)).item())
        flip = bool(self.random_flip and torch.rand(1).item() < 0.5)
        return CropParams(new, top, left, flip)

    def _bucket_params(self, size: tuple[int, int], bucket: tuple[int, int]) -> CropParams:
        (width, height), (bw, bh) = size, bucket
        scale = max(bw / width, bh / height)
        new = (max(bw, round(width * scale)), max(bh, round(height * scale)))
        if self.center_crop:
            top, left = round((new[1] - bh) / 2.0), round((new[0] - bw) / 2.0)
        else:
            top = int(torch.randint(0, new[1] - bh + 1, (1,)).item())
            left = int(torch.randint(0, new[0] - bw + 1, (1,)).item())
        flip = bool(self.random_flip and torch.rand(1).item() < 0.5)
        return CropParams(new, top, left, flip, (bw, bh))

    def apply(self, image: Image.Image, params: CropParams) -> torch.Tensor:
        if image.size != params.size:
            image = image.resize(params.size, INTERPOLATIONS[self.interpolation])
        width, height = params.out or (self.resolution, self.resolution)
        image = image.crop((params.left, params.top, params.left + width, params.top + height))
        if params.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.apply(image, self.params(image.size))

    def apply_together(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """The same crop and flip for several images of one sample (e.g. a source/target pair)."""
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise UserError(f"images of one sample must have the same size to share a crop; got {sorted(sizes)}")
        params = self.params(images[0].size)
        return [self.apply(im, params) for im in images]


def pick_caption(caption: Caption, train: bool) -> str:
    """A list of captions gives a random one in training and the first in validation (as diffusers)."""
    if isinstance(caption, str):
        return caption
    if not train or len(caption) == 1:
        return caption[0]
    return caption[int(torch.randint(0, len(caption), (1,)).item())]


def check_caption(value: Any, where: str, column: str) -> Caption:
    """A caption is a string or a non-empty list of strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UserError(f"{where}: field '{column}' must be a string or a non-empty list of strings, got {value!r}")


def captioned_item(transform: ImageTransform, image: Image.Image, caption: Caption, index: int,
                   bucket: tuple[int, int] | None = None, captions: CaptionPolicy | None = None,
                   crop_coords: bool = False) -> dict[str, Any]:
    """One batch item: pixels, the caption (``captions`` applied in training), the id, and with ``crop_coords``
    the original (height, width) and the crop's (top, left) as int64 pairs (SDXL's micro-conditioning)."""
    params = transform.params(image.size, bucket)
    text = pick_caption(caption, transform.train)
    if captions is not None and transform.train:
        text = captions(text)
    item: dict[str, Any] = {"pixel_values": transform.apply(image, params), "text": text, "index": index}
    if crop_coords:
        item["original_size"] = torch.tensor([image.size[1], image.size[0]])
        item["crop_top_left"] = torch.tensor(params.crop_top_left(transform.resolution))
    return item


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` (and any other tensor fields), list the captions, ids as int64."""
    if not samples:
        raise UserError("empty batch: the data set yielded no samples")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "index":
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values).contiguous()
        else:
            batch[key] = values
    return batch


# --------------------------------------------------------------------------- image folders
@dataclass(frozen=True)
class ImageRecord:
    path: Path
    name: str  # path relative to the folder, posix
    caption: Caption
    index: int  # position in the folder's sorted list: stable across runs and splits


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def read_captions_jsonl(path: Path, caption_column: str = "text") -> dict[str, tuple[Caption, int]]:
    """``metadata.jsonl`` -> {relative posix file name: (caption, line number)}; errors name file:line."""
    captions: dict[str, tuple[Caption, int]] = {}
    for lineno, where, obj in jsonl_values(path, lambda n: f"{path}:{n}"):
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with 'file_name' and '{caption_column}'")
        found = ", ".join(map(str, obj)) or "none"
        for field in ("file_name", caption_column):
            if field not in obj:
                raise UserError(f"{where}: missing field '{field}' (found fields: {found})")
        if not isinstance(obj["file_name"], str) or not obj["file_name"].strip():
            raise UserError(f"{where}: field 'file_name' must be a non-empty string")
        name = posixpath.normpath(obj["file_name"].strip().replace("\\", "/"))
        if name in captions:
            raise UserError(f"{where}: file_name '{name}' repeats line {captions[name][1]}")
        captions[name] = (check_caption(obj[caption_column], where, caption_column), lineno)
    return captions


def read_image_folder(folder: str | os.PathLike, caption_column: str = "text",
                      key: str = "data.train_dir") -> list[ImageRecord]:
    """Images under ``folder`` (recursively, hidden names skipped) with their captions, sorted by path.

    Captions come from ``folder/metadata.jsonl`` (``file_name`` relative to the folder + ``caption_column``;
    a list of captions is allowed), else from a ``.txt`` file with the image's stem next to it. An image
    with neither is an error naming the image; a metadata line naming a file that does not exist too.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{key}: no such directory: {root}")
    meta_path = root / METADATA_FILE
    listed = read_captions_jsonl(meta_path, caption_column) if meta_path.is_file() else {}
    names = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p.relative_to(root)) and p.is_file()
    }
    for name, (_, lineno) in listed.items():
        if not (root / name).is_file():
            raise UserError(f"{meta_path}:{lineno}: file_name '{name}' not found in {root}")
        names.add(name)
    if not names:
        raise UserError(
            f"{key}: no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} recursively; "
            "extensions are matched case-insensitively)"
        )
    records = []
    for index, name in enumerate(sorted(names)):
        path = root / name
        if name in listed:
            caption: Caption = listed[name][0]
        elif (txt := path.with_suffix(".txt")).is_file():
            caption = read_utf8(txt).strip()
        else:
            source = f"not in {meta_path} and " if meta_path.is_file() else ""
            raise UserError(f"no caption for image {path}: {source}no {path.with_suffix('.txt').name} next to it")
        records.append(ImageRecord(path, name, caption, index))
    return records


def split_records(records: Sequence[ImageRecord], val_fraction: float) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Deterministic train/val split: the ``round(n * val_fraction)`` records (at least one when the fraction
    is positive and there are two or more) with the smallest hash of their file name go to validation, so
    the split depends only on the names, not on the machine or the order files were listed."""
    fraction(val_fraction, "data.val_fraction")
    n = len(records)
    k = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)

    def digest(r: ImageRecord) -> str:
        return hashlib.sha1(r.name.encode("utf-8")).hexdigest()

    chosen = {r.index for r in sorted(records, key=digest)[:k]}
    return [r for r in records if r.index not in chosen], [r for r in records if r.index in chosen]


def stored_size(path: Path) -> tuple[int, int]:
    """(width, height) as ``load_rgb`` will give it (EXIF orientation applied), from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        transposed = image.getexif().get(0x0112) in (5, 6, 7, 8)  # the orientations that swap the sides
    return (height, width) if transposed else (width, height)


def _check_readable(path: Path) -> str | None:
    """None when PIL can open ``path`` (header parse: cheap), else the reason."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018
    except Exception as exc:
        return describe_error(exc)
    return None


def drop_unreadable(records: list[ImageRecord], skip: bool, where: str) -> list[ImageRecord]:
    """The image-unreadable policy at setup: fail naming the first bad file, or skip and warn once with a count."""
    kept, bad = [], []
    for record in records:
        reason = _check_readable(record.path)
        if reason is None:
            kept.append(record)
        elif not skip:
            raise UserError(
                f"unreadable image {record.path} ({reason}); set data.skip_unreadable=true to skip such files"
            )
        else:
            bad.append((record.path, reason))
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) in {where} (first: {bad[0][0]}: {bad[0][1]})", stacklevel=2
        )
    if not kept:
        raise UserError(f"{where}: none of the {len(records)} images is readable")
    return kept


class ImageCaptionDataset(Dataset):
    """Map-style image + caption samples -> ``{"pixel_values", "text", "index"}``.

    An image that fails to decode at load time (the setup scan only reads headers) follows the same policy:
    a ``UserError`` naming the file, or with ``skip_unreadable`` a warning and the next readable record in its
    place (the batch keeps its size).
    """

    def __init__(self, records: Sequence[ImageRecord], transform: ImageTransform,
                 skip_unreadable: bool = False, buckets: Sequence[tuple[int, int]] | None = None,
                 captions: CaptionPolicy | None = None, crop_coords: bool = False) -> None:
        self.records, self.transform, self.skip_unreadable = list(records), transform, skip_unreadable
        self.buckets = list(buckets) if buckets is not None else None  # per record: (width, height), or None
        self.captions, self.crop_coords = captions, crop_coords or buckets is not None
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        reason = ""
        for step in range(len(self.records)):
            record = self.records[(index + step) % len(self.records)]
            try:
                image = load_rgb(record.path)
            except Exception as exc:
                reason = describe_error(exc)
                if not self.skip_unreadable:
                    raise UserError(
                        f"unreadable image {record.path} ({describe_error(exc)}); "
                        "set data.skip_unreadable=true to skip such files"
                    ) from None
                if record.path not in self._warned:
                    self._warned.add(record.path)
                    warnings.warn(f"skipping unreadable image {record.path} ({describe_error(exc)})", stacklevel=2)
                continue
            bucket = self.buckets[(index + step) % len(self.records)] if self.buckets is not None else None
            return captioned_item(self.transform, image, record.caption, record.index, bucket, self.captions,
                                  self.crop_coords)
        first = self.records[index % len(self.records)].path
        raise UserError(f"none of the {len(self.records)} images is readable: all were skipped as unreadable "
                        f"(e.g. {first}: {reason})")


# --------------------------------------------------------------------------- data modules
class ImageDataModuleBase(pl.LightningDataModule):
    """Options every image-caption module shares: the transforms, batch sizes, workers, unreadable policy."""

    #: ``{"pixel_values", "text", "index"}`` batches (``train.run`` checks it against the head's ``batch_kinds``)
    batch_kind: ClassVar[str] = CAPTIONED_IMAGES

    def __init__(self, resolution: int = 512, center_crop: bool = False, random_flip: bool = False,
                 interpolation: str = "lanczos", batch_size: int = 4, val_batch_size: int | None = None,
                 num_workers: int = 0, skip_unreadable: bool = False, buckets: Mapping[str, Any] | None = None,
                 caption_dropout: float = 0.0, shuffle_tags: bool = False, keep_tokens: int = 0,
                 crop_coords: bool = False) -> None:
        super().__init__()
        self.bucket_spec = BucketSpec.from_config(buckets, resolution)
        self.captions = CaptionPolicy(caption_dropout, shuffle_tags, keep_tokens)
        # original size and crop corner in every batch: always with buckets, else when asked (SDXL asks)
        self.crop_coords = bool(crop_coords) or self.bucket_spec is not None
        self.train_transform = ImageTransform(resolution, center_crop, random_flip, interpolation, train=True)
        self.val_transform = ImageTransform(resolution, center_crop, random_flip, interpolation, train=False)
        self.resolution = resolution
        self.batch_size = positive_int(batch_size, "data.batch_size", got=True)
        self.val_batch_size = positive_int(val_batch_size or batch_size, "data.val_batch_size", got=True)
        self.num_workers = non_negative_int(num_workers, "data.num_workers", got=True)
        self.skip_unreadable = bool(skip_unreadable)

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def caption_policy(self) -> CaptionPolicy | None:
        return self.captions if self.captions.active else None


class ImageFolderDataModule(ImageDataModuleBase):
    """Images + captions from folders (``data=image_folder``).

    ``train_dir`` holds images (any depth; .png .jpg .jpeg .webp .bmp .gif .tif .tiff) with captions from
    ``metadata.jsonl`` (``{"file_name": "a/b.png", "text": "..."}``, the caption column set by
    ``caption_column``; a list of captions gives a random one per step and the first in validation) or from
    ``<image stem>.txt`` next to each image. Validation comes from ``validation_dir`` (same layout) or else a
    deterministic ``val_fraction`` of ``train_dir`` picked by file-name hash.

    Unreadable images: by default the run fails with a one-line error naming the file (at setup, where every
    image's header is read, or when a file later fails to decode); ``skip_unreadable=True`` drops such files
    and warns once with their count (a file failing later is replaced by the next one, with a warning).
    """

    def __init__(self, train_dir: str, validation_dir: str | None = None, caption_column: str = "text",
                 val_fraction: float = 0.05, max_train_samples: int | None = None,
                 max_val_samples: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_dir = self._dir(train_dir, "data.train_dir")
        self.validation_dir = self._dir(validation_dir, "data.validation_dir") if validation_dir else None
        fraction(val_fraction, "data.val_fraction")
        self.caption_column, self.val_fraction = caption_column, val_fraction
        self.max_train_samples = optional_positive_int(max_train_samples, "data.max_train_samples", got=True)
        self.max_val_samples = optional_positive_int(max_val_samples, "data.max_val_samples", got=True)
        self.train_set: ImageCaptionDataset | None = None
        self.val_set: ImageCaptionDataset | None = None

    @staticmethod
    def _dir(path: str | None, key: str) -> Path:
        if path is None or not str(path).strip():
            raise UserError(f"{key}: not set; give a folder of images with captions")
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_dir():
            raise UserError(f"{key}: no such directory: {resolved}")
        return resolved

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records = read_image_folder(self.train_dir, self.caption_column, "data.train_dir")
        if self.validation_dir is not None:
            train = records
            val = read_image_folder(self.validation_dir, self.caption_column, "data.validation_dir")
        else:
            train, val = split_records(records, self.val_fraction)
        train = train[: self.max_train_samples] if self.max_train_samples else train
        val = val[: self.max_val_samples] if self.max_val_samples else val
        where = str(self.train_dir) + (f" and {self.validation_dir}" if self.validation_dir else "")
        readable = set(map(id, drop_unreadable(train + val, self.skip_unreadable, where)))  # one scan, one warning
        train, val = [r for r in train if id(r) in readable], [r for r in val if id(r) in readable]
        if not train:
            raise UserError(f"data.train_dir: none of the training images in {self.train_dir} is readable")
        self.val_set = self._dataset(val, self.val_transform)
        self.train_set = self._dataset(train, self.train_transform, self.caption_policy())

    def _dataset(self, records: list[ImageRecord], transform: ImageTransform,
                 captions: CaptionPolicy | None = None) -> ImageCaptionDataset:
        buckets = None
        if self.bucket_spec is not None:
            sizes = self.bucket_spec.sizes()
            buckets = [self.bucket_spec.nearest(stored_size(r.path), sizes) for r in records]
        return ImageCaptionDataset(records, transform, self.skip_unreadable, buckets, captions, self.crop_coords)

    def _loader(self, dataset: ImageCaptionDataset, batch_size: int, train: bool) -> DataLoader:
        if dataset.buckets is not None:  # single-bucket batches, shuffled per pass, each process its share
            sampler = BucketSampler(dataset.buckets, batch_size, shuffle=train, rank=self._rank(),
                                    world=self._world_size())
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                              collate_fn=collate_images, persistent_workers=self.num_workers > 0)
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) >= batch_size,
                          num_workers=self.num_workers, collate_fn=collate_images,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        # Lightning skips validation for an empty list of dataloaders.
        return self._loader(self.val_set, self.val_batch_size, train=False) if len(self.val_set) else []


__all__ = [
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "ImageCaptionDataset",
    "ImageDataModuleBase",
    "ImageFolderDataModule",
    "ImageRecord",
    "ImageTransform",
    "collate_images",
    "describe_error",
    "load_rgb",
    "pick_caption",
    "read_image_folder",
    "split_records",
]
