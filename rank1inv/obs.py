"""Optimal-Brain-Surgeon pruning on top of any StaticInverse (WoodFisher §4–6, M-FAC §4.1).

Every function takes an operator ``op`` for F⁻¹ (full or block-diagonal, NumPy or CuPy) and a
flat weight vector ``w`` of length d on the same backend. Costs are stated per call; k is the
number of weights pruned.
"""

from __future__ import annotations

import itertools
import numbers

import numpy as np

from . import _backend, _checks, _passes
from ._operator import InverseOperator
from .static import StaticInverse

__all__ = [
    "saliency",
    "group_saliency",
    "relative_damp",
    "prune",
    "prune_nm",
    "prune_groups",
    "cubic_schedule",
    "prune_in_steps",
]

METHODS = ("obs", "obd", "magnitude")
UPDATES = ("simultaneous", "exact", None)
EXACT_CHUNK = 2048


def _operator(op):
    """``op`` itself if it is an operator for F⁻¹ of this package, else TypeError."""
    if not isinstance(op, InverseOperator):
        raise TypeError(f"op must be a rank1inv operator for F⁻¹ (StaticInverse, DynamicInverse), not "
                        f"{type(op).__module__}.{type(op).__name__}")  # fmt: skip
    return op


def _vector(op, x, name):
    _operator(op)
    if op.communicator is not None:  # rank1inv.sharded: indices here are local
        raise TypeError("OBS pruning works on one process's operator, not on one sharded along d")
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
    _operator(op)
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
    _operator(op)
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


def _select(op, scores, sparsity, scope: str, prunable=None):
    """Indices of the lowest scores: the given fraction of the prunable weights, overall or in
    each block (one fraction, or one per block of the operator's layout). Weights outside
    ``prunable`` (a boolean (d,) array) are never selected."""
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
        if isinstance(sparsity, list):
            raise ValueError("one sparsity per block needs scope='block'")
        k = int(round(sparsity * int(xp.sum(prunable))))
        order = xp.argsort(scores, stable=True)
        return xp.sort(order[:k])
    if scope != "block":
        raise ValueError(f"scope must be 'global' or 'block', got {scope!r}")
    sizes = op.block_sizes
    fractions = sparsity if isinstance(sparsity, list) else [sparsity] * len(sizes)
    if len(fractions) != len(sizes):
        raise ValueError(f"got {len(fractions)} sparsities for {len(sizes)} blocks")
    parts, a = [], 0
    for size, frac in zip(sizes, fractions):
        k = int(round(frac * int(xp.sum(prunable[a : a + size]))))
        order = xp.argsort(scores[a : a + size], stable=True)
        parts.append(order[:k] + a)
        a += size
    return xp.sort(xp.concat(parts))


def relative_damp(G, factor: float) -> float:
    """λ = factor · mean diag(GᵀG/m) for gradients G (m, d): a damping on the scale of the
    gradients (the experiments use factor 1e-2). O(dm), one pass over G."""
    G = _checks.as_array(G, "G")
    xp = _backend.namespace(G)
    m, d = G.shape
    col = _passes.column_sumsq(xp, G[None, ...])
    value = float(factor) * float(xp.sum(col)) / (m * d)
    if not value > 0:
        raise ValueError("relative damping of all-zero gradients is zero; pass an absolute damp")
    return value


