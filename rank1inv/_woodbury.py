"""Blocks wider than the number of gradients, handled in gradient space (Woodbury).

For one block with gradients G_b (m×B, B > m), damping λ and scale s:

    F_b⁻¹ = λ⁻¹ (I − G_bᵀ K⁻¹ G_b),        K = G_b G_bᵀ + (λ/s) I      (m×m, SPD)

``factor`` supplies the m×m algebra: ``solve(P) = K⁻¹P``, ``whiten(P) = L⁻¹P`` for some square
root K = L Lᵀ, and ``logdet()`` = Σ log det K_b. StaticInverse uses a Cholesky factor;
DynamicInverse uses M-FAC's D/B coefficients (``rank1inv._coef``). Products of vectors in the
span of the gradients use a ``SpectralFactor`` instead (see ``WoodburyGroup._corrected``).

Entries come from W = L⁻¹G_b: F⁻¹_ij = λ⁻¹(δ_ij − w_iᵀ w_j), O(m) each. W is computed on the
first entry query (O(m²B) per block, BLAS-3) and cached as float64, 8·m·B bytes per block, when
that is at most ``W_CACHE_BYTES``; above it, the needed columns are whitened on demand (O(m²)
per index). The diagonal is computed tile by tile without storing W and cached.
"""

from __future__ import annotations

import math

from . import _backend, _passes

# Correct a product when less than this fraction of ‖x‖² survives the subtraction (for
# push_apply: when ‖Gᵀc‖² is this small against (Σ|c_i|‖g_i‖)²). Calibrated on randomized
# windows of (near-)duplicate and low-rank gradients: above 1e-9 the one-pass float32 result
# stayed below η = 4e-9 (target 1e-7); float64 storage (target 5e-12) needs 1e-2. Generic
# vectors (m ≪ d) never trigger it; vectors in the gradients' span usually do.
CANCELLATION = {"float32": 1e-9, "float64": 1e-2}
CORRECTION_STEPS = 2
W_CACHE_BYTES = 1 << 31  # cache W = L⁻¹G (float64) for entry queries only up to 2 GiB


class CholeskyFactor:
    """K = L Lᵀ for a batch of SPD matrices K (nb, m, m), float64."""

    def __init__(self, xp, K):
        self.xp = xp
        self.L = _backend.cholesky(xp, K)
        self._L_inv = None

    def solve(self, P, b0=0, b1=None):
        return _backend.cho_solve(self.xp, self.L[b0:b1, ...], P)

    @property
    def L_inv(self):
        """L⁻¹ per block: (nb, m, m) float64, lower triangular. O(m³) per block, once."""
        if self._L_inv is None:
            self._L_inv = self.xp.tril(self.xp.linalg.inv(self.L))
        return self._L_inv

    def whiten(self, P, b0=0, b1=None):
        """L⁻¹P per block: (b1-b0, m, k) for P (b1-b0, m, k). O(m²k) per block.

        A matrix product with the cached inverse rather than a triangular solve: twice the
        flops, but GEMM runs faster than trsm, and multi-threaded OpenBLAS stalls for
        milliseconds when a trsm follows the Gram matrix's GEMMs (docs/benchmarks.md)."""
        return self.L_inv[b0:b1, ...] @ P

    def logdet(self) -> float:
        xp = self.xp
        return 2.0 * float(xp.sum(xp.log(xp.linalg.diagonal(self.L))))


class SpectralFactor:
    """K = Q(Λ + μ)Qᵀ from the eigendecomposition of the Gram matrix K₀ = GGᵀ = QΛQᵀ, with the
    numerically null directions (Λ ≤ m·ε·max Λ) dropped from solves.

    Those directions are combinations of gradients that cancel (duplicates, dependent rows):
    Gᵀq ≈ 0 for them, so K⁻¹'s 1/μ along them only feeds rounding errors into Gᵀ(K⁻¹P).
    Dropping them inverts F exactly for gradients within m·ε·‖G‖ of the stored ones (a
    backward-stable choice). Used by the corrected products; O(m³) per block, built on demand.
    """

    def __init__(self, xp, K0, mu: float):
        self.xp = xp
        lam, Q = xp.linalg.eigh(K0)
        m = K0.shape[-1]
        top = xp.max(lam, axis=-1, keepdims=True)
        keep = lam > m * 2.2e-16 * xp.where(top > 0, top, 1.0)
        self.Q = Q
        self.inv = xp.where(keep, 1.0 / (lam + mu), 0.0)  # (nb, m)

    def solve(self, P, b0=0, b1=None):
        Q = self.Q[b0:b1, ...]
        return Q @ ((self.xp.matrix_transpose(Q) @ P) * self.inv[b0:b1, :, None])


