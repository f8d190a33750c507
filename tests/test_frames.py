"""Frames that follow the gradients both ways, whatever their magnitudes (docs/design.md §4).

Gradients whose magnitudes differ by more than one float64 frame can hold (2^480 and beyond:
their Gram entries would underflow next to each other) get one frame per gradient; windows
rescale their Gram matrix elementwise when the shared frame moves, in both directions. The
reference is F⁻¹ in 60-digit arithmetic (mpmath), since F itself overflows float64 here.
"""

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rank1inv as r1

DIGITS = 1300  # enough for magnitudes 2^±1200 side by side (the m×m systems are small)


def _mp(a):
    return mpmath.matrix(np.asarray(a, dtype=np.float64).tolist())


def reference(G, damp, scale, x):
    """F⁻¹x in ``DIGITS`` digits for F = λI + s·GᵀG, by Woodbury (exact enough at that precision)."""
    with mpmath.workdps(DIGITS):
        return _reference(G, damp, scale, x)


def _reference(G, damp, scale, x):
    Gm, xm = _mp(G), _mp(x)
    lam, s = mpmath.mpf(damp), mpmath.mpf(scale)
    K = Gm * Gm.T + (lam / s) * mpmath.eye(G.shape[0])
    c = mpmath.lu_solve(K, Gm * xm)
    return (xm - Gm.T * c) / lam


def eta(G, damp, scale, y, x) -> float:
    """Backward error ‖Fy − x‖/(‖F‖‖y‖ + ‖x‖) in ``DIGITS`` digits (‖F‖₂ = λ + s·σ_max(G)²)."""
    with mpmath.workdps(DIGITS):
        return _eta(G, damp, scale, y, x)


def _eta(G, damp, scale, y, x) -> float:
    Gm, ym, xm = _mp(G), _mp(y), _mp(x)
    lam, s = mpmath.mpf(damp), mpmath.mpf(scale)
    r = mpmath.norm(lam * ym + s * (Gm.T * (Gm * ym)) - xm)
    top = float(np.max(np.abs(G))) or 1.0
    sigma = mpmath.mpf(float(np.linalg.svd(np.asarray(G) / top, compute_uv=False)[0])) * mpmath.mpf(top)
    return float(r / ((lam + s * sigma**2) * mpmath.norm(ym) + mpmath.norm(xm)))


def quadratic(G, damp, scale, x) -> float:
    """xᵀF⁻¹x in ``DIGITS`` digits."""
    with mpmath.workdps(DIGITS):
        return float(mpmath.fdot(_mp(x), _reference(G, damp, scale, x)))


def ordinary(rng, m, d):
    return rng.standard_normal((m, d))


# ----------------------------------------------------------------------------- windows
def test_window_leaves_a_huge_frame_after_remove_evict_and_replace():
    """One gradient of 1e200 next to ordinary ones: removing it, evicting it and replacing its
    slot all work, and the window is exact afterwards (the frame came back down)."""
    rng = np.random.default_rng(0)
    for how in ("remove", "evict", "replace"):
        w = r1.DynamicInverse(30, 4, 1e-3, dtype="float64")
        for _ in range(3):
            w.push(rng.standard_normal(30))
        big = w.push(1e200 * rng.standard_normal(30))
        if how == "remove":
            w.remove(big)
        elif how == "replace":
            w.replace(big, rng.standard_normal(30))
        else:
            for _ in range(4):
                w.push(rng.standard_normal(30))
        assert w._frames.max() == 0, how
        G = np.asarray(w.gradients())
        x = rng.standard_normal(30)
        assert eta(G, 1e-3, w.scale, w @ x, x) <= 5e-12, how
        w.push(rng.standard_normal(30))  # and it keeps moving
        G = np.asarray(w.gradients())
        y = w.push_apply(G[0] * 2.0)  # a span vector through the exact one-pass form
        G = np.asarray(w.gradients())
        assert eta(G, 1e-3, w.scale, y, G[-1]) <= 5e-12, how


@pytest.mark.parametrize("exponent", [600, -600])
def test_window_holds_gradients_beyond_one_frame(exponent):
    """Gradients 2^±600 apart in one window: products, push_apply and the diagonal against the
    high-precision reference (the shared frame cannot hold both: one frame per slot)."""
    rng = np.random.default_rng(1)
    damp = 1e-3 if exponent > 0 else 1e-300
    w = r1.DynamicInverse(24, 5, damp, dtype="float64")
    for t in range(7):
        g = rng.standard_normal(24)
        w.push(np.ldexp(g, exponent) if t % 3 == 0 else g)
    G = np.asarray(w.gradients())
    x = rng.standard_normal(24)
    assert eta(G, damp, w.scale, w @ x, x) <= 5e-12
    g = np.ldexp(rng.standard_normal(24), exponent)
    y = w.push_apply(g)
    G = np.asarray(w.gradients())
    assert eta(G, damp, w.scale, y, g) <= 5e-12
    # gᵀF⁻¹g of a stored gradient lies in (0, 1/s), and push_apply gets it to rounding
    q_ref = quadratic(G, damp, w.scale, g)
    assert 0 < q_ref <= 1 / w.scale  # (1/s)(1 − μ(K⁻¹)_jj): 1/s to float64 rounding here
    q = math.fsum((np.ldexp(g, -exponent) * np.ldexp(y, exponent)).tolist())
    assert abs(q - q_ref) <= 1e-12 * q_ref


