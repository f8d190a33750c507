"""Property-testing against dense inverses: gradient families, the dense float64 reference,
accuracy metrics, ``assert_inverse_close`` and hypothesis strategies (docs/design.md §8).

Everything here is NumPy and float64 on the reference side; it is small-d tooling, not part of
the fast path. The strategies need ``hypothesis`` (imported when they are called).

Why backward error: for ill-conditioned F a dense ``np.linalg.inv`` is the *less* accurate
side (its error grows like cond(F)·ε), so products are checked by η = ‖Fy − x‖/(‖F‖‖y‖ + ‖x‖),
which needs only F itself, and diagonals/entries are compared with the dense inverse only where
cond(F) ≤ 1e9, where it is still good to ~1e-7.
"""

from __future__ import annotations

import numpy as np

from . import _backend, _precision

__all__ = [
    "FAMILIES",
    "gradients",
    "dense_fisher",
    "backward_error",
    "relative_error",
    "entry_error",
    "assert_inverse_close",
    "gradient_sets",
    "block_layouts",
    "static_problems",
]

FAMILIES = ("iid", "collinear", "lowrank", "clusters", "duplicate", "zero_rows", "huge_row")


def gradients(family: str, m: int, d: int, *, scale: float = 1.0, seed: int = 0, dtype="float32") -> np.ndarray:
    """m gradients of length d from a named family, deterministic in ``seed``; shape (m, d).

    iid: N(0, 1). collinear: one shared direction times N(0, 1) + 1e-2 noise. lowrank: rank 8
    (unit-variance entries) + 1e-3 noise. duplicate: iid with every other row a copy of the one
    before. clusters: 4 directions, each row one of them + 1e-3 noise (near-duplicates).
    zero_rows: iid with a third of the rows zero. huge_row: iid with row 0 times 1e4.
    Everything is multiplied by ``scale``.
    """
    rng = np.random.default_rng(seed)
    if family == "iid":
        G = rng.standard_normal((m, d))
    elif family == "collinear":
        G = np.outer(rng.standard_normal(m), rng.standard_normal(d)) + 1e-2 * rng.standard_normal((m, d))
    elif family == "lowrank":
        r = 8
        G = rng.standard_normal((m, r)) @ rng.standard_normal((r, d)) / np.sqrt(r)
        G += 1e-3 * rng.standard_normal((m, d))
    elif family == "clusters":
        G = rng.standard_normal((4, d))[np.arange(m) % 4] + 1e-3 * rng.standard_normal((m, d))
    elif family == "duplicate":
        G = rng.standard_normal((m, d))
        G[1::2] = G[0 : m - 1 : 2][: G[1::2].shape[0]]
    elif family == "zero_rows":
        G = rng.standard_normal((m, d))
        G[::3] = 0.0
    elif family == "huge_row":
        G = rng.standard_normal((m, d))
        G[0] *= 1e4
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    return np.ascontiguousarray(scale * G, dtype=dtype)


def dense_fisher(G, damp: float, scale: float | None = None, block_sizes=None) -> np.ndarray:
    """F = λI + s·GᵀG in float64 (block-diagonal for ``block_sizes``); s defaults to 1/m."""
    G = np.asarray(G, dtype=np.float64)
    m, d = G.shape
    s = 1.0 / m if scale is None else scale
    sizes = [d] if block_sizes is None else list(block_sizes)
    F = np.zeros((d, d))
    a = 0
    for b in sizes:
        Gb = G[:, a : a + b]
        F[a : a + b, a : a + b] = damp * np.eye(b) + s * (Gb.T @ Gb)
        a += b
    return F


