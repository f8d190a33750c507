"""Laplace posteriors from a set of gradients: evidence, prior tuning, linearised predictive.

The posterior precision of a Laplace approximation around weights θ* is
F = Λ₀ + s·GᵀG: Λ₀ the prior precision (an operator's ``damp``: one value, one per diagonal
block, e.g. per layer, or one per coordinate) and s·GᵀG the empirical Fisher or GGN of the summed negative log
likelihood (rows of G per-sample gradients of the summed loss and s = 1, or s = N/m for m of N
samples). Any operator of this library is then the posterior covariance F⁻¹: ``op.sample()``
draws from it exactly, ``op.logdet()`` is log det F, ``op.with_damp`` changes Λ₀ without a pass
over G. This module adds what needs a loss and weights (docs/design.md §10):

- ``log_marginal_likelihood``: log p(D) ≈ −L(θ*) − ½(θ*−θ₀)ᵀΛ₀(θ*−θ₀) + ½ log det Λ₀ − ½ log det F
  (the 2π terms cancel);
- ``tune_damp``: the Λ₀ (scalar or per block) that maximises it, by golden-section search in
  log λ (the objective is concave in log λ_b for every block, and separates over blocks);
- ``predictive_variance``: diag(J F⁻¹ Jᵀ) (or the full k×k matrix) for Jacobians J (k×d), and
  ``probit_probabilities``, ``expected_calibration_error`` for classifiers.

On operators sharded along d (``rank1inv.sharded``) weights and Jacobians are this rank's
columns; the sums over d are all-reduced, so every rank gets the same evidence and variances.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, _checks

__all__ = [
    "log_marginal_likelihood",
    "tune_damp",
    "predictive_variance",
    "probit_probabilities",
    "expected_calibration_error",
]

GOLDEN_STEPS = 80  # golden-section iterations: the log-λ bracket shrinks by 0.618^80 ≈ 2e-17


def _allsum(op, value):
    """Sum a host array or float over the ranks of a sharded operator (identity otherwise)."""
    out = op._sum_over_ranks(np.asarray(value, dtype=np.float64))
    return float(out) if np.ndim(value) == 0 else out


def _finite(value: float, what: str) -> float:
    """``value`` itself if finite, else OverflowError (an inf would be a wrong answer)."""
    if not math.isfinite(value):
        raise OverflowError(f"{what} exceeds the float64 range ({value!r}): rescale the weights or the loss")
    return value


def _delta(op, weights, prior_mean):
    """Δ = θ* − θ₀ as a float64 array of the operator's namespace, checked."""
    xp = op.namespace
    d = op.shape[0]
    theta = _checks.as_array(weights, "weights", xp)
    if tuple(theta.shape) != (d,):
        raise ValueError(f"weights must have shape ({d},), got {tuple(theta.shape)}")
    delta = xp.astype(theta, xp.float64)
    if prior_mean is not None:
        mean = _checks.as_array(prior_mean, "prior_mean", xp)
        if tuple(mean.shape) != (d,):
            raise ValueError(f"prior_mean must have shape ({d},), got {tuple(mean.shape)}")
        delta = delta - xp.astype(mean, xp.float64)
    if not _backend.all_finite(xp, delta):
        raise ValueError("weights (and prior_mean) must be finite")
    return delta


