"""TRELLIS data layout: the procedural demo set, the datamodule, and bad-input messages."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_lora.data.trellis import SLAT_MODEL, TrellisDataModule, make_trellis_demo
from lightning_lora.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_trellis_demo(tmp_path_factory.mktemp("trellis") / "demo", n=12, resolution=32)


def test_demo_is_deterministic_and_in_trellis_layout(demo, tmp_path) -> None:
    again = make_trellis_demo(tmp_path / "again", n=12, resolution=32)
    assert (again / "metadata.csv").read_text() == (demo / "metadata.csv").read_text()
    first = sorted((demo / "latents" / SLAT_MODEL).iterdir())[0]
    a, b = np.load(first), np.load(again / "latents" / SLAT_MODEL / first.name)
    assert np.array_equal(a["coords"], b["coords"]) and np.array_equal(a["feats"], b["feats"])
    assert a["coords"].shape[1] == 3 and a["feats"].shape[1] == 8 and 0 <= a["coords"].min() <= a["coords"].max() < 32


@pytest.mark.parametrize("kind", ["ss", "slat"])
def test_batches(demo, kind: str) -> None:
    dm = TrellisDataModule(str(demo), kind=kind, resolution=32, batch_size=4, val_fraction=0.5)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 12 and len(dm.val_set) > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["cond"].shape == (4, 8, 64)
    if kind == "ss":
        assert batch["x0"].shape == (4, 8, 16, 16, 16)
    else:
        coords = batch["coords"]
        assert coords.shape[1] == 4 and coords[:, 0].unique().tolist() == [0, 1, 2, 3]
        assert batch["feats"].shape == (coords.shape[0], 8)
        assert (coords[1:, 0] >= coords[:-1, 0]).all()  # batch-major


def test_normalization_and_voxel_limit(demo) -> None:
    norm = {"mean": [1.0] * 8, "std": [2.0] * 8}
    plain = TrellisDataModule(str(demo), resolution=32, val_fraction=0.0)
    scaled = TrellisDataModule(str(demo), resolution=32, val_fraction=0.0, normalization=norm)
    plain.setup(), scaled.setup()
    np.testing.assert_allclose(scaled.train_set[0]["feats"], (plain.train_set[0]["feats"] - 1) / 2, rtol=1e-6)
    few = TrellisDataModule(str(demo), resolution=32, val_fraction=0.0, max_num_voxels=700)
    few.setup()
    sizes = [len(few.train_set[i]["coords"]) for i in range(len(few.train_set))]
    assert 0 < len(sizes) < 12 and max(sizes) <= 700


def test_bad_inputs_name_the_file(demo, tmp_path) -> None:
    with pytest.raises(UserError, match="no such directory: .*nowhere"):
        TrellisDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no metadata.csv"):
        TrellisDataModule(str(tmp_path / "empty")).setup()
    broken = make_trellis_demo(tmp_path / "broken", n=4, resolution=32)
    victim = sorted((broken / "latents" / SLAT_MODEL).iterdir())[0]
    victim.unlink()
    with pytest.raises(UserError, match=f"missing data file: .*{victim.name}"):
        TrellisDataModule(str(broken), resolution=32).setup()
    outside = TrellisDataModule(str(demo), resolution=16, val_fraction=0.0)  # demo coords reach 31
    outside.setup()
    with pytest.raises(UserError, match=r"coords must be \[N, 3\] inside \[0, 16\)"):
        outside.train_set[0]
    with pytest.raises(UserError, match="data.kind='mesh' is unknown"):
        TrellisDataModule(str(demo), kind="mesh")
