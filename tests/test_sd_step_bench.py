"""``bench/sd_step_bench.py`` compares like with like: on the same seed, our cached step (DiffusionHead under
Lightning) and the diffusers script's loop draw the same random numbers in the same order, so after the same steps
they reach the same loss; only where the latents and text embeddings come from differs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.slow  # two short training runs on the tiny SD folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from lightning_lora.models.sd_tiny import ensure_tiny_sd

    return Path(ensure_tiny_sd(tmp_path_factory.mktemp("sd") / "sd_tiny"))


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import sd_step_bench

        yield sd_step_bench
    finally:
        sys.path.remove(str(BENCH))


def test_our_cached_step_and_the_diffusers_loop_reach_the_same_loss(bench, tiny_sd, tmp_path) -> None:
    job = {"folder": str(tiny_sd), "work": str(tmp_path), "warmup": 2, "steps": 2, "images": 2, "batch": 1,
           "resolution": 32, "seed": 0, "threads": 0}
    ours = bench.run_ours({**job, "variant": "ours"})
    theirs = bench.run_diffusers({**job, "variant": "diffusers"})
    assert len(ours["times"]) == len(theirs["times"]) == 2
    assert ours["trainable"] == theirs["trainable"] > 0
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
