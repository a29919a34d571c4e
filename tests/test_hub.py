"""Models and adapters by Hugging Face Hub id, offline, against a Hub cache this module fills itself.

conftest points ``HF_HUB_CACHE`` at an empty temporary folder and sets ``HF_HUB_OFFLINE=1``; ``put_in_cache``
writes a repository there the way huggingface_hub lays it out (``models--org--name/refs/<revision>`` holding a
commit hash, ``snapshots/<commit>/<files>``), so resolution runs through huggingface_hub's own cache lookup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_train
from omegaconf import open_dict

from lightning_lora import hub
from lightning_lora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def put_in_cache(repo_id: str, source: Path | dict[str, Path], revision: str = "main", commit: str | None = None
                 ) -> tuple[str, Path]:
    """Copy a folder (or {path in repo: file}) into the Hub cache as ``repo_id`` at ``revision``; returns
    (commit, snapshot folder)."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    commit = commit or f"{abs(hash((repo_id, revision))):040x}"[:40]
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    files = {p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()} if isinstance(
        source, Path) else source
    for rel, src in files.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snapshot / rel)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return commit, snapshot


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize(("name", "ref"), [
    ("org/name", hub.HubRef("org/name")),
    ("org/name@v1.0", hub.HubRef("org/name", "v1.0")),
    ("org/name/ckpts/x.safetensors", hub.HubRef("org/name", None, "ckpts/x.safetensors")),
    ("org/name@abc123/sub/f.json", hub.HubRef("org/name", "abc123", "sub/f.json")),
    ("hf://org/name", hub.HubRef("org/name")),
    ("./org/name", None), ("/abs/path", None), ("~/models/x", None), ("plainfolder", None),
])
def test_names_are_local_paths_or_hub_references(name, ref) -> None:
    assert hub.parse(name) == ref


def test_an_existing_local_folder_wins_unless_hf_prefixed(tmp_path, monkeypatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.parse("org/name") is None and hub.resolve("org/name") == Path("org/name")
    assert hub.parse("hf://org/name") == hub.HubRef("org/name")


# ---------------------------------------------------------------------------- the cache
def test_a_revision_pin_picks_its_snapshot(tmp_path) -> None:
    for tag, text in (("main", "new"), ("v1", "old")):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "config.json").write_text(json.dumps({"which": text}))
    new, _ = put_in_cache("test-org/pinned", tmp_path / "main")
    old, _ = put_in_cache("test-org/pinned", tmp_path / "v1", revision="v1", commit="1" * 40)

    def which(name: str) -> str:
        return json.loads((hub.resolve(name) / "config.json").read_text())["which"]

    assert (which("test-org/pinned"), which("test-org/pinned@v1"), which(f"test-org/pinned@{'1' * 40}")) == \
        ("new", "old", "old")
    file = hub.resolve("test-org/pinned@v1/config.json")
    assert file.is_file() and old in file.parts
    recorded = {r["name"]: r for r in hub.resolutions()}
    assert recorded["test-org/pinned"]["commit"] == new and recorded["test-org/pinned@v1"]["commit"] == old


