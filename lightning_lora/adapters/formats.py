"""LoRA files in every layout the tools meet, read into and written from per-module ``Factors``.

Formats (told from the content):
- ``lightning_lora``: the self-describing single file of ``io.save_adapter_file`` (metadata ``adapters``);
- ``peft``: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``snapshot``: a run's ``adapters/final`` (or ``step_N``): a PEFT directory per submodule, names ``<sub>.<module>``;
- ``kohya``: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
- ``diffusers``: ``unet.<module>.lora_A.weight`` (or ``.lora.down.weight``), no alpha (alpha = rank);
- ``kohya_dotted``: ``<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` on dotted names (the public
  LBM LoRA scripts' ``denoiser.<module>…`` files);
- ``bare``: PEFT keys ``base_model.model.<module>.lora_A.weight`` without a description (alpha = rank assumed).
Module names are the base model's (dotted) for all but kohya, whose names ``resolve_modules`` maps back.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save

from lightning_lora.adapters.factors import Factors, is_spatial
from lightning_lora.adapters.finite import require_finite
from lightning_lora.adapters.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_file_metadata,
    adapter_source,
    config_dict,
    describes_itself,
    is_submodule_dir,
    read_adapter_file,
    read_peft_dir,
    read_tensor_file,
)
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_directory, atomic_write_bytes, atomic_write_text

try:
    from peft.utils.other import get_pattern_key
except ImportError:  # pragma: no cover - older PEFT: the same rule, written out

    def get_pattern_key(pattern_keys, key_to_match: str) -> str:
        return next((k for k in pattern_keys if re.match(rf"(.*\.)?({k})$", key_to_match)), key_to_match)


PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
FORMATS = ("lightning_lora", "peft", "snapshot", "kohya", "kohya_dotted", "diffusers", "bare")
OUTPUT_FORMATS = ("peft", "kohya", "diffusers")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.default)?\.weight$")
_DIFFUSERS_OLD = re.compile(r"^(?P<module>.+)\.lora\.(?P<ab>down|up)\.weight$")
# kohya's tensor names on dotted module paths (the public LBM LoRA scripts: denoiser.<module>.lora_down.weight)
_DOTTED_KOHYA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>down|up)\.weight$")


@dataclass
class LoraSet:
    """Every module of one LoRA file, with what the file says about itself."""

    modules: dict[str, Factors]
    format: str
    family: str = ""
    base_model: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
    submodules: list[str] = field(default_factory=list)  # lightning_lora files: prefixes of the module names
    ignored: list[str] = field(default_factory=list)  # tensors that are not LoRA factors (e.g. modules_to_save)
    #: DoRA's magnitude vectors by module (``read_lora(..., dora=True)`` on a PEFT directory); empty otherwise
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------- reading
def _scale_for(config: LoraConfig, module: str, rank: int) -> float:
    alpha_pattern = dict(config.alpha_pattern or {})
    key = get_pattern_key(list(alpha_pattern), module)
    alpha = float(alpha_pattern.get(key, config.lora_alpha))
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$")


def _pairs_from_peft(state: Mapping[str, torch.Tensor], source: str,
                     magnitudes: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) factors by module; DoRA's magnitude vectors go to ``magnitudes`` when given (a writer that
    carries them), else they are refused: a tool that reads factors only would silently drop them."""
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if (mag := _MAGNITUDE_KEY.match(key)) is not None:
            if magnitudes is None:
                raise UserError(f"{source}: DoRA adapters (lora_magnitude_vector) are not supported by this tool")
            magnitudes[mag["module"].removeprefix(PEFT_PREFIX)] = value
            continue
        if "lora_embedding_" in key:
            raise UserError(f"{source}: {key!r} is an embedding LoRA, which this tool does not handle")
        m = _PEFT_KEY.match(key)
        if not m:
            continue
        module = m["module"].removeprefix(PEFT_PREFIX)
        (a if m["ab"] == "A" else b)[module] = value
    return _zip(a, b, source)


def _zip(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], source: str):
    if set(a) != set(b):
        odd = sorted(set(a) ^ set(b))[0]
        raise UserError(f"{source}: module {odd!r} has only one of its two LoRA factors")
    return {m: (a[m], b[m]) for m in sorted(a)}


