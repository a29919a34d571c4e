"""One table of the training config's values, checked before any model or corpus loads (``train.run``).

Each ``Rule`` names a dotted key and the check its value gets; a rule whose key the config does not hold is skipped
(a data module without ``val_fraction``, an optimizer without ``betas``), so the table serves every model and data
option without naming any. A bad value stops the run with one ``UserError`` line in the layout of ``checks.py``:
``key=value must be ...``. The checks that need the objects themselves stay with them: the adapter spec
(``AdapterSpec``), a rank larger than its layer (``LoRAAdaptationModule``, once the base is built), a data module's
reader checks (its ``setup``); ``check_resume_fits`` compares a resumed checkpoint with the run's settings.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_lora.checks import (
    boolean,
    choice,
    dotted_function,
    fraction,
    integer,
    non_negative_int,
    number,
    positive_int,
)
from lightning_lora.errors import UserError, find_user_error

Check = Callable[[Any, str], Any]
_ABSENT = object()
#: the learning-rate schedules ``module.ScheduleSpec`` knows (after warmup)
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Rule:
    """``check(value, key)`` for the value at ``key`` (dotted); ``nullable`` lets ``null`` pass unchecked."""

    key: str
    check: Check
    nullable: bool = False


# ---------------------------------------------------------------------------- checks the table uses
def _positive_number(value: Any, key: str) -> float:
    return number(value, key, low=0, low_open=True)


def _non_negative_number(value: Any, key: str) -> float:
    return number(value, key, low=0)


def _positive_int(value: Any, key: str) -> int:
    return positive_int(value, key)


def _non_negative_int(value: Any, key: str) -> int:
    return non_negative_int(value, key)


def _steps(value: Any, key: str) -> int:
    """A run length: -1 (no limit) or a positive count."""
    return integer(value, key, low=1, also=(-1,))


def _at_least_one(value: Any, key: str) -> float:
    return number(value, key, low=1)


def _fraction(interval: str) -> Check:
    return lambda value, key: fraction(value, key, interval=interval)


def _betas(value: Any, key: str) -> Any:
    """Adam's two decay rates, each in [0, 1)."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise UserError(f"{key}={value!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    for i, beta in enumerate(value):
        number(beta, f"{key}[{i}]", low=0, high=1, high_open=True)
    return value


def _batches(value: Any, key: str) -> Any:
    """Lightning's ``limit_*_batches`` / ``overfit_batches``: a count (an int >= 0) or a fraction in [0, 1]."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise UserError(f"{key}={value!r} must be a number of batches (an integer >= 0) or a fraction in [0, 1]")


_TIME = re.compile(r"^\d+:\d{1,2}:\d{1,2}:\d{1,2}$")


def _val_check_interval(value: Any, key: str) -> Any:
    """Every N training batches (an int >= 1), a fraction of an epoch in (0, 1], or a time ``DD:HH:MM:SS``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    if (isinstance(value, str) and _TIME.match(value.strip())) or isinstance(value, dict):
        return value
    raise UserError(f"{key}={value!r} must be a number of batches >= 1, a fraction of an epoch in (0, 1], or a "
                    "time DD:HH:MM:SS")


def _seed(value: Any, key: str) -> int:
    """numpy's seeds are 32-bit: Lightning replaces any other by 0 with only a warning."""
    return integer(value, key, low=0, high=2**32 - 1)


def _gradient_clip_algorithm(value: Any, key: str) -> str:
    return choice(value, key, ("norm", "value"), also=("null",))


def _deterministic(value: Any, key: str) -> Any:
    if value != "warn":
        boolean(value, key, hint=" (or warn)")
    return value


def _fast_dev_run(value: Any, key: str) -> Any:
    if not isinstance(value, bool):
        integer(value, key, low=0, hint=" (batches), or true or false")
    return value


def _precision(value: Any, key: str) -> Any:
    """One of the values Lightning's Trainer takes (its ``_PRECISION_INPUT``)."""
    accepted = _precisions()
    if value not in accepted or isinstance(value, bool):
        names = dict.fromkeys(str(v) for v in accepted)  # 16 and '16' are both taken: named once
        raise UserError(f"{key}={value!r} is unknown; valid: {', '.join(names)}")
    return value


