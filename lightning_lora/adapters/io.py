"""Adapter files: PEFT directories and self-describing single ``.safetensors`` files.

Both hold keys in PEFT's saved format (``base_model.model.<module>.lora_A.weight``), so a PEFT directory
written here loads with ``PeftModel.from_pretrained`` as is. Loading checks every key and shape against
the model first and says which module does not fit, instead of PEFT's warning or torch's size-mismatch wall.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save

from lightning_lora.adapters.finite import count_non_finite, require_float
from lightning_lora.checks import finite, positive_int
from lightning_lora.errors import UserError, pickle_runs_code
from lightning_lora.fileio import atomic_directory, atomic_write_bytes, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
FORMAT_KEY = "lightning_lora.format"
FORMAT_VERSION = "1"

Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- state dicts
FSDP_WRAPPED = "_fsdp_wrapped_module."


def adapter_state(peft_model: PeftModel) -> Tensors:
    """The adapter weights of ``peft_model`` in PEFT's saved key format, contiguous, on CPU.

    Under FSDP (blocks wrapped, ``use_orig_params``) the module names carry ``_fsdp_wrapped_module.`` but
    ``state_dict()`` keys do not, so PEFT's name filter would keep nothing: there the state comes from the
    parameters themselves (whole inside ``strategies.full_params``) and the wrapper's name is dropped, giving the
    keys of an unwrapped model."""
    state_dict = None
    if any(FSDP_WRAPPED in name for name, _ in peft_model.named_modules()):
        state_dict = dict(peft_model.named_parameters())
        state_dict.update(peft_model.named_buffers())
    state = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    return {k.replace(FSDP_WRAPPED, ""): v.detach().to("cpu").contiguous() for k, v in state.items()}


def in_place_state(peft_model: PeftModel) -> Tensors:
    """The adapter weights under the names ``get_peft_model_state_dict`` gives the bare model adapted in place
    (diffusers' ``unet.add_adapter(config)``, PEFT's ``inject_adapter_in_model``): PEFT's saved keys without the
    wrapper's ``base_model.model.``, so ``set_peft_model_state_dict(model, state)`` on such a model loads each one."""
    return {k.removeprefix("base_model.model."): v for k, v in adapter_state(peft_model).items()}


