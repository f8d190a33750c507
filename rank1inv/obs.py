"""Optimal-Brain-Surgeon pruning on top of any StaticInverse (WoodFisher §4–6, M-FAC §4.1).

Every function takes an operator ``op`` for F⁻¹ (full or block-diagonal, NumPy or CuPy) and a
flat weight vector ``w`` of length d on the same backend. Costs are stated per call; k is the
number of weights pruned.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _backend, _checks
from .static import StaticInverse

METHODS = ("obs", "obd", "magnitude")
UPDATES = ("simultaneous", "exact", None)
EXACT_CHUNK = 2048


def _vector(op, x, name):
    xp = op.namespace
    x = _checks.as_array(x, name, xp)
    _checks.same_backend(xp, x, name, "the operator")
    if x.ndim != 1 or x.shape[0] != op.shape[0]:
        raise ValueError(f"{name} must have shape ({op.shape[0]},), got {tuple(x.shape)}")
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating-point array, got {x.dtype}")
    if not _backend.all_finite(xp, x):
        raise ValueError(f"{name} contains non-finite values")
    return xp.astype(x, xp.float64)


def saliency(op, w, method: str = "obs", grad=None):
    """Loss increase estimated for removing each weight alone: shape (d,), float64.

    "obs": ρ_q = w_q² / (2[F⁻¹]_qq) (OBS; F⁻¹ diagonal, O(dm) after the operator's precompute).
    With ``grad`` (WoodTaylor, WoodFisher eq. 23): ρ_q = (w_q − [F⁻¹g]_q)² / (2[F⁻¹]_qq) − ½gᵀF⁻¹g.
    "obd": ρ_q = ½ w_q² F_qq with the diagonal of F itself (O(dm)). "magnitude": |w_q|.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    xp = op.namespace
    w = _vector(op, w, "w")
    if method == "magnitude":
        return xp.abs(w)
    if method == "obd":
        return 0.5 * w * w * xp.astype(op.fisher().diag(), xp.float64)
    d = xp.astype(op.diag(), xp.float64)
    if grad is None:
        return w * w / (2.0 * d)
    g = _vector(op, grad, "grad")
    hg = xp.astype(op @ g, xp.float64)
    return (w - hg) ** 2 / (2.0 * d) - 0.5 * xp.sum(g * hg)


def group_saliency(op, w, groups):
    """Structured OBS (WoodFisher eq. 18): ρ_Q = ½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q for each group Q (a
    sequence of index arrays, e.g. a row or a filter). Returns (len(groups),) float64.
    Cost O(|Q|²m + |Q|³) per group."""
    xp = op.namespace
    w = _vector(op, w, "w")
    out = []
    for q in groups:
        idx = _checks.indices(xp, q, op.shape[0], "group")
        S = xp.astype(op.submatrix(idx), xp.float64)
        wq = xp.take(w, idx)
        out.append(0.5 * float(wq @ _spd_solve(xp, S, wq)))
    return xp.asarray(np.array(out))


def _spd_solve(xp, S, b):
    L = _backend.cholesky(xp, S)
    return _backend.cho_solve(xp, L, b)


def _select(op, scores, sparsity: float, scope: str, prunable=None):
    """Indices of the lowest scores: the given fraction of the prunable weights, overall or in
    each block. Weights outside ``prunable`` (a boolean (d,) array) are never selected."""
    xp = op.namespace
    if prunable is not None:
        prunable = _checks.as_array(prunable, "prunable", xp)
        _checks.same_backend(xp, prunable, "prunable", "the operator")
        if prunable.dtype != xp.bool:
            raise TypeError(f"prunable must be a boolean array (True = may be pruned), got {prunable.dtype}")
        if prunable.shape != (op.shape[0],):
            raise ValueError(f"prunable must be a boolean array of shape ({op.shape[0]},), got {tuple(prunable.shape)}")
        scores = xp.where(prunable, scores, xp.inf)
    else:
        prunable = xp.ones(op.shape[0], dtype=xp.bool)
    if scope == "global":
        k = int(round(sparsity * int(xp.sum(prunable))))
        order = xp.argsort(scores, stable=True)
        return xp.sort(order[:k])
    if scope != "block":
        raise ValueError(f"scope must be 'global' or 'block', got {scope!r}")
    parts, a = [], 0
    for size in op.block_sizes:
        k = int(round(sparsity * int(xp.sum(prunable[a : a + size]))))
        order = xp.argsort(scores[a : a + size], stable=True)
        parts.append(order[:k] + a)
        a += size
    return xp.sort(xp.concat(parts))


def prune(
    op, w, sparsity: float, *, method: str = "obs", update="simultaneous", scope: str = "global", grad=None,
    prunable=None,
):  # fmt: skip
    """Prune a fraction ``sparsity`` of the weights: returns (mask, new_w), mask True = kept.

    The lowest-``saliency`` weights are removed, globally or per block of ``op``'s layout
    (``scope="block"``), among ``prunable`` ones if given (a boolean (d,) mask, e.g. excluding
    biases; the fraction is of the prunable weights), then all others are updated:

    - "simultaneous": the sum of the single-weight OBS updates (WoodFisher §4.3),
      δw = −F⁻¹ Σ_q (w_q / [F⁻¹]_qq) e_q — ONE inverse-Hessian product with a sparse right-hand
      side, O(dm). With ``grad``: δw = −F⁻¹(g + Σ_q γ_q e_q), γ_q = (w_q − [F⁻¹g]_q)/[F⁻¹]_qq.
    - "exact": the joint constrained minimum δw = −F⁻¹E_Q ([F⁻¹]_QQ)⁻¹ w_Q, with the k×k block
      from ``submatrix``, O(k²m + k³ + dm). For k > ``EXACT_CHUNK`` the pruned set is processed
      in chunks of that size (lowest saliency first), each solved exactly with the earlier chunks
      held at zero by the mask: an approximation of the joint solution, documented as such.
    - None: mask only (OBD / magnitude pruning).

    Pruned weights are exactly zero in ``new_w`` (dtype of ``w``).
    """
    sparsity = _fraction(sparsity, "sparsity")
    _check_update(update)
    xp = op.namespace
    w64 = _vector(op, w, "w")
    scores = saliency(op, w64, method, grad)
    Q = _select(op, scores, sparsity, scope, prunable)
    if update == "exact":  # chunks (if any) go lowest saliency first
        Q = xp.take(Q, xp.argsort(xp.take(scores, Q), stable=True))
    new = _updated(op, w64, Q, update, grad)
    mask = xp.ones(op.shape[0], dtype=xp.bool)
    mask[Q] = False
    new = xp.where(mask, new, 0.0)
    return mask, xp.astype(new, w.dtype if _backend.is_array(w) else xp.float64)


def _updated(op, w, Q, update, grad):
    xp = op.namespace
    d = op.shape[0]
    if update is None or Q.shape[0] == 0:
        return w
    if update == "simultaneous":
        rhs = xp.zeros(d, dtype=xp.float64)
        diag = xp.astype(op.diag(Q), xp.float64)
        if grad is None:
            rhs[Q] = xp.take(w, Q) / diag
        else:
            g = _vector(op, grad, "grad")
            hg = xp.astype(op @ g, xp.float64)
            rhs = xp.asarray(g, copy=True)
            rhs[Q] += (xp.take(w, Q) - xp.take(hg, Q)) / diag
        return w - xp.astype(op @ rhs, xp.float64)
    # exact, chunked for large Q
    out = xp.asarray(w, copy=True)
    for c0 in range(0, Q.shape[0], EXACT_CHUNK):
        q = Q[c0 : c0 + EXACT_CHUNK]
        S = xp.astype(op.submatrix(q), xp.float64)
        a = _spd_solve(xp, S, xp.take(out, q))
        rhs = xp.zeros(d, dtype=xp.float64)
        rhs[q] = a
        out = out - xp.astype(op @ rhs, xp.float64)
        out[Q[: c0 + q.shape[0]]] = 0.0
    return out


def prune_groups(op, w, groups, count: int, *, update="exact"):
    """Remove the ``count`` groups of lowest ``group_saliency``; returns (mask, new_w).
    ``update="exact"`` applies the joint OBS update of all removed weights ("simultaneous" the
    sum of single-weight updates); None masks only. count is an int in [0, len(groups)]."""
    xp = op.namespace
    groups = list(groups)
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an int, not {type(count).__name__}")
    if not 0 <= count <= len(groups):
        raise ValueError(f"count must be in [0, {len(groups)}] (the number of groups), got {count}")
    _check_update(update)
    w64 = _vector(op, w, "w")
    scores = _backend.to_host(group_saliency(op, w64, groups))
    chosen = np.argsort(scores, kind="stable")[:count]
    idx = np.unique(np.concatenate([_backend.to_host(xp.asarray(groups[i])) for i in chosen])) if count else []
    Q = xp.asarray(np.asarray(idx, dtype=np.int64))
    new = _updated(op, w64, Q, update, None)
    mask = xp.ones(op.shape[0], dtype=xp.bool)
    mask[Q] = False
    return mask, xp.astype(xp.where(mask, new, 0.0), w.dtype if _backend.is_array(w) else xp.float64)


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], not {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_update(update) -> None:
    if update not in UPDATES or isinstance(update, bool):
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")


def cubic_schedule(target: float, steps: int) -> list[float]:
    """Sparsity after each of ``steps`` pruning steps: target·(1 − (1 − i/steps)³) (Zhu & Gupta)."""
    return [target * (1.0 - (1.0 - i / steps) ** 3) for i in range(1, steps + 1)]


def prune_in_steps(
    w,
    target: float,
    steps: int,
    gradients,
    damp: float,
    *,
    method="obs",
    update="simultaneous",
    scope="global",
    block_size=None,
    scale=None,
    prunable=None,
):
    """Prune to ``target`` sparsity in ``steps`` steps (``cubic_schedule``), rebuilding the
    inverse before each step from ``gradients(w, mask)`` → (m, d) fresh gradients at the current
    weights (the "recomputation" both papers show helps). Weights pruned earlier stay zero.
    Returns (mask, new_w). Cost per step: one StaticInverse build plus one ``prune``."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, not {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target = _fraction(target, "target")
    _check_update(update)
    w = _checks.as_array(w, "w")
    xp = _backend.namespace(w)
    mask = xp.ones(w.shape[0], dtype=xp.bool)
    w = xp.asarray(w, copy=True)
    for sparsity in cubic_schedule(target, steps):
        G = gradients(w, mask)
        op = StaticInverse(G, damp, scale=scale, block_size=block_size)
        # weights pruned earlier are zero, score 0 and are selected again (so stay zero)
        m_new, w_new = prune(
            op, xp.where(mask, w, 0.0), sparsity, method=method, update=update, scope=scope, prunable=prunable
        )
        mask = mask & m_new
        w = xp.where(mask, w_new, 0.0)
    return mask, w
