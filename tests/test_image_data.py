"""Image + caption data for the diffusion family: transforms, image folders, tar shards, the digits demo."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import braceexpand
import numpy as np
import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from PIL import Image

from lightning_lora.data.digits import DigitCaptionsDataModule, write_digit_captions
from lightning_lora.data.images import (
    ImageFolderDataModule,
    ImageTransform,
    load_rgb,
    read_image_folder,
    split_records,
)
from lightning_lora.data.shards import SHARD_STRIDE, WebDatasetDataModule, expand_shards, write_shards
from lightning_lora.errors import UserError


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array))
    return path


def solid(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def expected(array: np.ndarray) -> torch.Tensor:
    """What ToTensor + Normalize([0.5], [0.5]) give for an HWC uint8 array."""
    return (torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """Ten 8-px images with metadata.jsonl captions; image i has grey level 20 * i."""
    root = tmp_path / "imgs"
    for i in range(10):
        save(root / f"{i:02d}.png", solid(20 * i))
    write_jsonl(root / "metadata.jsonl", [{"file_name": f"{i:02d}.png", "text": f"caption {i}"} for i in range(10)])
    return root


# --------------------------------------------------------------------------- transforms
def test_center_crop_and_normalise_give_known_values() -> None:
    array = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3) * 10  # height 2, width 4
    out = ImageTransform(2, center_crop=True, interpolation="nearest")(Image.fromarray(array))
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    assert torch.equal(out, expected(array[:, 1:3]))  # shorter side already 2: no resize; crop columns 1..2
    assert out.min() >= -1 and out.max() <= 1


def test_resize_shorter_side_then_crop_known_values() -> None:
    # 6x3 (w x h) made of 3x3 blocks of 0 and 255: box resize to 4x2, then centre crop columns 1..2.
    array = np.zeros((3, 6, 3), dtype=np.uint8)
    array[:, 3:] = 255
    out = ImageTransform(2, center_crop=True, interpolation="box")(Image.fromarray(array))
    assert out.shape == (3, 2, 2)
    assert torch.allclose(out[:, :, 0], torch.full((3, 2), -1.0)) and torch.allclose(out[:, :, 1], torch.ones(3, 2))
    # 4x4 of 2x2 blocks -> 2x2 with the block values.
    blocks = np.kron(np.array([[0, 100], [200, 255]], dtype=np.uint8), np.ones((2, 2), dtype=np.uint8))
    out = ImageTransform(2, interpolation="box", train=False)(Image.fromarray(np.stack([blocks] * 3, -1)))
    assert torch.allclose(out[0], expected(np.stack([np.array([[0, 100], [200, 255]], np.uint8)] * 3, -1))[0])


def test_random_crop_and_flip_are_seeded_and_train_only() -> None:
    array = np.zeros((4, 8, 3), dtype=np.uint8)
    array[:, :3] = 255  # bright on the left only: a flip is visible
    image = Image.fromarray(array)
    train = ImageTransform(4, center_crop=False, random_flip=True, interpolation="nearest")
    torch.manual_seed(0)
    first = [train(image) for _ in range(16)]
    torch.manual_seed(0)
    again = [train(image) for _ in range(16)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len({tuple(t[0, 0].tolist()) for t in first}) > 2  # several crops and flips were drawn
    val = ImageTransform(4, center_crop=False, random_flip=True, interpolation="nearest", train=False)
    outs = [val(image) for _ in range(8)]
    assert all(torch.equal(o, expected(array[:, 2:6])) for o in outs)  # centre crop, never flipped


def test_load_rgb_handles_modes(tmp_path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel, the rest transparent black
    image = load_rgb(png_bytes(rgba))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((1, 1)) == (255, 255, 255)
    assert load_rgb(png_bytes(np.full((2, 2), 7, np.uint8), mode="L")).getpixel((0, 0)) == (7, 7, 7)
    palette = Image.fromarray(solid(51, 2)).convert("P")  # 51 is on the web palette
    assert load_rgb(palette).getpixel((0, 0)) == (51, 51, 51)
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert load_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(deep)
    assert load_rgb(deep).getpixel((0, 0)) == (255, 255, 255)


def test_bad_transform_options() -> None:
    with pytest.raises(UserError, match="data.interpolation='cubic'"):
        ImageTransform(8, interpolation="cubic")
    with pytest.raises(UserError, match="data.resolution"):
        ImageTransform(0)


# --------------------------------------------------------------------------- image folders
def test_jsonl_captions_and_batch_contract(folder) -> None:
    dm = ImageFolderDataModule(str(folder), val_fraction=0.2, resolution=4, batch_size=4, interpolation="box")
    dm.setup()
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"pixel_values", "text", "index"}
    assert batch["pixel_values"].shape == (4, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert batch["index"].dtype == torch.long and batch["index"].shape == (4,)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    for pixels, text, index in zip(batch["pixel_values"], batch["text"], batch["index"].tolist(), strict=True):
        assert text == f"caption {index}"  # captions stay with their images; ids are sorted-path positions
        assert torch.allclose(pixels, torch.full_like(pixels, 20 * index / 255 * 2 - 1), atol=1e-6)
    val = next(iter(dm.val_dataloader()))
    assert sorted(val["index"].tolist()) == sorted(r.index for r in dm.val_set.records)


def test_txt_captions_in_subfolders(tmp_path) -> None:
    save(tmp_path / "a" / "x.png", solid(0))
    (tmp_path / "a" / "x.txt").write_text("a cat\n")
    save(tmp_path / "b" / "y.JPG", solid(9))  # extensions match case-insensitively (PNG bytes, fine for PIL)
    (tmp_path / "b" / "y.txt").write_text("a dog")
    (tmp_path / ".hidden").mkdir()
    save(tmp_path / ".hidden" / "z.png", solid(0))
    records = read_image_folder(tmp_path)
    assert [(r.name, r.caption) for r in records] == [("a/x.png", "a cat"), ("b/y.JPG", "a dog")]


def test_list_captions_random_in_train_first_in_val(tmp_path) -> None:
    save(tmp_path / "t" / "a.png", solid(0))
    write_jsonl(tmp_path / "t" / "metadata.jsonl", [{"file_name": "a.png", "caption": ["one", "two", "three"]}])
    save(tmp_path / "v" / "a.png", solid(0))
    write_jsonl(tmp_path / "v" / "metadata.jsonl", [{"file_name": "a.png", "caption": ["one", "two"]}])
    dm = ImageFolderDataModule(str(tmp_path / "t"), str(tmp_path / "v"), caption_column="caption", resolution=4)
    dm.setup()
    torch.manual_seed(0)
    assert {dm.train_set[0]["text"] for _ in range(40)} == {"one", "two", "three"}
    assert {dm.val_set[0]["text"] for _ in range(5)} == {"one"}


def test_val_split_is_deterministic(folder) -> None:
    records = read_image_folder(folder)
    train, val = split_records(records, 0.3)
    assert len(val) == 3 and not {r.index for r in train} & {r.index for r in val}
    assert split_records(list(reversed(records)), 0.3)[1] == list(reversed(val))  # order of listing is irrelevant
    sets = []
    for _ in range(2):
        dm = ImageFolderDataModule(str(folder), val_fraction=0.3, resolution=4)
        dm.setup()
        sets.append([r.name for r in dm.val_set.records])
    assert sets[0] == sets[1] == [r.name for r in val]
    assert len(split_records(records[:2], 0.01)[1]) == 1  # a positive fraction keeps at least one image


def test_max_train_samples(folder) -> None:
    dm = ImageFolderDataModule(str(folder), val_fraction=0.0, max_train_samples=3, resolution=4)
    dm.setup()
    assert [r.name for r in dm.train_set.records] == ["00.png", "01.png", "02.png"] and dm.val_dataloader() == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_dir", "data.train_dir: no such directory: {root}/nope"),
        ("no_images", "no images found in {root}/empty (looked for .bmp, .gif, .jpeg, .jpg, .png"),
        ("bad_json", "{root}/imgs/metadata.jsonl:2: not valid JSON"),
        ("missing_field", "{root}/imgs/metadata.jsonl:1: missing field 'text' (found fields: file_name, caption)"),
        ("unknown_file", "{root}/imgs/metadata.jsonl:1: file_name 'gone.png' not found"),
        ("no_caption", "no caption for image {root}/imgs/b.png"),
        ("unreadable", "unreadable image {root}/imgs/b.png"),
    ],
    ids=lambda value: value if " " not in value else "",
)
def test_folder_errors_name_the_path(tmp_path, case: str, message: str) -> None:
    root = tmp_path / "imgs"
    save(root / "a.png", solid(0))
    train_dir = root
    if case == "missing_dir":
        train_dir = tmp_path / "nope"
    elif case == "no_images":
        train_dir = tmp_path / "empty"
        train_dir.mkdir()
        (train_dir / "notes.txt").write_text("x")
    elif case == "bad_json":
        write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "text": "a"}, "{not json"])
    elif case == "missing_field":
        write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "caption": "a"}])
    elif case == "unknown_file":
        write_jsonl(root / "metadata.jsonl", [{"file_name": "gone.png", "text": "a"}])
    elif case == "no_caption":
        write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "text": "a"}])
        save(root / "b.png", solid(0))
    elif case == "unreadable":
        (root / "a.txt").write_text("a")
        (root / "b.png").write_bytes(b"not an image")
        (root / "b.txt").write_text("b")
    with pytest.raises(UserError) as info:
        ImageFolderDataModule(str(train_dir), val_fraction=0.0, resolution=4).setup()
    text = str(info.value)
    assert message.format(root=tmp_path) in text and "\n" not in text


def test_skip_unreadable_warns_once_with_count(folder) -> None:
    (folder / "08.png").write_bytes(b"garbage")
    (folder / "09.png").write_bytes(png_bytes(solid(0))[:20])  # a truncated header
    dm = ImageFolderDataModule(str(folder), val_fraction=0.0, resolution=4, skip_unreadable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("skipped 2 unreadable image(s)")
    assert len(dm.train_set) == 8


def test_image_failing_at_load_time_follows_the_policy(folder) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = png_bytes(noise)
    (folder / "03.png").write_bytes(data[: len(data) // 2])  # header fine, pixels truncated
    dm = ImageFolderDataModule(str(folder), val_fraction=0.0, resolution=4)
    dm.setup()
    with pytest.raises(UserError, match="unreadable image .*03.png"):
        dm.train_set[3]
    dm = ImageFolderDataModule(str(folder), val_fraction=0.0, resolution=4, skip_unreadable=True)
    dm.setup()
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert dm.train_set[3]["index"] == 4  # replaced by the next image


# --------------------------------------------------------------------------- tar shards
def shard_samples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"__key__": f"s{i:03d}", "png": png_bytes(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)),
         "json": {"text": f"sample {i}", "other": i}}
        for i in range(n)
    ]


def test_webdataset_round_trip_through_write_shards(tmp_path) -> None:
    samples = shard_samples(7)
    pattern = write_shards(samples, str(tmp_path / "sh" / "part-%04d.tar"), per_shard=3)
    assert pattern == str(tmp_path / "sh" / "part-{0000..0002}.tar")
    assert all(Path(p).is_file() for p in braceexpand.braceexpand(pattern))
    assert not list((tmp_path / "sh").glob(".tmp-*"))
    again = write_shards(samples, str(tmp_path / "sh2" / "part-%04d.tar"), per_shard=3)
    assert (tmp_path / "sh2" / "part-0001.tar").read_bytes() == (tmp_path / "sh" / "part-0001.tar").read_bytes()
    assert again.endswith("part-{0000..0002}.tar")  # reproducible tars
    dm = WebDatasetDataModule(pattern, pattern, resolution=6, interpolation="nearest", batch_size=4)
    got = [b for b in dm.val_dataloader()]
    texts = [t for b in got for t in b["text"]]
    assert texts == [f"sample {i}" for i in range(7)]  # validation: every sample once, in order
    pixels = torch.cat([b["pixel_values"] for b in got])
    want = torch.stack([expected(np.asarray(Image.open(io.BytesIO(s["png"])))) for s in samples])
    assert torch.equal(pixels, want)
    ids = torch.cat([b["index"] for b in got]).tolist()
    assert ids == [i // 3 * SHARD_STRIDE + i % 3 for i in range(7)]
    # training: shuffled, each sample once per epoch, same order for the same seed, another order next epoch
    train = dm.train_dataloader()
    torch.manual_seed(1)
    first = [t for b in train for t in b["text"]]
    second = [t for b in train for t in b["text"]]
    torch.manual_seed(1)
    repeat = [t for b in train for t in b["text"]]
    assert sorted(first) == sorted(texts) and first == repeat and first != second


def test_webdataset_workers_and_samples_per_epoch(tmp_path) -> None:
    pattern = write_shards(shard_samples(10), str(tmp_path / "w-%03d.tar"), per_shard=2)
    dm = WebDatasetDataModule(pattern, resolution=4, batch_size=3, num_workers=2)
    ids = [i for b in dm.train_dataloader() for i in b["index"].tolist()]
    assert len(ids) == 10 and len(set(ids)) == 10  # shards split across the two workers
    dm = WebDatasetDataModule(pattern, resolution=4, batch_size=3, samples_per_epoch=7)
    loader = dm.train_dataloader()
    assert [sum(len(b["text"]) for b in loader) for _ in range(2)] == [7, 7]
    dm = WebDatasetDataModule(pattern, resolution=4, batch_size=3, samples_per_epoch=25)
    assert sum(len(b["text"]) for b in dm.train_dataloader()) == 25  # streams past the end of the shards


def test_webdataset_under_ddp_needs_samples_per_epoch_and_splits_by_rank(tmp_path) -> None:
    pattern = write_shards(shard_samples(10), str(tmp_path / "r-%03d.tar"), per_shard=2)
    dm = WebDatasetDataModule(pattern, resolution=4, batch_size=4)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(UserError, match="data.samples_per_epoch must be set for webdataset training on 2 processes"):
        dm.setup("fit")
    per_rank = []
    for rank in (0, 1):
        dm = WebDatasetDataModule(pattern, resolution=4, batch_size=4, samples_per_epoch=10, shardshuffle=False,
                                  shuffle_buffer=0)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        per_rank.append([i for b in dm.train_dataloader() for i in b["index"].tolist()])
    assert [len(ids) for ids in per_rank] == [5, 5]  # the same number of batches on every process
    assert not set(per_rank[0]) & set(per_rank[1])  # shards split between the processes


def test_webdataset_trains_in_a_lightning_loop(tmp_path) -> None:
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[int] = []

        def training_step(self, batch, _):
            self.seen += batch["index"].tolist()
            return ((batch["pixel_values"].mean() - self.w) ** 2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pattern = write_shards(shard_samples(6), str(tmp_path / "l-%02d.tar"), per_shard=4)
    probe = Probe()
    trainer = pl.Trainer(max_steps=7, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    trainer.fit(probe, WebDatasetDataModule(pattern, resolution=4, batch_size=2))
    assert trainer.global_step == 7 and trainer.current_epoch >= 2  # steps bounded by max_steps across passes
    assert len(probe.seen) == 14 and set(probe.seen) == {0, 1, 2, 3, SHARD_STRIDE, SHARD_STRIDE + 1}


def test_webdataset_errors(tmp_path) -> None:
    pattern = write_shards(shard_samples(2), str(tmp_path / "e-%02d.tar"), per_shard=1)
    with pytest.raises(UserError, match=f"shard not found: {tmp_path}/e-02.tar"):
        expand_shards(str(tmp_path / "e-{00..03}.tar"))
    assert expand_shards(f"{pattern}::{pattern}") == 2 * expand_shards(pattern)
    with pytest.raises(UserError, match=r"sample s000 has no image field \(jpg\)"):
        list(WebDatasetDataModule(pattern, pattern, image_key="jpg", resolution=4).val_dataloader())
    with pytest.raises(UserError, match="missing field 'caption'"):
        list(WebDatasetDataModule(pattern, pattern, caption_column="caption", resolution=4).val_dataloader())
    with pytest.raises(UserError, match="contains a dot"):
        write_shards([{"__key__": "a.b", "txt": "x"}], str(tmp_path / "d-%d.tar"))
    bad = write_shards(
        [{"__key__": "ok", "png": png_bytes(solid(0)), "txt": "fine"}, {"__key__": "broken", "png": b"xx", "txt": "x"}],
        str(tmp_path / "b-%d.tar"),
    )
    with pytest.raises(UserError, match=r"unreadable image .*b-0.tar: sample broken.png"):
        list(WebDatasetDataModule(bad, bad, resolution=4).val_dataloader())
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        batches = list(WebDatasetDataModule(bad, bad, resolution=4, skip_unreadable=True).val_dataloader())
    assert [t for b in batches for t in b["text"]] == ["fine"]


# --------------------------------------------------------------------------- digits demo
def test_digits_build_reuse_and_captions(tmp_path) -> None:
    from sklearn.datasets import load_digits

    folder = write_digit_captions(tmp_path, num_images=20, image_size=16)
    first = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert write_digit_captions(tmp_path, num_images=20, image_size=16) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == first  # reused, not rewritten
    labels = load_digits().target
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["text"] == f"a handwritten digit {labels[i]}" for i, r in enumerate(rows))
    with Image.open(folder / rows[3]["file_name"]) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (16, 16)
        assert image.getpixel((0, 0)) == (255, 255, 255)  # inverted: white paper


@pytest.mark.parametrize("fmt", ["folder", "shards"])
def test_digits_module_batches(tmp_path, fmt: str) -> None:
    dm = DigitCaptionsDataModule(str(tmp_path), format=fmt, num_images=40, image_size=16, resolution=8, batch_size=5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (5, 3, 8, 8) and batch["index"].dtype == torch.long
    assert all(t.startswith("a handwritten digit ") for t in batch["text"])
    val = [t for b in dm.val_dataloader() for t in b["text"]]
    assert len(val) == 4
    again = DigitCaptionsDataModule(str(tmp_path), format=fmt, num_images=40, image_size=16, resolution=8)
    again.setup()
    assert [t for b in again.val_dataloader() for t in b["text"]] == val


def test_digits_bad_format(tmp_path) -> None:
    with pytest.raises(UserError, match="data.format='zip' is unknown; valid: folder, shards"):
        DigitCaptionsDataModule(str(tmp_path), format="zip")


def test_configs_compose_and_instantiate(tmp_path, folder) -> None:
    pattern = write_shards(shard_samples(3), str(tmp_path / "c-%d.tar"), per_shard=2)
    cases = {
        "image_folder": [f"data.train_dir={folder}"],
        "webdataset": [f"data.train_shards='{pattern}'", f"data.validation_shards='{pattern}'"],  # braces need quotes
        "digits": [f"paths.cache_dir={tmp_path}", "data.num_images=12", "data.format=shards"],
    }
    for name, overrides in cases.items():
        cfg = compose_train([f"data={name}", *overrides])
        dm = instantiate(cfg.data)
        dm.setup("fit")
        batch = next(iter(dm.val_dataloader()))
        side = 32 if name == "digits" else 512  # no model.resolution in the default model: the yaml fallback
        assert batch["pixel_values"].shape[1:] == (3, side, side)