def save_tensor_dict(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> Path:
    """``torch.save`` of a plain dict of tensors (``torch.load(weights_only=True)`` reads it), written atomically:
    for tools whose users load adapters with ``torch.load``; this package itself never unpickles such a file."""
    if not tensors:
        raise UserError(f"{path}: no adapter tensors to save")
    buffer = io.BytesIO()
    torch.save(dict(tensors), buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def normalize_keys(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> Tensors:
    """Accept keys as a module's ``state_dict()`` has them too (with ``.default``) and drop the name."""
    pattern = re.compile(rf"\.{re.escape(adapter_name)}(?=\.weight$|\.bias$|$)")
    return {pattern.sub("", k): v for k, v in state.items()}


def _module_of(key: str) -> str:
    name = key.removeprefix("base_model.model.")
    return re.split(r"\.(?:lora_[A-Za-z_]+|modules_to_save)\b", name)[0]


def load_adapter_state(peft_model: PeftModel, state: Mapping[str, torch.Tensor], *, strict: bool = True,
                       source: str = "adapter") -> None:
    """Load ``state`` into ``peft_model`` after checking names and shapes against it.

    Shapes must always fit. With ``strict`` every adapter tensor of the model must be in ``state`` and
    ``state`` may hold nothing else; without it, only the common keys load and a warning gives the counts.
    """
    state = normalize_keys(state)
    expected = get_peft_model_state_dict(peft_model)
    for key in sorted(set(state) & set(expected)):
        want, got = tuple(expected[key].shape), tuple(state[key].shape)
        if want != got:
            raise UserError(
                f"{source}: tensor {key!r} has shape {got} but module '{_module_of(key)}' of the model "
                f"needs {want} (was the adapter trained on another model or rank?)"
            )
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} adapter tensors missing from the file, e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors in the file fit no adapted module, e.g. {unexpected[0]!r}")
        raise UserError(f"{source}: " + "; ".join(parts) + " (pass strict=False to load the common part)")
    if missing or unexpected:
        warnings.warn(
            f"{source}: loaded {len(set(state) & set(expected))} adapter tensors; {len(missing)} of the model's are "
            f"missing from the file and keep their initial values, {len(unexpected)} in the file were ignored",
            stacklevel=2,
        )
    if not set(state) & set(expected):
        raise UserError(f"{source}: no tensor in the file belongs to an adapted module of this model")
    set_peft_model_state_dict(peft_model, {k: v for k, v in state.items() if k in expected})


def read_tensor_file(path: str | os.PathLike) -> tuple[Tensors, dict[str, str]]:
    """Tensors and metadata from ``.safetensors``, or from ``.pt``/``.pth``/``.bin``/``.ckpt`` (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
            return check_adapter_tensors(tensors, path), metadata
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except pickle.UnpicklingError:
        if pickle_runs_code(path):
            raise UserError(f"{path}: refused: it holds pickled objects that would run code when loaded (only "
                            "tensors are read, weights_only=True)") from None
        raise UserError(f"{path}: not a readable LoRA file (damaged, cut short, or not a file torch.save wrote)"
                        ) from None
    except Exception as e:  # a cut or empty file, a zip that is not a checkpoint
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable LoRA file (safetensors or weights-only torch): {first[:160]}"
                        ) from None
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{path}: expected a mapping of tensor names to tensors")
        return check_adapter_tensors(dict(obj), path), {}
    raise UserError(f"{path}: unknown adapter file type {path.suffix!r}; use .safetensors, .pt, .pth, .bin or .ckpt")


def _is_factor(key: str) -> bool:
    """A LoRA factor or alpha (PEFT, kohya, diffusers spellings), as opposed to a saved whole module."""
    return ("lora" in key and "modules_to_save" not in key) or key.endswith(".alpha")


def check_adapter_tensors(tensors: Tensors, path: str | os.PathLike) -> Tensors:
    """``tensors`` when every LoRA factor is floating point and no tensor holds NaN/Inf; else one line naming the
    file, the tensor and its module (an int8 factor would be loaded as if it held weights, a NaN would spread)."""
    for key, value in tensors.items():
        if _is_factor(key):
            require_float(key, value, str(path))
        if bad := count_non_finite(value):
            module = _module_of(key).removesuffix(".alpha")
            raise UserError(f"{path}: tensor {key!r} of module {module!r} holds {bad} NaN/Inf value"
                            f"{'s' if bad != 1 else ''}; the adapter is damaged (saved after training diverged?)")
    return tensors


def _json(text: str, path: str | os.PathLike, what: str) -> Any:
    """``text`` parsed as JSON, or one line naming the file, the field and the place of the mistake."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _lora_config(data: Any, path: str | os.PathLike, what: str) -> LoraConfig:
    """A checked ``LoraConfig`` from a JSON object: a positive integer ``r`` and finite alphas (a NaN alpha makes
    every update NaN)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: {what} must be a JSON object of LoRA settings, got {type(data).__name__}")
    try:
        config = LoraConfig(**_config_kwargs(data))
    except (TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: {what} is not a valid LoRA config: {first[:160]}") from None
    for key, value in (("r", config.r), *((f"rank_pattern[{k!r}]", v) for k, v in (config.rank_pattern or {}).items())):
        positive_int(value, f"{path}: {what} {key}")
    for key, value in (("lora_alpha", config.lora_alpha),
                       *((f"alpha_pattern[{k!r}]", v) for k, v in (config.alpha_pattern or {}).items())):
        finite(value, f"{path}: {what} {key}")
    return config


# --------------------------------------------------------------------------- PEFT directories
def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # PEFT enums
        return value.value
    return value


def config_dict(config: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    data = _jsonable(config.to_dict())
    data["inference_mode"] = True
    if base_model is not None:
        data["base_model_name_or_path"] = base_model
    return data


def save_peft_dir(peft_model: PeftModel, directory: str | os.PathLike, *, base_model: str | None = None,
                  adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as one atomic directory."""
    config = peft_model.peft_config[adapter_name]
    with atomic_directory(directory) as tmp:
        atomic_write_bytes(tmp / WEIGHTS_NAME, save(adapter_state(peft_model), metadata={"format": "pt"}))
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(config_dict(config, base_model), indent=2, sort_keys=True))
    return Path(directory)


#: marks a snapshot's whole-model PEFT directory (``<snapshot>/model/``): not one more submodule's adapter
WHOLE_MODEL_MARK = "whole_model.json"


def is_submodule_dir(directory: Path) -> bool:
    """A snapshot's PEFT directory for one submodule (not its whole-model export)."""
    return directory.is_dir() and (directory / CONFIG_NAME).is_file() and not (directory / WHOLE_MODEL_MARK).is_file()


def save_whole_model_dir(adapters: Mapping[str, PeftModel], prefixes: Mapping[str, str],
                         directory: str | os.PathLike, *, base_model: str | None = None,
                         adapter_name: str = "default") -> Path:
    """The submodules' adapters as ONE PEFT directory of the model they are parts of, for
    ``PeftModel.from_pretrained(<whole model>, directory)``: ``prefixes[sub]`` is where submodule ``sub`` sits in
    that model (``""`` when its module names already are the whole model's). Targets are the adapted layers' full
    names (a short name such as ``dense`` would also hit layers of the whole model that were never trained, e.g. a
    pooler); ranks and alphas that differ per submodule go into ``rank_pattern``/``alpha_pattern``."""
    from peft.tuners.lora import LoraLayer

    state: Tensors = {}
    targets: list[str] = []
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    keep: set[str] = set()
    first = next(iter(adapters.values())).peft_config[adapter_name]
    for sub, peft_model in adapters.items():
        prefix = prefixes[sub]
        for key, value in adapter_state(peft_model).items():
            state["base_model.model." + prefix + key.removeprefix("base_model.model.")] = value
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.r:
                full = prefix + name
                targets.append(full)
                if module.r[adapter_name] != first.r:
                    ranks[re.escape(full)] = module.r[adapter_name]
                if module.lora_alpha[adapter_name] != first.lora_alpha:
                    alphas[re.escape(full)] = module.lora_alpha[adapter_name]
        keep.update(prefix + m for m in peft_model.peft_config[adapter_name].modules_to_save or [])
    data = config_dict(first, base_model)
    data.update(target_modules=sorted(targets), rank_pattern=ranks, alpha_pattern=alphas,
                modules_to_save=sorted(keep) or None)
    with atomic_directory(directory) as tmp:
        atomic_write_bytes(tmp / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True))
        atomic_write_text(tmp / WHOLE_MODEL_MARK, json.dumps({"submodules": dict(prefixes)}, indent=2))
    return Path(directory)


