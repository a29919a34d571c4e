"""OmegaConf resolvers the shipped configs use."""

from __future__ import annotations

import importlib

from omegaconf import OmegaConf

from lightning_lora.errors import UserError


def package_model_path(module: str) -> str:
    """Folder of a model shipped inside a pip package that exposes ``get_model_path()``."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"model package {module!r} is not installed (pip install {module.replace('_', '-')})") from exc
    return str(mod.get_model_path())


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pkg_model_path"):
        OmegaConf.register_new_resolver("pkg_model_path", package_model_path)
