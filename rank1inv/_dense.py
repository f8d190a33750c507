"""Blocks no wider than the number of gradients, handled in parameter space.

When a block's width B is at most m, every vector of the block lies (nearly) in the span of
the gradients and the Woodbury form λ⁻¹(x − Gᵀc) cancels catastrophically for small λ. Then
the B×B matrix F_b = λI + s·G_bᵀG_b is cheaper to form than the m×m Gram matrix anyway, and
its Cholesky factor gives backward-stable products and accurate entries.

In the frame G' = σG (σ = 2^-E, ``rank1inv._scaling``): F_b = s·2^(2E)·F̃ with
F̃ = μ'I + G'ᵀG' (entries of order one), so F_b⁻¹ = F̃⁻¹/s_f · 2^(−2E − s_e) with s = s_f·2^s_e.
"""

from __future__ import annotations

import math

from . import _backend, _passes, _scaling


class DenseGroup(_backend.HoldsNamespace):
    """``nb`` equal blocks of width B (≤ m), as one batch. Gg has shape (nb, m, B); ``frame``
    is E. Construction O(nb·m·B²) for F̃ plus O(nb·B³) for its factor."""

    def __init__(self, xp, Gg, damp: float, scale: float, accumulate: str, *, frame: int = 0):
        self.xp, self.damp, self.scale, self.frame = xp, damp, scale, frame
        nb, m, B = Gg.shape
        self.count, self.size = nb, B
        self.mu = _scaling.frame_damping(damp, scale, frame)
        self.scale_f, scale_e = _scaling.split(scale)
        self.inverse_exponent = -2 * frame - scale_e
        self.fisher_exponent = 2 * frame + scale_e
        eye = xp.eye(B, dtype=xp.float64, device=_backend.device(Gg))
        self.F = self.mu * eye + _passes.column_gram(xp, Gg, accumulate, _scaling.pow2(-frame))
        self.C = _backend.cholesky(xp, self.F)
        self._inverse = None
        self.block = B

    def apply(self, X):
        """F̃⁻¹X/s_f for X (nb, B, k) float64: O(B²k) per block."""
        return _backend.cho_solve(self.xp, self.C, X) / self.scale_f

    def apply_fisher(self, X):
        """s_f·F̃X."""
        return self.scale_f * (self.F @ X)

    @property
    def inverse(self):
        """Explicit F̃⁻¹/s_f (nb, B, B) float64, computed on first use (O(B³) per block)."""
        if self._inverse is None:
            xp = self.xp
            nb, B = self.F.shape[0], self.block
            eye = xp.broadcast_to(xp.eye(B, dtype=xp.float64, device=_backend.device(self.F)), (nb, B, B))
            self._inverse = _backend.cho_solve(xp, self.C, xp.asarray(eye, copy=True)) / self.scale_f
        return self._inverse

    def diag(self):
        return self.xp.reshape(self.xp.linalg.diagonal(self.inverse), (-1,))

    def pairs(self, r, c):
        """F⁻¹[r_t, c_t] in the frame for local offsets r, c in the same block: O(1) each."""
        xp, B = self.xp, self.block
        flat = xp.reshape(self.inverse, (-1,))
        return xp.take(flat, (r // B) * (B * B) + (r % B) * B + (c % B))

    def cross(self, r, c):
        """Dense F⁻¹[r][:, c] in the frame for local offsets (zero across blocks)."""
        xp, B = self.xp, self.block
        rows = xp.take(xp.reshape(self.inverse, (-1, B)), r, axis=0)  # (len r, B)
        out = xp.take(rows, c % B, axis=1)
        same = (r // B)[:, None] == (c // B)[None, :]
        return xp.where(same, out, 0.0)

    def fisher_diag(self):
        return self.xp.reshape(self.scale_f * self.xp.linalg.diagonal(self.F), (-1,))

    def logdet(self) -> float:
        """Σ_b log det F_b = Σ_b [log det F̃_b + B·(log s + 2E·log 2)]."""
        xp = self.xp
        nb, B = self.F.shape[0], self.block
        shift = nb * B * (math.log(self.scale) + 2 * self.frame * math.log(2.0))
        return 2.0 * float(xp.sum(xp.log(xp.linalg.diagonal(self.C)))) + shift
