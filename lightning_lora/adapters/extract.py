"""LoRA extraction from a (base, fine-tuned) pair, module by module, and the reconstruction report.

Each changed weight's delta is factorized by ``svd.factorize`` (full or randomized truncated SVD; alpha is set to
the rank actually used, so the LoRA scale alpha/r is exactly 1); ``validate_lora`` measures any LoRA against the
deltas it should reproduce.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_lora.adapters.checkpoints import check_same_keys
from lightning_lora.adapters.factors import Factors, is_spatial
from lightning_lora.adapters.finite import require_finite
from lightning_lora.adapters.svd import ModuleResult, check_max_error_ratio, factorize, sq_norm
from lightning_lora.checks import positive_int
from lightning_lora.errors import UserError


@dataclass
class Extraction:
    factors: dict[str, Factors] = field(default_factory=dict)
    results: list[ModuleResult] = field(default_factory=list)
    skipped_small: list[str] = field(default_factory=list)  # delta max-abs <= min_diff
    fallbacks: int = 0  # randomized modules redone with the full SVD


# ---------------------------------------------------------------------------- arguments
def parse_rank(value: str | int | None, flag: str = "--rank") -> int | None:
    """A positive int, or ``None`` for ``full`` (keep every singular value)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "full"):
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value) if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        raise UserError(f"{flag}={value!r} is not a rank; give a positive integer (e.g. 32) or 'full'") from None
    return positive_int(number, flag, hint=" (e.g. 32) or 'full'")


def select_modules(names: Iterable[str], patterns: Sequence[str] | None) -> list[str]:
    """Names matching any pattern: a glob (``*attn*``), or a plain substring when it has no wildcard."""
    names = list(names)
    if not patterns:
        return names

    def hit(name: str, pattern: str) -> bool:
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(name, pattern)
        return pattern in name

    return [n for n in names if any(hit(n, p) for p in patterns)]


# ---------------------------------------------------------------------------- whole models
def extract_lora(base, tuned, *, rank: int | None = 32, conv_rank: int | None = None, min_diff: float = 1e-3,
                 modules: Sequence[str] | None = None, method: str = "full", device: str = "cpu",
                 clamp_quantile: float | None = None, progress: Callable[[Iterable], Iterable] | None = None,
                 max_error_ratio: float = 1.01) -> Extraction:
    """Extract a LoRA from two checkpoints with the same keys (``WeightSource`` or name->tensor mappings).

    Every ``<module>.weight`` with ndim >= 2 whose delta max-abs exceeds ``min_diff`` gets factors;
    ``conv_rank`` (default: ``rank``) applies to convs with a kernel bigger than 1×1. One module is in
    memory at a time (plus the factors kept so far). ``method="randomized"`` keeps a module's sketch only when its
    error is certified within ``max_error_ratio`` of the optimum (else that module gets the full SVD).
    """
    base, tuned = _as_source(base), _as_source(tuned)
    check_min_diff(min_diff)
    check_max_error_ratio(max_error_ratio)
    check_same_keys(base, tuned)  # before any weight is read: one line, not a KeyError or a broadcast error
    conv_rank = rank if conv_rank is None else conv_rank
    names = {k[: -len(".weight")]: k for k in base if k.endswith(".weight") and len(base.shape(k)) >= 2}
    chosen = select_modules(sorted(names), modules)
    if not chosen:
        raise UserError(f"--modules {' '.join(modules or [])} matches no weight; e.g. {', '.join(sorted(names)[:3])}")
    result = Extraction()
    deltas = _Deltas(base, tuned)
    iterator = progress(chosen) if progress is not None else chosen
    for name in iterator:
        key = names[name]
        delta, biggest = deltas(key)
        if not delta.numel() or biggest <= min_diff:
            result.skipped_small.append(name)
            continue
        r = conv_rank if is_spatial(delta.shape) else rank
        factors, info = factorize(delta, r, method=method, device=device, clamp_quantile=clamp_quantile,
                                  max_error_ratio=max_error_ratio)
        info.name = name
        result.factors[name] = factors
        result.results.append(info)
        result.fallbacks += info.method == "full (fallback)"
    return result


def check_min_diff(min_diff: float, key: str = "min_diff") -> float:
    """A finite threshold >= 0 (NaN would skip nothing and say nothing)."""
    if isinstance(min_diff, bool) or not isinstance(min_diff, (int, float)) or not (
            math.isfinite(min_diff) and min_diff >= 0):
        raise UserError(f"{key}={min_diff!r} must be a finite number >= 0, e.g. 0.001")
    return float(min_diff)


