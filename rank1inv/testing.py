"""Test families and accuracy metrics (docs/design.md §8), for property-testing against dense inverses.

Everything here is NumPy and float64 on the reference side; it is small-d tooling, not part of
the fast path.
"""

from __future__ import annotations

import numpy as np

FAMILIES = ("iid", "collinear", "lowrank", "clusters", "duplicate", "zero_rows", "huge_row")


def gradients(family: str, m: int, d: int, *, scale: float = 1.0, seed: int = 0, dtype="float32") -> np.ndarray:
    """m gradients of length d from a named family, deterministic in ``seed``; shape (m, d).

    iid: N(0, 1). collinear: one shared direction times N(0, 1) + 1e-2 noise. lowrank: rank 8
    (unit-variance entries) + 1e-3 noise. duplicate: iid with every other row a copy of the one
    before. clusters: 4 directions, each row one of them + 1e-3 noise (near-duplicates).
    zero_rows: iid with a third of the rows zero. huge_row: iid with row 0 times 1e4.
    Everything is multiplied by ``scale``.
    """
    rng = np.random.default_rng(seed)
    if family == "iid":
        G = rng.standard_normal((m, d))
    elif family == "collinear":
        G = np.outer(rng.standard_normal(m), rng.standard_normal(d)) + 1e-2 * rng.standard_normal((m, d))
    elif family == "lowrank":
        r = 8
        G = rng.standard_normal((m, r)) @ rng.standard_normal((r, d)) / np.sqrt(r)
        G += 1e-3 * rng.standard_normal((m, d))
    elif family == "clusters":
        G = rng.standard_normal((4, d))[np.arange(m) % 4] + 1e-3 * rng.standard_normal((m, d))
    elif family == "duplicate":
        G = rng.standard_normal((m, d))
        G[1::2] = G[0 : m - 1 : 2][: G[1::2].shape[0]]
    elif family == "zero_rows":
        G = rng.standard_normal((m, d))
        G[::3] = 0.0
    elif family == "huge_row":
        G = rng.standard_normal((m, d))
        G[0] *= 1e4
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    return np.ascontiguousarray(scale * G, dtype=dtype)


def dense_fisher(G, damp: float, scale: float | None = None, block_sizes=None) -> np.ndarray:
    """F = λI + s·GᵀG in float64 (block-diagonal for ``block_sizes``); s defaults to 1/m."""
    G = np.asarray(G, dtype=np.float64)
    m, d = G.shape
    s = 1.0 / m if scale is None else scale
    sizes = [d] if block_sizes is None else list(block_sizes)
    F = np.zeros((d, d))
    a = 0
    for b in sizes:
        Gb = G[:, a : a + b]
        F[a : a + b, a : a + b] = damp * np.eye(b) + s * (Gb.T @ Gb)
        a += b
    return F


def backward_error(F, y, x) -> float:
    """η = ‖F y − x‖ / (‖F‖₂ ‖y‖ + ‖x‖) for vectors or matrices of right-hand sides (max over columns)."""
    F = np.asarray(F, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(F.shape[0], -1)
    x = np.asarray(x, dtype=np.float64).reshape(F.shape[0], -1)
    nF = np.linalg.norm(F, 2)
    r = np.linalg.norm(F @ y - x, axis=0)
    den = nF * np.linalg.norm(y, axis=0) + np.linalg.norm(x, axis=0)
    eta = np.where(den > 0, r / np.where(den > 0, den, 1.0), np.where(r > 0, np.inf, 0.0))
    return float(np.max(eta)) if eta.size else 0.0


def relative_error(a, ref) -> float:
    """max |a − ref| / |ref| elementwise (ref must be non-zero, e.g. a diagonal of F⁻¹)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(a - ref) / np.abs(ref))) if ref.size else 0.0


def entry_error(values, Finv, rows, cols) -> float:
    """max |F⁻¹_ij − ref| / sqrt(F⁻¹_ii F⁻¹_jj): relative error on the entries' natural scale."""
    values = np.asarray(values, dtype=np.float64)
    d = np.diag(Finv)
    ref = Finv[rows, cols]
    return float(np.max(np.abs(values - ref) / np.sqrt(d[rows] * d[cols]))) if ref.size else 0.0
