"""DoRA (``adapter.dora=true``) per family: the Stable Diffusion exports carry the magnitude vectors and load in
plain diffusers/PEFT with the trained module's outputs; the embedding model/ directory loads in PEFT likewise;
LBM and TRELLIS, whose files have no place for them, refuse it in one line before anything loads."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_one_error_line, image_batches, train_main
from safetensors.torch import load_file

from lightning_lora.errors import UserError
from lightning_lora.heads.diffusion import DIFFUSERS_FILE, KOHYA_FILE, SEED_STATE_FILE, DiffusionHead
from lightning_lora.models.sd_tiny import ensure_tiny_sd
from lightning_lora.module import LoRAAdaptationModule

PROBE = {"x": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), "t": torch.tensor([10, 700])}


@pytest.fixture(scope="module")
def tiny_sd(cache_dir) -> Path:
    return Path(ensure_tiny_sd(cache_dir / "sd_tiny"))  # where model=sd_tiny runs of this session build it


@torch.no_grad()
def outputs(unet, text_encoder, head: DiffusionHead) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = text_encoder(head.tokenize(["a handwritten digit 3", "zero"]))[0]
    return hidden, unet(PROBE["x"], PROBE["t"], hidden).sample


def fresh_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def dora_sd(tiny_sd, tmp_path_factory):
    """UNet and text-encoder DoRA (alpha != r), 3 steps, then one snapshot as the snapshot callback writes it."""
    head = DiffusionHead(tiny_sd, resolution=32, train_text_encoder=True, cache_latents=True)
    module = LoRAAdaptationModule(head, {"r": 4, "alpha": 6, "dora": True, "init": "gaussian"},
                                  optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), scheduler={"name": "constant"})
    pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module, image_batches())
    out = tmp_path_factory.mktemp("dora") / "step_0000003"
    module.save_adapters(out, step=3)
    module.eval()
    return {"head": head, "dir": out, "tuned": outputs(head.unet, head.text_encoder, head)}


def test_sd_dora_snapshot_carries_the_magnitudes_and_loads_in_diffusers(dora_sd, tiny_sd) -> None:
    out = dora_sd["dir"]
    tensors = load_file(out / DIFFUSERS_FILE)
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector.weight")}
    assert any(k.startswith("unet.") for k in magnitudes) and any(k.startswith("text_encoder.") for k in magnitudes)
    assert not (out / KOHYA_FILE).exists()  # diffusers drops kohya's dora_scale: no file that would load wrongly
    assert (out / SEED_STATE_FILE).is_file()
    pipe = fresh_pipeline(tiny_sd)
    pipe.load_lora_weights(out)
    hidden, pred = outputs(pipe.unet, pipe.text_encoder, dora_sd["head"])
    ref_hidden, ref_pred = dora_sd["tuned"]
    assert torch.allclose(hidden, ref_hidden, atol=1e-5), (hidden - ref_hidden).abs().max()
    assert torch.allclose(pred, ref_pred, atol=1e-5), (pred - ref_pred).abs().max()
    # the magnitudes matter: the same factors without them give other outputs
    plain = fresh_pipeline(tiny_sd)
    plain.load_lora_weights({k: v for k, v in tensors.items() if k not in magnitudes})
    assert not torch.allclose(outputs(plain.unet, plain.text_encoder, dora_sd["head"])[1], ref_pred, atol=1e-5)


def test_sd_dora_peft_directory_and_seed_file_load_in_peft(dora_sd, tiny_sd) -> None:
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    pipe = fresh_pipeline(tiny_sd)
    unet = PeftModel.from_pretrained(pipe.unet, dora_sd["dir"] / "unet")
    text = PeftModel.from_pretrained(pipe.text_encoder, dora_sd["dir"] / "text_encoder")
    assert unet.peft_config["default"].use_dora
    hidden, pred = outputs(unet, text, dora_sd["head"])
    assert torch.allclose(pred, dora_sd["tuned"][1], atol=1e-5) and torch.allclose(hidden, dora_sd["tuned"][0],
                                                                                   atol=1e-5)
    seed_unet = fresh_pipeline(tiny_sd).unet
    seed_unet.add_adapter(LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=["to_q", "to_k", "to_v",
                                                                                        "to_out.0"]))
    state = torch.load(dora_sd["dir"] / SEED_STATE_FILE, weights_only=True)
    assert not set_peft_model_state_dict(seed_unet, state).unexpected_keys
    with torch.no_grad():
        seed_pred = seed_unet(PROBE["x"], PROBE["t"], dora_sd["tuned"][0]).sample
    assert torch.allclose(seed_pred, dora_sd["tuned"][1], atol=1e-5)


@pytest.mark.parametrize("preset", ["lbm_tiny", "trellis_ss_tiny"])
def test_dora_is_refused_where_the_family_files_cannot_carry_it(preset, tmp_path, capsys) -> None:
    # the line comes before anything loads: the tiny base is never built, nothing is written
    rc = train_main([f"model={preset}", "adapter.dora=true", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"hydra.run.dir={tmp_path}/r"])
    assert_one_error_line(rc, capsys.readouterr().err, "adapter.dora=true is not supported here: ", case=preset)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r" / "config.yaml").exists()


def test_dora_is_refused_from_python_too() -> None:
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.heads.bridge import BridgeHead
    from lightning_lora.heads.flow3d import FlowMatching3DHead

    with pytest.raises(UserError, match=r"adapter.dora=true is not supported here: the LBM file"):
        BridgeHead.check_adapter(AdapterSpec(dora=True), {})
    with pytest.raises(UserError, match=r"adapter.dora=true is not supported here: the TRELLIS LoRA fork"):
        FlowMatching3DHead.check_adapter(AdapterSpec(dora=True), {})
    BridgeHead.check_adapter(AdapterSpec(), {})  # plain LoRA passes
    DiffusionHead.check_adapter(AdapterSpec(dora=True), {})  # the SD exports carry it


@pytest.mark.slow  # a real run of the tiny BERT (about 10 s)
def test_embedding_dora_whole_model_directory_loads_in_peft(fast_cfg, tiny_bert) -> None:
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from lightning_lora.train import run

    metrics, objects = run(fast_cfg(["adapter.dora=true", "adapter.init=gaussian", "trainer.max_steps=2",
                                     "validate_before=false", "validate_after=false"]))
    final = Path(metrics["adapter_dir"])
    head = objects["head"].eval()
    tokens = AutoTokenizer.from_pretrained(str(tiny_bert))(["sort a list", "open a file"], padding=True,
                                                           return_tensors="pt")
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_bert)), str(final / "model")).eval()
    assert model.peft_config["default"].use_dora
    with torch.no_grad():
        ours = objects["module"].adapters["encoder"](**tokens).last_hidden_state
        theirs = model(**tokens).last_hidden_state
    assert head is not None and torch.allclose(ours, theirs, atol=1e-5)
