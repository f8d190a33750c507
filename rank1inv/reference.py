"""The M-FAC paper's algorithms as written, in plain NumPy: a comparator, never used by the core.

Everything runs in one dtype (float32 like the paper's code, or float64), with ``n = 1/s``
in the role of the paper's m. Equation numbers refer to the M-FAC paper (main text) and
its appendix (Algorithms 1–3).
"""

from __future__ import annotations

import numpy as np


# ------------------------------------------------------------------------- static (§3.1, App. C)
def static_precompute(G, damp: float, n: float | None = None, dtype=np.float32):
    """Algorithm 3: V (m×d) and q (m,) with v_i = F_{i-1}⁻¹ g_i and q_i = n + g_iᵀ v_i.

    Cost O(dm²) as m sequential matrix-vector passes. (The appendix prints q₁ ← V₁g; eq. 4 and
    the loop body give q₁ = n + V₁g, used here.)
    """
    G = np.asarray(G, dtype=dtype)
    m = G.shape[0]
    n = float(m) if n is None else float(n)
    lam_inv = dtype(1.0 / damp)
    V = G.copy()
    q = np.empty(m, dtype=dtype)
    g = G[0].copy()
    V[0] = lam_inv * g
    q[0] = dtype(n) + V[0] @ g
    for i in range(1, m):
        g = G[i].copy()
        V[i] = lam_inv * g - ((V[:i] @ g) / q[:i]) @ V[:i]
        q[i] = dtype(n) + V[i] @ g
    return V, q


def static_apply(V, q, damp: float, x):
    """Eq. 24: F⁻¹x = λ⁻¹x − Vᵀ((Vx)/q)."""
    dtype = V.dtype.type
    x = np.asarray(x, dtype=V.dtype)
    return dtype(1.0 / damp) * x - ((V @ x) / q) @ V


def static_diag(V, q, damp: float):
    """Eq. 25 with π = identity: diag F⁻¹ = λ⁻¹ − Σ_k v_k ⊙ v_k / q_k."""
    dtype = V.dtype.type
    return dtype(1.0 / damp) - ((V * V) / q[:, None]).sum(axis=0)


def static_entry(V, q, damp: float, i: int, j: int):
    """Eq. 5: [F⁻¹]_ij = λ⁻¹δ_ij − Σ_k V_ki V_kj / q_k, O(m)."""
    dtype = V.dtype.type
    return dtype(1.0 / damp) * (i == j) - np.sum(V[:, i] * V[:, j] / q)


# ------------------------------------------------------------------------ dynamic (§3.2, App. B)
def dynamic_coefficients(gram, damp: float, n: float, dtype=np.float32):
    """Algorithm 1: D (upper) and B (lower, diagonal λ⁻¹) from GGᵀ, O(m³)."""
    gram = np.asarray(gram, dtype=dtype)
    m = gram.shape[0]
    n = dtype(n)
    D = gram / dtype(damp)
    for i in range(1, m):
        D[i:, i:] -= np.outer(D[i - 1, i:], D[i - 1, i:]) / (n + D[i - 1, i - 1])
    D = np.triu(D)
    B = np.eye(m, dtype=dtype) / dtype(damp)
    for i in range(1, m):
        B[i, :i] = (-D[:i, i] / (n + np.diag(D)[:i])) @ B[:i, :i]
    return D, B


def dynamic_apply(G, D, B, damp: float, n: float, x):
    """Algorithm 2: F⁻¹x = λ⁻¹x − ((qᵀB)G)ᵀ with q by forward substitution, O(dm + m²).

    q follows eq. 11–12 (the printed loop of Algorithm 2 mixes scaled and unscaled q).
    """
    dtype = D.dtype.type
    G = np.asarray(G, dtype=D.dtype)
    x = np.asarray(x, dtype=D.dtype)
    m = G.shape[0]
    n = dtype(n)
    q = dtype(1.0 / damp) * (G @ x)
    for i in range(1, m):
        q[i:] -= q[i - 1] / (n + D[i - 1, i - 1]) * D[i - 1, i:]
    q = q / (n + np.diag(D))
    return dtype(1.0 / damp) * x - (q @ B) @ G
