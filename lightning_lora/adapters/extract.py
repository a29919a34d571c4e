"""LoRA extraction by truncated SVD of weight deltas, and the reconstruction report.

Layout (PEFT's): a linear delta ``[out, in]`` gives ``lora_A`` (down) ``[r, in]`` and ``lora_B`` (up)
``[out, r]``; a conv delta ``[out, in, *k]`` is flattened to ``[out, in·prod(k)]`` and gives a down factor
``[r, in, *k]`` (a k-sized conv) and an up factor ``[out, r, 1, ...]`` (a 1×1 conv).

The singular values are split symmetrically: down = √S·Vᵀ, up = U·√S, so both factors have the same
scale (better conditioned for further training and for low-precision storage than putting S in one).
Alpha is set to the rank actually used, so the LoRA scale alpha/r is exactly 1.

``method="randomized"`` uses ``torch.svd_lowrank`` plus one refining subspace iteration on large layers
and checks each module against the Eckart–Young optimum; a module whose estimated error exceeds the
optimum by more than ``tolerance`` (1%) is redone with the full SVD.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_lora.adapters.factors import Factors, is_spatial
from lightning_lora.checks import choice, fraction, positive_int
from lightning_lora.errors import UserError

METHODS = ("full", "randomized")


@dataclass
class ModuleResult:
    """Per-module numbers of an extraction or a validation."""

    name: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float  # ‖ΔW − ΔŴ‖ / ‖ΔW‖
    energy: float  # Σ kept σ² / ‖ΔW‖² (for any LoRA: ⟨ΔW, ΔŴ⟩ / ‖ΔW‖²)
    optimum: float = float("nan")  # the Eckart–Young relative error at this rank, when known
    method: str = "full"


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


# ---------------------------------------------------------------------------- SVD
def _full_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank], s


def _randomized_svd(matrix: torch.Tensor, rank: int, oversample: int, niter: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Top-``rank`` factors from ``svd_lowrank`` refined by one more subspace iteration.

    Returns (U, S, Vh, gap) where ``gap`` = energy the refinement added: an estimate of how much top-r
    energy the sketch may still miss (subspace iteration converges geometrically, so the remaining
    shortfall is at most about the last improvement).
    """
    q = min(rank + oversample, min(matrix.shape))
    u0, s0, _ = torch.svd_lowrank(matrix, q=q, niter=niter)
    energy0 = float((s0[:rank].double() ** 2).sum())
    basis, _ = torch.linalg.qr(matrix @ (matrix.mT @ u0))  # one more power iteration
    small = basis.mT @ matrix  # [q, n]
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = basis @ ub[:, :rank]
    energy1 = float((s[:rank].double() ** 2).sum())
    return u, s[:rank], vh[:rank], max(energy1 - energy0, 0.0)


