"""NumPy mirrors of the CUDA kernels' schedules, so the schedules are tested on CPU.

The blocked B kernels (``mfac_b.cu``) are mirrored twice: ``rank1inv.groups.coefficients.b_blocked`` (the
schedule, vectorised, with a separate accumulator) and ``mfac_b`` below, a thread-block by
thread-block transcription of the kernels themselves (edge tiles masked; in the sweeps B
doubles as the accumulator). The window's Cholesky update kernel (``cholesky_update.cu``) is
mirrored by ``rank1inv.groups.window.drop_rows_numpy``.
"""

from __future__ import annotations

import numpy as np

# launch constants, as #defined in the .cu files (tests/test_cuda.py reads the #defines)
PROJECT_THREADS = 256
PROJECT_PER_THREAD = 8
PROJECT_CHUNK = PROJECT_THREADS * PROJECT_PER_THREAD
COMBINE_THREADS = 256
COMBINE_PER_THREAD = 4
DROP_THREADS = 1024
DROP_PER_THREAD = 16


def project(G, x):
    """p = G·x as ``project<E>`` + ``reduce_parts`` compute it: one float64 partial sum per
    (chunk of 2048 columns, row), then the partials summed in chunk order. G (m, d) of any
    storage dtype (decoded exactly, as the kernels do), x (d,) float64 → (m,) float64."""
    G = np.asarray(G)
    x = np.asarray(x, dtype=np.float64)
    m, d = G.shape
    chunks = -(-d // PROJECT_CHUNK)
    part = np.zeros((chunks, m))
    for b in range(chunks):
        cols = slice(b * PROJECT_CHUNK, min(d, (b + 1) * PROJECT_CHUNK))
        part[b] = G[:, cols].astype(np.float64) @ x[cols]
    p = np.zeros(m)
    for b in range(chunks):
        p += part[b]
    return p


def combine(G, x, c, alpha: float, beta: float):
    """y = α·x + β·Gᵀc as ``combine<E>`` computes it: every column summed over the rows in
    order, in float64, staged 256 rows at a time. x may be None."""
    G = np.asarray(G)
    c = np.asarray(c, dtype=np.float64)
    m, d = G.shape
    acc = np.zeros(d)
    for r0 in range(0, m, COMBINE_THREADS):
        for r in range(r0, min(m, r0 + COMBINE_THREADS)):
            acc += c[r] * G[r].astype(np.float64)
    return beta * acc if x is None else alpha * np.asarray(x, dtype=np.float64) + beta * acc


TILE = 32


def _ltilde_tile(D, n, i, k):
    """L̃ tile (i, k) as the kernel builds it: D[c, r] / (n + D[c, c]) below the diagonal, 1 on
    it, 0 above and outside the matrix (identity on the padded diagonal)."""
    m = D.shape[0]
    r = np.arange(i * TILE, (i + 1) * TILE)[:, None]
    c = np.arange(k * TILE, (k + 1) * TILE)[None, :]
    inside = (r < m) & (c < m) & (r > c)
    rr, cc = np.minimum(r, m - 1), np.minimum(c, m - 1)
    vals = np.where(inside, D[cc, rr] / (n + D[cc, cc]), 0.0)
    return np.where(r == c, 1.0, vals)


def _tile(B, i, j):
    """Tile (i, j) of B, zero outside the matrix (the kernel's masked loads)."""
    m = B.shape[0]
    out = np.zeros((TILE, TILE))
    r0, c0 = i * TILE, j * TILE
    part = B[r0 : min(m, r0 + TILE), c0 : min(m, c0 + TILE)]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _store(B, i, j, tile):
    m = B.shape[0]
    r0, c0 = i * TILE, j * TILE
    rows, cols = min(m, r0 + TILE) - r0, min(m, c0 + TILE) - c0
    B[r0 : r0 + rows, c0 : c0 + cols] = tile[:rows, :cols]


def mfac_b(D, n: float, damp: float, schedule: str = "sweeps"):
    """B = λ⁻¹L̃⁻¹ exactly as ``mfac_b.cu`` computes it, block by block (float64), with the
    sweeps (``mfac_b_sweep``, B doubling as accumulator) or the columns (``mfac_b_columns``,
    the accumulator in a register)."""
    D = np.asarray(D, dtype=np.float64)
    m = D.shape[0]
    nt = -(-m // TILE)
    B = np.zeros((m, m))
    for t in range(nt):  # mfac_b_diagonal: one block per diagonal tile
        L = _ltilde_tile(D, n, t, t)
        X = np.eye(TILE)
        for r in range(1, TILE):
            X[r, :r] = -(L[r, :r] @ np.tril(X[:r, :r]))
        _store(B, t, t, np.tril(X) / damp)
    if schedule == "columns":
        for j in range(nt):  # mfac_b_columns: block j walks down tile column j
            for i in range(j + 1, nt):
                acc = np.zeros((TILE, TILE))
                for k in range(j, i):
                    acc = acc + _ltilde_tile(D, n, i, k) @ _tile(B, k, j)
                _store(B, i, j, -damp * (_tile(B, i, i) @ acc))
        return B
    for t in range(1, nt):  # mfac_b_sweep(t): blocks (i, j) with i - j >= t
        for j in range(nt - t):
            for i in range(j + t, nt):
                k = j + t - 1
                acc = _tile(B, i, j) + _ltilde_tile(D, n, i, k) @ _tile(B, k, j)
                if i - j == t:
                    acc = -damp * (_tile(B, i, i) @ acc)
                _store(B, i, j, acc)
    return B