def test_a_name_missing_offline_is_one_line_saying_how_to_fetch_it() -> None:
    with pytest.raises(UserError) as info:
        hub.resolve("test-org/absent@v2", key="model.pretrained", allow_patterns=["*.json"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.pretrained=test-org/absent@v2: not in the Hugging Face cache")
    assert "offline (HF_HUB_OFFLINE=1)" in message
    assert "hf download test-org/absent --revision v2 --include '*.json'" in message


def test_a_file_missing_from_a_cached_repo_names_the_file(tmp_path) -> None:
    (tmp_path / "a.json").write_text("{}")
    put_in_cache("test-org/partial", tmp_path)
    with pytest.raises(UserError, match=r"model.ckpt=test-org/partial/ckpts/x.safetensors: .*"
                                        r"hf download test-org/partial ckpts/x.safetensors"):
        hub.resolve("test-org/partial/ckpts/x.safetensors", key="model.ckpt")


# ---------------------------------------------------------------------------- every loader by id
@pytest.fixture(scope="module")
def hub_models(tmp_path_factory, tiny_clip_dir, tiny_bert) -> dict[str, str]:
    """Tiny models of every family in the Hub cache, by id."""
    from lightning_lora.heads.flow3d import FlowMatching3DHead
    from lightning_lora.models.lbm_tiny import ensure_tiny_lbm
    from lightning_lora.models.sd_tiny import ensure_tiny_sd

    root = tmp_path_factory.mktemp("hub_sources")
    sd = Path(ensure_tiny_sd(root / "sd"))
    lbm = Path(ensure_tiny_lbm(root / "lbm"))
    preset = compose_train(["model=trellis_slat_tiny", f"paths.cache_dir={root}"]).model
    trellis = Path(FlowMatching3DHead.build_tiny(root / "trellis", preset))
    put_in_cache("test-org/sd-tiny", sd)
    put_in_cache("test-org/lbm-tiny", lbm)
    put_in_cache("test-org/clip-tiny", tiny_clip_dir)
    put_in_cache("test-org/bert-tiny", tiny_bert)
    put_in_cache("test-org/trellis-tiny", {"ckpts/slat.safetensors": trellis,
                                           "ckpts/slat.json": trellis.with_suffix(".json")})
    return {"sd": "test-org/sd-tiny", "lbm": "test-org/lbm-tiny", "clip": "test-org/clip-tiny",
            "bert": "test-org/bert-tiny", "trellis": "test-org/trellis-tiny/ckpts/slat.safetensors"}


@pytest.mark.parametrize(("preset", "key", "model"), [
    ("sd_tiny", "pretrained", "sd"), ("lbm_tiny", "pretrained", "lbm"), ("clip_tiny", "pretrained", "clip"),
    ("hf_encoder", "pretrained", "bert"), ("trellis_slat_tiny", "ckpt", "trellis"),
])
def test_every_family_builds_its_head_from_an_id(preset, key, model, hub_models, cache_dir) -> None:
    from hydra.utils import instantiate

    cfg = compose_train([f"model={preset}", f"model.{key}={hub_models[model]}", f"paths.cache_dir={cache_dir}"])
    head = instantiate(cfg.model)
    identity = head.base_model_identity()
    assert hub_models[model] in identity.values()  # the id, not this machine's cache path, names the base


def test_training_and_init_from_by_id_record_the_resolved_commit(hub_models, tmp_path, cache_dir) -> None:
    from lightning_lora.adapters import read_adapters
    from lightning_lora.train import run

    common = ["model=sd_tiny", f"model.pretrained={hub_models['sd']}", "data=digits", "data.num_images=16",
              "data.batch_size=4", f"paths.cache_dir={cache_dir}", "trainer.max_steps=2", "validate_before=false",
              "validate_after=false", "~callbacks.progress_bar", "~callbacks.sample_previews",
              "trainer.precision=32-true", "adapter.init=random"]

    def train(name: str, *extra: str):
        cfg = compose_train([*common, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        return run(cfg)

    train("first")
    env = json.loads((tmp_path / "first" / "environment.json").read_text())
    (entry,) = [r for r in env["hub"] if r["name"] == hub_models["sd"]]
    assert entry["repo_id"] == "test-org/sd-tiny" and entry["commit"] in entry["path"]

    # the first run's adapter, published as a repository of its own, starts the second run
    put_in_cache("test-org/sd-tiny-lora", tmp_path / "first" / "adapters" / "final")
    metrics, _ = train("second", "adapter.init_from=test-org/sd-tiny-lora", "trainer.max_steps=1")
    first, _ = read_adapters(tmp_path / "first" / "adapters" / "final")
    assert metrics["global_step"] == 1 and first


def test_sample_sd_and_extract_take_ids(hub_models, tmp_path) -> None:
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from lightning_lora.cli import main

    sd = hub.resolve(hub_models["sd"])
    # a LoRA for the tiny UNet: extract one from a tuned copy of its weights, then publish it
    tuned = tmp_path / "tuned"
    shutil.copytree(sd, tuned)
    unet = tuned / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet)
    g = torch.Generator().manual_seed(0)
    weights = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k.endswith("to_q.weight") else v
               for k, v in weights.items()}
    save_file(weights, unet)
    put_in_cache("test-org/sd-tiny-tuned", tuned)
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", hub_models["sd"], "--tuned", "test-org/sd-tiny-tuned", "--rank", "4",
                 "--out", str(out)]) == 0
    put_in_cache("test-org/sd-tiny-lora-file", {"pytorch_lora_weights.safetensors": out})

    common = ["sample", "sd", "--pretrained", hub_models["sd"], "--prompt", "a handwritten digit 3", "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert main([*common, "--lora", "test-org/sd-tiny-lora-file", "--out", str(tmp_path / "lora.png")]) == 0
    base, lora = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("base", "lora"))
    assert np.abs(base - lora).max() > 0  # the LoRA fetched by id changed the picture


