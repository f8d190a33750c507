"""M-FAC's coefficient matrices D and B (M-FAC eq. 8–10, appendix B), all in float64.

With n = 1/s and the Gram matrix GGᵀ of the window (age order):

    M = λ⁻¹GGᵀ + n·I = L̃U          (LU without pivoting; M is SPD)
    D = U − n·I                     (upper triangular, eq. 8–9)
    B = λ⁻¹L̃⁻¹                      (lower triangular, diagonal λ⁻¹, eq. 10)

U and L̃ come from the Cholesky factor C of M: U = diag(C)·Cᵀ and L̃ = C·diag(C)⁻¹. The
sliding window keeps that factor itself, updated in O(m²) per step (``rank1inv.groups.window``), and
derives D and B from it when they are asked for (``DynamicInverse.coefficients``).

B is computed either by a recursive triangular inverse (``b_direct``, the CPU path) or by the
32×32-tile schedule of the GPU kernel (``b_blocked``, its NumPy mirror; appendix B, Figure 3):
all diagonal tiles first, then one sweep per sub-diagonal of tiles.
"""

from __future__ import annotations

from .. import _backend

TILE = 32


def D_from_factor(xp, C, n: float):
    """D = diag(C)·Cᵀ − n·I (upper triangular)."""
    c = xp.linalg.diagonal(C)
    return xp.triu(c[:, None] * xp.matrix_transpose(C)) - n * xp.eye(
        C.shape[0], dtype=xp.float64, device=_backend.device(C)
    )


def unit_lower(xp, D, n: float):
    """L̃ with L̃[i, k] = D[k, i] / (n + D[k, k]) below the diagonal, ones on it."""
    U = D + n * xp.eye(D.shape[0], dtype=xp.float64, device=_backend.device(D))
    return xp.matrix_transpose(U / xp.linalg.diagonal(U)[:, None])


def invert_unit_tiles(xp, tiles):
    """Inverses of a stack of unit lower-triangular tiles (k, T, T) float64, all at once, by the
    row recurrence X[r, :r] = −L[r, :r]·X[:r, :r] (the kernels' diagonal-tile step). O(kT³/3)."""
    T = tiles.shape[-1]
    X = xp.asarray(xp.broadcast_to(xp.eye(T, dtype=xp.float64, device=_backend.device(tiles)), tiles.shape), copy=True)
    for r in range(1, T):
        X[:, r : r + 1, :r] = -(tiles[:, r : r + 1, :r] @ X[:, :r, :r])
    return X


