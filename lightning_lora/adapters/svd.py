"""One weight delta into LoRA factors by truncated SVD (full or randomized), with its exact error.

Layout (PEFT's): a linear delta ``[out, in]`` gives ``lora_A`` (down) ``[r, in]`` and ``lora_B`` (up)
``[out, r]``; a conv delta ``[out, in, *k]`` is flattened to ``[out, in·prod(k)]`` and gives a down factor
``[r, in, *k]`` (a k-sized conv) and an up factor ``[out, r, 1, ...]`` (a 1×1 conv).

The singular values are split symmetrically: down = √S·Vᵀ, up = U·√S, so both factors have the same
scale (better conditioned for further training and for low-precision storage than putting S in one).
The factors' scale is 1 (alpha = the rank used).

``method="randomized"`` runs block Lanczos on ΔW·ΔWᵀ (the smaller side; blocks of max(rank, 16) columns, fully
re-orthogonalised, one product ΔW·(ΔWᵀ·V) per step) and stops at the first step whose rank-r truncation is
*certified* within ``max_error_ratio`` (1.01) of the Eckart–Young optimum; a module whose Krylov space reaches half
its smaller side first gets the full SVD, and so does a module smaller than 400 on its smaller side (there the full
SVD is as fast). After each step a Rayleigh–Ritz step on the kept products gives, with no pass over the weight, the
error ‖ΔW‖² − Σ_{i≤r} θᵢ of the truncation and the Ritz residuals. The optimum ‖ΔW‖² − Σ_{i≤r} σᵢ² needs an upper
bound on the true top-r energy, which Ritz values (lower bounds) cannot give: ``_optimum_lower_bound`` gets it from
the Ritz residuals and a gap, with the norm of the weight outside the Krylov space bounded by Gaussian probes (each
such bound fails with probability ≤ 1e-12; everything else is deterministic). The probes run only when the bound
would certify with that norm at zero, and stop as soon as it certifies or their estimate says it cannot. The
factors need no further pass over the weight: each product keeps its inner half ΔWᵀ·V, from which WᵀΔW for the
top-r Ritz vectors W follows, and its float64 energy gives the reported error (products in float64 throughout once
the error is below 3% of the weight, where float32 rounding would show). Against the subspace
iteration this replaced, the Krylov space of the same passes is two to three times wider, which is what certifies
slowly falling spectra (σᵢ ∝ i^-α, α ≥ 0.5) within 1% after 3-4 steps.

Used by whole-model extraction (``extract.py``) and by the SVD combination of LoRAs (``combine.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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


# ---------------------------------------------------------------------------- certified block Lanczos
#: Gaussian probes of the residual's spectral norm and their power steps; the bound fails with probability <= _FAIL
_PROBES, _PROBE_POWER, _FAIL = 32, 4, 1e-12
#: below this relative squared error the truncation is exact to float32 rounding: accepted without a ratio
_EXACT_SQ = 1e-10
#: float32 products move the error² and the bound by up to ~1.5e-7·‖ΔW‖² (measured on power-law deltas; most on
#: spectra ruled by one direction), allowed 3×; float64 ones by ~1e-13
_ROUNDING, _ROUNDING64 = 5e-7, 1e-12
#: below this relative error² (3%) that allowance would cost more than 2.5% of a 1% ratio: float64 from there on
_FLOAT64_BELOW = 1e-3
_CHUNK = 1 << 21  # float64 elements per column block of the weight (16 MB)


def _blocks64(mat: torch.Tensor) -> Iterator[torch.Tensor]:
    """``mat``'s column blocks in float64, one at a time, so no float64 copy of the whole weight is held."""
    step = max(1, _CHUNK // mat.shape[0])
    for i in range(0, mat.shape[1], step):
        yield mat[:, i:i + step].double()


def _image64(work: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW·(ΔWᵀ·v), ΔWᵀ·v) in float64 (v float64)."""
    out = torch.zeros(work.shape[0], v.shape[1], dtype=torch.float64, device=v.device)
    inner = []
    for part in _blocks64(work):
        inner.append(part.mT @ v)
        out += part @ inner[-1]
    return out, torch.cat(inner)


def _eigh_descending(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, rounding below zero clamped) and eigenvectors of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh(sym)
    return values.flip(0).clamp_min(0), vectors.flip(1)


def _chi2_lower(dof: int, prob: float) -> float:
    """An x with P(χ²_dof < x) <= prob, from P(χ²_k < x) <= (x/2)^(k/2) / Γ(k/2 + 1) (drop e^-t in the integral)."""
    return 2.0 * math.exp((math.log(prob) + math.lgamma(dof / 2 + 1)) / (dof / 2))


def _next_block(image: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal block spanning ``image`` minus its part in ``basis`` (projected twice: float32 loses
    orthogonality once; QR'd twice, so a nearly dependent block still comes out orthogonal to the basis)."""
    x = image
    for _ in range(2):
        x = torch.linalg.qr(x - basis @ (basis.mT @ x)).Q
    return x


class _RayleighRitz:
    """Ritz values θ (descending) and vectors (coefficients in the basis) of M = ΔW·ΔWᵀ on an orthonormal basis V,
    and the Gram matrix of the Ritz residuals M·w − θ·w, from the images P = M·V (float64, no pass over ΔW).

    The basis grows by blocks, so VᵀP, PᵀP and VᵀV are kept and only the new block's rows and columns are made
    (n·k·b per step instead of n·k²). With T = sym(VᵀP), the residuals' Gram matrix (P − VT)ᵀ(P − VT) is
    PᵀP − PᵀV·T − T·VᵀP + T·VᵀV·T: every term k×k, VᵀV kept as it is (a float32 basis is orthonormal only to
    rounding). ``reset`` before a basis that does not extend the last one.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.vtp = self.ptp = self.vtv = torch.zeros(0, 0, dtype=torch.float64)

    def __call__(self, basis: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v, p, old = basis.double(), image.double(), self.vtp.shape[0]
        self.vtp, self.ptp, self.vtv = (self._grown(cache, a, b, old) for cache, a, b in
                                        ((self.vtp, v, p), (self.ptp, p, p), (self.vtv, v, v)))
        t = (self.vtp + self.vtp.mT) / 2
        theta, vecs = _eigh_descending(t)
        gram = self.ptp - self.vtp.mT @ t - t @ self.vtp + t @ self.vtv @ t
        gram = vecs.mT @ ((gram + gram.mT) / 2) @ vecs
        return theta, vecs, gram

    @staticmethod
    def _grown(cache: torch.Tensor, a: torch.Tensor, b: torch.Tensor, old: int) -> torch.Tensor:
        """aᵀb, from its top-left ``old``×``old`` block ``cache`` and the new columns of a and b."""
        out = torch.empty(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
        out[:old, :old] = cache
        out[:, old:] = a.mT @ b[:, old:]
        out[old:, :old] = a[:, old:].mT @ b[:, :old]
        return out


class _ResidualProbes:
    """Gaussian probes of ‖R‖₂², R = (I − VVᵀ)·ΔW, whose power steps carry on as the basis V grows.

    ``start`` is ΔW·Ω for Gaussian probes Ω [n, p] drawn independently of every basis. After n power steps, some on
    earlier (narrower) bases, the iterate is X·Ω: with one basis X = (RRᵀ)ⁿ·R; when the basis grows from V to
    V' ⊇ V, the iterate is first projected on the new complement (a bound with no pass), then each step is
    R'R'ᵀ·X, R' = (I − V'V'ᵀ)·ΔW. For u the top left singular vector of R' (so (I − VVᵀ)·u = u),
    ‖uᵀX‖ ≥ σ₁(R')^(2n+1), by induction over the bases: the moments uᵀAᵏu of a PSD A are log-convex in k, and
    uᵀ·RRᵀ·u ≥ uᵀ·R'R'ᵀ·u = σ₁(R')² for every earlier R. And ‖XΩ‖₂ ≥ σ₁(X)·‖vᵀΩ‖ with v X's top right singular
    vector; ‖vᵀΩ‖² is χ² with p degrees of freedom, below ``_chi2_lower(p, prob)`` with probability at most
    ``prob``. So each bound is an upper bound on σ₁(R')², given with a plain estimate (dividing by the χ²'s mean p
    instead) for deciding whether more steps can pay.

    Carrying on spends no pass on restarting; the price is that X depends on how many steps the earlier bases
    took (0 … ``_PROBE_POWER`` each, chosen by the probes' own estimates). So a chain over s bases uses
    ``prob`` = ``_FAIL`` / (``_PROBE_POWER`` + 1)^(s−1): summed over every chain the run could take, each (basis,
    bound) position fails with probability at most ``_FAIL``, as when every basis starts afresh.
    """

    def __init__(self, start: torch.Tensor):
        self.start, self.x, self.log_scale, self.steps, self.bases = start, None, 0.0, 0, 0

    def bounds(self, work: torch.Tensor, basis: torch.Tensor) -> Iterator[tuple[float, float]]:
        """(bound, estimate) of ‖R‖₂² on ``basis``'s complement: first from the earlier steps' iterate projected on
        it (no pass; when there are earlier steps), then after each of up to ``_PROBE_POWER`` more power steps."""
        def project(x: torch.Tensor) -> torch.Tensor:
            return x - basis @ (basis.mT @ x)

        self.bases += 1
        probes = self.start.shape[1]
        quantile = _chi2_lower(probes, _FAIL / (_PROBE_POWER + 1) ** (self.bases - 1))

        def bound_and_estimate() -> tuple[float, float] | None:
            x64 = self.x.double()
            top = float(torch.linalg.eigvalsh(x64.mT @ x64)[-1])  # ‖XΩ‖₂², up to the scale kept in log_scale
            if top <= 0.0:  # XΩ = 0, so X = 0 (Ω has full rank almost surely), and so is ‖R‖ from now on
                return None
            power = 2 * self.steps + 1
            bound, estimate = (math.exp((math.log(top / d) + 2 * self.log_scale) / power) for d in (quantile, probes))
            return bound * (1 + 1e-4), estimate  # (1 + 1e-4): float32 rounding of the products

        if self.x is None:
            self.x = project(self.start)
        elif self.steps:  # the earlier steps' iterate, projected on the new complement: a bound with no pass
            self.x = project(self.x)
            done = bound_and_estimate()
            yield done or (0.0, 0.0)
            if done is None:
                return
        for _ in range(_PROBE_POWER):
            norm = float(self.x.norm())
            if norm == 0.0:
                yield 0.0, 0.0
                return
            self.x, self.log_scale = self.x / norm, self.log_scale + math.log(norm)  # keep float32 in range
            self.x = project(work @ (work.mT @ self.x))
            self.steps += 1
            done = bound_and_estimate()
            yield done or (0.0, 0.0)
            if done is None:
                return


def _optimum_lower_bound(theta: torch.Tensor, gram: torch.Tensor, rank: int, total: float, beyond: float,
                         crosses: dict[int, float] | None = None) -> float:
    """A lower bound on the Eckart–Young error² ‖ΔW‖² − Σ_{i≤r} σᵢ² (the σᵢ unknown) from a Rayleigh–Ritz step.

    With M = ΔW·ΔWᵀ, W the top-k Ritz vectors (values θ), E = Wᵀ·M·(I − WWᵀ) and δ ≥ λ_max of M compressed to
    W's complement, for every i ≤ r: λᵢ(M) ≥ θ_r (interlacing), and eliminating the complement block (a Schur
    complement) gives λᵢ(M) ≤ λᵢ(diag θ + EEᵀ/η) with η = θ_r − δ > 0. So Σ_{i≤r} σᵢ² is at most the top-r
    eigenvalue sum of that k×k matrix; EEᵀ is the Gram matrix of W's Ritz residuals. The complement is the other
    Ritz vectors (values ≤ θ_{k+1}, their residuals C') plus the basis' complement (‖R‖₂² ≤ ``beyond``), so δ is the
    top eigenvalue of [[θ_{k+1}, ‖C'‖], [‖C'‖, beyond]] (or θ_{k+1} + beyond, whichever is smaller). Several k in
    [r, width] are tried and the best bound kept; −inf when none leaves a gap. ``crosses`` keeps the ‖C'‖² of
    each k across calls on the same Rayleigh–Ritz step (they do not depend on ``beyond``).
    """
    width, floor = theta.numel(), float(theta[rank - 1])
    crosses = {} if crosses is None else crosses
    best = -math.inf
    for k in sorted({rank, (3 * rank + width) // 4, (rank + width) // 2, width - (width - rank) // 4, width}):
        top = float(theta[k]) if k < width else 0.0
        if floor <= max(top, beyond):  # δ is at least both: no gap, whatever ‖C'‖
            continue
        if k < width:
            if k not in crosses:
                crosses[k] = max(float(torch.linalg.eigvalsh(gram[k:, k:])[-1]), 0.0)
            delta = min(top + beyond, (top + beyond) / 2 + math.sqrt(((top - beyond) / 2) ** 2 + crosses[k]))
        else:
            delta = beyond
        eta = floor - delta
        if eta <= 0:
            continue
        bound = torch.diag(theta[:k]) + gram[:k, :k] / eta
        best = max(best, total - float(torch.linalg.eigvalsh(bound)[-rank:].sum()))
    return best


def _factors_of(basis: torch.Tensor, inner: torch.Tensor, vecs: torch.Tensor, rank: int, total: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """U, S, Vh of the projection of ΔW onto its top-r Ritz vectors W, and the error² ‖ΔW‖² − ‖WᵀΔW‖² (W
    orthonormalised in float64), with no pass over the weight: ``inner`` = ΔWᵀ·V, kept from the Lanczos products.
    W = V·c·T⁻¹ (c the top-r Ritz coefficients, QR's triangle T), so WᵀΔW = T⁻ᵀ·(ΔWᵀ·V·c)ᵀ."""
    w, tri = torch.linalg.qr(basis.double() @ vecs[:, :rank])
    b = torch.linalg.solve_triangular(tri.mT, (inner.double() @ vecs[:, :rank]).mT, upper=False)
    err2 = max(total - float(b.square().sum()), 0.0)
    s2, ub = _eigh_descending(b @ b.mT)  # the r×r SVD of b through its Gram matrix
    s = s2.sqrt()
    vh = (ub.mT @ b) / torch.where(s > 0, s, 1.0)[:, None]
    return (w @ ub).float(), s.float(), vh.float(), err2


def _randomized(mat: torch.Tensor, rank: int, total: float, max_ratio: float, block: int | None, max_steps: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float] | None:
    """Top-``rank`` factors (U, S, Vh, error², lower bound of the optimum²) whose error is certified within
    ``max_ratio`` of the Eckart–Young optimum, or None when the Krylov space reaches half the smaller side first.

    Block Lanczos on M = ΔW·ΔWᵀ (the smaller side), fully re-orthogonalised: the start block is ΔW·Ω, each step one
    product ΔW·(ΔWᵀ·V) of ``block`` (default max(rank, 16)) columns, and after each step a Rayleigh–Ritz step gives the
    Ritz values, hence the exact error of the rank-r truncation, and the Ritz residuals that the bound needs, with no
    extra pass. The residual-norm probes run only once the bound would certify with a zero residual norm; a probe
    bound stays valid as the space grows, and the probes' power steps carry on from one width to the next. The
    draws are seeded: a module gives the same factors on every run.
    """
    flip = mat.shape[0] > mat.shape[1]  # work on the smaller side's column space: smaller bases, same passes
    work = mat.mT if flip else mat
    side = work.shape[0]
    block = max(rank, 16) if block is None else block
    gen = torch.Generator().manual_seed(0)
    first = work @ torch.randn(work.shape[1], block + _PROBES, generator=gen).to(work.device)
    probes = _ResidualProbes(first[:, block:])  # their first product, in the same pass; Ω's columns are independent
    blocks, images, inners = [torch.linalg.qr(first[:, :block]).Q], [], []
    precise = False  # float32 products until the error is so small that their rounding would decide
    margin = _ROUNDING * total
    beyond = math.inf  # ‖R‖₂² only shrinks as the basis grows, so an earlier bound stays valid
    crosses: dict[int, float] = {}  # the bound's ‖C'‖² per k, for the current Rayleigh–Ritz step
    rayleigh_ritz = _RayleighRitz()

    def product(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (M·V = ΔW·(ΔWᵀ·V), ΔWᵀ·V)
        if precise:
            return _image64(work, v)
        inner = work.mT @ v
        return work @ inner, inner

    def ritz(basis: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        theta, vecs, gram = rayleigh_ritz(basis, image)
        crosses.clear()  # a new Rayleigh–Ritz step
        return theta, vecs, gram, max(total - float(theta[:rank].sum()), 0.0)  # the truncation's error²

    def certified(theta: torch.Tensor, gram: torch.Tensor, err2: float, rho: float) -> float | None:
        bound = _optimum_lower_bound(theta, gram, rank, total, rho, crosses) - margin
        return bound if bound > 0 and err2 + margin <= max_ratio ** 2 * bound else None

    def add_product(done: tuple[torch.Tensor, torch.Tensor]) -> None:
        images.append(done[0])
        inners.append(done[1])

    for _ in range(max_steps):
        add_product(product(blocks[-1]))
        basis, image = torch.cat(blocks, dim=1), torch.cat(images, dim=1)
        if basis.shape[1] < rank:  # a block narrower than the rank: nothing to judge yet
            blocks.append(_next_block(images[-1], basis))
            continue
        theta, vecs, gram, err2 = ritz(basis, image)
        if not precise and err2 < _FLOAT64_BELOW * total:  # float64 from here on: basis, products, ‖ΔW‖²
            precise = True
            total = _exact_sq_norm(work)
            margin = _ROUNDING64 * total
            basis = torch.linalg.qr(basis.double()).Q
            blocks, images, inners = [basis], [], []
            rayleigh_ritz.reset()
            add_product(product(basis))
            theta, vecs, gram, err2 = ritz(basis, images[0])
        bound = err2 if err2 <= _EXACT_SQ * total else certified(theta, gram, err2, beyond)
        if bound is None and certified(theta, gram, err2, 0.0) is not None:  # worth probing the residual
            for upper, estimate in probes.bounds(work, basis.to(work.dtype)):
                beyond = min(beyond, upper)
                bound = certified(theta, gram, err2, beyond)
                if bound is not None or certified(theta, gram, err2, estimate) is None:
                    break  # certified, or even the estimate would not certify: grow the space instead
        if bound is not None:
            u, s, vh, err2 = _factors_of(basis, torch.cat(inners, dim=1), vecs, rank, total)
            if err2 <= _EXACT_SQ * total or err2 + margin <= max_ratio ** 2 * bound:
                if flip:  # work = matᵀ = U·S·Vh, so mat = Vhᵀ·S·Uᵀ
                    u, vh = vh.mT, u.mT
                return u, s, vh, err2, min(bound, err2)
        if basis.shape[1] + block > side // 2:  # as wide as that, the full SVD costs about the same
            break
        blocks.append(_next_block(images[-1], basis))
    return None


def factorize(delta: torch.Tensor, rank: int | None, *, method: str = "full", device: str | torch.device = "cpu",
              clamp_quantile: float | None = None, block: int | None = None, max_steps: int = 16,
              max_error_ratio: float = 1.01, randomized_min_dim: int = 400) -> tuple[Factors, ModuleResult]:
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
        sketched = _randomized(mat, r, total, max_error_ratio, block, max_steps)
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
    """‖x‖², float32 within 1024-element rows and float64 across them: ~1e-9 relative on big weights (a float32
    reduction over ~30M entries was off by 0.3%), 25× faster than upcasting every element."""
    flat = x.reshape(-1)
    if flat.numel() < 1 << 20:  # few rows: their float32 rounding would not average out; upcasting is cheap here
        return _exact_sq_norm(flat)
    head = flat.numel() - flat.numel() % 1024
    rows = torch.linalg.vector_norm(flat[:head].view(-1, 1024), dim=1).double().square().sum()
    return float(rows) + _exact_sq_norm(flat[head:])


def _exact_sq_norm(x: torch.Tensor) -> float:
    """‖x‖² with every element upcast to float64 (exact to float64 rounding; slow on big weights)."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """‖delta − approx‖ / ‖delta‖ (float64 accumulation)."""
    norm = math.sqrt(sq_norm(delta))
    if norm == 0.0:
        return 0.0 if sq_norm(approx) == 0.0 else float("inf")
    return math.sqrt(sq_norm(delta - approx)) / norm
