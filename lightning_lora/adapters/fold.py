"""Folding LoRA files into the weights of live layers: W += weight · alpha/r · B·A, layer by layer.

For tools that run a plain model (a diffusers pipeline, a released denoiser) with one or more LoRAs at chosen
strengths. Any format ``formats.read_lora`` knows is accepted; module names resolve against the layer names the
caller gives (``named_layers``), so each family decides which of its parts a file's names map to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_lora.errors import UserError


def named_layers(parts: Mapping[str, nn.Module], rename: Callable[[str], str] | None = None
                 ) -> dict[str, nn.Module]:
    """Every weight-bearing layer of each part by ``<part>.<path>``, and also under ``rename(<part>.<path>)``
    when the files of other tools spell some names differently."""
    layers: dict[str, nn.Module] = {}
    for part, model in parts.items():
        for name, module in model.named_modules():
            if name and hasattr(module, "weight"):
                layers[f"{part}.{name}"] = module
                if rename is not None:
                    layers.setdefault(rename(f"{part}.{name}"), module)
    return layers


def lora_source(path: Path, inside: Sequence[str] = ()) -> Path:
    """A run's adapter snapshot (``adapters/final``) holds a file every tool reads (``inside``, the first one
    present); anything else is read as is (a Hub id is fetched first)."""
    from lightning_lora.adapters.io import adapter_source

    path = adapter_source(path, key="--lora")
    if path.is_dir():
        for name in inside:
            if (path / name).exists():
                return path / name
    return path


def fold_loras(layers: Mapping[str, nn.Module], loras: Sequence[tuple[Path, float]], allow_partial: bool = False,
               *, what: str = "a layer", where: str = "the model", prefixes: Sequence[str] = (),
               inside: Sequence[str] = (), verbose: bool = False) -> list[str]:
    """Fold each LoRA (any format ``read_lora`` knows) into the weights of ``layers`` (by module name):
    W += weight · alpha/r · B·A. A file whose modules match no layer is an error; one that matches only
    some is an error unless ``allow_partial``. ``what``/``where`` name the layers and the model in those errors;
    ``prefixes`` are submodule prefixes a file's names may carry; ``inside`` the files to read in a snapshot
    folder. Returns one report line per LoRA."""
    from lightning_lora.adapters.combine import merge_into
    from lightning_lora.adapters.formats import read_lora, resolve_modules

    reports = []
    for path, weight in loras:
        lora = read_lora(lora_source(path, inside))
        matched: dict[str, str] = {}
        missing: list[str] = []
        for name in lora.modules:
            try:
                matched.update(resolve_modules([name], layers, where=where.removeprefix("the "),
                                               prefixes=(*lora.submodules, *prefixes)))
            except UserError:
                missing.append(name)
        total = len(lora.modules)
        if not matched:
            raise UserError(f"--lora {path}: none of its {total} modules matches {what} (e.g. {missing[0]!r}); "
                            "is it a LoRA for another model?")
        if missing and not allow_partial:
            raise UserError(f"--lora {path}: only {len(matched)} of {total} modules match {where} (first "
                            f"unmatched: {missing[0]!r}); pass --allow-partial to apply the matching ones")
        with torch.no_grad():
            for name, layer in matched.items():
                f, w = lora.modules[name], layers[layer].weight
                if f.weight_shape != tuple(w.shape):
                    raise UserError(f"--lora {path}: module {name!r} makes a delta of shape {list(f.weight_shape)} "
                                    f"but {layer} has shape {list(w.shape)}")
                w.copy_(merge_into(w, [(f, weight)], name=f"{layer} (from --lora {path})"))
                if verbose:
                    reports.append(f"  {layer}: rank {f.rank}, alpha {f.alpha:g}, scale {weight * f.scale:g}, "
                                   f"shape {list(w.shape)}")
        reports.append(f"{path} (weight {weight:g}): {len(matched)} of {total} modules applied")
    return reports