class WoodburyGroup:
    """``nb`` equal blocks of width B (> m), as one batch. Gg has shape (nb, m, B)."""

    def __init__(self, xp, Gg, damp: float, scale: float, accumulate: str, factor=None, gram=None):
        """``factor`` and ``gram`` (GGᵀ, (nb, m, m)) come together or not at all."""
        self.xp, self.Gg, self.damp, self.scale, self.accumulate = xp, Gg, damp, scale, accumulate
        nb, m, B = Gg.shape
        self.mu = damp / scale  # K = GGᵀ + μI
        if factor is None:
            gram = _passes.gram(xp, Gg, accumulate)
            factor = CholeskyFactor(xp, gram + self.mu * xp.eye(m, dtype=xp.float64, device=_backend.device(Gg)))
        self.factor = factor
        self._K0 = gram  # GGᵀ per block (nb·m² floats), for the spectral factor of corrected products
        self._spectral = None
        self.sq_norms = xp.linalg.diagonal(gram)  # (nb, m): ‖g_i‖²
        self._W = None
        self._diag = None

    # -- products ---------------------------------------------------------------------
    def apply(self, X):
        """F⁻¹X for X (nb, B, k) float64: two passes over G plus O(m²k) per block.

        When x lies (nearly) in the span of the gradients, λ⁻¹(x − Gᵀc) cancels and its rounding
        errors along the gradients are amplified by F. Then four more passes correct it
        (``_corrected``).
        """
        xp = self.xp
        P = _passes.project(xp, self.Gg, X, self.accumulate)
        C = self.factor.solve(P)
        # ‖x − Gᵀc‖² = ‖x‖² − cᵀp − μ‖c‖² (K c = p, K = GGᵀ + μI), O(mk): how much of x survives
        xx = xp.sum(X * X, axis=1)
        rest = xx - xp.sum(C * P, axis=1) - self.mu * xp.sum(C * C, axis=1)
        if not self._cancelled(rest, xx):
            return _passes.combine(xp, self.Gg, X, C, 1.0 / self.damp, -1.0 / self.damp, self.accumulate)
        return self._corrected(X, P)

    @property
    def spectral(self) -> SpectralFactor:
        if self._spectral is None:
            self._spectral = SpectralFactor(self.xp, self._K0, self.mu)
        return self._spectral

    def _corrected(self, X, P):
        """F⁻¹x for P = Gx without the cancellation of λ⁻¹(x − Gᵀc).

        c solves K c = Gx, equivalently G r = μc with r = x − Gᵀc. With the spectral factor (no
        amplified rounding along cancelling combinations of gradients), c is refined
        ``CORRECTION_STEPS − 1`` times by δc = K⁻¹(G r − μc), the residual taken through G itself
        (not through the rounded Gram matrix). Then

            F⁻¹x = λ⁻¹ r + Gᵀ K⁻¹ λ⁻¹(μc − G r),

        an identity whose second term is zero in exact arithmetic and, in floating point,
        removes the rounding error of r along the gradients (−λ⁻¹GᵀK⁻¹G·err(r)).
        2·CORRECTION_STEPS + 1 passes over G.
        """
        xp = self.xp
        solve = self.spectral.solve
        C = solve(P)
        for step in range(CORRECTION_STEPS):
            R = _passes.combine(xp, self.Gg, X, C, 1.0, -1.0, self.accumulate)
            E = _passes.project(xp, self.Gg, R, self.accumulate) - self.mu * C
            if step + 1 < CORRECTION_STEPS:
                C = C + solve(E)
        return _passes.combine(xp, self.Gg, R, solve(-E / self.damp), 1.0 / self.damp, 1.0, self.accumulate)

    def _cancelled(self, remainder, total) -> bool:
        if self.accumulate == "native":
            return False
        ratio = CANCELLATION[_backend.dtype_name(self.Gg.dtype)]
        return bool(self.xp.any(remainder < ratio * total))

    def apply_fisher(self, X):
        """F X = λX + s·Gᵀ(GX)."""
        P = _passes.project(self.xp, self.Gg, X, self.accumulate)
        return _passes.combine(self.xp, self.Gg, X, P, self.damp, self.scale, self.accumulate)

    def apply_to_gradients(self, E, X, P):
        """F⁻¹x for x = GᵀE given as X (nb, B, k) float64 with P = G x (nb, m, k): the
        push_apply case, x a stored gradient (E = e_slot) and P its Gram row.

        Uses F⁻¹Gᵀ = (1/s)·GᵀK⁻¹, one pass, no cancellation of λ⁻¹(x − Gᵀc) (DESIGN §3). If the
        coefficients K⁻¹E cancel among (nearly) dependent gradients, falls back to the corrected
        form of ``apply`` (five passes).
        """
        xp = self.xp
        C = self.factor.solve(E)
        # ‖GᵀC‖² = Cᵀ(K − μI)C against (Σ_i |c_i| ‖g_i‖)²: the size of the terms summed
        kept = xp.sum(C * E, axis=1) - self.mu * xp.sum(C * C, axis=1)
        terms = xp.sum(xp.abs(C) * xp.sqrt(self.sq_norms)[:, :, None], axis=1) ** 2
        if not self._cancelled(kept, terms):
            return _passes.combine(xp, self.Gg, None, C, 0.0, 1.0 / self.scale, self.accumulate)
        return self._corrected(X, P)

    # -- entries ----------------------------------------------------------------------
    @property
    def W(self):
        """L⁻¹G per block: (nb, m, B) float64, laid out like G (column j = w_j)."""
        if self._W is None:
            self._W = _passes.map_tiles(self.xp, self.Gg, lambda b0, b1, t: self.factor.whiten(t, b0, b1))
        return self._W

    def diag(self):
        """diag F⁻¹ over the group: (nb·B,) float64. O(dm²) once, then cached."""
        if self._diag is None:
            xp = self.xp
            if self._W is not None:
                sq = _backend.column_sumsq(xp, self._W)
            else:
                sq = _passes.map_tiles(
                    xp, self.Gg, lambda b0, b1, t: _backend.column_sumsq(xp, self.factor.whiten(t, b0, b1))
                )
            self._diag = xp.reshape((1.0 - sq) / self.damp, (-1,))
        return self._diag

    def _rows(self, r):
        """w_r for local offsets r: (len r, m). From the cached W when it fits in
        ``W_CACHE_BYTES``, else whitened on demand from the gathered columns (O(m²) each)."""
        nb, m, B = self.Gg.shape
        if self._W is not None or 8 * nb * m * B <= W_CACHE_BYTES:
            return self.W[r // B, :, r % B]
        xp = self.xp
        blocks = r // B
        cols = xp.astype(self.Gg[blocks, :, r % B], xp.float64)  # (n, m)
        out = xp.empty(cols.shape, dtype=xp.float64, device=_backend.device(cols))
        for b in _backend.to_host(xp.unique_values(blocks)).tolist():
            sel = xp.nonzero(blocks == b)[0]
            part = xp.matrix_transpose(xp.take(cols, sel, axis=0))[None, ...]  # (1, m, k)
            out[sel, :] = xp.matrix_transpose(self.factor.whiten(part, b, b + 1)[0, ...])
        return out

    def pairs(self, r, c):
        """F⁻¹[r_t, c_t] for local offsets r, c in the same block: (n,) float64, O(m) each."""
        xp = self.xp
        out = xp.astype(r == c, xp.float64) - xp.sum(self._rows(r) * self._rows(c), axis=1)
        return out / self.damp

    def cross(self, r, c):
        """Dense F⁻¹[r][:, c] for local offsets (zero across blocks): (len r, len c) float64."""
        xp = self.xp
        B = self.Gg.shape[2]
        out = xp.astype(r[:, None] == c[None, :], xp.float64) - self._rows(r) @ xp.matrix_transpose(self._rows(c))
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
