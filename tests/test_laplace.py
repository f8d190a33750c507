"""Laplace posteriors: exact samples, spectrum, matrix powers, re-damping, per-block priors,
evidence and the linearised predictive, against dense and multi-precision references."""

import math

import mpmath
import numpy as np
import pytest
from helpers import host
from hypothesis import given
from hypothesis import strategies as st

import rank1inv as r1
from rank1inv import laplace, testing

EPS = 2.0**-52


def exact_inverse(G, damps, scale, block_sizes, dps=40):
    """F⁻¹ block by block in mpmath (40 digits) rounded once to float64: the reference where a
    float64 dense inverse would lose ε·cond(F)."""
    mpmath.mp.dps = dps
    G = host(G)
    m, d = G.shape
    out = np.zeros((d, d))
    o = 0
    for B, lam in zip(block_sizes, damps):
        Gb = mpmath.matrix(G[:, o : o + B].tolist())
        lam_, s = mpmath.mpf(lam), mpmath.mpf(scale)
        if B > m:  # Woodbury in exact arithmetic: m×m inverse only
            K = Gb * Gb.T + (lam_ / s) * mpmath.eye(m)
            Fi = (mpmath.eye(B) - Gb.T * (K**-1) * Gb) / lam_
        else:
            Fi = (lam_ * mpmath.eye(B) + s * Gb.T * Gb) ** -1
        out[o : o + B, o : o + B] = np.array(Fi.tolist(), dtype=np.float64)
        o += B
    return out


def exact_logdet(G, damps, scale, block_sizes, dps=40):
    mpmath.mp.dps = dps
    G = host(G)
    total, o = mpmath.mpf(0), 0
    for B, lam in zip(block_sizes, damps):
        Gb = mpmath.matrix(G[:, o : o + B].tolist())
        total += mpmath.log(mpmath.det(mpmath.mpf(lam) * mpmath.eye(B) + mpmath.mpf(scale) * Gb.T * Gb))
        o += B
    return float(total)


def normwise(a, ref):
    """‖a − ref‖_F / ‖ref‖_F."""
    return float(np.linalg.norm(host(a) - ref) / np.linalg.norm(ref))


def damps_of(op):
    return list(op.damp) if isinstance(op.damp, tuple) else [op.damp] * len(op.block_sizes)


def covariance_of_map(op):
    """M Mᵀ for the documented map M (its columns: the samples of the unit noise vectors)."""
    S = host(op.sample_from_noise(np.eye(op.noise_dim)))
    return S.T @ S


def block_dense(G, damps, scale, sizes):
    """The dense block-diagonal F = diag(λ_b I + s·G_bᵀG_b) in float64."""
    G = host(G)
    F = np.zeros((G.shape[1],) * 2)
    o = 0
    for B, lam in zip(sizes, damps):
        g = G[:, o : o + B]
        F[o : o + B, o : o + B] = lam * np.eye(B) + scale * g.T @ g
        o += B
    return F


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("scale,damp", [(1.0, 1e-1), (1.0, 1e-6), (100.0, 1e-4)])
@pytest.mark.parametrize("layout", [None, [18, 12]])
def test_sample_map_covariance_is_the_inverse(family, scale, damp, layout):
    G = testing.gradients(family, 8, 30, scale=scale, seed=3, dtype="float64")
    op = r1.StaticInverse(G, damp, block_size=layout)
    ref = exact_inverse(G, damps_of(op), op.scale, op.block_sizes)
    assert normwise(covariance_of_map(op), ref) <= 1e-10


