"""Aspect-ratio buckets and caption options of the image data modules (``data.buckets``, ``data.caption_dropout``,
``data.shuffle_tags``/``data.keep_tokens``): bucket grids and assignments, resize/crop and crop corners worked out by
hand, single-bucket batches from folders and shards, each process's share under DDP, exact resume through
``ExactResume``, the dropout rate within its binomial bound, and tag shuffles that keep what they must."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_lora.callbacks.resume_state import ExactResume
from lightning_lora.data.buckets import BucketGroups, BucketSampler, BucketSpec
from lightning_lora.data.captions import CaptionPolicy, shuffle_tags
from lightning_lora.data.images import CropParams, ImageFolderDataModule, ImageTransform, to_tensor
from lightning_lora.data.shards import WebDatasetDataModule, write_shards
from lightning_lora.errors import UserError

# three aspect ratios: wide (2:1), square, tall (1:2), two images each (sizes in (width, height))
SIZES = {"w0": (64, 32), "w1": (80, 40), "s0": (40, 40), "s1": (48, 48), "t0": (32, 64), "t1": (36, 72)}
TAGS = "a photo, sks dog, red collar, grass, sunny, park"


def gradient(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB image whose every pixel differs from its neighbours (a crop off by one shows)."""
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def three_ratios(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("buckets")
    for i, (name, size) in enumerate(SIZES.items()):
        gradient(size, i).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"{name}, {TAGS}")
    return root


# --------------------------------------------------------------------------- the grid and the assignment
def test_bucket_grid_and_nearest_bucket_by_hand() -> None:
    small = BucketSpec(pixels=32 * 32, step=8, max_ratio=2.0)
    # width 24: 1024 // 24 = 42 -> 40; width 40: 25 -> 24; width 16: 64 > 2:1; width 32: the square
    assert small.sizes() == [(24, 40), (32, 32), (40, 24)]
    assert small.nearest((100, 60)) == (40, 24)  # 1.67: exactly 40/24
    assert small.nearest((60, 100)) == (24, 40)
    assert small.nearest((50, 50)) == (32, 32)
    assert small.nearest((70, 60)) == (32, 32)  # log 1.17 = 0.15 is nearer 0 than log 1.67 = 0.51
    assert small.nearest((70, 50)) == (40, 24)  # log 1.4 = 0.34: nearer 0.51 than 0
    sdxl = BucketSpec(pixels=1024 * 1024, step=64, max_ratio=2.0).sizes()
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)} <= set(sdxl)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in sdxl)
    assert sdxl == sorted({(h, w) for w, h in sdxl})  # every shape in both orientations


def test_bucket_options_are_checked_in_one_line() -> None:
    assert BucketSpec.from_config({"enabled": False, "step": -1}, 32) is None
    assert BucketSpec.from_config({"enabled": True, "pixels": None, "step": 8}, 32) == BucketSpec(1024, 8, 2.0)
    with pytest.raises(UserError, match=r"^data.buckets.step=0 must be a positive integer"):
        BucketSpec.from_config({"enabled": True, "step": 0}, 32)
    with pytest.raises(UserError, match=r"^data.buckets.pixels=100 is below one 64x64 bucket"):
        BucketSpec.from_config({"enabled": True, "pixels": 100}, 32)
    with pytest.raises(UserError, match=r"^data.buckets.size is unknown; valid: enabled, pixels"):
        BucketSpec.from_config({"enabled": True, "size": 3}, 32)


# --------------------------------------------------------------------------- resize, crop and its corner
@pytest.mark.parametrize(("size", "bucket", "resized", "corner"), [
    ((100, 50), (40, 24), (48, 24), (0, 4)),   # scale max(0.4, 0.48) = 0.48: 48x24, centre: left (48 - 40) / 2
    ((30, 70), (24, 40), (24, 56), (8, 0)),    # scale max(0.8, 0.57) = 0.8: 24x56, centre: top (56 - 40) / 2
    ((64, 32), (40, 24), (48, 24), (0, 4)),    # 2:1 into 5:3, as the first
    ((40, 40), (32, 32), (32, 32), (0, 0)),    # same ratio: a plain resize
])
def test_center_crop_into_a_bucket_by_hand(size, bucket, resized, corner) -> None:
    transform = ImageTransform(32, center_crop=True)
    params = transform.params(size, bucket)
    assert (params.size, params.crop_top_left(32)) == (resized, corner)
    image = gradient(size)
    top, left = corner
    want = image.resize(resized, Image.Resampling.LANCZOS).crop((left, top, left + bucket[0], top + bucket[1]))
    assert torch.equal(transform.apply(image, params), to_tensor(want))