def _precisions() -> tuple[Any, ...]:
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT

    return tuple(v for literal in get_args(_PRECISION_INPUT) for v in get_args(literal))


def _path(kind: str) -> Check:
    """A local file (``kind='file'``) or directory that must exist: the data module would refuse it anyway, but
    only after the run directory's files were written."""

    def check(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{key}={value!r} must be the path of an existing {kind}")
        path = Path(value).expanduser().resolve()
        if not (path.is_file() if kind == "file" else path.is_dir()):
            found = "not found" if not path.exists() else f"not a {kind}"
            raise UserError(f"{key}={value} must be an existing {kind} ({found}: {path})")
        return path

    return check


def _roots(value: Any, key: str) -> Any:
    """Comma-separated directories (or a list of them), each existing."""
    roots = [r.strip() for r in value.split(",")] if isinstance(value, str) else value
    if not isinstance(roots, list | tuple) or not roots or not all(isinstance(r, str) and r for r in roots):
        raise UserError(f"{key}={value!r} must be one or more existing directories, comma-separated")
    for root in roots:
        _path("directory")(root, key)
    return value


def _function_or(*names: str) -> Check:
    """One of ``names``, or the dotted path of a function that imports (e.g. a preset's own colour rule)."""
    def check(value: Any, key: str) -> Any:
        if value in names or dotted_function(value) is not None:
            return value
        raise UserError(f"{key}={value!r} must be {' or '.join(names)} or the dotted path of a function that imports")
    return check


def _optimizer(node: Any, key: str) -> None:
    """``_target_`` a torch optimizer class, built later over the adapter's parameters (``_partial_: true``),
    and every other key one of its arguments."""
    if not isinstance(node, dict) or "_target_" not in node:
        raise UserError(f"{key} must be a mapping with _target_ naming a torch optimizer class, e.g. torch.optim.AdamW")
    cls = _optimizer_class(node["_target_"], f"{key}._target_")
    if node.get("_partial_") is not True:
        raise UserError(f"{key}._partial_={_shown(node.get('_partial_'))} must be true: the optimizer is built later, "
                        "over the adapter's parameters")
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    valid = [name for name in parameters if name not in ("self", "params")]
    for name in node:
        if name.startswith("_"):
            continue
        if name == "params" or (name not in parameters and not takes_any):
            raise UserError(f"{key}.{name} is not an argument of {node['_target_']}; valid: {', '.join(valid)}")
    if "lr" in node and not (node["lr"] is None and "lr" in parameters and parameters["lr"].default is None):
        _positive_number(node["lr"], f"{key}.lr")  # lr=0 trains nothing; torch takes it silently


def _optimizer_class(target: Any, key: str) -> type:
    import torch
    from hydra.utils import get_class

    if (extra := _missing_extra(str(target))) is not None:
        package, name = extra
        raise UserError(f"{key}={target} needs the {package} package, which is not installed: pip install "
                        f"'lightning_lora[{name}]' (or choose another optimizer, e.g. optimizer=adamw)")
    try:
        cls = get_class(str(target))
    except Exception:  # not importable: Hydra's message is several lines
        raise UserError(f"{key}={target!r} cannot be imported ({_import_failure(str(target))}); valid: a torch "
                        "optimizer class such as torch.optim.AdamW") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"{key}={target!r} is not a torch optimizer class (a subclass of torch.optim.Optimizer), "
                        "e.g. torch.optim.AdamW")
    return cls


#: the optional optimizer packages by top-level module: (distribution, the pyproject extra that installs it)
OPTIMIZER_EXTRAS = {"bitsandbytes": ("bitsandbytes", "bnb"), "prodigyopt": ("prodigyopt", "prodigy")}


def _missing_extra(target: str) -> tuple[str, str] | None:
    """(package, extra) when ``target`` lives in an optional optimizer package that is not installed."""
    import importlib.util

    root = target.split(".")[0]
    if root not in OPTIMIZER_EXTRAS:
        return None
    try:
        found = importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):  # a broken install or a module stub without a spec
        found = False
    return None if found else OPTIMIZER_EXTRAS[root]


