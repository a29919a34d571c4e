"""Stable Diffusion XL: the tiny SDXL folder, the conditioning against diffusers' own ``encode_prompt`` and the
size/crop ids by hand, the VAE's float16 quirk, and one short ``model=sdxl_tiny`` run through Hydra on a folder of
three aspect ratios with buckets and caption dropout whose exports load in ``StableDiffusionXLPipeline`` with the
trained module's outputs (diffusers and kohya files, PEFT directories), previews, and ``lightning-lora sample sdxl``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from omegaconf import open_dict
from PIL import Image

from lightning_lora.callbacks.ema import LoRAEMA
from lightning_lora.errors import UserError
from lightning_lora.heads.diffusion import DIFFUSERS_FILE, KOHYA_FILE
from lightning_lora.heads.sdxl import SDXLHead, sdxl_pipeline_files
from lightning_lora.models.sd_tiny import ensure_tiny_sd
from lightning_lora.models.sdxl_tiny import ensure_tiny_sdxl
from lightning_lora.train import run

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a handwritten digit 3", "zero"]
PROBE_X = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(3))  # a 24x40 (wide) bucket's latents
PROBE_T = torch.tensor([10, 700])
PROBE_IDS = torch.tensor([[64.0, 128.0, 0.0, 8.0, 24.0, 40.0], [40.0, 40.0, 4.0, 0.0, 24.0, 40.0]])
SIZES = {"w0": (64, 32), "w1": (80, 40), "w2": (96, 48), "s0": (40, 40), "s1": (48, 48), "s2": (36, 36),
         "t0": (32, 64), "t1": (36, 72), "t2": (40, 80)}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return Path(ensure_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl_tiny"))


def fresh_pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


@torch.no_grad()
def outputs(unet, text_encoder, text_encoder_2, head: SDXLHead) -> tuple[torch.Tensor, ...]:
    """Both encoders' outputs as SDXL uses them, and the UNet's prediction on the probe."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((head.tokenizer, text_encoder), (head.tokenizer_2, text_encoder_2)):
        ids = tokenizer(PROMPTS, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    states = torch.cat(hidden, dim=-1)
    pred = unet(PROBE_X, PROBE_T, states, added_cond_kwargs={"text_embeds": pooled, "time_ids": PROBE_IDS}).sample
    return states, pooled, pred


def max_difference(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- folder, errors, conditioning
def test_tiny_folder_is_an_sdxl_pipeline(tiny_sdxl, tmp_path) -> None:
    for part in ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                 "scheduler"):
        assert (tiny_sdxl / part).exists()
    stamp = (tiny_sdxl / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_sdxl(tiny_sdxl) == str(tiny_sdxl)  # reused, not rebuilt
    assert (tiny_sdxl / "model_index.json").stat().st_mtime_ns == stamp
    pipe = fresh_pipeline(tiny_sdxl)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.vae.config.force_upcast
    with pytest.raises(UserError, match=r"has no text_encoder_2/ folder; a Stable Diffusion XL pipeline folder"):
        SDXLHead(ensure_tiny_sd(tmp_path / "sd"))
    with pytest.raises(UserError, match=r"^model.pretrained is required: .*stabilityai/stable-diffusion-xl-base-1.0"):
        SDXLHead(None)
    # only what the head reads is fetched from the Hub: no other variant, .bin, ONNX or single-file checkpoint
    assert sdxl_pipeline_files("fp16") == (
        "model_index.json", "*/*.json", "tokenizer/*", "tokenizer_2/*", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors")


def test_conditioning_is_diffusers_own_and_time_ids_by_hand(tiny_sdxl) -> None:
    head = SDXLHead(tiny_sdxl, resolution=32)
    hidden, pooled = head.encode_text(PROMPTS)
    want, _, want_pooled, _ = fresh_pipeline(tiny_sdxl).encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert hidden.shape == (2, 32, 64) and pooled.shape == (2, 32)
    assert torch.allclose(hidden, want, atol=1e-6) and torch.allclose(pooled, want_pooled, atol=1e-6)
    assert set(head._text_cache) == set(PROMPTS)  # cached per caption
    dropped, _ = head.encode_text(["", PROMPTS[0], ""])  # caption dropout's empty prompt: encoded once, reused
    assert set(head._text_cache) == {*PROMPTS, ""} and torch.equal(dropped[0], dropped[2])
    batch = {"pixel_values": torch.zeros(2, 3, 24, 40), "text": PROMPTS, "original_size": torch.tensor([[64, 128],
             [40, 40]]), "crop_top_left": torch.tensor([[0, 8], [4, 0]])}
    assert torch.equal(head.time_ids(batch), PROBE_IDS)  # original (h, w), crop (top, left), target (h, w)
    plain = {"pixel_values": batch["pixel_values"], "text": PROMPTS}
    assert head.time_ids(plain).tolist() == [[24, 40, 0, 0, 24, 40]] * 2  # no crop recorded: uncropped
    head.micro_conditioning = False
    assert head.time_ids(batch).tolist() == [[24, 40, 0, 0, 24, 40]] * 2
    _, extra = head.conditioning(batch)
    assert set(extra["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    assert torch.isfinite(head.diffusion_loss(batch, torch.Generator().manual_seed(0)))


def in_hub_cache(repo_id: str, folder: Path) -> str:
    """``folder`` as the cached snapshot of ``repo_id`` (the tests run offline against a private cache)."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    commit = "5" * 40
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return repo_id


def test_float16_keeps_sdxls_vae_in_float32_unless_replaced(tiny_sdxl) -> None:
    head = SDXLHead(tiny_sdxl, resolution=32, frozen_dtype="float16")
    assert head.unet.dtype == head.text_encoder_2.dtype == torch.float16 and head.vae.dtype == torch.float32
    # both by Hub id, as model=sdxl model.vae=madebyollin/sdxl-vae-fp16-fix names them: the replacement is cast
    base, vae = in_hub_cache("test-org/sdxl-tiny", tiny_sdxl), in_hub_cache("test-org/vae-fix", tiny_sdxl / "vae")
    fixed = SDXLHead(base, resolution=32, frozen_dtype="float16", vae=vae)
    assert fixed.vae.dtype == torch.float16 and fixed.base_model_identity()["path"] == base


# ---------------------------------------------------------------------------- a run through Hydra
@pytest.fixture(scope="module")
def xl_run(tiny_sdxl, tmp_path_factory) -> dict:
    """``model=sdxl_tiny`` on nine images in three aspect ratios: buckets, caption dropout, LoRA in the UNet and
    both text encoders, an EMA of the LoRA weights, 3 steps, a final preview."""
    folder = tmp_path_factory.mktemp("three_ratios")
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name[0]} picture, red, blue")
    out = tmp_path_factory.mktemp("xl") / "run"
    cfg = compose_train([
        "model=sdxl_tiny", f"model.pretrained={tiny_sdxl}", "data=image_folder", f"data.train_dir={folder}",
        "data.val_fraction=0", "data.batch_size=2", "data.buckets.enabled=true", "data.buckets.step=8",
        "data.caption_dropout=0.3", "data.random_flip=true", "model.train_text_encoder=true", "adapter.alpha=6",
        "optimizer.lr=5e-3", "trainer.max_steps=3", "trainer.precision=32-true", "validate_before=false",
        "validate_after=false", "~callbacks.progress_bar", "model.previews.seeds=[0]",
        "model.previews.num_inference_steps=2", "callbacks.ema.enabled=true", "callbacks.ema.decay=0.5",
        f"paths.cache_dir={out.parent / 'cache'}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    metrics, objects = run(cfg)
    module = objects["module"].eval()
    head = objects["head"]
    ema = next(c for c in objects["trainer"].callbacks if isinstance(c, LoRAEMA))
    with ema.applied(module):
        averaged = outputs(head.unet, head.text_encoder, head.text_encoder_2, head)
    return {"metrics": metrics, "dir": out, "final": out / "adapters" / "final", "head": head, "module": module,
            "data": objects["datamodule"], "tuned": outputs(head.unet, head.text_encoder, head.text_encoder_2, head),
            "averaged": averaged}


def test_run_trains_with_buckets_and_writes_every_file(xl_run, tiny_sdxl) -> None:
    assert xl_run["metrics"]["global_step"] == 3
    data = xl_run["data"]
    assert sorted(set(data.train_set.buckets)) == [(24, 40), (32, 32), (40, 24)] and data.captions.dropout == 0.3
    assert sorted(p.name for p in xl_run["final"].iterdir()) == sorted(
        [DIFFUSERS_FILE, KOHYA_FILE, "unet", "text_encoder", "text_encoder_2"])
    assert sorted(p.name for p in (xl_run["dir"] / "samples").iterdir()) == ["base.png", "step_0000003.png"]
    lora_b = {n: p for n, p in xl_run["module"].named_parameters() if "lora_B" in n}
    assert {n.split(".")[1] for n in lora_b} >= {"unet", "text_encoder", "text_encoder_2"}
    # every factor trained but those of the first encoder's last layer: SDXL reads its penultimate hidden states
    # (the second encoder's last layer feeds the pooled projection)
    untouched = {n for n, p in lora_b.items() if not p.abs().sum() > 0}
    assert untouched and all(".text_encoder." in n and ".layers.1." in n for n in untouched), untouched
    base = outputs(*(getattr(fresh_pipeline(tiny_sdxl), k) for k in ("unet", "text_encoder", "text_encoder_2")),
                   xl_run["head"])
    assert max_difference(base, xl_run["tuned"]) > 1e-3


@pytest.mark.parametrize("weight_name", [DIFFUSERS_FILE, KOHYA_FILE])
def test_exports_load_in_stable_diffusion_xl_pipeline_exactly(xl_run, tiny_sdxl, weight_name) -> None:
    pipe = fresh_pipeline(tiny_sdxl)
    pipe.load_lora_weights(xl_run["final"], weight_name=weight_name)
    got = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, xl_run["head"])
    difference = max_difference(got, xl_run["tuned"])
    print(f"{weight_name}: max |StableDiffusionXLPipeline.load_lora_weights - trained module| = {difference:.3g}")
    assert difference < 1e-5


@pytest.mark.parametrize("weight_name", [DIFFUSERS_FILE, KOHYA_FILE])
def test_the_ema_snapshot_loads_in_stable_diffusion_xl_pipeline_as_the_average(xl_run, tiny_sdxl, weight_name):
    pipe = fresh_pipeline(tiny_sdxl)
    pipe.load_lora_weights(xl_run["dir"] / "adapters" / "final_ema", weight_name=weight_name)
    got = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, xl_run["head"])
    difference = max_difference(got, xl_run["averaged"])
    print(f"final_ema/{weight_name}: max |load_lora_weights - the EMA weights| = {difference:.3g}")
    assert difference < 1e-5
    assert max_difference(xl_run["averaged"], xl_run["tuned"]) > 1e-4  # the average is not the last weights


def test_kohya_and_diffusers_names_are_sdxls(xl_run) -> None:
    from safetensors import safe_open

    with safe_open(xl_run["final"] / KOHYA_FILE, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split("_text_model_")[0] if "_text_model_" in k else k[:len("lora_unet_")] for k in keys}
    assert prefixes == {"lora_unet_", "lora_te1", "lora_te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    with safe_open(xl_run["final"] / DIFFUSERS_FILE, "pt") as f:
        heads = {k.split(".")[0] for k in list(f.keys())}
    assert heads == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.slow
def test_peft_directories_load_with_plain_peft(xl_run, tiny_sdxl) -> None:
    from peft import PeftModel

    pipe = fresh_pipeline(tiny_sdxl)
    parts = [PeftModel.from_pretrained(getattr(pipe, name), xl_run["final"] / name)
             for name in ("unet", "text_encoder", "text_encoder_2")]
    assert max_difference(outputs(*parts, xl_run["head"]), xl_run["tuned"]) < 1e-5


def test_sample_sdxl_cli_folds_the_lora(xl_run, tiny_sdxl, tmp_path) -> None:
    from lightning_lora.cli import main

    common = ["sample", "sdxl", "--pretrained", str(tiny_sdxl), "--prompt", "a w picture", "--steps", "2",
              "--resolution", "32", "--seed", "1"]
    assert main([*common, "--lora", f"{xl_run['final'] / KOHYA_FILE}:1.0", "--out", str(tmp_path / "lora.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    lora, base = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("lora", "base"))
    assert lora.shape == (32, 32, 3)
    assert np.abs(lora - base).mean() > 1  # the adapter changes the picture


def test_sample_sdxl_without_a_folder_is_one_line(tmp_path, capsys) -> None:
    from helpers import assert_one_error_line

    from lightning_lora.cli import main

    rc = main(["sample", "sdxl", "--pretrained", str(tmp_path / "nope"), "--prompt", "x", "--out",
               str(tmp_path / "x.png")])
    assert_one_error_line(rc, capsys.readouterr().err, "--pretrained", case="no folder")
    assert not (tmp_path / "x.png").exists()


def test_sdxl_presets_ask_the_data_for_crop_coordinates() -> None:
    assert compose_train(["model=sdxl", "data.train_dir=/x"]).data.crop_coords is True
    assert compose_train(["model=sdxl_tiny", "data=image_folder", "model.micro_conditioning=false"]).data.crop_coords \
        is False
    sd15 = compose_train(["model=sd15"]).data
    assert sd15.crop_coords is False and sd15.buckets.enabled is False and sd15.caption_dropout == 0.0


@pytest.mark.slow
def test_sdxl_dora_exports_load_in_stable_diffusion_xl_pipeline(tiny_sdxl, tmp_path) -> None:
    """Issue 19 item 8 for SDXL: the SD head's DoRA export (magnitude vectors in the diffusers file, no kohya
    file) holds for two text encoders too."""
    from safetensors.torch import load_file

    folder = tmp_path / "square"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    out = tmp_path / "run"
    cfg = compose_train([
        "model=sdxl_tiny", f"model.pretrained={tiny_sdxl}", "data=image_folder", f"data.train_dir={folder}",
        "data.val_fraction=0", "data.batch_size=2", "model.train_text_encoder=true", "adapter.dora=true",
        "adapter.alpha=6", "optimizer.lr=5e-3", "trainer.max_steps=2", "trainer.precision=32-true",
        "validate_before=false", "validate_after=false", "~callbacks.progress_bar", "model.previews.prompts=[]",
        f"paths.cache_dir={tmp_path / 'cache'}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    _, objects = run(cfg)
    head = objects["head"]
    objects["module"].eval()
    tuned = outputs(head.unet, head.text_encoder, head.text_encoder_2, head)
    final = out / "adapters" / "final"
    assert not (final / KOHYA_FILE).exists()
    keys = load_file(final / DIFFUSERS_FILE).keys()
    assert {k.split(".")[0] for k in keys if k.endswith("lora_magnitude_vector.weight")} >= {"unet", "text_encoder_2"}
    pipe = fresh_pipeline(tiny_sdxl)
    pipe.load_lora_weights(final, weight_name=DIFFUSERS_FILE)
    difference = max_difference(outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, head), tuned)
    print(f"SDXL DoRA: max |StableDiffusionXLPipeline.load_lora_weights - trained module| = {difference:.3g}")
    assert difference < 1e-5
