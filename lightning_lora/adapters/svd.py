"""One weight delta into LoRA factors by truncated SVD (full or randomized), with its exact error.

Layout (PEFT's): a linear delta ``[out, in]`` gives ``lora_A`` (down) ``[r, in]`` and ``lora_B`` (up)
``[out, r]``; a conv delta ``[out, in, *k]`` is flattened to ``[out, in·prod(k)]`` and gives a down factor
``[r, in, *k]`` (a k-sized conv) and an up factor ``[out, r, 1, ...]`` (a 1×1 conv).

The singular values are split symmetrically: down = √S·Vᵀ, up = U·√S, so both factors have the same
scale (better conditioned for further training and for low-precision storage than putting S in one).
The factors' scale is 1 (alpha = the rank used).

``method="randomized"`` uses ``torch.svd_lowrank`` plus one refining subspace iteration on large layers
and checks each module against the Eckart–Young optimum; a module whose estimated error exceeds the
optimum by more than ``tolerance`` (1%) is redone with the full SVD.

Used by whole-model extraction (``extract.py``) and by the SVD combination of LoRAs (``combine.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_lora.adapters.factors import Factors
from lightning_lora.checks import choice, fraction

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
    total = sq_norm(mat)
    used = "full"
    if method == "randomized" and r < k and k >= randomized_min_dim:
        p = oversample if oversample is not None else max(10, r // 2)
        u, s, vh, gap = _randomized_svd(mat, r, p, niter)
        kept = float((s.double() ** 2).sum())
        err2 = max(total - kept, 0.0)
        if err2 < 1e-3 * total:  # a nearly exact fit: ‖ΔW‖² − Σ kept σ² cancels, measure the residual itself
            err2 = sq_norm(mat - (u * s) @ vh)
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


def sq_norm(x: torch.Tensor) -> float:
    """‖x‖² accumulated in float64 (a float32 reduction over ~30M entries was off by 0.3%)."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """‖delta − approx‖ / ‖delta‖ (float64 accumulation)."""
    norm = math.sqrt(sq_norm(delta))
    if norm == 0.0:
        return 0.0 if sq_norm(approx) == 0.0 else float("inf")
    return math.sqrt(sq_norm(delta - approx)) / norm
