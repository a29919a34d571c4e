"""Seed 000 (the TRELLIS LoRA fork's tutorial) run against this project, on the tiny TRELLIS presets.

Three kinds of check:
- the seed's own Python code blocks, each below in a ``seed_*`` function as the seed writes it, with only the
  import path changed (``trellis.utils.lora_utils`` -> ``lightning_lora.adapters.api``, ``from trellis import
  models`` -> ``lightning_lora.models.trellis``) and the seed's own placeholders filled (``# ... other args``: the
  tiny preset's arguments and its base weights; ``.cuda()``: the test device; the example paths: this run's);
- the fork's own loader (zadaianchuk/TRELLIS ``trellis/utils/lora_utils.py``: ``load_lora_weights`` applies
  LoRA with PEFT's ``get_peft_model`` and calls ``load_state_dict`` on the PeftModel), re-written here from that
  published behaviour, on a real ``lora_ckpts/denoiser_lora_stepNNNNNNN.pt`` written by a short training run: every
  LoRA tensor must load (a key-name drift fails), and the model it builds must give our loading's outputs;
- the fork's configs (``configs/finetune_*_lora.json``) against ``experiment=trellis_slat_lora`` /
  ``trellis_ss_lora``, and its lognormal noisy-conditioning spread.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from lightning_lora.adapters import api
from lightning_lora.errors import UserError
from lightning_lora.models.trellis import SparseTensor
from lightning_lora.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

FORK_TARGETS = ["to_q", "to_kv", "to_out", "to_qkv"]  # the fork's lora_target_modules (both configs)
STEPS = 2  # optimizer steps of the short run: its one snapshot (step 2) is its final state
PRESETS = {"slat": "trellis_slat_tiny", "ss": "trellis_ss_tiny"}
# the seed's r=64 needs attention layers wider than 64 (a rank must stay below its layer's smaller side), so the tiny
# presets run at width 128 here
WIDE = ["model.denoiser.model_channels=128", "model.denoiser.cond_channels=128"]


# --------------------------------------------------------------------------- one short run per latent
class Trained:
    """A finished tiny run: its directory, config, trained head and a fixed probe batch."""

    def __init__(self, out: Path, cfg: Any, objects: dict[str, Any], stdout: str) -> None:
        self.out, self.cfg, self.head, self.stdout = out, cfg, objects["head"], stdout
        self.batch = next(iter(objects["datamodule"].train_dataloader()))  # drawn once: the probe's fixed input
        self.pt = out / "lora_ckpts" / f"denoiser_lora_step{STEPS:07d}.pt"

    def denoiser_args(self) -> dict[str, Any]:
        spec = OmegaConf.to_container(self.cfg.model.denoiser, resolve=True)
        spec.pop("_target_")
        return spec

    def base_weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.cfg.model.ckpt))

    def probe(self, model: torch.nn.Module) -> torch.Tensor:
        """The denoiser's velocity for the probe batch at t = 500 (eval mode, no grad)."""
        model.eval()
        cond = self.batch["cond"]
        t = torch.full((cond.shape[0],), 500.0)
        with torch.no_grad():
            if "x0" in self.batch:
                return model(self.batch["x0"], t, cond)
            return model(SparseTensor(self.batch["coords"], self.batch["feats"]), t, cond).feats


