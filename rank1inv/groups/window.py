"""The age-ordered Cholesky factor of a sliding window's m×m system, updated in O(m²).

A window of n gradients (oldest first) has, in its frames (``rank1inv._scaling``: one power of
two σ_i per slot, fixed by the slot's own gradient), the SPD system K' = G'G'ᵀ + M' (G' = DG,
M' = diag(σ_i²λ/s)), kept as an upper factor R with RᵀR = K' in *age order*. R lives in a
capacity×capacity array whose leading n×n block is the factor and whose remainder is the
identity (so solves with the whole array need no copies). Then (docs/design.md §6):

- appending the newest gradient adds one row and column: one triangular solve, O(m²);
- evicting the oldest (or removing any) gradient deletes a row and column of K', which changes
  the trailing block of R by a rank-one *update* (``drop``), O(m²) — no downdate anywhere;
- replacing a gradient in the middle recomputes the factor from its position k,
  O(k² + k(n−k)² + (n−k)³) (``refresh_from``).

Queries are answered from R (``WindowFactor``, a ``_protocols.Factor``): two triangular solves,
O(m²) per vector. M-FAC's D and B are derived from R when asked (``mfac_coefficients``).
"""

from __future__ import annotations

import math

import numpy as np

from .. import _backend
from .._precision import EPS64
from . import coefficients as _coef

LEVEL2_COLUMNS = 8  # up to this many right-hand sides go to the compiled level-2 loops


def _level2(xp, k: int):
    """The compiled CPU module when it serves k right-hand sides (BLAS-free level-2 loops),
    else None (BLAS / cuBLAS through ``_backend``)."""
    kern = _backend.kernels(xp)
    if kern is not None and kern.solve_upper is not None and k <= LEVEL2_COLUMNS:
        return kern
    return None


def triangular(xp, R, B, n: int, *, transposed: bool):
    """R⁻ᵀB (``transposed``) or R⁻¹B for the padded factor R (cap, cap) and B (cap, k) zero
    beyond n: a new array. The compiled level-2 loops on CPU, BLAS/cuBLAS otherwise."""
    kern = _level2(xp, B.shape[1])
    if kern is not None and kern.chol_drop_usable(R, n):
        out = np.array(B, dtype=np.float64, order="C")
        kern.solve_upper(R, out, n, trans=transposed)
        return out
    return _backend.solve_triangular(xp, xp.matrix_transpose(R), B, lower=True, trans=not transposed)


# --------------------------------------------------------------------------- factor updates
def pad(xp, R, n: int) -> None:
    """Make everything outside the leading n×n block of R (cap, cap) the identity, in place."""
    cap = R.shape[0]
    if n < cap:
        R[:n, n:] = 0.0
        R[n:, :] = 0.0
        idx = xp.arange(n, cap, device=_backend.device(R))
        R[idx, idx] = 1.0


def drop(xp, src, dst, n: int, k: int, rhs=None):
    """dst ← the factor of the (n−1)-system without age position k, from src (the n-system),
    padded. dst may be src. O(cap²): the compiled kernel (CPU extension or CUDA), else
    ``drop_rows_numpy``. With ``rhs`` (n−1 values) on the CPU extension it also returns R̃⁻ᵀ·rhs
    for the new factor R̃ (what ``new_column`` needs next), computed in the same sweep (one read
    of the factor fewer, the same result bit for bit); otherwise it returns None and
    ``new_column`` solves as usual."""
    kern = _backend.kernels(xp)
    solved = None
    if kern is not None and kern.chol_drop_usable(src, n):
        if rhs is not None and kern.chol_drop_solve is not None:  # the CPU extension
            solved = kern.chol_drop_solve(src, dst, n, k, rhs)
        else:
            kern.chol_drop(src, dst, n, k)
    else:
        drop_rows_numpy(xp, src, dst, n, k)
    pad(xp, dst, n - 1)
    return solved


def drop_rows_numpy(xp, src, dst, n: int, k: int) -> None:
    """The array-API mirror of ``rank1inv/cpu/window.c`` (same operations in the same
    order, one Givens rotation per row of the trailing block): n row steps of O(n) each."""
    x = xp.asarray(src[k, :n], copy=True)
    if k > 0:
        if dst is not src:
            dst[:k, :k] = src[:k, :k]
        dst[:k, k : n - 1] = xp.asarray(src[:k, k + 1 : n], copy=True)
    for i in range(k + 1, n):
        a, b = float(src[i, i]), float(x[i])
        r = math.hypot(a, b)
        c, s = a / r, b / r
        t = xp.asarray(src[i, i + 1 : n], copy=True)
        u = x[i + 1 : n]
        dst[i - 1, : i - 1] = 0.0
        dst[i - 1, i - 1] = r
        dst[i - 1, i : n - 1] = c * t + s * u
        x[i + 1 : n] = c * u - s * t


