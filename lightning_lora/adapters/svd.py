"""One weight delta into LoRA factors by truncated SVD (full or randomized), with its exact error.

Layout (PEFT's): a linear delta ``[out, in]`` gives ``lora_A`` (down) ``[r, in]`` and ``lora_B`` (up)
``[out, r]``; a conv delta ``[out, in, *k]`` is flattened to ``[out, in·prod(k)]`` and gives a down factor
``[r, in, *k]`` (a k-sized conv) and an up factor ``[out, r, 1, ...]`` (a 1×1 conv).

The singular values are split symmetrically: down = √S·Vᵀ, up = U·√S, so both factors have the same
scale (better conditioned for further training and for low-precision storage than putting S in one).
The factors' scale is 1 (alpha = the rank used).

``method="randomized"`` sketches the column space (a Gaussian range finder, 2 subspace iterations, width rank +
max(2·rank, 32)) and keeps the sketch only when its error is *certified* within ``max_error_ratio`` (1.01) of the
Eckart–Young optimum; else the module gets the full SVD. The error ‖ΔW‖² − Σ kept θ is exact (float64 projection
onto an orthonormal basis). The optimum ‖ΔW‖² − Σ_{i≤r} σᵢ² needs an upper bound on the true top-r energy, which
Ritz values (lower bounds) cannot give: ``_optimum_lower_bound`` gets it from the Ritz residuals and a gap, with
the sketch's residual norm bounded by Gaussian probes (a bound that fails with probability ≤ 1e-12 per module;
everything else is deterministic, float32 rounding of the sketch's products aside). On power-law spectra
(σᵢ ∝ i^-α, α ≥ 0.5) the certificate is within 0.1% of the truth, so it no longer sends modules to the full SVD.

Used by whole-model extraction (``extract.py``) and by the SVD combination of LoRAs (``combine.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_lora.adapters.factors import Factors
from lightning_lora.checks import choice, fraction, number

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
    if matrix.shape[0] < matrix.shape[1]:  # LAPACK through torch is ~5x slower on a wide matrix than on its transpose
        v, s, uh = torch.linalg.svd(matrix.mT, full_matrices=False)
        return uh[:rank].mT, s[:rank], v[:, :rank].mT, s
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank], s


# ---------------------------------------------------------------------------- certified randomized SVD
#: probes of the residual's spectral norm: the bound on it fails with probability <= (√(2/π)/slack)^probes ≈ 1e-12
_PROBES, _PROBE_SLACK, _PROBE_POWER = 30, 2.0, 4
#: below this relative squared error the truncation is exact to float32 rounding: accepted without a ratio
_EXACT_SQ = 1e-10
_CHUNK = 1 << 21  # float64 elements per column block of the weight (16 MB)


@dataclass
class _Sketch:
    """An orthonormal basis ``q`` [m, w] (float64) of an approximate dominant column space of one delta, its Ritz
    values ``theta`` (descending: the squared singular values of qᵀ·ΔW), Ritz vectors ``ritz`` [m, w] and
    ``bw`` = ritzᵀ·ΔW [w, n] (row i is θᵢ^½ times the i-th right singular vector)."""

    q: torch.Tensor
    theta: torch.Tensor
    ritz: torch.Tensor
    bw: torch.Tensor


def _left_mul64(q: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """qᵀ·mat in float64 (q float64 [m, w], mat float32 [m, n]) one column block at a time, so no float64 copy of
    the whole weight is held."""
    step = max(1, _CHUNK // mat.shape[0])
    return torch.cat([q.mT @ mat[:, i:i + step].double() for i in range(0, mat.shape[1], step)], dim=1)


def _sketch(mat: torch.Tensor, width: int, niter: int, gen: torch.Generator) -> _Sketch:
    """Range finder with ``niter`` subspace iterations (re-orthonormalised each half step), then the Ritz pairs.

    The last projection qᵀ·ΔW is in float64 with q orthonormal to float64 rounding, so the kept energy, and hence
    the error ‖ΔW‖² − Σ kept θ, is exact (a float32 one is off by ~1e-7·‖ΔW‖², which is 1e-3 of a 1% error²).
    """
    omega = torch.randn(mat.shape[1], width, generator=gen).to(mat.device)
    q = torch.linalg.qr(mat @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(mat @ torch.linalg.qr(mat.mT @ q).Q).Q
    q64 = torch.linalg.qr(q.double()).Q
    b = _left_mul64(q64, mat)
    theta, ub = torch.linalg.eigh(b @ b.mT)  # the small SVD through its w×w Gram matrix (float64)
    theta, ub = theta.flip(0).clamp_min(0), ub.flip(1)
    return _Sketch(q64, theta, q64 @ ub, ub.mT @ b)


def _residual_norm_bound(mat: torch.Tensor, q: torch.Tensor, start: torch.Tensor) -> float:
    """An upper bound on ‖R‖₂², R = (I − qqᵀ)·ΔW, that holds with probability ≥ 1 − (√(2/π)/slack)^probes.

    ``start`` is ΔW·Ω for Gaussian probes Ω drawn after q. With X = (RRᵀ)^j·R and ω Gaussian, ‖Xω‖ ≥ σ₁(X)·|g| for a
    standard normal g, and P(|g| < 1/slack) ≤ √(2/π)/slack; so the largest ‖Xω‖ over independent probes is below
    σ₁(X)/slack with probability at most that to the power of the probes. σ₁(R)² = σ₁(X)^(2/(2j+1)): the slack
    costs a factor slack^(2/(2j+1)) on the bound.
    """
    def project(x: torch.Tensor) -> torch.Tensor:
        return x - q @ (q.mT @ x)

    x, log_scale = project(start), 0.0
    for _ in range(_PROBE_POWER):
        norm = float(x.norm())
        if norm == 0.0:
            return 0.0
        x, log_scale = x / norm, log_scale + math.log(norm)  # keep float32 in range; the map is linear
        x = project(mat @ (mat.mT @ x))
    biggest = float(x.double().norm(dim=0).max())
    if biggest == 0.0:
        return 0.0
    log_sigma = (math.log(_PROBE_SLACK * biggest) + log_scale) / (2 * _PROBE_POWER + 1)
    return math.exp(2 * log_sigma) * (1 + 1e-4)  # float32 rounding of the products


def _optimum_lower_bound(mat: torch.Tensor, sk: _Sketch, rank: int, total: float, gen: torch.Generator) -> float:
    """A lower bound on the Eckart–Young error² ‖ΔW‖² − Σ_{i≤r} σᵢ² (the σᵢ unknown), from the sketch.

    With M = ΔW·ΔWᵀ, W the top-k Ritz vectors (values θ), E = Wᵀ·M·(I − WWᵀ) and δ ≥ λ_max of M compressed to
    W's complement, for every i ≤ r: λᵢ(M) ≥ θ_r (interlacing), and eliminating the complement block (a Schur
    complement) gives λᵢ(M) ≤ λᵢ(diag θ + EEᵀ/η) with η = θ_r − δ > 0. So Σ_{i≤r} σᵢ² is at most the top-r
    eigenvalue sum of that k×k matrix. EEᵀ = CᵀC with C = M·W − W·diag θ (the Ritz residuals), and
    δ = θ_{k+1} + ‖(I − qqᵀ)ΔW‖₂² (the second term bounded with high probability). Several k in [r, width] are
    tried and the best bound kept; −inf when none leaves a gap.
    """
    theta, width = sk.theta, sk.theta.numel()
    probes = torch.randn(mat.shape[1], _PROBES, generator=gen).to(mat.device)
    both = mat @ torch.cat([sk.bw.to(mat.dtype).mT, probes], dim=1)  # one pass: M·W and the probes' start
    resid = both[:, :width].double() - sk.ritz * theta
    gram = resid.mT @ resid
    beyond = _residual_norm_bound(mat, sk.q.to(mat.dtype), both[:, width:])
    best = -math.inf
    for k in sorted({rank, (3 * rank + width) // 4, (rank + width) // 2, width - (width - rank) // 4, width}):
        eta = float(theta[rank - 1]) - (beyond + (float(theta[k]) if k < width else 0.0))
        if eta <= 0:
            continue
        bound = torch.diag(theta[:k]) + gram[:k, :k] / eta
        best = max(best, total - float(torch.linalg.eigvalsh(bound)[-rank:].sum()))
    return best


def _randomized(mat: torch.Tensor, rank: int, total: float, max_ratio: float, oversample: int | None, niter: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float] | None:
    """Top-``rank`` factors (U, S, Vh, error², lower bound of the optimum²) whose error is certified within
    ``max_ratio`` of the Eckart–Young optimum, or None when no sketch up to half the smaller side certifies it.

    The sketch is ``rank + oversample`` wide (default 2·rank, at least 32: enough on power-law spectra down to
    σᵢ ∝ i^-0.5 at rank 32); a sketch that cannot be certified is retried once twice as wide. The draws are seeded,
    so a module gives the same factors on every run.
    """
    flip = mat.shape[0] > mat.shape[1]  # sketch the smaller side's column space: smaller bases, same passes
    work = mat.mT if flip else mat
    side = work.shape[0]
    extra = max(2 * rank, 32) if oversample is None else oversample
    gen = torch.Generator().manual_seed(0)
    for width in dict.fromkeys((rank + extra, rank + 2 * extra)):
        if width > side // 2:  # as wide as that, the full SVD costs about the same
            break
        sk = _sketch(work, width, niter, gen)
        err2 = max(total - float(sk.theta[:rank].sum()), 0.0)  # exact: q is orthonormal in float64
        if err2 <= _EXACT_SQ * total:
            bound = err2
        else:
            bound = _optimum_lower_bound(work, sk, rank, total, gen)
            if err2 > max_ratio ** 2 * bound:
                continue
        s = sk.theta[:rank].sqrt()
        u = sk.ritz[:, :rank].float()
        vh = (sk.bw[:rank] / torch.where(s > 0, s, 1.0)[:, None]).float()
        s = s.float()
        if flip:  # work = matᵀ = U·S·Vh, so mat = Vhᵀ·S·Uᵀ
            u, vh = vh.mT, u.mT
        return u, s, vh, err2, max(bound, 0.0)
    return None


def factorize(delta: torch.Tensor, rank: int | None, *, method: str = "full", device: str | torch.device = "cpu",
              clamp_quantile: float | None = None, oversample: int | None = None, niter: int = 2,
              max_error_ratio: float = 1.01, randomized_min_dim: int = 128) -> tuple[Factors, ModuleResult]:
    """Truncated SVD of one weight delta (any ndim >= 2) into LoRA factors with scale 1.

    ``rank`` None keeps every singular value; it is capped at min(out, in·prod(k)). The result's
    ``rel_error`` is exact (from the kept singular values or the residual), ``optimum`` the
    Eckart–Young error (exact for ``full``; for ``randomized`` the certified lower bound). ``randomized``
    keeps a sketch only when its error is certified within ``max_error_ratio`` of the optimum, else it
    does the full SVD (``method`` of the result: ``full (fallback)``).
    """
    choice(method, "--method", METHODS)
    check_max_error_ratio(max_error_ratio)
    shape = tuple(delta.shape)
    out = shape[0]
    mat = delta.to(device=device, dtype=torch.float32).reshape(out, -1)
    k = min(mat.shape)
    r = k if rank is None else min(rank, k)
    total = sq_norm(mat)
    used = "full"
    sketched = None
    if method == "randomized" and r < k and k >= randomized_min_dim and total > 0:
        sketched = _randomized(mat, r, total, max_error_ratio, oversample, niter)
        used = "randomized" if sketched is not None else "full (fallback)"
    if sketched is not None:
        u, s, vh, err2, opt2 = sketched
        kept = total - err2
    else:
        u, s, vh, s_all = _full_svd(mat, r)
        kept = float((s.double() ** 2).sum())
        err2 = opt2 = float((s_all[r:].double() ** 2).sum())  # the discarded σ²: no cancellation
    optimum = math.sqrt(opt2 / total) if total > 0 else 0.0
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


def check_max_error_ratio(ratio: float) -> float:
    """``--max-error-ratio``: the randomized method's allowed error over the optimum, a number >= 1."""
    return number(ratio, "--max-error-ratio", low=1.0, hint=", e.g. 1.01 (1% above the optimum)")


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
