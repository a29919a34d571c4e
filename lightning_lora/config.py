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


def tiny_sd_path(path: str) -> str:
    """The tiny Stable Diffusion folder of ``model=sd_tiny``, built at ``path`` on first use."""
    from lightning_lora.models.sd_tiny import ensure_tiny_sd

    return ensure_tiny_sd(path)


def tiny_clip_path(path: str) -> str:
    from lightning_lora.models.tiny_embedders import tiny_clip_path as build

    return build(path)


def tiny_qwen3_vl_path(path: str) -> str:
    from lightning_lora.models.tiny_embedders import tiny_qwen3_vl_path as build

    return build(path)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pkg_model_path"):
        OmegaConf.register_new_resolver("pkg_model_path", package_model_path)
    for name, resolver in (("tiny_sd", tiny_sd_path), ("tiny_clip", tiny_clip_path),
                           ("tiny_qwen3_vl", tiny_qwen3_vl_path)):
        if not OmegaConf.has_resolver(name):  # tiny models built from configs, saved once as real folders
            OmegaConf.register_new_resolver(name, resolver)