PIVOT_FLOOR = 4.0  # a new pivot ρ² is at least PIVOT_FLOOR·n·ε·α (the rounding of α − ‖r‖²)
TINY = 2.0**-1022  # a zero gradient whose damping underflowed still gets a positive pivot


def new_column(xp, R, n: int, a, alpha: float, reference: float | None = None, solved=None):
    """The factor's new last column for appending a vector with K' entries ``a`` (n,) against
    the window (age order) and ``alpha`` on the diagonal: (r (n,), ρ) with Rᵀr = a and
    ρ² = α − ‖r‖². Writes nothing. O(cap²).

    When the new gradient is a combination of the stored ones to within rounding (duplicates
    with λ below the rounding of their Gram entries: cond(K') ≈ 1/ε), the computed ρ² is
    rounding noise and may be ≤ 0. It is then raised to PIVOT_FLOOR·n·ε·α: the factor is that of
    K' + δ·e_n e_nᵀ with δ at the rounding level of K', and along the nearly null combination q
    of gradients G'ᵀq is itself at rounding level, so F⁻¹ is unaffected to its backward error
    (the argument of ``groups.woodbury.SpectralFactor``). ``reference`` is the diagonal entry of the
    system the floor is relative to, when α is itself a Schur complement (default α).
    ValueError only for non-finite values. ``solved``: R⁻ᵀa when already known (``drop``), or None."""
    if solved is not None:
        r = solved
    else:
        b = xp.zeros((R.shape[0], 1), dtype=xp.float64, device=_backend.device(R))
        b[:n, 0] = a
        r = triangular(xp, R, b, n, transposed=True)[:n, 0]
    rho2 = float(alpha - xp.sum(r * r))
    if not math.isfinite(rho2):
        raise ValueError("the damped Gram matrix is not finite with this gradient (its inner products overflow?)")
    size = max(alpha, reference if reference is not None else 0.0)
    return r, math.sqrt(max(rho2, PIVOT_FLOOR * max(n, 1) * EPS64 * size, TINY))


def write_column(R, n: int, r, rho: float) -> None:
    """Append a column from ``new_column`` to the factor of the n-system (now n+1), in place."""
    R[:n, n] = r
    R[n, n] = rho


def factorize(xp, K_age, cap: int):
    """The padded factor (cap, cap) of an n×n SPD system in age order. O(n³): LAPACK's Cholesky,
    or, where it fails (cond(K') beyond 1/ε), n appends with the pivot floor of ``new_column``.
    ValueError only for non-finite systems."""
    n = K_age.shape[0]
    R = xp.eye(cap, dtype=xp.float64, device=_backend.device(K_age))
    if n:
        R[:n, :n] = upper_factor(xp, K_age)
    return R


def upper_factor(xp, K, reference=None):
    """Upper R with RᵀR = K (n×n) up to the pivot floor of ``new_column`` (relative to the host
    array ``reference`` of diagonal entries, default K's own). O(n³)."""
    try:
        return xp.matrix_transpose(_backend.cholesky(xp, K))
    except ValueError:
        if not _backend.all_finite(xp, K):
            raise
    n = K.shape[0]
    R = xp.eye(n, dtype=xp.float64, device=_backend.device(K))
    for i in range(n):
        ref = None if reference is None else float(reference[i])
        r, rho = new_column(xp, R, i, K[:i, i], float(K[i, i]), ref)
        write_column(R, i, r, rho)
    return R


def refresh_from(xp, R, K_age, k: int) -> None:
    """Recompute, in place, the factor of an n-system (K_age n×n) whose row and column k changed
    (everything before k unchanged): R[:k, k] by a triangular solve, rows k: by a factor of the
    Schur complement (``upper_factor``). O(k² + k(n−k)² + (n−k)³)."""
    n = K_age.shape[0]
    if k:
        rhs = xp.zeros((R.shape[0], 1), dtype=xp.float64, device=_backend.device(R))
        rhs[:k, 0] = K_age[:k, k]
        R[:k, k] = triangular(xp, R, rhs, k, transposed=True)[:k, 0]
    top = R[:k, k:n]
    diag = _backend.to_host(xp.linalg.diagonal(K_age))[k:]
    R[k:n, k:n] = upper_factor(xp, K_age[k:, k:] - xp.matrix_transpose(top) @ top, diag)


