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

import numpy as np

from .. import _backend, _passes, _scaling


class DenseGroup(_backend.HoldsNamespace):
    """``nb`` equal blocks of width B (≤ m), as one batch. Gg has shape (nb, m, B); ``frame``
    is E. Construction O(nb·m·B²) for F̃ plus O(nb·B³) for its factor. A given ``gram`` may be
    held in another frame: its entries times 2^``gram_shift`` are G'ᵀG' (an accumulated Gram
    matrix is shared, never rescaled in place)."""

    def __init__(self, xp, Gg, damp, scale: float, accumulate: str, *, frame: int = 0, gram=None, row_max=None,
                 exact_products: bool = True, gram_shift: int = 0):  # fmt: skip
        self.xp, self.damp, self.scale, self.frame = xp, damp, scale, frame
        self.row_max, self.exact_products = row_max, exact_products  # for ``redamp_group``
        nb, m, B = Gg.shape
        self.count, self.size, self.width, self.block = nb, B, m, B
        if isinstance(damp, float):
            self.mu = _scaling.frame_damping(damp, scale, frame)
        else:  # per-coordinate δ (nb, B): μ'_j = σ²δ_j/s, by exponents (no intermediate overflow)
            e = _backend.frexp_exponent(xp, damp)
            f = _backend.ldexp(xp, damp, -e) / _scaling.split(scale)[0]
            self.mu = _backend.ldexp(xp, f, e - _scaling.split(scale)[1] - 2 * frame)
        self.scale_f, self.scale_e = _scaling.split(scale)
        self.inverse_exponent = -2 * frame - self.scale_e
        self.fisher_exponent = 2 * frame + self.scale_e
        if gram is None:
            gram, gram_shift = _passes.column_gram(xp, Gg, accumulate, _scaling.pow2(-frame)), 0
        self.gram, self.gram_shift = gram, int(gram_shift)  # G'ᵀG' = gram·2^gram_shift, (nb, B, B) float64
        self.C = _backend.cholesky(xp, self._F())
        self._inverse = None
        self._gram_spectrum = None

    def _F(self):
        """F̃ = μ'I + G'ᵀG' (nb, B, B) float64, a new array."""
        eye = self.xp.eye(self.block, dtype=self.xp.float64, device=_backend.device(self.gram))
        return self._mu_column() * eye + self._gram()

    def _gram(self):
        """G'ᵀG' (the stored array itself when it is in the frame, else a rescaled copy)."""
        return self.gram if self.gram_shift == 0 else _backend.ldexp(self.xp, self.gram, self.gram_shift)

    def _mu_column(self):
        """μ' as a scalar or (nb, B, 1), for broadcasting against (nb, B, ·)."""
        return self.mu if isinstance(self.mu, float) else self.mu[:, :, None]

    def redamped(self, damp: float, frame: int, blocks=(0, None), row_max=None):
        """Blocks b0:b1 with damping λ' in frame ``frame`` (``row_max``: theirs): O(nb·B³), G is
        not read."""
        b0, b1 = blocks
        gram = self.gram[b0:b1, ...]  # shared: the new frame is a new shift
        shape = _Shape(gram.shape[0], self.width, self.size)
        return DenseGroup(self.xp, shape, damp, self.scale, "float64", frame=frame, gram=gram, row_max=row_max,
                          exact_products=self.exact_products,
                          gram_shift=self.gram_shift + 2 * (self.frame - frame))  # fmt: skip

    def apply(self, X):
        """F̃⁻¹X/s_f for X (nb, B, k) float64: O(B²k) per block."""
        return _backend.cho_solve(self.xp, self.C, X) / self.scale_f

    def apply_fisher(self, X):
        """s_f·F̃X."""
        GX = self.gram @ X  # the shift applied to the (B, k) result, not to the B×B matrix
        GX = GX if self.gram_shift == 0 else _backend.ldexp(self.xp, GX, self.gram_shift, out=GX)
        return self.scale_f * (self._mu_column() * X + GX)

    noise_width = 0  # standard normals per block beyond one per coordinate (``sample``)

    def sample(self, Z1, Z2=None):
        """Draws with covariance F_b⁻¹: C⁻ᵀZ per block for F̃ = CCᵀ, scaled by (s·2^(2E))^(-1/2),
        as (values, exponent); Z1 (nb, B, k) float64 (Z2 is empty: ``noise_width`` = 0). O(B²k)
        per block."""
        f, e = _scaling.power(self.scale_f, self.scale_e, -0.5)
        Y = _backend.solve_triangular(self.xp, self.C, Z1, lower=True, trans=True)
        return Y * f, e - self.frame

    def gram_spectrum(self):
        """s·eig(G_bᵀG_b) per block: a host float64 array (nb, B), descending, clamped at 0;
        O(B³) per block, cached."""
        if self._gram_spectrum is None:
            lam = _backend.to_host(self.xp.linalg.eigvalsh(self.gram))[:, ::-1]
            self._gram_spectrum = np.maximum(lam, 0.0) * math.ldexp(
                self.scale_f, self.scale_e + 2 * self.frame + self.gram_shift
            )
        return self._gram_spectrum

    def apply_power(self, X, p: float):
        """F_b^p X per block as (values, exponent), from the eigendecomposition of F̃
        (computed per call, O(B³) per block)."""
        lam, Q = _backend.eigh(self.xp, self._F())
        f, e = _scaling.power(self.scale_f, self.scale_e + 2 * self.frame, p)
        Y = Q @ ((self.xp.matrix_transpose(Q) @ X) * (lam**p)[:, :, None])
        return Y * f, e

    @property
    def inverse(self):
        """Explicit F̃⁻¹/s_f (nb, B, B) float64, computed on first use (O(B³) per block)."""
        if self._inverse is None:
            xp = self.xp
            nb, B = self.count, self.block
            eye = xp.broadcast_to(xp.eye(B, dtype=xp.float64, device=_backend.device(self.C)), (nb, B, B))
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
        diagonal = _backend.ldexp(self.xp, self.xp.linalg.diagonal(self.gram), self.gram_shift)
        return self.xp.reshape(self.scale_f * (self.mu + diagonal), (-1,))

    def logdets(self):
        """log det F_b = log det F̃_b + B·(log s + 2E·log 2) per block: host float64 (nb,)."""
        xp = self.xp
        shift = self.block * (math.log(self.scale) + 2 * self.frame * math.log(2.0))
        return _backend.to_host(2.0 * xp.sum(xp.log(xp.linalg.diagonal(self.C)), axis=-1)) + shift


class _Shape:
    """Stands in for G where a group is rebuilt from its Gram matrix (only ``shape`` is read)."""

    def __init__(self, *shape):
        self.shape = shape
