"""Blocks no wider than the number of gradients, handled in parameter space.

When a block's width B is at most m, every vector of the block lies (nearly) in the span of
the gradients and the Woodbury form λ⁻¹(x − Gᵀc) cancels catastrophically for small λ. Then
the B×B matrix F_b = λI + s·G_bᵀG_b is cheaper to form than the m×m Gram matrix anyway, and
its Cholesky factor gives backward-stable products and accurate entries.
"""

from __future__ import annotations

from . import _backend, _passes


class DenseGroup:
    """``nb`` equal blocks of width B (≤ m), as one batch. Gg has shape (nb, m, B)."""

    def __init__(self, xp, Gg, damp: float, scale: float, accumulate: str):
        self.xp, self.damp, self.scale = xp, damp, scale
        nb, m, B = Gg.shape
        eye = xp.eye(B, dtype=xp.float64, device=_backend.device(Gg))
        self.F = damp * eye + scale * _passes.column_gram(xp, Gg, accumulate)
        self.C = _backend.cholesky(xp, self.F)
        self._inverse = None
        self.block = B

    def apply(self, X):
        """F⁻¹X for X (nb, B, k) float64: O(B²k) per block."""
        return _backend.cho_solve(self.xp, self.C, X)

    def apply_fisher(self, X):
        return self.F @ X

    @property
    def inverse(self):
        """Explicit F_b⁻¹ (nb, B, B) float64, computed on first use (O(B³) per block)."""
        if self._inverse is None:
            xp = self.xp
            nb, B = self.F.shape[0], self.block
            eye = xp.broadcast_to(xp.eye(B, dtype=xp.float64, device=_backend.device(self.F)), (nb, B, B))
            self._inverse = _backend.cho_solve(xp, self.C, xp.asarray(eye, copy=True))
        return self._inverse

    def diag(self):
        return self.xp.reshape(self.xp.linalg.diagonal(self.inverse), (-1,))

    def pairs(self, r, c):
        """F⁻¹[r_t, c_t] for local offsets r, c in the same block: O(1) each."""
        xp, B = self.xp, self.block
        flat = xp.reshape(self.inverse, (-1,))
        return xp.take(flat, (r // B) * (B * B) + (r % B) * B + (c % B))

    def cross(self, r, c):
        """Dense F⁻¹[r][:, c] for local offsets (zero across blocks)."""
        xp, B = self.xp, self.block
        rows = xp.take(xp.reshape(self.inverse, (-1, B)), r, axis=0)  # (len r, B)
        out = xp.take(rows, c % B, axis=1)
        same = (r // B)[:, None] == (c // B)[None, :]
        return xp.where(same, out, 0.0)

    def fisher_diag(self):
        return self.xp.reshape(self.xp.linalg.diagonal(self.F), (-1,))

    def logdet(self) -> float:
        xp = self.xp
        return 2.0 * float(xp.sum(xp.log(xp.linalg.diagonal(self.C))))