def _factors(down: torch.Tensor, up: torch.Tensor, scale: float, module: str, source: str) -> Factors:
    if down.shape[0] != up.shape[1] or down.ndim != up.ndim:
        raise UserError(f"{source}: module {module!r} has factors {list(down.shape)} and {list(up.shape)} "
                        "that do not fit together (down [r, in, ...], up [out, r, ...])")
    if not math.isfinite(scale):
        raise UserError(f"{source}: module {module!r} has a non-finite scale alpha/r = {scale} (its alpha is NaN or "
                        "Inf); the adapter is damaged")
    return Factors(down=down, up=up, scale=float(scale))


def read_lora(path: str | os.PathLike, dora: bool = False) -> LoraSet:
    """Any supported LoRA file or PEFT directory (local, or by Hub id), as {module: Factors} (scale = alpha/r
    folded in). ``dora``: a PEFT directory's DoRA magnitude vectors come back in ``magnitudes`` (else refused)."""
    path = adapter_source(path)
    src = str(path)
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and snapshot_parts(path):
        return _read_snapshot(path)
    if path.is_dir():
        config, state = read_peft_dir(path)
        magnitudes: dict[str, torch.Tensor] | None = {} if dora else None
        mods = {m: _factors(a, b, _scale_for(config, m, a.shape[0]), m, src)
                for m, (a, b) in _pairs_from_peft(state, src, magnitudes).items()}
        lora = LoraSet(mods, "peft", base_model={"name": config.base_model_name_or_path or ""}, path=path,
                       magnitudes=magnitudes or {})
        return _flag_ignored(lora, state)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    tensors, metadata = read_tensor_file(path)  # a damaged or pickled file is a UserError there
    return _flag_ignored(_read_tensors(path, tensors, metadata), tensors)


def snapshot_parts(path: Path) -> list[Path]:
    """The PEFT directories of a run's adapter snapshot (``adapters/final/<submodule>/``), by submodule name."""
    return sorted(d for d in path.iterdir() if is_submodule_dir(d))


def _read_snapshot(path: Path) -> LoraSet:
    """A run's adapter snapshot (``adapters/final``: one PEFT directory per adapted submodule, whatever family files
    lie beside them) as one set whose module names carry their submodule (``<submodule>.<module>``), as a
    self-describing file's do."""
    mods: dict[str, Factors] = {}
    ignored: list[str] = []
    base_name = ""
    for part in snapshot_parts(path):
        lora = read_lora(part)
        mods.update({f"{part.name}.{m}": f for m, f in lora.modules.items()})
        ignored += [f"{part.name}/{k}" for k in lora.ignored]
        base_name = base_name or lora.base_model.get("name", "")
    lora = LoraSet(mods, "snapshot", _snapshot_family(path), base_model={"name": base_name}, path=path,
                   submodules=[p.name for p in snapshot_parts(path)], ignored=ignored)
    if ignored:
        lora.notes.append(f"{len(ignored)} tensors that are not LoRA factors are ignored, e.g. {ignored[0]}")
    return lora