def prune(
    op, w, sparsity: float, *, method: str = "obs", update="simultaneous", scope: str = "global", grad=None,
    prunable=None,
):  # fmt: skip
    """Prune a fraction ``sparsity`` of the weights: returns (mask, new_w), mask True = kept.

    The lowest-``saliency`` weights are removed, globally or per block of ``op``'s layout
    (``scope="block"``; then ``sparsity`` may also be one fraction per block, e.g. per-layer
    targets), among ``prunable`` ones if given (a boolean (d,) mask, e.g. excluding
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
    _operator(op)
    sparsity = [_fraction(v, "sparsity") for v in sparsity] if isinstance(sparsity, (list, tuple)) else (
        _fraction(sparsity, "sparsity"))  # fmt: skip
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


def prune_nm(op, w, n: int = 2, m: int = 4, *, segments=None, update="default", method="obs"):
    """N:M semi-structured pruning: in every group of ``m`` consecutive weights keep ``n`` (2:4 and
    4:8 are the layouts sparse tensor cores use, along a weight matrix's input dimension).
    Returns (mask, new_w), mask True = kept, exactly n True in every group.

    ``segments`` lists the (start, stop) ranges of the flat vector to prune (e.g. each weight
    matrix flattened row-major, input dimension last; each length a multiple of m); default the
    whole vector. In each group the pruned set Q (m − n weights) is the one of least OBS
    loss ρ_Q = ½ w_Qᵀ([F⁻¹]_QQ)⁻¹w_Q among all C(m, m − n) choices, from the group's m×m block
    of F⁻¹ (``entries``: O(m²·m_grad) per group). ``update="exact"``: each group's exact joint
    OBS update δw = −F⁻¹E_Q([F⁻¹]_QQ)⁻¹w_Q (the constrained minimum for that group), summed over
    the groups into one IHVP (groups are then combined as in the "simultaneous" update); None
    masks only; the default is "exact" for ``method="obs"`` and None for ``method="magnitude"``,
    which keeps the n largest |w| of each group instead (the usual baseline; with
    ``update="exact"`` the kept weights then get the same exact OBS update for that mask).
    Segment bounds are ints. Cost O(dm_grad·m) for the blocks plus one IHVP."""
    _operator(op)
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m for N:M sparsity, got n={n}, m={m}")
    if method not in ("obs", "magnitude"):
        raise ValueError(f"method must be 'obs' or 'magnitude', got {method!r}")
    if isinstance(update, str) and update == "default":
        update = "exact" if method == "obs" else None
    if update not in ("exact", None) or isinstance(update, bool):
        raise ValueError(f"update must be 'exact' or None, got {update!r}")
    xp = op.namespace
    d = op.shape[0]
    w64 = _vector(op, w, "w")
    segments = [(0, d)] if segments is None else [_segment(v) for v in segments]
    starts = []
    for a, b in segments:
        if not 0 <= a < b <= d or (b - a) % m:
            raise ValueError(f"segment ({a}, {b}) must lie in [0, {d}] with a length that is a multiple of {m}")
        starts.append(np.arange(a, b, m))
    first = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)  # (groups,)
    k = m - n
    if first.size == 0:
        return xp.ones(d, dtype=xp.bool), xp.astype(w64, w.dtype if _backend.is_array(w) else xp.float64)
    idx = first[:, None] + np.arange(m)[None, :]  # (groups, m)
    wg = _backend.to_host(w64)[idx]  # (groups, m)
    S = np.zeros((0, m, m))  # the groups' m×m blocks of F⁻¹, read only for "obs" or "exact"
    if method == "obs" or update == "exact":
        rows = np.repeat(idx, m, axis=1).reshape(-1)
        cols = np.tile(idx, (1, m)).reshape(-1)
        S = _backend.to_host(op.entries(xp.asarray(rows), xp.asarray(cols))).astype(np.float64).reshape(-1, m, m)
    if method == "magnitude":
        Q = np.sort(np.argsort(np.abs(wg), axis=1, kind="stable")[:, :k], axis=1)  # (groups, k) local positions
    else:
        subsets = np.array(list(itertools.combinations(range(m), k)))  # (c, k)
        best_rho = np.full(first.size, np.inf)
        best = np.zeros(first.size, dtype=np.int64)
        for c, Qc in enumerate(subsets):
            SQ = S[:, Qc[:, None], Qc[None, :]]  # (groups, k, k)
            wQ = wg[:, Qc]
            rho = 0.5 * np.einsum("gi,gi->g", wQ, np.linalg.solve(SQ, wQ[..., None])[..., 0])
            better = rho < best_rho
            best_rho, best = np.where(better, rho, best_rho), np.where(better, c, best)
        Q = subsets[best]  # (groups, k) local positions
    pruned = np.take_along_axis(idx, Q, axis=1)  # (groups, k) global indices
    new = w64
    if update == "exact":
        SQ = np.take_along_axis(np.take_along_axis(S, Q[:, :, None], axis=1), Q[:, None, :], axis=2)
        a = np.linalg.solve(SQ, np.take_along_axis(wg, Q, axis=1)[..., None])[..., 0]
        rhs = np.zeros(d)
        rhs[pruned.reshape(-1)] = a.reshape(-1)
        new = w64 - xp.astype(op @ xp.asarray(rhs), xp.float64)
    mask = np.ones(d, dtype=bool)
    mask[pruned.reshape(-1)] = False
    mask = xp.asarray(mask)
    new = xp.where(mask, new, 0.0)
    return mask, xp.astype(new, w.dtype if _backend.is_array(w) else xp.float64)


def prune_groups(op, w, groups, count: int, *, update="exact"):
    """Remove the ``count`` groups of lowest ``group_saliency``; returns (mask, new_w).
    ``update="exact"`` applies the joint OBS update of all removed weights ("simultaneous" the
    sum of single-weight updates); None masks only. count is an int in [0, len(groups)]."""
    _operator(op)
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


def _segment(value) -> tuple[int, int]:
    """A (start, stop) pair of ints (TypeError for anything else: a float bound would truncate)."""
    try:
        a, b = value
    except (TypeError, ValueError) as err:
        raise TypeError(f"segments must be (start, stop) pairs, got {value!r}") from err
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"segment bounds must be ints, got {value!r}")
    return int(a), int(b)


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
    weights, or a ``BlockAccumulator`` of them (any G that StaticInverse takes; the
    "recomputation" both papers show helps). Weights pruned earlier stay zero.
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