def _block_sq(op, delta) -> np.ndarray:
    """‖θ_b − θ₀_b‖² per diagonal block of the operator (host float64, block order) for Δ from
    ``_delta``."""
    xp = op.namespace
    top = float(xp.max(xp.abs(delta))) if delta.shape[0] else 0.0
    top = float(op._max_over_ranks(np.array([top]))[0])  # one scale for every rank
    if top == 0.0:
        return np.zeros(len(op.block_sizes))
    delta = delta / top  # no overflow or underflow in the squares (scaled back below)
    ends = np.cumsum(op.block_sizes)
    sq = [xp.sum(delta[int(a) : int(b)] ** 2) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
    return _allsum(op, _backend.to_host(xp.stack(sq)) * top * top)


def _block_damps(op) -> np.ndarray:
    """λ_b per diagonal block (host float64, block order)."""
    damp = op.damp
    return np.asarray(damp if isinstance(damp, tuple) else [damp] * len(op.block_sizes), dtype=np.float64)


def _check_loss(loss) -> float:
    loss = float(loss)
    if not math.isfinite(loss):
        raise ValueError(f"loss must be finite, got {loss!r}")
    return loss


def log_marginal_likelihood(op, loss, weights, *, prior_mean=None) -> float:
    """Laplace log evidence log p(D) ≈ −L − ½ΔᵀΛ₀Δ + ½ log det Λ₀ − ½ log det F (a float).

    op: a StaticInverse/DynamicInverse for F = Λ₀ + s·GᵀG around ``weights``; loss: the summed
    negative log likelihood L at ``weights`` (a float); weights: θ*, shape (d,), the operator's
    namespace; prior_mean θ₀ (default 0), Δ = θ* − θ₀. Cost O(d) plus ``op.logdet()``."""
    with op._agreement("log_marginal_likelihood"):  # every rank checks its inputs, then all agree
        loss = _check_loss(loss)
        delta = _delta(op, weights, prior_mean)
    if isinstance(op.damp, np.ndarray):  # per-coordinate prior precision δ
        xp = op.namespace
        lam = op.damp
        with np.errstate(over="ignore"):
            scatter = _allsum(op, float(xp.sum(xp.asarray(lam, device=_backend.device(delta)) * delta * delta)))
        log_prior = _allsum(op, math.fsum(np.log(lam).tolist()))
    else:
        damps, sizes = _block_damps(op), np.asarray(op.block_sizes, dtype=np.float64)
        with np.errstate(over="ignore"):
            scatter = math.fsum((damps * _block_sq(op, delta)).tolist())
        log_prior = math.fsum(np.atleast_1d(_allsum(op, sizes * np.log(damps))).tolist())  # Σ over all coordinates
    _finite(scatter, "the prior term λ‖θ − θ₀‖²")
    return _finite(-loss - 0.5 * (scatter - log_prior + op.logdet()), "the log marginal likelihood")


def tune_damp(op, loss, weights, *, prior_mean=None, per_block: bool = False, bounds=(1e-8, 1e8)):
    """The prior precision that maximises ``log_marginal_likelihood``: returns
    (operator with that damping, its log evidence).

    ``per_block=False``: one λ for all blocks; True: one λ_b per diagonal block. With the
    spectra of ``op.gram_spectra()`` (O(m³) per block once), log det F_b − B_b log λ_b =
    Σ_i log1p(s·Λ_bi/λ_b), so the evidence is −L − ½Σ_b [Σ_i log1p(s·Λ_bi/λ_b) + λ_b‖Δ_b‖²]:
    concave in log λ_b and separate over blocks. Golden-section search on log λ over ``bounds``
    (``GOLDEN_STEPS`` steps of O(m) per block), then one ``with_damp`` (a DynamicInverse gives a
    StaticInverse snapshot). When the evidence keeps growing towards a bound, the bound is
    returned."""
    with op._agreement("tune_damp"):  # every rank checks its inputs, then all agree
        lo, hi = _bounds(bounds)
        loss = _check_loss(loss)
        if isinstance(op.damp, np.ndarray):
            raise ValueError("tune_damp tunes one prior precision or one per block, not a per-coordinate prior")
        delta = _delta(op, weights, prior_mean)
    with np.errstate(over="ignore"):
        sq = _block_sq(op, delta)
    if not np.all(np.isfinite(sq)):
        raise OverflowError("‖θ − θ₀‖² exceeds the float64 range: rescale the weights")
    spectra = op.gram_spectra()
    nblocks = len(spectra)

    def terms(log_lam):  # −½[Σ log1p(sΛ/λ_b) + λ_b‖Δ_b‖²] per block, or their sum
        lam = np.exp(log_lam) if per_block else np.full(nblocks, math.exp(log_lam[0]))
        t = np.array([-0.5 * (np.sum(np.log1p(S / lam_b)) + lam_b * q) for S, lam_b, q in zip(spectra, lam, sq)])
        return t if per_block else np.array([t.sum()])

    k = nblocks if per_block else 1
    a, b = np.full(k, math.log(lo)), np.full(k, math.log(hi))
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = terms(c), terms(d)
    for _ in range(GOLDEN_STEPS):
        left = fc >= fd  # the maximum lies in [a, d]
        a, b = np.where(left, a, c), np.where(left, d, b)
        new = np.where(left, b - ratio * (b - a), a + ratio * (b - a))
        f_new = terms(new)
        c, d = np.where(left, new, d), np.where(left, c, new)
        fc, fd = np.where(left, f_new, fd), np.where(left, fc, f_new)
    best = np.exp((a + b) / 2.0)
    post = op.with_damp(best.tolist() if per_block and nblocks > 1 else float(best[0]))
    return post, log_marginal_likelihood(post, loss, weights, prior_mean=prior_mean)


def _bounds(bounds) -> tuple[float, float]:
    """(low, high) from ``tune_damp``'s bounds: two real numbers with 0 < low < high < inf."""
    try:
        lo, hi = bounds
    except (TypeError, ValueError) as err:
        raise TypeError(f"bounds must be a pair (low, high), got {bounds!r}") from err
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"bounds must be real numbers, got {bounds!r}")
    lo, hi = float(lo), float(hi)
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
    return lo, hi


