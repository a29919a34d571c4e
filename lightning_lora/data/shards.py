"""WebDataset-style tar shards of captioned images (``data=webdataset``) or of image pairs (``data=paired_shards``),
and a writer for them (the digits demos in ``digits.py`` write theirs with it).

A shard is a plain tar whose members are grouped into samples by key: ``0001.jpg`` + ``0001.txt`` is one
sample with the fields ``jpg`` and ``txt``. Patterns use brace expansion (``data/shard-{000..009}.tar``;
several patterns joined with ``::``), as the ``webdataset`` package reads them.

The reader is a ``webdataset`` pipeline (``wds.DataPipeline``: shard list, worker split, tar reading and
grouping, shuffle buffer, ``with_epoch``) with a few stages of our own, each for a reason:

- shard and sample shuffles draw their seed from torch's RNG when an epoch starts, so Lightning's
  ``seed_everything`` (and the DataLoader's per-worker seeds) make them reproducible yet different every
  epoch; ``wds.WebDataset(shardshuffle=...)`` fixes one seed at construction (the same order every epoch)
  and ``.shuffle(n)`` seeds from the clock;
- images are decoded by ``images.load_rgb`` (EXIF orientation, alpha onto white, 16-bit grey) so folders and
  shards give identical pixels, and errors name the shard and sample (``.decode("pil")`` drops alpha);
- the split across processes takes rank and world size from the Trainer, not the environment, and every
  sample gets a stable id (``shard number * 10**9 + position in the shard``).

Epochs: by default one epoch is one pass over the shards (single process). Under DDP every process must
yield the same number of batches, which a pass over unevenly split shards does not guarantee, so there
``samples_per_epoch`` is required: each process then streams its shards endlessly (reshuffled on each pass)
and an epoch is cut at ``samples_per_epoch`` samples in total, as webdataset recommends for multi-node runs.
Validation shards are read in full by every process, in a fixed order (ids let the module drop repeats).

Paired shards (image-to-image, LBM): each sample holds a ``source`` and a ``target`` image (``0001.source.jpg`` +
``0001.target.jpg``, as the LBM relighting data) and optionally a ``mask`` (non-zero = pixels the loss sees);
one resize/crop/flip is drawn per sample and applied to all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from lightning_lora.checks import non_negative_int, optional_positive_int, positive_int
from lightning_lora.data.buckets import BucketGroups, BucketSpec
from lightning_lora.data.captions import CaptionPolicy
from lightning_lora.data.images import (
    INTERPOLATIONS,
    ImageDataModuleBase,
    ImageTransform,
    captioned_item,
    check_caption,
    collate_images,
    describe_error,
    load_rgb,
    to_tensor,
)
from lightning_lora.data.text import decode_utf8
from lightning_lora.errors import UserError
from lightning_lora.fileio import final_mode, temporary_prefix

SHARD_STRIDE = 10**9  # sample id = shard number * SHARD_STRIDE + position inside the shard
DEFAULT_IMAGE_KEY = "jpg;png;jpeg;webp"
DEFAULT_CAPTION_KEY = "txt;json"
DEFAULT_SOURCE_KEY = "source.jpg;source.png;source.jpeg;source.webp"
DEFAULT_TARGET_KEY = "target.jpg;target.png;target.jpeg;target.webp"
#: source -> target image pairs (``data=paired_shards``), what image-to-image heads train on
IMAGE_PAIRS = "source/target image pairs"
_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
_FIELD = re.compile(r"%(0?)(\d*)d")


# --------------------------------------------------------------------------- shard lists
def expand_shards(spec: str | Sequence[str], key: str = "data.train_shards") -> list[str]:
    """Brace-expand ``spec`` (patterns joined by ``::``, or a list of them) into shard URLs.

    Local paths become absolute and must exist: the first missing one is named. ``pipe:`` commands and
    ``scheme://`` URLs are passed through unchecked.
    """
    patterns = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for pattern in patterns:
        if not pattern.strip():
            continue
        for url in wds.shardlists.expand_urls(pattern.strip()):
            if _REMOTE.match(url):
                urls.append(url)
                continue
            path = os.path.abspath(os.path.expanduser(url.removeprefix("file:")))
            if not os.path.isfile(path):
                raise UserError(f"{key}: shard not found: {path} (from {spec!r} after brace expansion)")
            urls.append(path)
    if not urls:
        raise UserError(f"{key}: no shards in {spec!r}")
    return urls


def shard_pattern(pattern: str, count: int) -> str:
    """The brace pattern naming shards 0..count-1 of a printf pattern: ``a-%04d.tar``, 3 -> ``a-{0000..0002}.tar``."""
    match = _FIELD.search(pattern)
    if match is None:
        raise UserError(f"shard pattern {pattern!r} needs one printf field for the shard number, e.g. shard-%06d.tar")
    field = match.group(0)
    middle = field % 0 if count == 1 else f"{{{field % 0}..{field % (count - 1)}}}"
    return pattern[: match.start()] + middle + pattern[match.end():]


def write_shards(samples: Iterable[Mapping[str, Any]], pattern: str, per_shard: int = 1000) -> str:
    """Write samples into tar shards ``pattern % 0, pattern % 1, ...`` with ``per_shard`` samples each.

    A sample is a dict of fields by extension (``{"__key__": "0001", "png": bytes | PIL image | array,
    "txt": str, "json": dict}``; several images per sample are fine, e.g. ``source.png`` and ``target.png``),
    encoded as ``wds.TarWriter`` encodes them. A missing ``__key__`` becomes the running number; keys may not
    contain a dot (webdataset splits names at the first dot). Each shard is written to a temporary file and
    renamed, so a reader never sees half a shard; tars are reproducible (fixed mtime). Returns the brace
    pattern of the written shards, ready for ``train_shards``.
    """
    positive_int(per_shard, "per_shard", got=True)
    shard_pattern(pattern, 1)  # checks the printf field
    iterator = iter(samples)
    count = 0
    while chunk := list(islice(iterator, per_shard)):
        path = Path(pattern % count)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
        try:
            os.fchmod(fd, final_mode(path))  # as open() would make it, not mkstemp's 0600
            with os.fdopen(fd, "wb") as stream:
                writer = wds.TarWriter(stream, mtime=0.0)
                for i, sample in enumerate(chunk):
                    sample = dict(sample)
                    key = str(sample.setdefault("__key__", f"{count * per_shard + i:09d}"))
                    if "." in key.rsplit("/", 1)[-1]:
                        raise UserError(f"sample key {key!r} contains a dot; webdataset keys end at the first dot")
                    writer.write(sample)
                writer.close()
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        count += 1
    if count == 0:
        raise UserError(f"write_shards: no samples to write to {pattern}")
    return shard_pattern(pattern, count)


# --------------------------------------------------------------------------- pipeline stages
def _draw_seed(rank: int, salt: str) -> str:
    """A seed for one pass of one stage: from torch's RNG (seed_everything, per-worker DataLoader seeds), mixed
    with the process rank (every rank draws the same number after seed_everything)."""
    return f"{int(torch.randint(0, 2**62, (1,)).item())}/{rank}/{salt}"


class _SplitByRank:
    """``wds.split_by_node`` with rank and world size given (from the Trainer) instead of detected."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        yield from islice(src, self.rank, None, self.world)