def backward_error(F, y, x) -> float:
    """η = ‖F y − x‖ / (‖F‖₂ ‖y‖ + ‖x‖) for vectors or matrices of right-hand sides (max over columns)."""
    F = np.asarray(F, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(F.shape[0], -1)
    x = np.asarray(x, dtype=np.float64).reshape(F.shape[0], -1)
    nF = np.linalg.norm(F, 2)
    r = np.linalg.norm(F @ y - x, axis=0)
    den = nF * np.linalg.norm(y, axis=0) + np.linalg.norm(x, axis=0)
    eta = np.where(den > 0, r / np.where(den > 0, den, 1.0), np.where(r > 0, np.inf, 0.0))
    return float(np.max(eta)) if eta.size else 0.0


def relative_error(a, ref) -> float:
    """max |a − ref| / |ref| elementwise (ref must be non-zero, e.g. a diagonal of F⁻¹)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(a - ref) / np.abs(ref))) if ref.size else 0.0


def entry_error(values, Finv, rows, cols) -> float:
    """max |F⁻¹_ij − ref| / sqrt(F⁻¹_ii F⁻¹_jj): relative error on the entries' natural scale."""
    values = np.asarray(values, dtype=np.float64)
    d = np.diag(Finv)
    ref = Finv[rows, cols]
    return float(np.max(np.abs(values - ref) / np.sqrt(d[rows] * d[cols]))) if ref.size else 0.0


def assert_inverse_close(op, G, damp, *, scale=None, block_sizes=None, rng=None, k: int = 3):
    """Assert that ``op`` is F⁻¹ for F = λI + s·GᵀG (block-diagonal for ``block_sizes``) to the
    accuracy targets of G's storage dtype: products by backward error (every dtype, any
    conditioning), the diagonal, entries and a column against the dense inverse where
    cond(F) ≤ 1e9. G is the (m, d) host array the operator was built from (any storage dtype);
    ``scale`` None means 1/m. AssertionError with the measured error otherwise. O(d³).

    Any operator of your own works if it provides ``op @ X`` for X (d, k), ``op.diag()`` (d,),
    ``op.entries(rows, cols)`` and ``op.column(j)`` (d,), all returning arrays of one namespace;
    ``op.namespace`` (optional, NumPy by default) is the array namespace the inputs are made in."""
    rng = np.random.default_rng(0) if rng is None else rng
    policy = _precision.of(np.asarray(G).dtype)
    Gh = np.asarray(_backend.to_host(G), dtype=np.float64)
    F = dense_fisher(Gh, damp, scale, block_sizes)
    d = F.shape[0]
    xp = getattr(op, "namespace", np)
    X = rng.standard_normal((d, k))
    in_span = Gh[: min(3, Gh.shape[0])].T  # vectors in the gradients' span (the cancelling case)
    X = np.concatenate([X, in_span], axis=1)
    Y = np.asarray(_backend.to_host(op @ xp.asarray(X)), dtype=np.float64)
    eta = backward_error(F, Y, X)
    assert eta <= policy.eta, f"backward error {eta:.2e} > {policy.eta:g} (cond(F) {np.linalg.cond(F):.1e})"
    cond = np.linalg.cond(F)
    if cond <= 1e9:
        Finv = np.linalg.inv(F)
        diag = np.asarray(_backend.to_host(op.diag()), dtype=np.float64)
        err = relative_error(diag, np.diag(Finv))
        assert err <= policy.rel, f"diagonal relative error {err:.2e} > {policy.rel:g} (cond(F) {cond:.1e})"
        rows, cols = rng.integers(0, d, 20), rng.integers(0, d, 20)
        got = np.asarray(_backend.to_host(op.entries(xp.asarray(rows), xp.asarray(cols))), dtype=np.float64)
        err = entry_error(got, Finv, rows, cols)
        assert err <= policy.rel, f"entry error {err:.2e} > {policy.rel:g} (cond(F) {cond:.1e})"
        j = int(rng.integers(0, d))
        col = np.asarray(_backend.to_host(op.column(j)), dtype=np.float64)
        err = float(np.linalg.norm(col - Finv[:, j]) / np.linalg.norm(Finv[:, j]))
        assert err <= policy.rel, f"column {j} relative error {err:.2e} > {policy.rel:g} (cond(F) {cond:.1e})"


def gradient_sets(*, max_m: int = 16, max_d: int = 40, dtypes=("float32", "float64"), families=FAMILIES):
    """A hypothesis strategy for gradient sets: (m, d) host arrays from the test families, any
    seed and size (1 ≤ m ≤ max_m, 1 ≤ d ≤ max_d), scale 1 or 100, in one of ``dtypes``
    (float16 draws that exceed its range are rescaled to fit)."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw_):
        m, d = draw_(st.integers(1, max_m)), draw_(st.integers(1, max_d))
        family = draw_(st.sampled_from(families))
        dtype = draw_(st.sampled_from(dtypes))
        scale = draw_(st.sampled_from([1.0, 100.0]))
        G = gradients(family, m, d, scale=scale, seed=draw_(st.integers(0, 2**16)), dtype="float64")
        top = np.max(np.abs(G))
        limit = _precision.of(dtype).max_value
        if top > limit / 4:
            G = G * (limit / 4 / top)
        return np.ascontiguousarray(G.astype(_precision.numpy_dtype(dtype)))

    return draw()


def block_layouts(d: int):
    """A hypothesis strategy for ``block_size`` values of dimension d: None, an int, or lengths
    summing to d."""
    from hypothesis import strategies as st

    def lengths(parts):
        cuts = sorted(set(parts))
        bounds = [0, *[c for c in cuts if 0 < c < d], d]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    return st.one_of(
        st.none(), st.integers(1, max(1, d)), st.lists(st.integers(1, max(1, d - 1)), max_size=4).map(lengths)
    )


def static_problems(**kwargs):
    """A hypothesis strategy for (G, damp, block_size, scale): everything StaticInverse takes,
    from ``gradient_sets(**kwargs)``, λ ∈ {1e-1, 1e-4, 1e-6}, s ∈ {None, 0.5}."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw_):
        G = draw_(gradient_sets(**kwargs))
        return (
            G,
            draw_(st.sampled_from([1e-1, 1e-4, 1e-6])),
            draw_(block_layouts(G.shape[1])),
            draw_(st.sampled_from([None, 0.5])),
        )

    return draw()
