"""Per-coordinate damping: F = D + s·GᵀG with D = diag(δ) (a per-parameter prior precision).

In rescaled variables (docs/design.md §10): with δ_ref = min δ over a run of blocks and
ĉ_j = √(δ_ref/δ_j) ∈ (0, 1], Ĉ = diag(ĉ),

    F = Ĉ⁻¹·F̂·Ĉ⁻¹,   F̂ = δ_ref·I + s·ĤᵀĤ,   Ĥ = G·Ĉ,

so F⁻¹ = Ĉ·F̂⁻¹·Ĉ: a scalar-damped Woodbury group over Ĥ (``WoodburyGroup`` with column
weights ĉ: Ĥ is never formed, its passes scale G's tiles) between two diagonal scalings. ĉ is
rounded once (a relative backward error of ε in each δ_j). Blocks no wider than m take δ
directly (``DenseGroup`` with a vector μ'). Prior precisions spanning more than
``_checks.PRIOR_RANGE`` are refused, so that ĉ², 1/ĉ and 1/ĉ² stay normal numbers.
"""

from __future__ import annotations

import numpy as np

from .. import _backend, _passes, _scaling
from .woodbury import WoodburyGroup

NO_POWER = "power(p) needs one damping value per block: with per-coordinate damping D and GᵀG do not commute"


class PriorGroup(_backend.HoldsNamespace):
    """``nb`` equal blocks wider than m with per-coordinate damping δ (nb, B) float64, as one
    batch (the ``_protocols.Group`` of a Woodbury run under a vector prior)."""

    def __init__(self, xp, Gg, delta, scale: float, accumulate: str, exact_products: bool, row_max=None):
        self.xp, self.scale = xp, scale
        self.row_max, self.exact_products = row_max, exact_products
        self.count, m, self.size = Gg.shape
        delta_ref = float(xp.min(delta))
        self.c_hat = xp.sqrt(delta_ref / delta)  # (nb, B), in (2^-500, 1]
        inv = 1.0 / self.c_hat
        j = _scaling.exponent(float(xp.max(inv)))
        self.v = inv * _scaling.pow2(-j)  # 1/ĉ normalized to (2^-501, 1]
        rows = _passes.row_max_abs(xp, Gg, self.c_hat)  # max_j |Ĥ_ij| per block and row
        if not np.all(np.isfinite(rows)):
            raise ValueError("G contains non-finite values (nan or inf)")
        frame = _scaling.row_frames(rows, delta_ref, scale, exact_products)
        self.inner = WoodburyGroup(xp, Gg, delta_ref, scale, accumulate, frame=frame, weights=self.c_hat)
        self.inverse_exponent = self.inner.inverse_exponent
        self.fisher_exponent = self.inner.fisher_exponent + 2 * j
        self.log_c_hat = _backend.to_host(xp.sum(xp.log(self.c_hat), axis=1))  # (nb,)

    @property
    def noise_width(self) -> int:
        return self.inner.noise_width

    def _flat(self, a):
        return self.xp.reshape(a, (-1,))

    def apply(self, X):
        """Ĉ·F̂⁻¹·Ĉ·X per block (in the inner frame)."""
        c = self.c_hat[:, :, None]
        return self.inner.apply(X * c) * c

    def apply_fisher(self, X):
        """Ĉ⁻¹·F̂·Ĉ⁻¹·X = 2^(2J)·V·F̂·V·X per block, V = Ĉ⁻¹·2^(-J)."""
        v = self.v[:, :, None]
        return self.inner.apply_fisher(X * v) * v

    def diag(self):
        return self.inner.diag() * self._flat(self.c_hat) ** 2

    def pairs(self, r, c):
        flat = self._flat(self.c_hat)
        return self.inner.pairs(r, c) * self.xp.take(flat, r) * self.xp.take(flat, c)

    def cross(self, r, c):
        flat = self._flat(self.c_hat)
        return self.inner.cross(r, c) * self.xp.take(flat, r)[:, None] * self.xp.take(flat, c)[None, :]

    def fisher_diag(self):
        return self.inner.fisher_diag() * self._flat(self.v) ** 2

    def logdets(self):
        """log det F_b = log det F̂_b − 2·Σ_j log ĉ_j per block (host float64)."""
        return self.inner.logdets() - 2.0 * self.log_c_hat

    def sample(self, Z1, Z2):
        """Ĉ times a draw with covariance F̂⁻¹: covariance Ĉ·F̂⁻¹·Ĉ = F⁻¹."""
        values, e = self.inner.sample(Z1, Z2)
        return values * self.c_hat[:, :, None], e

    def apply_power(self, X, p: float):
        raise ValueError(NO_POWER)

    def gram_spectrum(self):
        raise ValueError("the Gram spectra describe F only for one damping value per block, not per coordinate")

    def redamped(
        self, damp, frame, blocks=(0, None), row_max=None
    ):  # pragma: no cover - with_damp rebuilds vector priors
        raise ValueError("a per-coordinate prior is re-damped by building a new operator")