def read_peft_dir(directory: str | os.PathLike) -> tuple[LoraConfig, Tensors]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"adapter directory not found: {directory}")
    if not (directory / CONFIG_NAME).is_file():
        raise UserError(
            f"{directory} has no {CONFIG_NAME}; a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        text = (directory / CONFIG_NAME).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{directory / CONFIG_NAME}: not UTF-8 text (byte offset {e.start})") from None
    config = _lora_config(_json(text, directory / CONFIG_NAME, "the config"), directory / CONFIG_NAME, "the config")
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (directory / name).is_file():
            return config, read_tensor_file(directory / name)[0]
    raise UserError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")


def load_peft_dir(model: torch.nn.Module, directory: str | os.PathLike, *, trainable: bool = False,
                  strict: bool = True) -> PeftModel:
    """Add the adapter saved in ``directory`` to ``model`` (in place) and return PEFT's handle."""
    config, state = read_peft_dir(directory)
    config.inference_mode = not trainable
    config.base_model_name_or_path = getattr(model, "name_or_path", None)  # PEFT warns on a rename
    from lightning_lora.adapters.inject import check_targets

    check_targets(model, config.target_modules, where=str(directory))
    peft_model = get_peft_model(model, config)
    load_adapter_state(peft_model, state, strict=strict, source=str(directory))
    return peft_model


