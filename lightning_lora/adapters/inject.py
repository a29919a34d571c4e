"""Putting LoRA into modules with PEFT, with errors that name what exists, and the parameter summary."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lightning_lora.errors import UserError

# PEFT asks every model it wraps for ``is_gradient_checkpointing``, an alias transformers deprecated (FutureWarning
# "... is deprecated and will be removed in v6") in favour of ``is_activation_checkpointing``: the warning is about
# PEFT's call, not anything a user can change, so exactly that message from transformers' module is not shown.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")

# Layer types PEFT's LoRA can wrap (transformers' GPT-2 style Conv1D is matched by class name).
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)
ALL_LINEAR = "all-linear"


def _is_lora_layer_type(module: nn.Module) -> bool:
    return isinstance(module, _LORA_LAYER_TYPES) or type(module).__name__ == "Conv1D"


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the whole name, or its ending after a dot."""
    return name == target or name.endswith("." + target)


def layer_names_summary(model: nn.Module, limit: int = 30) -> str:
    """The adaptable layer names of ``model``, grouped by their last part: 'query x6, dense x18, ...'."""
    counts = Counter(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _is_lora_layer_type(m))
    parts = [f"{leaf} x{n}" if n > 1 else leaf for leaf, n in counts.most_common(limit)]
    more = len(counts) - limit
    return ", ".join(parts) + (f", ... ({more} more)" if more > 0 else "")


def check_targets(model: nn.Module, targets: list[str] | str, where: str) -> list[str]:
    """The listed targets that match no module in ``model`` (allowed: one target list may serve several model
    families, e.g. ``[q_proj, v_proj, query, value]`` for CLIP and BERT alike). A one-line UserError when none of
    them matches, or when a target matches only layers LoRA cannot wrap."""
    if isinstance(targets, str):  # a regex or "all-linear": PEFT's own semantics, checked by PEFT
        return []
    targets = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)  # PEFT keeps a set
    named = [(n, m) for n, m in model.named_modules() if n]
    unmatched = []
    for target in targets:
        hits = [(n, m) for n, m in named if matches_target(n, target)]
        if not hits:
            unmatched.append(target)
        elif not any(_is_lora_layer_type(m) for _, m in hits):
            n, m = hits[0]
            raise UserError(
                f"adapter target {target!r} in {where} matches '{n}' ({type(m).__name__}), which LoRA cannot "
                f"wrap; target its Linear/Conv layers instead: {layer_names_summary(m)}"
            )
    if targets and len(unmatched) == len(targets):
        named_targets = f"target {unmatched[0]!r} matches" if len(unmatched) == 1 else f"targets {unmatched} match"
        raise UserError(f"adapter {named_targets} no module in {where}; layers there: {layer_names_summary(model)}")
    return unmatched


def spatial_conv_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets whose every match is a convolution with a kernel larger than 1 (they take ``conv_rank``)."""
    out = []
    for target in targets:
        hits = [m for n, m in model.named_modules() if n and matches_target(n, target)]
        if hits and all(isinstance(m, (nn.Conv2d, nn.Conv3d)) and max(m.kernel_size) > 1 for m in hits):
            out.append(target)
    return out


def rank_limit(module: nn.Module) -> tuple[int, str] | None:
    """The layer's weight seen as a matrix: its smaller side (a LoRA rank at or above it adds parameters and no
    expressive power) and its shape in words; None for a layer type without one (attention)."""
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features), f"Linear({module.in_features} -> {module.out_features})"
    if isinstance(module, nn.Embedding):
        return min(module.num_embeddings, module.embedding_dim), \
            f"Embedding({module.num_embeddings}, {module.embedding_dim})"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        kernel = "x".join(map(str, module.kernel_size))
        return min(fan_in, module.out_channels), \
            f"{type(module).__name__}({module.in_channels} -> {module.out_channels}, kernel {kernel})"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # GPT-2 style: [in, out]
        fan_in, fan_out = module.weight.shape
        return min(fan_in, fan_out), f"Conv1D({fan_in} -> {fan_out})"
    return None


def _targeted(config: LoraConfig, name: str, module: nn.Module) -> bool:
    """Whether PEFT would put LoRA into ``name`` (its own matching; ``all-linear`` as every Linear)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.target_modules == ALL_LINEAR:
        return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    hit = check_target_module_exists(config, name)
    return bool(hit) and type(hit).__name__ != "_ExcludedModule" and _is_lora_layer_type(module)