# --------------------------------------------------------------------------- queries
class WindowFactor(_backend.HoldsNamespace):
    """The ``_protocols.Factor`` of a window (one block): K' = gram + M' over all capacity
    slots (empty slots have zero Gram rows, so K' is μ'_i there), factored through R over the n
    occupied slots in age order ``order`` (a device int array). ``log_pad`` is Σ log μ'_i over
    the empty slots (for ``logdets``)."""

    def __init__(self, xp, R, order, log_pad: float):
        self.xp, self.R, self.order, self.log_pad = xp, R, order, log_pad
        self.n = int(order.shape[0])
        self.cap = int(R.shape[0])

    def _to_age(self, P):
        """(cap, k) age-ordered right-hand side, zero-padded, from P (cap, k) in slot order."""
        xp = self.xp
        out = xp.zeros(P.shape, dtype=xp.float64, device=_backend.device(P))
        out[: self.n, :] = xp.take(P, self.order, axis=0)
        return out

    def _from_age(self, C):
        xp = self.xp
        out = xp.zeros(C.shape, dtype=xp.float64, device=_backend.device(C))
        out[self.order, :] = C[: self.n, :]
        return out

    def _apply_inverse(self, P):
        """K'⁻¹P for P (cap, k) in slot order: two triangular solves with R, O(cap²k). Empty
        slots: P is zero there and so is the result (their rows of G are zero)."""
        xp = self.xp
        y = triangular(xp, self.R, self._to_age(P), self.n, transposed=True)
        return self._from_age(triangular(xp, self.R, y, self.n, transposed=False))

    def solve(self, P, b0=0, b1=None):
        """K'⁻¹P for P (1, cap, k): two triangular solves, O(cap²k), backward stable for the
        factor. The factor itself stays within a few ε·m of K' (updates are backward stable and
        it is recomputed every ``capacity`` updates); measured η after 2000 pushes is within 2×
        of a fresh StaticInverse (docs/numerics.md), so no refinement step is needed."""
        return self._apply_inverse(P[0, ...])[None, ...]

    def whiten(self, P, b0=0, b1=None):
        """R⁻ᵀP in age coordinates for P (1, cap, k) (K' = RᵀR)."""
        return triangular(self.xp, self.R, self._to_age(P[0, ...]), self.n, transposed=True)[None, ...]

    def logdets(self):
        """log det K' over all capacity slots (2Σ log R_ii + Σ log μ'_i over the empty ones) as a
        host float64 array of one block: O(n)."""
        xp = self.xp
        d = xp.linalg.diagonal(self.R)[: self.n]
        return np.array([2.0 * float(xp.sum(xp.log(d))) + self.log_pad])

    def condition(self) -> float:
        """``_backend.pivot_condition`` of R's leading n×n block: O(n²), cached."""
        if getattr(self, "_condition", None) is None:
            self._condition = _backend.pivot_condition(self.xp, self.R[: self.n, : self.n], lower=False)
        return self._condition


def mfac_coefficients(xp, R, n: int, damp: float, inverse_scale: float, frames):
    """M-FAC's D and B (n×n, age order; M-FAC eq. 8–10) from the window's factor.

    M = GGᵀ/λ + n_s·I = D⁻¹K'D⁻¹/λ with D = diag(2^-E_i) (``frames``: an int, or the n slots'
    frames in age order), so M's lower Cholesky factor is C = D⁻¹Rᵀ/√λ, U = diag(C)·Cᵀ, i.e.
    U_ij = R_ii·R_ij·2^(E_i+E_j)/λ, and D = U − n_s·I, B = λ⁻¹·(C·diag(C)⁻¹)⁻¹
    (``rank1inv.groups.coefficients``; the blocked kernel on CuPy). O(n²) for D, O(n³) for B."""
    Ra = R[:n, :n]
    c = xp.linalg.diagonal(Ra)
    E = np.broadcast_to(np.asarray(frames, dtype=np.int64), (n,))
    k = xp.asarray(E[:, None] + E[None, :], device=_backend.device(R))
    U = _backend.ldexp(xp, c[:, None] * Ra, k) / damp
    D = U - inverse_scale * xp.eye(n, dtype=xp.float64, device=_backend.device(R))
    return D, _coef.b_from_D(xp, D, inverse_scale, damp)


def host_order(ages: np.ndarray) -> np.ndarray:
    """Occupied slots, oldest first (host int64)."""
    occ = np.flatnonzero(ages >= 0)
    return occ[np.argsort(ages[occ], kind="stable")]
