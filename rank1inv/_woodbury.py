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

    def __init__(self, xp, Gg, damp: float, scale: float, accumulate: str, factor=None):
        self.xp, self.Gg, self.damp, self.scale, self.accumulate = xp, Gg, damp, scale, accumulate
        nb, m, B = Gg.shape
        if factor is None:
            K = _passes.gram(xp, Gg, accumulate)
            K = K + (damp / scale) * xp.eye(m, dtype=xp.float64, device=_backend.device(Gg))
            factor = CholeskyFactor(xp, K)
        self.factor = factor
        self._W = None

    # -- products ---------------------------------------------------------------------
    def apply(self, X):
        """F⁻¹X for X (nb, B, k) float64: two passes over G plus O(m²k) per block."""
        xp = self.xp
        P = _passes.project(xp, self.Gg, X, self.accumulate)
        C = self.factor.solve(P)
        return _passes.combine(xp, self.Gg, X, C, 1.0 / self.damp, -1.0 / self.damp, self.accumulate)

    def apply_fisher(self, X):
        """F X = λX + s·Gᵀ(GX)."""
        P = _passes.project(self.xp, self.Gg, X, self.accumulate)
        return _passes.combine(self.xp, self.Gg, X, P, self.damp, self.scale, self.accumulate)

    def apply_gradient_coefficients(self, E):
        """(1/s)·Gᵀ K⁻¹ E for E (nb, m, k): F⁻¹ applied to the gradients' own combination GᵀE,
        without the cancellation of λ⁻¹(x − Gᵀc) (DESIGN §3, push_apply)."""
        C = self.factor.solve(E)
        return _passes.combine(self.xp, self.Gg, None, C, 0.0, 1.0 / self.scale, self.accumulate)

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
