"""Scale invariance (docs/design.md §4): for every test family, the results for x·2ᵏ
equal 2ᵏ·(the results for x) to the accuracy targets, k ∈ [−1000, 1000] for float64 and
[−120, 120] for float32 where the result is representable (else OverflowError); and G·2ʲ with
λ·2²ʲ gives F⁻¹·2^(−2j). Static and dynamic."""

import math

import numpy as np
import pytest
from helpers import host, tolerances

import rank1inv as r1
from rank1inv import testing

K64 = (-1000, -901, -500, -64, 0, 64, 500, 900, 1000)
K32 = (-120, -77, 0, 77, 120)
F32_MAX = float(np.finfo(np.float32).max)


def vectors(G, rng):
    """Random vectors and vectors in the gradients' span (where the Woodbury form cancels)."""
    G64 = G.astype(np.float64)
    d = G.shape[1]
    return np.stack([rng.standard_normal(d), G64[0], G64[:5].T @ rng.standard_normal(5)], axis=1)


def check_x_scaling(op, F, X, dtype):
    eta_tol, _ = tolerances(dtype)
    ks = K64 if dtype == "float64" else K32
    for k in ks:
        with np.errstate(over="ignore"):
            Xk = np.ldexp(X, k).astype(dtype)
        if not np.all(np.isfinite(Xk)):
            continue
        X_in = np.ldexp(Xk.astype(np.float64), -k)  # what the scaled input holds
        if dtype == "float32" and np.count_nonzero(X_in) < X_in.size:
            continue  # underflowed entries: x·2^k is not representable as a float32 vector
        try:
            Y = op @ Xk
        except OverflowError:
            # legitimate only if 2^k·F⁻¹x truly exceeds the result's range
            Y64 = op @ X_in
            limit = F32_MAX if Xk.dtype == np.float32 else np.finfo(np.float64).max
            assert math.ldexp(float(np.max(np.abs(Y64))), k) > limit * 0.5, k
            continue
        Y = np.ldexp(host(Y), -k)
        if dtype == "float32" and k < -60:
            continue  # float32 results of order 2^k·|F⁻¹x| are subnormal: not representable
        eta = testing.backward_error(F, Y, X_in)
        assert eta <= eta_tol, (k, eta)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", testing.FAMILIES)
def test_static_products_scale_with_x(family, dtype):
    rng = np.random.default_rng(1)
    for size, damp in ((1.0, 1e-1), (100.0, 1e-6)):
        G = testing.gradients(family, 16, 60, scale=size, seed=4, dtype=dtype)
        op = r1.StaticInverse(G, damp)
        F = testing.dense_fisher(G, damp)
        check_x_scaling(op, F, vectors(G, rng), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", testing.FAMILIES)
def test_window_products_scale_with_x(family, dtype):
    rng = np.random.default_rng(2)
    pool = testing.gradients(family, 40, 60, scale=100.0, seed=5, dtype=dtype)
    for dim_cap in ((60, 12), (8, 12)):  # gradient space and the dense path
        dim, cap = dim_cap
        w = r1.DynamicInverse(dim, cap, 1e-6, dtype=dtype)
        for g in pool[:20, :dim]:
            try:
                w.push(g)
            except ValueError as err:  # F beyond float64 (dense path, huge rows): refused
                assert "cannot be stored" in str(err)
        F = testing.dense_fisher(host(w.gradients()), 1e-6, 1 / cap)
        check_x_scaling(w, F, vectors(host(w.gradients()), rng), dtype)


G_SCALES = {"float64": (-500, -255, 0, 257, 500), "float32": (-50, 0, 50)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", testing.FAMILIES)
def test_static_scales_with_g_and_damp(family, dtype):
    """G·2^j, λ·2^(2j): F⁻¹x·2^(−2j) for products, the diagonal and entries."""
    rng = np.random.default_rng(3)
    eta_tol, rel_tol = tolerances(dtype)
    G = testing.gradients(family, 16, 60, seed=6, dtype=dtype)
    damp = 1e-4
    F = testing.dense_fisher(G, damp)
    Finv = np.linalg.inv(F)
    X = vectors(G, rng)
    rows, cols = rng.integers(0, 60, 20), rng.integers(0, 60, 20)
    base = r1.StaticInverse(G, damp).logdet()
    for j in G_SCALES[dtype]:
        op = r1.StaticInverse(np.ldexp(G, j).astype(dtype), math.ldexp(damp, 2 * j), block_size=[25, 35])
        Fb = testing.dense_fisher(G, damp, block_sizes=[25, 35])
        Y = np.ldexp(host(op @ X), 2 * j)
        assert testing.backward_error(Fb, Y, X) <= eta_tol, j
        op = r1.StaticInverse(np.ldexp(G, j).astype(dtype), math.ldexp(damp, 2 * j))
        Y = np.ldexp(host(op @ X), 2 * j)
        assert testing.backward_error(F, Y, X) <= eta_tol, j
        if np.linalg.cond(F) <= 1e9 and (dtype == "float64" or abs(j) <= 30):
            diag = np.ldexp(host(op.diag()).astype(np.float64), 2 * j)
            assert testing.relative_error(diag, np.diag(Finv)) <= rel_tol, j
            e = np.ldexp(host(op.entries(rows, cols)).astype(np.float64), 2 * j)
            assert testing.entry_error(e, Finv, rows, cols) <= rel_tol, j
        # log det F_j = log det F + 2j·d·log 2 (against our own unscaled value: a dense slogdet is
        # the less accurate side for these condition numbers)
        expected = base + 2 * j * 60 * math.log(2)
        assert abs(op.logdet() - expected) <= 1e-12 * max(1.0, abs(expected)), j


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_float64_window_scales_with_g_and_damp(family):
    """Windows whose gradients go beyond 2^±256 move their frame as gradients come and go."""
    rng = np.random.default_rng(4)
    pool = testing.gradients(family, 30, 50, seed=7, dtype="float64")
    damp = 1e-4
    for j in (-500, 0, 500):
        w = r1.DynamicInverse(50, 8, math.ldexp(damp, 2 * j), dtype="float64")
        for t in range(20):
            w.push(np.ldexp(pool[t], j))
        G = np.ldexp(host(w.gradients()), -j)
        F = testing.dense_fisher(G, damp, 1 / 8)
        X = vectors(G, rng)
        Y = np.ldexp(host(w @ np.ldexp(X, j)), j)  # F_j⁻¹(2^j x) = 2^(−j) F⁻¹x
        assert testing.backward_error(F, Y, X) <= 5e-12, j


def test_window_frame_follows_its_contents():
    """Magnitudes change by 2^300 and back (beyond 2^256 the frame moves; F stays representable,
    its entries reach 2^600): the frame follows the window's contents."""
    rng = np.random.default_rng(5)
    pool = testing.gradients("iid", 30, 50, seed=7, dtype="float64")
    damp = 1e-4
    w = r1.DynamicInverse(50, 8, damp, dtype="float64")
    for t in range(8):
        w.push(pool[t])
    assert w._frames.max() == 0
    for t in range(8, 16):
        w.push(np.ldexp(pool[t], 300))
    assert w._frames.max() > 256
    for t in range(16, 24):
        w.push(pool[t])
    assert w._frames.max() == 0
    y = w.push_apply(pool[24])
    F = testing.dense_fisher(host(w.gradients()), damp, 1 / 8)
    assert testing.backward_error(F, y, pool[24]) <= 5e-12
    X = vectors(host(w.gradients()), rng)
    assert testing.backward_error(F, host(w @ X), X) <= 5e-12
