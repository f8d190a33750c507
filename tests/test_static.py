"""StaticInverse against dense float64 inverses (docs/design.md §8 families and targets)."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from helpers import STORAGE, dense_inverse, family, host, to_device, tolerances
from hypothesis import given
from hypothesis import strategies as st

import rank1inv as r1
from rank1inv import testing

DAMPS = (1e-1, 1e-4, 1e-6)


def check_queries(op, G, damp, rng, xp, *, scale=None, k=3):
    """Every query of ``op`` against the dense inverse; returns the measured errors."""
    eta_tol, rel_tol = tolerances(G.dtype)
    F, Finv, cond = dense_inverse(G, damp, scale, op.block_sizes)
    d = F.shape[0]
    X = rng.standard_normal((d, k))
    Y = op @ xp.asarray(X)
    assert Y.shape == (d, k)
    eta = testing.backward_error(F, host(Y), X)
    assert eta <= eta_tol, f"backward error {eta:.2e} > {eta_tol:g} (cond {cond:.1e})"
    y1 = op.matvec(xp.asarray(X[:, 0]))
    assert y1.shape == (d,)
    assert testing.backward_error(F, host(y1), X[:, 0]) <= eta_tol
    if cond <= 1e9:
        assert testing.relative_error(host(op.diag()), np.diag(Finv)) <= rel_tol
        rows, cols = rng.integers(0, d, 40), rng.integers(0, d, 40)
        assert testing.entry_error(host(op.entries(xp.asarray(rows), xp.asarray(cols))), Finv, rows, cols) <= rel_tol
        assert testing.relative_error(host(op.diag(xp.asarray(rows))), np.diag(Finv)[rows]) <= rel_tol
        idx = np.unique(rng.integers(0, d, min(d, 12)))
        sub = host(op.submatrix(xp.asarray(idx)))
        scale_ij = np.sqrt(np.outer(np.diag(Finv)[idx], np.diag(Finv)[idx]))
        assert np.max(np.abs(sub - Finv[np.ix_(idx, idx)]) / scale_ij) <= rel_tol
        j = int(rng.integers(0, d))
        col = host(op.column(j))
        assert np.max(np.abs(col - Finv[:, j]) / np.sqrt(np.diag(Finv) * Finv[j, j])) <= rel_tol
    # log det is sensitive to O(ε‖G‖²) perturbations of the small eigenvalues: the dense
    # reference itself is only good to about rank·ε·cond(F)
    sign, logdet = np.linalg.slogdet(F)
    assert abs(op.logdet() - logdet) <= 1e-8 * max(1.0, abs(logdet)) + 10 * min(G.shape) * 1e-16 * cond + 1e-9
    return eta


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("name", testing.FAMILIES)
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_families_full_and_blocked(xp, name, dtype, scale, rng):
    for damp in DAMPS:
        for m, d, blocks in ((48, 300, None), (40, 24, None), (24, 150, 40), (16, 90, [10, 50, 30])):
            G_host = family(name, m, d, scale=scale, seed=7, dtype=dtype)
            if G_host is None:  # beyond float16's range
                continue
            op = r1.StaticInverse(to_device(xp, G_host), damp, block_size=blocks)
            check_queries(op, G_host, damp, rng, xp)


block_layouts = st.one_of(
    st.none(),
    st.integers(1, 70),
    st.lists(st.integers(1, 25), min_size=1, max_size=6),
)


@given(
    m=st.integers(1, 40),
    d=st.integers(1, 70),
    dtype=st.sampled_from(STORAGE),
    name=st.sampled_from(testing.FAMILIES),
    damp=st.sampled_from(DAMPS),
    layout=block_layouts,
    scale=st.sampled_from([None, 0.5, "count"]),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_layouts(xp, m, d, dtype, name, damp, layout, scale, seed):
    rng = np.random.default_rng(seed)
    if isinstance(layout, list):
        layout = layout + [d - sum(layout)] if sum(layout) < d else None
    G = family(name, m, d, seed=seed, dtype=dtype)
    if G is None:
        return
    op = r1.StaticInverse(to_device(xp, G), damp, scale=scale, block_size=layout)
    s = 0.5 if scale == 0.5 else 1.0 / m
    assert op.scale == s
    check_queries(op, G, damp, rng, xp, scale=s, k=2)


def test_equal_blocks_are_one_batch(xp):
    G = xp.asarray(testing.gradients("iid", 8, 100, seed=1))
    assert len(r1.StaticInverse(G, 1e-2, block_size=10)._layout.runs) == 1
    assert len(r1.StaticInverse(G, 1e-2, block_size=30)._layout.runs) == 2  # 3×30 + 10
    assert r1.StaticInverse(G, 1e-2, block_size=30).block_sizes == (30, 30, 30, 10)


def test_blocks_equal_separate_operators(xp, rng):
    G = testing.gradients("lowrank", 12, 60, seed=3, dtype="float64")
    op = r1.StaticInverse(xp.asarray(G), 1e-3, block_size=[20, 5, 35])
    x = rng.standard_normal(60)
    y = host(op @ xp.asarray(x))
    a = 0
    for b in (20, 5, 35):
        part = r1.StaticInverse(xp.asarray(G[:, a : a + b]), 1e-3, scale=1 / 12)
        np.testing.assert_allclose(y[a : a + b], host(part @ xp.asarray(x[a : a + b])), rtol=1e-10, atol=0)
        a += b
    e = host(op.entries(xp.asarray([0, 19, 20, 19]), xp.asarray([19, 0, 25, 20])))
    assert e[2] == 0.0 and e[3] == 0.0  # across blocks
    assert e[0] != 0.0


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("name", testing.FAMILIES)
def test_vectors_in_the_span(xp, name, dtype, rng):
    """x = g_j or a combination of gradients: λ⁻¹(x − Gᵀc) would cancel; the targets still hold."""
    eta_tol, _ = tolerances(dtype)
    for scale in (1.0, 100.0):
        G = family(name, 24, 200, scale=scale, seed=8, dtype=dtype)
        if G is None:
            continue
        for damp in DAMPS:
            op = r1.StaticInverse(to_device(xp, G), damp)
            F, _, _ = dense_inverse(G, damp)
            X = np.stack([G[0], G[5], G[:6].T @ rng.standard_normal(6)], axis=1).astype(np.float64)
            assert testing.backward_error(F, host(op @ xp.asarray(X)), X) <= eta_tol


def test_entries_without_the_w_cache(xp, rng, monkeypatch):
    """Large problems whiten the requested columns on demand instead of caching W."""
    from rank1inv.groups import woodbury as _woodbury

    monkeypatch.setattr(_woodbury, "W_CACHE_BYTES", 0)
    G = xp.asarray(testing.gradients("lowrank", 12, 90, seed=2, dtype="float64"))
    for blocks in (None, 30, [20, 70]):
        op = r1.StaticInverse(G, 1e-3, block_size=blocks)
        _, Finv, _ = dense_inverse(G, 1e-3, None, op.block_sizes)
        rows, cols = rng.integers(0, 90, 50), rng.integers(0, 90, 50)
        assert testing.entry_error(host(op.entries(xp.asarray(rows), xp.asarray(cols))), Finv, rows, cols) <= 1e-9
        idx = np.unique(rng.integers(0, 90, 15))
        np.testing.assert_allclose(host(op.submatrix(xp.asarray(idx))), Finv[np.ix_(idx, idx)], rtol=1e-8, atol=1e-8)
        assert all(g._W is None for g in op._groups() if hasattr(g, "_W"))


def test_symmetric_dot_test(xp, rng):
    G = xp.asarray(testing.gradients("collinear", 30, 200, seed=2))
    op = r1.StaticInverse(G, 1e-4)
    x, y = rng.standard_normal(200), rng.standard_normal(200)
    ax, ay = host(op @ xp.asarray(x)), host(op @ xp.asarray(y))
    assert abs(x @ ay - y @ ax) <= 1e-6 * np.linalg.norm(ax) * np.linalg.norm(y)
    assert float(host(op.diag()).min()) > 0.0  # SPD


def test_fisher_operator(xp, rng):
    G = xp.asarray(testing.gradients("iid", 20, 80, seed=4, dtype="float64"))
    op = r1.StaticInverse(G, 1e-2, block_size=30)
    F, _, _ = dense_inverse(G, 1e-2, None, op.block_sizes)
    fop = op.fisher()
    x = rng.standard_normal(80)
    np.testing.assert_allclose(host(fop @ xp.asarray(x)), F @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(fop.diag()), np.diag(F), rtol=1e-12)
    np.testing.assert_allclose(host(fop.to_dense()), F, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(host(op @ (fop @ xp.asarray(x))), x, rtol=1e-8, atol=1e-10)


def test_scipy_solvers_round_trip(rng):
    G = testing.gradients("lowrank", 32, 120, seed=5, dtype="float64")
    op = r1.StaticInverse(G, 1e-2)
    F, Finv, _ = dense_inverse(G, 1e-2)
    A = op.aslinearoperator()
    assert isinstance(A, spla.LinearOperator)
    assert A.dtype == np.float64 and A.shape == (120, 120)
    b = rng.standard_normal(120)
    target = F @ b  # solves of F⁻¹ z = b
    for solver in (spla.cg, spla.minres, spla.gmres):
        kw = {"rtol": 1e-10} if solver is not spla.minres else {"rtol": 1e-12}
        z, info = solver(A, b, maxiter=2000, **kw)
        assert info == 0, solver.__name__
        assert np.linalg.norm(z - target) <= 1e-6 * np.linalg.norm(target), solver.__name__
    z = spla.lsmr(A, b, atol=1e-14, btol=1e-14, maxiter=5000)[0]
    assert np.linalg.norm(z - target) <= 1e-6 * np.linalg.norm(target)
    vals = spla.eigsh(A, k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(Finv)[-3:], rtol=1e-8)
    # 2-D right-hand sides and rmatvec
    B2 = rng.standard_normal((120, 2))
    np.testing.assert_allclose(A @ B2, Finv @ B2, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(A.rmatvec(b), Finv @ b, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(A.matvec(b[:, None])[:, 0], Finv @ b, rtol=1e-8, atol=1e-8)


def test_float32_operator_dtype_and_promotion(xp):
    G = xp.asarray(testing.gradients("iid", 10, 40, seed=1))
    op = r1.StaticInverse(G, 1e-2)
    assert op.dtype == xp.float32 and op.shape == (40, 40)
    assert (op @ xp.ones(40, dtype=xp.float32)).dtype == xp.float32
    assert (op @ xp.ones(40, dtype=xp.float64)).dtype == xp.float64
    assert (op @ xp.ones(40, dtype=xp.int64)).dtype == xp.float32
    assert op.aslinearoperator().dtype == np.float32


def test_native_accumulation_close(xp, rng):
    G = xp.asarray(testing.gradients("iid", 30, 300, seed=9))
    x = rng.standard_normal(300)
    a = host(r1.StaticInverse(G, 1e-1, accumulate="native") @ xp.asarray(x))
    b = host(r1.StaticInverse(G, 1e-1) @ xp.asarray(x))
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_agrees_with_paper_reference_float64(rng):
    from rank1inv import reference

    G = testing.gradients("iid", 24, 150, seed=11, dtype="float64")
    damp = 1e-1
    V, q = reference.static_precompute(G, damp, dtype=np.float64)
    op = r1.StaticInverse(G, damp)
    x = rng.standard_normal(150)
    ref = reference.static_apply(V, q, damp, x)
    assert np.linalg.norm(op @ x - ref) <= 1e-10 * np.linalg.norm(ref)
    np.testing.assert_allclose(op.diag(), reference.static_diag(V, q, damp), rtol=1e-10)
    assert abs(op.entries([3], [7])[0] - reference.static_entry(V, q, damp, 3, 7)) <= 1e-10 * op.diag([3])[0]


def test_agrees_with_paper_reference_float32_well_conditioned(rng):
    from rank1inv import reference

    G = testing.gradients("iid", 24, 150, seed=12)
    damp = 1e-1
    V, q = reference.static_precompute(G, damp)
    op = r1.StaticInverse(G, damp)
    x = rng.standard_normal(150).astype(np.float32)
    ref = reference.static_apply(V, q, damp, x)
    assert np.linalg.norm(op @ x - ref) <= 1e-5 * np.linalg.norm(ref)
    np.testing.assert_allclose(op.diag(), reference.static_diag(V, q, damp), rtol=1e-5)


def test_float64_accumulation_beats_reference_on_lowrank():
    """docs/design.md §3: the paper's float32 arithmetic loses the diagonal on low-rank data."""
    from rank1inv import reference

    G = testing.gradients("lowrank", 64, 800, seed=0)
    damp = 1e-6
    _, Finv, cond = dense_inverse(G, damp)
    assert cond <= 1e9
    ours = testing.relative_error(r1.StaticInverse(G, damp).diag(), np.diag(Finv))
    V, q = reference.static_precompute(G, damp)
    paper = testing.relative_error(reference.static_diag(V, q, damp), np.diag(Finv))
    assert ours <= 1e-6
    assert paper > 100 * ours


