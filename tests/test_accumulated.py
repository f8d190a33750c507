"""Fisher blocks from a stream of gradients (rank1inv/accumulated.py): every query equals
StaticInverse on the stored gradients, by backward error against dense float64 blocks; frames
follow magnitudes that grow along the stream; memory stays at the blocks' size."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rank1inv as r1
from rank1inv import obs, testing


def dense_blocks(G, damp, scale, sizes):
    """F/λ per block as float64 matrices (normalised so that huge G cannot overflow)."""
    G = np.asarray(G, dtype=np.float64)
    c = np.sqrt(scale / damp)
    out, start = [], 0
    for B in sizes:
        Gb = G[:, start : start + B] * c
        out.append(np.eye(B) + Gb.T @ Gb)
        start += B
    return out


def backward_error(blocks, damp, x, y):
    """η of y as F⁻¹x for block-diagonal F (``blocks`` are F_b/λ): max over blocks."""
    worst, start = 0.0, 0
    for Fb in blocks:
        B = Fb.shape[0]
        xb, yb = x[start : start + B], damp * np.asarray(y[start : start + B], dtype=np.float64)
        r = np.linalg.norm(Fb @ yb - xb)
        worst = max(worst, r / (np.linalg.norm(Fb, 2) * np.linalg.norm(yb) + np.linalg.norm(xb)))
        start += B
    return worst


def stream(G, k):
    return (G[i : i + k] for i in range(0, G.shape[0], k))


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(["float64", "float32"]))
    m = draw(st.integers(1, 40))
    d = draw(st.integers(1, 90))
    kind = draw(st.sampled_from(["none", "uniform", "layers"]))
    if kind == "none":
        block = None
    elif kind == "uniform":
        block = draw(st.integers(1, d))
    else:
        cuts = sorted(draw(st.sets(st.integers(1, d - 1), max_size=4))) if d > 1 else []
        edges = [0, *cuts, d]
        block = [b - a for a, b in zip(edges, edges[1:])]
    k = draw(st.integers(1, 9))
    grow = draw(st.sampled_from([0, 40, 300] if dtype == "float64" else [0, 20]))
    start = draw(st.integers(-200, 200) if dtype == "float64" else st.integers(-30, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, m, d, block, k, grow, start, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_stream_equals_stored_gradients(problem):
    """Products, diag, entries and logdet from a stream equal StaticInverse on the stored G
    (η ≤ 5e-12 float64, ≤ 1e-7 float32 against dense blocks), including magnitudes that grow
    by 2^300 midway (the sums are rescaled in powers of two)."""
    dtype, m, d, block, k, grow, start, seed = problem
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, d)) * 2.0**start
    G[m // 2 :] *= 2.0**grow  # a stream whose magnitudes grow midway
    G = G.astype(dtype)
    damp = 1e-2 * 2.0 ** (2 * (start + grow))  # on the scale of the largest gradients
    ref = r1.StaticInverse(G, damp, block_size=block)
    op = r1.StaticInverse.from_stream(stream(G, k), damp, dim=d, block_size=block)
    assert op.shape == ref.shape and op.num_gradients == m and op.block_sizes == ref.block_sizes
    blocks = dense_blocks(G, damp, 1.0 / m, ref.block_sizes)
    x = rng.standard_normal(d)
    tol = 5e-12 if dtype == "float64" else 1e-7
    assert backward_error(blocks, damp, x, op @ x) <= tol
    X = rng.standard_normal((d, 3))
    Y = op.matmat(X)
    for j in range(3):
        assert backward_error(blocks, damp, X[:, j], Y[:, j]) <= tol
    close = 1e-10 if dtype == "float64" else 1e-6
    a, b = np.asarray(op.diag(), dtype=np.float64), np.asarray(ref.diag(), dtype=np.float64)
    assert np.max(np.abs(a - b) / np.abs(b)) <= close
    rows, cols = rng.integers(0, d, 8), rng.integers(0, d, 8)
    a = np.asarray(op.entries(rows, cols), dtype=np.float64)
    b = np.asarray(ref.entries(rows, cols), dtype=np.float64)
    dg = np.asarray(ref.diag(), dtype=np.float64)
    scale = np.sqrt(dg[rows]) * np.sqrt(dg[cols])  # no underflow at 2^-600
    assert np.max(np.abs(a - b) / scale) <= close
    assert abs(op.logdet() - ref.logdet()) <= 1e-9 * max(1.0, abs(ref.logdet()))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_queries_and_pruning_match_the_stored_operator(dtype):
    """with_damp (scalar, per block, per coordinate), submatrix, column, power, fisher, samples
    and OBS (global, N:M, exact joint) agree with StaticInverse(G) on the same stored values."""
    rng = np.random.default_rng(1)
    m, d, B = 48, 120, 12  # many gradients, small blocks: the dense regime of the papers
    G = testing.gradients("lowrank", m, d, seed=3, dtype="float64")
    stored = np.asarray(G, dtype=np.float32) if dtype != "float64" else G
    if dtype == "bfloat16":
        import ml_dtypes

        stored = G.astype(ml_dtypes.bfloat16)
    op = r1.StaticInverse.from_stream(stream(stored, 5), 1e-3, dim=d, block_size=B)
    ref = r1.StaticInverse(stored, 1e-3, block_size=B)
    assert op.storage_dtype == ref.storage_dtype == dtype
    tol = 1e-10 if dtype == "float64" else 1e-5
    for new in (2e-2, tuple(np.linspace(1e-3, 1e-1, d // B)), np.linspace(1e-3, 1e-2, d)):
        a, b = op.with_damp(new), ref.with_damp(new)
        np.testing.assert_allclose(a.diag(), b.diag(), rtol=tol)
    idx = np.array([0, 5, 13, 14, 99])
    np.testing.assert_allclose(op.submatrix(idx), ref.submatrix(idx), rtol=tol, atol=tol * np.max(ref.diag()))
    np.testing.assert_allclose(op.column(7), ref.column(7), rtol=tol, atol=tol * np.max(ref.diag()))
    x = rng.standard_normal(d)
    np.testing.assert_allclose(op.power(-0.5) @ x, ref.power(-0.5) @ x, rtol=tol * 10, atol=tol)
    np.testing.assert_allclose(op.fisher() @ x, ref.fisher() @ x, rtol=tol)
    assert op.noise_dim == ref.noise_dim
    z = rng.standard_normal(op.noise_dim)
    np.testing.assert_allclose(op.sample_from_noise(z), ref.sample_from_noise(z), rtol=tol * 10, atol=tol)
    w = rng.standard_normal(d)
    for kwargs in ({}, {"update": "exact"}):
        m1, w1 = obs.prune(op, w, 0.5, **kwargs)
        m2, w2 = obs.prune(ref, w, 0.5, **kwargs)
        assert np.array_equal(m1, m2)
        np.testing.assert_allclose(w1, w2, rtol=1e-6, atol=1e-9)
    m1, _ = obs.prune_nm(op, w, 2, 4)
    m2, _ = obs.prune_nm(ref, w, 2, 4)
    assert np.array_equal(m1, m2)


def test_wide_blocks_keep_slices_and_few_gradients_are_woodbury():
    """A few gradients over wide blocks are held as slices, so the operator is StaticInverse's
    (Woodbury) even where a dense block would be numerically singular."""
    rng = np.random.default_rng(2)
    G = rng.standard_normal((6, 400)).astype(np.float32)
    op = r1.StaticInverse.from_stream(iter(G), 1e-9, dim=400, block_size=200)
    ref = r1.StaticInverse(G, 1e-9, block_size=200)
    x = rng.standard_normal(400)
    assert backward_error(dense_blocks(G, 1e-9, 1 / 6, [200, 200]), 1e-9, x, op @ x) <= 1e-7
    np.testing.assert_allclose(op.diag(), ref.diag(), rtol=1e-6)


def test_folded_wide_blocks_that_are_singular_are_refused_clearly():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((40, 200))  # float64: slices folded after 50/4 gradients
    with pytest.raises(ValueError, match="wider than the 40 gradients"):
        r1.StaticInverse.from_stream(stream(G, 8), 1e-300, dim=200, block_size=100)


def test_accumulator_is_atomic_and_operators_keep_their_sums():
    rng = np.random.default_rng(4)
    G = rng.standard_normal((30, 40))
    acc = r1.BlockAccumulator(40, 10)
    acc.add_many(G[:20])
    op = r1.StaticInverse(acc, 1e-2)
    before = op.diag()
    bad = G[20:25].copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        acc.add_many(bad)
    assert acc.count == 20
    with pytest.raises(ValueError, match="shape"):
        acc.add_many(G[:, :39])
    for g in G[20:]:
        acc.add(g)
    assert acc.count == 30
    np.testing.assert_array_equal(op.diag(), before)  # the operator kept the sums it was built on
    np.testing.assert_allclose(r1.StaticInverse(acc, 1e-2).diag(), r1.StaticInverse(G, 1e-2, block_size=10).diag(),
                               rtol=1e-12)  # fmt: skip
    assert acc.mean_square() == pytest.approx(float(np.mean(G**2)), rel=1e-12)
    import pickle

    again = pickle.loads(pickle.dumps((acc, op)))  # both pickle, as the operators do
    np.testing.assert_array_equal(again[1].diag(), before)
    again[0].add_many(G[:5])
    assert (again[0].count, acc.count) == (35, 30)
    with pytest.raises(ValueError, match="block layout"):
        r1.StaticInverse(acc, 1e-2, block_size=20)
    with pytest.raises(ValueError, match="no gradients"):
        r1.StaticInverse(r1.BlockAccumulator(40, 10), 1e-2)
    with pytest.raises(ValueError):  # the damping is checked before the stream is read
        r1.StaticInverse.from_stream(iter(()), -1.0, dim=40, block_size=10)


def test_accumulating_stays_at_the_blocks_memory():
    """m = 1024 gradients of d = 10⁶ in blocks of 50 (batches of 16, float32): peak traced
    memory at most 1.3× the float64 blocks plus one batch (a stored G would be 8× the blocks)."""
    d, B, k, m = 1_000_000, 50, 16, 1024
    batch = np.random.default_rng(5).standard_normal((k, d)).astype(np.float32)
    acc = r1.BlockAccumulator(d, B)
    tracemalloc.start()
    try:
        for _ in range(m // k):
            acc.add_many(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert acc.count == m
    assert peak <= 1.3 * (d * B * 8 + batch.nbytes)


def test_stream_on_each_backend(xp):
    """NumPy always, CuPy on a GPU: the sums live on G's device and equal StaticInverse there."""
    host = np.random.default_rng(6).standard_normal((64, 300)).astype(np.float32)
    G = xp.asarray(host)
    op = r1.StaticInverse.from_stream(stream(G, 16), 1e-3, dim=300, block_size=[50] * 5 + [25, 25])
    ref = r1.StaticInverse(G, 1e-3, block_size=[50] * 5 + [25, 25])
    x = xp.asarray(np.random.default_rng(7).standard_normal(300).astype(np.float32))
    np.testing.assert_allclose(r1._backend.to_host(op @ x), r1._backend.to_host(ref @ x), rtol=1e-5)
    np.testing.assert_allclose(r1._backend.to_host(op.diag()), r1._backend.to_host(ref.diag()), rtol=1e-6)