@dataclass(frozen=True)
class OversizedRank:
    """A targeted layer whose LoRA rank is not below its smaller side; ``smallest``: the least side among the
    layers taking the same rank (the valid ranks are below it); ``patterned``: the rank came from rank_pattern."""

    layer: str
    shape: str
    rank: int
    smallest: int
    patterned: bool


def oversized_rank(model: nn.Module, config: LoraConfig) -> OversizedRank | None:
    """The first layer ``config`` targets in ``model`` whose rank (its ``rank_pattern`` entry, else ``r``) is at
    least its smaller side: checked before PEFT allocates ``r x side`` tensors (``r=100000000`` is gigabytes)."""
    from peft.utils.other import get_pattern_key

    patterns = dict(config.rank_pattern or {})
    first: OversizedRank | None = None
    smallest: dict[bool, int] = {}
    for name, module in model.named_modules():
        if not name or not _targeted(config, name, module) or (limit := rank_limit(module)) is None:
            continue
        key = get_pattern_key(patterns.keys(), name) if patterns else name
        patterned = key in patterns
        rank = patterns[key] if patterned else config.r
        smallest[patterned] = min(smallest.get(patterned, limit[0]), limit[0])
        if first is None and rank >= limit[0]:
            first = OversizedRank(name, limit[1], rank, 0, patterned)
    if first is None:
        return None
    return OversizedRank(first.layer, first.shape, first.rank, smallest[first.patterned], first.patterned)


def inject_adapter(model: nn.Module, config: LoraConfig, where: str = "model") -> PeftModel:
    """Freeze ``model`` and add a trainable LoRA adapter in place; returns PEFT's handle for saving.

    The module object itself is modified (its target layers become LoRA layers), so code that holds
    ``model`` keeps working; the returned ``PeftModel`` wraps that same object.
    """
    if unmatched := check_targets(model, config.target_modules, where):
        matched = sorted(t for t in config.target_modules if t not in unmatched)
        warnings.warn(f"adapter targets {unmatched} match no module in {where}; LoRA goes into {matched} there",
                      UserWarning, stacklevel=2)
    model.requires_grad_(False)
    return get_peft_model(model, config)


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one adapted submodule: ``original`` counts base weights only."""

    name: str
    original: int
    trainable: int

    @property
    def reduction(self) -> float:
        return 100.0 * (1.0 - self.trainable / self.original) if self.original else 0.0


def count_parameters(name: str, model: nn.Module) -> ParamCount:
    original = trainable = 0
    for pname, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        if "lora_" not in pname and "modules_to_save" not in pname:
            original += p.numel()
    return ParamCount(name, original, trainable)


def format_adapter_summary(
    r: int, alpha: float, dropout: float, targets: dict[str, list[str]], counts: list[ParamCount]
) -> str:
    """The 'Applying LoRA adapters' block users know from TRELLIS-style trainers."""
    bar = "=" * 60
    lines = [bar, "Applying LoRA adapters", bar]
    lines += [f"  LoRA rank: {r}", f"  LoRA alpha: {alpha:g}", f"  LoRA dropout: {float(dropout)}"]
    all_targets = list(dict.fromkeys(t for ts in targets.values() for t in ts))  # as given, like the fork's
    lines += [f"  Target modules: {all_targets}", f"  Models: {list(targets)}", ""]
    for c in counts:
        lines += [
            f"  {c.name}:",
            f"    Targets: {targets.get(c.name, [])}",
            f"    Original params: {c.original:,}",
            f"    Trainable params: {c.trainable:,}",
            f"    Reduction: {c.reduction:.2f}%",
        ]
    lines.append(bar)
    return "\n".join(lines)