def _snapshot_family(path: Path) -> str:
    """The family a snapshot's own self-describing file beside its PEFT directories names (PEFT directories name
    none); "" when there is no such file."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception:  # a damaged neighbour says nothing about the family
            continue
        if describes_itself(metadata) and metadata.get("family"):
            return metadata["family"]
    return ""


def _flag_ignored(lora: LoraSet, tensors: Mapping[str, torch.Tensor]) -> LoraSet:
    """Record tensors that are not LoRA factors (modules_to_save copies, biases, ...)."""
    lora.ignored = sorted(k for k in tensors
                          if "modules_to_save" in k or ("lora" not in k and not k.endswith(".alpha")))
    if lora.ignored:
        lora.notes.append(f"{len(lora.ignored)} tensors that are not LoRA factors are ignored, e.g. {lora.ignored[0]}")
    return lora


def _read_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> LoraSet:
    src = str(path)
    if describes_itself(metadata):
        configs, states, extra = read_adapter_file(path)
        mods = {}
        for sub, state in states.items():
            for m, (a, b) in _pairs_from_peft(state, src).items():
                name = f"{sub}.{m}" if sub else m
                mods[name] = _factors(a, b, _scale_for(configs[sub], m, a.shape[0]), name, src)
        return LoraSet(mods, "lightning_lora", extra.get("family", ""), extra.get("base_model", {}), path=path,
                       submodules=[s for s in configs if s])
    keys = list(tensors)
    if keys and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return _read_kohya(tensors, src, path)
    dotted = any(_DOTTED_KOHYA.match(k) for k in keys)
    if (dotted or any(_DIFFUSERS_OLD.match(k) for k in keys)
            or (keys and all(k.startswith(DIFFUSERS_PREFIXES) for k in keys))):
        a, b = {}, {}
        for key, value in tensors.items():
            m = _PEFT_KEY.match(key) or _DIFFUSERS_OLD.match(key) or _DOTTED_KOHYA.match(key)
            if m:
                (a if m["ab"] in ("A", "down") else b)[m["module"]] = value
        pairs = _zip(a, b, src)
        if not pairs:
            raise UserError(f"{path}: no LoRA factors found")
        alphas = {k[: -len(".alpha")]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        mods = {m: _factors(d, u, alphas.get(m, d.shape[0]) / d.shape[0], m, src) for m, (d, u) in pairs.items()}
        return LoraSet(mods, "kohya_dotted" if dotted else "diffusers", path=path)
    pairs = _pairs_from_peft(tensors, src)
    if not pairs:
        raise UserError(f"{path}: no LoRA tensors found (expected lora_A/lora_B, lora_down/lora_up or lora.down/up "
                        "keys)")
    mods = {m: _factors(a, b, 1.0, m, src) for m, (a, b) in pairs.items()}
    return LoraSet(mods, "bare", notes=["no alpha recorded: alpha = rank assumed (scale 1)"], path=path)


def _read_kohya(tensors: Mapping[str, torch.Tensor], src: str, path: Path) -> LoraSet:
    down, up, alpha = {}, {}, {}
    for key, value in tensors.items():
        module, _, rest = key.partition(".")
        if rest == "lora_down.weight":
            down[module] = value
        elif rest == "lora_up.weight":
            up[module] = value
        elif rest == "alpha":
            alpha[module] = float(value)
        elif rest in ("hada_w1_a", "lokr_w1") or rest.startswith(("hada_", "lokr_")):
            raise UserError(f"{src}: {key!r} is a LyCORIS (LoHa/LoKr) tensor, which this tool does not handle")
    mods = {}
    for m, (d, u) in _zip(down, up, src).items():
        a = alpha.get(m) or float(d.shape[0])  # kohya: a missing or zero alpha means alpha = rank
        mods[m] = _factors(d, u, a / d.shape[0], m, src)
    return LoraSet(mods, "kohya", family="sd" if any(m.startswith("lora_unet_") for m in mods) else "",
                   path=path)


# ---------------------------------------------------------------------------- names
#: kohya's prefix per text encoder (SDXL's files number both: ``lora_te1_``, ``lora_te2_``)
KOHYA_TEXT_PREFIXES = {"text_encoder_2": "lora_te2_", "text_encoder": "lora_te_"}


def kohya_name(module: str, text_prefixes: Mapping[str, str] | None = None) -> str:
    """``down_blocks.0.x`` -> ``lora_unet_down_blocks_0_x``; ``text_encoder.y`` -> ``lora_te_y`` (or the prefix
    ``text_prefixes`` gives that submodule)."""
    prefixes = {**KOHYA_TEXT_PREFIXES, **(text_prefixes or {})}
    for sub in sorted(prefixes, key=len, reverse=True):
        if module.startswith(sub + "."):
            return prefixes[sub] + module[len(sub) + 1:].replace(".", "_")
    return "lora_unet_" + module.removeprefix("unet.").replace(".", "_")


def kohya_names(module: str) -> list[str]:
    """Every kohya name of ``module``: the first text encoder's layers are ``lora_te_`` (SD 1.x) or ``lora_te1_``
    (SDXL)."""
    name = kohya_name(module)
    return [name, "lora_te1_" + name[len("lora_te_"):]] if name.startswith("lora_te_") else [name]


def diffusers_name(module: str) -> str:
    return module if module.startswith(DIFFUSERS_PREFIXES) else f"unet.{module}"


def resolve_modules(names: Iterable[str], base_modules: Iterable[str], where: str = "base",
                    prefixes: Iterable[str] = ()) -> dict[str, str]:
    """Map LoRA module names to the base's module names: exact, a ``unet.``-style prefix (or one of
    ``prefixes``, e.g. a head's submodule name) added or removed, or kohya's underscore names.
    UserError for a module the base lacks."""
    strip = (*DIFFUSERS_PREFIXES, *(f"{p}." for p in prefixes))
    base = list(base_modules)
    base_set = set(base)
    underscored: dict[str, str] = {}
    for m in base:  # kohya names of a bare UNet (x) or of a diffusers folder (unet.x) are both lora_unet_x
        for name in kohya_names(m):
            underscored.setdefault(name, m)
    out = {}
    for n in names:
        candidates = [n, *(n[len(p):] for p in strip if n.startswith(p)), *(p + n for p in strip)]
        hit = next((c for c in candidates if c in base_set), None) or underscored.get(n)
        if hit is None:
            close = [m for m in base if m.rsplit(".", 1)[-1] == n.rsplit(".", 1)[-1]][:1]
            hint = f" (similar: {close[0]})" if close else f" (e.g. {base[0]})" if base else ""
            raise UserError(f"adapter module {n!r} is not a layer of the {where}{hint}; is it an adapter for another "
                            "model?")
        out[n] = hit
    return out


def rename_like(lora: LoraSet, known: Iterable[str]) -> LoraSet:
    """Give a kohya set the dotted names in ``known`` (e.g. another adapter's modules) where they match."""
    known = list(known)
    if lora.format != "kohya" or not known:
        return lora
    underscored = {name: m for m in known for name in kohya_names(m)}
    lora.modules = {underscored.get(n, n): f for n, f in lora.modules.items()}
    return lora


# ---------------------------------------------------------------------------- configs
def lora_config_for(modules: Mapping[str, Factors], all_modules: Iterable[str] | None = None) -> LoraConfig:
    """A LoraConfig whose targets are exactly ``modules``, with per-module rank and alpha patterns.

    The most common rank/alpha is the default and the rest go to ``rank_pattern``/``alpha_pattern``.
    Plain names are used when PEFT's suffix matching picks exactly these modules (checked against
    ``all_modules``, the base's layer names); otherwise anchored regexes are used.
    """
    from collections import Counter

    if not modules:
        raise UserError("no module to save: the LoRA would be empty (lower --min-diff or widen --modules)")
    names = sorted(modules)
    ranks = {m: f.rank for m, f in modules.items()}
    alphas = {m: _nice(f.alpha) for m, f in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    everything = set(all_modules or ()) | set(names)

    def suffix_hits(target: str) -> list[str]:
        return [m for m in everything if m == target or m.endswith("." + target)]

    plain = all(suffix_hits(n) == [n] for n in names)
    targets: list[str] | str = names if plain else "(?:" + "|".join(re.escape(n) for n in names) + ")"

    def key(n: str) -> str:  # PEFT matches pattern keys as r"(.*\.)?(key)$"; anchor them to the whole name
        return n if plain and re.escape(n) == n else (r"(?<![\s\S])" + re.escape(n))

    rank_pattern = {key(m): v for m, v in ranks.items() if v != r}
    alpha_pattern = {key(m): v for m, v in alphas.items() if v != alpha}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, lora_dropout=0.0, init_lora_weights=True)
    return config


def _nice(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def route_prefixed(config: LoraConfig, state: Mapping[str, torch.Tensor], submodules: Mapping[str, list[str]],
                   source: str = "adapter") -> tuple[str, LoraConfig, dict[str, torch.Tensor]] | None:
    """An unnamed adapter whose module names all start with ``<submodule>.`` (an extracted ``denoiser.…`` or
    ``unet.…`` file) as that submodule's adapter with the prefix removed: (submodule, config, PEFT state)."""
    pairs = _pairs_from_peft(state, source)
    for sub, names in submodules.items():
        prefix, known = sub + ".", set(names)
        if all(m in known for m in pairs):  # already the submodule's own names (BERT's encoder.layer.N...)
            return None
        if pairs and all(m.startswith(prefix) and m[len(prefix):] in known for m in pairs):
            modules = {m[len(prefix):]: _factors(a, b, _scale_for(config, m, a.shape[0]), m, source)
                       for m, (a, b) in pairs.items()}
            return sub, lora_config_for(modules, names), _peft_state(modules, None)
    return None


# ---------------------------------------------------------------------------- writing
def _peft_state(modules: Mapping[str, Factors], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for m, f in modules.items():
        state[f"{PEFT_PREFIX}{m}.lora_A.weight"] = _cast(f.down, dtype)
        state[f"{PEFT_PREFIX}{m}.lora_B.weight"] = _cast(f.up, dtype)
    return state


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (t.to(dtype) if dtype is not None else t).contiguous()


def check_result(modules: Mapping[str, Factors], out: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Every factor and scale finite (also once cast to ``dtype``) before anything is written to ``out``."""
    for m, f in modules.items():
        if not math.isfinite(f.scale):
            raise UserError(f"module {m!r} of the LoRA for {out} has a non-finite scale {f.scale}; nothing was written")
        require_finite(((f"{m}.{part}", _cast(t, dtype)) for part, t in (("down", f.down), ("up", f.up))),
                       f"the LoRA for {out}: factor", hint="; are the weights too large? nothing was written")


def write_lora_file(path: str | os.PathLike, modules: Mapping[str, Factors], *, family: str = "",
                    base_model: Mapping[str, Any] | None = None, all_modules: Iterable[str] | None = None,
                    dtype: torch.dtype | None = None, extra: Mapping[str, str] | None = None) -> Path:
    """The self-describing single file (same layout as ``io.save_adapter_file`` with submodule name ""); ``extra``:
    ``modelspec.*``/``ss_*`` keys (``adapters.metadata``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"--out {path}: a LoRA file is written as .safetensors")
    check_result(modules, path, dtype)
    metadata = adapter_file_metadata({"": lora_config_for(modules, all_modules)}, family=family, base_model=base_model,
                                     extra=extra)
    return atomic_write_bytes(path, save(_peft_state(modules, dtype), metadata=metadata))


def write_peft_dir(directory: str | os.PathLike, modules: Mapping[str, Factors], *, base_model: str | None = None,
                   all_modules: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> Path:
    check_result(modules, directory, dtype)
    config = lora_config_for(modules, all_modules)
    with atomic_directory(directory) as tmp:
        atomic_write_bytes(tmp / WEIGHTS_NAME, save(_peft_state(modules, dtype), metadata={"format": "pt"}))
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(config_dict(config, base_model), indent=2, sort_keys=True))
    return Path(directory)


def write_kohya(path: str | os.PathLike, modules: Mapping[str, Factors], dtype: torch.dtype | None = None,
                metadata: Mapping[str, str] | None = None, text_prefixes: Mapping[str, str] | None = None) -> Path:
    """``lora_unet_…``/``lora_te_…`` keys with each module's true alpha; ``ss_network_dim/alpha`` describe the
    linear modules (convolutions are described by ``conv_dim``/``conv_alpha`` in ``ss_network_args``); ``metadata``
    adds other keys (``modelspec.*``, the run's ``ss_*``) but not over those three, which the tensors decide."""
    check_result(modules, path, dtype)
    tensors = {}
    for m, f in modules.items():
        name = kohya_name(m, text_prefixes)
        tensors[f"{name}.lora_down.weight"] = _cast(f.down, dtype)
        tensors[f"{name}.lora_up.weight"] = _cast(f.up, dtype)
        tensors[f"{name}.alpha"] = torch.tensor(f.alpha, dtype=torch.float32)
    linear = [f for f in modules.values() if not is_spatial(f.weight_shape)] or list(modules.values())
    meta = {**dict(metadata or {}), "ss_network_module": "networks.lora",
            "ss_network_dim": str(_common(f.rank for f in linear)),
            "ss_network_alpha": str(_common(_nice(f.alpha) for f in linear))}
    return atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def write_diffusers(path: str | os.PathLike, modules: Mapping[str, Factors],
                    dtype: torch.dtype | None = None, magnitudes: Mapping[str, torch.Tensor] | None = None) -> Path:
    """``unet.<module>.lora_A.weight`` keys; diffusers assumes alpha = rank, so the scale is folded into B (DoRA's
    weight norm is taken of W + scale·B·A, so folding keeps it too). ``magnitudes``: DoRA's vectors, as
    ``<module>.lora_magnitude_vector.weight``: diffusers' loader turns the name into ``use_dora``, and the
    text encoder's loader (transformers' ``load_adapter``) maps only this form to its layers."""
    check_result(modules, path, dtype)
    tensors = {}
    for m, f in modules.items():
        name = diffusers_name(m)
        tensors[f"{name}.lora_A.weight"] = _cast(f.down, dtype)
        tensors[f"{name}.lora_B.weight"] = _cast(f.up * f.scale, dtype)
    for m, magnitude in (magnitudes or {}).items():
        tensors[f"{diffusers_name(m)}.lora_magnitude_vector.weight"] = _cast(magnitude, dtype)
    return atomic_write_bytes(Path(path), save(tensors, metadata={"format": "pt"}))


def _common(values: Iterable[Any]) -> Any:
    from collections import Counter

    return Counter(values).most_common(1)[0][0]


def extra_output_path(out: Path, fmt: str) -> Path:
    """Where ``--format`` puts its extra copy next to the main file."""
    if fmt == "peft":
        return out.with_name(out.stem + "_peft")
    return out.with_name(f"{out.stem}.{fmt}.safetensors")

