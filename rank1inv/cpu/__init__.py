"""Optional compiled CPU kernels: float32 passes with float64 accumulation (``passes.c``) and
a sliding window's m×m level-2 work (``window.c``: removing a row and column of a Cholesky
factor, triangular solves), single-threaded and BLAS-free.

Built at install time as an optional extension and called through ctypes, which releases the
GIL: large passes are split into one part per available core (at most ``MAX_WORKERS``); the
calling thread runs the first part and a small private pool of worker threads the others
(idle workers block, they never spin). When the extension is
missing, ``rank1inv._passes`` converts cache-sized tiles of G to float64 instead and
``rank1inv.groups.window`` updates the factor row by row in NumPy: the same results, slower.
``available()`` says which path runs.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import _precision

MAX_WORKERS = 8
MAX_COLUMNS = 8  # right-hand sides per pass (MULTI in passes.c); more: rank1inv._passes' tiles
PARALLEL_MIN = 1 << 20  # elements of G below which one thread does the pass

try:
    from . import _kernels as _ext  # type: ignore[attr-defined]  # the compiled extension
except ImportError:  # not built (no compiler at install time)
    _ext = None


def _load(path: str) -> ctypes.CDLL:
    """The extension with every function's argument types declared."""
    lib = ctypes.CDLL(path)
    _i64, _p, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    signatures = {
        "project": [_p, _i64, _i64, _i64, _p, _p],
        "combine": [_p, _i64, _i64, _i64, _p, _p, _f64, _f64, _p],
        "project_blocks": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p],
        "combine_blocks": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _f64, _f64, _p],
        "project_multi": [_p, _i64, _i64, _i64, _p, _i64, _i64, _p, _i64],
        "combine_multi": [_p, _i64, _i64, _i64, _p, _i64, _p, _i64, _i64, _f64, _f64, _p, _i64],
    }
    for element in ("f32", "bf16", "f16"):
        for name, args in signatures.items():
            fn = getattr(lib, f"rank1inv_{name}_{element}")
            fn.argtypes, fn.restype = args, None
    lib.rank1inv_chol_drop.argtypes = [_p, _p, _i64, _i64, _i64, _p]
    lib.rank1inv_chol_drop_solve.argtypes = [_p, _p, _i64, _i64, _i64, _p, _p]
    lib.rank1inv_solve_ut.argtypes = [_p, _i64, _i64, _p]
    lib.rank1inv_solve_u.argtypes = [_p, _i64, _i64, _p]
    for name in ("chol_drop", "chol_drop_solve", "solve_ut", "solve_u"):
        getattr(lib, f"rank1inv_{name}").restype = None
    return lib


_lib: Any = None if _ext is None else _load(_ext.__file__)  # a ctypes.CDLL; every caller checks available()


def available() -> bool:
    return _lib is not None


def _suffix(Gg) -> str | None:
    """The kernels' element type for a group's storage dtype (the precision policy's cpu_pass)."""
    name = _precision.name_of(Gg.dtype)
    return None if name is None else _precision.POLICIES[name].cpu_pass


def usable(Gg, k: int) -> bool:
    """A group Gg (nb, m, B) of float32, bfloat16 or float16 rows with unit column stride, 1 to
    MAX_COLUMNS right-hand sides."""
    if _lib is None or not 1 <= k <= MAX_COLUMNS or Gg.ndim != 3 or _suffix(Gg) is None:
        return False
    es = Gg.itemsize
    return Gg.strides[2] == es and all(s % es == 0 and s >= 0 for s in Gg.strides[:2])


def _fn(name: str, Gg):
    return getattr(_lib, f"rank1inv_{name}_{_suffix(Gg)}")


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
    futures = [_pool.submit(fn, p) for p in parts[1:]]
    try:
        fn(parts[0])  # the calling thread takes the first part (one hand-off fewer)
    finally:
        for f in futures:
            f.result()


