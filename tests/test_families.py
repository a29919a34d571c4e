"""The shared checks over every row of the family matrix (families.CASES), as PEFT's tester runs its common tests
over every model case.

Each row is trained once through ``run(cfg)`` (the preset, its data preset at a small size, 2 steps, default
init: B = 0), then:

* every lora_B moved off zero, the optimizer holds exactly the trainable tensors, and they are all LoRA (or a
  head's own extra parameter);
* the frozen base weights are bit-identical to a freshly built base;
* the final snapshot holds one PEFT directory per adapted submodule, and a fresh base with those directories
  loaded (``lightning_lora.adapters.load_lora_weights``) gives the trained module's outputs bit for bit, which
  differ from the base's;
* on one LoRA layer, merging at scale s gives ``W + s·(alpha/r)·B·A`` computed by hand, twice is once, unmerge
  restores W; with every adapter merged and unloaded, the plain model gives the adapted outputs;
* the resumable ``last.ckpt`` holds exactly the trainable tensors (no frozen base weight, no pickled model);
* gradient checkpointing gives the same loss and LoRA gradients (float64, 1e-6), really recomputes, and one
  AdamW step moves every lora_B;
* the FSDP wrapping policy puts every LoRA layer inside a wrapped block;
* a 2-process CPU DDP run writes one adapter with the files, keys and shapes of the single-process run.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli
from families import RUN, FamilyCase, case_fixtures, params
from helpers import adapter_file_shapes
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn

from lightning_lora.adapters import AdapterSpec, load_lora_weights, merge_adapter, merge_lora_weights, unmerge_adapter
from lightning_lora.adapters.io import is_submodule_dir
from lightning_lora.module import LoRAAdaptationModule
from lightning_lora.strategies import BlockMatcher, block_names
from lightning_lora.train import run

# tiny models run fastest on one thread (and two threads on a shared 2-core machine can be 100x slower)
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = params()
TOLERANCE = 1e-6


# ---------------------------------------------------------------------------- one training run per row
@dataclass
class Trained:
    cfg: DictConfig
    dir: Path
    module: LoRAAdaptationModule
    trainer: Any
    fixtures: dict[str, Any]


@pytest.fixture(scope="module")
def trained_runs() -> dict[str, Trained]:
    return {}


@pytest.fixture
def trained(case: FamilyCase, trained_runs: dict[str, Trained], request, tmp_path_factory) -> Trained:
    """The row trained for 2 steps through run(cfg), once per module (the checks only read it)."""
    if case.name not in trained_runs:
        fixtures = case_fixtures(case, request)
        cfg = case.compose(fixtures, *case.data, *RUN, "trainer.accelerator=cpu")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path_factory.mktemp(case.name) / "single")
        metrics, objects = run(cfg)
        assert metrics["global_step"] == 2
        trained_runs[case.name] = Trained(cfg, Path(cfg.paths.output_dir), objects["module"], objects["trainer"],
                                          fixtures)
    return trained_runs[case.name]


def _fresh_head(run: Trained):
    """The row's base as run(cfg) built it: the same seed before the head (the tiny TRELLIS bases are random)."""
    torch.manual_seed(run.cfg.seed)
    return instantiate(run.cfg.model)


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")  # PEFT moves a wrapped layer's weight to <layer>.base_layer.weight


@torch.no_grad()
def _probe(case: FamilyCase, head, fixtures: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    head.eval()
    out = case.probe(head, case.batch(fixtures))
    assert out and all(torch.isfinite(t).all() for t in out)
    return out


def _reloaded(case: FamilyCase, run: Trained) -> tuple[Any, dict[str, Any]]:
    """A fresh base with the final snapshot's PEFT directories loaded into its submodules: (head, PEFT handles)."""
    head = _fresh_head(run)
    final = run.dir / "adapters" / "final"
    subs = head.adaptable_submodules()
    pefts = {p.name: load_lora_weights(subs[p.name], p) for p in sorted(final.iterdir()) if is_submodule_dir(p)}
    return head, pefts


# ---------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("case", ROWS)
def test_training_moves_every_lora_b_and_trains_only_the_adapter(case: FamilyCase, trained: Trained) -> None:
    module = trained.module
    assert set(module.adapters) == set(case.adapted)
    assert AdapterSpec.from_config(trained.cfg.adapter).init == "kaiming"  # B = 0 at the start: training moved it
    lora_b = {n: p for n, p in module.named_parameters() if ".lora_B." in n}
    assert lora_b and all(p.requires_grad for p in lora_b.values())
    in_adapters = {id(p) for peft in module.adapters.values() for n, p in peft.named_parameters() if ".lora_B." in n}
    assert in_adapters == {id(p) for p in lora_b.values()}
    unmoved = [n for n, p in lora_b.items() if not p.abs().sum() > 0]
    assert not unmoved, f"{len(unmoved)} of {len(lora_b)} lora_B still zero, e.g. {unmoved[:3]}"
    trainable = module.trainable_names()
    extra = {f"head.{n}" for n in module.head.extra_trainable_parameters()}
    assert all("lora_" in n or n in extra for n in trainable), sorted(trainable - extra)[:3]
    optimizer = trained.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ROWS)
def test_frozen_base_weights_are_unchanged(case: FamilyCase, trained: Trained) -> None:
    fresh = _fresh_head(trained)
    want = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
    head = trained.module.head
    now = {_base_name(n): t for n, t in [*head.named_parameters(), *head.named_buffers()] if "lora_" not in n}
    extra = set(head.extra_trainable_parameters())
    assert now.keys() == want.keys()
    frozen = [n for n, p in head.named_parameters() if "lora_" not in n and n not in extra]
    assert frozen and not any(head.get_parameter(n).requires_grad for n in frozen)
    changed = [n for n, t in now.items() if n not in extra and not torch.equal(t, want[n])]
    assert not changed, f"{len(changed)} frozen tensors changed, e.g. {changed[:3]}"


