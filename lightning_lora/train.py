"""Training entry point: ``python -m lightning_lora.train [hydra overrides]``.

``run(cfg)`` does the work and is importable (tests and Python users call it); ``main`` is the thin
Hydra wrapper that turns user errors into one line and returns the monitored metric to sweepers.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from lightning_lora import extras, hub
from lightning_lora.adapters import AdapterSpec
from lightning_lora.callbacks import AdapterCheckpoint, AtomicCheckpointIO, PreemptionCheckpoint, quiet_lightning
from lightning_lora.callbacks.adaptation import AdaptationReport, report_line
from lightning_lora.callbacks.empty_epoch import EmptyEpochGuard
from lightning_lora.callbacks.trackers import end_runs
from lightning_lora.config import CONFIG_NAME, config_dir
from lightning_lora.config_checks import check_config, check_resume_fits
from lightning_lora.errors import UserError, find_user_error, user_message
from lightning_lora.fileio import atomic_write_text, clean_stale_temporaries, path_bytes
from lightning_lora.module import LoRAAdaptationModule, ScheduleSpec
from lightning_lora.rundir import hold_run_dir
from lightning_lora.sweep import record_failure


class Preempted(SIGTERMException):
    """SIGTERM ended the run (Lightning's ``SIGTERMException``); ``message`` is the one line for the user:
    the step and whether a checkpoint was written. Still a ``SIGTERMException`` for callers of ``run``."""

    def __init__(self, message: str) -> None:
        super().__init__()  # no exit code: a SystemExit nobody handles ends the process as Lightning's does
        self.message = message

    def __str__(self) -> str:
        return self.message


def _print(*args: Any) -> None:
    if rank_zero_only.rank == 0:
        print(*args, flush=True)


def resolve_resume(resume: str | None, output_dir: Path) -> str | None:
    """``null`` (fresh start), ``last`` (this run dir's last checkpoint, if any), a run dir, or a ``.ckpt``."""
    if not resume:
        return None
    if resume == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        _print(f"resume=last: no checkpoint at {last} yet; starting from the beginning")
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"resume={resume}: no checkpoint at {path}; give a .ckpt file, a run directory, or 'last'")
    return str(path)


def command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("lightning_lora/train.py", "lightning_lora\\train.py")):
        argv = ["python", "-m", "lightning_lora.train", *argv[1:]]
    return shlex.join(argv)


def write_run_files(output_dir: Path, cfg: DictConfig, module: LoRAAdaptationModule) -> None:
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(output_dir / "command.txt", command_line() + "\n")
    counts = "\n".join(
        f"{c.name}: original {c.original:,}, trainable {c.trainable:,}" for c in module.parameter_counts()
    )
    tree = f"{module.adapter_summary()}\n\n{counts}\n\nModule tree (LoRA layers show lora_A / lora_B):\n{module.head}\n"
    atomic_write_text(output_dir / "model_summary.txt", tree)


def run_metadata(cfg: DictConfig, spec: AdapterSpec, head: Any, output_dir: Path) -> dict[str, str]:
    """The run's training keys in the family's single-file and kohya exports (``adapters.metadata``): kohya's
    ``ss_*`` names for the learning rate, steps, batch, network, base model name and hash, plus the title."""
    from lightning_lora.adapters.metadata import file_sha256, training_keys

    def value(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=None)

    identity = head.base_model_identity()
    max_steps = value("trainer.max_steps")
    args = {"rslora": spec.rslora, "dora": spec.dora, "init": spec.init, "targets": spec.targets,
            "submodules": spec.submodules, "conv_dim": spec.conv_rank, "conv_alpha": spec.conv_alpha}
    scheduler = value("scheduler.name")
    keys = training_keys(
        learning_rate=value("optimizer.lr"), max_train_steps=max_steps if isinstance(max_steps, int) and
        max_steps > 0 else None, batch_size_per_device=value("data.batch_size"), network_dim=spec.r,
        network_alpha=spec.alpha, network_dropout=spec.dropout,
        network_args={k: v for k, v in args.items() if v not in (None, False)},
        lr_scheduler=scheduler, lr_warmup_steps=value("scheduler.warmup_steps") or None,
        gradient_accumulation_steps=value("trainer.accumulate_grad_batches"),
        mixed_precision=value("trainer.precision"), seed=value("seed"), sd_model_name=identity.get("name"),
        new_sd_model_hash=file_sha256(identity.get("path")))
    return {**keys, "modelspec.title": f"{identity.get('name') or head.family} LoRA ({output_dir.name})"}