def test_window_frame_moves_down_and_up_by_more_than_a_frame():
    """Magnitudes 1, then 2^700, then 1 again, then 2^-700 (with a damping that keeps them
    visible): the frames follow, with no OverflowError and no lost accuracy."""
    rng = np.random.default_rng(2)
    w = r1.DynamicInverse(20, 4, 1e-250, scale=1.0, dtype="float64")
    for k in (0, 700, 0, -380, 0):
        for _ in range(4):
            w.push(np.ldexp(rng.standard_normal(20), k))
        G = np.asarray(w.gradients())
        x = np.ldexp(rng.standard_normal(20), -400)  # F⁻¹x ≤ ‖x‖/λ ≈ 2^430: representable
        assert eta(G, 1e-250, 1.0, w @ x, x) <= 5e-12, k


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["push", "remove", "replace"]), st.sampled_from([0, 0, 300, 520, -520])),
                min_size=1, max_size=14),
       st.integers(0, 2**16))  # fmt: skip
def test_window_of_any_magnitudes_equals_the_reference(ops, seed):
    rng = np.random.default_rng(seed)
    w = r1.DynamicInverse(16, 4, 1e-200, scale=1.0, dtype="float64")
    for op, k in ops:
        g = np.ldexp(rng.standard_normal(16), k)
        if op == "push" or not len(w):
            w.push(g)
        elif op == "remove":
            w.remove(w.slots()[int(rng.integers(len(w)))])
        else:
            w.replace(w.slots()[int(rng.integers(len(w)))], g)
    if not len(w):
        return
    G = np.asarray(w.gradients())
    x = rng.standard_normal(16)
    assert eta(G, 1e-200, 1.0, w @ x, x) <= 5e-12
    static = r1.StaticInverse(G, 1e-200, scale=1.0)
    assert eta(G, 1e-200, 1.0, static @ x, x) <= 5e-12


# ----------------------------------------------------------------------------- static
@pytest.mark.parametrize("magnitude", [1e155, 1e170, 1e200, 1e-170])
def test_static_with_one_gradient_beyond_the_others_frame(magnitude):
    """One row far from the others: every product is backward stable; a product with the far
    gradient itself is either right (gᵀF⁻¹g in (0, 1/s]) or refused with a ValueError, never a
    wrong number; the ordinary gradients' gᵀF⁻¹g are right where cond(F) restricted to them
    allows it (ε²·cond ≪ 1: docs/numerics.md, span vectors)."""
    rng = np.random.default_rng(3)
    G = ordinary(rng, 4, 30)
    G[0] *= magnitude
    damp = 1e-3 if magnitude > 1 else 1e-300
    op = r1.StaticInverse(G, damp)
    s = op.scale
    x = rng.standard_normal(30)
    assert eta(G, damp, s, op @ x, x) <= 5e-12
    for j in range(4):
        try:
            y = op @ G[j]
        except ValueError as err:
            assert "span" in str(err) and j == 0 and magnitude > 1
            continue
        assert eta(G, damp, s, y, G[j]) <= 5e-12, j
        if magnitude < 1 and j > 0:
            continue  # cond(F) ≈ 1e300 on the ordinary gradients themselves: only η is defined
        q_ref = quadratic(G, damp, s, G[j])
        assert 0 < q_ref <= 1 / s
        top = np.max(np.abs(G[j]))
        q = math.fsum(((G[j] / top) * y).tolist()) * top
        assert abs(q - q_ref) <= 1e-8 * q_ref, j
    d_ref = [float(reference(G, damp, s, np.eye(30)[i])[i]) for i in (0, 7)]
    got = op.diag(np.array([0, 7]))
    assert np.allclose(got, d_ref, rtol=1e-8)


def test_static_blocks_of_very_different_magnitudes():
    """Two blocks 2^600 apart: each has its own frames, for F⁻¹ and for F (fisher products and
    diagonal: the small block is not lost next to the large one)."""
    rng = np.random.default_rng(4)
    G = ordinary(rng, 4, 40)
    G[:, :20], G[:, 20:] = np.ldexp(G[:, :20], -500), np.ldexp(G[:, 20:], 100)
    damp = 1e-300
    op = r1.StaticInverse(G, damp, block_size=20)
    x = rng.standard_normal(40)
    y = op @ x
    for b in (0, 1):
        sl = slice(20 * b, 20 * b + 20)
        assert eta(G[:, sl], damp, 0.25, y[sl], x[sl]) <= 5e-12
    Fx = op.fisher() @ x
    low = damp * x[:20] + 0.25 * G[:, :20].T @ (G[:, :20] @ x[:20])
    assert np.allclose(Fx[:20], low, rtol=1e-12)
    diag = op.fisher().diag()
    assert np.allclose(diag[:20], damp + 0.25 * np.sum(G[:, :20] ** 2, axis=0), rtol=1e-12)


# ----------------------------------------------------------------------------- factors
def test_factored_frame_comes_from_the_actual_entries():
    """max|A| and max|E| in different samples: the frame comes from max_i max|A_i|·max|E_i|."""
    rng = np.random.default_rng(5)
    A, E = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    A[0] *= 1e80
    E[1] *= 1e80
    fg = r1.FactoredGradients([(A, E)])
    dense = fg.to_dense()
    x = rng.standard_normal(6)
    a, b = r1.StaticInverse(fg, 1e-3) @ x, r1.StaticInverse(dense, 1e-3) @ x
    assert np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(b)
    A2, E2 = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    A2[0] *= 1e100
    E2[0] *= 1e100  # one entry of G near 1e200: finite, accepted
    fg = r1.FactoredGradients([(A2, E2)])
    a, b = r1.StaticInverse(fg, 1e-3) @ x, r1.StaticInverse(fg.to_dense(), 1e-3) @ x
    assert np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(b)
    A2[1] *= 1e300
    E2[1] *= 1e10  # finite factors whose product e·a exceeds float64: refused
    with pytest.raises(ValueError, match="non-finite"), np.errstate(over="ignore"):
        r1.StaticInverse(r1.FactoredGradients([(A2, E2)]), 1e-3)
