"""Hugging Face ``datasets`` as training data (``data=hf_dataset``): a Hub dataset by name, a local script-less
dataset (parquet/csv/json files, an image folder: ``path=parquet data_files=...``, ``path=imagefolder
data_dir=...``) or a folder written by ``Dataset.save_to_disk``, with the columns named for each kind of batch:

- ``kind=images`` (Stable Diffusion): ``image_column`` (an Image feature, a path or bytes) and ``caption_column``
  (a string, or a list: a random pick per step) -> ``{"pixel_values", "text", "index"}``, the image-folder
  transforms (``resolution``, ``center_crop``, ``random_flip``, ``interpolation``);
- ``kind=pairs`` (LBM): ``source_column`` / ``target_column`` images -> ``{"source", "target", "index"}``, one crop
  and flip drawn per pair;
- ``kind=embedding``: ``anchor_column`` / ``positive_column`` / optional ``negative_column`` as sentence-transformers
  names them -> the text-pair batches ``{"query", "positive", ["negatives"], "index"}``.

``streaming=true`` reads the split as it trains (an ``IterableDataset``: shuffled through a buffer, reseeded each
epoch, and split between processes with ``datasets.distributed.split_dataset_by_node``); otherwise the split is
loaded (memory-mapped Arrow) and Lightning's ``DistributedSampler`` shares it out. The kind decides
``batch_kind``, which ``train.run`` compares with the head before anything loads. ``datasets`` is the optional
extra ``lightning_lora[hf]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_lora.checks import choice, non_negative_int, optional_positive_int, positive_int
from lightning_lora.data.images import CAPTIONED_IMAGES, ImageTransform, collate_images, load_rgb, pick_caption
from lightning_lora.data.pairs import TEXT_PAIRS, collate_pairs
from lightning_lora.data.shards import IMAGE_PAIRS
from lightning_lora.errors import UserError

KINDS = {"images": CAPTIONED_IMAGES, "pairs": IMAGE_PAIRS, "embedding": TEXT_PAIRS}


def require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("data=hf_dataset needs the datasets package, which is not installed: pip install "
                        "'lightning_lora[hf]'") from None
    return datasets


def load_split(path: str, name: str | None, split: str, data_files: Any, data_dir: str | None,
               revision: str | None, streaming: bool, key: str, cache_dir: str | None = None) -> Any:
    """One split: ``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset``; errors in one line."""
    datasets = require_datasets()
    folder = Path(path).expanduser()
    try:
        if folder.is_dir() and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"{key}={split!r} is not a split of {path}; it has {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        return datasets.load_dataset(path, name, split=split, data_files=data_files, data_dir=data_dir,
                                     revision=revision, streaming=streaming, cache_dir=cache_dir)
    except UserError:
        raise
    except Exception as exc:  # no such dataset, file or split; an offline Hub; a bad config name
        first = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())[:200]
        raise UserError(f"data.path={path}: cannot load split {split!r} ({type(exc).__name__}: {first})") from None


class RowConverter:
    """A dataset row -> one training sample of the chosen kind (named columns, images decoded and transformed)."""

    def __init__(self, kind: str, columns: Mapping[str, str | None], transform: ImageTransform | None,
                 train: bool) -> None:
        self.kind, self.columns, self.transform, self.train = kind, dict(columns), transform, train

    def check(self, column_names: list[str] | None, where: str) -> None:
        """Every named column present (when the dataset knows its columns)."""
        if column_names is None:
            return
        for role, column in self.columns.items():
            if column is not None and column not in column_names:
                raise UserError(f"data.{role}_column={column!r} is not a column of {where}; its columns: "
                                f"{', '.join(column_names)}")

    def __call__(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        c = self.columns
        if self.kind == "embedding":
            out: dict[str, Any] = {"query": str(row[c["anchor"]]), "positive": str(row[c["positive"]]), "index": index}
            if c.get("negative") is not None and row.get(c["negative"]) is not None:
                negative = row[c["negative"]]
                out["negatives"] = [str(n) for n in negative] if isinstance(negative, list) else [str(negative)]
            return out
        assert self.transform is not None
        if self.kind == "images":
            caption = row[c["caption"]]
            caption = tuple(caption) if isinstance(caption, list) else str(caption)
            return {"pixel_values": self.transform(_image(row[c["image"]])),
                    "text": pick_caption(caption, self.train), "index": index}
        source, target = _image(row[c["source"]]), _image(row[c["target"]])
        if source.size != target.size:  # as the paired shards: the source takes the target's size
            source = source.resize(target.size)
        params = self.transform.params(target.size)
        return {"source": self.transform.apply(source, params), "target": self.transform.apply(target, params),
                "index": index}


def _image(value: Any) -> Any:
    """An Image feature's PIL image, a ``{"bytes"|"path"}`` dict, a path or raw bytes -> an RGB PIL image."""
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    return load_rgb(value)


class MapRows(Dataset):
    def __init__(self, rows: Any, convert: RowConverter) -> None:
        self.rows, self.convert = rows, convert

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.convert(self.rows[int(index)], int(index))


