"""The backend line: batched triangular solves against SciPy, one system at a time."""

import numpy as np
import pytest
import scipy.linalg
from helpers import host

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