# ----------------------------------------------------------------------------- validation
def test_rejects_bad_input(xp):
    G = xp.asarray(testing.gradients("iid", 5, 12, seed=0))
    with pytest.raises(ValueError, match="ndim"):
        r1.StaticInverse(G[0], 1.0)
    with pytest.raises(ValueError, match="ndim"):
        r1.StaticInverse(G[None], 1.0)
    with pytest.raises(ValueError, match="at least one"):
        r1.StaticInverse(G[:0], 1.0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        r1.StaticInverse(xp.ones((3, 4), dtype=xp.int32), 1.0)
    bad = xp.asarray(G, copy=True)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        r1.StaticInverse(bad, 1.0)
    for damp in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="damp"):
            r1.StaticInverse(G, damp)
    with pytest.raises(TypeError, match="damp"):
        r1.StaticInverse(G, "1")
    with pytest.raises(ValueError, match="scale"):
        r1.StaticInverse(G, 1.0, scale=-2.0)
    with pytest.raises(ValueError, match="scale"):
        r1.StaticInverse(G, 1.0, scale="mean")
    with pytest.raises(ValueError, match="sum"):
        r1.StaticInverse(G, 1.0, block_size=[5, 5])
    with pytest.raises(ValueError, match="block_size"):
        r1.StaticInverse(G, 1.0, block_size=0)
    with pytest.raises(TypeError, match="ints"):
        r1.StaticInverse(G, 1.0, block_size=[6.0, 6.0])
    with pytest.raises(ValueError, match="accumulate"):
        r1.StaticInverse(G, 1.0, accumulate="float16")
    with pytest.raises(TypeError, match="array"):
        r1.StaticInverse("G", 1.0)
    assert r1.StaticInverse([[1.0, 2.0]], 1.0).dtype == np.float64  # nested lists become NumPy
    # gradients whose Gram matrix overflows float64 are handled in a scaled frame: with all
    # rows equal to c·1, F⁻¹ = I − 1·1ᵀ·c²/(1 + 10c²) to rounding
    y = host(r1.StaticInverse(xp.full((3, 10), 1e200), 1.0) @ xp.asarray(np.arange(10.0)))
    np.testing.assert_allclose(y, np.arange(10.0) - 4.5, rtol=1e-12)


