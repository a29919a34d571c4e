"""Gradient checkpointing trades compute for memory and must not change the maths: for every family's tiny preset,
one training step with it on and off gives the same loss and the same gradient on every LoRA tensor (float64,
1e-6), the checkpointed run really recomputes its blocks in the backward, and one AdamW step moves every lora_B."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from test_diffusion import image_batches
from test_embedders import pictures  # noqa: F401 (fixture)
from test_embedding_objective import BATCH as TEXT_BATCH
from test_lbm import one_thread, pairs  # noqa: F401 (autouse fixture)
from test_trellis_models import random_coords
from torch import nn

from lightning_lora.adapters import AdapterSpec
from lightning_lora.module import LoRAAdaptationModule

TOLERANCE = 1e-6


def _ss_batch(_: dict[str, Any]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.randn(2, 8, 16, 16, 16, generator=g), "cond": torch.randn(2, 8, 64, generator=g)}


def _slat_batch(_: dict[str, Any]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    coords = random_coords(2, 32, 40)
    return {"coords": coords, "feats": torch.randn(coords.shape[0], 8, generator=g),
            "cond": torch.randn(2, 8, 64, generator=g)}


def _image_text_batch(fixtures: dict[str, Any]) -> dict[str, list]:
    # text queries against image documents: both towers (and their LoRA) take part
    return {"query": ["a cat", "a red square", "noise"], "positive": [{"image": p} for p in fixtures["pictures"]]}


@dataclass(frozen=True)
class Family:
    overrides: Callable[[dict[str, Any]], list[str]]
    batch: Callable[[dict[str, Any]], Any]


FAMILIES = {
    "trellis_ss_tiny": Family(lambda _: ["model=trellis_ss_tiny"], _ss_batch),
    "trellis_slat_tiny": Family(lambda _: ["model=trellis_slat_tiny"], _slat_batch),
    "sd_tiny": Family(lambda _: ["model=sd_tiny"], lambda _: next(iter(image_batches(n=4, batch_size=4)))),
    "lbm_tiny": Family(lambda _: ["model=lbm_tiny"], lambda _: pairs(n=4)),
    "bert": Family(lambda f: ["model=minilm", f"model.pretrained={f['tiny_bert']}", "model.query_max_length=16",
                              "model.doc_max_length=16"], lambda _: TEXT_BATCH),
    "clip_tiny": Family(lambda _: ["model=clip_tiny", "model.vision=true"], _image_text_batch),
    "qwen3_vl_tiny": Family(lambda _: ["model=qwen3_vl_tiny", "model.vision=true"], _image_text_batch),
}


def _float64(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _float64(v) for k, v in batch.items()}
    return batch


@dataclass
class Step:
    loss: float
    grads: dict[str, torch.Tensor]
    lora_calls: int  # forward calls of LoRA layers during forward + backward (recomputation counts again)
    lora_b_moved: dict[str, bool]
    lora_b_nonzero: dict[str, bool]


def _build(cfg, checkpointing: bool) -> LoRAAdaptationModule:
    torch.manual_seed(0)  # the tiny TRELLIS bases are random: the same base in both runs
    head = instantiate(cfg.model)
    torch.manual_seed(1)  # the same random LoRA init (B != 0, so every A gets a gradient too)
    module = LoRAAdaptationModule(head, AdapterSpec(r=4, alpha=8, dropout=0.0, init="random"),
                                  gradient_checkpointing=checkpointing)
    module.double().train()  # train mode: checkpointing is active (HF checks self.training)
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def _count_lora_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    for name, m in module.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(hook)
    return calls


def _step(cfg, batch: Any, checkpointing: bool) -> Step:
    module = _build(cfg, checkpointing)
    calls = _count_lora_calls(module)
    torch.manual_seed(2)  # the heads draw noise, timesteps and condition drops from the global generator
    loss = module.head.training_step(_float64(batch)).loss
    loss.backward()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone() for n, p in trainable.items() if p.grad is not None}
    lora_b = {n: p for n, p in trainable.items() if ".lora_B." in n}
    before = {n: p.detach().clone() for n, p in lora_b.items()}
    torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0).step()  # no decay: only a gradient moves B
    return Step(loss.item(), grads, calls[0], {n: not torch.equal(p, before[n]) for n, p in lora_b.items()},
                {n: bool(p.abs().sum() > 0) for n, p in lora_b.items()})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(family: str, tiny_bert: Path, cache_dir: Path,
                                                                        request) -> None:
    spec = FAMILIES[family]
    fixtures = {"tiny_bert": tiny_bert, "pictures": request.getfixturevalue("pictures")}
    cfg = compose_train([*spec.overrides(fixtures), f"paths.cache_dir={cache_dir}"])
    batch = spec.batch(fixtures)
    plain, checkpointed = _step(cfg, batch, False), _step(cfg, batch, True)

    assert checkpointed.loss == pytest.approx(plain.loss, rel=TOLERANCE)
    assert plain.grads and checkpointed.grads.keys() == plain.grads.keys()
    assert all(".lora_" in n for n in plain.grads)  # the adapter's tensors, and only those, train
    for name, grad in plain.grads.items():
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
        error = (checkpointed.grads[name] - grad).abs().max() / grad.abs().max()
        assert error <= TOLERANCE, f"{name}: relative difference {error:.2e}"
    # the checkpointed blocks ran their LoRA layers again in the backward
    assert checkpointed.lora_calls > plain.lora_calls, (checkpointed.lora_calls, plain.lora_calls)
    for run in (plain, checkpointed):
        assert run.lora_b_moved and all(run.lora_b_moved.values()) and all(run.lora_b_nonzero.values())
