"""The training entry: shipped configs, in-process run(cfg), the real CLI, resume, DDP, sweeps, wheel install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, compose_train, run_cli, write_pairs
from hydra.utils import get_class
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lora.adapters import AdapterSpec
from lightning_lora.errors import UserError
from lightning_lora.module import ScheduleSpec
from lightning_lora.train import _user_error, run

CONF = REPO / "conf"


def _options() -> list[str]:
    return sorted(
        f"{group.name}={f.stem}"
        for group in CONF.iterdir()
        if group.is_dir() and group.name not in ("hydra", "__pycache__")
        for f in group.glob("*.yaml")
        if not f.stem.startswith("_")  # shared parts the presets include, not options of their own
    )


@pytest.mark.parametrize("override", _options())
def test_every_shipped_config_composes(override: str) -> None:
    cfg = compose_train([override])
    AdapterSpec.from_config(cfg.adapter)
    ScheduleSpec.from_config(cfg.scheduler)
    for node in (cfg.model, cfg.data, cfg.trainer):
        assert get_class(node._target_)


def test_adapter_presets_are_alpha_two_r() -> None:
    for r in (1, 2, 4, 8, 16, 32, 64, 128):
        spec = AdapterSpec.from_config(compose_train([f"adapter=r{r}"]).adapter)
        assert (spec.r, spec.alpha) == (r, 2 * r)
    overrides = ["adapter.r=12", "adapter.alpha=24", "adapter.dropout=0.05", "adapter.targets=[query,value]"]
    spec = AdapterSpec.from_config(compose_train(overrides).adapter)
    assert (spec.r, spec.alpha, spec.dropout, spec.targets) == (12, 24, 0.05, ["query", "value"])


def test_run_in_process_trains_and_writes_a_loadable_adapter(fast_cfg, tiny_bert) -> None:
    metrics, objects = run(fast_cfg())
    module, out = objects["module"], Path(objects["cfg"].paths.output_dir)
    assert metrics["global_step"] == 4
    assert set(metrics["before"]) == set(metrics["after"]) >= {"val/recall@1", "val/mrr@10", "val/ndcg@10"}
    assert metrics["adapter_bytes"] > 0 and metrics["trainable_params"] == module.parameter_counts()[0].trainable

    lora_b = {n: p for n, p in module.named_parameters() if "lora_B" in n}
    # 2 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense); no pooler
    assert len(lora_b) == 2 * 6  # every one non-zero, the base bit-identical: test_families.py (bert)

    from transformers import AutoModel

    # plain PEFT over the files' base reproduces the embeddings (pooling and normalisation written out)
    base = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False)
    head = module.head.eval()
    texts = ["def add(a, b): return a + b", "read a file"]
    with torch.no_grad():
        expected = head.encode_documents(texts)
        peft = PeftModel.from_pretrained(base, str(out / "adapters" / "final" / "encoder")).eval()
        tokens = head.embedder.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden = peft(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        got = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["adapter.r=0"], "adapter.r=0 must be a positive integer"),
        (["adapter.r=2.5"], "adapter.r=2.5 must be a positive integer"),
        (["adapter.alpha=-1"], "adapter.alpha=-1.0 must be > 0"),
        (["adapter.dropout=1.5"], "adapter.dropout=1.5 is outside [0, 1)"),
        (["adapter.targets=[valeu]"], "adapter target 'valeu' matches no module in embedding.encoder; layers"),
        (["model.pretrained=/nonexistent/model"], "model.pretrained: no such model folder: /nonexistent/model"),
        (["data=pairs", "data.train_path=/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
        (["resume=/nonexistent/last.ckpt"], "resume=/nonexistent/last.ckpt: no checkpoint"),
        (["data=pairs"], "data.train_path is required: pass data.train_path=<value>"),
    ],
)
def test_bad_input_is_one_clear_line(fast_cfg, overrides: list[str], needle: str) -> None:
    with pytest.raises(Exception) as info:
        run(fast_cfg(overrides))
    err = _user_error(info.value)
    assert isinstance(err, UserError), info.value
    assert needle in str(err) and "\n" not in str(err)


def test_jsonl_with_a_missing_field_names_the_line(fast_cfg, tmp_path) -> None:
    bad = write_pairs(tmp_path / "train.jsonl", [{"query": "a", "positive": "b"}, {"query": "c", "pos": "d"}])
    with pytest.raises(Exception) as info:
        run(fast_cfg(["data=pairs", f"data.train_path={bad}"]))
    err = _user_error(info.value)
    assert err is not None and "line 2" in str(err) and "positive" in str(err)


def test_cli_bad_value_exits_nonzero_with_one_line(tmp_path) -> None:
    proc = run_cli(["adapter.r=0", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: adapter.r=0 must be a positive integer")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_cli_unknown_group_option_is_hydras_message(tmp_path) -> None:
    proc = run_cli(["adapter=r3", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode != 0 and "Could not find 'adapter/r3'" in proc.stderr


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_cli_run_directory_and_resume(tmp_path, tiny_bert, cache_dir) -> None:
    run_dir = tmp_path / "run"
    args = [f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *FAST, f"hydra.run.dir={run_dir}"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"Run directory: {run_dir}") == 2  # printed at start and at end

    files = _files(run_dir)
    events = {f for f in files if f.startswith("tensorboard/events.out.tfevents.")}
    assert events
    adapters = {f"adapters/{d}/encoder/{f}" for d in ("step_0000002", "step_0000004", "final")
                for f in ("adapter_config.json", "adapter_model.safetensors")}
    # the embedders' whole-model PEFT export beside the per-submodule ones
    adapters |= {f"adapters/{d}/model/{f}" for d in ("step_0000002", "step_0000004", "final")
                 for f in ("adapter_config.json", "adapter_model.safetensors", "whole_model.json")}
    assert files - events == {
        ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log",
        "config.yaml", "command.txt", "model_summary.txt", "metrics.json", "environment.json",
        "tensorboard/hparams.yaml",
        "checkpoints/last.ckpt", "checkpoints/step_0000002.ckpt", "checkpoints/step_0000004.ckpt", *adapters,
    }
    tags: set[str] = set()
    for event_file in events:
        acc = EventAccumulator(str(run_dir / event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "lr-AdamW", "val/loss", "val/recall@1", "val/mrr@10", "val/ndcg@10"} <= tags
    assert (run_dir / "command.txt").read_text().startswith("python -m lightning_lora.train model.pretrained=")
    assert "Applying LoRA adapters" in (run_dir / "model_summary.txt").read_text()

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
    adapter_bytes = (run_dir / "adapters/final/encoder/adapter_model.safetensors").stat().st_size
    # weights + AdamW moments + a fixed ~40 KB of loop and random-generator state (exact resume)
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size < 4 * adapter_bytes + 64_000

    resumed = run_cli([*args, "resume=last", "trainer.max_steps=6", "validate_before=false"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
    assert (run_dir / "adapters" / "step_0000006").is_dir()
    assert (run_dir / "checkpoints" / "step_0000006.ckpt").is_file()


def test_configs_are_found_after_a_wheel_install(tmp_path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("lightning_lora-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "lightning_lora" / "conf" / "adapter" / "r64.yaml").is_file()
    env = {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    where = subprocess.run([sys.executable, "-c", "import lightning_lora; print(lightning_lora.__file__)"],
                           cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    proc = run_cli(["--cfg", "job", "adapter=r64"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "lightning_lora.heads.embedding.EmbeddingHead" in proc.stdout and "r: 64" in proc.stdout


def test_configs_are_found_from_the_source_checkout() -> None:
    proc = run_cli(["--cfg", "job", "model=hf_encoder", "model.pretrained=/x"], cwd=REPO)
    assert proc.returncode == 0 and "pretrained: /x" in proc.stdout


def test_idle_callbacks_stay_out_of_the_trainer_unless_resuming(tmp_path) -> None:
    from omegaconf import open_dict

    from lightning_lora.callbacks import EmptyEpochGuard, ExactResume, LoRAEMA, NanGuard, PushToHub, SamplePreviews
    from lightning_lora.train import trainer_callbacks

    def kinds(overrides: list[str]) -> list[type]:
        cfg = compose_train(overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        return [type(cb) for cb in trainer_callbacks(cfg)]

    # EMA off, no Hub repository, a head that never draws: nothing for those three to do at any step
    shipped = kinds([])
    assert shipped[0] is EmptyEpochGuard and {NanGuard, ExactResume} <= set(shipped)
    assert not {LoRAEMA, PushToHub, SamplePreviews} & set(shipped)
    assert SamplePreviews in kinds(["model=sd_tiny"])  # the SD head draws previews
    assert {LoRAEMA, PushToHub} <= set(kinds(["callbacks.ema.enabled=true", "callbacks.push.repo_id=me/lora"]))
    resumed = set(kinds([f"resume={tmp_path / 'last.ckpt'}"]))  # an idle callback's state may be in there
    assert {LoRAEMA, PushToHub, SamplePreviews} <= resumed
