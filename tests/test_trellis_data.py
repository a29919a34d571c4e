"""TRELLIS data layout: the procedural demo set, the datamodule, and bad-input messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


# --------------------------------------------------------------------------- condition images and voxel pictures
def test_demo_writes_condition_renders_and_ss_decoding_inverts_the_stand_in_encoding(demo) -> None:
    import json

    from lightning_lora.data.trellis import SS_MODEL, decode_demo_ss, demo_ss_projection

    sha = sorted((demo / "renders_cond").iterdir())[0].name
    frames = json.loads((demo / "renders_cond" / sha / "transforms.json").read_text())["frames"]
    assert [f["file_path"] for f in frames] == ["000.png", "001.png", "002.png"]
    from PIL import Image

    with Image.open(demo / "renders_cond" / sha / "000.png") as image:
        assert image.mode == "RGBA" and image.size == (64, 64)
        alpha = np.asarray(image.getchannel("A"))
        assert 0 < (alpha > 0).mean() < 1  # a silhouette on a transparent background
    latent = np.load(demo / "ss_latents" / SS_MODEL / f"{sha}.npz")["mean"]
    projection = demo_ss_projection(latent.shape[0])
    centred = np.tensordot(projection[:, 0], latent, axes=(0, 0)) / float(projection[:, 0] @ projection[:, 0])
    np.testing.assert_allclose(latent, projection[:, :, None, None] * centred[None], atol=1e-6)  # rank one
    assert centred.min() >= -1 - 1e-6 and centred.max() <= 1 + 1e-6  # 2·(fraction occupied) - 1
    occ = decode_demo_ss(latent)
    assert occ.shape == (16, 16, 16) and np.array_equal(occ, centred > 0) and 0 < occ.sum() < occ.size


def test_image_batches_crop_resize_composite_and_fixed_validation_view(demo) -> None:
    dm = TrellisDataModule(str(demo), kind="ss", resolution=32, batch_size=4, val_fraction=0.5, cond="images",
                           image_size=24)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert "cond" not in batch and batch["cond_image"].shape == (4, 3, 24, 24) and batch["x0"].shape[0] == 4
    images = batch["cond_image"]
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    assert (images[:, :, 0, 0] == 0).all()  # outside the silhouette: composited on black
    first = dm.val_set[0]["cond_image"]
    assert torch.equal(first, dm.val_set[0]["cond_image"])  # validation always reads the first view
    views = {tuple(dm.train_set[0]["cond_image"].flatten()[::37].tolist()) for _ in range(20)}
    assert len(views) > 1  # training draws a random view per sample, as TRELLIS


def test_prepare_cond_image_follows_trellis() -> None:
    from PIL import Image

    from lightning_lora.data.trellis import prepare_cond_image

    rgba = np.zeros((40, 60, 4), dtype=np.uint8)
    rgba[10:30, 20:40] = [255, 128, 0, 255]  # an opaque 20x20 orange square on a transparent background
    rgba[10:30, 20:40, 3][:, :10] = 51  # its left half at alpha 0.2
    out = prepare_cond_image(Image.fromarray(rgba, "RGBA"), 48)
    assert out.shape == (3, 48, 48)
    # TRELLIS's crop: alpha box x 20..39, y 10..29 (max - min = 19), centre (29.5, 19.5), half size 1.2 * 9.5,
    # truncated to the box (18, 8, 40, 30): 22 pixels, the square from 2 to the end, scaled by 48 / 22
    inside = out[0] > 0.1
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    assert rows.tolist() == cols.tolist() == list(range(4, 48))
    torch.testing.assert_close(out[:, 24, 34], torch.tensor([1.0, 128 / 255, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(out[:, 24, 14], torch.tensor([0.2, 0.2 * 128 / 255, 0.0]), atol=0.02, rtol=0)
    assert out[:, :3, :].max() < 0.05  # premultiplied by alpha: black outside (up to Lanczos ringing)
    plain = prepare_cond_image(Image.fromarray(rgba[..., :3], "RGB"), 16)  # no alpha: only resized
    assert plain.shape == (3, 16, 16)


def test_missing_renders_name_the_path(tmp_path) -> None:
    import shutil

    broken = make_trellis_demo(tmp_path / "broken", n=4, resolution=32)
    shas = sorted(p.name for p in (broken / "renders_cond").iterdir())
    shutil.rmtree(broken / "renders_cond" / shas[0])
    dm = TrellisDataModule(str(broken), resolution=32, cond="images", val_fraction=0.0)
    with pytest.raises(UserError, match=f"missing condition renders folder: .*renders_cond/{shas[0]} "):
        dm.setup()
    shutil.rmtree(broken / "renders_cond")
    with pytest.raises(UserError, match="missing condition renders folder: .*renders_cond/[0-9a-f]{64} "):
        TrellisDataModule(str(broken), resolution=32, cond="images", val_fraction=0.0).setup()
    fine = make_trellis_demo(tmp_path / "fine", n=4, resolution=32)
    victim = fine / "renders_cond" / shas[0] / "001.png"
    victim.unlink()
    dm = TrellisDataModule(str(fine), resolution=32, cond="images", val_fraction=0.0)
    dm.setup()
    index = [sha for _, sha in dm.train_set.items].index(shas[0])
    with pytest.raises(UserError, match=f"missing condition image: {victim}"):
        for _ in range(30):  # random views: one of them is the missing file
            dm.train_set[index]
    with pytest.raises(UserError, match="data.cond='dino' is unknown; valid: tokens, images"):
        TrellisDataModule(str(fine), cond="dino")


def test_voxel_picture_pixels_for_a_known_voxel() -> None:
    from lightning_lora.data.trellis import GAP_VALUE, PANEL_GAP, voxel_picture

    occ = np.zeros((4, 4, 4), dtype=bool)
    occ[1, 2, 3] = True  # x=1, y=2, z=3 (z is up)
    picture = np.asarray(voxel_picture(occ, panel=8))  # 2x2 pixels per voxel
    assert picture.shape == (8, 3 * 8 + 2 * PANEL_GAP)
    panels = [picture[:, i * (8 + PANEL_GAP):i * (8 + PANEL_GAP) + 8] for i in range(3)]
    assert (picture[:, 8:8 + PANEL_GAP] == GAP_VALUE).all()
    # front: looking along +y (depth y=2 of 0..3), x across, z up -> row 0 (z=3), column 1 (x=1)
    # side: looking along +x (depth x=1), y across, z up -> row 0, column 2 (y=2)
    # top: looking down -z (depth 3-z=0), x across, y up -> row 1 (y=2), column 1 (x=1)
    expected = [((0, 1), 1 - 0.6 * 2 / 3), ((0, 2), 1 - 0.6 * 1 / 3), ((1, 1), 1.0)]
    for panel, ((row, col), shade) in zip(panels, expected, strict=True):
        want = np.zeros((4, 4), dtype=np.uint8)
        want[row, col] = round(255 * shade)
        assert np.array_equal(panel, want.repeat(2, 0).repeat(2, 1))
    two = np.asarray(voxel_picture([occ, ~occ], panel=8))  # one row per grid
    assert two.shape == (2 * 8 + PANEL_GAP, 3 * 8 + 2 * PANEL_GAP) and two[8 + PANEL_GAP:].max() == 255


def test_demo_module_upgrades_an_old_cache_and_skips_unrendered_rows(tmp_path) -> None:
    import shutil

    from lightning_lora.data.trellis import TrellisDemoDataModule

    folder = make_trellis_demo(tmp_path / "cache" / "n4_r32_c64_t8", n=4, resolution=32)
    shutil.rmtree(folder / "renders_cond")  # a demo set written before condition renders existed
    (folder / "demo.json").unlink()
    dm = TrellisDemoDataModule(str(tmp_path / "cache"), num_shapes=4, cond="images", image_size=16, val_fraction=0.0)
    dm.setup()
    assert dm.train_set[0]["cond_image"].shape == (3, 16, 16)
    # rows whose metadata says cond_rendered=False are left out with data.cond=images, as TRELLIS does
    meta = folder / "metadata.csv"
    lines = meta.read_text().splitlines()
    column = lines[0].split(",").index("cond_rendered")
    cells = lines[1].split(",")
    cells[column] = "False"
    meta.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    shutil.rmtree(folder / "renders_cond" / cells[0])
    images = TrellisDataModule(str(folder), resolution=32, cond="images", val_fraction=0.0)
    images.setup()
    assert len(images.train_set) == 3
    tokens = TrellisDataModule(str(folder), resolution=32, val_fraction=0.0)
    tokens.setup()
    assert len(tokens.train_set) == 4


def test_feature_colours_are_the_principal_directions_scaled_to_unit_range() -> None:
    """Features that are an orthonormal mix of known colours come back as those colours up to a per-channel
    affine map; each direction's sign is fixed by its loadings (not by the SVD's whim), so negated features give the
    complementary colours; the voxels' order does not matter; no spread gives grey."""
    from lightning_lora.data.trellis import feature_colours

    g = np.random.default_rng(0)
    rgb = g.uniform(size=(200, 3)) * np.array([3.0, 2.0, 1.0])  # distinct spreads: distinct principal directions
    mix = np.linalg.qr(g.normal(size=(8, 3)))[0]  # 3 -> 8 channels, orthonormal
    colours = feature_colours(rgb @ mix.T)
    assert colours.shape == (200, 3) and colours.dtype == np.float32
    assert colours.min(axis=0).tolist() == [0, 0, 0] and colours.max(axis=0).tolist() == [1, 1, 1]
    for channel in range(3):  # each colour channel is one of the original channels, linearly (up to the sample's
        assert abs(np.corrcoef(colours[:, channel], rgb[:, channel])[0, 1]) > 0.99  # small cross-covariances)
    assert np.allclose(feature_colours(-(rgb @ mix.T)), 1 - colours, atol=1e-6)
    order = g.permutation(200)
    assert np.allclose(feature_colours((rgb @ mix.T)[order]), colours[order], atol=1e-6)
    assert np.all(feature_colours(np.ones((5, 8))) == 0.5) and feature_colours(np.ones((1, 8))).shape == (1, 3)


def test_previews_colours_is_checked_before_anything_loads(tmp_path) -> None:
    from conftest import compose_train

    from lightning_lora.config_checks import check_config
    from lightning_lora.heads.flow3d import FlowMatching3DHead

    check_config(compose_train(["model=trellis_slat_tiny"]))
    check_config(compose_train(["model=trellis_slat_tiny", "model.previews.colours=numpy.tanh"]))
    for bad in ("rainbow", "lightning_lora.nothing_here"):
        with pytest.raises(UserError, match=rf"^model.previews.colours='{bad}' must be pca or the dotted path"):
            check_config(compose_train(["model=trellis_slat_tiny", f"model.previews.colours={bad}"]))
        with pytest.raises(UserError, match=rf"^model.previews.colours='{bad}' is unknown"):
            FlowMatching3DHead(torch.nn.Linear(2, 2), ckpt=str(tmp_path / "never_read.safetensors"),
                               previews={"colours": bad})
