"""`LoRAAdaptationModule`: one LightningModule that LoRA-tunes any `TaskHead`.

It puts LoRA into the head's adaptable submodules with PEFT, freezes everything else, optimizes the
trainable parameters only, delegates the objective and metrics to the head, and keeps Lightning
checkpoints adapter-only (trainable weights + optimizer + loop state, no frozen base weights).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from peft import PeftModel
from torch import nn
from torch.optim import Optimizer

from lightning_lora.adapters import (
    AdapterSpec,
    ParamCount,
    count_parameters,
    format_adapter_summary,
    inject_adapter,
    load_adapter_state,
    oversized_rank,
    read_adapters,
    save_adapter_file,
    save_peft_dir,
    spatial_conv_targets,
)
from lightning_lora.config_checks import check_section
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_bytes, new_directory_or_none
from lightning_lora.heads.base import TaskHead

# Lightning says so whenever a LightningModule overrides transfer_batch_to_device and a LightningDataModule feeds it
# (a data module's own override still wins, with Lightning's other message): the override is this module's design
# (see transfer_batch_to_device), nothing a user did, so exactly that message is not shown.
warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule` but "
                        r"have passed in a `LightningDataModule`")

#: head parameters trained beside the adapter (e.g. a learnable temperature), in every adapter snapshot
HEAD_PARAMETERS = "head_parameters.safetensors"
OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


@dataclass
class ScheduleSpec:
    """Learning-rate schedule: linear warmup, then constant, linear decay or cosine decay to ``min_lr_ratio``."""

    name: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_section(dataclasses.asdict(self), "scheduler")  # the config table's rules, one key per line

    @classmethod
    def from_config(cls, cfg: ScheduleSpec | Mapping[str, Any] | None) -> ScheduleSpec:
        if isinstance(cfg, cls):
            return cfg
        data = dict(cfg or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise UserError(f"scheduler.{unknown[0]} is not a schedule field; valid: {', '.join(sorted(known))}")
        return cls(**data)

    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
        """Multiplier of the base LR at optimizer step ``step`` for a run of ``total_steps`` steps."""
        warmup = self.warmup_steps or int(self.warmup_ratio * total_steps)
        decay_steps = max(1, total_steps - warmup)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.name == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / decay_steps)
            shape = 1.0 - progress if self.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

        return factor


def unique_rows(collected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``index`` column, keeping each row id once (a DistributedSampler repeats rows to even
    out processes, and a repeated document would count twice in retrieval metrics)."""
    if "index" not in collected:
        return collected
    index = collected.pop("index")
    ids, inverse = torch.unique(index, sorted=True, return_inverse=True)
    first = torch.full_like(ids, index.numel()).scatter_reduce(
        0, inverse, torch.arange(index.numel(), device=index.device), reduce="amin"
    )
    return {k: v[first] for k, v in collected.items()}


def _zero_touch(params: Iterable[nn.Parameter]) -> torch.Tensor | float:
    """0 · Σ first elements: puts every trainable parameter in the step's graph with a zero gradient.

    DDP (``find_unused_parameters=false``) waits for a gradient of every parameter, and a step may leave some
    without one, e.g. the vision LoRA when a process's batch holds no image, or a submodule a head skips. The
    wait then hangs or fails on the next step; with this term each process reduces every parameter, adding
    exactly 0 to the gradients that exist. (``find_unused_parameters=true`` instead walks the graph every step.)
    """
    return sum(p.reshape(-1)[0] for p in params) * 0.0  # starts from int 0: any device, any dtype


#: leaves a batch may hold that no device transfer touches (captions, image paths, flags)
_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None))


def _holds_nothing_to_move(value: Any) -> bool:
    """Whether ``value`` is plain data all the way down: lists, tuples and dicts of ``_PLAIN_LEAVES``."""
    if type(value) in _PLAIN_LEAVES:
        return True
    if type(value) in (list, tuple):
        return all(_holds_nothing_to_move(v) for v in value)
    if type(value) is dict:
        return all(_holds_nothing_to_move(v) for v in value.values())
    return False