def test_flipped_crop_corner_is_where_the_flipped_image_was_cut() -> None:
    # SDXL's training script flips, then crops: the corner is the one in the flipped picture
    params = CropParams(size=(48, 24), top=0, left=2, flip=True, out=(40, 24))
    assert params.crop_top_left(32) == (0, 48 - 2 - 40)
    image = gradient((48, 24))
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((6, 0, 46, 24))
    assert torch.equal(ImageTransform(32).apply(image, params), to_tensor(flipped))
    # the square crop (no bucket) reports its corner too
    assert CropParams(size=(40, 32), top=0, left=3, flip=False).crop_top_left(32) == (0, 3)


# --------------------------------------------------------------------------- batches
def _folder(root: Path, **options) -> ImageFolderDataModule:
    options = {"resolution": 32, "batch_size": 2, "val_fraction": 0.0, "interpolation": "bilinear",
               "buckets": {"enabled": True, "step": 8}, **options}
    dm = ImageFolderDataModule(str(root), **options)
    dm.setup("fit")
    return dm


def test_folder_batches_hold_one_bucket_with_crop_coordinates(three_ratios) -> None:
    torch.manual_seed(0)
    dm = _folder(three_ratios, random_flip=True)
    names = [r.name for r in dm.train_set.records]
    seen = Counter()
    for batch in dm.train_dataloader():
        assert set(batch) == {"pixel_values", "text", "index", "original_size", "crop_top_left"}
        shape = tuple(batch["pixel_values"].shape)
        assert shape[0] == 2 and shape[2:] in {(24, 40), (32, 32), (40, 24)}  # (height, width)
        for index, original, text in zip(batch["index"].tolist(), batch["original_size"].tolist(), batch["text"],
                                         strict=True):
            stem = names[index].removesuffix(".png")
            assert original == [SIZES[stem][1], SIZES[stem][0]] and text.startswith(stem)
            # wide images in the wide bucket, tall in the tall one, squares square
            assert {"w": (24, 40), "s": (32, 32), "t": (40, 24)}[stem[0]] == shape[2:]
            seen[stem] += 1
        assert (batch["crop_top_left"] >= 0).all()
    assert set(seen) == set(SIZES)  # every image, once per pass
    assert all(n == 1 for n in seen.values())


def test_sampler_pads_buckets_and_splits_runs_between_processes() -> None:
    buckets = [(8, 8)] * 3 + [(16, 8)] * 2 + [(8, 16)]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    shares = []
    for rank in (0, 1):
        torch.set_rng_state(state)  # both processes seeded alike, as seed_everything does
        sampler = BucketSampler(buckets, batch_size=2, rank=rank, world=2)
        order = list(sampler)
        assert len(order) == len(sampler) == 4  # 4 runs in all (3 -> 2 runs, 2 -> 1, 1 -> 1), 2 each
        shares.append([order[i:i + 2] for i in range(0, len(order), 2)])
    for run in shares[0] + shares[1]:
        assert len({buckets[i] for i in run}) == 1
    torch.set_rng_state(state)
    plan = BucketSampler(buckets, batch_size=2).runs(torch.Generator().manual_seed(
        int(torch.empty((), dtype=torch.int64).random_().item())))
    assert shares[0] == plan[0::2] and shares[1] == plan[1::2]
    counts = Counter(i for run in plan for i in run)
    assert set(counts) == set(range(6)) and sum(counts.values()) == 8  # every sample; short buckets filled
    assert counts[5] == 2 and counts[3] == counts[4] == 1  # ... from themselves
    # validation: no shuffle, buckets in size order
    assert list(BucketSampler(buckets, batch_size=2, shuffle=False)) == [0, 1, 2, 0, 5, 5, 3, 4]