@pytest.mark.parametrize("family", ["iid", "clusters", "huge_row"])
def test_sample_map_dense_blocks_and_per_block_damping(family):
    """Blocks no wider than m (Cholesky of F_b): as accurate as F_b⁻¹ itself, ε·cond(F_b)."""
    G = testing.gradients(family, 8, 30, seed=4, dtype="float64")
    sizes = [4, 4, 12, 10]
    damps = [1e-1, 1.0, 1e-3, 3.0]
    op = r1.StaticInverse(G, damps, block_size=sizes)
    assert op.noise_dim == 30 + 8 * 2  # z₂ only for the two blocks wider than m
    ref = exact_inverse(G, damps, op.scale, sizes)
    cond = np.linalg.cond(block_dense(G, damps, op.scale, sizes))
    assert normwise(covariance_of_map(op), ref) <= max(1e-10, 64 * EPS * cond)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_sample_map_of_a_window(dtype):
    rng = np.random.default_rng(5)
    w = r1.DynamicInverse(25, 6, 0.3, dtype=dtype)
    for _ in range(9):  # full and wrapped around
        w.push(rng.standard_normal(25))
    assert w.noise_dim == 25 + 6
    G = host(w.gradients())
    ref = exact_inverse(G, [0.3], w.scale, [25])
    tol = 1e-10 if dtype == "float64" else 1e-6  # float32 outputs
    assert normwise(covariance_of_map(w), ref) <= tol
    half = r1.DynamicInverse(25, 6, 0.3, dtype=dtype)
    for _ in range(3):  # empty slots take noise and change nothing
        half.push(rng.standard_normal(25))
    ref = exact_inverse(host(half.gradients()), [0.3], half.scale, [25])
    assert normwise(covariance_of_map(half), ref) <= tol


def test_samples_agree_with_the_covariance_statistically():
    """10⁵ draws, whitened by the dense Cholesky factor of F: the empirical covariance is I
    within 6 standard errors in every entry."""
    G = testing.gradients("clusters", 5, 8, seed=1, dtype="float64")
    op = r1.StaticInverse(G, 0.05, block_size=[6, 2])
    n = 100_000
    X = host(op.sample(n, rng=7))
    assert X.shape == (n, 8)
    L = np.linalg.cholesky(block_dense(G, [0.05, 0.05], op.scale, [6, 2]))
    Y = X @ L  # cov(Lᵀx) = Lᵀ F⁻¹ L = I
    C = Y.T @ Y / n
    se = np.sqrt((1.0 + np.eye(8)) / n)  # std of an entry of a Wishart/n estimate of I
    assert np.all(np.abs(C - np.eye(8)) <= 6 * se)
    assert np.all(np.abs(Y.mean(axis=0)) <= 6 / np.sqrt(n))


def test_sample_is_the_documented_map_of_standard_normals():
    G = testing.gradients("iid", 6, 20, seed=2, dtype="float64")
    op = r1.StaticInverse(G, 0.1)
    z = np.random.default_rng(11).standard_normal((3, op.noise_dim))
    np.testing.assert_array_equal(op.sample(3, rng=11), op.sample_from_noise(z))
    np.testing.assert_array_equal(op.sample(rng=np.random.default_rng(11)), op.sample_from_noise(z[0]))
    assert op.sample().shape == (20,)
    many = np.random.default_rng(5).standard_normal((21, op.noise_dim))  # several chunks, one stream
    np.testing.assert_array_equal(op.sample(21, rng=5), op.sample_from_noise(many))
    z0 = z.copy()
    op.sample_from_noise(z)
    np.testing.assert_array_equal(z, z0)  # input not modified