def test_rejects_bad_queries(xp):
    op = r1.StaticInverse(xp.asarray(testing.gradients("iid", 5, 12, seed=0)), 1.0)
    with pytest.raises(ValueError, match="shape"):
        op @ xp.ones(11)
    with pytest.raises(ValueError, match="shape"):
        op.matmat(xp.ones(12))
    with pytest.raises(ValueError, match="non-finite"):
        op @ xp.full(12, float("inf"))
    with pytest.raises(TypeError, match="real"):
        op @ xp.ones(12, dtype=xp.complex128)
    with pytest.raises(IndexError, match="out of range"):
        op.diag([12])
    with pytest.raises(IndexError, match="out of range"):
        op.entries([0, -1], [0, 0])
    with pytest.raises(ValueError, match="same length"):
        op.entries([0, 1], [0])
    with pytest.raises(TypeError, match="integers"):
        op.entries(xp.asarray([0.5]), xp.asarray([1.0]))
    with pytest.raises(IndexError):
        op.column(12)
    with pytest.raises(ValueError, match="max_dim"):
        op.to_dense(max_dim=10)
    if xp is not np:
        with pytest.raises(TypeError, match="NumPy"):
            op @ np.ones(12)


def test_inputs_never_modified(xp, rng):
    G = xp.asarray(testing.gradients("lowrank", 10, 50, seed=1))
    G0 = xp.asarray(G, copy=True)
    x = xp.asarray(rng.standard_normal((50, 2)))
    x0 = xp.asarray(x, copy=True)
    for blocks in (None, 7):
        op = r1.StaticInverse(G, 1e-3, block_size=blocks)
        op @ x
        op.diag()
        op.submatrix([1, 2, 3])
        op.fisher() @ x
        idx = xp.asarray([3, 1, 2])
        op.entries(idx, idx)
        assert np.array_equal(host(idx), [3, 1, 2])
    assert np.array_equal(host(G), host(G0))
    assert np.array_equal(host(x), host(x0))


