"""`ExactResume`: a run resumed from a mid-epoch checkpoint sees the same batches and random numbers.

Lightning restores weights, optimizer, scheduler and loop counters, but not the random number generators,
and it restarts a plain DataLoader at the beginning of a freshly shuffled epoch. This callback stores in
every checkpoint (weights-only-safe values: tensors, ints, tuples):

- ``epoch_rng``: the generators' state just before the current epoch's data iterator was created (the
  shuffle order and the workers' base seed come from it),
- ``loading_rng``: their state as the batch that was already fetched ahead began to load (random augmentation
  in the main process draws from it); Lightning fetches one ahead from a loader without a length (an iterable
  dataset) and none from a sized one (``prefetched`` says which: without one, the next batch loads from ``rng``),
- ``rng``: their state when the checkpoint was written,
- ``batches``: how many batches of the epoch were trained.

On resume it puts ``epoch_rng`` back right before Lightning creates the iterator, skips the trained batches
at the sampler (no batch is loaded twice; an iterable dataset, which ignores sampler indices, is read through
the trained batches and the loader drops them), puts ``loading_rng`` back as the first kept batch loads and
``rng`` back as the next one does (or before the first step, if there is none), so the continuation is the
uninterrupted run's, bit for bit on CPU.

Scope: a ``LightningDataModule`` whose training ``DataLoader`` has a map-style sampler
(shuffled or not) or an iterable dataset (webdataset shards) whose order depends only on the generators'
state when its pass starts. Random draws inside DataLoader *worker processes* (augmentation with
``num_workers > 0``) are not reproduced: the workers never see the skipped samples, so their generators are
elsewhere.

Under DDP the loader gets Lightning's own ``DistributedSampler`` here already (Lightning would swap it in after
``train_dataloader`` returns, dropping the wrapper), so each process skips its share of the trained batches and
the data order is the uninterrupted run's; the checkpoint carries every process's generator states (gathered
while the checkpoint is written, which every process does) and each process gets its own back.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler


def _raw_rng() -> tuple[Any, ...]:
    """Every generator's state as the libraries hand it out (fresh copies, cheap to take): what the sampler notes
    for every batch; ``_storable`` turns it into checkpoint values only when a checkpoint is written."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # initialized: available
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def _storable(raw: tuple[Any, ...]) -> dict[str, Any]:
    """A ``_raw_rng`` state as values ``torch.load(weights_only=True)`` reads back."""
    torch_state, (kind, keys, pos, has_gauss, cached), (version, state, gauss), cuda = raw
    rng: dict[str, Any] = {
        "torch": torch_state,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64),
                   "gauss": float("nan") if gauss is None else float(gauss)},
    }
    if cuda is not None:
        rng["cuda"] = cuda
    return rng