# --------------------------------------------------------------------------- single self-describing file
def save_adapter_file(path: str | os.PathLike, adapters: Mapping[str, PeftModel], *, family: str = "",
                      base_model: Mapping[str, Any] | None = None, adapter_name: str = "default",
                      extra: Mapping[str, str] | None = None) -> Path:
    """One ``.safetensors`` holding every adapted submodule, described in its metadata.

    Keys are ``<submodule>.<PEFT key>``; a single adapter saved under the name ``""`` keeps plain PEFT keys.
    The metadata names the family, each submodule's LoRA config (rank and alpha, per-module patterns,
    targets) and the base model's identity, so tools need no side files; ``extra`` adds what other tools read
    (``adapters.metadata``: ``modelspec.*``, ``ss_*``).
    """
    tensors: Tensors = {}
    configs: dict[str, LoraConfig] = {}
    for sub, peft_model in adapters.items():
        prefix = f"{sub}." if sub else ""
        tensors.update({prefix + k: v for k, v in adapter_state(peft_model).items()})
        configs[sub] = peft_model.peft_config[adapter_name]
    metadata = adapter_file_metadata(configs, family=family, base_model=base_model, extra=extra)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a single-file adapter is written as .safetensors")
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def adapter_file_metadata(configs: Mapping[str, LoraConfig], *, family: str = "",
                          base_model: Mapping[str, Any] | None = None,
                          extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata that makes a single ``.safetensors`` adapter describe itself (the only writer of it):
    the format version, the family, each submodule's LoRA config (rank and alpha, per-module patterns,
    targets) by submodule name (``""``: plain PEFT keys) and the base model's identity; beside them ``extra``
    (``modelspec.*``, ``ss_*``: strings), which cannot replace those keys."""
    from lightning_lora.adapters.metadata import PEFT_NETWORK_MODULE

    described = {"ss_network_module": PEFT_NETWORK_MODULE, **dict(extra or {})} if extra else {}
    return {
        **described,
        FORMAT_KEY: FORMAT_VERSION,
        "family": family,
        "adapters": json.dumps({sub: config_dict(config) for sub, config in configs.items()}, sort_keys=True),
        "base_model": json.dumps(dict(base_model or {}), sort_keys=True),
    }


def describes_itself(metadata: Mapping[str, str]) -> bool:
    """Whether a tensor file's metadata is ``adapter_file_metadata``'s (else: another layout, or bare)."""
    return bool(metadata.get(FORMAT_KEY))


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, LoraConfig], dict[str, Tensors], dict[str, Any]]:
    """(config per submodule, tensors per submodule, other metadata) from a file written by ``save_adapter_file``."""
    tensors, metadata = read_tensor_file(path)
    if not describes_itself(metadata):
        raise UserError(
            f"{path} carries no lightning_lora metadata; give r, alpha and targets explicitly to load it"
        )
    described = _json(metadata["adapters"], path, "metadata 'adapters'")
    if not isinstance(described, Mapping):
        raise UserError(f"{path}: metadata 'adapters' must map submodule names to LoRA configs, got "
                        f"{type(described).__name__}")
    configs = {sub: _lora_config(c, path, f"metadata 'adapters' [{sub!r}]") for sub, c in described.items()}
    by_sub: dict[str, Tensors] = {sub: {} for sub in configs}
    for key, value in tensors.items():
        sub = next((s for s in sorted(configs, key=len, reverse=True) if s and key.startswith(s + ".")), "")
        if sub not in by_sub:
            raise UserError(f"{path}: tensor {key!r} belongs to no submodule named in the metadata")
        by_sub[sub][key[len(sub) + 1:] if sub else key] = value
    base_model = _json(metadata.get("base_model", "{}"), path, "metadata 'base_model'")
    if not isinstance(base_model, Mapping):
        raise UserError(f"{path}: metadata 'base_model' must be a JSON object, got {type(base_model).__name__}")
    extra = {"family": metadata.get("family", ""), "base_model": dict(base_model)}
    return configs, by_sub, extra


def _config_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only keys this PEFT version's LoraConfig knows (files may come from a newer PEFT)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return {k: v for k, v in data.items() if k in known}


#: the files of an adapter repository on the Hub (PEFT directories, single-file adapters)
ADAPTER_FILES = ("*.json", "*.safetensors")


def adapter_source(path: str | os.PathLike, key: str = "") -> Path:
    """The local path of an adapter named by a local path or a Hub id (a repository or one file of it, fetched into
    the cache). A folder with no PEFT config and exactly one ``.safetensors`` (a diffusers or kohya LoRA
    repository) stands for that file; one holding PEFT's weights file without its config stays a (broken) PEFT
    directory, so the error says what is missing."""
    from lightning_lora import hub

    resolved = hub.resolve(path, key=key, allow_patterns=ADAPTER_FILES)
    if resolved.is_dir() and not (resolved / CONFIG_NAME).is_file():
        files = sorted(resolved.glob("*.safetensors"))
        subdirs = [d for d in resolved.iterdir() if is_submodule_dir(d)]
        if len(files) == 1 and not subdirs and files[0].name != WEIGHTS_NAME:
            return files[0]
    return resolved


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, tuple[LoraConfig, Tensors]], str]:
    """(config and weights per submodule, family or "") from any adapter source this project writes or reads.

    ``path`` is a self-describing ``.safetensors``, one PEFT directory (submodule name ``""``: the head's
    only adapted submodule), or a directory of PEFT directories named by submodule (``adapters/final``); any of
    these by Hub id too.
    """
    path = adapter_source(path)
    if path.is_file():
        configs, states, meta = read_adapter_file(path)
        return {sub: (configs[sub], states[sub]) for sub in configs}, meta["family"]
    if (path / CONFIG_NAME).is_file():
        return {"": read_peft_dir(path)}, ""
    subdirs = sorted(d for d in path.iterdir() if is_submodule_dir(d)) if path.is_dir() else []
    if not subdirs:
        raise UserError(
            f"no adapter at {path}: expected a .safetensors adapter file, a PEFT directory ({CONFIG_NAME} + "
            f"{WEIGHTS_NAME}) or a directory of them per submodule"
        )
    return {d.name: read_peft_dir(d) for d in subdirs}, ""