def test_sample_errors():
    op = r1.StaticInverse(np.ones((2, 5)), 0.1)
    with pytest.raises(ValueError, match="shape"):
        op.sample_from_noise(np.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        op.sample_from_noise(np.full(op.noise_dim, np.nan))
    with pytest.raises(ValueError, match=">= 1"):
        op.sample(0)
    with pytest.raises(TypeError, match="rng"):
        op.sample(rng="seed")


def test_sample_at_extreme_magnitudes_is_scaled_exactly():
    """Scaling G by 2^k and λ by 2^2k scales the samples by 2^-k exactly (docs/design.md §4)."""
    G = testing.gradients("lowrank", 6, 20, seed=8, dtype="float64")
    z = np.random.default_rng(3).standard_normal((2, 26))
    base = r1.StaticInverse(G, 0.01).sample_from_noise(z)
    for k in (-500, 300, 480):
        op = r1.StaticInverse(G * 2.0**k, 0.01 * 2.0 ** (2 * k))
        np.testing.assert_allclose(op.sample_from_noise(z) * 2.0**k, base, rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------ spectrum, powers
@pytest.mark.parametrize("layout", [None, [14, 6], 3])
def test_eigenvalues_and_powers(layout):
    G = testing.gradients("clusters", 8, 20, seed=6, dtype="float64")
    op = r1.StaticInverse(G, 0.2, block_size=layout)
    F = block_dense(G, damps_of(op), op.scale, op.block_sizes)
    lam, Q = np.linalg.eigh(F)
    ev = host(op.eigenvalues())
    assert np.all(np.diff(ev) <= 0)
    # every reported eigenvalue is one of F's; the rest of F's spectrum is λ
    rest = list(lam)
    for v in ev:
        j = int(np.argmin(np.abs(np.array(rest) - v)))
        assert abs(rest.pop(j) - v) <= 1e-12 * lam[-1]
    np.testing.assert_allclose(rest, 0.2, rtol=1e-12)
    for p in (-1.0, -0.5, 0.5, 2.0, 1.0 / 3.0):
        ref = (Q * lam**p) @ Q.T
        assert normwise(op.power(p).to_dense(), ref) <= 1e-12
    x = np.random.default_rng(0).standard_normal(20)
    half = op.power(-0.5)
    np.testing.assert_allclose(half @ (half @ x), op @ x, rtol=1e-11)
    assert op.power(2).exponent == 2.0


def test_window_eigenvalues_count_the_stored_gradients():
    rng = np.random.default_rng(1)
    w = r1.DynamicInverse(30, 8, 0.5, dtype="float64")
    for _ in range(3):
        w.push(rng.standard_normal(30))
    G = host(w.gradients())
    F = 0.5 * np.eye(30) + w.scale * G.T @ G
    ev = host(w.eigenvalues())
    assert ev.shape == (3,)
    np.testing.assert_allclose(ev, np.linalg.eigvalsh(F)[::-1][:3], rtol=1e-12)


def test_power_refuses_non_numbers():
    op = r1.StaticInverse(np.eye(3, 6), 0.1)
    for bad in ("1", math.nan, True):
        with pytest.raises(TypeError):
            op.power(bad)


# ------------------------------------------------------------------------------ re-damping, logdet
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_with_damp_equals_a_fresh_operator_without_reading_g(dtype, monkeypatch):
    G = testing.gradients("collinear", 10, 40, seed=2, dtype=dtype)
    op = r1.StaticInverse(G, 1e-2, block_size=[30, 10])
    x = np.random.default_rng(0).standard_normal(40)
    from rank1inv import _passes

    fresh = {lam: r1.StaticInverse(G, lam, block_size=[30, 10]) for lam in (1e-6, 1.0, 1e3)}
    for name in ("gram", "column_gram"):
        monkeypatch.setattr(_passes, name, lambda *a, **k: pytest.fail("with_damp read G"))
    for lam, ref in fresh.items():
        new = op.with_damp(lam)
        assert new.damp == lam and op.damp == 1e-2
        np.testing.assert_allclose(host(new @ x), host(ref @ x), rtol=1e-12 if dtype == "float64" else 1e-6)
        assert abs(new.logdet() - ref.logdet()) <= 1e-12 * abs(ref.logdet())


def test_with_damp_changes_the_frame_at_extreme_damping():
    G = testing.gradients("iid", 5, 20, seed=1, dtype="float64") * 1e200
    op = r1.StaticInverse(G, 1e-300)
    x = np.random.default_rng(0).standard_normal(20)
    for lam in (1e300, 1e-200, 1.0):
        ref = r1.StaticInverse(G, lam)
        np.testing.assert_allclose(op.with_damp(lam) @ x, ref @ x, rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-6)])
