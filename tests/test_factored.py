"""Gradients as layer factors (the exact-natural-gradient paper §2.1): every query of StaticInverse against the explicit
G built from the same factors (exact float64 products), the torch.nn.Linear layout, memory."""

import tracemalloc
import warnings

import numpy as np
import pytest
from helpers import host
from hypothesis import given
from hypothesis import strategies as st

import rank1inv as r1
from rank1inv import testing


def factors(rng, m, shapes, dtype, scale=1.0, positions=None):
    """One (A, E) pair per (n_in, n_out); 3-D (m, P, n) where ``positions`` gives P (None: 2-D)."""
    positions = positions or [None] * len(shapes)
    lead = lambda P: (m,) if P is None else (m, P)
    return [(rng.standard_normal((*lead(P), n_in)).astype(dtype) * scale,
             rng.standard_normal((*lead(P), n_out)).astype(dtype))
            for (n_in, n_out), P in zip(shapes, positions)]  # fmt: skip


def explicit_rows(pairs, bias):
    """G from the factors by the definition: row i of a layer is Σ_p e_ip a_ipᵀ flattened, then
    Σ_p e_ip for a bias (float64)."""
    cols = []
    for (A, E), b in zip(pairs, bias):
        A, E = np.asarray(A, np.float64), np.asarray(E, np.float64)
        if A.ndim == 2:
            A, E = A[:, None, :], E[:, None, :]
        cols.append(np.einsum("ipr,ipc->irc", E, A).reshape(len(A), -1))
        if b:
            cols.append(E.sum(1))
    return np.concatenate(cols, 1)


def check(FG, damp, block_size, dtype, rng):
    G = host(FG.to_dense())  # exact float64 products e_r·a_c: the gradients the operator holds
    m, d = G.shape
    op = r1.StaticInverse(FG, damp, block_size=block_size)
    F = testing.dense_fisher(G, damp, 1.0 / m, op.block_sizes if block_size is not None else None)
    eta, rel = (5e-12, 1e-6) if dtype == np.float64 else (1e-7, 1e-6)
    X = rng.standard_normal((d, 2))
    assert testing.backward_error(F, host(op @ X), X) <= eta
    np.testing.assert_allclose(host(op.fisher() @ X[:, 0]), F @ X[:, 0], rtol=1e-6, atol=1e-12 * np.abs(F).max())
    Finv = np.linalg.inv(F)
    if np.linalg.cond(F) <= 1e9:
        assert testing.relative_error(host(op.diag()), np.diag(Finv)) <= rel
        r, c = rng.integers(0, d, 12), rng.integers(0, d, 12)
        assert testing.entry_error(host(op.entries(r, c)), Finv, r, c) <= rel
        idx = np.unique(rng.integers(0, d, 5))
        np.testing.assert_allclose(
            host(op.submatrix(idx)), Finv[np.ix_(idx, idx)], rtol=1e-5, atol=1e-6 * np.abs(Finv).max()
        )
    logdet = np.linalg.slogdet(F)[1]
    assert abs(op.logdet() - logdet) <= 1e-8 * abs(logdet) + 1e-6
    return op


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("m", [1, 6, 60])
@pytest.mark.parametrize("bias", [False, True])
def test_factored_equals_explicit(dtype, m, bias, rng):
    shapes = [(9, 4), (4, 1), (1, 3)]  # n_out = 1 and n_in = 1 layers
    FG = r1.FactoredGradients(factors(rng, m, shapes, dtype), bias=bias)
    sizes = [o * i + (o if bias else 0) for i, o in shapes]
    assert FG.shape == (m, sum(sizes))
    for block_size in (None, sizes, 5):  # one block, one per layer, finer than a layer
        check(FG, 1e-3, block_size, dtype, rng)


def test_factored_matches_torch_linear_per_sample_gradients():
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([g[n].reshape(7, -1) for n in params], 1).numpy()
    # the same gradients as factors: inputs A and output gradients E of each Linear
    with torch.no_grad():
        A1, A2, E1, E2 = linear_factors(torch, net, x, y)
    FG = r1.FactoredGradients([(A1, E1), (A2, E2)], bias=True)
    np.testing.assert_allclose(FG.to_dense(), G, rtol=1e-12, atol=1e-14)


def linear_factors(torch, net, x, y):
    h_pre = x @ net[0].weight.T + net[0].bias
    h = torch.tanh(h_pre)
    z = h @ net[2].weight.T + net[2].bias
    E2 = torch.softmax(z, 1) - torch.nn.functional.one_hot(y, 3)
    E1 = (E2 @ net[2].weight) * (1 - h**2)
    return x.numpy(), h.numpy(), E1.numpy(), E2.numpy()


def test_factored_extra_memory_is_far_below_m_times_d():
    rng = np.random.default_rng(0)
    m = 64
    layers = factors(rng, m, [(512, 512), (512, 256)], np.float32)
    FG = r1.FactoredGradients(layers, bias=True)
    m, d = FG.shape
    x = rng.standard_normal(d).astype(np.float32)
    tracemalloc.start()
    op = r1.StaticInverse(FG, 1e-2, block_size=FG.layer_sizes)
    y = op @ x
    dg = op.diag()
    e = op.entries([0, 5, d - 1], [0, 7, d - 1])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert y.shape == (d,) and dg.shape == (d,) and e.shape == (3,)
    explicit = m * d * 4  # the float32 G a materialised StaticInverse would need
    # measured 2026-12-02: 16.6 MB against 101 MB, about five d-long float64 vectors and 2 MiB tiles
    assert peak < 0.25 * explicit, (peak, explicit)


