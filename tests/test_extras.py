"""The install footprint: a plain install holds the default job; a family, a demo or a logger that needs an extra
stops with one line naming it, before any weight loads (lightning_lora/extras.py, train.check_packages); the
extras named there exist in pyproject.toml and bring the package they name."""

from __future__ import annotations

import re
import sys

import pytest
import tomllib
from conftest import REPO
from helpers import assert_one_error_line, train_main

from lightning_lora import extras

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_extra_named_in_a_hint_exists_and_brings_its_package():
    optional = PYPROJECT["optional-dependencies"]
    for module, (package, extra) in extras.EXTRAS.items():
        brought = _names(optional[extra])
        assert package in brought or f"{package}-skinny" in brought, (module, extra, optional[extra])
        assert package not in _names(PYPROJECT["dependencies"]), package  # an extra, not a plain dependency
    cuda_only = {"bnb", "optim"}  # bitsandbytes: kept out of [all], which must install on any machine
    assert f"lightning_lora[{','.join(sorted(set(optional) - {'all', 'dev'} - cuda_only))}]" in [
        re.sub(r"\[(.*)\]", lambda m: "[" + ",".join(sorted(m.group(1).split(","))) + "]", r) for r in optional["all"]]
    assert "lightning_lora[all]" in optional["dev"]


def test_a_plain_install_holds_no_package_nothing_imports():
    assert not {"sentence-transformers", "diffusers", "scikit-learn"} & _names(PYPROJECT["dependencies"])


def test_available_reads_a_module_without_importing_it(monkeypatch):
    assert extras.available("json") and not extras.available("no_such_module_here")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an absent package looks like to an import
    assert not extras.available("diffusers")
    assert extras.missing_line("diffusers", "model=sd_tiny") == (
        "model=sd_tiny needs diffusers: pip install 'lightning_lora[sd]'")


@pytest.mark.parametrize(("overrides", "module", "line"), [
    (["model=sd_tiny"], "diffusers", "model=sd_tiny needs diffusers: pip install 'lightning_lora[sd]'"),
    (["model=lbm_tiny"], "diffusers", "model=lbm_tiny needs diffusers: pip install 'lightning_lora[sd]'"),
    (["model=clip_tiny", "data=digits_retrieval"], "sklearn",
     "data=digits_retrieval needs scikit-learn: pip install 'lightning_lora[demo]'"),
])
def test_a_family_or_demo_without_its_extra_is_one_line_before_anything_loads(overrides, module, line, tmp_path,
                                                                             capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)
    cache = tmp_path / "cache"
    rc = train_main([*overrides, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_error_line(rc, capsys.readouterr().err, line)
    assert not cache.exists()  # no tiny base was built, no data set written
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_sample_command_without_its_extra_is_one_line(tmp_path, capsys, monkeypatch):
    from lightning_lora.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "diffusers", None)
    rc = cli_main(["sample", "sd", "--pretrained", str(tmp_path), "--prompt", "a cat",
                   "--out", str(tmp_path / "x.png")])
    assert_one_error_line(rc, capsys.readouterr().err,
                          "lightning-lora sample sd needs diffusers: pip install 'lightning_lora[sd]'")


def test_the_demo_base_builder_without_its_extras_is_one_line(capsys, monkeypatch):
    from lightning_lora.demos.pretrain import main as pretrain_main

    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert_one_error_line(pretrain_main(["sd"]), capsys.readouterr().err,
                          "python -m lightning_lora.demos.pretrain sd needs scikit-learn: "
                          "pip install 'lightning_lora[demo]'")