@pytest.mark.parametrize("family", ["iid", "lowrank", "duplicate", "huge_row"])
def test_logdet_scan_against_multiprecision(dtype, tol, family):
    G = testing.gradients(family, 8, 30, seed=9, dtype=dtype)
    op = r1.StaticInverse(G, 1.0, block_size=[20, 6, 4])
    for lam in (1e-4, 1e-1, 10.0):
        new = op.with_damp(lam)
        ref = exact_logdet(G, [lam] * 3, op.scale, [20, 6, 4])
        # docs/numerics.md: beyond that, log det F is known to about rank·ε·cond(F) absolute
        cond = np.linalg.cond(block_dense(G, [lam] * 3, op.scale, [20, 6, 4]))
        assert abs(new.logdet() - ref) <= max(tol * abs(ref), 8 * 8 * EPS * cond)
        assert abs(math.fsum(new.block_logdets()) - new.logdet()) <= 1e-12 * abs(ref)


def test_window_with_damp_is_a_snapshot():
    rng = np.random.default_rng(4)
    w = r1.DynamicInverse(30, 5, 0.1, dtype="float64")
    for _ in range(7):
        w.push(rng.standard_normal(30))
    snap = w.with_damp(2.0)
    ref = r1.StaticInverse(w.gradients(), 2.0, scale=w.scale)
    x = rng.standard_normal(30)
    np.testing.assert_allclose(snap @ x, ref @ x, rtol=1e-13)
    w.push(rng.standard_normal(30))  # the snapshot does not move with the window
    np.testing.assert_allclose(snap @ x, ref @ x, rtol=1e-13)
    with pytest.raises(ValueError, match="empty"):
        r1.DynamicInverse(30, 5, 0.1).with_damp(1.0)


# ------------------------------------------------------------------------------ per-block damping
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_per_block_damping_answers_every_query(dtype, rng):
    G = testing.gradients("clusters", 6, 30, seed=5, dtype=dtype)
    sizes, damps = [10, 10, 4, 6], [1e-3, 1.0, 0.1, 1e-3]
    op = r1.StaticInverse(G, damps, block_size=sizes)
    assert op.damp == tuple(damps)
    Fi = exact_inverse(G, damps, op.scale, sizes)
    tol = 1e-10 if dtype == "float64" else 1e-6
    assert normwise(op.to_dense(), Fi) <= tol
    assert testing.relative_error(host(op.diag()), np.diag(Fi)) <= tol
    r, c = rng.integers(0, 30, 20), rng.integers(0, 30, 20)
    assert testing.entry_error(host(op.entries(r, c)), Fi, r, c) <= tol
    ref_logdet = exact_logdet(G, damps, op.scale, sizes)
    assert abs(op.logdet() - ref_logdet) <= tol * abs(ref_logdet)
    F = block_dense(G, damps, op.scale, sizes)
    assert normwise(op.fisher().to_dense(), F) <= tol
    # equal damps collapse to a scalar
    assert r1.StaticInverse(G, [0.5] * 4, block_size=sizes).damp == 0.5


def test_per_block_damping_errors():
    G = np.ones((2, 10))
    with pytest.raises(ValueError, match="one per block"):
        r1.StaticInverse(G, [1.0, 2.0], block_size=3)
    with pytest.raises(ValueError, match="one per coordinate"):
        r1.StaticInverse(G, np.ones(9))
    with pytest.raises(ValueError, match="> 0"):
        r1.StaticInverse(G, [1.0, -1.0], block_size=5)
    op = r1.StaticInverse(G, [1.0, 2.0], block_size=5)
    with pytest.raises(ValueError, match="one per block"):
        op.with_damp([1.0, 2.0, 3.0])
    assert op.damp == (1.0, 2.0)


