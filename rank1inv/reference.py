"""The M-FAC paper's algorithms as written, in plain NumPy: a comparator, never used by the core.

Everything runs in one dtype (float32 like the paper's code, or float64), with ``n = 1/s``
in the role of the paper's m. Equation numbers refer to the M-FAC paper (main text) and
its appendix (Algorithms 1–3). Inputs may be NumPy or CuPy arrays (the benchmarks run the
paper's algorithms on the same backend as ours); scalars are plain floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import namespace

__all__ = ["static_precompute", "static_apply", "static_diag", "static_entry", "dynamic_coefficients", "dynamic_apply"]


def _ns(*arrays):
    return namespace(*[a for a in arrays if hasattr(a, "shape")])


# ------------------------------------------------------------------------- static (§3.1, App. C)
def static_precompute(
    G, damp: float, n: float | None = None, dtype=np.float32, overwrite: bool = False
) -> tuple[Any, Any]:
    """Algorithm 3: V (m×d) and q (m,) with v_i = F_{i-1}⁻¹ g_i and q_i = n + g_iᵀ v_i.

    Cost O(dm²) as m sequential matrix-vector passes. (The appendix prints q₁ ← V₁g; eq. 4 and
    the loop body give q₁ = n + V₁g, used here.) ``overwrite=True`` reuses G's storage for V
    (the paper's memory trick; G must already have ``dtype``), else G is left untouched.
    """
    xp = _ns(G)
    want = getattr(xp, np.dtype(dtype).name)
    if overwrite and G.dtype == want:
        V = G  # rows of G are read (copied) before being overwritten below
    else:
        G = xp.asarray(G, dtype=want)
        V = xp.asarray(G, copy=True)
    m = G.shape[0]
    n = float(m) if n is None else float(n)
    lam_inv = 1.0 / damp
    q = xp.empty((m,), dtype=G.dtype)
    g = xp.asarray(G[0], copy=True)
    V[0] = lam_inv * g
    q[0] = n + V[0] @ g
    for i in range(1, m):
        g = xp.asarray(G[i], copy=True)
        V[i] = lam_inv * g - ((V[:i] @ g) / q[:i]) @ V[:i]
        q[i] = n + V[i] @ g
    return V, q


def static_apply(V, q, damp: float, x):
    """Eq. 24: F⁻¹x = λ⁻¹x − Vᵀ((Vx)/q)."""
    xp = _ns(V)
    x = xp.asarray(x, dtype=V.dtype)
    return (1.0 / damp) * x - ((V @ x) / q) @ V


def static_diag(V, q, damp: float):
    """Eq. 25 with π = identity: diag F⁻¹ = λ⁻¹ − Σ_k v_k ⊙ v_k / q_k."""
    xp = _ns(V)
    return (1.0 / damp) - xp.sum((V * V) / q[:, None], axis=0)


def static_entry(V, q, damp: float, i: int, j: int):
    """Eq. 5: [F⁻¹]_ij = λ⁻¹δ_ij − Σ_k V_ki V_kj / q_k, O(m)."""
    xp = _ns(V)
    return (1.0 / damp) * (i == j) - xp.sum(V[:, i] * V[:, j] / q)


# ------------------------------------------------------------------------ dynamic (§3.2, App. B)
def dynamic_coefficients(gram, damp: float, n: float, dtype=np.float32):
    """Algorithm 1: D (upper) and B (lower, diagonal λ⁻¹) from GGᵀ, O(m³)."""
    xp = _ns(gram)
    gram = xp.asarray(gram, dtype=getattr(xp, np.dtype(dtype).name))
    m = gram.shape[0]
    D = gram / damp
    for i in range(1, m):
        row = D[i - 1, i:]
        D[i:, i:] -= (row[:, None] * row[None, :]) / (n + D[i - 1, i - 1])
    D = xp.triu(D)
    B = xp.eye(m, dtype=gram.dtype) / damp
    diag = xp.linalg.diagonal(D)
    for i in range(1, m):
        B[i, :i] = (-D[:i, i] / (n + diag[:i])) @ B[:i, :i]
    return D, B


def dynamic_apply(G, D, B, damp: float, n: float, x):
    """Algorithm 2: F⁻¹x = λ⁻¹x − ((qᵀB)G)ᵀ with q by forward substitution, O(dm + m²).

    q follows eq. 11–12 (the printed loop of Algorithm 2 mixes scaled and unscaled q).
    """
    xp = _ns(D)
    G = xp.asarray(G, dtype=D.dtype)
    x = xp.asarray(x, dtype=D.dtype)
    m = G.shape[0]
    q = (1.0 / damp) * (G @ x)
    for i in range(1, m):
        q[i:] -= q[i - 1] / (n + D[i - 1, i - 1]) * D[i - 1, i:]
    q = q / (n + xp.linalg.diagonal(D))
    return (1.0 / damp) * x - (q @ B) @ G