#: distributions whose versions ``environment.json`` records
RECORDED_LIBRARIES = ("torch", "lightning", "peft", "transformers", "diffusers", "hydra-core", "omegaconf",
                      "safetensors", "numpy", "lightning_lora")


def git_revision(where: Path | None = None) -> dict[str, Any] | None:
    """The checkout's commit and whether it has uncommitted changes, or None outside a git checkout."""
    where = where or Path(__file__).resolve().parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: `git status` must not refresh the index
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10,
                             env=env)
        if rev.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def environment(cfg: DictConfig) -> dict[str, Any]:
    """What a rerun needs to reproduce this one: seed, library versions, git revision, platform, and the Hub
    repositories resolved so far (requested revision and the commit it resolved to)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions: dict[str, str | None] = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "seed": cfg.get("seed"),
        "deterministic": cfg.trainer.get("deterministic"),
        "precision": cfg.trainer.get("precision"),
        "versions": versions,
        "git": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "command": command_line(),
        "hub": hub.resolutions(),
    }


def _check_init_from(init_from: str | None) -> str:
    """Read ``adapter.init_from`` once before any model loads: a damaged or unsafe file fails in one line.
    Returns the family the file records ("" when it records none)."""
    if not init_from:
        return ""
    from lightning_lora.adapters import read_adapters

    try:
        return read_adapters(init_from)[1] or ""
    except UserError as e:
        message = str(e)
        raise UserError(message if message.startswith("adapter.init_from") else f"adapter.init_from={init_from}: "
                        f"{message.removeprefix(str(init_from) + ': ')}") from None
    except Exception as exc:  # truncated safetensors, a zip that is no torch file, an empty file, ...
        first = " ".join((str(exc).strip().splitlines() or [""])[0].split())[:200]
        raise UserError(f"adapter.init_from={init_from}: unreadable adapter ({type(exc).__name__}: {first})"
                        ) from None


def _build(node: DictConfig) -> Any:
    """``instantiate(node)``; a user error raised while building (a bad value, a model not found) comes out as
    itself rather than wrapped in Hydra's InstantiationException, for Python callers of ``run`` too."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        if (err := find_user_error(exc)) is not None:
            raise err from None
        raise


