"""The age-ordered window factor (rank1inv.groups.window): O(m²) drop and append, refresh, queries,
M-FAC's D and B from it; the compiled CPU loops against their NumPy mirrors."""

import numpy as np
import pytest
from helpers import host
from hypothesis import given
from hypothesis import strategies as st

from rank1inv import _backend, cpu, reference, testing
from rank1inv.groups import coefficients as _coef
from rank1inv.groups import window as _window

xp_np = _backend.namespace_from_argument(None)


def spd(n, seed, family="iid", damp=1e-3):
    G = testing.gradients(family, n, 3 * n + 7, seed=seed, dtype="float64") if n else np.zeros((0, 4))
    return G @ G.T + damp * np.eye(n)


def implementations(xp):
    """(name, drop function) pairs: the compiled kernel where there is one, and the mirror."""
    out = [("mirror", lambda s, d, n, k: _window.drop_rows_numpy(xp, s, d, n, k))]
    kern = _backend.kernels(_backend.namespace_from_argument(xp))
    if kern is not None and hasattr(kern, "chol_drop"):
        out.append(("kernel", kern.chol_drop))
    return out


@given(
    n=st.integers(1, 70),
    extra=st.integers(0, 5),
    k=st.integers(0, 69),
    seed=st.integers(0, 1000),
    family=st.sampled_from(["iid", "clusters", "huge_row"]),
    in_place=st.booleans(),
)
def test_drop_equals_a_fresh_factor(n, extra, k, seed, family, in_place):
    """Deleting row/column k by the rank-one update gives the Cholesky factor of the reduced
    matrix, padded with the identity; kernel and mirror agree."""
    k %= n
    cap = n + extra
    K = spd(n, seed, family)
    R = host(_window.factorize(xp_np, K, cap))
    keep = [i for i in range(n) if i != k]
    ref = host(_window.factorize(xp_np, K[np.ix_(keep, keep)], cap))
    for name, fn in implementations(np):
        src = R.copy()
        dst = src if in_place else np.full_like(R, np.nan)
        fn(src, dst, n, k)
        _window.pad(xp_np, dst, n - 1)
        scale = np.abs(ref).max()
        assert np.all(np.isfinite(dst)), name
        np.testing.assert_allclose(dst, ref, rtol=0, atol=1e-12 * scale * max(1.0, np.sqrt(n)), err_msg=name)
        assert np.array_equal(np.tril(dst[: n - 1, : n - 1], -1), np.zeros((n - 1, n - 1)))


def test_drop_kernel_matches_mirror_closely():
    """Same operations in the same order: equal to a few ulps (FMA contraction may differ)."""
    if not cpu.available():
        pytest.skip("CPU extension not built")
    K = spd(200, 3, "clusters")
    R = host(_window.factorize(xp_np, K, 210))
    a, b = np.empty_like(R), np.empty_like(R)
    cpu.chol_drop(R, a, 200, 17)
    _window.drop_rows_numpy(xp_np, R, b, 200, 17)
    written = b[:199, :199]  # the rest of the (210, 210) outputs is never written: uninitialised memory
    np.testing.assert_allclose(a[:199, :199], written, rtol=1e-14, atol=1e-15 * np.abs(written).max())


@given(n=st.integers(2, 60), k=st.integers(0, 59), seed=st.integers(0, 1000), in_place=st.booleans(),
       family=st.sampled_from(["iid", "clusters", "huge_row"]))  # fmt: skip