def test_reference_overwrite_matches_copy():
    from rank1inv import reference

    G = testing.gradients("iid", 10, 40, seed=3)
    V, q = reference.static_precompute(G, 0.1)
    G2 = G.copy()
    V2, q2 = reference.static_precompute(G2, 0.1, overwrite=True)
    assert V2 is G2 and np.array_equal(V, V2) and np.array_equal(q, q2)
    assert not np.array_equal(G, G2)  # the copy path left G alone; overwrite used its storage


def _near_duplicates(seed, m, d, noise):
    """Two directions, each gradient one of them + noise (duplicates to within ~1e-7), with λ
    for cond(F) ≈ 7e13: the regime where a fixed number of corrections left η near 1e-11."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((2, d))[np.arange(m) % 2] + noise * rng.standard_normal((m, d))
    damp = np.linalg.norm(G, 2) ** 2 / m / 7e13
    X = np.stack([rng.standard_normal(d), G[0], G.T @ rng.standard_normal(m), G[0] - G[2]], 1)
    return G, damp, X


@pytest.mark.parametrize("noise", [5e-8, 1e-7])
def test_near_duplicates_at_cond_1e14_reach_the_float64_target(noise):
    """Refinement of the corrected products runs until δc is at rounding level, and products
    with a system conditioned beyond 1e9 take the corrected form (docs/numerics.md)."""
    worst = 0.0
    for seed in range(8):
        for m, d in ((4, 500), (6, 500), (6, 200), (8, 100)):
            G, damp, X = _near_duplicates(seed, m, d, noise)
            F = testing.dense_fisher(G, damp)
            op = r1.StaticInverse(G, damp)
            w = r1.DynamicInverse(d, m, damp, scale=1 / m, dtype="float64")
            for g in G:
                w.push(g)
            for Xs in (X, X[:, :1]):  # with span vectors, and a random vector alone (the one-pass form)
                worst = max(worst, testing.backward_error(F, op @ Xs, Xs), testing.backward_error(F, w @ Xs, Xs))
    assert worst <= 5e-12, worst