def _move_flat_batch(batch: Any, device: torch.device) -> dict[str, Any] | None:
    """A dict batch of tensors and plain data with its tensors on ``device`` (each moved as Lightning moves it),
    the plain data as it is; None for any other batch (Lightning's own transfer takes it)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    if type(batch) is not dict:
        return None
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = move_data_to_device(value, device)
        elif _holds_nothing_to_move(value):
            moved[key] = value
        else:
            return None
    return moved


def _reads_train_values(callback: Any) -> bool:
    """Whether a callback reads ``train/*`` values at its steps: it monitors one (``ModelCheckpoint``,
    ``EarlyStopping``) or names one in its checkpoint file names."""
    monitor, filename = getattr(callback, "monitor", None), getattr(callback, "filename", None)
    return str(monitor or "").startswith("train/") or "train/" in str(filename or "")


class LoRAAdaptationModule(pl.LightningModule):
    """Train a LoRA adapter on any `TaskHead`: ``trainer.fit(LoRAAdaptationModule(head, spec), datamodule)``."""

    #: between the loggers' steps, the newest ``train/*`` values reach Lightning at most this often (seconds):
    #: the progress bar redraws at most 4 times a second (``callbacks.progress_bar.refresh_rate``)
    TRAIN_LOG_INTERVAL_S = 0.25

    def __init__(
        self,
        head: TaskHead,
        adapter: AdapterSpec | Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: ScheduleSpec | Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.spec = adapter if isinstance(adapter, AdapterSpec) else AdapterSpec.from_config(adapter)
        self.schedule = ScheduleSpec.from_config(scheduler)
        self.head = head
        self.optimizer_factory = optimizer
        # PEFT's handles over the head's own submodules (same objects), kept out of the module tree so
        # their parameters are not registered twice.
        self.adapters: dict[str, PeftModel] = {}
        self.adapter_targets: dict[str, list[str]] = {}
        self._inject_adapters()
        # from_pretrained leaves models in eval mode; train as PEFT + HF Trainer do (dropout on). Lightning
        # switches to eval for validation and back.
        head.train()
        if gradient_checkpointing:
            head.enable_gradient_checkpointing()
        # Checkpoints hold only trainable tensors, so loading them must not demand the frozen ones.
        self.strict_loading = False
        # Primitive values only: the head (the base model) must never be pickled into a checkpoint.
        self.save_hyperparameters(
            {"adapter": self.spec.to_dict(), "scheduler": dataclasses.asdict(self.schedule), "family": head.family}
        )
        self._val_outputs: list[dict[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ adapters
    def _inject_adapters(self) -> None:
        head, spec = self.head, self.spec
        type(head).check_adapter(spec, {})  # what the family's exports cannot carry (train.run asked already)
        available = head.adaptable_submodules()
        defaults = head.default_targets()
        initial = self._initial_adapters(list(defaults)) if spec.init_from else {}
        chosen = spec.submodules or list(initial or head.default_submodules())
        for name in chosen:
            if name not in available:
                raise UserError(
                    f"adapter.submodules: {name!r} is not adaptable in the {head.family} head; "
                    f"choose from {sorted(available)}"
                )
        for field_name in ("targets", "per_submodule"):
            value = getattr(spec, field_name)
            if isinstance(value, dict) and (extra := sorted(set(value) - set(chosen))):
                raise UserError(f"adapter.{field_name} names submodule {extra[0]!r}, which is not adapted; "
                                f"adapted: {chosen}")
        head.requires_grad_(False)
        self._conv_submodules: list[str] = []
        #: the submodules trained whole (adapter.enabled=false), by name; empty with LoRA
        self.full_submodules: dict[str, nn.Module] = {}
        if not spec.enabled:  # full fine-tuning: same module, no LoRA
            self.full_submodules = {name: available[name] for name in chosen}
            for module in self.full_submodules.values():
                module.requires_grad_(True)
        for name in chosen if spec.enabled else ():
            where = f"{head.family}.{name}"
            if spec.init_from:
                if name not in initial:
                    raise UserError(
                        f"adapter.init_from={spec.init_from} has no adapter for {name!r}; it has {sorted(initial)}"
                    )
                config, state = initial[name]
                config.inference_mode = False
                self.adapters[name] = inject_adapter(available[name], config, where)
                load_adapter_state(self.adapters[name], state, source=f"adapter.init_from={spec.init_from}")
                self.adapter_targets[name] = sorted(config.target_modules)
                continue
            targets = spec.targets_for(name, defaults.get(name, []))
            if not targets:
                raise UserError(f"no LoRA targets for {head.family} submodule {name!r}; set adapter.targets")
            config = self._lora_config(name, targets)
            self._check_ranks(name, available[name], config)
            self.adapters[name] = inject_adapter(available[name], config, where)
            self.adapter_targets[name] = targets
        if spec.conv_rank is not None and not self._conv_submodules:
            raise UserError(f"adapter.conv_rank={spec.conv_rank}: no adapted submodule of the {head.family} head has "
                            f"spatial convolutions among its targets (adapted: {list(self.adapters)})")
        if spec.trainable is not None:
            self._train_only(spec.trainable)
        for p in head.extra_trainable_parameters().values():
            p.requires_grad_(True)
        # LoRA weights stay fp32 whatever the base's dtype (fp16 gradients cannot be unscaled; bf16 drifts).
        for p in self.head.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()

    def _check_ranks(self, name: str, model: nn.Module, config: Any) -> None:
        """Refuse a rank at or above a targeted layer's smaller side before PEFT allocates it, naming the key that
        set it (``adapter.r``, ``adapter.conv_rank`` or the submodule's own), the layer and its shape."""
        found = oversized_rank(model, config)
        if found is None:
            return
        field = "conv_rank" if found.patterned else "r"
        own = (self.spec.per_submodule or {}).get(name, {})
        key = f"adapter.per_submodule.{name}.{field}" if field in own else f"adapter.{field}"
        raise UserError(f"{key}={found.rank} must be smaller than the layers it adapts: {self.head.family}.{name} "
                        f"layer '{found.layer}' is {found.shape}; valid: {field} < {found.smallest} (the smallest "
                        "side among them)")

    def _lora_config(self, name: str, targets: list[str]):
        """The submodule's LoraConfig: its own per_submodule values, plus conv LoRA at conv_rank/conv_alpha."""
        spec = self.spec.for_submodule(name)
        if spec.conv_rank is None:
            return spec.lora_config(targets)
        conv_defaults = self.head.conv_targets().get(name, [])
        model = self.head.adaptable_submodules()[name]
        targets = targets + [t for t in conv_defaults if t not in targets]
        conv = spatial_conv_targets(model, targets)
        if not conv:
            if conv_defaults:
                raise UserError(f"adapter.conv_rank={spec.conv_rank} but no target of {self.head.family}.{name} "
                                f"is a spatial convolution (targets: {targets})")
            return spec.lora_config(targets)  # e.g. a text encoder: it has no convolutions
        self._conv_submodules.append(name)
        alpha = spec.conv_alpha or spec.conv_rank
        return spec.lora_config(targets, rank_pattern=dict.fromkeys(conv, spec.conv_rank),
                                alpha_pattern=dict.fromkeys(conv, alpha))

    def _initial_adapters(self, default_submodules: list[str]) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
        """The adapters in ``adapter.init_from`` by submodule (a bare PEFT dir/file goes to the only one)."""
        from lightning_lora.adapters.formats import route_prefixed

        found, _ = read_adapters(self.spec.init_from)
        where = f"adapter.init_from={self.spec.init_from}"
        if set(found) == {""}:  # an extracted file names modules <submodule>.<path>: route it there
            available = self.head.adaptable_submodules()
            names = {sub: [n for n, _ in m.named_modules() if n] for sub, m in available.items()}
            if (routed := route_prefixed(*found[""], names, where)) is not None:
                found = {routed[0]: routed[1:]}
        return self._name_unnamed(found, self.spec.submodules or default_submodules, where)

    def _name_unnamed(self, found: dict[str, Any], chosen: list[str], where: str) -> dict[str, Any]:
        """An unnamed adapter (a bare PEFT dir or single-model file) belongs to the only adapted submodule."""
        if set(found) != {""}:
            return found
        if len(chosen) != 1:
            raise UserError(
                f"{where} holds one unnamed adapter but the {self.head.family} head adapts {chosen}; "
                "set adapter.submodules=[<one of them>]"
            )
        return {chosen[0]: found[""]}

    def _train_only(self, patterns: list[str]) -> None:
        """Freeze every LoRA layer whose name (``<submodule>.<module path>``) contains none of ``patterns``."""
        layers: dict[str, list[nn.Parameter]] = {}
        for sub, peft in self.adapters.items():
            for pname, p in peft.base_model.model.named_parameters():
                if "lora_" in pname:
                    layers.setdefault(f"{sub}.{pname.split('.lora_')[0]}", []).append(p)
        selected = {name for name in layers if any(pat in name for pat in patterns)}
        if not selected:
            grouped = sorted({re.sub(r"(?<=\.)\d+(?=\.)", "*", name) for name in layers})
            raise UserError(
                f"adapter.trainable={patterns} matches no LoRA layer; layer names (digits as *): {', '.join(grouped)}"
            )
        for name, params in layers.items():
            for p in params:
                p.requires_grad_(name in selected)

    def parameter_counts(self) -> list[ParamCount]:
        if self.full_submodules:
            return [count_parameters(name, module) for name, module in self.full_submodules.items()]
        return [count_parameters(name, peft.base_model.model) for name, peft in self.adapters.items()]

    def adapter_summary(self) -> str:
        """The 'Applying LoRA adapters' block (rank, alpha, targets, original/trainable params per submodule)."""
        if self.full_submodules:
            counts = ", ".join(f"{c.name} {c.trainable:,}" for c in self.parameter_counts())
            return f"Full fine-tuning (adapter.enabled=false, no LoRA): trainable params {counts}"
        return format_adapter_summary(
            self.spec.r, self.spec.alpha, self.spec.dropout, self.adapter_targets, self.parameter_counts()
        )

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def save_adapters(self, directory: str | Path, step: int | None = None, run_dir: str | Path | None = None
                      ) -> list[Path]:
        """Write one PEFT directory per adapted submodule under ``directory``, plus the family's formats."""
        directory = Path(directory)
        identity = self.head.base_model_identity()
        with new_directory_or_none(directory):  # a failed first write of a snapshot (full disk) leaves no empty dir
            written = [
                save_peft_dir(peft, directory / name, base_model=identity.get(name, identity.get("name")))
                for name, peft in self.adapters.items()
            ]
            if extra := self.head.extra_trainable_parameters():
                from safetensors.torch import save

                tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items()}
                written.append(atomic_write_bytes(directory / HEAD_PARAMETERS, save(tensors)))
            if self.full_submodules:  # full fine-tuning: the head writes the whole trained weights instead
                return written + self.head.export_full_weights(directory, list(self.full_submodules))
            step = self.global_step if step is None else step
            run_dir = Path(run_dir) if run_dir else None
            return written + self.head.export_adapters(directory, self.adapters, step, run_dir)

    def describe_run(self, metadata: dict[str, str]) -> None:
        """The run's training keys (``ss_*``, ``modelspec.title``/``date``: ``adapters.metadata``) that the family's
        single-file and kohya exports carry from now on (``TaskHead.file_metadata``)."""
        self.head.run_metadata = dict(metadata)

    def save_adapter_file(self, path: str | Path) -> Path:
        """Every adapted submodule in one self-describing ``.safetensors`` (family, configs, base model, and the
        ``modelspec.*``/``ss_*`` keys other tools read)."""
        identity = self.head.base_model_identity()
        return save_adapter_file(path, self.adapters, family=self.head.family, base_model=identity,
                                 extra=self.head.file_metadata(self.global_step))

    def load_adapters(self, source: str | Path, strict: bool = True) -> None:
        """Load adapter weights into this module's adapters from a directory written by ``save_adapters``
        (one PEFT directory per submodule) or a file written by ``save_adapter_file``. Names and shapes
        are checked against the adapters built from this module's spec."""
        found, family = read_adapters(source)
        if family and family != self.head.family:
            raise UserError(f"{source} holds a {family} adapter; this is a {self.head.family} head")
        found = self._name_unnamed(found, list(self.adapters), str(source))
        for name, peft in self.adapters.items():
            if name not in found:
                raise UserError(f"{source} has no adapter for submodule {name!r}; it has {sorted(found)}")
            load_adapter_state(peft, found[name][1], strict=strict, source=f"{source} [{name}]")
        extra = self.head.extra_trainable_parameters()
        if extra and (path := Path(source) / HEAD_PARAMETERS).is_file():
            from safetensors.torch import load_file

            saved = load_file(path)
            with torch.no_grad():
                for key, param in extra.items():
                    if key not in saved:
                        raise UserError(f"{path} has no {key!r}; it has {sorted(saved)}")
                    param.copy_(saved[key])

    # ------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        self.head.on_strategy(type(self.trainer.strategy).__name__)
        # the trainable set is fixed once the adapter is in: list it once, not every step
        ddp = isinstance(self.trainer.strategy, DDPStrategy)
        self._touched = [p for p in self.parameters() if p.requires_grad] if ddp else []

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Lightning's default visits every element of every list to find tensors (16 captions or image paths:
        # 16 visits, each several type checks, every step); a flat dict batch is moved key by key instead.
        moved = _move_flat_batch(batch, device)
        return moved if moved is not None else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_start(self) -> None:
        from lightning.pytorch.callbacks import Timer

        # a callback that reads train/* values or may stop the run at any step (a Timer): they reach Lightning
        # every step
        callbacks = self.trainer.callbacks
        self._log_every_step = any(isinstance(cb, Timer) or _reads_train_values(cb) for cb in callbacks)
        self._logged_at = -math.inf

    def _train_values_read(self, batch_idx: int) -> bool:
        """Whether anyone reads this step's ``train/*`` values, so that they go to ``self.log``: Lightning hands
        them to the loggers at this step (``trainer.log_every_n_steps``, or the run is stopping), it is the epoch's
        or the run's last step, a callback monitors one of them or a Timer may stop the run (``on_train_start``),
        or ``TRAIN_LOG_INTERVAL_S`` passed since the last ones (what the progress bar shows). One ``self.log``
        costs Lightning about 0.5 ms of host time, a few percent of a small model's step."""
        trainer = self._trainer
        if trainer is None or getattr(self, "_log_every_step", True):
            return True
        now = time.monotonic()
        read = (trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)
                or batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= trainer.global_step + 1
                or now - self._logged_at >= self.TRAIN_LOG_INTERVAL_S)
        if read:
            self._logged_at = now
        return read

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.head.training_step(batch)
        # no train/* value is synced across processes (sync_dist would be a collective), so each process may
        # decide on its own clock
        if self._train_values_read(batch_idx):
            self.log("train/loss", out.loss, prog_bar=True, batch_size=out.batch_size)
            for key, value in out.logs.items():
                self.log(f"train/{key}", value, batch_size=out.batch_size)
        if getattr(self, "_touched", None):
            return out.loss + _zero_touch(self._touched)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.head.validation_step(batch)
        if "loss" in out and out["loss"].ndim == 0:  # a batch mean: weighted by the batch's rows, when known
            loss = out.pop("loss")
            rows = self.head.batch_rows(batch) or next((v.size(0) for v in out.values() if v.ndim), 1)
            self.log("val/loss", loss, sync_dist=True, prog_bar=True, batch_size=rows)
        self._val_outputs.append({k: v.detach() for k, v in out.items()})  # a per-row loss: averaged at the end

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        collected = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        self._val_outputs = []
        if self.trainer.world_size > 1:  # every process computes metrics over the whole validation set
            collected = {k: self.all_gather(v).flatten(0, 1) for k, v in collected.items()}
        collected = unique_rows(collected)  # a row repeated to fill a batch or even out processes counts once
        loss = collected.pop("loss", None)
        metrics = self.head.validation_metrics(collected)
        if loss is not None:
            metrics = {"loss": loss.double().mean(), **metrics}
        # Already global (every process saw the gathered set); sync_dist only averages equal values.
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise UserError("no trainable parameters: the adapter configuration selected nothing to train")
        factory = self.optimizer_factory or (lambda ps: torch.optim.AdamW(ps, lr=1e-4))
        optimizer = factory(self._param_groups(params))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.lr_lambda(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's FSDP precision plugin refuses norm clipping; FSDP's own clip_grad_norm_ computes the norm
        # over every shard. Everything else goes through Lightning's clipping unchanged.
        root = getattr(self.trainer.strategy, "model", None)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and type(root).__name__ == \
                "FullyShardedDataParallel":
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _param_groups(self, params: list[nn.Parameter]) -> list[nn.Parameter] | list[dict[str, Any]]:
        """One group, or one per submodule with its own ``adapter.per_submodule.<name>.lr``."""
        trained = self.adapters or self.full_submodules  # with full fine-tuning a submodule's lr is its own too
        own = {name: lr for name in trained if (lr := self.spec.lr_for(name)) is not None}
        if not own:
            return params
        groups: list[dict[str, Any]] = []
        claimed: set[int] = set()
        for name, lr in own.items():
            mine = [p for p in trained[name].parameters() if p.requires_grad]
            claimed.update(id(p) for p in mine)
            groups.append({"params": mine, "lr": lr})
        rest = [p for p in params if id(p) not in claimed]
        return ([{"params": rest}] if rest else []) + groups

    # ------------------------------------------------------------------ adapter-only checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs after the strategy collected the state (any strategy), so filtering here is reliable.
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # strict_loading is off (frozen weights are absent on purpose), so check the adapter part here.
        if (misfit := self.checkpoint_misfit(checkpoint.get("state_dict", {}))) is not None:
            raise UserError(f"checkpoint does not fit this adapter configuration: {misfit}; resume with the same "
                            "model and adapter")

    def checkpoint_misfit(self, state: Mapping[str, Any]) -> str | None:
        """What keeps ``state`` (a checkpoint's adapter-only state_dict) from loading into this module, as words:
        the first trainable tensor it lacks, the first whose shape (a rank) differs, or the first it holds that
        this module does not train; None when it fits."""
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        for name, param in own.items():
            if name not in state:
                return f"{self._described(name)} is trained by this run but not in the checkpoint"
            saved = tuple(getattr(state[name], "shape", ()))
            if saved != tuple(param.shape):
                return f"{self._described(name)} {_shape_words(name, saved, tuple(param.shape))}"
        extra = next((name for name in state if name not in own), None)
        return None if extra is None else f"the checkpoint trains {self._described(extra)}, which this run does not"

    def _described(self, name: str) -> str:
        """``layer <path> of <family>.<submodule>`` for a LoRA tensor; the tensor's name otherwise."""
        layer, lora, _ = name.partition(".lora_")
        if not lora:
            return f"tensor {name}"
        param = dict(self.named_parameters()).get(name)  # None: a tensor only the checkpoint has
        sub = next((sub for sub, peft in self.adapters.items() if param is not None and
                    any(p is param for p in peft.parameters())), None)
        return f"layer {layer.removeprefix('head.')} of {self.head.family}{f'.{sub}' if sub else ''}"


def _shape_words(name: str, saved: tuple[int, ...], mine: tuple[int, ...]) -> str:
    """``has rank 8 in the checkpoint and 4 in this run`` for a LoRA factor (A: rank first, B: rank second),
    else the two shapes."""
    factor = re.search(r"\.lora_(?:embedding_)?([AB])\.", name)
    axis = None if factor is None else 0 if factor.group(1) == "A" else 1
    if axis is not None and len(saved) == len(mine) > axis and saved[:axis] + saved[axis + 1:] == \
            mine[:axis] + mine[axis + 1:]:
        return f"has rank {saved[axis]} in the checkpoint and {mine[axis]} in this run"
    return f"has shape {list(saved)} in the checkpoint and {list(mine)} in this run"
