"""Training entry point: ``python -m lightning_lora.train [hydra overrides]``.

``run(cfg)`` does the work and is importable (tests and Python users call it); ``main`` is the thin
Hydra wrapper that turns user errors into one line and returns the monitored metric to sweepers.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_lora.adapters import AdapterSpec
from lightning_lora.callbacks import AdapterCheckpoint, AtomicCheckpointIO
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_text, path_bytes
from lightning_lora.module import LoRAAdaptationModule, ScheduleSpec


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


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one adapter as ``cfg`` says; returns (metrics, the objects built)."""
    started = time.time()
    if missing := sorted(OmegaConf.missing_keys(cfg)):  # `???` in a preset: a value only the user can give
        raise UserError(f"{missing[0]} is required: pass {missing[0]}=<value> on the command line")
    spec = AdapterSpec.from_config(cfg.adapter)  # a bad value fails here, before any model loads
    schedule = ScheduleSpec.from_config(cfg.get("scheduler"))
    output_dir = Path(cfg.paths.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    _print(f"Run directory: {output_dir}")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # read (and check) the data before the model loads
    head = instantiate(cfg.model)
    module = LoRAAdaptationModule(
        head, spec, optimizer=instantiate(cfg.optimizer), scheduler=schedule,
        gradient_checkpointing=cfg.get("gradient_checkpointing", False),
    )
    _print(module.adapter_summary())
    if rank_zero_only.rank == 0:
        write_run_files(output_dir, cfg, module)

    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False, plugins=[AtomicCheckpointIO()],
    )
    ckpt_path = resolve_resume(cfg.get("resume"), output_dir)
    before = _validate(trainer, module, datamodule) if cfg.validate_before else {}
    fit_started = time.time()
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.time() - fit_started
    after = _validate(trainer, module, datamodule) if cfg.validate_after else {}

    adapter_dir = _adapter_dir(trainer)
    metrics = {
        "before": before,
        "after": after,
        "monitor": cfg.get("optimized_metric") or type(head).monitor,
        "global_step": trainer.global_step,
        "trainable_params": sum(c.trainable for c in module.parameter_counts()),
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "adapter_bytes": path_bytes(adapter_dir) if adapter_dir and adapter_dir.exists() else 0,
        "fit_seconds": round(fit_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
    }
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if after:
            _print(comparison_table(before, after))
        _print(f"Adapter: {adapter_dir}")
        _print(f"Run directory: {output_dir}")
    objects = {"cfg": cfg, "datamodule": datamodule, "head": head, "module": module, "trainer": trainer}
    return metrics, objects


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError behind ``exc`` (Hydra's instantiate wraps errors raised in constructors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = run(cfg)
    except (UserError, InstantiationException) as exc:
        err = _user_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    value = metrics["after"].get(metrics["monitor"])
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
