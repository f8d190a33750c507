"""The M-FAC paper's Algorithm 2 on the GPU, for the benchmarks' side-by-side with the paper:
the forward substitution (D + n·I)ᵀq = b in one thread block (``cuda/forward_substitution.cu``)
and its NumPy mirror. The library never uses it (its windows keep a factor instead)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from rank1inv.cuda.mirrors import TILE

SOURCE = Path(__file__).parent / "cuda" / "forward_substitution.cu"
NAMES = [f"mfac_forward_substitution<{t}>" for t in ("float", "double")]


def forward_substitution_mirror(D, n: float, b):
    """q with (D + n·I)ᵀ q = b, as ``forward_substitution.cu`` computes it: tiles of 32 unknowns
    in order, the recurrence of M-FAC eq. 11–12 inside a tile, then one 32-wide update of all
    later residuals."""
    D = np.asarray(D, dtype=np.float64)
    r = np.array(b, dtype=np.float64)
    m = D.shape[0]
    q = np.empty(m)
    for t0 in range(0, m, TILE):
        tn = min(TILE, m - t0)
        for i in range(tn):
            gi = t0 + i
            q[gi] = r[gi] / (n + D[gi, gi])
            r[gi + 1 : t0 + tn] -= D[gi, gi + 1 : t0 + tn] * q[gi]
        r[t0 + tn :] -= q[t0 : t0 + tn] @ D[t0 : t0 + tn, t0 + tn :]
    return q


@cache
def _module(device_id: int):
    import cupy

    return cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++14",), name_expressions=NAMES)


def forward_substitution(D, n: float, b):
    """q with (D + n·I)ᵀ q = b (M-FAC Algorithm 2's recursion) in one thread block, any m (CuPy)."""
    import cupy

    m = D.shape[0]
    ctype, scalar = {np.dtype(np.float32): ("float", np.float32), np.dtype(np.float64): ("double", np.float64)}[
        np.dtype(D.dtype)
    ]
    D = cupy.ascontiguousarray(D)
    b = cupy.ascontiguousarray(b, dtype=D.dtype)
    q = cupy.empty((m,), dtype=D.dtype)
    kern = _module(cupy.cuda.Device().id).get_function(f"mfac_forward_substitution<{ctype}>")
    kern((1,), (1024,), (D, b, q, np.int32(m), scalar(n)))
    return q