def missing_values(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """The keys set to ``???``, without resolving interpolations (OmegaConf's ``missing_keys`` resolves them and
    fails on ``pretrained: ${..pretrained}`` pointing at a ``???``: the target is reported instead)."""
    found = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        full = f"{prefix}[{key}]" if isinstance(node, ListConfig) else f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            found.append(full)
        elif not OmegaConf.is_interpolation(node, key) and isinstance(child := node[key], DictConfig | ListConfig):
            found += missing_values(child, full)
    return found


# ---------------------------------------------------------------------------- does the data fit the model?
def _class_of(node: Mapping[str, Any]) -> type | None:
    """The class a config node's ``_target_`` names (imported, never instantiated); None when it names none."""
    try:
        return get_class(str(node["_target_"]))
    except Exception:  # no or a broken _target_: instantiate reports it, as it always has
        return None


def _missing_extra(exc: BaseException) -> str | None:
    """The module an extra brings whose absence ``exc`` (or the import error behind it) reports, else None."""
    while exc is not None:
        if isinstance(exc, ImportError) and (module := extras.extra_for(exc)) is not None:
            return module
        exc = exc.__cause__ or exc.__context__
    return None


def _configured_pieces(cfg: DictConfig) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(key, node)`` of each configured class: the model, the data and every logger (``logger.<name>``)."""
    for group in ("model", "data"):
        if isinstance(node := cfg.get(group), DictConfig):
            yield group, node
    if isinstance(loggers := cfg.get("logger"), DictConfig):
        for name, node in loggers.items():
            if isinstance(node, DictConfig):
                yield f"logger.{name}", node


def _named(key: str, node: Mapping[str, Any]) -> str:
    """How the user names a configured piece: ``model=sd_tiny``, ``logger.wandb``."""
    if key in ("model", "data"):
        chosen = _chosen(key, node)
        return f"{key}={chosen}" if chosen else f"the {key} ({node.get('_target_')})"
    return key


def check_packages(cfg: DictConfig) -> None:
    """One line naming the extra to install when the model, the data or a logger needs a package that is not
    installed (``model=sd_tiny needs diffusers: pip install 'lightning_lora[sd]'``): first, before a resolver builds
    a tiny base or any weight, corpus or file is read."""
    for key, node in _configured_pieces(cfg):
        if "_target_" not in node:
            continue
        try:
            cls = get_class(str(node["_target_"]))
        except Exception as exc:  # the class's own module imports a package an extra brings
            if (module := _missing_extra(exc)) is None:
                continue  # a broken _target_: instantiate reports it, as it always has
            raise UserError(extras.missing_line(module, _named(key, node))) from None
        if (module := extras.first_missing(extras.class_requires(cls))) is not None:
            raise UserError(extras.missing_line(module, _named(key, node)))


def batch_kind_of(data_cls: type, data_cfg: Mapping[str, Any]) -> str | None:
    """What a data module class yields for ``data_cfg``: its ``batch_kind``, a string or a classmethod of the
    config; None when it declares none."""
    kind = getattr(data_cls, "batch_kind", None)
    return kind(data_cfg) if callable(kind) else kind


def shipped_data_options() -> Iterator[tuple[str, DictConfig]]:
    """``(name, raw config)`` of every ``data=<name>`` option in the shipped ``conf/data/``."""
    for path in sorted((config_dir() / "data").glob("*.yaml")):
        if not path.stem.startswith("_"):
            yield path.stem, OmegaConf.create(_raw_yaml(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=256)
def _raw_yaml(path: Path, mtime_ns: int) -> dict[str, Any]:
    """A config file's raw contents, parsed once per version (a refused pair lists the data options that fit, which
    reads every one of them)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _data_options_taking(cfg: DictConfig, kinds: tuple[str, ...]) -> list[str]:
    """The shipped data options whose batches are one of ``kinds``, each read beside this run's other settings
    (a data preset's interpolations, e.g. ``kind: ${oc.select:model.latent,slat}``, follow the model)."""
    trial = copy.deepcopy(cfg)
    found = []
    for name, raw in shipped_data_options():
        with open_dict(trial):
            trial.data = raw
        data_cls = _class_of(raw)
        try:
            kind = batch_kind_of(data_cls, trial.data) if data_cls else None
        except UserError:
            kind = None
        if kind in kinds:
            found.append(name)
    return found


def _chosen(group: str, node: Mapping[str, Any]) -> str | None:
    """The option of ``group`` this run uses (``trellis_slat``), from Hydra's record of the run, else (a config
    composed in Python) for data the shipped option with the node's ``_target_``."""
    from hydra.core.hydra_config import HydraConfig

    chosen = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    if chosen is None and group == "data":
        chosen = next((n for n, raw in shipped_data_options() if raw.get("_target_") == node.get("_target_")), None)
    return chosen


def _described(group: str, node: Mapping[str, Any], cls: type) -> str:
    """``model=trellis_slat (FlowMatching3DHead)``, or ``the model <its name> (FlowMatching3DHead)``."""
    if (chosen := _chosen(group, node)) is not None:
        return f"{group}={chosen} ({cls.__name__})"
    name = node.get("name") if group == "model" else None
    return f"the {group}{f' {name}' if isinstance(name, str) and name else ''} ({cls.__name__})"


