"""Shared test helpers: host copies and dense float64 references."""

import numpy as np

from rank1inv import testing


def host(a):
    """A float64 NumPy copy of an array from any backend."""
    if hasattr(a, "get"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def tolerances(dtype):
    """(backward error, diag/entry relative error) targets of docs/design.md §8 for a storage dtype."""
    return (1e-7, 1e-6) if np.dtype(dtype) == np.float32 else (5e-12, 1e-6)


def dense_inverse(G, damp, scale=None, block_sizes=None):
    F = testing.dense_fisher(host(G), damp, scale, block_sizes)
    return F, np.linalg.inv(F), np.linalg.cond(F)
