"""Blocks wider than the number of gradients, handled in gradient space (Woodbury).

For one block with gradients G_b (m×B, B > m), damping λ and scale s:

    F_b⁻¹ = λ⁻¹ (I − G_bᵀ K⁻¹ G_b),        K = G_b G_bᵀ + (λ/s) I      (m×m, SPD)

``factor`` supplies the m×m algebra: ``solve(P) = K⁻¹P`` and ``whiten(P) = L⁻¹P`` for some
square root K = L Lᵀ, plus ``logdet()`` = Σ log det K_b. StaticInverse uses a Cholesky
factor; DynamicInverse uses M-FAC's D/B coefficients (``rank1inv._coef``).

Entries come from W = L⁻¹G_b: F⁻¹_ij = λ⁻¹(δ_ij − w_iᵀ w_j), O(m) each. W is computed on first
use (O(m²B) per block, BLAS-3) and cached as float64, 8·m·B bytes per block.
"""

from __future__ import annotations

import math

from . import _backend, _passes

# Refine a product when less than this fraction of ‖x‖² survives the subtraction, i.e. when
# about ε₆₄·ρ (ρ = cancellation ratio) could exceed a hundredth of the storage dtype's target
# backward error (DESIGN §6: 1e-7 for float32 storage, 5e-12 for float64).
CANCELLATION = {"float32": 1e-12, "float64": 1e-6}
REFINE_STEPS = 2


class CholeskyFactor:
    """K = L Lᵀ for a batch of SPD matrices K (nb, m, m), float64."""

    def __init__(self, xp, K):
        self.xp = xp
        self.L = _backend.cholesky(xp, K)

    def solve(self, P, b0=0, b1=None):
        return _backend.cho_solve(self.xp, self.L[b0:b1, ...], P)

    def whiten(self, P, b0=0, b1=None):
        return _backend.solve_triangular(self.xp, self.L[b0:b1, ...], P, lower=True)

    def logdet(self) -> float:
        xp = self.xp
        return 2.0 * float(xp.sum(xp.log(xp.linalg.diagonal(self.L))))