class StreamRows(IterableDataset):
    """A streamed split, rows converted as they come (row ids count from 0 in this process's share)."""

    def __init__(self, rows: Any, convert: RowConverter) -> None:
        self.rows, self.convert = rows, convert

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, row in enumerate(self.rows):
            yield self.convert(row, index)


class HFDatasetDataModule(pl.LightningDataModule):
    requires: ClassVar[tuple[str, ...]] = ("datasets",)  # the [hf] extra; train.check_packages names it

    def __init__(self, path: str, name: str | None = None, split: str = "train", val_split: str | None = None,
                 data_files: Any = None, data_dir: str | None = None, revision: str | None = None,
                 kind: str = "images", streaming: bool = False, shuffle_buffer: int = 1000,
                 image_column: str = "image", caption_column: str = "text", source_column: str = "source",
                 target_column: str = "target", anchor_column: str = "anchor", positive_column: str = "positive",
                 negative_column: str | None = "negative", max_train_samples: int | None = None,
                 max_val_samples: int | None = None, resolution: int = 512, center_crop: bool = False,
                 random_flip: bool = False, interpolation: str = "lanczos", batch_size: int = 4,
                 val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        require_datasets()  # before any model loads: one line naming the extra
        self.kind = choice(kind, "data.kind", KINDS)
        if not isinstance(path, str) or not path.strip():
            raise UserError(f"data.path={path!r} must name a dataset: a Hub id, a packaged builder (parquet, csv, "
                            "json, imagefolder) with data_files/data_dir, or a save_to_disk folder")
        self.path, self.name, self.split, self.val_split = path, name, split, val_split
        self.data_files, self.data_dir, self.revision = data_files, data_dir, revision
        self.streaming, self.seed, self.cache_dir = bool(streaming), int(seed), cache_dir
        self.shuffle_buffer = non_negative_int(shuffle_buffer, "data.shuffle_buffer", got=True)
        self.max_train_samples = optional_positive_int(max_train_samples, "data.max_train_samples", got=True)
        self.max_val_samples = optional_positive_int(max_val_samples, "data.max_val_samples", got=True)
        self.batch_size = positive_int(batch_size, "data.batch_size", got=True)
        self.val_batch_size = positive_int(val_batch_size or batch_size, "data.val_batch_size", got=True)
        self.num_workers = non_negative_int(num_workers, "data.num_workers", got=True)
        self.columns: dict[str, str | None] = {
            "images": {"image": image_column, "caption": caption_column},
            "pairs": {"source": source_column, "target": target_column},
            "embedding": {"anchor": anchor_column, "positive": positive_column, "negative": negative_column},
        }[self.kind]
        images = self.kind != "embedding"
        self.transforms = {train: ImageTransform(resolution, center_crop, random_flip, interpolation, train=train)
                           if images else None for train in (True, False)}
        self.train_rows: Any = None
        self.val_rows: Any = None

    @classmethod
    def batch_kind(cls, cfg: Mapping[str, Any]) -> str:
        """What the batches are for ``data.kind`` (checked against the head before anything loads)."""
        return KINDS[choice(cfg.get("kind", "images"), "data.kind", KINDS)]

    def data_source(self) -> str:
        return f"data.path={self.path} (split {self.split})"

    def _load(self, split: str, limit: int | None, key: str) -> Any:
        rows = load_split(self.path, self.name, split, self.data_files, self.data_dir, self.revision, self.streaming,
                          key, self.cache_dir)
        if limit:
            rows = rows.take(limit) if self.streaming else rows.select(range(min(limit, len(rows))))
        RowConverter(self.kind, self.columns, None, True).check(rows.column_names, f"{self.path} ({split})")
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        self.train_rows = self._load(self.split, self.max_train_samples, "data.split")
        if not self.streaming and len(self.train_rows) == 0:
            raise UserError(f"data.path={self.path}: split {self.split!r} has no rows")
        if self.val_split:
            self.val_rows = self._load(self.val_split, self.max_val_samples, "data.val_split")

    def _collate(self) -> Any:
        return collate_pairs if self.kind == "embedding" else collate_images

    def _dataset(self, rows: Any, train: bool) -> Dataset:
        convert = RowConverter(self.kind, self.columns, self.transforms[train], train)
        if not self.streaming:
            return MapRows(rows, convert)
        if train:
            rows = rows.shuffle(seed=self.seed, buffer_size=max(1, self.shuffle_buffer))
            rows.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # each process reads its own share of the stream
            from datasets.distributed import split_dataset_by_node

            rows = split_dataset_by_node(rows, rank=trainer.global_rank, world_size=trainer.world_size)
        return StreamRows(rows, convert)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        dataset = self._dataset(self.train_rows, train=True)
        shuffle = not self.streaming
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self._collate(),
                          drop_last=shuffle and len(dataset) >= self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_rows is None:
            return []  # Lightning skips validation for an empty list
        return DataLoader(self._dataset(self.val_rows, train=False), batch_size=self.val_batch_size,
                          collate_fn=self._collate(), num_workers=self.num_workers)

