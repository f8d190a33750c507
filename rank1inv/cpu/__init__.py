"""Optional compiled CPU kernels: float32 passes with float64 accumulation (``passes_f32.c``).

Built at install time as an optional extension and called through ctypes, which releases the
GIL: large passes are split over a small private pool of worker threads (one per available
core, at most ``MAX_WORKERS``; idle workers block, they never spin). When the extension is
missing, ``rank1inv._passes`` converts cache-sized tiles of G to float64 instead: the same
results, slower. ``available()`` says which path runs.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MAX_WORKERS = 8
# Up to this many right-hand sides rank1inv._passes calls these single-vector kernels once per
# column (k passes over G) rather than converting tiles to float64: measured faster up to
# k ≈ 8-16 (m = 256, d = 1e5: k = 4 in 31 ms against 94 ms).
COLUMNS = 8
PARALLEL_MIN = 1 << 20  # elements of G below which one thread does the pass

try:
    from . import _passes_f32 as _ext
except ImportError:  # not built (no compiler at install time)
    _ext = None

_lib = None
if _ext is not None:
    _lib = ctypes.CDLL(_ext.__file__)
    _i64, _p, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    _lib.rank1inv_project_f32.argtypes = [_p, _i64, _i64, _i64, _p, _p]
    _lib.rank1inv_combine_f32.argtypes = [_p, _i64, _i64, _i64, _p, _p, _f64, _f64, _p]
    _lib.rank1inv_project_blocks_f32.argtypes = [_p, _i64, _i64, _i64, _i64, _i64, _p, _p]
    _lib.rank1inv_combine_blocks_f32.argtypes = [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _f64, _f64, _p]
    for _f in ("project_f32", "combine_f32", "project_blocks_f32", "combine_blocks_f32"):
        getattr(_lib, "rank1inv_" + _f).restype = None


def available() -> bool:
    return _lib is not None


def usable(Gg, k: int) -> bool:
    """A group Gg (nb, m, B) of float32 rows with unit column stride, one right-hand side."""
    return (
        _lib is not None
        and k == 1
        and Gg.dtype == np.float32
        and Gg.ndim == 3
        and Gg.strides[2] == 4
        and all(s % 4 == 0 and s >= 0 for s in Gg.strides[:2])
    )


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


_pool = None
_pool_lock = threading.Lock()


def _forget_pool():
    """In a forked child the parent's worker threads do not exist: start a new pool on demand."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _map(fn, parts):
    """Run fn over parts on the private pool (created on first use)."""
    global _pool
    if len(parts) == 1:
        fn(parts[0])
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="rank1inv")
    for f in [_pool.submit(fn, p) for p in parts]:
        f.result()


def _split(n: int, size: int, align: int = 1):
    k = _workers() if size >= PARALLEL_MIN else 1
    step = -(-n // k)
    step = -(-step // align) * align
    return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]


def _geometry(Gg):
    """(nb, m, B, block stride, row stride, address) of a float32 group; strides in elements."""
    return (*Gg.shape, Gg.strides[0] // 4, Gg.strides[1] // 4, Gg.ctypes.data)


def project(Gg, X):
    """Gg·X per block for float32 Gg (nb, m, B) and float64 X (nb, B, 1) → (nb, m, 1) float64.
    One block: rows split over workers; several: blocks split over workers."""
    nb, m, d, sb, ld, G0 = _geometry(Gg)
    x = np.ascontiguousarray(X[..., 0], dtype=np.float64)
    p = np.empty((nb, m))

    def rows(part):
        a, b = part
        if b > a:
            _lib.rank1inv_project_f32(G0 + 4 * a * ld, b - a, d, ld, x.ctypes.data, p.ctypes.data + 8 * a)

    def blocks(part):
        a, b = part
        if b > a:
            _lib.rank1inv_project_blocks_f32(
                G0 + 4 * a * sb, b - a, sb, m, d, ld, x.ctypes.data + 8 * a * d, p.ctypes.data + 8 * a * m
            )

    if nb == 1:
        _map(rows, _split(m, m * d))
    else:
        _map(blocks, _split(nb, nb * m * d))
    return p[..., None]


def combine(Gg, X, C, alpha: float, beta: float):
    """α·X + β·GgᵀC per block for float32 Gg (nb, m, B), X (nb, B, 1) float64 or None, C (nb, m, 1)
    → (nb, B, 1) float64. One block: columns split over workers; several: blocks."""
    nb, m, d, sb, ld, G0 = _geometry(Gg)
    c = np.ascontiguousarray(C[..., 0], dtype=np.float64)
    x = None if X is None else np.ascontiguousarray(X[..., 0], dtype=np.float64)
    y = np.empty((nb, d))

    def cols(part):
        a, b = part
        if b > a:
            xa = None if x is None else x.ctypes.data + 8 * a
            _lib.rank1inv_combine_f32(G0 + 4 * a, m, b - a, ld, c.ctypes.data, xa, alpha, beta, y.ctypes.data + 8 * a)

    def blocks(part):
        a, b = part
        if b > a:
            xa = None if x is None else x.ctypes.data + 8 * a * d
            _lib.rank1inv_combine_blocks_f32(
                G0 + 4 * a * sb,
                b - a,
                sb,
                m,
                d,
                ld,
                c.ctypes.data + 8 * a * m,
                xa,
                alpha,
                beta,
                y.ctypes.data + 8 * a * d,
            )

    if nb == 1:
        _map(cols, _split(d, m * d, align=8192))
    else:
        _map(blocks, _split(nb, nb * m * d))
    return y[..., None]
