"""LoRA EMA (``callbacks.ema``, callbacks/ema.py): the average of the trainable tensors only equals the formula
(and diffusers' EMAModel) after k steps, is written as adapters/final_ema/, is what previews draw with, and a
resumed run continues it bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose_train
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import open_dict
from safetensors.torch import load_file
from tiny import TinyData, TinyHead

from lightning_lora.callbacks import LoRAEMA, SamplePreviews
from lightning_lora.callbacks.ema import EMA_SNAPSHOT, ema_decay
from lightning_lora.config_checks import check_config
from lightning_lora.errors import UserError
from lightning_lora.module import LoRAAdaptationModule
from lightning_lora.train import run


class Weights(Callback):
    """The trainable tensors after every optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()
                                           if p.requires_grad}


class PreviewHead(TinyHead):
    """A preview that shows what the weights are: one pixel holding the sum of every lora_B."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def preview_images(self) -> torch.Tensor:
        total = sum(float(p.sum()) for n, p in self.named_parameters() if "lora_B" in n)
        self.seen.append(total)
        return torch.full((1, 1, 3, 2, 2), 0.5)


def fit(tmp_path: Path, ema: LoRAEMA, steps: int, head: TinyHead | None = None, extra=()) -> tuple:
    module = LoRAAdaptationModule(head or TinyHead(), {"r": 4, "alpha": 8, "init": "gaussian"},
                                  optimizer=lambda ps: torch.optim.SGD(ps, lr=0.3), scheduler={"name": "constant"})
    weights = Weights()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[weights, ema, *extra])
    trainer.fit(module, TinyData())
    return module, weights


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_formula_after_k_steps(tmp_path, warmup) -> None:
    ema = LoRAEMA(tmp_path / "adapters", decay=0.6, every_n_steps=2, update_after_step=1, warmup=warmup, power=0.75)
    module, weights = fit(tmp_path, ema, steps=7)
    # by hand: averaging at steps 2, 4, 6; update n (1, 2, 3) has k = n - 1 - 1; d = 0 while k <= 0
    start = {n: p.detach().clone() for n, p in LoRAAdaptationModule(
        TinyHead(), {"r": 4, "alpha": 8, "init": "gaussian"}).named_parameters() if p.requires_grad}
    expected = start
    for n, step in enumerate((2, 4, 6), start=1):
        k = n - 2
        d = 0.0 if k <= 0 else min(1 - (1 + k) ** -0.75 if warmup else (1 + k) / (10 + k), 0.6)
        expected = {name: expected[name] - (1 - d) * (expected[name] - weights.after[step][name]) for name in start}
    assert ema.updates == 3 and set(ema.shadow) == set(start)
    assert {n for n in ema.shadow if "lora_" not in n} == set()  # the trainable tensors only: no frozen weight
    for name in start:
        assert torch.allclose(ema.shadow[name], expected[name], atol=1e-7), name
    assert not torch.allclose(ema.shadow[next(iter(start))], weights.after[7][next(iter(start))])
    # the final_ema snapshot holds the average; the module keeps its trained weights
    saved = load_file(tmp_path / "adapters" / EMA_SNAPSHOT / "denoiser" / "adapter_model.safetensors")
    peft_keys = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    for name, value in ema.shadow.items():
        key = name.removeprefix("head.denoiser.").replace(".default", "")
        assert torch.equal(peft_keys[key], value), key
    now = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], weights.after[7][n]) for n in now)


def test_ema_decay_matches_diffusers_ema_model() -> None:
    from diffusers.training_utils import EMAModel

    for warmup in (False, True):
        model = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.99, min_decay=0.1, update_after_step=2,
                         use_ema_warmup=warmup, inv_gamma=2.0, power=0.5)
        for update in range(1, 40):
            assert ema_decay(update, 0.99, 2, warmup, 2.0, 0.5, 0.1) == pytest.approx(model.get_decay(update))


def test_previews_draw_with_the_average_and_base_without_adapters(tmp_path) -> None:
    head = PreviewHead()
    ema = LoRAEMA(tmp_path / "adapters", decay=0.5, warmup=False)
    previews = SamplePreviews(tmp_path / "samples", every_n_steps=3, base=True, final=False)
    fit(tmp_path, ema, steps=3, head=head, extra=[previews])
    base, at_3 = head.seen
    assert base == 0.0  # adapters disabled
    assert at_3 == pytest.approx(sum(float(t.sum()) for n, t in ema.shadow.items() if "lora_B" in n), abs=1e-6)
    assert (tmp_path / "samples" / "step_0000003.png").is_file()


def test_ema_settings_are_checked_before_anything_loads() -> None:
    with pytest.raises(UserError, match=r"callbacks.ema.decay=1.5 must be in \[0, 1\]"):
        check_config(compose_train(["callbacks.ema.enabled=true", "callbacks.ema.decay=1.5"]))
    with pytest.raises(UserError, match=r"callbacks.ema.every_n_steps=0 must be a positive integer"):
        check_config(compose_train(["callbacks.ema.every_n_steps=0"]))
    assert compose_train([]).callbacks.ema.enabled is False


class _MyFSDP(FSDPStrategy):
    """A user's subclass of Lightning's FSDP: still sharded."""


@pytest.mark.parametrize("strategy", [["strategy=fsdp"], ["trainer.strategy=fsdp_cpu_offload"],
                                      ["strategy=fsdp", f"trainer.strategy._target_={__name__}._MyFSDP"]])
def test_ema_under_fsdp_is_refused_before_anything_loads(strategy) -> None:
    cfg = compose_train(["callbacks.ema.enabled=true", *strategy])
    with pytest.raises(UserError, match=r"^callbacks.ema.enabled=true cannot run with trainer.strategy=fsdp"):
        check_config(cfg)
    check_config(compose_train(strategy))  # EMA off: FSDP is fine
    check_config(compose_train(["callbacks.ema.enabled=true", "strategy=ddp"]))  # EMA under DDP is fine


RESUME = ["validate_before=false", "validate_after=false", "trainer.max_steps=4", "scheduler.name=constant",
          "scheduler.warmup_ratio=0", "callbacks.ema.enabled=true", "callbacks.ema.decay=0.9"]


@pytest.mark.slow  # three short runs of the tiny BERT (about 15 s on an idle machine)
def test_ema_resumes_bit_for_bit(fast_cfg, tmp_path) -> None:
    def cfg_for(name: str, extra: list[str]):
        cfg = fast_cfg([*RESUME, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        return cfg

    run(cfg_for("full", []))
    run(cfg_for("part", ["trainer.max_steps=2"]))
    state = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(key.startswith("LoRAEMA") for key in state["callbacks"])
    run(cfg_for("part", ["resume=last"]))
    full = load_file(tmp_path / "full" / "adapters" / EMA_SNAPSHOT / "encoder" / "adapter_model.safetensors")
    part = load_file(tmp_path / "part" / "adapters" / EMA_SNAPSHOT / "encoder" / "adapter_model.safetensors")
    final = load_file(tmp_path / "full" / "adapters" / "final" / "encoder" / "adapter_model.safetensors")
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    assert any(not torch.equal(full[k], final[k]) for k in full)  # the average is not the last weights
    config = json.loads((tmp_path / "full" / "adapters" / EMA_SNAPSHOT / "encoder" / "adapter_config.json").read_text())
    assert config["r"] == 8


def test_a_run_without_ema_keeps_no_ema_state(tmp_path) -> None:
    ema = LoRAEMA(tmp_path / "adapters", enabled=False)
    module, _ = fit(tmp_path, ema, steps=1)
    module.trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not any(key.startswith("LoRAEMA") for key in state["callbacks"]) and not ema.shadow
    assert not (tmp_path / "adapters" / EMA_SNAPSHOT).exists()
