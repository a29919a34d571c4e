"""DreamBooth prior preservation (``data=dreambooth``, ``model.prior_loss_weight``): the loss against a hand-written
version of diffusers' train_dreambooth_lora.py, class images made with the base model once and reused, batches of
instance + class halves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from helpers import assert_one_error_line, image_batches, train_main
from PIL import Image

from lightning_lora.config_checks import check_config
from lightning_lora.data.prior import DreamBoothDataModule, class_images
from lightning_lora.errors import UserError
from lightning_lora.heads.diffusion import DiffusionHead
from lightning_lora.models.sd_tiny import ensure_tiny_sd


@pytest.fixture(scope="module")
def head(cache_dir) -> DiffusionHead:
    return DiffusionHead(ensure_tiny_sd(cache_dir / "sd_tiny"), resolution=32, prior_loss_weight=0.7)


def dreambooth_step(head: DiffusionHead, batch: dict, generator: torch.Generator, weight: float) -> torch.Tensor:
    """diffusers' train_dreambooth_lora.py with --with_prior_preservation, written out: the batch is the instance
    half then the class half; model_pred and target are chunked in two; loss = mse(instance) + w * mse(prior)."""
    with torch.no_grad():
        dist = head.vae.encode(batch["pixel_values"]).latent_dist
        latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator))
        latents = latents * head.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, head.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator)
        noisy = head.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = head.text_encoder(head.tokenize(batch["text"]))[0]
        model_pred = head.unet(noisy, timesteps, hidden).sample
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(noise, 2, dim=0)
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    return loss + weight * prior_loss


def test_prior_preservation_loss_is_diffusers_dreambooth(head) -> None:
    batch = next(iter(image_batches(n=4, batch_size=4)))
    batch["prior_mask"] = torch.tensor([False, False, True, True])
    with torch.no_grad():
        ours = head.diffusion_loss(batch, torch.Generator().manual_seed(5))
        plain = head.diffusion_loss({k: v for k, v in batch.items() if k != "prior_mask"},
                                    torch.Generator().manual_seed(5))
    expected = dreambooth_step(head, batch, torch.Generator().manual_seed(5), 0.7)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ours.item() != pytest.approx(plain.item(), rel=1e-3)  # the weight changes the loss (0.7, not 1)
    with torch.no_grad():  # validation keeps that one weighted value (no per-row loss, no index)
        val = head.validation_step(batch)
    assert set(val) == {"loss"} and val["loss"].ndim == 0
    assert val["loss"].item() == pytest.approx(head.diffusion_loss(batch, torch.Generator().manual_seed(1234)).item(),
                                               rel=1e-6)


def _instance_dir(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 36), (40 * i, 200, 90)).save(root / f"dog_{i}.png")
        (root / f"dog_{i}.txt").write_text("a photo of sks dog")
    return root


def test_class_images_are_made_once_with_the_base_model_and_batches_hold_both_halves(head, tmp_path) -> None:
    classes = tmp_path / "class"
    classes.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(classes / "mine.jpg")  # a user's own class image stays
    data = DreamBoothDataModule(train_dir=str(_instance_dir(tmp_path / "inst")), val_fraction=0.0,
                                class_dir=str(classes), class_prompt="a photo of a dog", num_class_images=3,
                                class_sample_steps=2, resolution=32, batch_size=2)
    data.setup("fit")
    with pytest.raises(UserError, match=r"holds 1 of data.num_class_images=3 class images"):
        data.train_dataloader()
    data.setup_with_model(head)
    names = [p.name for p in class_images(classes)]
    assert names == ["class_00000.png", "class_00001.png", "mine.jpg"] and len(data.generated) == 2
    made = Image.open(classes / "class_00000.png")
    assert made.size == (32, 32)
    expected = (head.sample(["a photo of a dog"], [0], 2, 7.5)[0].permute(1, 2, 0) * 255).round()
    assert torch.equal(torch.from_numpy(np.asarray(made)).float(), expected)
    stamps = {p: p.stat().st_mtime_ns for p in class_images(classes)}
    again = DreamBoothDataModule(train_dir=str(tmp_path / "inst"), val_fraction=0.0, class_dir=str(classes),
                                 class_prompt="a photo of a dog", num_class_images=3, resolution=32, batch_size=2)
    again.setup("fit")
    again.setup_with_model(head)  # nothing missing: nothing made, nothing replaced
    assert not again.generated and {p: p.stat().st_mtime_ns for p in class_images(classes)} == stamps
    batch = next(iter(again.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["prior_mask"].tolist() == [False, False, True, True]
    assert batch["text"][:2] == ["a photo of sks dog"] * 2 and batch["text"][2:] == ["a photo of a dog"] * 2
    assert len(again.train_dataloader().dataset) == 3  # max(3 instance, 3 class)


def test_dreambooth_settings_are_checked_before_anything_loads(tmp_path, capsys) -> None:
    with pytest.raises(UserError, match=r"model.prior_loss_weight=-1 must be"):
        check_config(compose_train(["model=sd_tiny", "model.prior_loss_weight=-1"]))
    rc = train_main(["model=sd_tiny", "data=dreambooth", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"hydra.run.dir={tmp_path}/r"])
    assert_one_error_line(rc, capsys.readouterr().err, "data.class_dir is required")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # a real 2-step run of the tiny SD that first makes its class images (about 10 s)
def test_data_dreambooth_trains_end_to_end(tmp_path, cache_dir) -> None:
    instances = _instance_dir(tmp_path / "inst", n=4)
    rc = train_main(["model=sd_tiny", "data=dreambooth", f"data.train_dir={instances}",
                     f"data.class_dir={tmp_path / 'class'}", "data.class_prompt=a photo of a dog",
                     "data.num_class_images=2", "data.class_sample_steps=2", "data.batch_size=2", "data.val_fraction=0",
                     "trainer.max_steps=2", "validate_before=false", "validate_after=false",
                     "trainer.precision=32-true", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/r"])
    assert rc in (0, None)
    assert [p.name for p in class_images(tmp_path / "class")] == ["class_00000.png", "class_00001.png"]
    assert (tmp_path / "r" / "adapters" / "final" / "pytorch_lora_weights.safetensors").is_file()


class _MustNotSample:
    def sample(self, *args, **kwargs):
        raise AssertionError("a process that knows no process count and is not local rank 0 draws nothing")


def test_other_local_ranks_wait_for_rank_0s_class_images(tmp_path, monkeypatch) -> None:
    """Under torchrun/srun every process runs setup_with_model: a local rank > 0 that knows no process count makes
    nothing and waits until the folder holds every class image, and says so when it gives up."""
    import threading

    import lightning_lora.data.prior as prior

    classes = tmp_path / "class"
    data = DreamBoothDataModule(train_dir=str(_instance_dir(tmp_path / "inst")), val_fraction=0.0,
                                class_dir=str(classes), class_prompt="a photo of a dog", num_class_images=2,
                                class_sample_steps=2, resolution=32, batch_size=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(prior, "CLASS_POLL_SECONDS", 0.02)
    monkeypatch.setattr(prior, "CLASS_WAIT_SECONDS", 0.1)
    with pytest.raises(UserError, match=r"still lacks 2 of data.num_class_images=2 class images after 0 s"):
        data.setup_with_model(_MustNotSample())

    def rank_0() -> None:  # another process's writes, a little later
        classes.mkdir()
        for seed in range(2):
            Image.new("RGB", (32, 32), (seed, 0, 0)).save(classes / f"class_{seed:05d}.png")

    monkeypatch.setattr(prior, "CLASS_WAIT_SECONDS", 30.0)
    writer = threading.Timer(0.1, rank_0)
    writer.start()
    data.setup_with_model(_MustNotSample())
    writer.join()
    assert data.missing_class_images() == 0 and not data.generated
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_LOCALID", "3")  # torchrun's variables win where both are set
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert prior._node_share() == (0, 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert prior._node_share() == (3, 4)


class _Recorder:
    def __init__(self) -> None:
        self.seeds: list[int] = []

    def sample(self, prompts, seeds, steps, guidance):
        self.seeds += seeds
        return torch.full((1, 3, 32, 32), 0.5)


def test_the_node_s_processes_draw_their_share_of_the_seeds(tmp_path, monkeypatch) -> None:
    """torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE: each process draws the seeds k with k mod size == rank, by seed, so
    one that looks after another has written draws the same seeds; then it waits for the others' images."""
    import threading

    import lightning_lora.data.prior as prior

    classes = tmp_path / "class"
    classes.mkdir()
    Image.new("RGB", (32, 32)).save(classes / "class_00010.png")  # an earlier run's, beyond this run's seeds
    Image.new("RGB", (32, 32)).save(classes / "class_00002.png")  # rank 0 has already drawn seed 2
    data = DreamBoothDataModule(train_dir=str(_instance_dir(tmp_path / "inst")), val_fraction=0.0,
                                class_dir=str(classes), class_prompt="a photo of a dog", num_class_images=6,
                                class_sample_steps=2, resolution=32, batch_size=2, class_seed=0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(prior, "CLASS_POLL_SECONDS", 0.02)

    def rank_0() -> None:  # the rest of rank 0's share: seeds 0 and 4 (2 is there)
        for seed in (0, 4):
            Image.new("RGB", (32, 32)).save(classes / f"class_{seed:05d}.png")

    writer = threading.Timer(0.2, rank_0)
    writer.start()
    recorder = _Recorder()
    data.setup_with_model(recorder)
    writer.join()
    # seeds 0-5 less 2 are missing at the look (4 of 6 images lack): 0, 1, 3, 4; rank 1 draws the odd ones
    assert recorder.seeds == [1, 3] and [p.name for p in data.generated] == ["class_00001.png", "class_00003.png"]
    assert data.missing_class_images() == 0
