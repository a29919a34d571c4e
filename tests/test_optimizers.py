"""Optimizer presets (``optimizer=adamw|adamw8bit|paged_adamw8bit|prodigy|sgd``, conf/optimizer/): what each
composes to, the one line a missing optional package gives (naming the extra), any class path still allowed."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import compose_train
from helpers import assert_one_error_line, train_main

from lightning_lora.config_checks import check_config
from lightning_lora.errors import UserError
from lightning_lora.train import run


@pytest.mark.parametrize(("preset", "target"), [("adamw", "torch.optim.AdamW"), ("sgd", "torch.optim.SGD"),
                                                 ("adamw8bit", "bitsandbytes.optim.AdamW8bit"),
                                                 ("paged_adamw8bit", "bitsandbytes.optim.PagedAdamW8bit"),
                                                 ("prodigy", "prodigyopt.Prodigy")])
def test_presets_compose_with_the_recipes_numbers(preset, target) -> None:
    cfg = compose_train(["model=sd15", f"optimizer={preset}"])
    assert cfg.optimizer._target_ == target and cfg.optimizer._partial_ is True
    assert cfg.optimizer.weight_decay == 0.01  # recipe/sd15.yaml's, whatever the class
    # Prodigy's lr multiplies its own estimate: the recipe's 1e-4 would stop it, so its preset keeps 1.0
    assert cfg.optimizer.lr == (1.0 if preset == "prodigy" else 1e-4)


def test_default_is_adamw_with_the_shared_numbers() -> None:
    cfg = compose_train([])
    assert dict(cfg.optimizer) == {"lr": 1e-3, "weight_decay": 0.0, "_target_": "torch.optim.AdamW",
                                   "_partial_": True}


@pytest.mark.parametrize(("preset", "module", "extra"), [("adamw8bit", "bitsandbytes", "bnb"),
                                                         ("paged_adamw8bit", "bitsandbytes", "bnb"),
                                                         ("prodigy", "prodigyopt", "prodigy")])
def test_a_missing_optimizer_package_is_one_line_naming_its_extra(preset, module, extra, monkeypatch, tmp_path,
                                                                  capsys) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # not importable, whatever this machine has
    # a model path that does not exist: the optimizer line comes first, before anything loads
    rc = train_main([f"optimizer={preset}", f"model.pretrained={tmp_path / 'absent'}", f"hydra.run.dir={tmp_path}/r"])
    err = capsys.readouterr().err
    assert_one_error_line(rc, err, f"pip install 'lightning_lora[{extra}]'")
    assert module in err.strip().splitlines()[-1]
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_any_optimizer_class_is_still_allowed_and_checked() -> None:
    check_config(compose_train(["optimizer._target_=torch.optim.RMSprop", "+optimizer.alpha=0.9"]))
    with pytest.raises(UserError, match=r"optimizer.betas is not an argument of torch.optim.SGD"):
        check_config(compose_train(["optimizer=sgd", "+optimizer.betas=[0.9,0.99]"]))
    with pytest.raises(UserError, match=r"optimizer._target_='nowhere.Opt' cannot be imported"):
        check_config(compose_train(["optimizer._target_=nowhere.Opt"]))


@pytest.mark.slow  # a real run (about 9 s)
def test_prodigy_trains_when_installed(fast_cfg) -> None:
    pytest.importorskip("prodigyopt")
    cfg = fast_cfg(["optimizer=prodigy", "trainer.max_steps=2", "validate_before=false", "validate_after=false"])
    check_config(cfg)  # the preset's keys are Prodigy's arguments
    _, objects = run(cfg)
    optimizer = objects["trainer"].optimizers[0]
    assert type(optimizer).__name__ == "Prodigy" and optimizer.param_groups[0]["initial_lr"] == 1.0
    assert all(torch.isfinite(p).all() for p in objects["module"].parameters() if p.requires_grad)
    lora_b = [p for n, p in objects["module"].named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # it stepped (lora_B starts at zero)
