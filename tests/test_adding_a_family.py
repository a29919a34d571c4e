"""Adding a family touches no shared file: the toy family of ``tests/toy_family/`` (a head, a model file, a data
file, two presets and its row in ``tests/families.py``) trains through the entry point, gets FSDP units at its own
blocks and a ``lightning-lora sample toy`` command, found the way an installed plugin is found (an entry point in
the ``lightning_lora.heads`` group), with no line of the package or its configs naming it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import REPO, compose_train
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_lora.heads import ENTRY_POINT_GROUP

TOY = Path(__file__).resolve().parent / "toy_family"
TOY_OVERRIDES = [f"hydra.searchpath=[file://{TOY / 'conf'}]", "model=toy", "data=toy"]


def test_no_shared_file_names_the_toy_family() -> None:
    shared = [*(REPO / "lightning_lora").rglob("*.py"), *(REPO / "conf").rglob("*.yaml")]
    assert shared
    named = [str(p) for p in shared if re.search(r"\btoy_family\b|\bToyHead\b|\bToyBlock\b", p.read_text())]
    assert not named


def test_the_toy_preset_trains_through_run_and_writes_its_adapter(tmp_path, cache_dir) -> None:
    from lightning_lora.train import run

    cfg = compose_train([*TOY_OVERRIDES, f"paths.cache_dir={cache_dir}", "trainer.max_steps=4",
                         "~callbacks.progress_bar", "trainer.precision=32-true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics, objects = run(cfg)
    assert metrics["global_step"] == 4 and metrics["after"]["val/loss"] < metrics["before"]["val/loss"]
    final = tmp_path / "run" / "adapters" / "final" / "model"
    assert json.loads((final / "adapter_config.json").read_text())["target_modules"]
    assert type(objects["head"]).__name__ == "ToyHead"
    assert (cache_dir / "toy_tiny" / "model.safetensors").is_file()  # built once by ToyHead.build_tiny


def test_the_fsdp_policy_wraps_the_toy_blocks(cache_dir) -> None:
    from lightning_lora.module import LoRAAdaptationModule

    cfg = compose_train([*TOY_OVERRIDES, f"paths.cache_dir={cache_dir}", "strategy=fsdp"])
    matcher = instantiate(cfg.trainer.strategy.auto_wrap_policy)._lambda_fn
    module = LoRAAdaptationModule(instantiate(cfg.model), {"r": 2, "alpha": 4})
    blocks = [name for name, m in module.named_modules() if matcher(m)]
    assert len(blocks) == 2 and all(type(module.get_submodule(b)).__name__ == "ToyBlock" for b in blocks)


def test_lightning_lora_sample_finds_the_toy_command_through_an_entry_point(tmp_path, cache_dir) -> None:
    """A subprocess that never imports the toy module itself: the entry point of an installed distribution (a
    dist-info folder on the path) is how ``registered_heads`` finds it."""
    from toy_family.head import ToyHead

    from lightning_lora.adapters import (
        AdapterSpec,
        inject_adapter,
        load_lora_weights,
        save_lora_weights,
        set_adapter_scale,
    )

    plugin = tmp_path / "site"
    dist = plugin / "toy_family_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntoy = toy_family.head\n")
    base = ToyHead.build_tiny(cache_dir / "toy_tiny", {})
    model = ToyHead(base).model
    lora = save_lora_weights(inject_adapter(model, AdapterSpec(r=2, alpha=4, init="random").lora_config(
        ["to_q", "to_v"])), tmp_path / "lora.safetensors")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOY.parent), str(plugin), str(REPO)])}
    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-m", "lightning_lora.cli", "sample", "toy", "--pretrained", base,
                           "--lora", str(lora), "--scale", "0.5", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    # the same numbers in this process: the base, and the base with the LoRA at half strength
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))  # the command's --seed 0 input
    head = ToyHead(base).eval()
    with torch.no_grad():
        plain = head.model(x)
        adapted = load_lora_weights(head.model, lora)
        set_adapter_scale(adapted, 0.5)
        expected = adapted(x)
    sampled = torch.from_numpy(np.load(out)["output"])
    assert not torch.allclose(sampled, plain, atol=1e-4)
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-6)