def factorize(delta: torch.Tensor, rank: int | None, *, method: str = "full", device: str | torch.device = "cpu",
              clamp_quantile: float | None = None, oversample: int | None = None, niter: int = 2,
              tolerance: float = 0.01, randomized_min_dim: int = 128) -> tuple[Factors, ModuleResult]:
    """Truncated SVD of one weight delta (any ndim >= 2) into LoRA factors with scale 1.

    ``rank`` None keeps every singular value; it is capped at min(out, in·prod(k)). The result's
    ``rel_error`` is exact (from the kept singular values or the residual), ``optimum`` the
    Eckart–Young error (exact for ``full``, estimated for ``randomized``).
    """
    choice(method, "--method", METHODS)
    shape = tuple(delta.shape)
    out = shape[0]
    mat = delta.to(device=device, dtype=torch.float32).reshape(out, -1)
    k = min(mat.shape)
    r = k if rank is None else min(rank, k)
    total = _sq_norm(mat)
    used = "full"
    if method == "randomized" and r < k and k >= randomized_min_dim:
        p = oversample if oversample is not None else max(10, r // 2)
        u, s, vh, gap = _randomized_svd(mat, r, p, niter)
        kept = float((s.double() ** 2).sum())
        err2 = max(total - kept, 0.0)
        if err2 < 1e-3 * total:  # a nearly exact fit: ‖ΔW‖² − Σ kept σ² cancels, measure the residual itself
            err2 = _sq_norm(mat - (u * s) @ vh)
        # Optimum² >= err² − (top-r energy the sketch may still miss); accept if err <= (1 + tolerance)·optimum.
        opt2_est = max(err2 - gap, 0.0)
        used = "randomized"
        if err2 > (1.0 + tolerance) ** 2 * opt2_est:
            u, s, vh, s_all = _full_svd(mat, r)
            kept = float((s.double() ** 2).sum())
            err2 = opt2_est = float((s_all[r:].double() ** 2).sum())
            used = "full (fallback)"
    else:
        u, s, vh, s_all = _full_svd(mat, r)
        kept = float((s.double() ** 2).sum())
        err2 = opt2_est = float((s_all[r:].double() ** 2).sum())  # the discarded σ²: no cancellation
    optimum = math.sqrt(opt2_est / total) if total > 0 else 0.0
    rel = math.sqrt(err2 / total) if total > 0 else 0.0
    root = s.clamp_min(0).sqrt()
    up = u * root  # [out, r]
    down = root[:, None] * vh  # [r, in·k]
    if clamp_quantile is not None:
        up, down = _clamp(up, down, clamp_quantile)
    extra = (1,) * (len(shape) - 2)
    factors = Factors(down=down.reshape(r, *shape[1:]).cpu().contiguous(),
                      up=up.reshape(out, r, *extra).cpu().contiguous(), scale=1.0)
    if clamp_quantile is not None:
        rel = relative_error(mat, factors.delta().to(mat.device).reshape(out, -1))
    energy = kept / total if total > 0 else 1.0
    return factors, ModuleResult("", shape, r, rel, energy, optimum, used)


def check_clamp_quantile(quantile: float) -> float:
    """``--clamp-quantile`` is in (0, 1]; the command line checks it before any weight is read."""
    return fraction(quantile, "--clamp-quantile", interval="(0, 1]", hint=", e.g. 0.99")


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's optional clamp of both factors at a quantile of their absolute values (hurts accuracy)."""
    check_clamp_quantile(quantile)
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    kth = max(1, min(values.numel(), math.ceil(quantile * values.numel())))
    hi = values.kthvalue(kth).values
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _sq_norm(x: torch.Tensor) -> float:
    """‖x‖² accumulated in float64 (a float32 reduction over ~30M entries was off by 0.3%)."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """‖delta − approx‖ / ‖delta‖ (float64 accumulation)."""
    norm = math.sqrt(_sq_norm(delta))
    if norm == 0.0:
        return 0.0 if _sq_norm(approx) == 0.0 else float("inf")
    return math.sqrt(_sq_norm(delta - approx)) / norm


# ---------------------------------------------------------------------------- whole models
def extract_lora(base, tuned, *, rank: int | None = 32, conv_rank: int | None = None, min_diff: float = 1e-3,
                 modules: Sequence[str] | None = None, method: str = "full", device: str = "cpu",
                 clamp_quantile: float | None = None, progress: Callable[[Iterable], Iterable] | None = None,
                 ) -> Extraction:
    """Extract a LoRA from two checkpoints with the same keys (``WeightSource`` or name->tensor mappings).

    Every ``<module>.weight`` with ndim >= 2 whose delta max-abs exceeds ``min_diff`` gets factors;
    ``conv_rank`` (default: ``rank``) applies to convs with a kernel bigger than 1×1. One module is in
    memory at a time (plus the factors kept so far).
    """
    base, tuned = _as_source(base), _as_source(tuned)
    conv_rank = rank if conv_rank is None else conv_rank
    names = {k[: -len(".weight")]: k for k in base if k.endswith(".weight") and len(base.shape(k)) >= 2}
    chosen = select_modules(sorted(names), modules)
    if not chosen:
        raise UserError(f"--modules {' '.join(modules or [])} matches no weight; e.g. {', '.join(sorted(names)[:3])}")
    result = Extraction()
    iterator = progress(chosen) if progress is not None else chosen
    for name in iterator:
        key = names[name]
        delta = tuned.get(key).to(torch.float32) - base.get(key).to(torch.float32)
        if not delta.numel() or float(delta.abs().max()) <= min_diff:
            result.skipped_small.append(name)
            continue
        r = conv_rank if is_spatial(delta.shape) else rank
        factors, info = factorize(delta, r, method=method, device=device, clamp_quantile=clamp_quantile)
        info.name = name
        result.factors[name] = factors
        result.results.append(info)
        result.fallbacks += info.method == "full (fallback)"
    return result


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
    for name in progress(names) if progress is not None else names:
        key = resolve[name]
        delta = (tuned.get(key).to(torch.float32) - base.get(key).to(torch.float32))
        f = factors[name]
        if tuple(delta.shape) != f.weight_shape:
            raise UserError(f"LoRA module {name!r} makes a delta of shape {list(f.weight_shape)} but weight "
                            f"{key!r} has shape {list(delta.shape)}")
        approx = f.delta()
        total, err2 = _sq_norm(delta), _sq_norm(delta - approx)
        inner = (total + _sq_norm(approx) - err2) / 2  # ⟨ΔW, ΔŴ⟩ by polarisation, no float64 copies
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