class _ShardOrder:
    """Shuffle the shard list anew for every pass (training)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        shards = list(src)
        random.Random(_draw_seed(self.rank, "shards")).shuffle(shards)
        yield from shards


class _TarErrors:
    """Handler for errors while opening or reading one shard: fail naming it, or warn and skip the rest."""

    def __init__(self, url: str, skip: bool) -> None:
        self.url, self.skip = url, skip
        self.failed = False  # the rest of the shard was skipped

    def __call__(self, exc: BaseException) -> bool:
        if isinstance(exc, UserError):
            # webdataset appends the stream and url to the args of what passes its handler: keep the line only
            raise UserError(str(exc.args[0])) from None
        reason = str(exc.args[0] if exc.args else exc).split(" @ <")[0]  # webdataset appends " @ <stream repr>"
        message = f"unreadable shard {self.url} ({type(exc).__name__}: {reason})"
        if not self.skip:
            raise UserError(f"{message}; set data.skip_unreadable=true to skip it") from None
        warnings.warn(f"skipping the rest of {message}", stacklevel=2)
        self.failed = True
        return False  # stop reading this shard


class _ReadShards:
    """Open each shard (``wds.tarfile_to_samples``) and number its samples: the stable id."""

    def __init__(self, shard_numbers: dict[str, int], skip: bool) -> None:
        self.shard_numbers, self.skip = shard_numbers, skip
        self.unreadable = 0  # shards of the last pass whose rest was skipped (counted in this process)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        self.unreadable = 0
        for shard in src:
            url = shard["url"]
            base = self.shard_numbers[url] * SHARD_STRIDE
            errors = _TarErrors(url, self.skip)
            read = wds.tarfile_to_samples(handler=errors)
            for position, sample in enumerate(read(iter([dict(shard)]))):
                sample["__index__"] = base + position
                yield sample
            self.unreadable += errors.failed


class _Shuffle:
    """``wds.shuffle`` with a buffer of ``size`` samples and a seed drawn when the pass starts."""

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(_draw_seed(self.rank, "samples"))
        yield from wds.shuffle(self.size, initial=min(self.size, 100), rng=rng)(src)


def _first_field(sample: Mapping[str, Any], keys: str) -> str | None:
    return next((k for k in keys.split(";") if k in sample), None)


class DecodeSample:
    """Raw webdataset sample -> ``{<name>: RGB PIL image for each of images, "text": caption, "index": id}``.

    ``images`` maps output names to field alternatives, e.g. ``{"image": "jpg;png"}`` or, for paired data,
    ``{"source": "source.jpg;source.png", "target": "target.jpg;target.png"}``. ``caption_key`` alternatives
    ending in ``json`` are parsed and give ``caption_column``; others are UTF-8 text; None gives no caption.
    Unreadable images: fail naming shard and sample, or (``skip``) drop the sample, warn at the first one and
    give the count when the pass ends. A missing field is always an error.
    """

    def __init__(self, images: Mapping[str, str], caption_key: str | None = DEFAULT_CAPTION_KEY,
                 caption_column: str = "text", skip: bool = False) -> None:
        self.images, self.caption_key, self.caption_column, self.skip = dict(images), caption_key, caption_column, skip
        self.skipped = 0

    def _caption(self, sample: Mapping[str, Any], where: str) -> Any:
        assert self.caption_key is not None
        field = _first_field(sample, self.caption_key)
        if field is None:
            raise UserError(f"{where}: no caption (none of {self.caption_key}; it has {_fields(sample)})")
        raw = sample[field]
        text = decode_utf8(raw, f"{where}.{field}") if isinstance(raw, bytes) else str(raw)
        if not field.endswith("json"):
            return text.strip()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}.{field}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(obj, dict) or self.caption_column not in obj:
            found = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{where}.{field}: missing field '{self.caption_column}' (found: {found})")
        return check_caption(obj[self.caption_column], f"{where}.{field}", self.caption_column)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        skipped = self.skipped = 0
        for sample in src:
            where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
            out: dict[str, Any] = {"index": sample["__index__"]}
            for name, keys in self.images.items():
                field = _first_field(sample, keys)
                if field is None:
                    raise UserError(f"{where} has no image field ({keys}); it has {_fields(sample)}")
                try:
                    out[name] = load_rgb(sample[field])
                except Exception as exc:
                    if not self.skip:
                        raise UserError(
                            f"unreadable image {where}.{field} ({describe_error(exc)}); "
                            "set data.skip_unreadable=true to skip such samples"
                        ) from None
                    skipped = self.skipped = skipped + 1  # the attribute: the count of this pass, in this process
                    if skipped == 1:
                        reason = describe_error(exc)
                        warnings.warn(f"skipping unreadable image {where}.{field} ({reason})", stacklevel=2)
                    break
            else:
                if self.caption_key is not None:
                    out["text"] = self._caption(sample, where)
                yield out
        if skipped:
            warnings.warn(f"skipped {skipped} unreadable image(s) in this pass over the shards", stacklevel=2)


def _fields(sample: Mapping[str, Any]) -> str:
    return ", ".join(k for k in sample if not k.startswith("__")) or "nothing"


def shard_pipeline(urls: Sequence[str], stages: Sequence[Any], *, train: bool, rank: int = 0, world: int = 1,
                   num_workers: int = 0, shardshuffle: bool = True, shuffle_buffer: int = 1000,
                   samples_per_epoch: int | None = None, skip_unreadable: bool = False,
                   multiple_of: int = 1) -> wds.DataPipeline:
    """A ``wds.DataPipeline`` over ``urls`` yielding raw numbered samples passed through ``stages``.

    Training: split across processes and workers, shards and samples shuffled; ``samples_per_epoch`` makes
    the stream endless and cuts each worker's epoch at its share (shards are split only where every process
    or worker still gets one, else each streams all of them in its own order). Validation (``train=False``):
    every process reads all shards in order, split only across workers. ``multiple_of``: a worker's epoch is
    rounded up to a multiple of it (single-bucket batches stay whole).
    """
    workers = max(1, num_workers)
    chosen: list[Any] = [wds.SimpleShardList(list(urls))]
    if train and samples_per_epoch is None:
        chosen += [_SplitByRank(rank, world), wds.split_by_worker]
    elif train:
        if len(urls) >= world:
            chosen.append(_SplitByRank(rank, world))
        if len(urls) // world >= workers:
            chosen.append(wds.split_by_worker)
    else:
        chosen.append(wds.split_by_worker)
    if train and shardshuffle:
        chosen.append(_ShardOrder(rank))
    chosen.append(_ReadShards({url: i for i, url in enumerate(urls)}, skip_unreadable))
    if train and shuffle_buffer > 1:
        chosen.append(_Shuffle(shuffle_buffer, rank))
    pipeline = wds.DataPipeline(*chosen, *stages)
    if train and samples_per_epoch is not None:
        share = -(-samples_per_epoch // (world * workers))
        pipeline = pipeline.with_epoch(-(-share // multiple_of) * multiple_of)
    return pipeline


class CaptionedImage:
    """Decoded sample -> the SD batch item ``{"pixel_values", "text", "index"}`` (``images.captioned_item``: with
    ``buckets`` each image to its nearest bucket, ``captions`` in training, ``crop_coords``)."""

    def __init__(self, transform: ImageTransform, image: str = "image", buckets: BucketSpec | None = None,
                 captions: CaptionPolicy | None = None, crop_coords: bool = False) -> None:
        self.transform, self.image, self.buckets = transform, image, buckets
        self.captions, self.crop_coords = captions, crop_coords
        self.sizes = buckets.sizes() if buckets is not None else None

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            image = sample[self.image]
            bucket = self.buckets.nearest(image.size, self.sizes) if self.buckets is not None else None
            yield captioned_item(self.transform, image, sample.get("text", ""), sample["index"], bucket,
                                 self.captions, self.crop_coords)


# --------------------------------------------------------------------------- data module
def check_field_keys(**keys: str | None) -> None:
    """Each value is None or ';'-separated field names (``jpg;png``, ``source.jpg;source.png``)."""
    for name, value in keys.items():
        if value is not None and (not isinstance(value, str) or not value.strip() or " " in value):
            raise UserError(f"data.{name}={value!r}: give ';'-separated field names such as jpg;png")


class WebDatasetDataModule(ImageDataModuleBase):
    """Captioned images from webdataset tar shards (``data=webdataset``).

    ``train_shards`` / ``validation_shards``: brace patterns (``data/train-{000..099}.tar``; ``::`` joins
    several), checked at construction (the first missing local shard is named). Each sample's image is the
    first present of ``image_key`` (``jpg;png;jpeg;webp``) and its caption the first of ``caption_key``
    (``txt;json``; JSON gives ``caption_column``, which may be a list: random pick in training, first in
    validation). Training shuffles shard order and samples (buffer ``shuffle_buffer``) every epoch.

    Unreadable images (or shards): by default the run fails naming the shard and sample;
    ``skip_unreadable=True`` drops such samples, warns at the first and counts them at the end of each pass.
    Under DDP, ``samples_per_epoch`` is required (see the module docstring).
    """

    def __init__(self, train_shards: str | Sequence[str], validation_shards: str | Sequence[str] | None = None,
                 image_key: str = DEFAULT_IMAGE_KEY, caption_key: str | None = DEFAULT_CAPTION_KEY,
                 caption_column: str = "text", shardshuffle: bool = True, shuffle_buffer: int = 1000,
                 samples_per_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not train_shards:
            raise UserError("data.train_shards: not set; give a brace pattern such as data/train-{000..009}.tar")
        self.train_shards = train_shards
        self.train_urls = expand_shards(train_shards, "data.train_shards")
        self.val_urls = expand_shards(validation_shards, "data.validation_shards") if validation_shards else []
        check_field_keys(image_key=image_key, caption_key=caption_key)
        non_negative_int(shuffle_buffer, "data.shuffle_buffer", got=True)
        optional_positive_int(samples_per_epoch, "data.samples_per_epoch", hint=" or null", got=True)
        self.image_key, self.caption_key, self.caption_column = image_key, caption_key, caption_column
        self.shardshuffle, self.shuffle_buffer, self.samples_per_epoch = shardshuffle, shuffle_buffer, samples_per_epoch

    def _check_world(self) -> None:
        world = self._world_size()
        if world > 1 and self.samples_per_epoch is None:
            raise UserError(
                f"data.samples_per_epoch must be set for webdataset training on {world} processes: one pass over "
                "unevenly split shards gives processes different numbers of batches, which stalls DDP"
            )

    def setup(self, stage: str | None = None) -> None:
        self._check_world()
        if stage in (None, "fit"):
            self._check_yields()

    def data_source(self) -> str:
        """Where the training samples come from, as given (named when an epoch yields no batch)."""
        return f"data.train_shards={self.train_shards!r}"

    def _pass(self) -> tuple[Iterator[dict], DecodeSample, _ReadShards]:
        """One in-process pass over every training shard, in order, with its decoding (no random draw: the
        training stream's seeds stay as they were)."""
        decode = self.stages(train=False)[0]
        read = _ReadShards({url: i for i, url in enumerate(self.train_urls)}, self.skip_unreadable)
        return iter(wds.DataPipeline(wds.SimpleShardList(list(self.train_urls)), read, decode)), decode, read

    def skipped_samples(self) -> dict[str, int]:
        """Training samples one pass over every training shard drops, by reason. Counted again here, in this
        process: DataLoader workers keep their counts to themselves. Read only when an epoch yielded no batch."""
        samples, decode, read = self._pass()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the run already warned while it read them
            for _ in samples:
                pass
        return {"unreadable image": decode.skipped, "unreadable shard": read.unreadable}

    def _check_yields(self) -> None:
        """Before any model loads, read local shards up to their first usable sample: a pass that would yield
        none (empty shards, every image skipped as unreadable) stops now, and a bad first sample fails now. Remote
        shards are left to the first epoch (the empty-epoch guard), which opens their streams anyway."""
        if any(_REMOTE.match(url) for url in self.train_urls):
            return
        samples, _, _ = self._pass()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the training pass warns about what it skips
            if next(samples, None) is not None:
                return
        skipped = ", ".join(f"{n} skipped: {why}" for why, n in self.skipped_samples().items() if n)
        raise UserError(f"{self.data_source()}: the epoch yielded no training batch "
                        f"({skipped or 'none skipped: the source holds no training sample'})")

    def stages(self, train: bool) -> list[Any]:
        """Decoding and the batch item, after the shard reading (captioned images here)."""
        decode = DecodeSample({"image": self.image_key}, self.caption_key, self.caption_column, self.skip_unreadable)
        item = CaptionedImage(self.train_transform if train else self.val_transform, buckets=self.bucket_spec,
                              captions=self.caption_policy() if train else None, crop_coords=self.crop_coords)
        if self.bucket_spec is None:
            return [decode, item]
        return [decode, item, BucketGroups(self.batch_size if train else self.val_batch_size)]

    def pipeline(self, train: bool) -> wds.DataPipeline:
        trainer = getattr(self, "trainer", None)
        rank = int(trainer.global_rank) if trainer is not None else 0
        return shard_pipeline(
            self.train_urls if train else self.val_urls, self.stages(train), train=train, rank=rank,
            world=self._world_size(), num_workers=self.num_workers, shardshuffle=self.shardshuffle,
            shuffle_buffer=self.shuffle_buffer, samples_per_epoch=self.samples_per_epoch,
            skip_unreadable=self.skip_unreadable, multiple_of=self.batch_size if self.bucket_spec else 1,
        )

    def _loader(self, train: bool) -> DataLoader:
        # Batches are cut in the DataLoader (per worker); the last one of a pass may be short, never empty.
        return DataLoader(self.pipeline(train), batch_size=self.batch_size if train else self.val_batch_size,
                          num_workers=self.num_workers, collate_fn=collate_images,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self._check_world()
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(train=False) if self.val_urls else []


# --------------------------------------------------------------------------- paired images (LBM)
class PairedImages:
    """Decoded paired sample -> ``{"source", "target", ["mask"], "index"}``, one draw of resize/crop/flip per pair.

    The source is first resized to the target's size when they differ (as LBM does). With ``size`` = (height,
    width), both are resized to exactly that size (no crop, as LBM's relighting data is read) and flipped
    together in training when the transform flips; otherwise ``transform`` resizes the shorter side and crops a
    square. A mask is resized with nearest-neighbour and becomes {0, 1} (non-zero = valid) [1, H, W].
    """

    def __init__(self, transform: ImageTransform, size: tuple[int, int] | None = None) -> None:
        self.transform, self.size = transform, size
        self.filter = INTERPOLATIONS[transform.interpolation]
        self.nearest = ImageTransform(transform.resolution, interpolation="nearest")

    @staticmethod
    def _mask(mask: torch.Tensor) -> torch.Tensor:
        return (mask.amax(0, keepdim=True) > -1).float()  # [-1, 1] pixels: any non-black pixel is valid

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            source, target, mask = sample["source"], sample["target"], sample.get("mask")
            if source.size != target.size:
                source = source.resize(target.size, self.filter)
            if mask is not None and mask.size != target.size:
                mask = mask.resize(target.size, Image.Resampling.NEAREST)
            if self.size is not None:
                h, w = self.size
                flip = bool(self.transform.random_flip and torch.rand(1).item() < 0.5)
                images = [im.resize((w, h), self.filter) for im in (source, target)]
                mask = mask.resize((w, h), Image.Resampling.NEAREST) if mask is not None else None
                if flip:
                    images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
                    mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
                out = {"source": to_tensor(images[0]), "target": to_tensor(images[1])}
                if mask is not None:
                    out["mask"] = self._mask(to_tensor(mask.convert("RGB")))
            else:
                params = self.transform.params(target.size)
                out = {"source": self.transform.apply(source, params), "target": self.transform.apply(target, params)}
                if mask is not None:
                    out["mask"] = self._mask(self.nearest.apply(mask.convert("RGB"), params))
            out["index"] = sample["index"]
            yield out


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"data.size={value!r}: give [height, width] in pixels, e.g. [480, 640], or null") from None
    if h <= 0 or w <= 0:
        raise UserError(f"data.size={[h, w]}: height and width must be positive")
    return h, w


class PairedShardsDataModule(WebDatasetDataModule):
    """Image pairs from webdataset tar shards (``data=paired_shards``): LBM-style image-to-image data.

    Each sample holds a source and a target image, the first present of ``source_key`` / ``target_key``
    (``source.jpg;source.png;...``: members ``0001.source.jpg`` + ``0001.target.jpg``), and with ``mask_key``
    a mask. A sample without one of them is an error naming the shard and sample. Batches: ``source``,
    ``target`` [B, 3, H, W] in [-1, 1], ``mask`` [B, 1, H, W] (with ``mask_key``), ``index``. Sizes:
    ``resolution`` + crop as for captioned images, or ``size`` = [height, width] for an exact resize of every
    pair. Shards, shuffling, epochs and DDP as ``data=webdataset``.
    """

    batch_kind: ClassVar[str] = IMAGE_PAIRS

    def __init__(self, train_shards: str | Sequence[str], validation_shards: str | Sequence[str] | None = None,
                 source_key: str = DEFAULT_SOURCE_KEY, target_key: str = DEFAULT_TARGET_KEY,
                 mask_key: str | None = None, size: Any = None, **kwargs: Any) -> None:
        check_field_keys(source_key=source_key, target_key=target_key, mask_key=mask_key)
        self.size = _size(size)
        super().__init__(train_shards, validation_shards, image_key=source_key, caption_key=None, **kwargs)
        self.fields = {"source": source_key, "target": target_key, **({"mask": mask_key} if mask_key else {})}

    def stages(self, train: bool) -> list[Any]:
        decode = DecodeSample(self.fields, None, skip=self.skip_unreadable)
        return [decode, PairedImages(self.train_transform if train else self.val_transform, self.size)]


__all__ = [
    "SHARD_STRIDE",
    "CaptionedImage",
    "DecodeSample",
    "PairedImages",
    "PairedShardsDataModule",
    "WebDatasetDataModule",
    "check_field_keys",
    "expand_shards",
    "shard_pattern",
    "shard_pipeline",
    "write_shards",
]

