"""Image–text pairs: the JSONL format (relative/absolute image paths, mixed negatives), its one-line errors,
the DataModule's batches, and the digits demo set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_lora.data.digits import DigitRetrievalDataModule, write_digit_retrieval_pairs
from lightning_lora.data.image_pairs import ImagePairsDataModule, read_image_pairs_jsonl
from lightning_lora.errors import UserError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pair_file(tmp_path) -> Path:
    _png(tmp_path / "img" / "cat.png")
    absolute = _png(tmp_path / "elsewhere" / "dog.png")
    return _jsonl(tmp_path / "train.jsonl", [
        {"query": "a red cat", "positive_image": "img/cat.png"},
        {"query_image": str(absolute), "positive": "a dog", "negatives": ["a cat", {"image": "img/cat.png"}]},
        "",
        {"query": "what is it?", "query_image": "img/cat.png", "positive": "a cat", "positive_image": "img/cat.png"},
        {"query": "plain", "positive": "text", "negatives": None},
    ])


def test_read_image_pairs_resolves_paths_and_builds_items(pair_file, tmp_path):
    pairs = read_image_pairs_jsonl(pair_file)
    cat, dog = str((tmp_path / "img" / "cat.png").resolve()), str((tmp_path / "elsewhere" / "dog.png").resolve())
    assert pairs[0] == {"query": "a red cat", "positive": {"text": None, "image": cat}, "negatives": []}
    assert pairs[1]["query"] == {"text": None, "image": dog}
    assert pairs[1]["negatives"] == ["a cat", {"text": None, "image": cat}]
    assert pairs[2]["query"] == {"text": "what is it?", "image": cat}
    assert pairs[2]["positive"] == {"text": "a cat", "image": cat}
    assert pairs[3] == {"query": "plain", "positive": "text", "negatives": []}


@pytest.mark.parametrize(("row", "message"), [
    ({"query": "q", "positive_image": "missing.png"}, r"line 1: positive_image file not found: .*missing.png"),
    ({"query_image": "nope/q.jpg", "positive": "p"}, r"line 1: query_image file not found: .*nope/q.jpg"),
    ({"query": "q", "positive": "p", "negatives": [{"image": "gone.png"}]},
     r"line 1: negatives\[0\].image file not found: .*gone.png"),
    ({"positive": "p"}, r"line 1: needs 'query' or 'query_image'"),
    ({"query": 3, "positive": "p"}, r"line 1: field 'query' must be a string"),
    ({"query": "q", "positive": "p", "negatives": "n"}, r"field 'negatives' must be a list"),
    ({"query": "q", "positive": "p", "negatives": [{"txt": "n"}]}, r"negatives\[0\] must be a string or an object"),
    ("{not json", r"line 1: not valid JSON"),
    ([1, 2], r"line 1: expected a JSON object, got list"),
])
def test_bad_lines_are_one_line_errors(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(UserError, match=message) as err:
        read_image_pairs_jsonl(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_files_fail_at_setup(tmp_path):
    with pytest.raises(UserError, match="data.train_path: file not found"):
        ImagePairsDataModule(train_path=str(tmp_path / "none.jsonl"))
    _jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UserError, match="data file is empty"):
        ImagePairsDataModule(train_path=str(tmp_path / "empty.jsonl"), batch_size=1).setup()


def test_datamodule_batches(pair_file):
    dm = ImagePairsDataModule(train_path=str(pair_file), val_path=str(pair_file), batch_size=4, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"query", "positive", "negatives", "index"}
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["index"].dtype == torch.int64
    assert batch["query"][0] == "a red cat" and isinstance(batch["positive"][0], dict)
    assert [len(n) for n in batch["negatives"]] == [0, 2, 0, 0]
    assert len(next(iter(dm.val_dataloader()))["query"]) == 4


def test_digits_pairs_demo(tmp_path):
    dm = DigitRetrievalDataModule(root=str(tmp_path / "digits"), num_images=40, image_size=16, batch_size=8,
                                  num_negatives=2)
    assert dm.num_train == 36 and dm.num_val == 4
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["query"]) == 8 and batch["index"].shape == (8,)
    for query, positive, negatives in zip(batch["query"], batch["positive"], batch["negatives"], strict=True):
        assert query["text"] is None and Path(query["image"]).is_file()
        assert Image.open(query["image"]).size == (16, 16)
        assert positive.startswith("a handwritten digit ") and len(negatives) == 2 and positive not in negatives
    # written once: a second module reuses the same files
    train, val = write_digit_retrieval_pairs(tmp_path / "digits", num_images=40, image_size=16, num_negatives=2)
    stamp = train.stat().st_mtime_ns
    DigitRetrievalDataModule(root=str(tmp_path / "digits"), num_images=40, image_size=16, num_negatives=2).setup()
    assert train.stat().st_mtime_ns == stamp and val is not None
    # the images are those of data=digits (same root), and the reverse direction pairs text with images
    reverse = read_image_pairs_jsonl(write_digit_retrieval_pairs(tmp_path / "digits", num_images=40, image_size=16,
                                                                 direction="text_to_image", num_negatives=1)[0])
    first = reverse[0]
    assert first["query"].startswith("a handwritten digit ") and Path(first["positive"]["image"]).is_file()
    negative = first["negatives"][0]["image"]
    assert Path(negative).is_file() and negative != first["positive"]["image"]
    with pytest.raises(UserError, match="data.direction='sideways' is unknown"):
        write_digit_retrieval_pairs(tmp_path / "digits", num_images=40, direction="sideways")


def test_digits_batch_through_an_embedder(tmp_path, tiny_clip_dir):
    from lightning_lora.models.embedders import ClipEmbedder

    emb = ClipEmbedder(str(tiny_clip_dir))
    dm = DigitRetrievalDataModule(root=str(tmp_path / "digits"), num_images=16, image_size=32, batch_size=4,
                                  val_fraction=0.25)
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        q, d = emb.embed(batch["query"], "query"), emb.embed(batch["positive"], "document")
    assert q.shape == d.shape == (4, 16) and torch.isfinite(q).all()
