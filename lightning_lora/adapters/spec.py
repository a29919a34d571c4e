"""`AdapterSpec`: what LoRA to put where, validated before any model is loaded."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig

from lightning_lora.checks import choice, positive_int
from lightning_lora.errors import UserError

# Our names for PEFT's `init_lora_weights` values. "random" gives a non-zero B (outputs change at once),
# which tests use; every other init starts with B = 0 so the adapted model equals the base model.
INITS: dict[str, bool | str] = {
    "kaiming": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
    "random": False,
}
BIASES = ("none", "all", "lora_only")
RANK_HINT = " (e.g. 4, 8, 16)"  # a LoRA rank: also for adapter.conv_rank


@dataclass
class AdapterSpec:
    """One LoRA configuration, shared by every adapted submodule of a head.

    ``targets`` / ``submodules`` left as ``None`` take the head's defaults. ``targets`` may also map a
    submodule name to its own list (``{unet: [to_q, to_v], text_encoder: [q_proj]}``).
    """

    #: false: no LoRA; the adapted submodules are trained whole (full fine-tuning, the baseline LoRA is compared
    #: against), through the same module, checkpoints and snapshots (full weights then)
    enabled: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | dict[str, list[str]] | None = None
    submodules: list[str] | None = None
    init: str = "kaiming"
    rslora: bool = False
    dora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    #: start from an existing adapter (its r/alpha/targets per module replace the fields above)
    init_from: str | None = None
    #: train only the LoRA layers whose names contain one of these substrings (None = all)
    trainable: list[str] | None = None
    #: LoRA on spatial convolutions (kernel > 1, e.g. ResNet convs) at their own rank/alpha (kohya's conv_dim);
    #: None = no conv LoRA beyond what ``targets`` names. conv_alpha None = conv_rank.
    conv_rank: int | None = None
    conv_alpha: float | None = None
    #: per-submodule values that differ from the ones above: {text_encoder: {r: 4, alpha: 4, lr: 5e-5}}
    per_submodule: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.r = positive_int(self.r, "adapter.r", hint=RANK_HINT, whole_floats=True)
        self.alpha = _positive_float("adapter.alpha", self.alpha)
        self.dropout = _float("adapter.dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"adapter.dropout={self.dropout} is outside [0, 1); use e.g. 0.0 or 0.05")
        choice(self.init, "adapter.init", INITS)
        choice(self.bias, "adapter.bias", BIASES)
        for flag in ("enabled", "rslora", "dora"):
            if not isinstance(getattr(self, flag), bool):
                raise UserError(f"adapter.{flag}={getattr(self, flag)!r} must be true or false")
        self.targets = _targets(self.targets)
        self.submodules = _names("adapter.submodules", self.submodules)
        self.modules_to_save = _names("adapter.modules_to_save", self.modules_to_save)
        self.trainable = _names("adapter.trainable", self.trainable)
        if self.conv_rank is not None:
            self.conv_rank = positive_int(self.conv_rank, "adapter.conv_rank", hint=RANK_HINT, whole_floats=True)
        if self.conv_alpha is not None:
            self.conv_alpha = _positive_float("adapter.conv_alpha", self.conv_alpha)
        self.per_submodule = _per_submodule(self.per_submodule)
        if self.init_from is not None and not self.enabled:
            raise UserError(f"adapter.init_from={self.init_from} starts a LoRA adapter, but adapter.enabled=false "
                            "trains the whole model from the base weights; drop one of them")
        if self.init_from is not None:
            from lightning_lora import hub

            if not hub.is_hub_name(self.init_from):  # a Hub id is fetched (and checked) when the adapter is read
                self.init_from = os.path.expanduser(str(self.init_from))
                if not os.path.exists(self.init_from):
                    raise UserError(f"adapter.init_from: no adapter file or directory at {self.init_from} (a local "
                                    "path, or a Hub id such as org/name)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> AdapterSpec:
        """Build from a (Hydra/OmegaConf) mapping, naming any unknown key and the valid ones."""
        if cfg is None:
            return cls()
        data = _plain(cfg)
        if not isinstance(data, dict):
            raise UserError(f"adapter must be a mapping of fields, got {data!r}")
        data.pop("_target_", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"adapter.{unknown[0]} is not an adapter field; valid: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def scaling(self) -> float:
        """The factor LoRA's update is multiplied by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def for_submodule(self, name: str) -> AdapterSpec:
        """This spec with ``per_submodule[name]`` applied (``lr`` is not a LoRA field; see ``lr_for``)."""
        values = {k: v for k, v in (self.per_submodule or {}).get(name, {}).items() if k != "lr"}
        if not values:
            return self
        fields = {**self.to_dict(), **values, "per_submodule": None, "init_from": None}
        try:
            spec = AdapterSpec(**fields)
        except UserError as e:
            raise UserError(str(e).replace("adapter.", f"adapter.per_submodule.{name}.", 1)) from None
        spec.init_from = self.init_from
        return spec

    def lr_for(self, name: str) -> float | None:
        """The submodule's own learning rate, when ``per_submodule`` sets one."""
        return (self.per_submodule or {}).get(name, {}).get("lr")

    def targets_for(self, submodule: str, defaults: list[str]) -> list[str]:
        if self.targets is None:
            return list(defaults)
        if isinstance(self.targets, dict):
            return list(self.targets.get(submodule, defaults))
        return list(self.targets)

    def lora_config(self, targets: list[str], **extra: Any) -> LoraConfig:
        """The PEFT config for one submodule (``extra`` goes to LoraConfig unchanged)."""
        if self.modules_to_save and not isinstance(targets, str):
            both = [m for m in self.modules_to_save for t in targets
                    if m == t or m.endswith("." + t) or t.endswith("." + m)]
            if both:
                raise UserError(f"adapter.modules_to_save names {both[0]!r}, which is also a LoRA target; a module is "
                                "either adapted (targets) or trained and saved whole (modules_to_save), not both")
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            init_lora_weights=INITS[self.init],
            use_rslora=self.rslora,
            use_dora=self.dora,
            bias=self.bias,
            modules_to_save=self.modules_to_save,
            **extra,
        )


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, without importing omegaconf when it is not used."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UserError(f"{key}={value!r} must be a number")
    return float(value)


