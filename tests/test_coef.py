"""M-FAC coefficients: direct, blocked (GPU schedule mirror) and the paper's Algorithm 1."""

import numpy as np
import pytest
from helpers import host
from hypothesis import given
from hypothesis import strategies as st

from rank1inv import _backend, reference
from rank1inv.groups import coefficients as _coef

xp_np = _backend.namespace_from_argument(None)


def window(m, d, seed, dup=False):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, d))
    if dup and m > 2:
        G[1] = G[0]
    return G


@pytest.mark.parametrize("m", [1, 2, 31, 32, 33, 64, 65, 100])
def test_direct_blocked_and_paper_agree(m):
    G = window(m, m + 40, m)
    damp, n = 0.1, float(m)
    D, B = _coef.coefficients(xp_np, G @ G.T, damp, n)
    Db, Bb = _coef.coefficients(xp_np, G @ G.T, damp, n, method="blocked")
    Dp, Bp = reference.dynamic_coefficients(G @ G.T, damp, n, dtype=np.float64)
    np.testing.assert_allclose(D, Dp, rtol=1e-10, atol=1e-12 * np.abs(Dp).max())
    np.testing.assert_allclose(B, Bp, rtol=1e-9, atol=1e-12 * np.abs(Bp).max())
    np.testing.assert_allclose(Bb, B, rtol=1e-12, atol=1e-14 * np.abs(B).max())
    assert np.all(np.tril(D, -1) == 0) and np.all(np.triu(B, 1) == 0)
    np.testing.assert_allclose(np.diag(B), 1 / damp)


@given(m=st.integers(1, 80), seed=st.integers(0, 1000), tile=st.sampled_from([4, 32]))
def test_blocked_schedule_equals_direct(m, seed, tile):
    """The kernel's tiled schedule (any tile size, partial edge tiles) equals the direct B."""
    G = window(m, 3 * m + 5, seed, dup=seed % 2 == 0)
    damp, n = 1e-2, float(m)
    D, B = _coef.coefficients(xp_np, G @ G.T, damp, n)
    Bb = _coef.b_blocked(xp_np, D, n, damp, tile=tile)
    np.testing.assert_allclose(Bb, B, rtol=1e-9, atol=1e-9 * np.abs(B).max())


def test_not_positive_definite_is_a_clear_error():
    gram = -np.eye(3)
    with pytest.raises(ValueError, match="positive definite"):
        _coef.coefficients(xp_np, gram, 1.0, 0.5)
    assert host(gram).shape == (3, 3)


@pytest.mark.parametrize("m", [1, 5, 31, 32, 33, 64, 100, 257])
@pytest.mark.parametrize("family", ["iid", "clusters", "huge_row"])
def test_unit_lower_inverse_is_componentwise_accurate(xp, m, family):
    """The recursive inverse against L̃ from real coefficient matrices: componentwise residual
    |X·L − I| ≤ 1e-13·|X||L| (LAPACK's trtri reaches ~4e-16 here, an LU-based inverse 4e-12)."""
    from rank1inv import testing

    G = testing.gradients(family, m, 3 * m + 5, scale=100.0, seed=m, dtype="float64")
    damp, n = 1e-4, float(m)
    D, _ = _coef.coefficients(xp_np, G @ G.T, damp, n)
    L = _coef.unit_lower(xp_np, D, n)
    X = host(_coef.unit_lower_inverse(_backend.namespace_from_argument(xp), xp.asarray(L)))
    assert np.array_equal(X, np.tril(X)) and np.all(np.diagonal(X) == 1.0)
    residual = np.abs(X @ L - np.eye(m))
    assert np.all(residual <= 1e-13 * (np.abs(X) @ np.abs(L)) + 1e-300)
