"""G as a memory-mapped file: the same operator as in memory (the passes stream it in tiles)."""

import numpy as np

import rank1inv as r1
from rank1inv import testing


def test_memmapped_gradients_give_the_same_operator(tmp_path):
    G = testing.gradients("clusters", 12, 5003, seed=1, dtype="float32")
    path = tmp_path / "G.npy"
    np.save(path, G)
    Gm = np.load(path, mmap_mode="r")
    assert isinstance(Gm, np.memmap)
    x = np.random.default_rng(0).standard_normal(5003).astype(np.float32)
    a, b = r1.StaticInverse(Gm, 1e-3), r1.StaticInverse(G, 1e-3)
    np.testing.assert_array_equal(a @ x, b @ x)
    np.testing.assert_array_equal(a.diag(), b.diag())
    assert a.logdet() == b.logdet()
    w = r1.DynamicInverse(5003, 4, 1e-3)
    w.push_many(Gm[:4])  # rows of a memmap push like any array
    np.testing.assert_allclose(w @ x, r1.StaticInverse(G[:4], 1e-3, scale=0.25) @ x, rtol=1e-6)
