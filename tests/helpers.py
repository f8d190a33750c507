"""Shared test helpers: host copies and dense float64 references."""

import numpy as np

from rank1inv import testing

STORAGE = ["float32", "float64", "bfloat16", "float16"]


def host(a):
    """A float64 NumPy copy of an array from any backend."""
    if hasattr(a, "get"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def family(name, m, d, *, scale=1.0, seed=0, dtype="float32"):
    """``testing.gradients`` in any storage dtype; None where the values do not fit it (float16
    overflows beyond 65504: the huge row, scale 100)."""
    from rank1inv import _precision, testing

    G = testing.gradients(name, m, d, scale=scale, seed=seed, dtype="float64")
    if np.max(np.abs(G)) > _precision.of(dtype).max_value:
        return None
    return np.ascontiguousarray(G.astype(_precision.numpy_dtype(dtype)))


def tolerances(dtype):
    """(backward error, diag/entry relative error) targets of docs/design.md §8 for a storage dtype."""
    from rank1inv import _precision

    policy = _precision.of(dtype)
    return policy.eta, policy.rel


def dense_inverse(G, damp, scale=None, block_sizes=None):
    F = testing.dense_fisher(host(G), damp, scale, block_sizes)
    return F, np.linalg.inv(F), np.linalg.cond(F)


def to_device(xp, G):
    """A host array on the backend under test (bfloat16 as its bit patterns on CuPy)."""
    from rank1inv import _precision

    if xp is not np and G.dtype == _precision.numpy_dtype("bfloat16"):
        return xp.asarray(G.view(np.uint16))
    return xp.asarray(G)