def unit_lower_inverse(xp, L, leaf: int = TILE):
    """L⁻¹ for a unit lower-triangular L (m, m) float64, by products only. O(m³/3).

    The diagonal tiles (leaf × leaf) are inverted by ``invert_unit_tiles``; then pairs of
    finished blocks are joined, smallest first:
    [[X11, 0], [X21, X22]] with X21 = −X22·L21·X11. (No LAPACK call: with multi-threaded
    OpenBLAS a trtri after the Cholesky factorization stalled for milliseconds.)"""
    m = L.shape[0]
    nt = -(-m // leaf)
    size = nt * leaf
    dev = _backend.device(L)
    P = xp.eye(size, dtype=xp.float64, device=dev)  # padded with the identity
    P[:m, :m] = L
    X = invert_unit_tiles(xp, xp.stack([P[t * leaf : (t + 1) * leaf, t * leaf : (t + 1) * leaf] for t in range(nt)]))
    out = xp.zeros((size, size), dtype=xp.float64, device=dev)
    for t in range(nt):
        out[t * leaf : (t + 1) * leaf, t * leaf : (t + 1) * leaf] = X[t, ...]
    s = leaf
    while s < size:
        for a in range(0, size - s, 2 * s):
            b = min(size, a + 2 * s)
            out[a + s : b, a : a + s] = -(
                out[a + s : b, a + s : b] @ (P[a + s : b, a : a + s] @ out[a : a + s, a : a + s])
            )
        s *= 2
    return out[:m, :m]


def b_direct(xp, D, n: float, damp: float):
    """B = λ⁻¹L̃⁻¹ by ``unit_lower_inverse``. O(m³/3)."""
    return unit_lower_inverse(xp, unit_lower(xp, D, n)) / damp


def b_blocked(xp, D, n: float, damp: float, tile: int = TILE):
    """B by the tiled schedule of the CUDA kernel (``rank1inv/cuda/mfac_b.cu``), any m.

    The matrix is padded to whole tiles with the identity (the kernel masks partial tiles
    instead). Step 1: every diagonal tile is inverted by its row recurrence, independently.
    Step t = 1..nt−1: every tile (i, j) with i − j ≥ t accumulates L̃[i, j+t−1]·X[j+t−1, j]
    (the sub-diagonal finished in step t−1), and the tiles with i − j = t are completed as
    X[i, j] = −X[i, i]·acc[i, j]. Returns B = X/λ.
    """
    m = D.shape[0]
    T = tile
    nt = -(-m // T)
    mp = nt * T
    dev = _backend.device(D)
    Lp = xp.eye(mp, dtype=xp.float64, device=dev)
    Lp[:m, :m] = unit_lower(xp, D, n)
    L4 = xp.permute_dims(xp.reshape(Lp, (nt, T, nt, T)), (0, 2, 1, 3))  # L4[i, j] = tile (i, j)
    X4 = xp.zeros((nt, nt, T, T), dtype=xp.float64, device=dev)

    # step 1: diagonal tiles, row recurrence X[r, :r] = −L[r, :r]·X[:r, :r]
    rows = list(range(nt))
    X4[rows, rows, ...] = invert_unit_tiles(xp, L4[rows, rows, ...])

    # steps t = 1..nt-1: one sweep per sub-diagonal of tiles
    acc = xp.zeros((nt, nt, T, T), dtype=xp.float64, device=dev)
    for t in range(1, nt):
        I = [i for j in range(nt - t) for i in range(j + t, nt)]
        J = [j for j in range(nt - t) for _ in range(j + t, nt)]
        K = [j + t - 1 for j in J]
        acc[I, J, ...] += L4[I, K, ...] @ X4[K, J, ...]
        Ii = [j + t for j in range(nt - t)]
        Jj = list(range(nt - t))
        X4[Ii, Jj, ...] = -(X4[Ii, Ii, ...] @ acc[Ii, Jj, ...])
    X = xp.reshape(xp.permute_dims(X4, (0, 2, 1, 3)), (mp, mp))[:m, :m]
    return X / damp


def b_from_D(xp, D, n: float, damp: float, method: str | None = None):
    """B from D. ``method``: "direct" (``unit_lower_inverse``), "blocked" (the kernel's NumPy
    mirror) or "kernel" (the CUDA kernel); None picks "kernel" on CuPy and "direct" otherwise."""
    if method is None:
        method = "kernel" if _backend.is_cupy(xp) else "direct"
    if method == "blocked":
        return b_blocked(xp, D, n, damp)
    if method == "kernel":
        kern = _backend.kernels(xp)
        if kern is None or kern.mfac_b is None:
            raise ValueError("method='kernel' needs CuPy arrays (the blocked B is a CUDA kernel)")
        return kern.mfac_b(D, n, damp)
    if method != "direct":
        raise ValueError(f"method must be 'direct', 'blocked' or 'kernel', got {method!r}")
    return b_direct(xp, D, n, damp)


def coefficients(xp, gram, damp: float, n: float, method: str | None = None):
    """(D, B) for a window's Gram matrix (m, m), from scratch: the Cholesky factor of
    M = gram/λ + n·I, then ``b_from_D``. O(m³)."""
    m = gram.shape[0]
    C = _backend.cholesky(xp, gram / damp + n * xp.eye(m, dtype=xp.float64, device=_backend.device(gram)))
    D = D_from_factor(xp, C, n)
    return D, b_from_D(xp, D, n, damp, method)