def test_factored_gradients_errors():
    rng = np.random.default_rng(0)
    A, E = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match="both 3-D"):
        r1.FactoredGradients([(A[None], E)])
    with pytest.raises(ValueError, match="positions"):
        r1.FactoredGradients([(A[:, None, :], np.stack([E, E], 1))])
    with pytest.raises(ValueError, match="rows"):
        r1.FactoredGradients([(A, E[:3])])
    with pytest.raises(TypeError, match="float32 or float64"):
        r1.FactoredGradients([(A.astype(np.int64), E)])
    with pytest.raises(ValueError, match="at least one"):
        r1.FactoredGradients([])
    with pytest.raises(ValueError, match="one per layer"):
        r1.FactoredGradients([(A, E)], bias=[True, False])
    with pytest.raises(TypeError, match="pair"):
        r1.FactoredGradients([A])
    FG = r1.FactoredGradients([(A, np.full_like(E, np.nan))])
    with pytest.raises(ValueError, match="non-finite"):
        r1.StaticInverse(FG, 1.0)


@pytest.mark.parametrize("route", ["factored", "explicit"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_positions_equal_the_definition(route, dtype, m, rng, monkeypatch):
    """Layers applied at P positions (convolution patches, tokens): rows Σ_p e_ip a_ipᵀ, both
    Gram routes, mixed with a 2-D layer, every query against the dense reference."""
    from rank1inv import factored

    monkeypatch.setattr(factored, "gram_route", lambda *a: route)
    shapes, positions, bias = [(6, 3), (5, 2), (1, 4)], [7, None, 2], [True, False, True]
    pairs = factors(rng, m, shapes, dtype, positions=positions)
    FG = r1.FactoredGradients(pairs, bias=bias)
    G = host(FG.to_dense())
    np.testing.assert_allclose(G, explicit_rows(pairs, bias), rtol=1e-13, atol=1e-13 * np.abs(G).max())
    for block_size in (None, FG.layer_sizes, 4):
        check(FG, 1e-2, block_size, dtype, rng)


def test_gram_route_takes_the_cheaper_one():
    from rank1inv.factored import gram_route

    assert gram_route(256, None, 10_000, 10_000) == "factored"
    assert gram_route(8, 2, 64, 64) == "factored"  # few positions, wide factors
    assert gram_route(8, 4, 3, 8) == "explicit"  # thin factors: the rows themselves are small
    assert gram_route(128, 64 * 64, 27, 16) == "explicit"  # a first conv: many positions, thin factors
    assert gram_route(16, 9, 1152, 128) == "factored"  # a late conv: few positions, wide factors


@given(data=st.data())
def test_property_factored_layers(data):
    m = data.draw(st.integers(1, 12))
    nl = data.draw(st.integers(1, 3))
    shapes = [(data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))) for _ in range(nl)]
    positions = [data.draw(st.one_of(st.none(), st.integers(1, 5))) for _ in range(nl)]
    bias = data.draw(st.lists(st.booleans(), min_size=nl, max_size=nl))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    FG = r1.FactoredGradients(factors(rng, m, shapes, dtype, scale=scale, positions=positions), bias=bias)
    block = data.draw(st.sampled_from([None, "layers", 1, 3]))
    check(FG, data.draw(st.sampled_from([1e-2, 1.0])), FG.layer_sizes if block == "layers" else block, dtype, rng)


@pytest.mark.parametrize("sa,se,damp", [(1e150, 1e150, 1e290), (1e-75, 1e-75, 1e-300), (1e200, 1e-100, 1e190)])
def test_factored_at_extreme_magnitudes(sa, se, damp):
    """Factors whose products (or their Gram matrix) leave the float64 range before the frame is
    applied: each factor takes half of the frame (docs/design.md §11), as the explicit G does."""
    rng = np.random.default_rng(3)
    A, E = rng.standard_normal((4, 30)) * sa, rng.standard_normal((4, 5)) * se
    A3, E3 = rng.standard_normal((4, 3, 2)) * sa, rng.standard_normal((4, 3, 3)) * se  # 3 positions
    FG = r1.FactoredGradients([(A, E), (A[:, :3], E[:, :2]), (A3, E3)], bias=True)
    G = FG.to_dense()
    x = rng.standard_normal(G.shape[1])
    for block_size in (None, FG.layer_sizes, 4):
        a, b = r1.StaticInverse(FG, damp, block_size=block_size), r1.StaticInverse(G, damp, block_size=block_size)
        y = b @ x
        np.testing.assert_allclose(a @ x, y, rtol=0, atol=1e-12 * np.abs(y).max())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", r1.AccuracyWarning)
            da, db = a.diag(), b.diag()
        kept = db * damp > 1e-10  # coordinates whose diagonal has digits left (docs/numerics.md)
        np.testing.assert_allclose(da[kept], db[kept], rtol=1e-12)
        assert abs(a.logdet() - b.logdet()) <= 1e-12 * abs(b.logdet())