def check_model_takes_data(cfg: DictConfig) -> None:
    """Stop with one line when the head of ``cfg.model`` cannot train on the batches of ``cfg.data``, comparing the
    head class's ``batch_kinds`` with the data module class's ``batch_kind``: before any weight, corpus or file is
    read. Either side declaring nothing passes."""
    head_cls, data_cls = _class_of(cfg.model), _class_of(cfg.data)
    if head_cls is None or data_cls is None or not hasattr(head_cls, "batch_kinds"):
        return
    kinds = tuple(head_cls.batch_kinds(cfg.model))
    kind = batch_kind_of(data_cls, cfg.data)
    if not kinds or kind is None or kind in kinds:
        return
    fitting = _data_options_taking(cfg, kinds)
    options = ", ".join(f"data={name}" for name in fitting) or "none shipped"
    if (current := _chosen("data", cfg.data)) in fitting:  # the option fits as shipped: a setting of this run not
        options += f" (data={current} as shipped; a data or model setting of this run changes what it yields)"
    model, data = _described("model", cfg.model, head_cls), _described("data", cfg.data, data_cls)
    raise UserError(f"{model} cannot train on {data}: the model takes {' or '.join(kinds)}, the data yields {kind}; "
                    f"data options it takes: {options}")


def _resolve_callbacks(cfg: DictConfig) -> None:
    """Resolve the callbacks' values now (their instances come after the model): a resolver's one-line error
    (``${cadence:...}``) surfaces as that line, not inside OmegaConf's traceback."""
    if not isinstance(callbacks := cfg.get("callbacks"), DictConfig):
        return
    try:
        OmegaConf.to_container(callbacks, resolve=True)
    except InterpolationResolutionError as exc:
        if (err := find_user_error(exc)) is None:
            raise
        raise err from None


def _read_resumed(cfg: DictConfig, spec: AdapterSpec) -> dict[str, Any] | None:
    """The checkpoint ``resume`` names, read once (weights only) before any model loads and compared with this
    run's model family and adapter settings; None for a fresh start (``last`` with no checkpoint yet included)."""
    resume = cfg.get("resume")
    if not resume:
        return None
    if resume == "last":
        path = Path(cfg.paths.output_dir).resolve() / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return None
    else:
        path = Path(resolve_resume(str(resume), Path.cwd()))  # a missing checkpoint is one line
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    family = getattr(_class_of(cfg.model), "family", None)
    check_resume_fits(checkpoint, spec.to_dict(), family, f"resume={resume}")
    return checkpoint


def trainer_callbacks(cfg: DictConfig) -> list[Any]:
    """The callbacks ``run`` hands the Trainer: the empty-epoch guard first (an epoch that yields no batch stops
    before any callback writes for it), then the config's callbacks, less those idle in this run (``_idle``):
    Lightning calls every hook of every callback at every step, about 10 us each on a small model's step. A resumed
    run keeps them all (its checkpoint may hold an idle callback's state)."""
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if cfg.get("resume") is None:
        head_class = _class_of(cfg.model)
        callbacks = [cb for cb in callbacks if not _idle(cb, head_class)]
    return [EmptyEpochGuard(), *callbacks]


def _idle(callback: Any, head_class: type | None) -> bool:
    """Whether a callback has nothing to do in this run, as it says: for this run's head class (``idle_for``:
    previews of a head that never draws) or whatever the head (``idle``: EMA off, no Hub repository)."""
    if (idle_for := getattr(callback, "idle_for", None)) is not None:
        return bool(idle_for(head_class))
    return bool(getattr(callback, "idle", False))


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def _adapter_dir(trainer: pl.Trainer) -> Path | None:
    for cb in trainer.callbacks:
        if isinstance(cb, AdapterCheckpoint):
            return cb.dirpath / "final" if cb.save_final else cb.last_written
    return None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _validate(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any) -> dict[str, float]:
    """Validation metrics, or {} when the data has no validation set (Lightning then returns [])."""
    results = trainer.validate(module, datamodule, verbose=False)
    return _scalars(results[0]) if results else {}


def comparison_table(before: dict[str, float], after: dict[str, float]) -> str:
    keys = [k for k in after if k in before] or list(after)
    lines = [f"{'metric':<16}{'before':>10}{'after':>10}{'change':>10}"]
    for k in keys:
        b, a = before.get(k), after[k]
        pct = not k.endswith("loss")  # retrieval metrics read as percentages
        fmt = (lambda v: f"{100 * v:.2f}") if pct else (lambda v: f"{v:.4f}")
        change = "" if b is None else (f"{100 * (a - b):+.2f}" if pct else f"{a - b:+.4f}")
        lines.append(f"{k:<16}{'' if b is None else fmt(b):>10}{fmt(a):>10}{change:>10}")
    return "\n".join(lines)