def _positive_float(key: str, value: Any) -> float:
    value = _float(key, value)
    if value <= 0:
        raise UserError(f"{key}={value} must be > 0 (commonly 2 x adapter.r)")
    return value


def _names(key: str, value: Any) -> list[str] | None:
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"{key}={value!r} must be a list of module names, e.g. [query,value]")
    if not value:
        raise UserError(f"{key}=[] is empty; give at least one name or leave it unset for the defaults")
    return list(value)


PER_SUBMODULE_FIELDS = ("r", "alpha", "dropout", "conv_rank", "conv_alpha", "lr")


def _per_submodule(value: Any) -> dict[str, dict[str, Any]] | None:
    value = _plain(value)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UserError(f"adapter.per_submodule={value!r} must map submodule names to fields, e.g. "
                        "{text_encoder: {r: 4, lr: 5e-5}}")
    for sub, fields in value.items():
        for key, v in fields.items():
            if key not in PER_SUBMODULE_FIELDS:
                raise UserError(f"adapter.per_submodule.{sub}.{key} is not a per-submodule field; valid: "
                                f"{', '.join(PER_SUBMODULE_FIELDS)}")
            if key == "lr":
                _positive_float(f"adapter.per_submodule.{sub}.lr", v)
    return value


def _targets(value: Any) -> list[str] | dict[str, list[str]] | None:
    value = _plain(value)
    if isinstance(value, dict):
        return {sub: _names(f"adapter.targets.{sub}", names) for sub, names in value.items()}
    return _names("adapter.targets", value)