def test_drop_with_a_right_hand_side_solves_with_the_new_factor(n, k, seed, in_place, family):
    """``_window.drop(..., rhs=a)`` returns R̃⁻ᵀa for the new factor: the fused CPU sweep equals
    the drop followed by the compiled solve bit for bit, and a dense solve to rounding."""
    k %= n
    K = spd(n, seed, family)
    R = host(_window.factorize(xp_np, K, n + 2))
    a = np.random.default_rng(seed).standard_normal(n - 1)
    src = R.copy()
    dst = src if in_place else np.full_like(R, np.nan)
    r = _window.drop(xp_np, src, dst, n, k, rhs=a)
    Rt = dst[: n - 1, : n - 1]
    np.testing.assert_allclose(Rt.T @ r, a, rtol=0, atol=1e-9 * np.abs(Rt).max() * np.abs(r).max() * n)
    if cpu.available():  # the same operations as drop, then solve_ut
        src2 = R.copy()
        dst2 = src2 if in_place else np.full_like(R, np.nan)
        cpu.chol_drop(src2, dst2, n, k)
        B = np.zeros((n + 2, 1))
        B[: n - 1, 0] = a
        cpu.solve_upper(dst2, B, n - 1, trans=True)
        assert np.array_equal(r, B[: n - 1, 0]) and np.array_equal(dst[: n - 1, : n - 1], dst2[: n - 1, : n - 1])


@given(n=st.integers(0, 40), seed=st.integers(0, 1000), family=st.sampled_from(["iid", "collinear", "duplicate"]))
def test_append_equals_a_fresh_factor(n, seed, family):
    K = spd(n + 1, seed, family)
    R = _window.factorize(xp_np, K[:n, :n], n + 3)
    r, rho = _window.new_column(xp_np, R, n, K[:n, n], K[n, n])
    _window.write_column(R, n, r, rho)
    ref = _window.factorize(xp_np, K, n + 3)
    np.testing.assert_allclose(R, ref, rtol=0, atol=1e-11 * np.abs(ref).max())


def test_append_of_a_dependent_vector_floors_its_pivot():
    """The second vector equals the first with no damping: ρ² is rounding noise. The pivot is
    floored at the rounding level, so RᵀR = K to a backward error of a few ε·‖K‖, and nothing
    was written before the column is committed."""
    K = np.array([[1.0, 1.0], [1.0, 1.0]])
    R = _window.factorize(xp_np, K[:1, :1], 3)
    before = R.copy()
    r, rho = _window.new_column(xp_np, R, 1, K[:1, 1], K[1, 1])
    assert np.array_equal(R, before)
    assert 0 < rho <= 1e-7
    _window.write_column(R, 1, r, rho)
    Ra = R[:2, :2]
    assert np.max(np.abs(Ra.T @ Ra - K)) <= 16 * 2.0**-52
    # a whole system beyond 1/ε falls back from LAPACK to floored appends
    G = np.tile(testing.gradients("iid", 1, 30, seed=1, dtype="float64"), (4, 1))
    R = _window.factorize(xp_np, G @ G.T, 5)
    assert np.max(np.abs(R[:4, :4].T @ R[:4, :4] - G @ G.T)) <= 64 * 2.0**-52 * np.abs(G @ G.T).max()
    with pytest.raises(ValueError, match="not finite"):
        _window.new_column(xp_np, R, 1, np.array([np.inf]), 1.0)


@given(n=st.integers(1, 40), k=st.integers(0, 39), seed=st.integers(0, 1000))
def test_refresh_from_equals_a_fresh_factor(n, k, seed):
    """After row/column k of K changes, recomputing the factor from k on matches a fresh one."""
    k %= n
    K = spd(n, seed)
    R = _window.factorize(xp_np, K, n + 2)
    v = np.random.default_rng(seed).standard_normal(3 * n + 7)
    G = testing.gradients("iid", n, 3 * n + 7, seed=seed, dtype="float64")
    G[k] = v
    K2 = G @ G.T + 1e-3 * np.eye(n)
    _window.refresh_from(xp_np, R, K2, k)
    ref = _window.factorize(xp_np, K2, n + 2)
    np.testing.assert_allclose(R, ref, rtol=0, atol=1e-11 * np.abs(ref).max())