def _adapter_bytes(snapshot: Path) -> int:
    """The snapshot's size without its whole-model PEFT export (a second copy of the same LoRA tensors)."""
    from lightning_lora.adapters.io import WHOLE_MODEL_MARK

    copies = [d for d in snapshot.iterdir() if (d / WHOLE_MODEL_MARK).is_file()] if snapshot.is_dir() else []
    return path_bytes(snapshot) - sum(path_bytes(d) for d in copies)


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one adapter as ``cfg`` says; returns (metrics, the objects built)."""
    started = time.time()
    check_packages(cfg)  # an extra not installed: nothing else matters yet
    # With data the model cannot train on, the values still missing (the data's paths) do not matter.
    check_model_takes_data(cfg)
    if missing := sorted(missing_values(cfg)):  # `???` in a preset: a value only the user can give
        raise UserError(f"{missing[0]} is required: pass {missing[0]}=<value> on the command line")
    _resolve_callbacks(cfg)  # e.g. a save cadence of a run with no length: before any model loads
    spec = AdapterSpec.from_config(cfg.adapter)  # a bad value fails here, before any model loads
    if (head_cls := _class_of(cfg.model)) is not None and hasattr(head_cls, "check_adapter"):
        head_cls.check_adapter(spec, cfg.model)  # e.g. DoRA with a family whose files cannot carry it
    check_config(cfg)  # every other value, one table (config_checks.RULES): before any model or corpus loads
    schedule = ScheduleSpec.from_config(cfg.get("scheduler"))
    init_family = _check_init_from(spec.init_from)
    resumed = _read_resumed(cfg, spec)
    output_dir = Path(cfg.paths.output_dir).resolve()
    # a file, read-only, used by another run (resume: null), locked by a running one: one line, nothing written
    with hold_run_dir(output_dir, cfg.get("resume"), cfg.get("overwrite", False), rank_zero_only.rank) as removed:
        if removed:
            _print(f"overwrite=true: removed the previous run's {', '.join(removed)} from {output_dir}")
        return _run_in(cfg, output_dir, started, spec, schedule, init_family, resumed)


def _run_in(cfg: DictConfig, output_dir: Path, started: float, spec: AdapterSpec, schedule: ScheduleSpec,
            init_family: str, resumed: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rest of ``run``, in the run directory it holds (``resumed``: the checkpoint ``resume`` names, read and
    compared with the config already; compared with the built module here)."""
    _print(f"Run directory: {output_dir}")
    if rank_zero_only.rank == 0:
        for stale in clean_stale_temporaries(output_dir):  # left by a killed write (under the lock: not a live one)
            _print(f"removed a temporary file of an interrupted write: {stale}")
        atomic_write_text(output_dir / "environment.json", json.dumps(environment(cfg), indent=2) + "\n")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = _build(cfg.data)
    datamodule.setup("fit")  # read (and check) the data before the model loads
    head = _build(cfg.model)
    if hasattr(datamodule, "setup_with_model"):  # data made with the base model (DreamBooth's class images)
        datamodule.setup_with_model(head)
    if init_family and init_family != head.family:
        raise UserError(f"adapter.init_from={spec.init_from} holds a {init_family} adapter, but this run's model "
                        f"is a {head.family} head ({type(head).__name__})")
    module = LoRAAdaptationModule(
        head, spec, optimizer=instantiate(cfg.optimizer), scheduler=schedule,
        gradient_checkpointing=cfg.get("gradient_checkpointing", False),
    )
    if resumed is not None and (misfit := module.checkpoint_misfit(resumed["state_dict"])) is not None:
        raise UserError(f"resume={cfg.resume}: {misfit}; resume with the checkpoint's model and adapter settings, "
                        "or start a fresh run (resume=null)")
    del resumed  # Lightning reads the checkpoint again as fit starts
    module.describe_run(run_metadata(cfg, spec, head, output_dir))
    _print(module.adapter_summary())
    if rank_zero_only.rank == 0:
        write_run_files(output_dir, cfg, module)
        if hub.resolutions():  # the Hub revisions the model (and init_from) resolved to
            atomic_write_text(output_dir / "environment.json", json.dumps(environment(cfg), indent=2) + "\n")

    quiet_lightning()  # no product tips or known third-party deprecations between the progress bars
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=trainer_callbacks(cfg),
        logger=_instantiate_all(cfg.get("logger")) or False, plugins=[AtomicCheckpointIO()],
    )
    ckpt_path = resolve_resume(cfg.get("resume"), output_dir)
    try:  # Lightning's loops raise SIGTERMException at the end of a batch once SIGTERM arrived
        before = _validate(trainer, module, datamodule) if cfg.validate_before else {}
        fit_started = time.time()
        trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.time() - fit_started
        after = _validate(trainer, module, datamodule) if cfg.validate_after else {}
    except SIGTERMException as exc:
        raise Preempted(_preempted_message(trainer)) from exc
    finally:
        end_runs(trainer.loggers)  # the next job of an in-process sweep starts a tracker run of its own

    adapter_dir = _adapter_dir(trainer)
    metrics = {
        "before": before,
        "after": after,
        "monitor": cfg.get("optimized_metric") or type(head).monitor,
        "global_step": trainer.global_step,
        "trainable_params": sum(c.trainable for c in module.parameter_counts()),
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "adapter_bytes": _adapter_bytes(adapter_dir) if adapter_dir and adapter_dir.exists() else 0,
        "fit_seconds": round(fit_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
    }
    adaptation = next((cb.result for cb in trainer.callbacks if isinstance(cb, AdaptationReport) and cb.result), None)
    if adaptation:  # a figure other than the loss, before and after (callbacks/adaptation.py)
        metrics["adaptation"] = adaptation
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _print(f"Adapter: {adapter_dir}")
        _print(f"Run directory: {output_dir}")
        if after:  # last, after every progress bar: the run's result is the last thing on the console
            _print(comparison_table(before, after))
        if adaptation:
            _print(report_line(adaptation))
        for callback in trainer.callbacks:  # after metrics.json: e.g. PushToHub's card shows the results
            if callable(getattr(callback, "on_run_end", None)):
                callback.on_run_end(output_dir)
    objects = {"cfg": cfg, "datamodule": datamodule, "head": head, "module": module, "trainer": trainer}
    return metrics, objects


#: the UserError behind an exception (Hydra's instantiate wraps errors raised in constructors); tests use it
_user_error = find_user_error


def _debug() -> bool:
    """``HYDRA_FULL_ERROR=1`` (Hydra's own switch) shows the traceback of a user error too."""
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def _in_multirun() -> bool:
    """Whether this is one job of a Hydra sweep (``-m``)."""
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: a bug's one-line reason in a sweep's summary."""
    return f"{type(exc).__name__}: {' '.join((str(exc).strip().splitlines() or [''])[0].split())[:200]}"


def _preempted_message(trainer: pl.Trainer) -> str:
    saved = next((cb.saved for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)
                  and cb.saved is not None), None)
    step = trainer.global_step
    if saved is None:
        return f"stopped by SIGTERM at step {step}; no checkpoint was written (no preemption_checkpoint callback)"
    return f"stopped by SIGTERM at step {step}; checkpoint written to {saved}; continue with resume=last"


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = run(cfg)
    except Preempted as exc:
        if _debug():
            raise
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        sys.exit(143)  # 128 + SIGTERM, what a scheduler expects from a terminated job
    except Exception as exc:
        message = user_message(exc)  # None: a bug, whose traceback is the message
        if _debug() or (message is None and not _in_multirun()):
            raise
        if message is None:  # a bug in one job of a sweep: its traceback, and the sweep goes on
            traceback.print_exc()
        print(f"error: {message or _first_line(exc)}", file=sys.stderr, flush=True)
        if not _in_multirun():
            sys.exit(2)
        # SystemExit would end the whole sweep: the job is recorded as failed (sweep_summary.csv shows it, and the
        # sweep exits non-zero at its end) and returns no metric
        record_failure(HydraConfig.get().runtime.output_dir, message or _first_line(exc), user_error=bool(message))
        return None
    value = metrics["after"].get(metrics["monitor"])
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