def test_shard_batches_hold_one_bucket(three_ratios, tmp_path) -> None:
    samples = [{"__key__": name, "png": gradient(size, i), "txt": name} for i, (name, size) in enumerate(SIZES.items())]
    pattern = write_shards(samples, str(tmp_path / "s-%02d.tar"), per_shard=3)
    torch.manual_seed(1)
    dm = WebDatasetDataModule(pattern, resolution=32, batch_size=2, buckets={"enabled": True, "step": 8},
                              shuffle_buffer=4, interpolation="bilinear")
    batches = list(dm.train_dataloader())
    assert sum(len(b["text"]) for b in batches) == 6 and len(batches) == 3
    for batch in batches:
        kinds = {text[0] for text in batch["text"]}
        assert len(kinds) == 1 and {"w": (24, 40), "s": (32, 32), "t": (40, 24)}[kinds.pop()] == \
            tuple(batch["pixel_values"].shape[2:])
    # a bucket left short when the stream ends is filled with its own samples
    grouped = list(BucketGroups(3)(iter({"pixel_values": torch.zeros(3, h, w), "i": i}
                                        for i, (w, h) in enumerate([(8, 8), (8, 16), (8, 8)]))))
    assert [s["i"] for s in grouped] == [0, 2, 0, 1, 1, 1]  # (8, 8): 0, 2 and 0 again; (16, 8): 1 three times


# --------------------------------------------------------------------------- exact resume
class Recorder(pl.LightningModule):
    """Records what each step sees; one parameter so there is something to optimise and checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple] = []

    def training_step(self, batch, _):
        self.seen.append((batch["index"].tolist(), tuple(batch["text"]), batch["crop_top_left"].tolist(),
                          float(batch["pixel_values"].sum())))
        return (self.w - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bucketed_captioned_folder_resumes_exactly(three_ratios, tmp_path) -> None:
    options = {"random_flip": True, "caption_dropout": 0.3, "shuffle_tags": True, "keep_tokens": 1}

    def fit(name: str, steps: int, ckpt: str | None = None) -> list[tuple]:
        pl.seed_everything(3)
        module = Recorder()
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=tmp_path / name,
            callbacks=[ExactResume(), ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True)])
        trainer.fit(module, _folder(three_ratios, **options), ckpt_path=ckpt)
        return module.seen

    full = fit("full", 7)  # 3 batches an epoch: the resume is mid-epoch and crosses into the next ones
    assert len(full) == 7 and len({tuple(step[0]) for step in full[:3]}) == 3
    assert fit("part", 2) == full[:2]
    assert fit("part", 7, str(tmp_path / "part" / "last.ckpt")) == full[2:]


# --------------------------------------------------------------------------- captions
def test_caption_dropout_rate_is_within_its_binomial_bound() -> None:
    torch.manual_seed(0)
    n, p = 4000, 0.1
    policy = CaptionPolicy(dropout=p)
    empty = sum(policy(TAGS) == "" for _ in range(n))
    # 4 standard deviations of Binomial(n, p): 4 * sqrt(4000 * 0.09) = 75.9
    assert abs(empty - n * p) <= 4 * math.sqrt(n * p * (1 - p)), empty
    assert 0 < empty < n
    torch.manual_seed(0)
    assert sum(policy(TAGS) == "" for _ in range(n)) == empty  # seeded: the same draws again
    assert all(CaptionPolicy(dropout=0.0)(TAGS) == TAGS for _ in range(50))
    assert all(CaptionPolicy(dropout=1.0)(TAGS) == "" for _ in range(50))


def test_shuffle_keeps_the_first_tokens_and_the_tags() -> None:
    tags = [t.strip() for t in TAGS.split(",")]
    torch.manual_seed(0)
    orders = set()
    for _ in range(40):
        out = CaptionPolicy(shuffle_tags=True, keep_tokens=2)(TAGS).split(", ")
        assert out[:2] == tags[:2] and sorted(out) == sorted(tags)
        orders.add(tuple(out))
    assert len(orders) > 10  # it does shuffle the rest
    assert shuffle_tags("one, two", keep=5) == "one, two"  # fewer tags than keep_tokens: unchanged
    assert shuffle_tags(" a ,b,, c ", keep=3) == "a, b, c"  # blanks and empty tags dropped


def test_caption_options_are_checked_and_off_by_default(three_ratios) -> None:
    with pytest.raises(UserError, match=r"^data.caption_dropout: must be a number in \[0, 1\], got 1.5$"):
        CaptionPolicy(dropout=1.5)
    with pytest.raises(UserError, match=r"^data.keep_tokens: must be a non-negative integer, got -1$"):
        CaptionPolicy(keep_tokens=-1)
    plain = ImageFolderDataModule(str(three_ratios), resolution=32, batch_size=2, val_fraction=0.0)
    plain.setup("fit")
    assert plain.caption_policy() is None and plain.bucket_spec is None and not plain.crop_coords
    batch = next(iter(plain.train_dataloader()))
    assert set(batch) == {"pixel_values", "text", "index"} and batch["pixel_values"].shape[2:] == (32, 32)
    dropped = _folder(three_ratios, caption_dropout=1.0, shuffle_tags=True)
    assert all(dropped.train_set[i]["text"] == "" for i in range(len(dropped.train_set)))
    # validation never drops or shuffles captions
    held = dropped._dataset(dropped.train_set.records, dropped.val_transform, dropped.caption_policy())
    assert all(held[i]["text"] == held.records[i].caption for i in range(len(held)))


class _Noisy(torch.utils.data.Dataset):
    """A sized data set whose items draw from torch's RNG as they load (random augmentation)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "text": "", "crop_top_left": torch.zeros(2), "pixel_values": torch.rand(())}