# ------------------------------------------------------------------------------ evidence
def _dense_evidence(G, damps, scale, sizes, loss, theta):
    P0 = np.repeat(damps, sizes)
    F = block_dense(G, damps, scale, sizes)
    return -loss - 0.5 * (np.sum(P0 * theta**2) - np.sum(np.log(P0)) + np.linalg.slogdet(F)[1])


@pytest.mark.parametrize("layout,damp", [(None, 0.3), ([12, 8], [0.1, 4.0]), (5, 1.0)])
def test_log_marginal_likelihood_against_dense(layout, damp):
    G = testing.gradients("lowrank", 6, 20, seed=3, dtype="float64")
    theta = np.random.default_rng(1).standard_normal(20)
    op = r1.StaticInverse(G, damp, scale=1.0, block_size=layout)
    ref = _dense_evidence(G, damps_of(op), 1.0, op.block_sizes, 2.5, theta)
    assert abs(laplace.log_marginal_likelihood(op, 2.5, theta) - ref) <= 1e-11 * abs(ref)
    mean = np.full(20, 0.25)
    ref = _dense_evidence(G, damps_of(op), 1.0, op.block_sizes, 2.5, theta - mean)
    assert abs(laplace.log_marginal_likelihood(op, 2.5, theta, prior_mean=mean) - ref) <= 1e-11 * abs(ref)


def test_tune_damp_finds_the_maximum():
    G = testing.gradients("iid", 10, 24, seed=2, dtype="float64")
    theta = 0.3 * np.random.default_rng(2).standard_normal(24)
    op = r1.StaticInverse(G, 1.0, scale=1.0, block_size=[16, 8])
    best, value = laplace.tune_damp(op, 1.0, theta)
    grid = np.exp(np.linspace(math.log(1e-4), math.log(1e4), 400))
    values = [laplace.log_marginal_likelihood(op.with_damp(float(g)), 1.0, theta) for g in grid]
    assert value >= max(values) - 1e-9
    assert abs(value - laplace.log_marginal_likelihood(best, 1.0, theta)) <= 1e-12
    per, per_value = laplace.tune_damp(op, 1.0, theta, per_block=True)
    assert isinstance(per.damp, tuple) and per_value >= value - 1e-12
    for b in range(2):  # each block's λ_b is a maximum of the evidence with the other fixed
        for f in (0.99, 1.01):
            trial = list(per.damp)
            trial[b] *= f
            assert laplace.log_marginal_likelihood(op.with_damp(trial), 1.0, theta) <= per_value + 1e-12


def test_tune_damp_at_a_bound_and_errors():
    G = testing.gradients("iid", 4, 12, seed=2, dtype="float64")
    op = r1.StaticInverse(G, 1.0, scale=1.0)
    best, _ = laplace.tune_damp(op, 0.0, np.zeros(12), bounds=(1e-3, 1e3))  # θ = 0: no prior cost
    assert best.damp == pytest.approx(1e3, rel=1e-6)
    with pytest.raises(ValueError, match="bounds"):
        laplace.tune_damp(op, 0.0, np.zeros(12), bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="loss"):
        laplace.log_marginal_likelihood(op, math.inf, np.zeros(12))
    with pytest.raises(ValueError, match="weights"):
        laplace.log_marginal_likelihood(op, 0.0, np.zeros(11))


# ------------------------------------------------------------------------------ predictive
@pytest.mark.parametrize("layout", [None, [12, 8]])
def test_predictive_variance_against_dense(layout):
    G = testing.gradients("clusters", 6, 20, seed=7, dtype="float64")
    op = r1.StaticInverse(G, 0.1, block_size=layout)
    J = np.random.default_rng(3).standard_normal((7, 20))
    Fi = exact_inverse(G, damps_of(op), op.scale, op.block_sizes)
    full = J @ Fi @ J.T
    np.testing.assert_allclose(laplace.predictive_variance(op, J, chunk=3), np.diag(full), rtol=1e-11)
    V = laplace.predictive_variance(op, J, full=True, chunk=4)
    np.testing.assert_allclose(V, full, rtol=1e-11, atol=1e-13 * np.abs(full).max())
    np.testing.assert_array_equal(V, V.T)
    with pytest.raises(ValueError, match="shape"):
        laplace.predictive_variance(op, J.T)