def test_the_predictor_takes_a_base_and_an_adapter_by_id(hub_models, tmp_path) -> None:
    from lightning_lora.adapters import AdapterSpec, inject_adapter
    from lightning_lora.models.embedders import build_embedder
    from lightning_lora.predict import Predictor

    embedder = build_embedder(hub.resolve(hub_models["bert"]), "text")
    torch.manual_seed(0)
    peft = inject_adapter(embedder.adaptable_submodules()["encoder"],
                          AdapterSpec(r=2, alpha=4, init="random").lora_config(["query", "value"]))
    peft.save_pretrained(tmp_path / "adapter")
    put_in_cache("test-org/bert-tiny-adapter", tmp_path / "adapter")
    plain = Predictor.from_pretrained(hub_models["bert"], family="text").encode(["a query"])
    adapted = Predictor.from_pretrained(hub_models["bert"], "test-org/bert-tiny-adapter", family="text")
    assert adapted.adapters and not torch.allclose(adapted.encode(["a query"]), plain)


def test_the_released_trellis_preset_names_its_ids_offline(tmp_path) -> None:
    """The design card's command, offline with an empty cache: one line that names the checkpoint id."""
    from lightning_lora.data.trellis import make_trellis_demo

    root = make_trellis_demo(tmp_path / "demo", n=2, resolution=32)
    cfg = compose_train(["model=trellis_slat", "adapter=r64", f"data.roots={root}"])
    assert cfg.model.ckpt.startswith("microsoft/TRELLIS-image-large/ckpts/slat_flow_img_dit_L_64l8p2_fp16")
    assert cfg.model.image_encoder.pretrained == "facebook/dinov2-with-registers-large"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "lightning_lora.train", "model=trellis_slat", "adapter=r64",
                           f"data.roots={root}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert (lines[-1].startswith("error: model.") and "microsoft/TRELLIS-image-large" in lines[-1]) \
        or "facebook/dinov2-with-registers-large" in lines[-1], lines[-3:]
    assert "offline" in lines[-1] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_design_card_command_trains_with_a_prefilled_cache(tmp_path) -> None:
    """``python -m lightning_lora.train model=trellis_slat adapter=r64 data.roots=DIR`` with the released ids in the
    cache: TRELLIS-L SLat at its released size (random weights, fp16 as released) under its real file names, and a
    1-layer DINOv2-with-registers of the released width under facebook/dinov2-with-registers-large. One step,
    gradient checkpointing on (about 5 GiB; bench/results.md has the numbers)."""
    from hydra.utils import instantiate
    from safetensors.torch import save_file
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from lightning_lora.data.trellis import make_trellis_demo

    root = make_trellis_demo(tmp_path / "demo", n=4, resolution=64)
    denoiser = instantiate(compose_train(["model=trellis_slat"]).model.denoiser)
    released = tmp_path / "released"
    released.mkdir()
    save_file({k: v.half().contiguous() for k, v in denoiser.state_dict().items()},
              str(released / "slat.safetensors"))
    (released / "slat.json").write_text(json.dumps({"name": type(denoiser).__name__, "args": denoiser.config}))
    del denoiser
    put_in_cache("microsoft/TRELLIS-image-large", {
        "ckpts/slat_flow_img_dit_L_64l8p2_fp16.safetensors": released / "slat.safetensors",
        "ckpts/slat_flow_img_dit_L_64l8p2_fp16.json": released / "slat.json"})
    torch.manual_seed(0)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096, patch_size=14,
        image_size=518, num_register_tokens=4))
    dino.save_pretrained(tmp_path / "dino")
    put_in_cache("facebook/dinov2-with-registers-large", tmp_path / "dino")

    proc = subprocess.run(
        [sys.executable, "-m", "lightning_lora.train", "model=trellis_slat", "adapter=r64", f"data.roots={root}",
         "trainer.max_steps=1", "trainer.accumulate_grad_batches=1", "data.batch_size=1", "validate_before=false",
         "validate_after=false", "gradient_checkpointing=true", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
    env = json.loads((run_dir / "environment.json").read_text())
    fetched = {r["repo_id"] for r in env["hub"]}
    assert fetched == {"microsoft/TRELLIS-image-large", "facebook/dinov2-with-registers-large"}
    assert list((run_dir / "lora_ckpts").glob("denoiser_lora_step*.safetensors"))
