"""M-FAC's coefficient matrices D and B (M-FAC eq. 8–10, appendix B), all in float64.

With n = 1/s and the Gram matrix GGᵀ of the window (slot order):

    M = λ⁻¹GGᵀ + n·I = L̃U          (LU without pivoting; M is SPD)
    D = U − n·I                     (upper triangular, eq. 8–9)
    B = λ⁻¹L̃⁻¹                      (lower triangular, diagonal λ⁻¹, eq. 10)

U and L̃ come from the Cholesky factor C of M: U = diag(C)·Cᵀ and L̃ = C·diag(C)⁻¹. A change at
slot k leaves rows/columns < k of C, D and B untouched, so updates recompute only from k on.

B is computed either by a recursive triangular inverse (``b_direct``, the CPU path) or by the
32×32-tile schedule of the GPU kernel (``b_blocked``, its NumPy mirror; appendix B, Figure 3):
all diagonal tiles first, then one sweep per sub-diagonal of tiles.
"""

from __future__ import annotations

import math

from . import _backend

TILE = 32


def cholesky_of_M(xp, gram, damp: float, n: float, start: int = 0, previous=None):
    """Lower Cholesky factor C of M = gram/λ + n·I, reusing rows < ``start`` of the previous
    coefficients ``previous`` = (D, B)."""
    m = gram.shape[0]
    M = gram / damp + n * xp.eye(m, dtype=xp.float64, device=_backend.device(gram))
    if start <= 0 or previous is None:
        return _backend.cholesky(xp, M)
    k = start
    prev_D, prev_B = previous
    C11 = factor_from_D(xp, prev_D[:k, :k], n)
    # C21ᵀ = C11⁻¹ M[:k, k:] with C11⁻¹ = diag(U11)^(-1/2)·λ·B11 (C = L̃·diag(U)^(1/2), B = λ⁻¹L̃⁻¹):
    # a product with the kept B instead of a triangular solve; C22 = chol(M22 − C21 C21ᵀ)
    dU1 = n + xp.linalg.diagonal(prev_D[:k, :k])
    C21t = (damp * (prev_B[:k, :k] @ M[:k, k:])) / xp.sqrt(dU1)[:, None]
    C22 = _backend.cholesky(xp, M[k:, k:] - xp.matrix_transpose(C21t) @ C21t)
    C = xp.zeros((m, m), dtype=xp.float64, device=_backend.device(gram))
    C[:k, :k] = C11
    C[k:, :k] = xp.matrix_transpose(C21t)
    C[k:, k:] = C22
    return C


def factor_from_D(xp, D, n: float):
    """C with C Cᵀ = M from D: U = D + nI, C = Uᵀ·diag(U)^(-1/2)."""
    U = D + n * xp.eye(D.shape[0], dtype=xp.float64, device=_backend.device(D))
    return xp.matrix_transpose(U) / xp.sqrt(xp.linalg.diagonal(U))[None, :]


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


def b_direct(xp, D, n: float, damp: float, start: int = 0, previous_B=None):
    """B = λ⁻¹L̃⁻¹ by ``unit_lower_inverse``; rows < ``start`` copied from ``previous_B``."""
    L = unit_lower(xp, D, n)
    if start <= 0 or previous_B is None:
        return unit_lower_inverse(xp, L) / damp
    k = start
    # rows k: of L̃⁻¹ are [−X22 L̃21 L̃11⁻¹, X22] with X22 = L̃22⁻¹ (and λ·B11 = L̃11⁻¹)
    X22 = unit_lower_inverse(xp, L[k:, k:])
    B = xp.asarray(previous_B, copy=True)
    B[k:, :k] = -(X22 @ (L[k:, :k] @ previous_B[:k, :k]))
    B[k:, k:] = X22 / damp
    return B