def _import_failure(target: str) -> str:
    """Why ``module.Name`` does not import, in a few words: no such module, or no such name in it."""
    import importlib

    module, _, name = target.rpartition(".")
    if not module:
        return "give the full path, module.Class"
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"no module {module}" if isinstance(exc, ModuleNotFoundError) else \
            f"{module} fails to import: {type(exc).__name__}"
    return f"{module} has no {name}"


# ---------------------------------------------------------------------------- the devices a run asks for
def _accelerator(value: Any, key: str) -> Any:
    """A known accelerator name that this machine has (an accelerator object passes)."""
    if not isinstance(value, str) or value == "auto":
        return value
    from lightning.pytorch.accelerators import AcceleratorRegistry

    names = sorted(AcceleratorRegistry.available_accelerators())
    choice(value, key, [*names, "gpu"], also=("auto",))
    if not _accelerator_class(value).is_available():
        usable = [n for n in names if AcceleratorRegistry[n]["accelerator"].is_available()]
        raise UserError(f"{key}={value!r}: this machine has no such device; valid here: auto, {', '.join(usable)}")
    return value


def _accelerator_class(name: str) -> Any:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    if name == "gpu":  # Lightning's alias: CUDA, else Apple's MPS
        import torch

        name = "mps" if not torch.cuda.is_available() and torch.backends.mps.is_available() else "cuda"
    return AcceleratorRegistry[name]["accelerator"]


def _accelerator_in_use(trainer: Mapping[str, Any]) -> str | None:
    """The accelerator ``trainer.accelerator`` gives on this machine (``auto``: the first available of cuda, mps,
    cpu); None when it is an object."""
    value = trainer.get("accelerator", "auto")
    if not isinstance(value, str):
        return None
    if value != "auto":
        return value
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return next((n for n in ("cuda", "mps") if AcceleratorRegistry[n]["accelerator"].is_available()), "cpu")


def _device_list(value: Any) -> int | list[int] | None:
    """``devices`` as Lightning reads it (a count, -1 or a list of indices); None when it is none of them."""
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-1|\d+", text):
            return int(text)
        if re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text):
            return [int(x) for x in text.split(",") if x.strip()]
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                          for v in value):
        return list(value)
    return None


def check_devices(trainer: Mapping[str, Any]) -> None:
    """``trainer.devices`` for the accelerator in use: CPU takes a number of processes, a GPU also -1 (all) or a
    list of indices, no more than the machine has."""
    value = trainer.get("devices", "auto")
    if value == "auto" or (accelerator := _accelerator_in_use(trainer)) is None:
        return
    devices = _device_list(value)
    if accelerator == "cpu":
        if not isinstance(devices, int) or devices < 1:
            raise UserError(f"trainer.devices={value!r} must be auto or a number of processes >= 1 on CPU")
        return
    if devices is None or devices == 0 or (isinstance(devices, int) and devices < -1) or (
            isinstance(devices, list) and len(set(devices)) != len(devices)):
        raise UserError(f"trainer.devices={value!r} must be auto, -1 (all), a number of devices >= 1 or a list of "
                        "distinct device indices such as [0,1]")
    count = _accelerator_class(accelerator).auto_device_count()
    wanted = max(devices) + 1 if isinstance(devices, list) else devices
    if wanted > count:
        raise UserError(f"trainer.devices={value!r} asks for more {accelerator} devices than this machine has "
                        f"({count})")