class WoodburyGroup:
    """``nb`` equal blocks of width B (> m), as one batch. Gg has shape (nb, m, B)."""

    def __init__(self, xp, Gg, damp: float, scale: float, accumulate: str, factor=None, sq_norms=None):
        self.xp, self.Gg, self.damp, self.scale, self.accumulate = xp, Gg, damp, scale, accumulate
        nb, m, B = Gg.shape
        if factor is None:
            K0 = _passes.gram(xp, Gg, accumulate)
            sq_norms = xp.linalg.diagonal(K0)
            factor = CholeskyFactor(xp, K0 + (damp / scale) * xp.eye(m, dtype=xp.float64, device=_backend.device(Gg)))
        self.factor = factor
        self.sq_norms = sq_norms  # (nb, m): ‖g_i‖² per block
        self._W = None

    # -- products ---------------------------------------------------------------------
    def apply(self, X):
        """F⁻¹X for X (nb, B, k) float64: two passes over G plus O(m²k) per block.

        When x lies (nearly) in the span of the gradients, λ⁻¹(x − Gᵀc) cancels: the result is
        then refined (iterative refinement in float64, ``REFINE_STEPS`` × 4 more passes).
        """
        Y, risky = self._apply_once(X)
        return self._refine(X, Y) if risky else Y

    def _apply_once(self, X):
        xp = self.xp
        P = _passes.project(xp, self.Gg, X, self.accumulate)
        C = self.factor.solve(P)
        Y = _passes.combine(xp, self.Gg, X, C, 1.0 / self.damp, -1.0 / self.damp, self.accumulate)
        # ‖x − Gᵀc‖² = ‖x‖² − cᵀp − μ‖c‖² (K c = p, K = GGᵀ + μI), O(mk) per block: how much of x
        # survives the subtraction. A small remainder means digits were cancelled.
        mu = self.damp / self.scale
        xx = xp.sum(X * X, axis=1)
        rest = xx - xp.sum(C * P, axis=1) - mu * xp.sum(C * C, axis=1)
        return Y, self._cancelled(rest, xx)

    def _cancelled(self, remainder, total) -> bool:
        if self.accumulate == "native":
            return False
        ratio = CANCELLATION[_backend.dtype_name(self.Gg.dtype)]
        return bool(self.xp.any(remainder < ratio * total))

    def _refine(self, X, Y):
        for _ in range(REFINE_STEPS):
            R = X - self.apply_fisher(Y)
            Y = Y + self._apply_once(R)[0]
        return Y

    def apply_fisher(self, X):
        """F X = λX + s·Gᵀ(GX)."""
        P = _passes.project(self.xp, self.Gg, X, self.accumulate)
        return _passes.combine(self.xp, self.Gg, X, P, self.damp, self.scale, self.accumulate)

    def apply_to_gradients(self, E, X=None):
        """F⁻¹(GᵀE) = (1/s)·Gᵀ K⁻¹ E for E (nb, m, k): F⁻¹ of combinations of the stored
        gradients without the cancellation of λ⁻¹(x − Gᵀc) (DESIGN §3, push_apply). One pass.

        X, if given, is GᵀE itself (nb, B, k) float64; it is used to refine the result when the
        coefficients K⁻¹E cancel among (nearly) dependent gradients.
        """
        xp = self.xp
        C = self.factor.solve(E)
        Y = _passes.combine(xp, self.Gg, None, C, 0.0, 1.0 / self.scale, self.accumulate)
        # ‖GᵀC‖² = Cᵀ(K − μI)C against (Σ_i |c_i| ‖g_i‖)²: the size of the terms summed
        mu = self.damp / self.scale
        kept = xp.sum(C * E, axis=1) - mu * xp.sum(C * C, axis=1)
        terms = xp.sum(xp.abs(C) * xp.sqrt(self.sq_norms)[:, :, None], axis=1) ** 2
        if X is not None and self._cancelled(kept, terms):
            Y = self._refine(X, Y)
        return Y

    # -- entries ----------------------------------------------------------------------
    @property
    def W(self):
        """(nb·B, m) float64, row j = L⁻¹ g_j (column j of the whitened block)."""
        if self._W is None:
            self._W = _passes.map_tiles(self.xp, self.Gg, lambda b0, b1, t: self.factor.whiten(t, b0, b1))
        return self._W

    def diag(self):
        """diag F⁻¹ over the group: (nb·B,) float64."""
        W = self.W
        return (1.0 - self.xp.sum(W * W, axis=1)) / self.damp

    def pairs(self, r, c):
        """F⁻¹[r_t, c_t] for local offsets r, c in the same block: (n,) float64, O(m) each."""
        xp, W = self.xp, self.W
        out = -xp.sum(xp.take(W, r, axis=0) * xp.take(W, c, axis=0), axis=1)
        out = out + xp.astype(r == c, xp.float64)
        return out / self.damp

    def cross(self, r, c):
        """Dense F⁻¹[r][:, c] for local offsets (zero across blocks): (len r, len c) float64."""
        xp, W = self.xp, self.W
        B = self.Gg.shape[2]
        out = -(xp.take(W, r, axis=0) @ xp.matrix_transpose(xp.take(W, c, axis=0)))
        out = out + xp.astype(r[:, None] == c[None, :], xp.float64)
        same = (r // B)[:, None] == (c // B)[None, :]
        return xp.where(same, out / self.damp, 0.0)

    # -- Fisher side --------------------------------------------------------------------
    def fisher_diag(self):
        s = _passes.column_sumsq(self.xp, self.Gg)
        return self.xp.reshape(self.damp + self.scale * s, (-1,))

    def logdet(self) -> float:
        """Σ_b log det F_b = Σ_b [B log λ + m log(s/λ) + log det K_b] (matrix determinant lemma)."""
        nb, m, B = self.Gg.shape
        return nb * (B * math.log(self.damp) + m * math.log(self.scale / self.damp)) + self.factor.logdet()