@pytest.mark.parametrize("case", ROWS)
def test_saved_adapter_reloads_to_the_same_outputs(case: FamilyCase, trained: Trained) -> None:
    final = trained.dir / "adapters" / "final"
    saved = sorted(p.name for p in final.iterdir() if is_submodule_dir(p))  # not the embedders' whole-model dir
    assert saved == sorted(case.adapted)
    fresh = _fresh_head(trained)
    base = _probe(case, fresh, trained.fixtures)
    for sub in saved:
        load_lora_weights(fresh.adaptable_submodules()[sub], final / sub)
    expected = _probe(case, trained.module.head, trained.fixtures)
    got = _probe(case, fresh, trained.fixtures)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape and torch.equal(g, e), f"output {i}: max difference {(g - e).abs().max():.2e}"
    # the adapter does something: without it the outputs differ (so equality above is not the base's)
    assert any(not torch.allclose(b, e) for b, e in zip(base, expected, strict=True))


def _one_linear_lora_layer(peft) -> tuple[str, Any]:
    from peft.tuners.lora import LoraLayer

    for name, layer in peft.named_modules():
        if isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), nn.Linear):
            return name, layer
    raise AssertionError("no LoRA layer on an nn.Linear")


@pytest.mark.parametrize("case", ROWS)
def test_merge_equals_w_plus_scaled_delta_on_one_layer(case: FamilyCase, trained: Trained) -> None:
    head, pefts = _reloaded(case, trained)
    adapted = _probe(case, head, trained.fixtures)
    peft = pefts[case.adapted[0]]
    name, layer = _one_linear_lora_layer(peft)
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    r, alpha = trained.cfg.adapter.r, trained.cfg.adapter.alpha
    assert (layer.r["default"], layer.lora_alpha["default"]) == (r, alpha)
    assert layer.scaling["default"] == alpha / r
    w = layer.get_base_layer().weight.detach().clone()
    assert b.abs().sum() > 0  # a trained B: the delta is not zero
    for scale in (0.5, 1.0):
        merge_adapter(peft, scale)
        merged = layer.get_base_layer().weight.detach().clone()
        torch.testing.assert_close(merged, w + scale * (alpha / r) * (b @ a), rtol=1e-6, atol=1e-6, msg=name)
        with warnings.catch_warnings():  # PEFT says so: "All adapters are already merged, nothing to do."
            warnings.simplefilter("ignore", UserWarning)
            merge_adapter(peft, scale)  # again: no double merge
        assert torch.equal(layer.get_base_layer().weight, merged), name
        unmerge_adapter(peft)
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), w, rtol=0, atol=1e-6, msg=name)
    for other in pefts.values():  # every adapter folded in and unloaded: plain layers give the adapted outputs
        merge_lora_weights(other)
    assert not [n for n, _ in head.named_modules() if "lora_" in n]
    merged_out = _probe(case, head, trained.fixtures)
    for got, want in zip(merged_out, adapted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ROWS)
def test_checkpoint_keys_are_the_trainable_names(case: FamilyCase, trained: Trained) -> None:
    ckpt = torch.load(trained.dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and keys == trained.module.trainable_names()
    assert all(k.startswith("head.") for k in keys)
    assert set(ckpt["hyper_parameters"]) == {"adapter", "scheduler", "family"}  # no base model pickled
    assert ckpt["hyper_parameters"]["family"] == case.family and ckpt["global_step"] == 2


# ---------------------------------------------------------------------------- gradient checkpointing
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


@pytest.mark.parametrize("case", ROWS)
def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(case: FamilyCase, request) -> None:
    fixtures = case_fixtures(case, request)
    cfg = case.compose(fixtures)
    batch = case.batch(fixtures)
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
    for step in (plain, checkpointed):
        assert step.lora_b_moved and all(step.lora_b_moved.values()) and all(step.lora_b_nonzero.values())


# ---------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("case", ROWS)
def test_fsdp_policy_puts_every_lora_layer_inside_a_wrapped_block(case: FamilyCase, trained: Trained) -> None:
    module = trained.module
    matcher = BlockMatcher(block_names())
    blocks = [name for name, m in module.named_modules() if matcher(m)]
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name, _ in module.named_modules() if name.endswith(".lora_A")}
    assert blocks and lora_layers
    outside = [n for n in lora_layers if not any(n.startswith(b + ".") for b in blocks)]
    assert not outside, f"LoRA layers outside any FSDP unit: {outside[:3]}"


@pytest.mark.parametrize("case", params(lambda case: case.slow or case.slow_ddp))
def test_two_process_cpu_ddp_writes_one_adapter_like_a_single_process_run(case: FamilyCase, trained: Trained,
                                                                         tmp_path) -> None:
    # the single-process run (above) also built the tiny model and the demo data before two processes look for them
    ddp_dir = tmp_path / "ddp"
    proc = run_cli([*case.run_overrides(trained.fixtures), *RUN, "trainer.accelerator=cpu", "strategy=ddp",
                    "trainer.devices=2", f"hydra.run.dir={ddp_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (ddp_dir / "adapters").iterdir()) == ["final"]  # written once, by rank 0
    assert json.loads((ddp_dir / "metrics.json").read_text())["global_step"] == 2
    single, ddp = adapter_file_shapes(trained.dir), adapter_file_shapes(ddp_dir)
    assert single and ddp == single
    assert not [p for p in ddp_dir.rglob("*") if p.name.startswith(".tmp-")]
    ckpt = torch.load(ddp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == trained.module.trainable_names()
