"""Where the Hydra configs live, composing them from Python, and the OmegaConf resolvers they use
(``${tiny:PATH}``, ``${pkg_model_path:MODULE}``, ``${pkg_model_name:MODULE,NAME}``, ``${cadence:TOTAL,COUNT}``,
``${fresh_dir:PATTERN}``)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_lora.errors import UserError

#: the primary config of ``python -m lightning_lora.train``
CONFIG_NAME = "train"


def config_dir() -> Path:
    """The ``conf/`` folder: inside the package once installed from a wheel (the build maps the repository's
    ``conf/`` there), at the repository root in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise RuntimeError(f"no Hydra configs next to {here}: expected conf/{CONFIG_NAME}.yaml (a broken install?)")


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The training config with command-line style ``overrides``, as ``python -m lightning_lora.train`` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(CONFIG_NAME, list(overrides), return_hydra_config=return_hydra_config)


def package_model_path(module: str) -> str:
    """Folder of a model shipped inside a pip package that exposes ``get_model_path()``."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"model package {module!r} is not installed (pip install {module.replace('_', '-')})") from exc
    return str(mod.get_model_path())


def package_model_name(module: str, name: str, *, _parent_: DictConfig) -> str | None:
    """``${pkg_model_name:MODULE,NAME}``: ``NAME`` (the Hub id of the model a pip package copies) while the preset's
    ``pretrained`` is that package's folder, null once ``pretrained`` names another model: the adapters' metadata and
    the model card then name the model actually trained (its own Hub id or folder), not the preset's."""
    pretrained = _parent_.get("pretrained")
    try:
        same = pretrained is not None and Path(str(pretrained)).resolve() == Path(package_model_path(module)).resolve()
    except UserError:  # the package is not installed: pretrained cannot be its folder
        same = False
    return name if same else None


def tiny_base(path: str, *, _parent_: DictConfig) -> str:
    """``${tiny:PATH}``: the tiny stand-in base of the preset this key belongs to, built at ``PATH`` on first use.

    Every tiny preset uses this one resolver; the head class named by the preset's ``_target_`` knows how its
    stand-in is made (``TaskHead.build_tiny``), and returns what the key takes (a folder or a checkpoint file).
    """
    import torch
    from hydra.utils import get_class

    target = _parent_.get("_target_")
    if not target:
        raise UserError(f"${{tiny:{path}}} sits in a config without a _target_ head class to build it")
    # Building seeds torch's global generator; the caller's random state must not depend on whether the base
    # was already built (a run's LoRA init would differ between the first run and the next).
    with torch.random.fork_rng(devices=[]):
        return str(get_class(str(target)).build_tiny(Path(path).expanduser(), _parent_))


def built_base(path: str, command: str) -> str:
    """``${built:PATH,COMMAND}``: ``PATH`` when it exists; else one line saying which command builds it once (a
    demo base that takes minutes to train is built on purpose, not on first use as the tiny stand-ins are)."""
    if not Path(path).expanduser().exists():
        raise UserError(f"{path} is not built yet: build it once with `{command}` (it is cached there after)")
    return str(path)


def cadence(total: int, count: int) -> int:
    """``${cadence:TOTAL,COUNT}``: the interval that saves ``COUNT`` times over a run of ``TOTAL`` steps (or epochs),
    at least 1, so a preset's save cadence stays proportional when the run is made longer or shorter."""
    if not isinstance(total, int) or total <= 0:
        raise UserError(f"a save cadence of {count} per run needs the run's length, got {total!r} (trainer.max_steps "
                        "for a run bounded by steps, trainer.max_epochs for one bounded by epochs); or set the "
                        "callbacks' every_n_* values themselves")
    return max(1, total // int(count))


def register_resolvers() -> None:
    from lightning_lora.rundir import fresh_dir, run_name, sweep_name

    for name, resolver in (("pkg_model_path", package_model_path), ("pkg_model_name", package_model_name),
                           ("tiny", tiny_base), ("cadence", cadence),
                           ("built", built_base), ("run_name", run_name), ("sweep_name", sweep_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    if not OmegaConf.has_resolver("fresh_dir"):
        # cached per config (as Hydra's ${now:...}): every read of hydra.run.dir in a run is the one directory
        OmegaConf.register_new_resolver("fresh_dir", fresh_dir, use_cache=True)