def validate_lora(base, tuned, factors: Mapping[str, Factors], resolve: Mapping[str, str] | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None) -> tuple[list[ModuleResult], list[str]]:
    """Per-module error of ΔŴ = scale·B·A against ΔW = tuned − base, without building a model.

    ``resolve`` maps LoRA module names to weight keys (default ``<name>.weight``). Also returns the
    modules with a non-zero delta that the LoRA does not cover.
    """
    base, tuned = _as_source(base), _as_source(tuned)
    resolve = resolve or {n: f"{n}.weight" for n in factors}
    results = []
    names = list(factors)
    deltas = _Deltas(base, tuned)
    for name in progress(names) if progress is not None else names:
        key = resolve[name]
        delta, _ = deltas(key)
        f = factors[name]
        if tuple(delta.shape) != f.weight_shape:
            raise UserError(f"LoRA module {name!r} makes a delta of shape {list(f.weight_shape)} but weight "
                            f"{key!r} has shape {list(delta.shape)}")
        approx = f.delta()
        total, err2 = sq_norm(delta), sq_norm(delta - approx)
        inner = (total + sq_norm(approx) - err2) / 2  # ⟨ΔW, ΔŴ⟩ by polarisation, no float64 copies
        energy = inner / total if total else 1.0
        rel = math.sqrt(err2 / total) if total else (0.0 if err2 == 0 else float("inf"))
        results.append(ModuleResult(name, tuple(delta.shape), f.rank, rel, energy))
    covered = set(resolve[n] for n in factors)
    uncovered = []
    for key in base:
        if key in covered or not key.endswith(".weight") or len(base.shape(key)) < 2:
            continue
        if not torch.equal(base.get(key), tuned.get(key)):
            uncovered.append(key[: -len(".weight")])
    return results, uncovered


#: the LBM LoRA scripts' reading of a module's relative error (README "Relative Error Interpretation"), in order
QUALITY_BANDS = ("< 5%: excellent", "5-50%: good, minor artifacts", "50-100%: poor, noticeable degradation",
                 "> 100%: more noise than signal (increase the rank)")


def quality_band(rel_error: float) -> str:
    """The band of one relative error: [0, 5%), [5%, 50%), [50%, 100%], above 100% (NaN too)."""
    if rel_error < 0.05:
        return QUALITY_BANDS[0]
    if rel_error < 0.5:
        return QUALITY_BANDS[1]
    if rel_error <= 1.0:
        return QUALITY_BANDS[2]
    return QUALITY_BANDS[3]


def band_counts(errors: Iterable[float]) -> dict[str, int]:
    """How many modules fall in each quality band, every band listed (in order) even when empty."""
    counts = dict.fromkeys(QUALITY_BANDS, 0)
    for e in errors:
        counts[quality_band(e)] += 1
    return counts


class _Deltas:
    """tuned − base per weight key, in float32, into one reused buffer (a fresh 100 MB tensor per weight costs more
    in page faults than the subtraction), with its max |·| from one pass; the two weights are read one after the
    other.

    A NaN/Inf in either checkpoint (or an overflowing difference) makes the difference non-finite, so one
    ``aminmax`` finds it; only then are the checkpoints searched, to name the one that holds it. The returned delta
    is valid until the next call.
    """

    def __init__(self, base, tuned):
        self.base, self.tuned = base, tuned
        self.buffer = torch.empty(0)

    def __call__(self, key: str) -> tuple[torch.Tensor, float]:
        shape = self.tuned.shape(key)
        numel = math.prod(shape)
        if self.buffer.numel() < numel:
            self.buffer = torch.empty(numel, dtype=torch.float32)
        delta = self.buffer[:numel].view(shape)
        # one checkpoint's copy alive at a time (each read is a copy out of the file): on the largest weight the
        # extraction's peak is then the buffer plus one weight, not two
        delta.copy_(self.tuned.get(key))  # in float32 whatever the checkpoints' dtype
        delta.sub_(self.base.get(key))
        if not numel:
            return delta, 0.0
        low, high = (float(v) for v in torch.aminmax(delta))
        if not (math.isfinite(low) and math.isfinite(high)):
            self._name_the_non_finite(key, delta)
        return delta, max(-low, high)

    def _name_the_non_finite(self, key: str, delta: torch.Tensor) -> None:
        for label, source in (("base", self.base), ("tuned", self.tuned)):
            path = getattr(source, "path", None)
            where = f"the {label} checkpoint" + (f" {path}" if path is not None else "")
            require_finite([(key, source.get(key))], f"{where}: weight", hint="; a LoRA cannot be made from it")
        require_finite([(key, delta)], "tuned - base overflows float32 for weight")


class _MappingSource:
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _as_source(obj):
    return _MappingSource(obj) if isinstance(obj, Mapping) else obj
