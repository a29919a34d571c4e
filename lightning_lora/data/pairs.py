"""(query, positive[, negatives]) pairs for contrastive fine-tuning: a JSONL reader and a Lightning DataModule."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lora.checks import non_negative_int, optional_positive_int, positive_int
from lightning_lora.data.text import utf8_lines
from lightning_lora.errors import UserError

FIELDS_HINT = "each line needs 'query' and 'positive', optionally 'negatives'"
#: the batches of this module (and of every module with the same collate): what heads name in ``batch_kinds``
TEXT_PAIRS = "text pairs"


def _abs(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _parse_pair(obj: Any, where: str) -> dict:
    """Check one decoded JSONL line and return it in the canonical shape."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}; {FIELDS_HINT}")
    found = ", ".join(str(k) for k in obj) or "none"
    for field in ("query", "positive"):
        if field not in obj:
            raise UserError(f"{where}: missing field '{field}' (found fields: {found}); {FIELDS_HINT}")
        if not isinstance(obj[field], str):
            raise UserError(
                f"{where}: field '{field}' must be a string, got {type(obj[field]).__name__}; {FIELDS_HINT}"
            )
    negatives = obj.get("negatives", [])
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise UserError(f"{where}: field 'negatives' must be a list of strings; {FIELDS_HINT}")
    return {"query": obj["query"], "positive": obj["positive"], "negatives": list(negatives)}


def read_pairs_jsonl(path: str | Path) -> list[dict]:
    """Read ``{"query", "positive", "negatives"?}`` objects, one per line; blank lines are skipped."""
    return read_jsonl(path, _parse_pair, FIELDS_HINT)


def jsonl_values(path: Path, where: Callable[[int], str]) -> Iterator[tuple[int, str, Any]]:
    """(line number, ``where(line number)``, parsed value) of every non-blank line of a JSON-lines file; a line
    that is not JSON, or not UTF-8, is one UserError naming the place."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        place = where(lineno)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{place}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield lineno, place, value


def read_jsonl(path: str | Path, parse: Callable[[Any, str], dict], hint: str) -> list[dict]:
    """``parse(obj, "<file> line N")`` of every non-blank line; a bad line or an empty file is one UserError."""
    path = _abs(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    pairs = [parse(obj, where) for _, where, obj in jsonl_values(path, lambda n: f"{path} line {n}")]
    if not pairs:
        raise UserError(f"data file is empty: {path}; {hint}")
    return pairs


def collate_pairs(samples: list[dict]) -> dict:
    """Batch pairs as lists of strings (tokenisation belongs to the model); extra keys are ignored."""
    batch: dict[str, list] = {
        "query": [s["query"] for s in samples],
        "positive": [s["positive"] for s in samples],
    }
    # Only emit negatives when present, so models can branch on the key instead of on empty lists.
    if any(s.get("negatives") for s in samples):
        batch["negatives"] = [list(s.get("negatives") or []) for s in samples]
    # Row ids let validation drop the rows a DistributedSampler repeats to even out the processes.
    if all("index" in s for s in samples):
        batch["index"] = torch.tensor([s["index"] for s in samples])
    return batch


class ListDataset(Dataset):
    """A map-style dataset over an in-memory list."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {**self.items[index], "index": index}


class PairsDataModule(pl.LightningDataModule):
    """Train/val pairs from JSONL files; subclasses build pairs elsewhere by overriding ``load_pairs``."""

    #: what its batches are (``train.run`` checks it against the head's ``batch_kinds`` before anything loads)
    batch_kind: ClassVar[str] = TEXT_PAIRS

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        batch_size: int = 32,
        val_batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
    ) -> None:
        super().__init__()
        # Fail at construction, before a model is loaded, so a typo costs seconds rather than minutes.
        self.train_path = self._check_path(train_path, "data.train_path")
        self.val_path = self._check_path(val_path, "data.val_path")
        positive_int(batch_size, "data.batch_size", got=True)
        positive_int(val_batch_size, "data.val_batch_size", got=True)
        non_negative_int(num_workers, "data.num_workers", got=True)
        optional_positive_int(max_train_samples, "data.max_train_samples", got=True)
        optional_positive_int(max_val_samples, "data.max_val_samples", got=True)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.train_pairs: list[dict] | None = None
        self.val_pairs: list[dict] | None = None

    @staticmethod
    def _check_path(path: str | None, key: str) -> Path | None:
        if path is None:
            return None
        resolved = _abs(path)
        if not resolved.is_file():
            raise UserError(f"{key}: file not found: {resolved}")
        return resolved

    def load_pairs(self) -> tuple[list[dict], list[dict]]:
        """Return ``(train_pairs, val_pairs)``; the default reads the configured JSONL files."""
        if self.train_path is None:
            raise UserError("data.train_path: not set; give a JSONL file of query/positive pairs")
        train = read_pairs_jsonl(self.train_path)
        val = read_pairs_jsonl(self.val_path) if self.val_path is not None else []
        return train, val

    def setup(self, stage: str | None = None) -> None:
        # Idempotent: callers may set up early (e.g. to size a scheduler) and the Trainer calls it again.
        if self.train_pairs is not None:
            return
        train, val = self.load_pairs()
        # First-N truncation keeps small runs deterministic and comparable.
        if self.max_train_samples is not None:
            train = train[: self.max_train_samples]
        if self.max_val_samples is not None:
            val = val[: self.max_val_samples]
        if not train:
            raise UserError("data: the training set is empty; check the data source and data.max_train_samples")
        if self.drop_last and len(train) < self.batch_size:
            raise UserError(
                f"data.batch_size: {self.batch_size} is larger than the {len(train)} training pairs, "
                "so drop_last would leave no batches; lower data.batch_size or set data.drop_last=false"
            )
        self.val_pairs = val
        self.train_pairs = train

    @property
    def num_train(self) -> int:
        self.setup()
        assert self.train_pairs is not None
        return len(self.train_pairs)

    @property
    def num_val(self) -> int:
        self.setup()
        assert self.val_pairs is not None
        return len(self.val_pairs)

    def _loader(self, pairs: list[dict], batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            ListDataset(pairs),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            # Re-forking workers every epoch costs more than the (tiny) string batches themselves.
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_pairs is not None
        return self._loader(self.train_pairs, self.batch_size, self.shuffle, self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        assert self.val_pairs is not None
        # Lightning skips validation for an empty list of dataloaders, so "no val set" is not an error.
        if not self.val_pairs:
            return []
        return self._loader(self.val_pairs, self.val_batch_size, shuffle=False, drop_last=False)