def _repo_id(value: Any, key: str) -> None:
    """A Hub repository id the Hub's own validator accepts (``namespace/name`` or ``name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(value))
    except HFValidationError as exc:
        raise UserError(f"{key}={value} is not a valid Hub repository id: {' '.join(str(exc).split())}") from None


# ---------------------------------------------------------------------------- the table
RULES: tuple[Rule, ...] = (
    Rule("seed", _seed, nullable=True),  # null: Lightning picks one
    Rule("validate_before", boolean),
    Rule("validate_after", boolean),
    Rule("gradient_checkpointing", boolean),
    # optimizer: the class first (its arguments are checked against it), then the values torch would take silently
    Rule("optimizer", _optimizer),
    Rule("optimizer.weight_decay", _non_negative_number),
    Rule("optimizer.eps", _positive_number),
    Rule("optimizer.betas", _betas),
    Rule("optimizer.momentum", _non_negative_number),
    Rule("optimizer.dampening", _non_negative_number),
    Rule("optimizer.alpha", _non_negative_number),
    Rule("optimizer.amsgrad", boolean),
    Rule("optimizer.nesterov", boolean),
    Rule("optimizer.maximize", boolean),
    Rule("optimizer.foreach", boolean, nullable=True),
    Rule("optimizer.fused", boolean, nullable=True),
    # scheduler (ScheduleSpec repeats these for Python callers; here they come one key at a time)
    Rule("scheduler.name", lambda v, k: choice(v, k, SCHEDULES)),
    Rule("scheduler.warmup_steps", _non_negative_int),
    Rule("scheduler.warmup_ratio", _fraction("[0, 1)")),
    Rule("scheduler.min_lr_ratio", _fraction("[0, 1]")),
    # data: the keys the shipped data modules share, wherever a module has them
    Rule("data.batch_size", _positive_int),
    Rule("data.val_batch_size", _positive_int, nullable=True),  # null: batch_size
    Rule("data.num_workers", _non_negative_int),
    Rule("data.val_fraction", _fraction("[0, 1)")),
    Rule("data.max_train_samples", _positive_int, nullable=True),
    Rule("data.max_val_samples", _positive_int, nullable=True),
    Rule("data.num_images", _positive_int, nullable=True),
    Rule("data.num_shapes", _positive_int),
    Rule("data.samples_per_epoch", _positive_int, nullable=True),
    Rule("data.shuffle_buffer", _non_negative_int),
    Rule("data.per_shard", _positive_int),
    Rule("data.image_size", _positive_int),
    Rule("data.resolution", _positive_int),
    Rule("data.max_num_voxels", _positive_int),
    Rule("data.max_code_lines", _positive_int),
    Rule("data.min_summary_words", _non_negative_int),
    Rule("data.shuffle", boolean),
    Rule("data.drop_last", boolean),
    Rule("data.center_crop", boolean),
    Rule("data.random_flip", boolean),
    Rule("data.skip_unreadable", boolean),
    Rule("data.shardshuffle", boolean),
    Rule("data.caption_dropout", _fraction("[0, 1]")),
    Rule("data.shuffle_tags", boolean),
    Rule("data.keep_tokens", _non_negative_int),
    Rule("data.crop_coords", boolean),
    Rule("data.buckets.enabled", boolean),
    Rule("data.buckets.pixels", _positive_int, nullable=True),
    Rule("data.buckets.step", _positive_int),
    Rule("data.buckets.max_ratio", _at_least_one),
    Rule("data.invert", boolean),
    Rule("data.train_path", _path("file")),
    Rule("data.val_path", _path("file"), nullable=True),
    Rule("data.train_dir", _path("directory")),
    Rule("data.validation_dir", _path("directory"), nullable=True),
    Rule("data.stdlib_dir", _path("directory"), nullable=True),
    Rule("data.roots", _roots),
    Rule("data.num_class_images", _positive_int),
    Rule("data.streaming", boolean),
    Rule("data.class_sample_steps", _positive_int),
    Rule("model.prior_loss_weight", _non_negative_number),
    Rule("model.previews.colours", _function_or("pca")),
    # the LoRA EMA callback (callbacks/ema.py repeats these for Python callers): before anything loads
    Rule("callbacks.ema.enabled", boolean),
    Rule("callbacks.ema.decay", _fraction("[0, 1]")),
    Rule("callbacks.ema.min_decay", _fraction("[0, 1]")),
    Rule("callbacks.ema.every_n_steps", _positive_int),
    Rule("callbacks.ema.update_after_step", _non_negative_int),
    Rule("callbacks.ema.warmup", boolean),
    Rule("callbacks.ema.inv_gamma", _positive_number),
    Rule("callbacks.ema.power", _positive_number),
    Rule("callbacks.ema.previews", boolean),
    # trainer: what Lightning would refuse only once the model is built, or take and fail on mid-run
    Rule("trainer.max_steps", _steps),
    Rule("trainer.max_epochs", _steps, nullable=True),
    Rule("trainer.min_steps", _non_negative_int, nullable=True),
    Rule("trainer.min_epochs", _non_negative_int, nullable=True),
    Rule("trainer.accumulate_grad_batches", _positive_int),
    Rule("trainer.precision", _precision, nullable=True),
    Rule("trainer.accelerator", _accelerator),
    Rule("trainer.num_nodes", _positive_int),
    Rule("trainer.gradient_clip_val", _non_negative_number, nullable=True),
    Rule("trainer.gradient_clip_algorithm", _gradient_clip_algorithm, nullable=True),
    Rule("trainer.val_check_interval", _val_check_interval, nullable=True),
    Rule("trainer.check_val_every_n_epoch", _positive_int, nullable=True),
    Rule("trainer.limit_train_batches", _batches, nullable=True),
    Rule("trainer.limit_val_batches", _batches, nullable=True),
    Rule("trainer.limit_test_batches", _batches, nullable=True),
    Rule("trainer.limit_predict_batches", _batches, nullable=True),
    Rule("trainer.overfit_batches", _batches),
    Rule("trainer.log_every_n_steps", _non_negative_int, nullable=True),  # 0: never log
    Rule("trainer.num_sanity_val_steps", lambda v, k: integer(v, k, low=-1), nullable=True),
    Rule("trainer.reload_dataloaders_every_n_epochs", _non_negative_int),
    Rule("trainer.fast_dev_run", _fast_dev_run),
    Rule("trainer.deterministic", _deterministic, nullable=True),
    Rule("trainer.benchmark", boolean, nullable=True),
    Rule("trainer.detect_anomaly", boolean),
    Rule("trainer.sync_batchnorm", boolean),
    Rule("trainer.enable_model_summary", boolean, nullable=True),
    Rule("trainer.enable_progress_bar", boolean, nullable=True),
    Rule("trainer.enable_checkpointing", boolean, nullable=True),
    Rule("callbacks.push.repo_id", _repo_id, nullable=True),
    Rule("callbacks.push.private", boolean),
)


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` as plain Python, or ``_ABSENT``; a value that cannot be resolved is one line."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception as exc:  # an interpolation that fails: a resolver's own line when it has one
        if (err := find_user_error(exc)) is not None:
            raise err from None
        first = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())[:200]
        raise UserError(f"{key}: cannot be resolved ({first})") from None
    return value


def _apply(rules: tuple[Rule, ...], get: Callable[[str], Any]) -> None:
    for rule in rules:
        value = get(rule.key)
        if value is _ABSENT or (value is None and rule.nullable):
            continue
        rule.check(value, rule.key)


def _shards_parameters(strategy: Any) -> bool:
    """Whether a ``trainer.strategy`` value is Lightning's FSDP: a registry name (``fsdp``, ``fsdp_cpu_offload``) or
    a ``_target_`` naming FSDPStrategy or a subclass (a target that does not import is left to the Trainer)."""
    if isinstance(strategy, str):
        return strategy.startswith("fsdp")
    target = strategy.get("_target_") if isinstance(strategy, Mapping) else None
    if not isinstance(target, str):
        return False
    from hydra.utils import get_class
    from lightning.pytorch.strategies import FSDPStrategy

    try:
        cls = get_class(target)
    except Exception:
        return False
    return isinstance(cls, type) and issubclass(cls, FSDPStrategy)


def _check_built(cfg: DictConfig) -> None:
    """Resolve every ``model`` value that names a base built once on purpose (``${built:PATH,COMMAND}``), so a
    missing demo base is its one line before the data is built, not after."""
    model = cfg.get("model")
    if not isinstance(model, DictConfig):
        return
    raw = OmegaConf.to_container(model, resolve=False)
    for key, value in raw.items() if isinstance(raw, dict) else ():
        if isinstance(value, str) and "${built:" in value:
            _value(cfg, f"model.{key}")


def check_config(cfg: DictConfig) -> None:
    """Every rule of ``RULES`` over ``cfg``, in order, then the keys that only fail together and the devices; the
    first bad value raises its line."""
    _apply(RULES, lambda key: _value(cfg, key))
    _check_built(cfg)
    repo = _value(cfg, "callbacks.push.repo_id")
    if repo not in (None, _ABSENT) and _value(cfg, "adapter.enabled") is False:
        raise UserError(f"callbacks.push.repo_id={repo} cannot push a run with adapter.enabled=false: its snapshots "
                        "hold the whole trained submodules, not a LoRA adapter; drop callbacks.push.repo_id or train "
                        "a LoRA")
    strategy = _value(cfg, "trainer.strategy")
    if _value(cfg, "callbacks.ema.enabled") is True and _shards_parameters(strategy):
        shown = strategy if isinstance(strategy, str) else "fsdp"
        raise UserError(f"callbacks.ema.enabled=true cannot run with trainer.strategy={shown}: each rank holds only "
                        "a shard of every LoRA tensor; use strategy=ddp or strategy=single, or "
                        "callbacks.ema.enabled=false")
    # only the two keys: the trainer's others may name what exists only under Hydra (default_root_dir)
    chosen = {key: _value(cfg, f"trainer.{key}") for key in ("devices", "accelerator")}
    check_devices({key: value for key, value in chosen.items() if value is not _ABSENT})


def check_section(values: Mapping[str, Any], section: str) -> None:
    """The rules of one section (``scheduler``) over its plain values: the same lines for Python callers."""
    prefix = section + "."
    rules = tuple(rule for rule in RULES if rule.key.startswith(prefix))
    _apply(rules, lambda key: values.get(key.removeprefix(prefix), _ABSENT))


# ---------------------------------------------------------------------------- a resumed checkpoint
#: adapter fields that decide which tensors a run trains and their shapes (alpha, dropout, init change values only)
SHAPE_FIELDS = ("submodules", "targets", "r", "conv_rank", "per_submodule", "dora", "bias", "modules_to_save",
                "trainable")


def _sub_ranks(per_submodule: Any) -> dict[str, dict[str, Any]] | None:
    if not isinstance(per_submodule, Mapping):
        return None
    return {sub: {k: v for k, v in fields.items() if k in ("r", "conv_rank")} for sub, fields in
            per_submodule.items() if isinstance(fields, Mapping)}


def _differs(field: str, saved: Mapping[str, Any], adapter: Mapping[str, Any]) -> bool:
    """Whether ``field`` tells the checkpoint's adapter from this run's before any model is built: a field left
    to the head's defaults (``null`` submodules or targets), or a rank a per-submodule value may replace, is only
    known once the module is built (``LoRAAdaptationModule.checkpoint_misfit`` compares the tensors then)."""
    old, new = saved.get(field), adapter.get(field)
    if field in ("submodules", "targets") and (old is None or new is None):
        return False
    if field in ("r", "conv_rank") and (saved.get("per_submodule") or adapter.get("per_submodule")):
        return False
    if field == "per_submodule":
        old, new = _sub_ranks(old), _sub_ranks(new)
        if old is None or new is None:
            return False
    return old != new


def check_resume_fits(checkpoint: Mapping[str, Any], adapter: Mapping[str, Any], family: str | None,
                      where: str) -> None:
    """One line for the first difference between a resumable checkpoint (its ``hyper_parameters``: the family
    and the adapter spec it was trained with) and this run: the family, then the fields that shape the adapter's
    tensors (``adapter``: this run's ``AdapterSpec.to_dict()``). Runs started from ``adapter.init_from`` take
    their ranks from that file: they are compared once the module is built."""
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, Mapping):
        return
    saved_family = saved.get("family")
    if family and isinstance(saved_family, str) and saved_family != family:
        raise UserError(f"{where} is a checkpoint of the {saved_family} family, but this run's model is of the "
                        f"{family} family; resume with the checkpoint's model, or start a fresh run (resume=null)")
    before = saved.get("adapter")
    if not isinstance(before, Mapping) or before.get("init_from") or adapter.get("init_from"):
        return
    for field in SHAPE_FIELDS:
        if _differs(field, before, adapter):
            old, new = _shown(before.get(field)), _shown(adapter.get(field))
            raise UserError(f"{where} was trained with adapter.{field}={old}, but this run has adapter.{field}={new}; "
                            f"resume with adapter.{field}={old}, or start a fresh run (resume=null)")


def _shown(value: Any) -> str:
    """A value as the command line writes it: true, null, 8, [query, value]."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return str(value)
