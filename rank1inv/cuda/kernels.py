"""CuPy launchers for the RawKernels in this folder. Imported only for CuPy data.

Modules are compiled lazily by NVRTC (``cupy.RawModule``) on first use and cached per
process; CuPy caches the binaries on disk. Kernels run on the current device and stream.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cupy  # noqa: TID253 (CuPy's own module)
import numpy as np

from .. import _precision
from .mirrors import (
    COMBINE_PER_THREAD,
    COMBINE_THREADS,
    DROP_PER_THREAD,
    DROP_THREADS,
    PROJECT_CHUNK,
    PROJECT_THREADS,
    TILE,
)

_HERE = Path(__file__).parent
_NAMES = {
    "mfac_b.cu": [f"mfac_b_{k}<{t}>" for k in ("diagonal", "sweep", "columns") for t in ("float", "double")],
    "passes.cu": [f"{k}<{e}>" for k in ("project", "combine") for e in ("F32", "BF16", "F16")] + ["reduce_parts"],
}
# the passes' element type per storage dtype (the precision policy's cuda_pass)
_ELEMENT = {"f32": "F32", "bf16": "BF16", "f16": "F16"}
# Up to this many tile rows B uses the column schedule (2 launches); beyond, the sweeps (nt
# launches, more blocks in flight). Chosen without a GPU at hand: to be set from
# `python -m benchmarks --device gpu`, which times both.
COLUMN_SCHEDULE_MAX_TILES = 64


@cache
def _module(name: str, device_id: int):
    source = (_HERE / name).read_text()
    return cupy.RawModule(code=source, options=("-std=c++14",), name_expressions=_NAMES.get(name))


def _function(module: str, kernel: str):
    return _module(module, cupy.cuda.Device().id).get_function(kernel)


def _template_type(dtype):
    """(C++ type name, NumPy scalar type) for a float32/float64 template instantiation."""
    return {np.dtype(np.float32): ("float", np.float32), np.dtype(np.float64): ("double", np.float64)}[np.dtype(dtype)]


def _element(Gg) -> str | None:
    """The passes' element type for a group's storage (uint16 arrays hold bfloat16 bits)."""
    try:
        name = _precision.of_array(Gg, cupy=True).cuda_pass
    except TypeError:
        return None
    return None if name is None else _ELEMENT.get(name)


def usable(Gg, k: int) -> bool:
    """Whether the pass kernels serve the group Gg (nb, m, B) with k right-hand sides: one
    contiguous block of float32, float16 or bfloat16 (bit patterns) storage, one right-hand
    side."""
    return (
        Gg.ndim == 3
        and Gg.shape[0] == 1
        and _element(Gg) is not None
        and Gg[0].flags.c_contiguous
        and k == 1
        and Gg.shape[1] < 2**31
    )


def project(Gg, X):
    """G·X for Gg (1, m, d) (float32 or 16-bit) and float64 X (1, d, 1), float64 accumulation →
    (1, m, 1)."""
    G = Gg[0]
    m, d = G.shape
    x = cupy.ascontiguousarray(X[0, :, 0], dtype=cupy.float64)
    chunks = -(-d // PROJECT_CHUNK)
    part = cupy.empty((chunks, m), dtype=cupy.float64)
    kernel = _function("passes.cu", f"project<{_element(Gg)}>")
    kernel((chunks,), (PROJECT_THREADS,), (G, x, part, np.int32(m), np.int64(d)))
    p = cupy.empty((m,), dtype=cupy.float64)
    _function("passes.cu", "reduce_parts")((-(-m // 256),), (256,), (part, p, np.int32(m), np.int32(chunks)))
    return p[None, :, None]


def combine(Gg, X, C, alpha: float, beta: float, out=None):
    """α·X + β·GᵀC for Gg (1, m, d) (float32 or 16-bit), X (1, d, 1) float64 or None, C (1, m, 1)
    → (1, d, 1)."""
    G = Gg[0]
    m, d = G.shape
    x = cupy.zeros((1,), dtype=cupy.float64) if X is None else cupy.ascontiguousarray(X[0, :, 0], dtype=cupy.float64)
    c = cupy.ascontiguousarray(C[0, :, 0], dtype=cupy.float64)
    # ``out`` (1, d, 1), possibly X itself: each thread reads x[j] before it writes y[j]
    y = out[0, :, 0] if (out is not None and out[0, :, 0].flags.c_contiguous) else cupy.empty((d,), dtype=cupy.float64)
    per_block = COMBINE_THREADS * COMBINE_PER_THREAD
    _function("passes.cu", f"combine<{_element(Gg)}>")(
        (-(-d // per_block),),
        (COMBINE_THREADS,),
        (G, x, np.int32(X is not None), c, np.float64(alpha), np.float64(beta), y, np.int32(m), np.int64(d)),
    )
    return y[None, :, None]


def mfac_b(D, n: float, damp: float, schedule: str | None = None):
    """B = λ⁻¹L̃⁻¹ from D (m, m) by the tiled kernels. ``schedule``: "sweeps", "columns" or None
    (by size, see ``COLUMN_SCHEDULE_MAX_TILES``); both give the same floating-point operations."""
    m = D.shape[0]
    dtype = D.dtype
    ctype, scalar = _template_type(dtype)
    D = cupy.ascontiguousarray(D)
    nt = -(-m // TILE)
    if schedule is None:
        schedule = "columns" if nt <= COLUMN_SCHEDULE_MAX_TILES else "sweeps"
    if schedule not in ("sweeps", "columns"):
        raise ValueError(f"schedule must be 'sweeps' or 'columns', got {schedule!r}")
    B = cupy.zeros((m, m), dtype=dtype)
    mod = _module("mfac_b.cu", cupy.cuda.Device().id)
    diag = mod.get_function(f"mfac_b_diagonal<{ctype}>")
    diag((nt,), (TILE, TILE), (D, B, np.int32(m), scalar(n), scalar(damp)))
    if schedule == "columns":
        columns = mod.get_function(f"mfac_b_columns<{ctype}>")
        columns((nt,), (TILE, TILE), (D, B, np.int32(m), scalar(n), scalar(damp), np.int32(nt)))
        return B
    sweep = mod.get_function(f"mfac_b_sweep<{ctype}>")
    for t in range(1, nt):
        sweep((nt - t, nt - t), (TILE, TILE), (D, B, np.int32(m), scalar(n), scalar(damp), np.int32(t), np.int32(nt)))
    return B


def chol_drop_usable(R, n: int) -> bool:
    """A C-contiguous float64 square factor (``rank1inv.groups.window``)."""
    return R.dtype == cupy.float64 and R.ndim == 2 and R.flags.c_contiguous


def chol_drop(src, dst, n: int, k: int) -> None:
    """dst ← src without row/column k of its leading n×n factor (``cholesky_update.cu``, one
    thread block); dst may be src for rows of up to DROP_THREADS·DROP_PER_THREAD columns."""
    if src.data.ptr == dst.data.ptr and n - 1 > DROP_THREADS * DROP_PER_THREAD:
        raise ValueError(f"in-place chol_drop supports n ≤ {DROP_THREADS * DROP_PER_THREAD + 1}")
    x = cupy.empty((max(n, 1),), dtype=cupy.float64)
    _function("cholesky_update.cu", "chol_drop")(
        (1,), (DROP_THREADS,), (src, dst, np.int64(src.shape[1]), np.int32(n), np.int32(k), x)
    )


chol_drop_solve = None  # the fused drop-and-solve is a CPU loop; on GPU cuBLAS solves after the drop
solve_upper = None  # level-2 triangular solves are cuBLAS calls on GPU