class _NoisyData(pl.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Noisy(), batch_size=2, shuffle=True)


def test_exact_resume_of_a_sized_loader_with_random_augmentation(tmp_path) -> None:
    """Lightning fetches no batch ahead from a sized loader: the first batch after the resume loads from the
    generators' state at the checkpoint (not from the state the trained batch began with)."""
    def fit(name: str, steps: int, ckpt: str | None = None) -> list[tuple]:
        pl.seed_everything(3)
        module = Recorder()
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path / name,
            callbacks=[ExactResume(), ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True)])
        trainer.fit(module, _NoisyData(), ckpt_path=ckpt)
        return module.seen

    full = fit("full", 7)
    fit("part", 2)
    assert fit("part", 7, str(tmp_path / "part" / "last.ckpt")) == full[2:]


@pytest.mark.parametrize(("override", "needle"), [
    ("data.caption_dropout=1.5", "data.caption_dropout=1.5 must be in [0, 1]"),
    ("data.buckets.step=0", "data.buckets.step=0 must be a positive integer"),
])
def test_bad_caption_and_bucket_values_stop_the_run_in_one_line(three_ratios, tmp_path, capsys, override,
                                                                 needle) -> None:
    from helpers import assert_one_error_line, train_main

    rc = train_main(["model=sd15", f"data.train_dir={three_ratios}", override, f"hydra.run.dir={tmp_path / 'r'}"])
    assert_one_error_line(rc, capsys.readouterr().err, needle, case=override)


def test_lightning_keeps_the_bucket_sampler_under_ddp(three_ratios) -> None:
    """What Lightning does to a training loader under DDP (the call ``ExactResume`` makes too): a plain shuffled
    loader gets a ``DistributedSampler``, the bucketed one keeps its own sampler (each process its share of runs)."""
    from lightning.pytorch.trainer.states import RunningStage

    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)

    def prepared(loader):
        return trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)

    dm = _folder(three_ratios)
    dm.trainer = trainer
    bucketed = dm.train_dataloader()
    assert prepared(bucketed).sampler is bucketed.sampler and isinstance(bucketed.sampler, BucketSampler)
    assert (bucketed.sampler.rank, bucketed.sampler.num_replicas) == (0, 2)
    plain = _folder(three_ratios, buckets=None).train_dataloader()
    assert type(prepared(plain).sampler).__name__ == "DistributedSampler"


def test_a_turned_photo_goes_to_the_bucket_of_its_turned_shape(tmp_path) -> None:
    from lightning_lora.data.images import load_rgb, stored_size

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x32 (wide), shown turned 90 degrees: 32x64 (tall)
    gradient((64, 32)).save(tmp_path / "turned.jpg", exif=exif)
    assert stored_size(tmp_path / "turned.jpg") == load_rgb(tmp_path / "turned.jpg").size == (32, 64)
    assert BucketSpec(32 * 32, 8).nearest(stored_size(tmp_path / "turned.jpg")) == (24, 40)
