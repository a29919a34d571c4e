"""``data=hf_dataset``: Hugging Face datasets written by the test (an image folder, a save_to_disk folder, parquet),
read offline into the batches each head takes; streaming shared between processes; the kind checked against the
head, missing columns and a missing package in one line, before anything loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_one_error_line, train_main
from PIL import Image

from lightning_lora.data.hf import HFDatasetDataModule
from lightning_lora.data.images import ImageTransform, load_rgb
from lightning_lora.errors import UserError

datasets = pytest.importorskip("datasets")


def _picture(i: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    g = torch.Generator().manual_seed(i)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder") / "train"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(4):
            _picture(i).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    return root.parent


def test_an_image_folder_gives_captioned_image_batches(image_folder) -> None:
    data = HFDatasetDataModule(path="imagefolder", data_dir=str(image_folder), resolution=32, center_crop=True,
                               batch_size=4, cache_dir=str(image_folder.parent / "hf_cache"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["index"].shape == (4,)
    by_index = dict(zip(batch["index"].tolist(), range(4), strict=True))
    transform = ImageTransform(32, center_crop=True, train=True)
    for i in range(4):
        row = by_index[i]
        assert batch["text"][row] == f"picture {i}"
        expected = transform(load_rgb(image_folder / "train" / f"{i}.png"))
        assert torch.allclose(batch["pixel_values"][row], expected, atol=1e-6)
    assert HFDatasetDataModule.batch_kind({"kind": "images"}) == "captioned images"


def test_a_saved_dataset_gives_source_target_pairs(tmp_path) -> None:
    rows = datasets.Dataset.from_dict({"input": [_picture(i) for i in range(3)],
                                       "output": [_picture(10 + i, (20, 18)) for i in range(3)]})
    rows = rows.cast_column("input", datasets.Image()).cast_column("output", datasets.Image())
    rows.save_to_disk(str(tmp_path / "pairs"))
    data = HFDatasetDataModule(path=str(tmp_path / "pairs"), kind="pairs", source_column="input",
                               target_column="output", resolution=16, center_crop=True, batch_size=3)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["source"].shape == batch["target"].shape == (3, 3, 16, 16)
    i = int(batch["index"][0])
    expected = ImageTransform(16, center_crop=True, train=True)(_picture(10 + i, (20, 18)))
    assert torch.allclose(batch["target"][0], expected, atol=1e-6)


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nli") / "train.parquet"
    datasets.Dataset.from_dict({"anchor": [f"question {i}" for i in range(6)],
                                "positive": [f"answer {i}" for i in range(6)],
                                "negative": [f"wrong {i}" for i in range(6)]}).to_parquet(str(path))
    return path


def test_parquet_triplets_give_embedding_batches(triplets) -> None:
    data = HFDatasetDataModule(path="parquet", data_files=str(triplets), kind="embedding", batch_size=6,
                               cache_dir=str(triplets.parent / "hf_cache"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    order = batch["index"].tolist()
    assert batch["query"] == [f"question {i}" for i in order] and batch["positive"] == [f"answer {i}" for i in order]
    assert batch["negatives"] == [[f"wrong {i}"] for i in order]


def test_a_stream_is_shared_between_processes(triplets) -> None:
    seen = []
    for rank in (0, 1):
        data = HFDatasetDataModule(path="parquet", data_files=str(triplets), kind="embedding", streaming=True,
                                   batch_size=2, shuffle_buffer=4)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0)
        data.setup("fit")
        seen.append([q for batch in data.train_dataloader() for q in batch["query"]])
    assert len(seen[0]) == len(seen[1]) == 3 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"question {i}" for i in range(6)}


def test_missing_columns_and_splits_are_one_line(triplets, image_folder) -> None:
    with pytest.raises(UserError, match=r"data.anchor_column='query' is not a column of parquet \(train\); its "
                                        r"columns: anchor, positive, negative"):
        HFDatasetDataModule(path="parquet", data_files=str(triplets), kind="embedding", anchor_column="query",
                            cache_dir=str(triplets.parent / "hf_cache")).setup()
    with pytest.raises(UserError, match=r"data.path=imagefolder: cannot load split 'nope'"):
        HFDatasetDataModule(path="imagefolder", data_dir=str(image_folder), split="nope",
                            cache_dir=str(image_folder.parent / "hf_cache")).setup()


def test_the_kind_is_checked_against_the_model_before_anything_loads(tmp_path, capsys) -> None:
    rc = train_main(["model=sd_tiny", "data=hf_dataset", "data.kind=embedding", "data.path=nowhere",
                     f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path}/r"])
    assert_one_error_line(rc, capsys.readouterr().err, "the model takes captioned images, the data yields text pairs")
    assert not (tmp_path / "cache").exists()


def test_a_missing_datasets_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"pip install 'lightning_lora\[hf\]'"):
        HFDatasetDataModule(path="parquet")


@pytest.mark.slow  # a real 2-step run of the tiny SD on the image folder (about 10 s)
def test_sd_tiny_trains_on_a_hf_image_folder(image_folder, tmp_path, cache_dir) -> None:
    rc = train_main(["model=sd_tiny", "data=hf_dataset", "data.path=imagefolder", f"data.data_dir={image_folder}",
                     "data.batch_size=2", "trainer.max_steps=2", "validate_before=false", "validate_after=false",
                     "trainer.precision=32-true", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/r"])
    assert rc in (0, None)
    assert (tmp_path / "r" / "adapters" / "final" / "pytorch_lora_weights.safetensors").is_file()
