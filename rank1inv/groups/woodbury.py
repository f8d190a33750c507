"""Blocks wider than the number of gradients, handled in gradient space (Woodbury).

For one block with gradients G_b (m×B, B > m), damping λ and scale s, in the frame G' = DG
(D = diag(σ_i), σ_i = 2^-E_i one power of two per gradient, ``rank1inv._scaling.row_frames``;
usually all E_i = 0):

    F_b⁻¹ = λ⁻¹ (I − G'ᵀ K'⁻¹ G'),    K' = G'G'ᵀ + M',   M' = diag(μ'_i),  μ'_i = σ_i²λ/s   (m×m, SPD)

(K' = D·K·D for K = GGᵀ + (λ/s)I, so G'ᵀK'⁻¹G' = GᵀK⁻¹G exactly). With one frame per gradient
the system stays of order one even when the gradients' magnitudes differ by more than the
float64 range of their products (docs/design.md §4). The queries of F itself (``apply_fisher``,
``fisher_diag``), spectra and powers use one common frame E = max E_i instead, where terms of
much smaller gradients may underflow: they are then below rounding of the result, normwise.

``factor`` (a ``_protocols.Factor``) supplies the m×m algebra: ``solve(P) = K'⁻¹P``,
``whiten(P) = L⁻¹P`` for some square root K' = L Lᵀ, and ``logdets()`` = log det K'_b per block.
StaticInverse uses a Cholesky factor; DynamicInverse the age-ordered factor of its window
(``rank1inv.groups.window``). Products of vectors in the span of the gradients use a
``SpectralFactor`` instead (see ``WoodburyGroup._corrected``).

Values are returned in the frame of docs/design.md §4: products and entries of F⁻¹ multiplied
by 2^λ_e (λ = λ_f·2^λ_e, 0.5 ≤ λ_f < 1), e.g. (x − G'ᵀc)/λ_f, which is bounded by 2‖x‖ since
‖λF⁻¹‖ ≤ 1; the operator scales them back by 2^(e_x − λ_e) (``inverse_exponent``).

Entries come from W = L⁻¹G'_b: F⁻¹_ij = λ⁻¹(δ_ij − w_iᵀ w_j), O(m) each. W is computed on the
first entry query (O(m²B) per block, BLAS-3) and cached as float64, 8·m·B bytes per block, when
that is at most ``W_CACHE_BYTES``; above it, the needed columns are whitened on demand (O(m²)
per index). The diagonal is computed tile by tile without storing W and cached.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np

from .. import _backend, _passes, _precision, _scaling

MAX_REFINEMENTS = 8  # refinements of c in a corrected product (1 always, more while they still matter)
REFINE_TOLERANCE = 1e-12  # δc below this fraction of c: at rounding level, no further refinement
W_CACHE_BYTES = 1 << 31  # cache W = L⁻¹G (float64) for entry queries only up to 2 GiB


class CholeskyFactor(_backend.HoldsNamespace):
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

    def logdets(self):
        """log det K per block: a host float64 array (nb,)."""
        xp = self.xp
        return _backend.to_host(2.0 * xp.sum(xp.log(xp.linalg.diagonal(self.L)), axis=-1))

    def condition(self) -> float:
        """``_backend.pivot_condition`` of the factor: O(nb·m²) once, cached."""
        if getattr(self, "_condition", None) is None:
            self._condition = _backend.pivot_condition(self.xp, self.L, lower=True)
        return self._condition


class SpectralFactor(_backend.HoldsNamespace):
    """K = Q·Θ·Qᵀ from the eigendecomposition of K = K₀ + M (K₀ = G'G'ᵀ, M = μ'I or diag(μ'_i)),
    with the numerically null directions of K₀ (qᵀK₀q ≤ m·ε·max) dropped from solves.

    Those directions are combinations of gradients that cancel (duplicates, dependent rows):
    G'ᵀq ≈ 0 for them, so K⁻¹'s 1/μ along them only feeds rounding errors into G'ᵀ(K⁻¹P).
    Dropping them inverts F exactly for gradients within m·ε·‖G‖ of the stored ones (a
    backward-stable choice). Used by the corrected products, and as the factor itself when K is
    numerically singular (duplicate gradients with μ below rounding of GGᵀ); O(m³) per block,
    built on demand. With one μ (``mu`` a float) Θ = Λ + μ for K₀ = QΛQᵀ; with one μ'_i per
    gradient (``mu`` an (nb, m) array) K itself is decomposed and the K₀ part of each direction is
    qᵀK₀q = θ − qᵀMq. ``log_mu``: log μ (or log μ'_i, host (nb, m)) computed without underflow
    (for ``logdets``).
    """

    def __init__(self, xp, K0, mu, log_mu=None):
        self.xp = xp
        m = K0.shape[-1]
        if isinstance(mu, float):
            lam, Q = _backend.eigh(xp, K0)
            theta = lam + mu
        else:
            eye = xp.eye(m, dtype=xp.float64, device=_backend.device(K0))
            theta, Q = _backend.eigh(xp, K0 + mu[:, :, None] * eye)
            lam = theta - xp.sum(mu[:, :, None] * Q * Q, axis=1)  # qᵀK₀q per direction
        top = xp.max(lam, axis=-1, keepdims=True)
        keep = lam > m * _precision.EPS64 * xp.where(top > 0, top, 1.0)
        self.Q, self.keep, self.lam, self.mu, self.theta = Q, keep, lam, mu, theta
        if log_mu is None:
            log_mu = math.log(mu) if isinstance(mu, float) else np.log(_backend.to_host(mu))
        self.log_mu = log_mu
        self.inv = xp.where(keep, 1.0 / xp.where(keep, theta, 1.0), 0.0)  # (nb, m)

    def solve(self, P, b0=0, b1=None):
        Q = self.Q[b0:b1, ...]
        return Q @ ((self.xp.matrix_transpose(Q) @ P) * self.inv[b0:b1, :, None])

    def whiten(self, P, b0=0, b1=None):
        """Θ^(-1/2)QᵀP over the kept directions (zero along the dropped ones)."""
        Q = self.Q[b0:b1, ...]
        return (self.xp.matrix_transpose(Q) @ P) * self.xp.sqrt(self.inv[b0:b1, :, None])

    def logdets(self):
        """Per block: Σ log θ over the kept directions, log(qᵀMq) for each dropped one (K₀ is
        zero there: log μ for one μ); a host float64 array (nb,)."""
        xp = self.xp
        kept = xp.sum(xp.where(self.keep, xp.log(xp.where(self.keep, self.theta, 1.0)), 0.0), axis=-1)
        dropped = ~_backend.to_host(self.keep)
        if isinstance(self.mu, float):
            return _backend.to_host(kept) + self.log_mu * dropped.sum(axis=-1)
        # log Σ_i μ'_i q_i² by exponents (μ'_i may underflow where log μ'_i does not)
        Q = _backend.to_host(self.Q)
        with np.errstate(divide="ignore"):
            t = np.asarray(self.log_mu)[:, :, None] + 2.0 * np.log(np.abs(Q))
        top = np.max(t, axis=1, keepdims=True)
        log_qmq = top[:, 0, :] + np.log(np.sum(np.exp(t - top), axis=1))
        return _backend.to_host(kept) + np.sum(np.where(dropped, log_qmq, 0.0), axis=-1)

    def condition(self) -> float:
        """cond(K) over the kept directions, max θ / min θ per block (the largest)."""
        xp = self.xp
        kept = xp.where(self.keep, self.theta, xp.nan)
        top = _backend.to_host(xp.max(xp.where(self.keep, self.theta, 0.0), axis=-1))
        low = np.nanmin(_backend.to_host(kept), axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.nanmax(np.where(low > 0, top / low, np.inf))) if top.size else 1.0


def frame_rows(frame, count: int, m: int) -> np.ndarray:
    """A group's frame as per-row exponents: host int64 (count, m) from an int or an array."""
    return np.broadcast_to(np.asarray(frame, dtype=np.int64), (count, m)).copy()


class WoodburyGroup(_backend.HoldsNamespace):
    """``nb`` equal blocks of width B (> m), as one batch. Gg has shape (nb, m, B).

    ``frame`` is E: an int (one frame, σ = 2^-E) or per-row exponents E_i (host int array
    (nb, m), ``_scaling.row_frames``). ``gram`` is G'G'ᵀ in the frame, (nb, m, m); without it the
    group computes it (O(nb·m²·B)). Without ``factor`` (which needs ``gram``) the group factors
    K' = gram + M' (O(nb·m³))."""

    def __init__(self, xp, Gg, damp: float, scale: float, accumulate: str, *, frame=0, factor=None,
                 gram=None, weights=None, row_max=None, exact_products: bool = True):  # fmt: skip
        self.xp, self.Gg, self.damp, self.scale, self.accumulate = xp, Gg, damp, scale, accumulate
        self.row_max, self.exact_products = row_max, exact_products  # for ``redamp_group``
        self.weights = weights  # column weights w (nb, B): the group's gradients are G·diag(w) (``_prior``)
        self.count, m, self.size = Gg.shape
        self.frames = frame_rows(frame, self.count, m)  # E_i per block and row (host)
        if isinstance(frame, (int, np.integer)):  # one frame (the hot path: no reductions)
            self.uniform, self.per_row, self.frame = True, False, int(frame)
            self.block_frames = np.full(self.count, self.frame, dtype=np.int64)
        else:
            self.uniform = bool(np.all(self.frames == self.frames.flat[0])) if self.frames.size else True
            # the common frame of each block (F, spectra, powers): its rows' largest
            self.block_frames = self.frames.max(axis=1) if m else np.zeros(self.count, dtype=np.int64)
            self.frame = int(self.block_frames.max()) if self.count else 0
            self.per_row = bool(np.any(self.frames != self.block_frames[:, None]))  # rows beyond one frame
        dev = _passes.device_of(Gg)
        self._device = dev
        if self.uniform:
            self.sigma = _scaling.pow2(-self.frame)
            self.mu = _scaling.frame_damping(damp, scale, self.frame)  # K' = G'G'ᵀ + μ'I
        else:
            self.sigma = xp.asarray(_scaling.pow2_array(-self.frames), device=dev)
            self.mu = xp.asarray(_scaling.row_damping(damp, scale, self.frames), device=dev)
        self.damp_f, self.damp_e = _scaling.split(damp)
        self.scale_f, self.scale_e = _scaling.split(scale)
        self.inverse_exponent = -self.damp_e
        self.fisher_exponent: int | np.ndarray
        if np.all(self.block_frames == self.frame):
            self.fisher_exponent = self.scale_e + 2 * self.frame
        else:  # one exponent per block, (nb, 1, 1): broadcasts over (nb, B, k) values
            self.fisher_exponent = (self.scale_e + 2 * self.block_frames)[:, None, None]
        log_ratio = math.log(damp) - math.log(scale)
        self.log_mu = log_ratio - 2 * self.frame * math.log(2.0)  # log μ' of the common frame
        log_mu_rows = None if self.uniform else log_ratio - 2.0 * math.log(2.0) * self.frames
        if factor is None:
            if gram is None:
                gram = _passes.gram(xp, Gg, accumulate, self.sigma, weights)
            try:
                factor = CholeskyFactor(xp, gram + self._mu_diagonal(gram))
            except ValueError:  # numerically singular K' (duplicates, μ' below rounding)
                if not _backend.all_finite(xp, gram):
                    raise
                factor = SpectralFactor(xp, gram, self.mu, self.log_mu if self.uniform else log_mu_rows)
                self._spectral = factor
        self.factor = factor
        self._log_mu_rows = log_mu_rows
        self._K0 = gram  # G'G'ᵀ per block (nb·m² floats), for the spectral factor of corrected products
        if not isinstance(factor, SpectralFactor):
            self._spectral = None
        self.sq_norms = xp.linalg.diagonal(gram)  # (nb, m): ‖g'_i‖²
        policy = _precision.of_array(Gg, _backend.is_cupy(xp))
        self._cancellation, self._refine_condition = policy.cancellation, policy.refine_condition
        self._W = None
        self._diag = None
        self._gram_spectrum = None
        self._common = None

    def _mu_diagonal(self, like):
        """M' as a matrix to add to a Gram matrix (nb, m, m): μ'I or diag(μ'_i)."""
        xp = self.xp
        eye = xp.eye(like.shape[-1], dtype=xp.float64, device=_backend.device(like))
        return self.mu * eye if self.uniform else self.mu[:, :, None] * eye

    def _mu_rows(self):
        """μ' shaped to multiply (nb, m, k) arrays."""
        return self.mu if self.uniform else self.mu[:, :, None]

    def _project(self, X, scale=None):
        if self.weights is not None:
            X = X * self.weights[:, :, None]
        return _passes.project(self.xp, self.Gg, X, self.accumulate, self.sigma if scale is None else scale)

    def _combine(self, X, C, alpha, beta, overwrite=False, scale=None):
        sigma = self.sigma if scale is None else scale
        if self.weights is None:
            return _passes.combine(self.xp, self.Gg, X, C, alpha, beta, self.accumulate, sigma, overwrite=overwrite)
        w = self.weights[:, :, None]  # αX + β·W(σG)ᵀC = W·(α·X/W + β(σG)ᵀC)
        out = _passes.combine(self.xp, self.Gg, None if X is None else X / w, C, alpha, beta, self.accumulate,
                              sigma, overwrite=True)  # fmt: skip
        out *= w
        return out

    # -- products ---------------------------------------------------------------------
    def apply(self, X):
        """F⁻¹X in the frame, (X − G'ᵀc)/λ_f, for X (nb, B, k) float64 (normalized), which it may
        overwrite with the result: two passes over G plus O(m²k) per block.

        When x lies (nearly) in the span of the gradients, λ⁻¹(x − Gᵀc) cancels and its rounding
        errors along the gradients are amplified by F. Then four more passes correct it
        (``_corrected``).
        """
        xp = self.xp
        # P = G'x and ‖x‖² in one reduction (one all-reduce / one compute when sharded / chunked)
        P, xx = _passes.project_sumsq(xp, self.Gg, X, self.accumulate, self.sigma, self.weights)
        C = self.factor.solve(P)
        # ‖x − G'ᵀc‖² = ‖x‖² − cᵀp − cᵀM'c (K'c = p), O(mk): how much of x survives
        rest = xx - xp.sum(C * P, axis=1) - xp.sum(self._mu_rows() * C * C, axis=1)
        if not self._cancelled(rest, xx) and not self._ill_conditioned():
            return self._combine(X, C, 1.0 / self.damp_f, -1.0 / self.damp_f, overwrite=True)
        return self._corrected(X, P)

    @property
    def spectral(self) -> SpectralFactor:
        if self._spectral is None:
            self._spectral = SpectralFactor(self.xp, self._K0, self.mu,
                                            self.log_mu if self.uniform else self._log_mu_rows)  # fmt: skip
        return self._spectral

    def _corrected(self, X, P):
        """F⁻¹x (in the frame of ``apply``) for P = G'x without the cancellation of λ⁻¹(x − G'ᵀc).

        c solves K'c = G'x, equivalently G'r = M'c with r = x − G'ᵀc. With the spectral factor
        (no amplified rounding along cancelling combinations of gradients), c is refined by
        δc = K'⁻¹(G'r − M'c), the residual taken through G itself (not through the rounded Gram
        matrix): once always, then again while δc is above rounding (``REFINE_TOLERANCE`` of c)
        and still shrinking, at most ``MAX_REFINEMENTS`` times (gradients that are duplicates to
        within ~1e-7 with λ near the rounding of their Gram matrix converge slowly, about 30× per
        step: docs/numerics.md). Then

            F⁻¹x = λ⁻¹ r + G'ᵀ K'⁻¹ λ⁻¹(M'c − G'r),

        an identity whose second term is zero in exact arithmetic and, in floating point,
        removes the rounding error of r along the gradients (−λ⁻¹G'ᵀK'⁻¹G'·err(r)).
        5 passes over G, 2 more per further refinement.
        """
        xp = self.xp
        solve = self.spectral.solve
        C = solve(P)
        if self.per_row:
            self._check_span(C)
        previous = math.inf
        for step in range(MAX_REFINEMENTS + 1):
            R = self._combine(X, C, 1.0, -1.0)
            E = self._project(R) - self._mu_rows() * C
            D = solve(E)
            size = float(xp.max(xp.abs(D) / xp.maximum(xp.max(xp.abs(C), axis=1, keepdims=True), 1e-300)))
            if step == MAX_REFINEMENTS or (step >= 1 and (size <= REFINE_TOLERANCE or size > 0.5 * previous)):
                break
            C, previous = C + D, size
        return self._combine(R, -D / self.damp_f, 1.0 / self.damp_f, 1.0)

    def _check_span(self, C) -> None:
        """ValueError when x lies (nearly) in the span of "far" gradients only: those whose frame
        exceeds, by more than ``_scaling.SPREAD_LIMIT``, the smallest frame of the gradients that
        are not below the damping (‖g'_i‖² > μ'_i). F⁻¹x is then carried by the far gradients'
        terms μ'_i·c_i, which lie below 2^-960 of the rounding noise of the others' coefficients:
        no digit of it is resolvable in float64. With a coefficient on the other gradients above
        that noise (64·m·ε of the largest), their terms carry the result and it is accurate. (A
        stored gradient's own F⁻¹g is exact through ``DynamicInverse.push_apply``.)"""
        xp = self.xp
        visible = _backend.to_host(self.sq_norms) > _backend.to_host(self.mu)  # above the damping
        frames = np.where(visible, self.frames, np.iinfo(np.int64).max)
        ref = frames.min(axis=1, keepdims=True)
        far_host = visible & (self.frames - ref > _scaling.SPREAD_LIMIT)
        if not far_host.any():
            return
        far = xp.asarray(far_host, device=self._device)[:, :, None]
        mag = xp.abs(C)  # (nb, m, k): x's coefficients on the frame-scaled gradients
        noise = 64 * mag.shape[1] * _precision.EPS64 * xp.max(mag, axis=1)
        far_top = xp.max(xp.where(far, mag, 0.0), axis=1)
        near_top = xp.max(xp.where(far, 0.0, mag), axis=1)
        if bool(xp.any((far_top > noise) & (near_top <= noise))):
            raise ValueError(
                "x lies (nearly) in the span of gradients whose magnitudes exceed the others' by more than "
                f"2^{_scaling.SPREAD_LIMIT}: F⁻¹x is carried by terms below float64's resolution of the others "
                "(no digit of it would be reliable); push_apply gives F⁻¹g exactly for a stored gradient"
            )

    def _ill_conditioned(self) -> bool:
        """Whether K' is conditioned beyond ``refine_condition`` of the storage policy, where the
        one-pass product's error exceeds its target even for x far from the gradients' span
        (η 5e-11 to 3e-10 at cond(K') ≈ 1e13, docs/numerics.md): such products take the
        corrected form. Estimated from the factor's pivots (O(m)), never for ``native``."""
        if self.accumulate == "native":
            return False
        estimate = getattr(self.factor, "condition", None)
        return estimate is not None and estimate() > self._refine_condition

    def _cancelled(self, remainder, total) -> bool:
        if self.accumulate == "native":
            return False
        return bool(self.xp.any(remainder < self._cancellation * total))

    # -- the common frame: F, spectra and powers ----------------------------------------
    def _common_frame(self):
        """(σ, μ', G'G'ᵀ) in the common frame of each block (its rows' largest E_i): σ and μ'
        floats when every block has the same, else σ (nb, m) and μ' (nb, 1) arrays. The Gram
        matrix is rescaled exactly from the per-row one; entries of gradients more than
        ``_scaling.SPREAD_LIMIT`` binades below a block's largest underflow (normwise below
        rounding of that block's F). Cached."""
        if not self.per_row and self.uniform:
            return self.sigma, self.mu, self._K0
        if self._common is None:
            xp, dev = self.xp, self._device
            common = np.broadcast_to(self.block_frames[:, None], self.frames.shape)
            K0 = self._K0
            if self.per_row:
                k = _scaling.rescale_exponents(self.frames, common)
                K0 = _backend.ldexp(xp, K0, xp.asarray(k, device=dev))
            if np.all(self.block_frames == self.frame):
                sigma, mu = _scaling.pow2(-self.frame), _scaling.frame_damping(self.damp, self.scale, self.frame)
            else:
                sigma = xp.asarray(_scaling.pow2_array(-common), device=dev)
                mu = xp.asarray(_scaling.row_damping(self.damp, self.scale, self.block_frames)[:, None], device=dev)
            self._common = [sigma, mu, K0]
        return tuple(self._common[:3])

    def apply_fisher(self, X):
        """F X in each block's common frame: s_f·(μ'X + G'ᵀG'X), to be scaled by
        2^``fisher_exponent``."""
        sigma, mu, _ = self._common_frame()
        P = self._project(X, sigma)
        if isinstance(mu, float):
            return self._combine(X, P, self.scale_f * mu, self.scale_f, scale=sigma)
        out = self._combine(None, P, 0.0, self.scale_f, scale=sigma)
        out += (self.scale_f * mu[:, :, None]) * X
        return out

    def apply_to_gradients(self, E, X, P, x_exponent: int, row_frame: int = 0):
        """F⁻¹x for x = GᵀE (the push_apply case, x a stored gradient, E = e_slot): returns
        (Y, exponent) with F⁻¹x = Y·2^exponent. X() returns (nb, B, k) x·2^-x_exponent
        (normalized; only the corrected form asks for it), P = G'X and ``row_frame`` is the frame
        E_j of the gradient's row.

        Uses F⁻¹Gᵀe_j = (1/s)·GᵀK⁻¹e_j = (σ_j/s)·G'ᵀK'⁻¹e_j, one pass, no cancellation of
        λ⁻¹(x − Gᵀc) (docs/design.md §3). If the coefficients K'⁻¹E cancel among (nearly)
        dependent gradients, falls back to the corrected form of ``apply`` (five passes).
        """
        xp = self.xp
        C = self.factor.solve(E)
        # ‖G'ᵀC‖² = Cᵀ(K' − M')C against (Σ_i |c_i| ‖g'_i‖)²: the size of the terms summed
        kept = xp.sum(C * E, axis=1) - xp.sum(self._mu_rows() * C * C, axis=1)
        terms = xp.sum(xp.abs(C) * xp.sqrt(self.sq_norms)[:, :, None], axis=1) ** 2
        if not self._cancelled(kept, terms):
            return self._combine(None, C, 0.0, 1.0 / self.scale_f), -row_frame - self.scale_e
        return self._corrected(X(), P), x_exponent + self.inverse_exponent

    # -- Laplace: samples, spectrum, matrix functions, re-damping (docs/design.md §10) ---
    @property
    def noise_width(self) -> int:
        """Standard normals per block beyond one per coordinate (``sample``): m."""
        return self.Gg.shape[1]

    def sample(self, Z1, Z2):
        """Draws with covariance F_b⁻¹ from standard normals Z1 (nb, B, k) and Z2 (nb, m, k):
        x = λ^(-1/2)·[z₁ − G'ᵀK'⁻¹(G'z₁ − √M'·z₂)] (Hoffman–Ribak; = F⁻¹(√λ z₁ + √s Gᵀz₂)),
        returned as (values, exponent). Two passes over G; Z1 is overwritten."""
        root = math.sqrt(self.mu) if self.uniform else self.xp.sqrt(self.mu)[:, :, None]
        P = self._project(Z1) - root * Z2
        C = self.factor.solve(P)
        f, e = _scaling.power(self.damp_f, self.damp_e, -0.5)
        return self._combine(Z1, C, f, -f, overwrite=True), e

    def gram_spectrum(self):
        """s·eig(G_bG_bᵀ) per block, the eigenvalues of s·G_bᵀG_b that can be nonzero: a host
        float64 array (nb, m), descending, clamped at 0; O(m³) per block, cached."""
        if self._gram_spectrum is None:
            _, mu, K0 = self._common_frame()
            lam = _backend.to_host(self.xp.linalg.eigvalsh(K0))[:, ::-1]
            # s·Λ = λ·Λ'/μ' (Λ' in the frame), without forming s·2^(2E)
            mu = np.asarray(_backend.to_host(mu) if not isinstance(mu, float) else mu, dtype=np.float64)
            with np.errstate(divide="ignore"):
                factor = np.where(mu > 0, self.damp / np.where(mu > 0, mu, 1.0), math.inf)
            self._gram_spectrum = np.where(lam > 0, lam * factor, 0.0)
        return self._gram_spectrum

    def _power_basis(self):
        """(σ, μ', Λ', Q) of the common frame's Gram matrix G'G'ᵀ = QΛ'Qᵀ, cached."""
        if self.uniform:
            sp = self.spectral
            return self.sigma, self.mu, sp.lam, sp.Q
        sigma, mu, K0 = self._common_frame()
        if len(self._common) == 3:
            lam, Q = _backend.eigh(self.xp, K0)
            self._common += [lam, Q]
        return sigma, mu, self._common[3], self._common[4]

    def apply_power(self, X, p: float):
        """F_b^p X = λ^p·[x + G'ᵀQ·φ(Λ')·QᵀG'x] with G'G'ᵀ = QΛ'Qᵀ (the common frame) and
        φ(Λ') = ((1 + Λ'/μ')^p − 1)/Λ' (→ p/μ' as Λ' → 0, computed as expm1(p·log1p(Λ'/μ'))/Λ'),
        returned as (values, exponent). Two passes over G; the eigendecomposition is cached."""
        xp = self.xp
        sigma, mu, lam, Q = self._power_basis()
        lam = xp.maximum(lam, 0.0)
        t = lam / mu
        phi = xp.where(lam > 0, xp.expm1(p * xp.log1p(t)) / xp.where(lam > 0, lam, 1.0), p / mu)
        C = Q @ ((xp.matrix_transpose(Q) @ self._project(X, sigma)) * phi[:, :, None])
        f, e = _scaling.power(self.damp_f, self.damp_e, p)
        return self._combine(X, C, f, f, overwrite=True, scale=sigma), e

    def redamped(self, damp: float, frame, blocks=(0, None), row_max=None):
        """Blocks b0:b1 with damping λ' in frame ``frame`` (an int or per-row exponents for those
        blocks; ``row_max``: theirs), reusing the Gram matrix (rescaled exactly): O(nb·m³), G is
        not read."""
        b0, b1 = blocks
        gram = self._K0[b0:b1, ...]
        old = self.frames[b0:b1, :]
        new = frame_rows(frame, old.shape[0], old.shape[1])
        if not np.array_equal(old, new):
            k = _scaling.rescale_exponents(old, new)
            gram = _backend.ldexp(self.xp, gram, self.xp.asarray(k, device=_backend.device(gram)))
        whole = b0 == 0 and b1 in (None, self.count)  # sharded/chunked views have one block and no slicing
        Gg = self.Gg if whole else self.Gg[b0:b1, ...]
        return WoodburyGroup(self.xp, Gg, damp, self.scale, self.accumulate, frame=new, gram=gram, row_max=row_max,
                             exact_products=self.exact_products)  # fmt: skip

    def restricted(self, Gg):
        """This group on some of its columns, Gg (nb, m, c) (one chunk of a Dask G), sharing the
        m×m state: for the queries local in d (``diag``, ``fisher_diag``) of those columns. O(1)."""
        new = copy.copy(self)
        new.Gg, new.size, new._W, new._diag = Gg, Gg.shape[2], None, None
        return new

    @property
    def damp_fraction(self) -> float:
        """λ_f with λ = λ_f·2^λ_e: values of F⁻¹ come back from the group times λ_f⁻¹·2^-λ_e."""
        return self.damp_f

    # -- entries ----------------------------------------------------------------------
    @property
    def W(self):
        """L⁻¹G' per block: (nb, m, B) float64, laid out like G (column j = w_j)."""
        if self._W is None:
            self._W = _passes.map_tiles(
                self.xp, self.Gg, lambda b0, b1, t: self.factor.whiten(t, b0, b1), self.sigma, self.weights
            )
        return self._W

    def _common_weights(self):
        """Per-row factors 2^(E_i − E_b) that take rows of G' to their block's common frame
        (nb, m, 1), or None."""
        if not self.per_row:
            return None
        k = self.frames - self.block_frames[:, None]
        return self.xp.asarray(_scaling.pow2_array(k), device=_backend.device(self.mu))[:, :, None]

    def diag(self):
        """diag F⁻¹ over the group in the frame, (1 − ‖w_j‖²)/λ_f: (nb·B,) float64. O(dm²)
        once, then cached. See ``bounded`` for coordinates beyond the claimed conditioning."""
        if self._diag is None:
            xp = self.xp
            to_common = self._common_weights()

            def column_sq(b0, b1, t):  # Σ_i g_ij² in the common frame
                return _backend.column_sumsq(xp, t if to_common is None else t * to_common[b0:b1])

            def both(b0, b1, t):  # ‖w_j‖² and ‖g_j‖² (common frame) for the tile's columns
                return xp.stack([_backend.column_sumsq(xp, self.factor.whiten(t, b0, b1)), column_sq(b0, b1, t)],
                                axis=1)  # fmt: skip

            if self._W is not None:
                sq = _backend.column_sumsq(xp, self._W)
                col = _passes.column_sumsq(xp, self.Gg, self._common_frame()[0], self.weights)
            else:
                parts = _passes.map_tiles(xp, self.Gg, both, self.sigma, self.weights)
                sq, col = parts[:, 0, :], parts[:, 1, :]
            self._diag = xp.reshape(self.bounded(1.0 - sq, col), (-1,)) / self.damp_f
        return self._diag

    def bounded(self, value, col_sq, blocks=None):
        """λ·F⁻¹_jj = 1 − ‖w_j‖², clamped below by its bound λ/F_jj = μ'/(μ' + ‖g'_j‖²) (common
        frame; F⁻¹_jj ≥ 1/F_jj for SPD F). Where the subtraction left fewer than about
        ``DIAGONAL_DIGITS_LOST``·m·ε (cond(F) at that coordinate beyond ~1/(64mε): no digit is
        reliable) the bound is the best value available, and an AccuracyWarning says how many
        coordinates are affected."""
        xp = self.xp
        m = self.Gg.shape[1]
        mu = self._common_frame()[1]
        if not isinstance(mu, float):  # one per block: (nb, 1) against (nb, B), or per entry
            mu = mu if blocks is None else self.xp.take(mu[:, 0], blocks)
        floor = mu / (mu + col_sq)
        lost = int(xp.sum(xp.astype(value <= _precision.DIAGONAL_DIGITS_LOST * m * _precision.EPS64, xp.int64)))
        if lost:
            warnings.warn(
                f"{lost} diagonal entries of F⁻¹ lost their digits to cancellation (the conditioning at those "
                "coordinates is beyond ~1/(64·m·ε)); they are at least the returned lower bound 1/F_jj",
                _precision.AccuracyWarning,
                stacklevel=5,
            )
        return xp.maximum(value, floor)

    def columns(self, r, common: bool = False):
        """Columns r of G' (by local offsets; with ``common``, in the common frame): (len r, m)
        float64. O(m) each."""
        xp = self.xp
        nb, m, B = self.Gg.shape
        cols = _passes.columns(xp, self.Gg, r // B, r % B)
        if self.weights is not None:
            cols *= self.weights[r // B, r % B][:, None]
        sigma = self._common_frame()[0] if common else self.sigma
        if _passes.is_unit(sigma):
            return cols
        if isinstance(sigma, float):
            return cols * sigma
        return cols * xp.take(sigma, r // B, axis=0)

    def whitened(self, r):
        """w_r for local offsets r: (len r, m). From the cached W when it fits in
        ``W_CACHE_BYTES``, else whitened on demand from the gathered columns (O(m²) each)."""
        nb, m, B = self.Gg.shape
        if self._W is not None or (8 * nb * m * B <= W_CACHE_BYTES and _passes.materialized(self.Gg)):
            return self.W[r // B, :, r % B]
        xp = self.xp
        blocks = r // B
        cols = self.columns(r)
        out = xp.empty(cols.shape, dtype=xp.float64, device=_backend.device(cols))
        for b in _backend.to_host(xp.unique_values(blocks)).tolist():
            sel = xp.nonzero(blocks == b)[0]
            part = xp.matrix_transpose(xp.take(cols, sel, axis=0))[None, ...]  # (1, m, k)
            out[sel, :] = xp.matrix_transpose(self.factor.whiten(part, b, b + 1)[0, ...])
        return out

    def pairs(self, r, c):
        """F⁻¹[r_t, c_t] in the frame for local offsets r, c in the same block: (n,) float64,
        O(m) each (diagonal entries bounded as in ``diag``)."""
        xp = self.xp
        wr = self.whitened(r)
        same = r == c
        out = xp.astype(same, xp.float64) - xp.sum(wr * self.whitened(c), axis=1)
        on_diagonal = xp.nonzero(same)[0]
        if on_diagonal.shape[0]:
            rd = xp.take(r, on_diagonal)
            col = xp.sum(self.columns(rd, common=True) ** 2, axis=1)
            out[on_diagonal] = self.bounded(xp.take(out, on_diagonal), col, rd // self.Gg.shape[2])
        return out / self.damp_f

    def cross(self, r, c):
        """Dense F⁻¹[r][:, c] in the frame for local offsets (zero across blocks)."""
        xp = self.xp
        B = self.Gg.shape[2]
        out = xp.astype(r[:, None] == c[None, :], xp.float64) - self.whitened(r) @ xp.matrix_transpose(self.whitened(c))
        same = (r // B)[:, None] == (c // B)[None, :]
        return xp.where(same, out / self.damp_f, 0.0)

    # -- Fisher side --------------------------------------------------------------------
    def fisher_diag(self):
        """diag F in the common frame: s_f·(μ' + Σ_i G'[i, j]²)."""
        sigma, mu, _ = self._common_frame()
        s = _passes.column_sumsq(self.xp, self.Gg, sigma, self.weights)
        return self.xp.reshape(self.scale_f * (mu + s), (-1,))

    def logdets(self):
        """log det F_b = B log λ + m log(s/λ) + log det K_b per block (matrix determinant lemma),
        with log det K_b = log det K'_b + 2·Σ_i E_i·log 2: a host float64 array (nb,)."""
        nb, m, _ = self.Gg.shape
        B = _passes.global_width(self.Gg)
        per_block = B * math.log(self.damp) + m * (math.log(self.scale) - math.log(self.damp))
        shift = 2.0 * math.log(2.0) * self.frames.sum(axis=1)
        return (per_block + shift) + self.factor.logdets()