def b_blocked(xp, D, n: float, damp: float, start: int = 0, previous_B=None, tile: int = TILE):
    """B by the tiled schedule of the CUDA kernel (``rank1inv/cuda/mfac_b.cu``), any m.

    The matrix is padded to whole tiles with the identity (the kernel masks partial tiles
    instead). Step 1: every diagonal tile is inverted by its row recurrence, independently.
    Step t = 1..nt−1: every tile (i, j) with i − j ≥ t accumulates L̃[i, j+t−1]·X[j+t−1, j]
    (the sub-diagonal finished in step t−1), and the tiles with i − j = t are completed as
    X[i, j] = −X[i, i]·acc[i, j]. Tile rows below ``start // tile`` are taken from
    ``previous_B``. Returns B = X/λ.
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
    t0 = 0 if (start <= 0 or previous_B is None) else start // T
    if t0:
        Xp = xp.eye(mp, dtype=xp.float64, device=dev)
        Xp[:m, :m] = previous_B * damp
        X4[:t0, :t0, ...] = xp.permute_dims(xp.reshape(Xp, (nt, T, nt, T)), (0, 2, 1, 3))[:t0, :t0, ...]

    # step 1: diagonal tiles t0..nt-1, row recurrence X[r, :r] = −L[r, :r]·X[:r, :r]
    rows = list(range(t0, nt))
    X4[rows, rows, ...] = invert_unit_tiles(xp, L4[rows, rows, ...])

    # steps t = 1..nt-1: one sweep per sub-diagonal of tiles
    acc = xp.zeros((nt, nt, T, T), dtype=xp.float64, device=dev)
    for t in range(1, nt):
        I, J = [], []
        for j in range(0, nt - t):
            for i in range(max(t0, j + t), nt):
                I.append(i)
                J.append(j)
        if not I:
            continue
        K = [j + t - 1 for j in J]
        acc[I, J, ...] += L4[I, K, ...] @ X4[K, J, ...]
        done = [(i, j) for i, j in zip(I, J) if i - j == t]
        Ii = [i for i, _ in done]
        Jj = [j for _, j in done]
        X4[Ii, Jj, ...] = -(X4[Ii, Ii, ...] @ acc[Ii, Jj, ...])
    X = xp.reshape(xp.permute_dims(X4, (0, 2, 1, 3)), (mp, mp))[:m, :m]
    return X / damp


def coefficients(xp, gram, damp: float, n: float, start: int = 0, previous=None, method: str | None = None):
    """(D, B) for the window's Gram matrix, recomputing only rows/columns ≥ ``start``.

    Cost O((m − start)·m²). ``previous`` is the (D, B) pair before the change at ``start``.
    ``method``: "direct" (``unit_lower_inverse``), "blocked" (the kernel's NumPy mirror) or
    "kernel" (the CUDA kernel); None picks "kernel" on CuPy and "direct" otherwise.
    """
    if method is None:
        method = "kernel" if _backend.is_cupy(xp) else "direct"
    prev_D, prev_B = previous if previous is not None else (None, None)
    C = cholesky_of_M(xp, gram, damp, n, start, previous)
    D = D_from_factor(xp, C, n)
    if start > 0 and prev_D is not None:  # columns < start are unchanged: keep them bit for bit
        D = xp.concat([prev_D[:, :start], D[:, start:]], axis=1)
    if method == "blocked":
        B = b_blocked(xp, D, n, damp, start, prev_B)
    elif method == "kernel":
        from .cuda import kernels

        B = kernels.mfac_b(D, n, damp, start, prev_B)
    else:
        B = b_direct(xp, D, n, damp, start, prev_B)
    return D, B


def check(xp, gram, D, B, damp: float, n: float, tol: float = 1e-8) -> None:
    """ValueError unless D and B (m, m) float64 are M-FAC coefficients of ``gram``. O(m³).

    The test is by residuals, not by comparison with a recomputation: D and B built by a
    history of partial updates differ from freshly computed ones by up to cond(M)·ε, while
    both satisfy, to rounding, ``UᵀU / diag(U) = M`` (D is a Cholesky factor of M, scaled) and
    ``λB·L̃ = I`` (B is its triangular inverse), componentwise.
    """
    m = gram.shape[0]
    eye = xp.eye(m, dtype=xp.float64, device=_backend.device(gram))
    if xp.any(xp.tril(D, k=-1) != 0) or xp.any(xp.triu(B, k=1) != 0):
        raise ValueError("state['D'] must be upper and state['B'] lower triangular")
    U = D + n * eye
    dU = xp.linalg.diagonal(U)
    if not xp.all(dU > 0):
        raise ValueError("state['D'] has a non-positive pivot n + D[i, i]")
    M = gram / damp + n * eye
    Ut = xp.matrix_transpose(U)
    size = xp.abs(Ut) @ (xp.abs(U) / dU[:, None]) + xp.max(xp.abs(M)) * eye  # of the product's terms
    if xp.any(xp.abs(Ut @ (U / dU[:, None]) - M) > tol * size):
        raise ValueError("state['D'] is inconsistent with state['gram']")
    L = unit_lower(xp, D, n)
    X = damp * B
    if xp.any(xp.abs(X @ L - eye) > tol * (xp.abs(X) @ xp.abs(L))):
        raise ValueError("state['B'] is inconsistent with state['D']")


class MfacFactor:
    """The m×m algebra of the Woodbury form, from D and B (one block).

    K = GGᵀ + nλI = λM and M⁻¹ = λ²·Bᵀ diag(U)⁻¹ B, so K⁻¹P = λ·Bᵀ(BP / diag U) and a square
    root of K⁻¹ is √λ·diag(U)^(-1/2)·B (M-FAC eq. 13 written with B twice: Algorithm 2's forward
    substitution q = diag(U)⁻¹ L̃⁻¹ λ⁻¹ p is λ·B·p / diag U).
    """

    def __init__(self, xp, D, B, n: float, damp: float, gram=None):
        """``gram`` (GGᵀ of the same window) enables the refinement step of ``solve``."""
        self.xp, self.B, self.damp, self.gram = xp, B, damp, gram
        self.dU = n + xp.linalg.diagonal(D)
        self.mu = n * damp  # K = gram + μI

    def _apply_inverse(self, P):
        Q = (self.B @ P) / self.dU[:, None]
        return self.damp * (self.xp.matrix_transpose(self.B) @ Q)

    def solve(self, P, b0=0, b1=None):
        """K⁻¹P for P (1, m, k). O(m²k).

        An inverse applied as a product is not backward stable by itself: its residual
        P − K·C grows with cond(K), and it enters F·y − x directly (measured η 1.4e-11 > 5e-12
        for float64 windows of near-duplicate gradients). With ``gram`` one step of iterative
        refinement, C += K⁻¹(P − K·C), brings the residual back to rounding level."""
        C = self._apply_inverse(P)
        if self.gram is None:
            return C
        return C + self._apply_inverse(P - (self.gram @ C + self.mu * C))

    def whiten(self, P, b0=0, b1=None):
        """√λ·diag(U)^(-1/2)·B·P for P (nb, m, k)."""
        return (self.B @ P) * (math.sqrt(self.damp) / self.xp.sqrt(self.dU))[:, None]

    def logdet(self) -> float:
        xp = self.xp
        return self.B.shape[0] * math.log(self.damp) + float(xp.sum(xp.log(self.dU)))
