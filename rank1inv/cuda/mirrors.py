"""NumPy mirrors of the CUDA kernels' schedules, so the schedules are tested on CPU.

The blocked B kernel (``mfac_b.cu``) is mirrored by ``rank1inv._coef.b_blocked``.
"""

from __future__ import annotations

import numpy as np

PROJECT_THREADS = 256
PROJECT_PER_THREAD = 8
PROJECT_CHUNK = PROJECT_THREADS * PROJECT_PER_THREAD
COMBINE_THREADS = 256


def project_f32(G, x):
    """p = G·x as ``project_f32`` + ``reduce_parts`` compute it: one float64 partial sum per
    (chunk of 2048 columns, row), then the partials summed in chunk order. G (m, d) float32,
    x (d,) float64 → (m,) float64."""
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


def combine_f32(G, x, c, alpha: float, beta: float):
    """y = α·x + β·Gᵀc as ``combine_f32`` computes it: every column summed over the rows in
    order, in float64, staged 256 rows at a time. x may be None."""
    G = np.asarray(G)
    c = np.asarray(c, dtype=np.float64)
    m, d = G.shape
    acc = np.zeros(d)
    for r0 in range(0, m, COMBINE_THREADS):
        for r in range(r0, min(m, r0 + COMBINE_THREADS)):
            acc += c[r] * G[r].astype(np.float64)
    return beta * acc if x is None else alpha * np.asarray(x, dtype=np.float64) + beta * acc