def _train(tmp: Path, latent: str, *extra: str) -> Trained:
    cfg = compose_train([
        f"model={PRESETS[latent]}", *WIDE, "adapter=r64", "data=trellis_demo", f"data.kind={latent}",
        "data.num_shapes=8",
        "data.batch_size=2", f"paths.cache_dir={tmp / 'cache'}",
        f"trainer.max_steps={STEPS}", f"callbacks.adapter_checkpoint.every_n_steps={STEPS}",
        "~callbacks.progress_bar", "~callbacks.sample_previews", "validate_before=false", "validate_after=false",
        "+trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "optimizer.lr=3e-3",
        "scheduler.name=constant", "trainer.precision=32-true", *extra,
    ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        _, objects = run(cfg)
    return Trained(tmp / "run", cfg, objects, stdout.getvalue())


@pytest.fixture(scope="module")
def slat(tmp_path_factory, one_thread) -> Trained:
    return _train(tmp_path_factory.mktemp("seed000-slat"), "slat")


@pytest.fixture(scope="module")
def ss(tmp_path_factory, one_thread) -> Trained:
    return _train(tmp_path_factory.mktemp("seed000-ss"), "ss")


@pytest.fixture(params=["slat", "ss"])
def trained(request) -> Trained:
    return request.getfixturevalue(request.param)


def _fresh_base(trained: Trained) -> torch.nn.Module:
    """A new denoiser of the preset's class holding the run's (frozen) base weights."""
    model = type(trained.head.denoiser)(**trained.denoiser_args())  # PEFT adapted the head's module in place
    model.load_state_dict(trained.base_weights())
    return model


def _ours(trained: Trained) -> torch.Tensor:
    """Our own loading: the self-describing .safetensors twin through lightning_lora.adapters.load_lora_weights."""
    from lightning_lora.adapters import load_lora_weights

    return trained.probe(load_lora_weights(_fresh_base(trained), trained.pt.with_suffix(".safetensors")))


# --------------------------------------------------------------------------- the fork's loader, re-written
def fork_load_lora_weights(model: torch.nn.Module, lora_path: str, r: int = 64, lora_alpha: int = 128,
                           lora_dropout: float = 0.0, target_modules: list[str] | None = None,
                           strict: bool = True) -> tuple[torch.nn.Module, Any]:
    """zadaianchuk/TRELLIS ``load_lora_weights``, from its published behaviour: a plain ``LoraConfig`` (default
    targets to_q/to_kv/to_out/to_qkv), ``get_peft_model``, ``torch.load(weights_only=True)`` (``safetensors``'
    ``load_file`` for ``.safetensors``), then ``load_state_dict(state, strict=strict)`` on the PeftModel. Also
    returns what ``load_state_dict`` reported (the fork drops it), so the test can count."""
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=target_modules or FORK_TARGETS)
    peft_model = get_peft_model(model, config)
    state = (load_file(lora_path) if lora_path.endswith(".safetensors")
             else torch.load(lora_path, map_location="cpu", weights_only=True))
    return peft_model, peft_model.load_state_dict(state, strict=strict)


def _lora_keys(keys) -> list[str]:
    return sorted(k for k in keys if "lora_" in k)


def test_pt_is_written_as_the_forks_trainer_writes_it(trained: Trained) -> None:
    """A plain dict of tensors (weights_only), with exactly the keys the fork's trainer keeps from the PeftModel's
    state_dict (every key holding ``lora_``: ``base_model.model.<path>.lora_A.default.weight``), beside its
    .safetensors twin with the same tensors."""
    state = torch.load(trained.pt, map_location="cpu", weights_only=True)
    assert type(state) is dict and state and all(isinstance(v, torch.Tensor) for v in state.values())
    expected = get_peft_model(_fresh_base(trained), LoraConfig(r=64, lora_alpha=128, target_modules=FORK_TARGETS))
    fork_keys = sorted(k for k in expected.state_dict() if "lora_" in k or "modules_to_save" in k)
    assert sorted(state) == fork_keys
    assert all(k.startswith("base_model.model.") and (".lora_A.default." in k or ".lora_B.default." in k)
               for k in state)
    twin = load_file(trained.pt.with_suffix(".safetensors"))
    assert sorted(twin) == sorted(k.replace(".default.", ".") for k in state)
    for key, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(value, twin[key.replace(".default.", ".")]), key
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # it trained


@pytest.mark.parametrize("strict", [False, True], ids=["strict=False", "strict=True"])
def test_forks_loader_loads_every_tensor_and_gives_our_outputs(trained: Trained, strict: bool) -> None:
    """Every tensor of the trained .pt lands in the PeftModel the fork's loader builds (0 unexpected, 0 LoRA
    missing), and that model's outputs equal our own loading's. With strict=True the fork's load_state_dict also
    demands the frozen base weights, which no LoRA-only file holds (the fork's own lora_ckpts neither): the error
    must then name base weights only, never a LoRA key."""
    state = torch.load(trained.pt, map_location="cpu", weights_only=True)
    if strict:
        with pytest.raises(RuntimeError) as info:
            fork_load_lora_weights(_fresh_base(trained), str(trained.pt), strict=True)
        message = str(info.value)
        assert "Unexpected key" not in message and "lora_" not in message and "base_layer" in message
        return
    model, result = fork_load_lora_weights(_fresh_base(trained), str(trained.pt), strict=False)
    assert result.unexpected_keys == [] and _lora_keys(result.missing_keys) == []
    loaded = {k: v for k, v in model.state_dict().items() if k in state}
    assert len(loaded) == len(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    got, ours, live = trained.probe(model), _ours(trained), trained.probe(trained.head.denoiser)
    diff = (got - ours).abs().max().item()
    print(f"{trained.cfg.model.name}: fork loader loaded {len(loaded)}/{len(state)} tensors; "
          f"max |fork - ours| = {diff:.3g}; max |fork - trained| = {(got - live).abs().max().item():.3g}")
    assert diff == 0.0 and torch.equal(got, live)
    assert not torch.equal(got, trained.probe(_fresh_base(trained)))  # the adapter changes the outputs


def test_key_name_drift_is_caught(trained: Trained, tmp_path) -> None:
    """The check above fails on drifted names: PEFT's saved names (no ``.default``, what lora_ckpts held before)
    load nothing through the fork's loader with strict=False, silently."""
    state = torch.load(trained.pt, map_location="cpu", weights_only=True)
    drifted = tmp_path / "drifted.pt"
    torch.save({k.replace(".default.", "."): v for k, v in state.items()}, drifted)
    _, result = fork_load_lora_weights(_fresh_base(trained), str(drifted), strict=False)
    assert len(result.unexpected_keys) == len(state) and len(_lora_keys(result.missing_keys)) == len(state)


# the seed's JSON blocks as this project's overrides: (overrides, the fork loader's r, alpha, dropout, targets)
SEED_CONFIGS = {
    "Custom LoRA Configuration": (["adapter.r=32", "adapter.alpha=64", "adapter.dropout=0.05",
                                   "adapter.targets=[to_q,to_kv]"], 32, 64, 0.05, ["to_q", "to_kv"]),
    "Combining with Noisy Conditioning": (["model.cond_noise_schedule=uniform", "model.cond_noise_std=0.1",
                                           "model.cond_noise_std_min=0.0", "model.cond_noise_std_max=0.2"],
                                          64, 128, 0.0, FORK_TARGETS),
}


@pytest.mark.parametrize("block", sorted(SEED_CONFIGS))
def test_seed_config_blocks_train_and_the_forks_loader_takes_their_pt(block: str, tmp_path) -> None:
    overrides, r, alpha, dropout, targets = SEED_CONFIGS[block]
    trained = _train(tmp_path, "ss", *overrides)
    state = torch.load(trained.pt, map_location="cpu", weights_only=True)
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in state} == set(targets)
    model, result = fork_load_lora_weights(_fresh_base(trained), str(trained.pt), r=r, lora_alpha=alpha,
                                           lora_dropout=dropout, target_modules=targets, strict=False)
    assert result.unexpected_keys == [] and _lora_keys(result.missing_keys) == []
    assert torch.equal(trained.probe(model), _ours(trained))


# --------------------------------------------------------------------------- the seed's code blocks
def seed_installation() -> None:
    from lightning_lora.adapters.api import PEFT_AVAILABLE  # seed: from trellis.utils.lora_utils import PEFT_AVAILABLE
    print(f"PEFT available: {PEFT_AVAILABLE}")


def seed_method_1(base_args: dict, base_weights: dict, lora_path: str, x_t: Any, t: Any, cond: Any) -> Any:
    from lightning_lora.adapters.api import (  # seed: from trellis.utils.lora_utils import (
        LoRAModelWrapper,  # noqa: F401
        apply_lora_to_model,  # noqa: F401
        load_lora_weights,
        merge_lora_weights,  # noqa: F401
    )
    from lightning_lora.models import trellis as models  # seed: from trellis import models

    # Load base model
    base_model = models.ElasticSLatFlowModel(
        **base_args,  # seed: resolution=64, in_channels=8, out_channels=8, # ... other args
    )  # seed: .cuda()
    base_model.load_state_dict(base_weights)  # seed: (the pretrained weights, elided there)

    # Load LoRA weights
    model = load_lora_weights(
        model=base_model,
        lora_path=lora_path,  # seed: "outputs/my_lora_experiment/lora_ckpts/denoiser_lora_step0010000.pt"
        r=64,
        lora_alpha=128,
        target_modules=["to_q", "to_kv", "to_out", "to_qkv"],
    )

    # Use for inference
    model.eval()
    output = model(x_t, t, cond)
    return output


def seed_method_2(base_args: dict, base_weights: dict, lora_path: str) -> Any:
    from lightning_lora.adapters.api import LoRAModelWrapper  # seed: from trellis.utils.lora_utils import ...
    from lightning_lora.models import trellis as models  # seed: from trellis import models

    # Create base model
    base_model = models.SparseStructureFlowModel(
        **base_args,  # seed: resolution=16, in_channels=8, # ... other args
    )  # seed: .cuda()
    base_model.load_state_dict(base_weights)  # seed: (the pretrained weights, elided there)

    # Load with wrapper
    wrapper = LoRAModelWrapper.load(
        base_model=base_model,
        lora_path=lora_path,  # seed: "outputs/my_experiment/lora_ckpts/denoiser_lora_step0010000.pt"
        r=64,
        lora_alpha=128,
    )

    # Get the model for inference
    model = wrapper.get_model()
    model.eval()
    return model


def seed_method_3(base_model: Any, lora_path: str, merged_path: str) -> Any:
    from lightning_lora.adapters.api import load_lora_weights, merge_lora_weights  # seed: trellis.utils.lora_utils

    # Load model with LoRA
    model = load_lora_weights(base_model, lora_path, r=64, lora_alpha=128)

    # Merge LoRA weights into base model
    merged_model = merge_lora_weights(model)

    # Save merged model (standard PyTorch format)
    torch.save(merged_model.state_dict(), merged_path)  # seed: "merged_model.pt"
    return merged_model


def seed_programmatic(base_model: Any, save_path: str) -> Any:
    from lightning_lora.adapters.api import (  # seed: from trellis.utils.lora_utils import (
        apply_lora_to_model,
        get_lora_config,
        print_trainable_parameters,
        save_lora_weights,
    )

    # Create custom LoRA config
    lora_config = get_lora_config(
        r=64,
        lora_alpha=128,
        lora_dropout=0.0,
        target_modules=["to_q", "to_kv", "to_out", "to_qkv"],
    )

    # Apply to model
    peft_model = apply_lora_to_model(
        model=base_model,
        r=64,
        lora_alpha=128,
    )

    # Check parameters
    print_trainable_parameters(peft_model, "My LoRA Model")

    # Save only LoRA weights
    save_lora_weights(peft_model, save_path)  # seed: "my_lora_weights.safetensors"
    return lora_config, peft_model


def seed_troubleshooting(base_model_1: Any, base_model_2: Any, lora_path: str) -> tuple[Any, Any]:
    from lightning_lora.adapters.api import load_lora_weights  # the seed's blocks use the import above

    # Must match training config!
    model = load_lora_weights(
        base_model_1,
        lora_path,
        r=64,           # Same as training
        lora_alpha=128,  # Same as training
        target_modules=["to_q", "to_kv", "to_out", "to_qkv"],  # Same as training
    )
    first = model
    # Use strict=False for partial loading
    model = load_lora_weights(base_model_2, lora_path, strict=False, r=64, lora_alpha=128)  # seed: "..."
    return first, model


def seed_quick_loading(my_model: Any, lora_path: str) -> Any:
    from lightning_lora.adapters.api import LoRAModelWrapper  # seed: from trellis.utils.lora_utils import ...

    wrapper = LoRAModelWrapper.load(
        base_model=my_model,
        lora_path=lora_path,  # seed: "outputs/lora_experiment/lora_ckpts/denoiser_lora_step0010000.pt"
        r=64, lora_alpha=128,
    )
    model = wrapper.get_model()
    return model


def test_seed_training_output_what_to_expect(trained: Trained) -> None:
    """The seed's "What to Expect During Training" block, line for line (numbers: the tiny model's)."""
    counts = api.count_parameters(trained.head.denoiser)
    original = counts["total"] - sum(p.numel() for n, p in trained.head.denoiser.named_parameters() if "lora_" in n)
    expected = ["=" * 60, "Applying LoRA adapters", "=" * 60, "  LoRA rank: 64", "  LoRA alpha: 128",
                "  LoRA dropout: 0.0", "  Target modules: ['to_q', 'to_kv', 'to_out', 'to_qkv']",
                "  Models: ['denoiser']", "", "  denoiser:", f"    Original params: {original:,}",
                f"    Trainable params: {counts['trainable']:,}",
                f"    Reduction: {100 * (1 - counts['trainable'] / original):.2f}%", "=" * 60]
    lines = [line for line in trained.stdout.splitlines() if not line.startswith("    Targets:")]  # ours adds it
    start = lines.index("Applying LoRA adapters") - 1
    assert lines[start:start + len(expected)] == expected
    assert (trained.out / "lora_ckpts" / f"denoiser_lora_step{STEPS:07d}.pt").is_file()  # "Output Structure"


def test_seed_installation(capsys) -> None:
    seed_installation()
    assert capsys.readouterr().out == "PEFT available: True\n"


def test_seed_method_1_load_lora_weights_slat(slat: Trained) -> None:
    cond = slat.batch["cond"]
    x_t = SparseTensor(slat.batch["coords"], slat.batch["feats"])
    t = torch.full((cond.shape[0],), 500.0)
    with torch.no_grad():
        output = seed_method_1(slat.denoiser_args(), slat.base_weights(), str(slat.pt), x_t, t, cond)
    assert torch.equal(output.feats, _ours(slat))


def test_seed_method_2_wrapper_load_ss(ss: Trained) -> None:
    model = seed_method_2(ss.denoiser_args(), ss.base_weights(), str(ss.pt))
    assert torch.equal(ss.probe(model), _ours(ss))


def test_seed_method_3_merge_and_save(trained: Trained, tmp_path) -> None:
    merged = seed_method_3(_fresh_base(trained), str(trained.pt), str(tmp_path / "merged_model.pt"))
    torch.testing.assert_close(trained.probe(merged), _ours(trained), rtol=1e-4, atol=1e-5)
    plain = _fresh_base(trained)  # "no PEFT dependency needed": the merged weights load into the plain class
    plain.load_state_dict(torch.load(tmp_path / "merged_model.pt", weights_only=True))
    torch.testing.assert_close(trained.probe(plain), _ours(trained), rtol=1e-4, atol=1e-5)


def test_seed_programmatic_usage(trained: Trained, tmp_path, capsys) -> None:
    config, peft_model = seed_programmatic(_fresh_base(trained), str(tmp_path / "my_lora_weights.safetensors"))
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (
        64, 128, 0.0, set(FORK_TARGETS))
    total = sum(p.numel() for p in peft_model.parameters())
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    out = capsys.readouterr().out
    assert (f"My LoRA Model Parameters:\n  Total:     {total:,}\n  Trainable: {lora:,} ({100 * lora / total:.2f}%)\n"
            f"  Frozen:    {total - lora:,}") in out
    from lightning_lora.adapters.api import load_lora_weights

    again = load_lora_weights(_fresh_base(trained), tmp_path / "my_lora_weights.safetensors")  # describes itself
    assert torch.equal(trained.probe(again), trained.probe(peft_model))


def test_seed_troubleshooting_and_quick_loading(trained: Trained) -> None:
    first, partial = seed_troubleshooting(_fresh_base(trained), _fresh_base(trained), str(trained.pt))
    quick = seed_quick_loading(_fresh_base(trained), str(trained.pt))
    ours = _ours(trained)
    for model in (first, partial, quick):
        assert torch.equal(trained.probe(model), ours)


# --------------------------------------------------------------------------- the rest of the seed-000 API
def test_api_takes_the_forks_arguments_and_returns_its_values(trained: Trained, tmp_path, capsys) -> None:
    from lightning_lora.models.trellis import TRELLIS_LORA_TARGET_MODULES

    assert TRELLIS_LORA_TARGET_MODULES == FORK_TARGETS == api.DEFAULT_TARGETS and api.PEFT_AVAILABLE is True
    # modules_to_save passes through both (a TypeError before: the value went to LoraConfig twice)
    config = api.get_lora_config(r=4, lora_alpha=8, target_modules=["to_q"], modules_to_save=["out_layer"])
    assert config.modules_to_save == ["out_layer"]
    peft_model = api.apply_lora_to_model(_fresh_base(trained), r=4, lora_alpha=8, modules_to_save=["out_layer"])
    stats = api.count_parameters(peft_model)
    trainable = api.get_trainable_params(peft_model)
    assert set(stats) == {"total", "trainable", "frozen", "trainable_percent"}
    assert stats["trainable"] == sum(p.numel() for p in trainable) and stats["frozen"] == stats["total"] - stats[
        "trainable"] and math.isclose(stats["trainable_percent"], 100 * stats["trainable"] / stats["total"])
    assert any("modules_to_save" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    # the wrapper's constructor adds an adapter (and prints the counts, as the fork's does); a PeftModel is held
    wrapper = api.LoRAModelWrapper(_fresh_base(trained), r=8, lora_alpha=16, lora_dropout=0.1,
                                   target_modules=["to_q", "to_kv"])
    assert "LoRA Model Parameters:" in capsys.readouterr().out
    assert (wrapper.r, wrapper.lora_alpha, wrapper.lora_dropout, wrapper.target_modules) == (
        8, 16, 0.1, ["to_kv", "to_q"])
    assert api.LoRAModelWrapper(wrapper.get_model()).get_model() is wrapper.get_model()
    # save(use_safetensors=False): the fork's torch.save format; .pt appended as the fork does
    written = wrapper.save(tmp_path / "w", use_safetensors=False)
    assert written == tmp_path / "w.pt"
    assert sorted(torch.load(written, weights_only=True)) == sorted(api.lora_state_dict(wrapper.get_model()))
    # load_lora_weights(lora_dropout=) and the wrapper's load take the fork's arguments
    loaded = api.load_lora_weights(_fresh_base(trained), trained.pt, r=64, lora_alpha=128, lora_dropout=0.05,
                                   target_modules=FORK_TARGETS, strict=True)
    assert loaded.peft_config["default"].lora_dropout == 0.05
    wrapped = api.LoRAModelWrapper.load(_fresh_base(trained), trained.pt, r=64, lora_alpha=128, lora_dropout=0.0,
                                        target_modules=FORK_TARGETS)
    assert (wrapped.r, wrapped.lora_alpha) == (64, 128)
    torch.testing.assert_close(trained.probe(wrapped.merge()), _ours(trained), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("call", "needle"), [
    (lambda m, pt: api.load_lora_weights(m, pt), "pass r="),
    (lambda m, pt: api.load_lora_weights(m, pt, r=64, lora_alpha=128, lora_dropout=1.5), "adapter.dropout=1.5"),
    (lambda m, pt: api.load_lora_weights(m, pt, r=32, lora_alpha=64), "needs (32,"),
], ids=["no-r-for-bare-pt", "dropout-out-of-range", "wrong-rank"])
def test_api_mistakes_are_one_line(slat: Trained, call, needle: str) -> None:
    with pytest.raises(UserError) as info:
        call(_fresh_base(slat), slat.pt)
    message = str(info.value)
    assert "\n" not in message and needle in message, message


# --------------------------------------------------------------------------- configs and noisy conditioning
# zadaianchuk/TRELLIS@cbcc337 configs/finetune_{slat_flow_img_dit_L_64l8p2,ss_flow_img_dit_L_16l8}_fp16_lora.json
FORK_CONFIGS = {
    "trellis_slat_lora": {"lr": 5e-6, "weight_decay": 0.01, "batch": 16, "split": 2, "steps": 100000, "save": 5000,
                          "name": "slat_flow_img_dit_L_64l8p2_fp16", "latent": "slat"},
    "trellis_ss_lora": {"lr": 5e-6, "weight_decay": 0.01, "batch": 4, "split": 2, "steps": 100000, "save": 10000,
                        "name": "ss_flow_img_dit_L_16l8_fp16", "latent": "ss"},
}


@pytest.mark.parametrize("experiment", sorted(FORK_CONFIGS))
def test_experiments_reproduce_the_forks_lora_configs(experiment: str) -> None:
    fork = FORK_CONFIGS[experiment]
    cfg = compose_train([f"experiment={experiment}"])
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.dropout, list(cfg.adapter.targets)) == (
        64, 128, 0.0, FORK_TARGETS)
    assert list(cfg.adapter.submodules) == ["denoiser"] and cfg.adapter.init == "kaiming"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.name) == (fork["lr"], fork["weight_decay"],
                                                                                  "constant")
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == fork["batch"]
    assert cfg.trainer.accumulate_grad_batches == fork["split"] and cfg.trainer.max_steps == fork["steps"]
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.log_every_n_steps == 500
    assert cfg.callbacks.adapter_checkpoint.every_n_steps == fork["save"]
    assert fork["name"] in cfg.model.ckpt and cfg.data.kind == fork["latent"] and cfg.model.latent == fork["latent"]
    assert (cfg.model.sigma_min, cfg.model.t_schedule, cfg.model.t_mean, cfg.model.t_std, cfg.model.p_uncond) == (
        1e-5, "logit_normal", 1.0, 1.0, 0.1)
    assert cfg.model.cond_noise_schedule == "none" and cfg.model.cond_noise_at_inference is False
    text = (Path(__file__).parents[1] / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    # every line that sets a value names its source (normalization's mean/std: on their parent's line)
    valued = [line for line in text.splitlines() if ":" in line and not line.lstrip().startswith(("#", "-"))
              and line.split(":", 1)[1].split("#")[0].strip() and line.split(":")[0].strip() not in ("mean", "std")]
    assert valued and all("# fork" in line or "# mixin" in line for line in valued), [
        line for line in valued if "# fork" not in line and "# mixin" not in line]


def test_lognormal_noise_spreads_log_sigma_by_half_as_the_fork() -> None:
    """The fork: log σ = N(0, 1)·0.5 + log(cond_noise_std), σ clamped to [min, max], noise = N(0, 1)·σ; compared
    draw for draw from one seeded generator."""
    head = _tiny_head(cond_noise_schedule="lognormal", cond_noise_std=0.1, cond_noise_std_min=0.0,
                      cond_noise_std_max=0.2, p_uncond=0.0)
    cond = torch.randn(64, 5, 8)
    got = head.condition(cond, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = (torch.randn(64, generator=g) * 0.5 + math.log(0.1)).exp().clamp(0.0, 0.2)
    torch.testing.assert_close(got, cond + torch.randn(cond.shape, generator=g) * sigma.view(-1, 1, 1))


def test_cond_noise_at_inference_is_off_by_default_and_adds_noise_when_on() -> None:
    noisy = {"cond_noise_schedule": "fixed", "cond_noise_std": 0.5}
    cond = torch.randn(1, 5, 64)
    default, off = _tiny_head(**noisy), _tiny_head(**noisy, cond_noise_at_inference=False)
    on, plain = _tiny_head(**noisy, cond_noise_at_inference=True), _tiny_head()
    assert default.cond_noise_at_inference is False
    assert torch.equal(default.condition(cond, train=False), cond)  # validation never adds noise
    samples = [h.eval().sample(cond, steps=2, seed=1) for h in (default, off, on, plain)]
    assert torch.equal(samples[0], samples[1]) and torch.equal(samples[0], samples[3])
    assert not torch.equal(samples[0], samples[2])


def _tiny_head(**overrides: Any) -> Any:
    cfg = compose_train(["model=trellis_ss_tiny", *[f"model.{k}={v}" for k, v in overrides.items()]])
    return instantiate(cfg.model)


# --------------------------------------------------------------------------- the new settings' mistakes
HOSTILE = {  # case -> (overrides, needle in the one error line)
    "cond_noise_at_inference not a bool": (["model.cond_noise_at_inference=maybe"],
                                           "model.cond_noise_at_inference='maybe'"),
    "cond_noise_schedule misspelt": (["model.cond_noise_schedule=log-normal"], "log-normal"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_noisy_conditioning_mistakes_are_one_line(case: str, tmp_path, capsys) -> None:
    from helpers import assert_one_error_line, train_main

    overrides, needle = HOSTILE[case]
    rc = train_main(["model=trellis_ss_tiny", "data.num_shapes=8", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    assert_one_error_line(rc, capsys.readouterr().err, needle, case=case)
