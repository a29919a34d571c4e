"""TRELLIS previews: the flow3d head's ``preview_images`` (voxel projections of sparse-structure samples for fixed
conditions) drawn by the generic ``SamplePreviews`` callback into the run directory and the logger."""

from __future__ import annotations

from conftest import compose_train
from omegaconf import open_dict
from PIL import Image

from lightning_lora.train import run

RUN = ["model=trellis_ss_tiny", "data=trellis_demo", "data.kind=ss", "data.num_shapes=12", "data.batch_size=2",
       "trainer.max_steps=2", "validate_before=false", "validate_after=false", "trainer.precision=32-true",
       "callbacks.adapter_checkpoint.every_n_steps=0", "callbacks.model_checkpoint.every_n_train_steps=0",
       "model.previews.final=true", "model.previews.steps=2", "~callbacks.progress_bar"]


def test_a_short_trellis_run_writes_voxel_previews(tmp_path, cache_dir) -> None:
    cfg = compose_train([*RUN, f"paths.cache_dir={cache_dir}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    _, objects = run(cfg)
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["base.png", "step_0000002.png"]
    base = Image.open(samples / "base.png")
    # 2 conditions (rows) x 2 seeds (columns), each a front/side/top strip of a 16^3 grid at 4 px per voxel
    strip_w, strip_h = 3 * 64 + 2 * 4, 64
    assert base.size == (2 * strip_w + 2, 2 * strip_h + 2)
    images = objects["head"].preview_images()
    assert images.shape == (2, 2, 3, strip_h, strip_w) and images.min() >= 0 and images.max() <= 1
    logged = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert logged and any(b"samples/lora" in p.read_bytes() for p in logged)


def test_structured_latents_and_presets_without_conditions_draw_nothing(cache_dir) -> None:
    from hydra.utils import instantiate

    for preset in ("model=trellis_slat_tiny", "model=trellis_ss_tiny model.previews.num_random=0"):
        cfg = compose_train([*preset.split(), f"paths.cache_dir={cache_dir}"])
        head = instantiate(cfg.model)
        assert head.preview_images() is None, preset


def test_structured_latent_previews_colour_the_given_voxels(tmp_path, cache_dir) -> None:
    """With previews.coords a SLat head samples on those voxels and draws them in its features' colours; one coords
    file serves every condition; a count that fits neither way, or coords off the grid, is one line."""
    import numpy as np
    import pytest
    import torch
    from hydra.utils import instantiate

    from lightning_lora.data.trellis import feature_colours, voxel_colour_picture
    from lightning_lora.errors import UserError

    xyz = np.stack(np.meshgrid(*[np.arange(4, 12)] * 3, indexing="ij"), -1).reshape(-1, 3)  # a cube in 32^3
    np.savez(tmp_path / "cube.npz", coords=xyz)
    np.savez(tmp_path / "off.npz", coords=xyz + 30)
    cfg = compose_train(["model=trellis_slat_tiny", "model.previews.num_random=2", "model.previews.seeds=[0]",
                         "model.previews.steps=2", f"model.previews.coords=[{tmp_path / 'cube.npz'}]",
                         f"paths.cache_dir={cache_dir}"])
    head = instantiate(cfg.model)
    images = head.preview_images()
    assert images.shape == (2, 1, 3, 64, 3 * 64 + 2 * 4) and images.min() >= 0 and images.max() <= 1
    cond = head.preview_conditions()[1]
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), torch.from_numpy(xyz).long()], 1)
    feats = head.sample(cond, coords=coords, steps=2, cfg_strength=3.0, seed=0).feats.numpy()
    expected = voxel_colour_picture(xyz, feature_colours(feats), 32, panel=64)
    assert torch.equal(images[1, 0], torch.from_numpy(expected))
    assert len(torch.unique(images[1, 0].reshape(3, -1), dim=1).T) > 20  # the sample's features, not one grey
    head.previews["coords"] = [str(tmp_path / "cube.npz")] * 3
    with pytest.raises(UserError, match=r"names 3 files for 2 preview conditions"):
        head.preview_images()
    head.previews["coords"] = [str(tmp_path / "off.npz")]
    with pytest.raises(UserError, match=r"off.npz: coords must be a non-empty \[N, 3\] inside \[0, 32\)"):
        head.preview_images()
