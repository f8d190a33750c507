"""OBS pruning on quadratics with a known F: saliencies and updates against exact minima."""

import numpy as np
import pytest
from helpers import host

import rank1inv as r1
from rank1inv import obs, testing


def quadratic(m=12, d=30, damp=1e-2, seed=0, blocks=None):
    G = testing.gradients("lowrank", m, d, seed=seed, dtype="float64")
    op = r1.StaticInverse(G, damp, block_size=blocks)
    F = testing.dense_fisher(G, damp, block_sizes=op.block_sizes)
    w = np.random.default_rng(seed).standard_normal(d)
    return op, F, w


def constrained_min(F, w, Q, g=None):
    """min_δ gᵀδ + ½δᵀFδ s.t. (w + δ)_Q = 0, by a dense KKT solve: (δ, loss increase)."""
    d = len(w)
    g = np.zeros(d) if g is None else g
    E = np.eye(d)[:, Q]
    K = np.block([[F, E], [E.T, np.zeros((len(Q), len(Q)))]])
    sol = np.linalg.solve(K, np.concatenate([-g, -w[Q]]))
    delta = sol[:d]
    return delta, g @ delta + 0.5 * delta @ F @ delta


def test_single_weight_saliency_is_exact_loss_increase(xp):
    op, F, w = quadratic()
    rho = host(obs.saliency(op, xp.asarray(w)))
    for q in range(len(w)):
        _, inc = constrained_min(F, w, [q])
        assert rho[q] == pytest.approx(inc, rel=1e-8)


def test_woodtaylor_saliency_with_gradient(xp):
    op, F, w = quadratic(seed=1)
    g = np.random.default_rng(5).standard_normal(len(w))
    rho = host(obs.saliency(op, xp.asarray(w), grad=xp.asarray(g)))
    for q in range(len(w)):
        _, inc = constrained_min(F, w, [q], g)
        assert rho[q] == pytest.approx(inc, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("blocks", [None, 10])
def test_exact_update_reaches_constrained_minimum(xp, blocks):
    op, F, w = quadratic(seed=2, blocks=blocks)
    mask, new = obs.prune(op, xp.asarray(w), 0.4, update="exact")
    Q = np.flatnonzero(~host(mask).astype(bool))
    assert len(Q) == 12
    delta, _ = constrained_min(F, w, Q)
    np.testing.assert_allclose(host(new), w + delta, rtol=1e-8, atol=1e-8 * np.abs(w).max())
    assert np.all(host(new)[Q] == 0.0)


def test_exact_update_chunked_keeps_pruned_zero(monkeypatch):
    op, F, w = quadratic(seed=3)
    monkeypatch.setattr(obs, "EXACT_CHUNK", 4)
    mask, new = obs.prune(op, w, 0.5, update="exact")
    assert np.all(new[~mask] == 0.0) and mask.sum() == 15


def test_simultaneous_update_is_sum_of_single_updates(xp):
    op, F, w = quadratic(seed=4)
    Finv = np.linalg.inv(F)
    mask, new = obs.prune(op, xp.asarray(w), 0.3)
    Q = np.flatnonzero(~host(mask).astype(bool))
    total = sum(-w[q] * Finv[:, q] / Finv[q, q] for q in Q)
    expected = w + total
    expected[Q] = 0.0
    np.testing.assert_allclose(host(new), expected, rtol=1e-8, atol=1e-10)


def test_selection_scopes_and_methods(xp):
    op, F, w = quadratic(seed=5, blocks=10)
    for method in obs.METHODS:
        mask, new = obs.prune(op, xp.asarray(w), 0.5, method=method, scope="block", update=None)
        m = host(mask).astype(bool)
        assert all(m[a : a + 10].sum() == 5 for a in (0, 10, 20))
        np.testing.assert_array_equal(host(new)[m], w[m])
    rho = host(obs.saliency(op, xp.asarray(w), "obd"))
    np.testing.assert_allclose(rho, 0.5 * w**2 * np.diag(F), rtol=1e-10)
    np.testing.assert_allclose(host(obs.saliency(op, xp.asarray(w), "magnitude")), np.abs(w))
    with pytest.raises(ValueError, match="method"):
        obs.saliency(op, w, "random")
    with pytest.raises(ValueError, match="sparsity"):
        obs.prune(op, w, 1.5)
    with pytest.raises(ValueError, match="shape"):
        obs.prune(op, w[:-1], 0.5)


def test_group_saliency_and_group_pruning():
    op, F, w = quadratic(seed=6)
    groups = [np.arange(0, 5), np.arange(5, 12), np.array([20, 25, 29])]
    rho = obs.group_saliency(op, w, groups)
    for q, r in zip(groups, rho):
        _, inc = constrained_min(F, w, q)
        assert r == pytest.approx(inc, rel=1e-8)
    mask, new = obs.prune_groups(op, w, groups, 1)
    best = groups[int(np.argmin(rho))]
    assert not mask[best].any() and mask.sum() == 30 - len(best)
    delta, _ = constrained_min(F, w, best)
    np.testing.assert_allclose(new, w + delta, rtol=1e-8, atol=1e-10)


def test_prune_in_steps_recomputes():
    rng = np.random.default_rng(7)
    w = rng.standard_normal(40)
    calls = []

    def grads(wc, mask):
        calls.append(mask.copy())
        return rng.standard_normal((16, 40)) * (1 + np.abs(wc))

    mask, new = obs.prune_in_steps(w, 0.75, 3, grads, 1e-2)
    assert len(calls) == 3
    assert mask.sum() == 10 and np.all(new[~mask] == 0.0)
    assert np.all(calls[2] <= calls[1]) and np.all(calls[1] <= calls[0])
    assert obs.cubic_schedule(0.9, 3)[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pruning_picks_the_best_subset_and_its_constrained_minimum(xp, n, m):
    """One group of m weights N:M-pruned, the others free: the chosen subset is the one of least
    loss increase and the update is that subset's constrained minimiser (to 1e-8)."""
    import itertools

    op, F, w = quadratic(m=10, d=24, seed=7)
    mask, new = obs.prune_nm(op, xp.asarray(w), n, m, segments=[(8, 8 + m)])
    Q = np.flatnonzero(~host(mask).astype(bool))
    assert len(Q) == m - n and np.all((Q >= 8) & (Q < 8 + m))
    losses = {S: constrained_min(F, w, list(S))[1] for S in itertools.combinations(range(8, 8 + m), m - n)}
    assert tuple(Q) == min(losses, key=losses.get)
    delta, _ = constrained_min(F, w, list(Q))
    np.testing.assert_allclose(host(new), w + delta, rtol=1e-8, atol=1e-8 * np.abs(w).max())


def test_nm_masks_have_exactly_n_of_every_m(xp):
    op, F, w = quadratic(m=12, d=40, seed=8, blocks=[16, 24])
    mask, new = obs.prune_nm(op, xp.asarray(w), 2, 4, segments=[(0, 16), (16, 40)])
    groups = host(mask).reshape(-1, 4)
    assert np.all(groups.sum(axis=1) == 2)
    assert np.all(host(new)[~host(mask).astype(bool)] == 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        obs.prune_nm(op, xp.asarray(w), 2, 4, segments=[(0, 6)])
    with pytest.raises(ValueError, match="0 < n < m"):
        obs.prune_nm(op, xp.asarray(w), 4, 4)
