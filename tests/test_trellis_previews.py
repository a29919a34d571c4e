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