def _split(n: int, size: int, align: int = 1):
    k = _workers() if size >= PARALLEL_MIN else 1
    step = -(-n // k)
    step = -(-step // align) * align
    return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]


def _geometry(Gg):
    """(nb, m, B, block stride, row stride, address) of a group; strides in elements."""
    es = Gg.itemsize
    return (*Gg.shape, Gg.strides[0] // es, Gg.strides[1] // es, Gg.ctypes.data)


def project(Gg, X):
    """Gg·X per block for Gg (nb, m, B) (float32 or 16-bit) and float64 X (nb, B, k) → (nb, m, k)
    float64.
    One block: rows split over workers (all k vectors in one pass over G); several blocks:
    blocks split over workers, one pass per vector."""
    nb, m, d, sb, ld, G0 = _geometry(Gg)
    es = Gg.itemsize
    k = X.shape[-1]
    if k > 1 and nb > 1:
        return np.concatenate([project(Gg, X[..., q : q + 1]) for q in range(k)], axis=-1)
    x = np.ascontiguousarray(np.moveaxis(X, -1, 1), dtype=np.float64)  # (nb, k, B): vector by vector
    p = np.empty((nb, k, m))

    def rows(part):
        a, b = part
        if b > a and k == 1:
            _fn("project", Gg)(G0 + es * a * ld, b - a, d, ld, x.ctypes.data, p.ctypes.data + 8 * a)
        elif b > a:
            _fn("project_multi", Gg)(G0 + es * a * ld, b - a, d, ld, x.ctypes.data, d, k, p.ctypes.data + 8 * a, m)

    def blocks(part):
        a, b = part
        if b > a:
            _fn("project_blocks", Gg)(
                G0 + es * a * sb, b - a, sb, m, d, ld, x.ctypes.data + 8 * a * d, p.ctypes.data + 8 * a * m
            )

    if nb == 1:
        _map(rows, _split(m, k * m * d))
    else:
        _map(blocks, _split(nb, nb * m * d))
    return np.moveaxis(p, 1, -1)


def combine(Gg, X, C, alpha: float, beta: float, out=None):
    """α·X + β·GgᵀC per block for Gg (nb, m, B) (float32 or 16-bit), X (nb, B, k) float64 or None, C (nb, m, k)
    → (nb, B, k) float64. One block: columns split over workers (all k vectors in one pass over
    G); several blocks: blocks split over workers, one pass per vector."""
    nb, m, d, sb, ld, G0 = _geometry(Gg)
    es = Gg.itemsize
    k = C.shape[-1]
    if k > 1 and nb > 1:
        per_vector = [(None if X is None else X[..., q : q + 1], C[..., q : q + 1]) for q in range(k)]
        return np.concatenate([combine(Gg, x, c, alpha, beta) for x, c in per_vector], axis=-1)
    c = np.ascontiguousarray(np.moveaxis(C, -1, 1), dtype=np.float64)  # (nb, k, m)
    x = None if X is None else np.ascontiguousarray(np.moveaxis(X, -1, 1), dtype=np.float64)  # (nb, k, B)
    # ``out`` (nb, B, k), possibly X itself: used as the kernel's (nb, k, B) output where the two
    # layouts are the same memory (k = 1, contiguous); the kernel reads x[j] before writing y[j]
    y = np.moveaxis(out, -1, 1) if (out is not None and k == 1 and out.flags.c_contiguous) else np.empty((nb, k, d))

    def cols(part):
        a, b = part
        if b <= a:
            return
        xa = None if x is None else x.ctypes.data + 8 * a
        if k == 1:
            _fn("combine", Gg)(G0 + es * a, m, b - a, ld, c.ctypes.data, xa, alpha, beta, y.ctypes.data + 8 * a)
        else:
            _fn("combine_multi", Gg)(
                G0 + es * a, m, b - a, ld, c.ctypes.data, m, xa, d, k, alpha, beta, y.ctypes.data + 8 * a, d
            )

    def blocks(part):
        a, b = part
        if b > a:
            xa = None if x is None else x.ctypes.data + 8 * a * d
            ca, ya = c.ctypes.data + 8 * a * m, y.ctypes.data + 8 * a * d
            _fn("combine_blocks", Gg)(G0 + es * a * sb, b - a, sb, m, d, ld, ca, xa, alpha, beta, ya)

    if nb == 1:
        _map(cols, _split(d, k * m * d, align=64))
    else:
        _map(blocks, _split(nb, nb * m * d))
    return np.moveaxis(y, 1, -1)


# ------------------------------------------------------------------------------ factor update
def chol_drop_usable(R, n: int) -> bool:
    """A C-contiguous float64 square factor (``rank1inv.groups.window``)."""
    return _lib is not None and R.dtype == np.float64 and R.flags.c_contiguous and R.ndim == 2


def _drop_arrays(src, dst, n: int):
    if not (chol_drop_usable(src, n) and chol_drop_usable(dst, n) and src.shape == dst.shape):
        raise ValueError("chol_drop needs C-contiguous float64 square arrays of one shape")
    return np.empty(max(n, 1))


def chol_drop(src, dst, n: int, k: int) -> None:
    """dst ← src without row/column k of its leading n×n factor (``window.c``); dst may be src.
    Single-threaded: O(n²) streaming work, no BLAS."""
    x = _drop_arrays(src, dst, n)
    _lib.rank1inv_chol_drop(src.ctypes.data, dst.ctypes.data, src.shape[1], n, k, x.ctypes.data)


def chol_drop_solve(src, dst, n: int, k: int, rhs):
    """``chol_drop``, and R̃⁻ᵀ·rhs (rhs: n−1 float64 values; a new array) for the new factor R̃,
    computed in the same sweep: bitwise ``chol_drop`` then ``solve_upper(trans=True)``."""
    x = _drop_arrays(src, dst, n)
    b = np.array(rhs, dtype=np.float64, order="C", copy=True).reshape(-1)
    if b.shape[0] != n - 1:
        raise ValueError(f"rhs must have n - 1 = {n - 1} entries, got {b.shape[0]}")
    _lib.rank1inv_chol_drop_solve(src.ctypes.data, dst.ctypes.data, src.shape[1], n, k, x.ctypes.data, b.ctypes.data)
    return b


def solve_upper(R, B, n: int, trans: bool) -> None:
    """B[:n] ← R⁻ᵀB[:n] (``trans``) or R⁻¹B[:n], in place, for the leading n×n block of an upper
    factor R and B (cap, k) float64; column by column (``window.c``)."""
    if not chol_drop_usable(R, n) or B.dtype != np.float64:
        raise ValueError("solve_upper needs C-contiguous float64 arrays")
    fn = _lib.rank1inv_solve_ut if trans else _lib.rank1inv_solve_u
    col = np.empty(max(n, 1))
    for q in range(B.shape[1]):
        col[:n] = B[:n, q]
        fn(R.ctypes.data, R.shape[1], n, col.ctypes.data)
        B[:n, q] = col[:n]


mfac_b = None  # M-FAC's blocked B is a CUDA kernel; on CPU it is a BLAS call (groups/coefficients.py)
