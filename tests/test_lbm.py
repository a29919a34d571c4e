"""LBM (latent bridge matching): the released folder layout, the bridge objective and sampler against
hand-computed values, paired tar shards, and the seed's extract -> validate -> fine-tune a subset -> sample
workflow end to end on the tiny model."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from helpers import pairs, validated_loss
from PIL import Image

from lightning_lora.data.digits import DigitTranslationDataModule, write_digit_translation_shards
from lightning_lora.data.shards import PairedShardsDataModule, write_shards
from lightning_lora.errors import UserError
from lightning_lora.heads.bridge import (
    LBM_FILE,
    BridgeHead,
    apply_lbm_loras,
    bridge_interpolant,
    latent_mask,
)
from lightning_lora.models.lbm import load_lbm
from lightning_lora.models.lbm_tiny import ensure_tiny_lbm, optimal_error, write_tuned_copy

pytest.importorskip("diffusers")


# models this small run fastest on one thread (and two threads on a shared 2-core machine can be 100x slower)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lbm(tmp_path_factory) -> Path:
    return Path(ensure_tiny_lbm(tmp_path_factory.mktemp("lbm") / "lbm_tiny"))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- the folder
def test_tiny_folder_has_the_released_layout_and_is_reused(tiny_lbm):
    from safetensors import safe_open

    assert sorted(p.name for p in tiny_lbm.iterdir()) == ["config.yaml", "model.safetensors"]
    with safe_open(tiny_lbm / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"denoiser", "vae", "num_iterations"}
    assert all(k.startswith("vae.vae_model.") for k in keys if k.startswith("vae"))
    stamp = (tiny_lbm / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_lbm(tiny_lbm) == str(tiny_lbm)
    assert (tiny_lbm / "model.safetensors").stat().st_mtime_ns == stamp
    parts = load_lbm(tiny_lbm)
    assert parts.config["bridge_noise_sigma"] == 0.005 and parts.config["selected_timesteps"] == [250, 500, 750, 1000]
    with safe_open(tiny_lbm / "model.safetensors", "pt") as f:
        assert torch.equal(parts.denoiser.conv_in.weight, f.get_tensor("denoiser.conv_in.weight"))


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


@pytest.mark.parametrize("case, message", [
    ("none", "model.pretrained is required"),
    ("absent", "no folder at"),
    ("no_config", r"has no config file \(\.yaml, or config\.json\)"),
    ("two_configs", "has 2 config files"),
    ("no_weights", "has no model.safetensors"),
    ("extra_key", r"1 tensors belong to no LBM part, e.g. 'text_encoder.w'"),
    ("missing_key", r"1 tensors of the denoiser are missing, e.g. denoiser.conv_in.bias"),
    ("bad_shape", r"denoiser.conv_in.weight has shape \[32, 4, 1, 1\] but the model needs \[32, 4, 3, 3\]"),
    ("concat", "conditioning images/masks concatenated to the latents are not supported"),
])
def test_folder_errors_are_one_line(tiny_lbm, tmp_path, case, message):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_lbm, tmp_path / "lbm")
    state = load_file(folder / "model.safetensors")
    if case == "none":
        folder = None
    elif case == "absent":
        folder = tmp_path / "nope"
    elif case == "no_config":
        (folder / "config.yaml").unlink()
    elif case == "two_configs":
        (folder / "other.yaml").write_text("bridge_noise_sigma: 0.1\n")
    elif case == "no_weights":
        (folder / "model.safetensors").unlink()
    elif case in ("extra_key", "missing_key", "bad_shape"):
        if case == "extra_key":
            state["text_encoder.w"] = torch.zeros(1)
        elif case == "missing_key":
            del state["denoiser.conv_in.bias"]
        else:
            state["denoiser.conv_in.weight"] = torch.zeros(32, 4, 1, 1)
        save_file(state, folder / "model.safetensors")
    else:
        text = (folder / "config.yaml").read_text().replace("conditioning_images_keys: []",
                                                              "conditioning_images_keys: [mask]")
        (folder / "config.yaml").write_text(text)
    with pytest.raises(UserError, match=message) as info:
        BridgeHead(folder)
    assert "\n" not in str(info.value)


def test_bad_settings_fail_before_or_at_load(tiny_lbm, tmp_path):
    cases = [({"timesteps": [0, 500]}, r"timesteps: 0 is not a timestep of the scheduler \(integers 1..1000\)"),
             ({"timestep_probs": [0.5, 0.5]}, r"must be 4 non-negative numbers summing to 1"),
             ({"timestep_sampling": "cosine"}, "model.timestep_sampling='cosine' is unknown"),
             ({"num_inference_steps": 0}, "num_inference_steps=0 must be a positive integer"),
             ({"pixel_loss_type": "ssim"}, "model.pixel_loss_type='ssim' is unknown"),
             ({"frozen_dtype": "fp8"}, "frozen_dtype='fp8' is unknown"),
             ({"resolution": 33}, "not divisible by the VAE's downscale factor 2")]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            BridgeHead(tiny_lbm, **kwargs)
    with pytest.raises(UserError, match=r"model.bridge_noise_sigma=-1 must be >= 0"):
        BridgeHead(None, bridge_noise_sigma=-1)  # checked before the folder is even looked at
    folder = _copy(tiny_lbm, tmp_path / "lbm")
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("latent_loss_type: l2",
                                                                                     "latent_loss_type: huber"))
    with pytest.raises(UserError, match=r"config.yaml: latent_loss_type='huber' is unknown; valid: l2, l1"):
        BridgeHead(folder)


# ---------------------------------------------------------------------------- objective and sampler
def test_sigmas_and_bridge_noising_hand_computed(tiny_lbm):
    head = BridgeHead(tiny_lbm, resolution=32)
    t, sigma = head.sample_timesteps(400, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {250.0, 500.0, 750.0, 1000.0}  # the folder's selected_timesteps, equiprobable
    assert torch.equal(sigma, t / 1000)  # the flow-matching scheduler's sigma(t) = t/1000 (shift 1)
    only = BridgeHead(tiny_lbm, resolution=32, timesteps=[250, 750], timestep_probs=[0.0, 1.0])
    assert only.sample_timesteps(5)[1].tolist() == [0.75] * 5

    zs, z, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0), torch.ones(1, 1, 1, 1)
    for s, expected in ((0.25, 0.25 * 2 - 0.75 + 0.1 * (0.25 * 0.75) ** 0.5), (0.5, 0.5 + 0.1 * 0.5), (1.0, 2.0)):
        xt = bridge_interpolant(zs, z, torch.tensor(s).view(1, 1, 1, 1), eps, 0.1)
        assert xt.item() == pytest.approx(expected, abs=1e-6)
    mask = torch.ones(1, 1, 4, 4)
    mask[0, 0, 0, 1] = 0  # one invalid pixel hides its whole 2x2 latent cell, in every channel
    lat = latent_mask(mask, 2, 3)
    assert lat.shape == (1, 3, 2, 2) and lat[:, :, 0, 0].sum() == 0 and lat[:, :, 1].all() and lat[:, :, 0, 1].all()


def test_loss_equals_hand_computed_objective(tiny_lbm):
    """Same RNG draws, the objective written out: z = VAE(target), z_s = VAE(source), σ = t/1000,
    x_t = σ z_s + (1-σ) z + b √(σ(1-σ)) ε, loss = masked mean of (pred - (z_s - z))² (LBM's latent L2)."""
    head = BridgeHead(tiny_lbm, resolution=32, bridge_noise_sigma=0.2)
    batch = pairs()
    batch["mask"] = torch.ones(4, 1, 32, 32)
    batch["mask"][:, :, :8, :8] = 0
    loss, logs = head.bridge_loss(batch, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    sf = head.vae.config.scaling_factor
    with torch.no_grad():
        latents = []
        for key in ("target", "source"):
            dist = head.vae.encode(batch[key]).latent_dist
            latents.append((dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * sf)
        z, zs = latents
        t = torch.tensor([250.0, 500.0, 750.0, 1000.0])[torch.multinomial(torch.full((4,), 0.25), 4, True,
                                                                              generator=g)]
        sigma = (t / 1000).view(-1, 1, 1, 1)
        eps = torch.randn(z.shape, generator=g)
        xt = sigma * zs + (1 - sigma) * z + 0.2 * (sigma * (1 - sigma)).sqrt() * eps
        pred = head.denoiser(xt, t, encoder_hidden_states=None).sample
        m = torch.ones_like(z)
        m[:, :, :4, :4] = 0
        expected = ((pred * m - (zs - z) * m) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["latent_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_validation_loss_is_per_pair_and_each_pair_counts_once(tiny_lbm):
    """Validation gives each pair's loss (latent + pixel term) with its index, whose mean is the batch's loss with
    the same draws; the module averages them with each pair once (a repeated pair does not count twice)."""
    from lightning_lora.module import LoRAAdaptationModule

    head = BridgeHead(tiny_lbm, resolution=32, pixel_loss_type="l2", pixel_loss_weight=0.5, pixel_loss_max_size=16)
    batch = pairs(4)
    batch["index"] = torch.tensor([3, 4, 5, 5])  # the last pair repeats the third, as DDP's padding does
    batch["source"][3], batch["target"][3] = batch["source"][2], batch["target"][2]
    with torch.no_grad():
        out = head.validation_step(batch)
        same_draws, _ = head.bridge_loss(batch, torch.Generator().manual_seed(1234 + 3))
    assert out["loss"].shape == (4,) and out["index"].tolist() == [3, 4, 5, 5]
    assert out["loss"].mean().item() == pytest.approx(same_draws.item(), rel=1e-5)

    module = LoRAAdaptationModule(head, {"r": 2, "alpha": 2})
    once = out["loss"][:3].double().mean().item()
    assert validated_loss(module, [batch]) == pytest.approx(once, rel=1e-5)
    assert once != pytest.approx(out["loss"].double().mean().item(), rel=1e-4)


def test_sampler_is_the_flow_match_euler_scheduler(tiny_lbm):
    from diffusers import FlowMatchEulerDiscreteScheduler

    head = BridgeHead(tiny_lbm, resolution=32, bridge_noise_sigma=0.0)
    zs = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4))
    x = zs.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = head.denoiser(x, t.repeat(2), encoder_hidden_states=None).sample
            x = scheduler.step(pred, t, x, return_dict=False)[0]
        assert torch.allclose(head.bridge_sample(zs, 4), x, atol=1e-5)
        one = zs - head.denoiser(zs, torch.tensor([1000.0, 1000.0]), encoder_hidden_states=None).sample
        assert torch.allclose(head.bridge_sample(zs, 1), one, atol=1e-6)  # LBM's default: one step from σ=1


def test_pixel_loss_reaches_the_lora_and_missing_lpips_is_skipped(tiny_lbm, monkeypatch):
    import sys

    from lightning_lora.module import LoRAAdaptationModule

    head = BridgeHead(tiny_lbm, resolution=32, pixel_loss_type="l2", pixel_loss_weight=1.0, pixel_loss_max_size=16)
    module = LoRAAdaptationModule(head, {"r": 2, "alpha": 2, "init": "random"})
    loss, logs = head.bridge_loss(pairs(2), torch.Generator().manual_seed(0))
    assert set(logs) == {"latent_loss", "pixel_loss"}
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    monkeypatch.setitem(sys.modules, "lpips", None)  # `import lpips` raises ImportError
    with pytest.warns(UserWarning, match="the lpips package is not installed: training without the pixel term"):
        skipped = BridgeHead(tiny_lbm, resolution=32, pixel_loss_type="lpips", pixel_loss_weight=10.0)
    assert skipped.pixel_loss_weight == 0.0 and skipped.lpips is None
    assert set(skipped.bridge_loss(pairs(2))[1]) == {"latent_loss"}
    with pytest.raises(UserError, match="batch has no 'target' images"):
        skipped.bridge_loss({"source": torch.zeros(1, 3, 32, 32)})


# ---------------------------------------------------------------------------- paired shards
def test_paired_shards_share_one_crop_and_name_missing_fields(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        source = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        mask = np.zeros((12, 10, 3), dtype=np.uint8)
        mask[:, 5:] = 255
        samples.append({"__key__": f"{i:03d}", "source.png": png(source), "target.png": png(255 - source),
                        "mask.png": png(mask)})
    pattern = write_shards(samples, str(tmp_path / "p-%02d.tar"), per_shard=2)
    dm = PairedShardsDataModule(pattern, pattern, mask_key="mask.png", resolution=8, interpolation="nearest",
                                random_flip=True, batch_size=5)
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == (5, 3, 8, 8) and batch["mask"].shape == (5, 1, 8, 8)
    assert torch.allclose(batch["target"], -batch["source"], atol=1e-6)  # inverted source: one crop and flip
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    exact = PairedShardsDataModule(pattern, pattern, size=[6, 4], interpolation="nearest", batch_size=5)
    val = next(iter(exact.val_dataloader()))
    assert val["source"].shape == (5, 3, 6, 4) and val["index"].dtype == torch.long and "mask" not in val

    broken = write_shards([{"__key__": "x", "source.png": png(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))}],
                          str(tmp_path / "b-%d.tar"))
    with pytest.raises(UserError, match=r"b-0.tar: sample x has no image field \(target.jpg;target.png;.*it has "
                                        r"source.png"):
        next(iter(PairedShardsDataModule(broken, resolution=4).train_dataloader()))
    with pytest.raises(UserError, match=r"data.size=\[0, 4\]: height and width must be positive"):
        PairedShardsDataModule(pattern, size=[0, 4])


def test_digit_pairs_are_built_once_and_batch(tmp_path):
    train, val = write_digit_translation_shards(tmp_path, num_images=20, image_size=16, per_shard=8)
    assert train.endswith("train-{0000..0002}.tar") and val.endswith("validation-0000.tar")
    stamp = Path(val).stat().st_mtime_ns
    assert write_digit_translation_shards(tmp_path, num_images=20, image_size=16, per_shard=8) == (train, val)
    assert Path(val).stat().st_mtime_ns == stamp
    dm = DigitTranslationDataModule(str(tmp_path), num_images=20, image_size=16, per_shard=8, resolution=8,
                                    interpolation="nearest", batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    assert batch["source"].shape == (2, 3, 8, 8)
    assert torch.allclose(batch["target"], -batch["source"], atol=1e-6)  # the default target: inverted
    assert batch["source"][:, :, 0, 0].eq(1).all()  # dark ink on white paper
    with pytest.raises(UserError, match="data.transform='swirl' is unknown; valid: invert, blur, relight"):
        write_digit_translation_shards(tmp_path, transform="swirl")


# ---------------------------------------------------------------------------- the seed's workflow
def _lora_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from lightning_lora.adapters.io import normalize_keys

    return {k: v.detach().clone() for k, v in normalize_keys(state).items() if "lora_" in k}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_lbm, cache_dir):
    """tuned = base + known delta -> extract (rank 32, conv 16) -> validate -> fine-tune attn1/attn2/up_blocks."""
    from omegaconf import open_dict

    from lightning_lora.cli import main
    from lightning_lora.train import run

    root = tmp_path_factory.mktemp("workflow")
    tuned = root / "tuned"
    sizes = write_tuned_copy(tiny_lbm, tuned, decay=0.8)
    lora, report = root / "lora.safetensors", root / "report.csv"
    assert main(["extract", "--base", str(tiny_lbm), "--tuned", str(tuned), "--out", str(lora), "--rank", "32",
                 "--conv-rank", "16"]) == 0
    assert main(["validate", "--base", str(tiny_lbm), "--tuned", str(tuned), "--lora", str(lora),
                 "--report", str(report)]) == 0
    start = lora  # the extracted file as is: its denoiser.<path> names go to the head's denoiser
    cfg = compose_train([
        "model=lbm_tiny", f"model.pretrained={tiny_lbm}", "data=digits_pairs", f"paths.cache_dir={cache_dir}",
        "data.num_images=48", "data.batch_size=8", f"adapter.init_from={start}",
        "adapter.trainable=[attn1,attn2,up_blocks]", "trainer.max_steps=8", "trainer.precision=32-true",
        "optimizer.lr=1e-3", "scheduler.name=constant", "scheduler.warmup_ratio=0.0",
        "model.previews.every_n_steps=4", "model.previews.num_samples=2",
        "callbacks.adapter_checkpoint.every_n_steps=4", "callbacks.model_checkpoint.every_n_train_steps=4",
        "~callbacks.progress_bar"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
    metrics, objects = run(cfg)
    return {"root": root, "tuned": tuned, "sizes": sizes, "lora": lora, "report": report, "start": start,
            "metrics": metrics, "module": objects["module"], "run": root / "run"}


def test_extraction_error_is_the_known_optimum(workflow):
    from lightning_lora.adapters.formats import read_lora

    rows = list(csv.DictReader(workflow["report"].open()))
    sizes = workflow["sizes"]
    assert {r["module"] for r in rows} == {f"denoiser.{m}" for m in sizes}  # every changed denoiser weight
    for row in rows:
        shape = [int(x) for x in row["shape"].split("x")]
        rank = 16 if len(shape) == 4 and shape[2] * shape[3] > 1 else 32
        k = sizes[row["module"].removeprefix("denoiser.")]
        assert float(row["rel_error"]) == pytest.approx(optimal_error(k, rank, 0.8), abs=1e-4), row
    lora = read_lora(workflow["lora"])
    assert all(f.alpha == f.rank for f in lora.modules.values())  # alpha = the rank actually used (capped)
    layers = (workflow["root"] / "lora_layers.txt").read_text().split()
    assert layers == sorted(lora.modules)


def test_finetuning_changes_only_the_chosen_subset(workflow):
    from safetensors.torch import load_file

    from lightning_lora.adapters.io import read_adapter_file

    module, metrics = workflow["module"], workflow["metrics"]
    _, states, _ = read_adapter_file(workflow["start"])  # the extracted file: checkpoint names denoiser.<path>
    start = {k.replace("base_model.model.denoiser.", "base_model.model."): v
             for k, v in _lora_tensors(states[""]).items()}
    final = _lora_tensors(load_file(workflow["run"] / "adapters" / "final" / "denoiser" / "adapter_model.safetensors"))
    assert start.keys() == final.keys() and len(start) == 2 * 83
    chosen = [k for k in start if any(p in k for p in ("attn1", "attn2", "up_blocks"))]
    assert 0 < len(chosen) < len(start)
    for key, value in final.items():
        if key in chosen:
            assert not torch.equal(value, start[key]), key  # trained
        else:
            assert torch.equal(value, start[key]), key  # bit-identical
    # only the subset trains, also after the base-model previews ran with the adapters disabled (PEFT's
    # disable_adapter() re-enables gradients on every LoRA tensor), and the resumable checkpoint holds just it
    trainable = module.trainable_names()
    assert len(trainable) == len(chosen)
    assert all(any(p in n for p in ("attn1", "attn2", "up_blocks")) for n in trainable)
    ckpt = torch.load(workflow["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == trainable
    assert metrics["after"]["val/loss"] < metrics["before"]["val/loss"]
    assert set(metrics["after"]) == {"val/loss", "val/onestep_loss"}


def test_run_writes_previews_and_exports_that_fold_exactly(workflow, tiny_lbm, tmp_path):
    import shutil

    from lightning_lora.cli import main

    run, module = workflow["run"], workflow["module"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["base.png", "step_0000004.png",
                                                                 "step_0000008.png"]
    assert Image.open(run / "samples" / "base.png").size == (3 * 32 + 2 * 2, 2 * 32 + 2)  # source|prediction|target
    final = run / "adapters" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["denoiser", LBM_FILE]
    probe = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([250.0, 1000.0])
    module.eval()
    with torch.no_grad():
        expected = module.head.denoiser(probe, t, encoder_hidden_states=None).sample
    for source in (final, final / LBM_FILE, final / "denoiser"):
        denoiser = load_lbm(tiny_lbm).denoiser
        assert apply_lbm_loras(denoiser, [(source, 1.0)])[0].endswith("83 of 83 modules applied")
        with torch.no_grad():
            got = denoiser(probe, t, encoder_hidden_states=None).sample
        assert torch.allclose(got, expected, atol=1e-5), source
    # merged into the released layout, the official loader's keys take the adapted weights as they are
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(tiny_lbm / "config.yaml", merged / "config.yaml")
    assert main(["merge", "--base", str(tiny_lbm / "model.safetensors"), "--lora", str(final / LBM_FILE),
                 "--out", str(merged / "model.safetensors")]) == 0
    with torch.no_grad():
        got = load_lbm(merged).denoiser(probe, t, encoder_hidden_states=None).sample
    assert torch.allclose(got, expected, atol=1e-5)


def test_sample_cli_with_the_run_and_the_extracted_lora(workflow, tiny_lbm, tmp_path, capsys):
    from lightning_lora.cli import main

    source = tmp_path / "digit.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 24, dtype=np.uint8)[:, None, None], (1, 20, 3))).save(source)
    common = ["sample", "lbm", "--pretrained", str(tiny_lbm), "--source", str(source)]
    final = workflow["run"] / "adapters" / "final"
    assert main([*common, "--lora", str(final), "--scale", "1.0", "--out", str(tmp_path / "run.png")]) == 0
    assert main([*common, "--lora", str(workflow["lora"]), "--out", str(tmp_path / "extracted.png")]) == 0
    assert main(["sample", "lbm", "--pretrained", str(workflow["tuned"]), "--source", str(source),
                 "--out", str(tmp_path / "tuned.png")]) == 0
    assert main([*common, "--lora", f"{workflow['lora']}:0.0", "--out", str(tmp_path / "zero.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert "83 of 83 modules applied" in capsys.readouterr().out
    run, extracted, tuned, zero, base = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16)
                                         for n in ("run", "extracted", "tuned", "zero", "base"))
    assert run.shape == (24, 20, 3)
    assert np.abs(extracted - tuned).max() <= 2  # base + extracted LoRA ~ the tuned model (rank-truncated)
    assert np.array_equal(zero, base) and np.abs(run - base).mean() > 1
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 2  # no silent overwrite
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"blocks.0.to_qkv.lora_A.weight": torch.zeros(2, 8), "blocks.0.to_qkv.lora_B.weight": torch.zeros(24, 2)},
              foreign)
    assert main([*common, "--lora", str(foreign), "--out", str(tmp_path / "f.png")]) == 2
    assert "none of its 1 modules matches a denoiser layer" in capsys.readouterr().err


def test_init_from_takes_an_extracted_file_as_is(workflow, tiny_lbm):
    """The extracted file names modules as the checkpoint does (denoiser.<path>); init_from should give them to
    the head's denoiser with the prefix removed, as the CLI tools' name resolution does."""
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.module import LoRAAdaptationModule

    module = LoRAAdaptationModule(BridgeHead(tiny_lbm, resolution=32),
                                  AdapterSpec(init_from=str(workflow["lora"]), trainable=["attn1"]))
    assert module.trainable_names()


# ---------------------------------------------------------------------------- configs
def test_configs_compose_and_lbm_needs_a_folder(tmp_path, cache_dir):
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from lightning_lora.train import run

    cfg = compose_train(["model=lbm", "data=digits_pairs", f"paths.cache_dir={cache_dir}"])
    assert cfg.model.frozen_dtype == "bfloat16" and cfg.data.resolution == 512
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match="model.pretrained=jasperai/LBM_relighting: not in the Hugging Face cache"):
        run(cfg)
    cfg = compose_train(["experiment=lbm_tiny_digits", f"paths.cache_dir={cache_dir}", "data.num_images=16"])
    assert cfg.data.resolution == 32 and cfg.model.previews.every_n_steps == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about in the demo's head
        head = instantiate(cfg.model)
    assert isinstance(head, BridgeHead) and Path(head.pretrained) == cache_dir / "lbm_tiny"
    pattern = write_shards([{"__key__": "a", "source.jpg": png(np.zeros((8, 8, 3), np.uint8)),
                             "target.jpg": png(np.zeros((8, 8, 3), np.uint8))}], str(tmp_path / "c-%d.tar"))
    data = instantiate(compose_train(["data=paired_shards", f"data.train_shards={pattern}"]).data)
    assert next(iter(data.train_dataloader()))["source"].shape == (1, 3, 512, 512)


def test_the_public_lbm_scripts_lora_files_are_read(workflow, tmp_path):
    """``denoiser.<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (the seed's files) read with
    their alphas, so every tool (inspect, merge, sample) takes them."""
    from safetensors.torch import save_file

    from lightning_lora.adapters.formats import read_lora

    extracted = read_lora(workflow["lora"])
    tensors = {}
    for name, f in extracted.modules.items():
        tensors[f"{name}.lora_down.weight"] = f.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = f.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(2.0 * f.rank)  # alpha = 2r: scale 2
    seed_file = tmp_path / "seed_lora.safetensors"
    save_file(tensors, seed_file)
    lora = read_lora(seed_file)
    assert lora.format == "kohya_dotted" and set(lora.modules) == set(extracted.modules)
    name = next(iter(lora.modules))
    plain = extracted.modules[name].delta() / extracted.modules[name].scale  # B·A without the scale
    assert torch.allclose(lora.modules[name].delta(), 2.0 * plain)