def test_window_factor_solves_whitens_and_logdets():
    """Slot order in, slot order out; empty slots are μ' on the diagonal of K'."""
    rng = np.random.default_rng(1)
    cap, mu = 9, 0.25
    G = np.zeros((cap, 30))
    occupied = [4, 1, 7, 0, 2]  # age order
    G[occupied] = rng.standard_normal((5, 30))
    gram = G @ G.T
    K_age = gram[np.ix_(occupied, occupied)] + mu * np.eye(5)
    R = _window.factorize(xp_np, K_age, cap)
    f = _window.WindowFactor(xp_np, R, np.array(occupied), (cap - 5) * np.log(mu))  # Σ log μ' over empty slots
    K = gram + mu * np.eye(cap)
    P = rng.standard_normal((1, cap, 3))
    P[0, [3, 5, 6, 8]] = 0.0  # empty slots have zero Gram rows, so zero right-hand sides
    C = f.solve(P)[0]
    assert np.linalg.norm(K @ C - P[0]) <= 1e-13 * np.linalg.norm(K) * np.linalg.norm(C)
    W = f.whiten(G[None])[0]  # columns of G whitened: WᵀW = Gᵀ K'⁻¹ G over the occupied slots
    Go = G[occupied]
    np.testing.assert_allclose(W.T @ W, Go.T @ np.linalg.solve(K_age, Go), rtol=1e-10, atol=1e-12)
    assert abs(f.logdets()[0] - np.linalg.slogdet(K)[1]) <= 1e-12 * abs(np.linalg.slogdet(K)[1])


@pytest.mark.parametrize("m", [1, 2, 31, 33, 64])
def test_mfac_coefficients_from_the_factor(m):
    """D and B derived from the window factor (any frame) equal M-FAC's Algorithm 1."""
    G = testing.gradients("iid", m, m + 40, seed=m, dtype="float64")
    damp, n = 0.1, float(m)
    frame = 3  # σ = 2^-3: K' = σ²(GGᵀ + λn·I)
    sigma2 = 2.0**-6
    R = _window.factorize(xp_np, sigma2 * (G @ G.T + damp * n * np.eye(m)), m)
    D, B = _window.mfac_coefficients(xp_np, R, m, damp, n, frame)
    Dp, Bp = reference.dynamic_coefficients(G @ G.T, damp, n, dtype=np.float64)
    np.testing.assert_allclose(D, Dp, rtol=1e-10, atol=1e-12 * np.abs(Dp).max())
    np.testing.assert_allclose(B, Bp, rtol=1e-9, atol=1e-12 * np.abs(Bp).max())
    Dc, Bc = _coef.coefficients(xp_np, G @ G.T, damp, n)
    np.testing.assert_allclose(B, Bc, rtol=1e-9, atol=1e-12 * np.abs(Bc).max())


@pytest.mark.parametrize("n", [1, 5, 64, 257])
def test_compiled_level2_loops_match_blas(n):
    if not cpu.available():
        pytest.skip("CPU extension not built")
    rng = np.random.default_rng(n)
    K = spd(n, n)
    R = np.ascontiguousarray(_window.factorize(xp_np, K, n + 3))
    B = np.zeros((n + 3, 4))
    B[:n] = rng.standard_normal((n, 4))
    B[: n // 2, 0] = 0.0  # leading zeros are skipped, not mishandled
    for trans in (True, False):
        out = B.copy()
        cpu.solve_upper(R, out, n, trans)
        Ra = R[:n, :n]
        ref = np.linalg.solve(Ra.T if trans else Ra, B[:n])
        np.testing.assert_allclose(out[:n], ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
        assert np.array_equal(out[n:], B[n:])


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(1, 0), (33, 0), (33, 32), (1000, 0), (1000, 517), (1025, 1024)])
@pytest.mark.parametrize("in_place", [False, True])
def test_drop_cuda_kernel_matches_mirror(n, k, in_place):
    import cupy

    xp = _backend.namespace_from_argument(cupy)
    K = spd(n, n)
    R = _window.factorize(xp_np, K, n + 2)
    ref = np.empty_like(R)
    _window.drop_rows_numpy(xp_np, R, ref, n, k)
    src = cupy.asarray(R)
    dst = src if in_place else cupy.full_like(src, cupy.nan)
    _backend.kernels(xp).chol_drop(src, dst, n, k)
    out = host(dst)
    written = ref[: n - 1, : n - 1]  # the rest of ref is never written: uninitialised memory
    scale = np.abs(written).max(initial=0.0)
    np.testing.assert_allclose(out[: n - 1, : n - 1], written, rtol=1e-13, atol=1e-14 * scale)