def predictive_variance(op, J, *, full: bool = False, chunk: int = 64):
    """diag(J F⁻¹ Jᵀ), shape (k,), for Jacobians J (k, d) in the operator's namespace; with
    ``full`` the (k, k) matrix J F⁻¹ Jᵀ. op.dtype (float64 for float64 J). One product with
    ``chunk`` columns at a time: O(dmk) and (d × chunk) float64 of extra memory."""
    xp = op.namespace
    with op._agreement("predictive_variance", "rows", "chunk") as agreed:
        J = _checks.as_array(J, "J", xp)
        if J.ndim != 2 or J.shape[1] != op.shape[0]:
            raise ValueError(f"J must have shape (k, {op.shape[0]}), got {tuple(J.shape)}")
        chunk = _checks.positive_int(chunk, "chunk")
        agreed.set(rows=J.shape[0], chunk=chunk)
    k = J.shape[0]
    Jt = xp.matrix_transpose(J)
    parts = []
    for j0 in range(0, k, chunk):
        Y = op.matmat(Jt[:, j0 : j0 + chunk])  # (d, c) = F⁻¹ Jᵀ columns
        Y64 = xp.astype(Y, xp.float64)
        if full:
            parts.append(xp.astype(J, xp.float64) @ Y64)  # (k, c)
        else:
            parts.append(xp.sum(xp.astype(Jt[:, j0 : j0 + chunk], xp.float64) * Y64, axis=0))
    out = xp.concat(parts, axis=1 if full else 0)
    if op.communicator is not None:  # J's columns are this rank's: sum over ranks
        out = xp.asarray(_allsum(op, _backend.to_host(out)), device=_backend.device(out))
    if full:
        out = (out + xp.matrix_transpose(out)) / 2.0  # exactly symmetric
    return _backend.cast_result(xp, out, Y.dtype, "the predictive variance")


def probit_probabilities(logits, variances):
    """Class probabilities of the linearised Laplace predictive by the probit approximation,
    softmax(f_c / √(1 + π/8·v_c)) row by row, for logits and variances (n, C) (NumPy)."""
    f = np.asarray(logits, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    if f.shape != v.shape or f.ndim != 2:
        raise ValueError(f"logits and variances must both have shape (n, C), got {f.shape} and {v.shape}")
    if np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError("variances must be finite and >= 0")
    z = f / np.sqrt(1.0 + (math.pi / 8.0) * v)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probabilities, labels, bins: int = 15) -> float:
    """ECE: Σ_bins (n_bin/n)·|accuracy − mean confidence| over ``bins`` equal-width confidence
    bins, for class probabilities (n, C) and integer labels (n,) (NumPy)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probabilities must be (n, C) and labels (n,), got {p.shape} and {y.shape}")
    bins = _checks.positive_int(bins, "bins")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)