def test_probit_and_calibration_error():
    f = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]])
    p = laplace.probit_probabilities(f, np.zeros_like(f))
    e = np.exp(f - f.max(1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), rtol=1e-15)
    wide = laplace.probit_probabilities(f, np.full_like(f, 100.0))
    assert np.all(wide.max(1) < p.max(1))  # more variance, less confidence
    # confidences 0.75 with 3 of 4 right: calibrated; all right: ECE 0.25
    probs = np.tile([0.75, 0.25], (4, 1))
    assert laplace.expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert laplace.expected_calibration_error(probs, np.zeros(4, dtype=int)) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        laplace.probit_probabilities(f, -np.ones_like(f))


def test_torch_output_jacobians_match_autograd():
    torch = pytest.importorskip("torch")
    from rank1inv.adapters import torch as ta

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    net[0].bias.requires_grad_(False)  # frozen: not a coordinate
    x = torch.randn(7, 5, dtype=torch.float64)
    J = ta.output_jacobians(net, x, chunk=3)
    params = [p for _, p in ta.trainable(net)]
    assert J.shape == (7, 3, sum(p.numel() for p in params))
    for i in range(7):
        for c in range(3):
            g = torch.autograd.grad(net(x[i : i + 1])[0, c], params)
            np.testing.assert_allclose(J[i, c], torch.cat([t.reshape(-1) for t in g]).numpy(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ properties
@given(data=st.data())
def test_property_sample_covariance_and_redamping(data):
    m = data.draw(st.integers(1, 6))
    d = data.draw(st.integers(1, 14))
    seed = data.draw(st.integers(0, 2**16))
    G = np.random.default_rng(seed).standard_normal((m, d)) * data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    sizes = data.draw(st.sampled_from([None, 1, 2, 5]))
    op = r1.StaticInverse(G, data.draw(st.sampled_from([1e-2, 1.0])), block_size=sizes)
    nb = len(op.block_sizes)
    damps = data.draw(st.lists(st.sampled_from([1e-3, 0.1, 10.0]), min_size=nb, max_size=nb))
    new = op.with_damp(damps)
    Fi = exact_inverse(G, damps_of(new), new.scale, new.block_sizes, dps=30)
    cond = np.linalg.cond(block_dense(G, damps_of(new), new.scale, new.block_sizes))
    assert normwise(covariance_of_map(new), Fi) <= max(1e-10, 64 * EPS * cond)
    fresh = r1.StaticInverse(G, damps if nb > 1 else damps[0], block_size=sizes)
    x = np.random.default_rng(seed + 1).standard_normal(d)
    np.testing.assert_allclose(new @ x, fresh @ x, rtol=1e-9, atol=0)


def test_guide_example_runs():
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    code = re.search(r"## Laplace posteriors.*?```python\n(.*?)```", guide, re.S).group(1)
    ns = {}
    exec(compile(code, "docs/guide.md", "exec"), ns)
    assert ns["draws"].shape == (100, 20_000) and ns["var"].shape == (30,)
    assert isinstance(ns["post"].damp, tuple) and all(1e-8 < v < 1e8 for v in ns["post"].damp)


def test_sample_power_and_redamp_on_every_backend(xp):
    """The same maps on the backend under test (CuPy on a GPU machine) as on NumPy."""
    G = testing.gradients("clusters", 6, 24, seed=2, dtype="float64")
    op = r1.StaticInverse(xp.asarray(G), [0.1, 1.0], block_size=[18, 6])
    ref = exact_inverse(G, [0.1, 1.0], op.scale, [18, 6])
    S = host(op.sample_from_noise(xp.eye(op.noise_dim, dtype=xp.float64)))
    assert normwise(S.T @ S, ref) <= 1e-10
    assert op.sample(4, rng=0).shape == (4, 24)
    x = np.random.default_rng(0).standard_normal(24)
    np.testing.assert_allclose(host(op.power(-1.0) @ xp.asarray(x)), ref @ x, rtol=1e-10)
    np.testing.assert_allclose(
        host(op.with_damp(0.5) @ xp.asarray(x)),
        host(r1.StaticInverse(xp.asarray(G), 0.5, block_size=[18, 6]) @ xp.asarray(x)),
        rtol=1e-12,
    )
    w = r1.DynamicInverse(24, 4, 0.2, dtype="float32", xp=xp)
    for row in G[:5]:
        w.push(xp.asarray(row))
    S = host(w.sample_from_noise(xp.eye(w.noise_dim, dtype=xp.float64)))
    assert normwise(S.T @ S, exact_inverse(host(w.gradients()), [0.2], w.scale, [24])) <= 1e-6


# ------------------------------------------------------------------------------ per-coordinate priors
def exact_inverse_vector(G, delta, scale, block_sizes, dps=40):
    """diag(δ) + s·GᵀG inverted block by block in mpmath."""
    mpmath.mp.dps = dps
    G = host(G)
    out = np.zeros((G.shape[1],) * 2)
    o = 0
    for B in block_sizes:
        Gb = mpmath.matrix(G[:, o : o + B].tolist())
        D = mpmath.diag([mpmath.mpf(float(v)) for v in delta[o : o + B]])
        out[o : o + B, o : o + B] = np.array(((D + mpmath.mpf(scale) * Gb.T * Gb) ** -1).tolist(), dtype=np.float64)
        o += B
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("layout", [None, [20, 10], 5])
@pytest.mark.parametrize("family", ["iid", "clusters", "huge_row"])
def test_per_coordinate_damping_answers_every_query(dtype, layout, family, rng):
    G = helpers_family(family, 6, 30, dtype)
    delta = np.exp(np.random.default_rng(1).uniform(-6, 6, 30))
    op = r1.StaticInverse(G, delta, block_size=layout)
    np.testing.assert_array_equal(op.damp, delta)
    Fi = exact_inverse_vector(G, delta, op.scale, op.block_sizes)
    F = block_dense(G, np.zeros(len(op.block_sizes)), op.scale, op.block_sizes) + np.diag(delta)
    eta, rel = (5e-12, 1e-10) if dtype == "float64" else (1e-7, 1e-6)
    x = rng.standard_normal(30)
    y = host(op @ x)
    assert testing.backward_error(F, y, x) <= eta
    cond = np.linalg.cond(F)
    if cond <= 1e9:  # docs/design.md §8: entries of F⁻¹ within 1e-6 where cond(F) ≤ 1e9
        rel = 1e-6
        assert testing.relative_error(host(op.diag()), np.diag(Fi)) <= rel
        r, c = rng.integers(0, 30, 25), rng.integers(0, 30, 25)
        assert testing.entry_error(host(op.entries(r, c)), Fi, r, c) <= rel
        idx = np.array([3, 17, 25])
        assert normwise(op.submatrix(idx), Fi[np.ix_(idx, idx)]) <= rel
        assert normwise(covariance_of_map(op), Fi) <= rel
    rel = 1e-10 if dtype == "float64" else 1e-6
    logdet = np.linalg.slogdet(F)[1]
    assert abs(op.logdet() - logdet) <= max(rel * abs(logdet), 64 * EPS * cond)
    assert normwise(op.fisher().to_dense(), F) <= rel
    assert testing.relative_error(host(op.fisher().diag()), np.diag(F)) <= rel


def helpers_family(name, m, d, dtype):
    from helpers import family

    return family(name, m, d, seed=2, dtype=dtype)


def test_per_coordinate_damping_is_invariant_under_power_of_two_scaling():
    G = testing.gradients("lowrank", 6, 24, seed=8, dtype="float64")
    delta = np.exp(np.random.default_rng(2).uniform(-20, 20, 24))
    x = np.random.default_rng(3).standard_normal(24)
    for layout in (None, [18, 6]):
        base = r1.StaticInverse(G, delta, block_size=layout)
        y0, d0 = base @ x, base.diag()
        for k in (-400, 250, 450):  # G·2^k, δ·4^k: F scales by 4^k exactly
            op = r1.StaticInverse(G * 2.0**k, delta * 4.0**k, block_size=layout)
            np.testing.assert_allclose(op @ x * 4.0**k, y0, rtol=1e-13)
            np.testing.assert_allclose(op.diag() * 4.0**k, d0, rtol=1e-13)


def test_per_coordinate_damping_refusals_and_redamping():
    G = testing.gradients("iid", 4, 12, seed=1, dtype="float64")
    delta = np.linspace(0.1, 2.0, 12)
    op = r1.StaticInverse(G, delta)
    with pytest.raises(ValueError, match="2\\^1000"):
        r1.StaticInverse(G, np.concatenate([[1e-300], np.ones(11) * 1e10]))
    with pytest.raises(ValueError, match="> 0"):
        r1.StaticInverse(G, np.concatenate([[-1.0], np.ones(11)]))
    with pytest.raises(ValueError, match="one per coordinate"):
        r1.StaticInverse(G, np.ones(11))
    for call in (lambda: op.power(0.5), op.eigenvalues, lambda: laplace.tune_damp(op, 0.0, np.zeros(12))):
        with pytest.raises(ValueError, match="per"):
            call()
    x = np.random.default_rng(0).standard_normal(12)
    scalar = op.with_damp(0.5)  # from a vector prior back to one value: rebuilt
    np.testing.assert_allclose(scalar @ x, r1.StaticInverse(G, 0.5) @ x, rtol=1e-13)
    vec = r1.StaticInverse(G, 0.5).with_damp(delta)
    np.testing.assert_allclose(vec @ x, op @ x, rtol=1e-13)
    theta = np.random.default_rng(1).standard_normal(12)
    F = np.diag(delta) + op.scale * G.T @ G
    ref = -3.0 - 0.5 * (np.sum(delta * theta**2) - np.sum(np.log(delta)) + np.linalg.slogdet(F)[1])
    assert abs(laplace.log_marginal_likelihood(op, 3.0, theta) - ref) <= 1e-12 * abs(ref)


@given(data=st.data())
def test_property_per_coordinate_damping(data):
    m = data.draw(st.integers(1, 6))
    d = data.draw(st.integers(1, 14))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, d)) * data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    delta = np.exp(rng.uniform(-1, 1, d) * data.draw(st.sampled_from([0.0, 3.0, 20.0])))
    sizes = data.draw(st.sampled_from([None, 1, 3]))
    op = r1.StaticInverse(G, delta, block_size=sizes) if d > 1 or sizes is None else None
    if op is None or len(op.block_sizes) == d:  # one block per coordinate: a per-block damp
        op = r1.StaticInverse(G, list(delta), block_size=1)
    Fi = exact_inverse_vector(G, delta, op.scale, op.block_sizes, dps=30)
    F = block_dense(G, np.zeros(len(op.block_sizes)), op.scale, op.block_sizes) + np.diag(delta)
    x = rng.standard_normal(d)
    assert testing.backward_error(F, host(op @ x), x) <= 5e-12
    cond = np.linalg.cond(F)
    assert normwise(covariance_of_map(op), Fi) <= max(1e-10, 64 * EPS * cond)
