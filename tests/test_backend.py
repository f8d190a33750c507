"""The backend line: batched triangular solves against SciPy, one system at a time; ldexp
against NumPy's."""

import numpy as np
import pytest
import scipy.linalg
from helpers import host
from hypothesis import given, settings
from hypothesis import strategies as st

from rank1inv import _backend


@pytest.mark.parametrize("nb,m,k", [(1, 4, 1), (3, 5, 2), (16, 4, 3), (40, 6, 1)])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("unit", [False, True])
def test_batched_solve_triangular(xp, nb, m, k, lower, trans, unit):
    """Batches of at least 4m systems go through the row-by-row substitution, smaller ones
    through the library's solver per system: both agree with SciPy per system."""
    rng = np.random.default_rng(nb * m * k)
    a = rng.standard_normal((nb, m, m)) + 4 * np.eye(m)
    a = np.tril(a) if lower else np.triu(a)
    b = rng.standard_normal((nb, m, k))
    ns = _backend.namespace_from_argument(xp)
    x = host(_backend.solve_triangular(ns, xp.asarray(a), xp.asarray(b), lower=lower, trans=trans, unit_diagonal=unit))
    for i in range(nb):
        ref = scipy.linalg.solve_triangular(a[i], b[i], lower=lower, trans=int(trans), unit_diagonal=unit)
        np.testing.assert_allclose(x[i], ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([np.float64, np.float32, np.float16]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    per_element=st.booleans(),
    with_out=st.booleans(),
)
def test_ldexp_is_numpys_bit_for_bit(dtype, seed, n, per_element, with_out):
    """_backend.ldexp (a multiplication where every 2^e is a normal number of the dtype) gives
    NumPy ldexp's bits: results that overflow, underflow to subnormals or zero, inputs that are
    subnormal, zero, inf or nan, exponents beyond the dtype's range (NumPy's own loop)."""
    info = np.finfo(dtype)
    rng = np.random.default_rng(seed)
    low, high = info.minexp - info.nmant - 2, info.maxexp + 2
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        a = (rng.standard_normal(n) * np.ldexp(1.0, rng.integers(low, high, n))).astype(dtype)
    a[rng.random(n) < 0.1] = 0.0
    a[rng.random(n) < 0.05] = rng.choice([np.inf, -np.inf, np.nan])
    span = rng.choice([2, 20, high - low + 20])
    e = rng.integers(-span, span, n if per_element else ())
    with np.errstate(over="ignore", under="ignore"):
        want = np.ldexp(a, e)
    out = np.empty_like(a) if with_out else None
    got = _backend.ldexp(np, a, e, out=out)
    assert got.dtype == want.dtype and (out is None or got is out)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
