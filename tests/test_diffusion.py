"""Stable Diffusion family: the tiny diffusers folder, the objective against hand-computed numbers, training
with UNet/text-encoder/conv LoRA, and the three export formats loaded by plain diffusers and PEFT."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose_train
from helpers import image_batches, validated_loss

from lightning_lora.errors import UserError
from lightning_lora.heads.diffusion import (
    DIFFUSERS_FILE,
    KOHYA_FILE,
    SEED_STATE_FILE,
    DiffusionHead,
    apply_loras,
    min_snr_weights,
)
from lightning_lora.models.sd_tiny import ensure_tiny_sd
from lightning_lora.module import LoRAAdaptationModule
from lightning_lora.train import run

pytest.importorskip("diffusers")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return Path(ensure_tiny_sd(tmp_path_factory.mktemp("sd") / "sd_tiny"))


def fit(module: LoRAAdaptationModule, steps: int, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, image_batches())
    return trainer


def fresh_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


PROBE = {"x": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), "t": torch.tensor([10, 700])}


@torch.no_grad()
def outputs(unet, text_encoder, tokenizer_head: DiffusionHead) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer_head.tokenize(["a handwritten digit 3", "zero"])
    hidden = text_encoder(ids)[0]
    return hidden, unet(PROBE["x"], PROBE["t"], hidden).sample


# ---------------------------------------------------------------------------- folder and errors
def test_tiny_folder_is_a_real_pipeline_and_is_reused(tiny_sd):
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd / part).exists()
    stamp = (tiny_sd / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_sd(tiny_sd) == str(tiny_sd)
    assert (tiny_sd / "model_index.json").stat().st_mtime_ns == stamp
    pipe = fresh_pipeline(tiny_sd)
    assert pipe.tokenizer("a digit").input_ids[0] == pipe.tokenizer.bos_token_id


def test_bad_pipeline_folders(tmp_path, tiny_sd):
    with pytest.raises(UserError, match="model.pretrained is required"):
        DiffusionHead(None)
    with pytest.raises(UserError, match="no folder at"):
        DiffusionHead(tmp_path / "nope")
    partial = tmp_path / "partial"
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (partial / part).mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no scheduler/ folder"):
        DiffusionHead(partial)
    with pytest.raises(UserError, match="not divisible by the VAE's downscale factor 2"):
        DiffusionHead(tiny_sd, resolution=33)
    with pytest.raises(UserError, match="prediction_type='sample' is unknown"):
        DiffusionHead(tiny_sd, prediction_type="sample")


# ---------------------------------------------------------------------------- objective
def test_min_snr_weights_hand_computed():
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_equals_hand_computed_objective(tiny_sd, prediction_type):
    """Same RNG draws, the objective written out: x_t = √ᾱ·x0 + √(1-ᾱ)·ε, v = √ᾱ·ε − √(1-ᾱ)·x0, min-SNR-5."""
    head = DiffusionHead(tiny_sd, resolution=32, prediction_type=prediction_type, snr_gamma=5.0, noise_offset=0.1)
    batch = next(iter(image_batches(n=4, batch_size=4)))
    loss = head.diffusion_loss(batch, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        dist = head.vae.encode(batch["pixel_values"]).latent_dist
        x0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * head.vae.config.scaling_factor
        eps = torch.randn(x0.shape, generator=g) + 0.1 * torch.randn((4, 4, 1, 1), generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        abar = head.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        target = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
        hidden = head.text_encoder(head.tokenize(batch["text"]))[0]
        pred = head.unet(x_t, t, hidden).sample
        snr = (abar / (1 - abar)).flatten()
        w = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
        expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_validation_loss_counts_each_image_once(tiny_sd):
    """Validation gives one loss per image with its index; the module averages them with each image once, so the
    repeat that fills a single-bucket batch (or evens out processes) does not count twice."""
    from lightning_lora.adapters import AdapterSpec

    head = DiffusionHead(tiny_sd, resolution=32, snr_gamma=5.0)
    batch = next(iter(image_batches(n=4, batch_size=4)))
    batch = {**batch, "index": torch.tensor([5, 6, 7, 7])}  # the last row repeats the third, as a padded bucket
    batch["pixel_values"][3] = batch["pixel_values"][2]
    batch["text"][3] = batch["text"][2]
    out = head.validation_step(batch)
    assert out["loss"].shape == (4,) and out["index"].tolist() == [5, 6, 7, 7]
    same_draws = head.diffusion_loss(batch, torch.Generator().manual_seed(1234 + 5))  # the batch mean, as before
    assert out["loss"].mean().item() == pytest.approx(same_draws.item(), rel=1e-6)

    module = LoRAAdaptationModule(head, AdapterSpec(r=4, alpha=4))
    once = out["loss"][:3].double().mean().item()
    assert validated_loss(module, [batch]) == pytest.approx(once, rel=1e-6)
    assert once != pytest.approx(out["loss"].double().mean().item(), rel=1e-3)


def test_latent_and_text_caches_are_exact(tiny_sd):
    batch = next(iter(image_batches(n=4, batch_size=4)))
    plain = DiffusionHead(tiny_sd, resolution=32, cache_latents=False, cache_text_embeddings=False)
    cached = DiffusionHead(tiny_sd, resolution=32, cache_latents=True, cache_text_embeddings=True)
    first = cached.diffusion_loss(batch, torch.Generator().manual_seed(1))  # fills the caches
    again = cached.diffusion_loss(batch, torch.Generator().manual_seed(1))  # served from them
    reference = plain.diffusion_loss(batch, torch.Generator().manual_seed(1))
    assert len(cached._latent_cache) == 4 and len(cached._text_cache) == 4
    assert first.item() == pytest.approx(reference.item(), rel=1e-6)
    assert again.item() == pytest.approx(reference.item(), rel=1e-6)


# ---------------------------------------------------------------------------- training and exports
@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """UNet attention + conv LoRA and text-encoder LoRA, alpha != r everywhere, trained 6 steps and exported."""
    head = DiffusionHead(tiny_sd, resolution=32, train_text_encoder=True, cache_latents=True)
    base = outputs(head.unet, head.text_encoder, head)
    frozen = {k: v.clone() for k, v in head.unet.state_dict().items()}
    spec = {"r": 4, "alpha": 6, "conv_rank": 2, "conv_alpha": 3, "init": "gaussian",
            "per_submodule": {"text_encoder": {"r": 2, "alpha": 5, "lr": 1e-3}}}
    module = LoRAAdaptationModule(head, spec, optimizer=lambda ps: torch.optim.AdamW(ps, lr=5e-3),
                                  scheduler={"name": "constant"})
    fit(module, 6)
    out = tmp_path_factory.mktemp("export") / "final"
    module.save_adapters(out, step=6)
    module.eval()
    return {"module": module, "head": head, "dir": out, "base": base, "frozen": frozen,
            "tuned": outputs(head.unet, head.text_encoder, head)}


def test_training_changes_only_lora_and_every_factor(trained):
    module, head = trained["module"], trained["head"]
    lora_b = {n: p for n, p in module.named_parameters() if "lora_B" in n}
    assert any(".conv1." in n for n in lora_b) and any("text_encoder" in n for n in lora_b)
    assert all(p.abs().sum() > 0 for p in lora_b.values())
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    state = head.unet.state_dict()
    for key, value in trained["frozen"].items():  # PEFT renames a wrapped layer's weight to base_layer.weight
        wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        now = state.get(key, state.get(wrapped))
        assert torch.equal(now, value), key
    hidden, pred = trained["tuned"]
    assert not torch.allclose(hidden, trained["base"][0]) and not torch.allclose(pred, trained["base"][1])


def test_per_submodule_rank_alpha_and_lr(trained):
    module = trained["module"]
    te = module.adapters["text_encoder"].peft_config["default"]
    unet = module.adapters["unet"].peft_config["default"]
    assert (te.r, te.lora_alpha, unet.r, unet.lora_alpha) == (2, 5, 4, 6)
    # 3x3 convolutions take conv_rank/conv_alpha; the 1x1 conv_shortcut the linear ones (as kohya's conv_dim)
    assert unet.rank_pattern == {"conv1": 2, "conv2": 2, "conv": 2}
    assert unet.alpha_pattern == {"conv1": 3, "conv2": 3, "conv": 3}
    lrs = sorted(g["lr"] for g in module.optimizers().optimizer.param_groups)
    assert lrs == [1e-3, 5e-3]


@pytest.mark.parametrize("weight_name", [DIFFUSERS_FILE, KOHYA_FILE])
def test_exports_load_in_plain_diffusers_exactly(trained, tiny_sd, weight_name):
    pipe = fresh_pipeline(tiny_sd)
    pipe.load_lora_weights(trained["dir"], weight_name=weight_name)
    hidden, pred = outputs(pipe.unet, pipe.text_encoder, trained["head"])
    ref_hidden, ref_pred = trained["tuned"]
    assert torch.allclose(hidden, ref_hidden, atol=1e-5)
    assert torch.allclose(pred, ref_pred, atol=1e-5)


def test_kohya_file_names_alphas_and_metadata(trained):
    import json

    from safetensors import safe_open

    with safe_open(trained["dir"] / KOHYA_FILE, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alpha_q = f.get_tensor("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
        alpha_conv = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
        alpha_te = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
        te_keys = [k for k in keys if k.startswith("lora_te_")]
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert te_keys and all(k.startswith("lora_te_text_model_") for k in te_keys)  # the name every tool uses
    assert (float(alpha_q), float(alpha_conv), float(alpha_te)) == (6.0, 3.0, 5.0)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "6")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 2, "conv_alpha": 3}


def test_peft_directories_load_with_plain_peft(trained, tiny_sd):
    from peft import PeftModel

    pipe = fresh_pipeline(tiny_sd)
    unet = PeftModel.from_pretrained(pipe.unet, trained["dir"] / "unet")
    te = PeftModel.from_pretrained(pipe.text_encoder, trained["dir"] / "text_encoder")
    hidden, pred = outputs(unet, te, trained["head"])
    assert torch.allclose(hidden, trained["tuned"][0], atol=1e-5)
    assert torch.allclose(pred, trained["tuned"][1], atol=1e-5)


def test_apply_loras_folds_every_format_and_refuses_foreign_files(trained, tiny_sd, tmp_path):
    pipe = fresh_pipeline(tiny_sd)
    # half of the adapter from each format: weights add up to the adapter as trained
    reports = apply_loras(pipe, [(trained["dir"], 0.5), (trained["dir"] / KOHYA_FILE, 0.5)])
    assert all(r.endswith("of 63 modules applied") for r in reports), reports
    hidden, pred = outputs(pipe.unet, pipe.text_encoder, trained["head"])
    assert torch.allclose(hidden, trained["tuned"][0], atol=1e-4)
    assert torch.allclose(pred, trained["tuned"][1], atol=1e-4)

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"blocks.0.attn.to_qkv.lora_A.weight": torch.zeros(2, 8),
               "blocks.0.attn.to_qkv.lora_B.weight": torch.zeros(24, 2)}, foreign)
    with pytest.raises(UserError, match="none of its 1 modules matches"):
        apply_loras(fresh_pipeline(tiny_sd), [(foreign, 1.0)])
    partial = tmp_path / "partial.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2),
               "unet.nowhere.to_q.lora_A.weight": torch.zeros(2, 64),
               "unet.nowhere.to_q.lora_B.weight": torch.zeros(64, 2)}, partial)
    with pytest.raises(UserError, match="only 1 of 2 modules match"):
        apply_loras(fresh_pipeline(tiny_sd), [(partial, 1.0)])
    assert "1 of 2 modules applied" in apply_loras(fresh_pipeline(tiny_sd), [(partial, 1.0)], allow_partial=True)[0]


def test_previews_written_for_base_and_steps(tiny_sd, tmp_path):
    from PIL import Image

    from lightning_lora.callbacks import SamplePreviews

    head = DiffusionHead(tiny_sd, resolution=32, cache_latents=True,
                         previews={"prompts": ["a handwritten digit 3", "a handwritten digit 7"], "seeds": [0, 1, 2],
                                   "num_inference_steps": 3, "guidance_scale": 2.0})
    module = LoRAAdaptationModule(head, {"r": 4, "alpha": 4, "init": "random"}, scheduler={"name": "constant"})
    fit(module, 2, [SamplePreviews(tmp_path / "samples", every_n_steps=1, final=True)])
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["base.png", "step_0000001.png", "step_0000002.png"]
    grid = Image.open(tmp_path / "samples" / "base.png")
    assert grid.size == (3 * 32 + 2 * 2, 2 * 32 + 2)  # a column per seed, a row per prompt, 2 px gaps
    base = torch.tensor(list(grid.getdata()), dtype=torch.float32)
    final = torch.tensor(list(Image.open(tmp_path / "samples" / "step_0000002.png").getdata()), dtype=torch.float32)
    assert (base - final).abs().mean() > 0.5  # the (random-init) adapter changes the pictures


def test_frozen_dtype_keeps_lora_fp32(tiny_sd):
    head = DiffusionHead(tiny_sd, resolution=32, frozen_dtype="bfloat16")
    module = LoRAAdaptationModule(head, {"r": 4, "alpha": 4})
    assert head.unet.conv_in.weight.dtype == torch.bfloat16
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # a 32-true run (no autocast) over the bf16 UNet: the head hands the UNet its own dtype
    batch = next(iter(image_batches(n=2, batch_size=2)))
    head.diffusion_loss(batch, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    with pytest.raises(UserError, match="frozen_dtype='fp8' is unknown"):
        DiffusionHead(tiny_sd, frozen_dtype="fp8")


def test_channels_last_is_only_a_memory_layout(tiny_sd):
    batch = next(iter(image_batches(n=2, batch_size=2)))
    plain = DiffusionHead(tiny_sd, resolution=32)
    nhwc = DiffusionHead(tiny_sd, resolution=32, channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    same = [h.diffusion_loss(batch, torch.Generator().manual_seed(3)) for h in (plain, nhwc)]
    assert same[1].item() == pytest.approx(same[0].item(), rel=1e-4)


def test_conv_rank_needs_a_convolution(tiny_sd):
    head = DiffusionHead(tiny_sd, resolution=32, conv_targets=[])
    with pytest.raises(UserError, match="conv_rank=2: no adapted submodule"):
        LoRAAdaptationModule(head, {"r": 4, "alpha": 4, "conv_rank": 2})
    with pytest.raises(UserError, match="per_submodule.text_encoder.r=0 must be a positive integer"):
        LoRAAdaptationModule(DiffusionHead(tiny_sd, resolution=32, train_text_encoder=True),
                             {"r": 4, "per_submodule": {"text_encoder": {"r": 0}}})


def test_sample_cli_weights_add_up(trained, tiny_sd, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from lightning_lora.cli import main

    common = ["sample", "sd", "--pretrained", str(tiny_sd), "--prompt", "a handwritten digit 3", "--steps", "4",
              "--seed", "3"]
    final = trained["dir"]
    assert main([*common, "--lora", str(final), "--out", str(tmp_path / "one.png")]) == 0
    assert main([*common, "--lora", f"{final}:0.5", "--lora", f"{final / KOHYA_FILE}:0.5",
                 "--out", str(tmp_path / "halves.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    one, halves, base = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("one", "halves",
                                                                                                 "base"))
    assert one.shape == (32, 32, 3)
    assert np.abs(one - halves).max() <= 1  # the same adapter, as two halves in two formats
    assert np.abs(one - base).mean() > 2  # the adapter changes the picture
    assert main([*common, "--lora", str(final), "--out", str(tmp_path / "one.png")]) == 2  # no silent overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------- through Hydra
def test_train_entry_on_digits_writes_every_format_and_previews(tiny_sd, cache_dir, tmp_path):
    from omegaconf import open_dict
    from safetensors import safe_open


    cfg = compose_train(["experiment=sd_tiny_digits", f"model.pretrained={tiny_sd}", f"paths.cache_dir={cache_dir}",
                         "trainer.max_steps=4", "data.num_images=40",
                         "data.batch_size=4", "model.previews.every_n_steps=2", "model.previews.seeds=[0]",
                         "model.previews.num_inference_steps=2", "callbacks.adapter_checkpoint.every_n_steps=2",
                         "callbacks.model_checkpoint.every_n_train_steps=2", "~callbacks.progress_bar"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics, _ = run(cfg)
    out = tmp_path / "run"
    assert metrics["global_step"] == 4 and set(metrics["after"]) == {"val/loss"}
    for snapshot in ("step_0000002", "final"):
        names = sorted(p.name for p in (out / "adapters" / snapshot).iterdir())
        assert names == sorted([DIFFUSERS_FILE, KOHYA_FILE, SEED_STATE_FILE, "unet"])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["base.png", "step_0000002.png",
                                                                  "step_0000004.png"]
    assert (out / "checkpoints" / "last.ckpt").is_file()  # its keys: test_families.py (sd_tiny)
    with safe_open(out / "adapters" / "final" / DIFFUSERS_FILE, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    assert (out / "tensorboard").exists()


def test_sd15_without_a_folder_is_one_line(tmp_path):
    from omegaconf import open_dict


    cfg = compose_train(["model=sd15", "data=digits"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    # the released preset names SD 1.5 on the Hub; offline with an empty cache that is one line saying how to fetch it
    with pytest.raises(UserError, match=r"model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5: not in the "
                                        r"Hugging Face cache .* offline .* hf download stable-diffusion-v1-5/"):
        run(cfg)