def capture_rng() -> dict[str, Any]:
    """Every generator's state, as values ``torch.load(weights_only=True)`` reads back."""
    return _storable(_raw_rng())


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = rng["python"]
    gauss = None if p["gauss"] != p["gauss"] else p["gauss"]  # nan stands for None
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class ResumableSampler(Sampler):
    """Wraps a batch sampler's ``sampler``: notes the generators' state as each batch starts to load (the
    state any random draw while loading it sees). On resume its next pass leaves out the first ``skip``
    indices, puts ``at_first`` back as the first kept batch starts to load and calls ``at_second`` as the
    second one does (the uninterrupted run loaded that one right after the checkpoint was written).

    Its length stays the full length: Lightning counts the trained batches itself. With ``drop=False`` the
    skipped indices are still yielded (an iterable dataset must be read through them: see ``_DropFirstBatches``)."""

    def __init__(self, sampler: Any, batch_size: int, drop: bool = True) -> None:
        self.sampler, self.batch_size, self.drop = sampler, batch_size, drop
        self.skip: int = 0
        self.at_first: dict[str, Any] | None = None
        self.at_second: Callable[[], None] | None = None
        self._batch_raw: tuple[Any, ...] | None = None  # the state as the latest batch started to load
        self.started = 0  # batches of this pass that began to load (the skipped ones included)

    def __iter__(self) -> Iterator[Any]:
        skip, at_first, at_second = self.skip, self.at_first, self.at_second
        self.skip, self.at_first, self.at_second = 0, None, None
        self.started = -(-skip // self.batch_size)
        for i, index in enumerate(self.sampler):  # iterating draws the shuffle seed as the original pass did
            if i < skip:
                if not self.drop:
                    yield index
                continue
            if (i - skip) % self.batch_size == 0:
                if i == skip and at_first is not None:
                    restore_rng(at_first)
                elif i == skip + self.batch_size and at_second is not None:
                    at_second()
                self._batch_raw = _raw_rng()  # every batch: converted only if a checkpoint needs it
                self.started += 1
            yield index

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def batch_rng(self) -> dict[str, Any] | None:
        """The generators' state as the latest batch started to load, as checkpoint values."""
        return None if self._batch_raw is None else _storable(self._batch_raw)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _gather(mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's ``mine``, in rank order (a collective)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _with_distributed_sampler(trainer: pl.Trainer, loader: Any) -> Any:
    """The loader with the ``DistributedSampler`` Lightning would inject after ``train_dataloader`` returns
    (its own code, so the same order); unchanged outside DDP, for iterable datasets or with
    ``use_distributed_sampler=False``."""
    if trainer.world_size == 1 or not isinstance(loader, DataLoader):
        return loader
    from lightning.pytorch.trainer.states import RunningStage

    # private Lightning API: the one place that knows the sampler arguments (seed, shuffle, rank, replicas)
    return trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)


class _DropFirstBatches(DataLoader):
    """A ``DataLoader`` whose next iterator reads ``drop_batches`` batches and throws them away: the way to skip
    ahead in an iterable dataset. Set on the loader instance by ``ExactResume`` (``loader.__class__``), so
    Lightning still sees the user's ``DataLoader`` with all its attributes."""

    drop_batches: int = 0

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        drop, self.drop_batches = self.drop_batches, 0
        for _ in range(drop):
            next(iterator, None)
        return iterator


class ExactResume(Callback):
    def __init__(self) -> None:
        self._epoch_rng: dict[str, Any] | None = None
        self._loaded: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._sampler: ResumableSampler | None = None
        self.skipped_batches = 0
        self.exact = True

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        trainer_batches = getattr(self, "_batches_fn", lambda: 0)()
        sampler = self._sampler
        prefetched = sampler is not None and sampler.started > trainer_batches
        loading = sampler.batch_rng if prefetched else None
        mine = {"epoch_rng": self._epoch_rng, "rng": capture_rng(), "loading_rng": loading,
                "prefetched": int(prefetched)}
        state = {**mine, "batches": trainer_batches}
        if _distributed():  # every process's own states (save_checkpoint runs on every rank, so this may gather)
            state["ranks"] = _gather(mine)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # this process's own generator states when the checkpoint has them (same number of processes)
        ranks, rank = state_dict.get("ranks"), _rank()
        if ranks and rank < len(ranks):
            state_dict = {**state_dict, **ranks[rank]}
        self._loaded = state_dict

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        self._batches_fn = lambda: int(progress.current.processed)
        datamodule = trainer.datamodule
        if datamodule is None:
            self.exact = False
            return
        original = datamodule.train_dataloader
        if getattr(original, "_exact_resume", False):
            return

        def build() -> Any:
            return self._wrap(_with_distributed_sampler(trainer, original()))

        def train_dataloader() -> Any:  # Lightning calls this right before it creates the epoch's iterator
            loaded, self._loaded = self._loaded, None
            if not loaded:
                self._epoch_rng = capture_rng()
                return build()
            batches = int(loaded.get("batches") or 0)
            mid_epoch = loaded.get("epoch_rng") is not None and batches > 0
            restore_rng(loaded["epoch_rng"] if mid_epoch else loaded["rng"])
            self._epoch_rng = capture_rng()
            loader = build()
            self._pending_rng = loaded["rng"]
            if mid_epoch and batches < self._batches_in(loader) and self._sampler is not None:
                self._sampler.skip = batches * self._sampler.batch_size
                if not self._sampler.drop:  # an iterable dataset: read the trained batches, drop them here
                    loader.__class__ = type("ResumedDataLoader", (_DropFirstBatches, type(loader)), {})
                    loader.drop_batches = batches
                if loaded.get("prefetched", 1):
                    self._sampler.at_first = loaded.get("loading_rng")
                    self._sampler.at_second = self._restore_pending
                else:  # nothing was fetched ahead: the next batch loads from the state at the checkpoint
                    self._sampler.at_first, self._pending_rng = loaded["rng"], None
                self.skipped_batches = batches
            elif mid_epoch:  # saved after the epoch's last batch (the next starts fresh), or no sampler to skip
                self.exact = self._sampler is not None
                restore_rng(loaded["rng"])
                self._epoch_rng = capture_rng()
            return loader

        train_dataloader._exact_resume = True  # type: ignore[attr-defined]
        datamodule.train_dataloader = train_dataloader

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        ours = getattr(datamodule, "__dict__", {}).get("train_dataloader")
        if stage == "fit" and getattr(ours, "_exact_resume", False):
            del datamodule.train_dataloader  # the class's own method again

    @staticmethod
    def _batches_in(loader: Any) -> float:
        try:
            return len(loader)
        except TypeError:
            return float("inf")

    def _wrap(self, loader: Any) -> Any:
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(loader, DataLoader) or not isinstance(sampler, BatchSampler) or sampler.batch_size is None:
            self._sampler, self.exact = None, False  # an iterable dataset or a custom batch sampler
            return loader
        if not isinstance(sampler.sampler, ResumableSampler):
            iterable = isinstance(loader.dataset, IterableDataset)
            sampler.sampler = ResumableSampler(sampler.sampler, sampler.batch_size, drop=not iterable)
        self._sampler = sampler.sampler
        return loader

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # For epochs after the first, the iterator is created after this hook (epoch 0: in train_dataloader).
        if trainer.current_epoch > 0:
            self._epoch_rng = capture_rng()

    def _restore_pending(self) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Normally done as the batch after next starts to load (see ResumableSampler); here when there is none.
        self._restore_pending()
