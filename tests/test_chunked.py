"""StaticInverse over Dask arrays chunked along d (docs/design.md §13): every query against the
dense float64 inverse and the one-process operator, on the threaded scheduler and on a
dask.distributed LocalCluster (two worker processes on 127.0.0.1), including a lost worker."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")
import dask  # noqa: E402
from helpers import STORAGE, family  # noqa: E402

import rank1inv as r1  # noqa: E402
from rank1inv import _backend, testing  # noqa: E402


def chunked(G, width):
    return da.from_array(G, chunks=(G.shape[0], width))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    G=testing.gradient_sets(max_m=12, max_d=60, dtypes=tuple(STORAGE)),
    damp=st.sampled_from([1e-1, 1e-4, 1e-6]),
    width=st.integers(1, 25),
    data=st.data(),
)
def test_every_query_matches_the_dense_inverse(G, damp, width, data):
    m, d = G.shape
    if d <= m:  # gradient space only (refused below)
        return
    op = r1.StaticInverse(chunked(G, width), damp)
    testing.assert_inverse_close(op, G, damp)
    ref = r1.StaticInverse(G, damp)
    assert op.dtype == ref.dtype
    # the Gram matrix summed in another order: logdet within its rounding (cond-amplified)
    assert op.logdet() == pytest.approx(ref.logdet(), rel=1e-8, abs=1e-9)
    idx = data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=6))
    np.testing.assert_allclose(op.submatrix(idx), ref.submatrix(idx), rtol=1e-6, atol=1e-6 * float(ref.diag().max()))


@pytest.mark.parametrize("name", testing.FAMILIES)
@pytest.mark.parametrize("storage", STORAGE)
def test_families_and_derived_operators(name, storage):
    G = family(name, 9, 140, dtype=storage)
    if G is None:
        pytest.skip("the family does not fit this storage dtype")
    op = r1.StaticInverse(chunked(G, 33), 1e-3, scale=0.5)
    testing.assert_inverse_close(op, G, 1e-3, scale=0.5)
    F = testing.dense_fisher(G.astype(np.float64), 1e-3, 0.5)
    x = np.random.default_rng(1).standard_normal(140)
    f = op.fisher()
    tol = 1e-6 if storage != "float64" else 1e-13
    np.testing.assert_allclose(np.asarray(f @ x), F @ x, rtol=tol, atol=tol * np.abs(F @ x).max())
    np.testing.assert_allclose(np.asarray(f.diag()), np.diag(F), rtol=tol)
    half = np.asarray(op.power(-0.5) @ (op.power(-0.5) @ x), np.float64)
    assert testing.backward_error(F, half, x) <= 1e-6
    other = op.with_damp(0.25)
    testing.assert_inverse_close(other, G, 0.25, scale=0.5)
    e7 = np.zeros(140)
    e7[7] = 1.0
    assert testing.backward_error(F, np.asarray(op.column(7), np.float64), e7) <= (
        1e-7 if storage != "float64" else 5e-12
    )


def test_products_are_lazy_chunked_like_x_and_independent_of_the_chunking():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((16, 900))
    X = rng.standard_normal((900, 3))
    ops = [r1.StaticInverse(chunked(G, w), 1e-2) for w in (900, 128, 7)]
    x = da.from_array(X, chunks=(100, 3))
    view = ops[1]._group_list[0].Gg
    before = view.bytes_reduced
    Ys = [op @ x for op in ops]
    chunks = len(view.cuts)  # per product: G·x (m·k), ‖x‖² (k) per chunk of G: O(m), not O(d)
    assert view.bytes_reduced - before == chunks * 8 * (16 * 3 + 3)
    assert all(isinstance(Y, da.Array) and Y.chunks == x.chunks for Y in Ys)
    ref = r1.StaticInverse(G, 1e-2) @ X
    for Y in Ys:
        np.testing.assert_allclose(Y.compute(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    # 1-D, x @ op, NumPy right-hand sides, float32 outputs, scipy's LinearOperator
    np.testing.assert_allclose((ops[1] @ x[:, 0]).compute(), ref[:, 0], rtol=1e-12)
    np.testing.assert_allclose((x.T @ ops[1]).compute(), ref.T, rtol=1e-12)
    np.testing.assert_allclose((ops[1] @ X).compute(), ref, rtol=1e-12)
    lin = ops[1].aslinearoperator()
    np.testing.assert_allclose(lin.matvec(X[:, 0]), ref[:, 0], rtol=1e-12)
    op32 = r1.StaticInverse(chunked(G.astype(np.float32), 100), 1e-2)
    assert (op32 @ x.astype(np.float32)).dtype == np.float32
    assert (op32 @ x).dtype == np.float64  # a float64 x promotes, as for NumPy G


def test_refusals_and_errors_are_clear():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((8, 50))
    Gd = chunked(G, 10)
    with pytest.raises(ValueError, match="d > m"):
        r1.StaticInverse(chunked(G[:, :8], 4), 1e-2)
    with pytest.raises(ValueError, match="block layouts"):
        r1.StaticInverse(Gd, 1e-2, block_size=10)
    with pytest.raises(ValueError, match="one damping value"):
        r1.StaticInverse(Gd, [1e-2] * 50)
    bad = G.copy()
    bad[3, 17] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        r1.StaticInverse(chunked(bad, 10), 1e-2)
    with pytest.raises(TypeError):
        r1.StaticInverse(chunked(G.astype(np.int64), 10), 1e-2)
    op = r1.StaticInverse(Gd, 1e-2)
    with pytest.raises(ValueError, match="shape"):
        op @ da.ones((49,), chunks=7)
    with pytest.raises(ValueError, match="non-finite"):
        op @ da.from_array(np.full(50, np.inf), chunks=10)
    with pytest.raises(ValueError, match="max_dim"):
        op.to_dense(max_dim=10)
    # a result beyond float32 raises when it is computed, never a silent inf
    op32 = r1.StaticInverse(chunked(G.astype(np.float32), 10), 1e-30)
    y = op32 @ da.from_array(np.full(50, 1e30, dtype=np.float32), chunks=10)
    with pytest.raises(OverflowError):
        y.compute()
    # unknown chunk sizes
    masked = Gd[:, Gd[0] > -np.inf]
    with pytest.raises(ValueError, match="chunk sizes"):
        r1.StaticInverse(masked, 1e-2)


def test_pickles_and_copies():
    import copy
    import pickle

    G = np.random.default_rng(0).standard_normal((4, 50))
    op = r1.StaticInverse(chunked(G, 10), 0.1)
    x = np.random.default_rng(1).standard_normal(50)
    want = (op @ x).compute()
    for other in (pickle.loads(pickle.dumps(op)), copy.deepcopy(op)):
        np.testing.assert_array_equal((other @ x).compute(), want)


def test_inputs_are_not_modified_and_diag_warns_like_numpy():
    G = testing.gradients("duplicate", 6, 80, seed=2, dtype="float64")
    before = G.copy()
    op = r1.StaticInverse(chunked(G, 16), 1e-12)
    ref = r1.StaticInverse(G, 1e-12)
    with warnings.catch_warnings(record=True) as w_ref:
        warnings.simplefilter("always")
        d_ref = ref.diag()
    with warnings.catch_warnings(record=True) as w_dask:
        warnings.simplefilter("always")
        d = op.diag().compute(scheduler="synchronous")
    np.testing.assert_array_equal(G, before)
    np.testing.assert_allclose(d, d_ref, rtol=1e-12)
    assert bool(w_ref) == bool(w_dask)


# ----------------------------------------------------------------------------- a cluster
@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        silence_logs=40,
    ) as c, distributed.Client(c, timeout="60s") as client:  # fmt: skip
        yield c, client


def test_on_a_local_cluster_results_equal_one_process_and_survive_a_lost_worker(cluster):
    c, client = cluster
    rng = np.random.default_rng(5)
    for dtype, eta in (("float64", 5e-12), ("float32", 1e-7)):
        G = testing.gradients("clusters", 12, 2000, seed=4, dtype=dtype)
        X = rng.standard_normal((2000, 2))
        Gd = client.persist(chunked(G, 250))
        op = r1.StaticInverse(Gd, 1e-3)
        Y = (op @ da.from_array(X, chunks=(500, 2))).compute()
        with dask.config.set(scheduler="threads"):  # the same operator built and applied without the cluster
            local = r1.StaticInverse(chunked(G, 250), 1e-3)
            Y_threads = (local @ da.from_array(X, chunks=(500, 2))).compute()
        F = testing.dense_fisher(G.astype(np.float64), 1e-3)
        assert testing.backward_error(F, Y, X) <= eta
        assert testing.backward_error(F, Y_threads, X) <= eta  # (workers run the passes single-threaded)
        ref = r1.StaticInverse(G, 1e-3)
        np.testing.assert_allclose(op.diag().compute(), ref.diag(), rtol=1e-6)
        np.testing.assert_allclose(op.diag([0, 999, 1999]), ref.diag([0, 999, 1999]), rtol=1e-6)
        # lose a worker that holds chunks of G: Dask recomputes them from the graph
        worker = sorted(client.scheduler_info()["workers"])[0]
        assert any(worker in holders for holders in client.who_has(Gd).values())
        client.run(lambda: __import__("os")._exit(1), workers=[worker], on_error="ignore")  # its nanny restarts it
        Y_after = (op @ da.from_array(X, chunks=(500, 2))).compute()
        np.testing.assert_array_equal(Y_after, Y)  # same sums in the same order, on the same kind of worker
        client.wait_for_workers(2, timeout=60)


@pytest.mark.gpu
def test_cupy_chunks_equal_numpy_chunks():
    """A Dask array of CuPy chunks: the passes run on the GPU, the m×m algebra on CuPy."""
    import cupy

    G = testing.gradients("clusters", 16, 20_000, seed=2, dtype="float32")
    x = np.random.default_rng(3).standard_normal((20_000, 2))
    host = r1.StaticInverse(chunked(G, 3000), 1e-3)
    gpu = r1.StaticInverse(da.from_array(cupy.asarray(G), chunks=(16, 3000), asarray=False), 1e-3)
    Y = gpu @ da.from_array(cupy.asarray(x), chunks=(5000, 2), asarray=False)
    np.testing.assert_allclose(cupy.asnumpy(Y.compute()), (host @ x).compute(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cupy.asnumpy(gpu.diag().compute()), host.diag().compute(), rtol=1e-6)
    assert gpu.logdet() == pytest.approx(host.logdet(), rel=1e-8)


def test_dense_matrices_and_samples_are_lazy_and_right():
    """to_dense, fisher().to_dense() and samples of a Dask operator: the inherited queries, lazy."""
    rng = np.random.default_rng(8)
    G = rng.standard_normal((6, 40))
    op = r1.StaticInverse(chunked(G, 10), 1e-2)
    F = testing.dense_fisher(G, 1e-2)
    dense = op.to_dense()
    assert _backend.is_dask_array(dense)
    np.testing.assert_allclose(dense.compute(), np.linalg.inv(F), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op.fisher().to_dense().compute(), F, rtol=1e-12, atol=1e-12)
    z = rng.standard_normal((3, op.noise_dim))
    ref = r1.StaticInverse(G, 1e-2).sample_from_noise(z)
    got = op.sample_from_noise(z)
    assert _backend.is_dask_array(got)
    np.testing.assert_allclose(got.compute(), ref, rtol=1e-10, atol=1e-12)
    draws = op.sample(4000, rng=1).compute()
    cov = draws.T @ draws / draws.shape[0]
    Finv = np.linalg.inv(F)
    assert np.max(np.abs(cov - Finv)) <= 6 * np.sqrt(2 / 4000) * np.max(np.diag(Finv))
