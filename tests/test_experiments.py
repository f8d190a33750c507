"""The demo's data and model: embedded digits load offline, the MLP gradient is right, the
pruning experiment and the demo run end to end."""

import numpy as np
import pytest

from benchmarks import experiments
from rank1inv.examples import demo, digits


def test_digits_load_offline():
    Xtr, ytr, Xte, yte = digits.load_digits()
    assert Xtr.shape == (1257, 64) and Xte.shape == (540, 64)
    assert set(np.unique(ytr)) == set(range(10))
    assert 0.0 <= Xtr.min() and Xtr.max() <= 1.0


def test_mlp_gradient_matches_finite_differences():
    Xtr, ytr, _, _ = digits.load_digits()
    w = digits.init(3)
    X, y = Xtr[:20].astype(np.float64), ytr[:20]
    _, g = digits.loss_and_grad(w, X, y)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(w), 15, replace=False):
        e = np.zeros_like(w)
        e[i] = 1e-6
        fd = (digits.loss_and_grad(w + e, X, y)[0] - digits.loss_and_grad(w - e, X, y)[0]) / 2e-6
        assert abs(fd - g[i]) <= 1e-6 * max(1.0, abs(g[i]))


def test_pruning_experiment_runs_small():
    dense, damp, results, tuned = digits.pruning_table(m=32, steps=2)
    assert 0.9 <= dense <= 1.0 and damp > 0
    assert list(tuned) == list(digits.FINE_TUNED(2)) and set(tuned) <= set(results)
    for accs in [*results.values(), *tuned.values()]:
        assert len(accs) == len(digits.SPARSITIES) and all(0.0 <= a <= 1.0 for a in accs)
    # sanity, not a claim: mild pruning keeps most of the accuracy for every method
    assert all(accs[0] >= 0.8 for accs in results.values())


def test_fine_tune_keeps_the_pruned_weights_at_zero_and_trains_the_rest():
    Xtr, ytr, _, _ = digits.load_digits(0)
    w = digits.train(Xtr, ytr, epochs=2, seed=0)
    prunable = digits.weight_mask()
    pruned = w.copy()
    pruned[prunable & (np.abs(w) < np.quantile(np.abs(w[prunable]), 0.8))] = 0.0
    before = pruned.copy()
    tuned = digits.fine_tune(pruned, prunable, Xtr, ytr)
    assert np.array_equal(pruned, before)  # the input is not modified
    zero = prunable & (pruned == 0)
    assert np.all(tuned[zero] == 0.0)
    # the live weights train (all but those of pixels that are zero in every image)
    assert np.mean(tuned[~zero] != pruned[~zero]) > 0.9
    loss = lambda v: digits.loss_and_grad(v, Xtr, ytr)[0]
    assert loss(tuned) < loss(pruned)


def test_demo_part_one_reports_accuracy():
    lines = demo.accuracy_and_speed(m=16, d=120)
    text = "\n".join(lines)
    assert "backward error" in text and "faster" in text


def test_nm_experiment_runs_small():
    text = experiments.nm_report(ngrads=16, train_steps=100)
    assert text.count("mask valid: True") == 6 and "2:4 OBS, exact group updates" in text


def test_demo_writes_its_plot_where_asked(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = {"magnitude": [0.5] * 5, "OBS full": [0.6] * 5}
    tuned = {"magnitude": [0.7] * 5, "OBS full": [0.8] * 5}
    monkeypatch.setattr(digits, "pruning_table", lambda **kw: (0.9, 1e-3, rows, tuned))
    demo.main(["--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "rank1inv_pruning.png").exists()
    assert str(tmp_path / "plots") in capsys.readouterr().out


def test_laplace_experiment_curvatures_are_what_they_claim():
    """Per-sample gradients sum to the batch gradient; the GGN rows give Σ J_iᵀ(diag p − ppᵀ)J_i."""
    from benchmarks import experiments as E

    X, y, _, _ = digits.load_digits(0)
    X, y = X[:7], y[:7]
    w = digits.init(1)
    G = E.fisher_rows(w, X, y, "empirical")
    np.testing.assert_allclose(G.sum(0), len(y) * digits.loss_and_grad(w, X, y)[1], rtol=1e-10, atol=1e-12)
    z, J = E.logits_and_jacobians(w, X)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ggn = sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(len(y)))
    R = E.fisher_rows(w, X, y, "ggn")
    np.testing.assert_allclose(R.T @ R, ggn, rtol=1e-9, atol=1e-12 * np.abs(ggn).max())
    v = np.random.default_rng(0).standard_normal(len(w))  # Jacobians against central differences
    h = 1e-6
    fd = (E.logits_and_jacobians(w + h * v, X)[0] - E.logits_and_jacobians(w - h * v, X)[0]) / (2 * h)
    np.testing.assert_allclose(J @ v, fd, rtol=1e-6, atol=1e-8)
    S = E.fisher_rows(w, X, y, "sampled", seed=3)
    assert S.shape == G.shape


def test_optimizers_experiment_runs():
    pytest.importorskip("torch")
    from benchmarks import experiments as E

    for net in ("mlp", "cnn"):
        text = E.optimizers_report(steps=20, seeds=(0,), quick=True, net=net)
        for name in ("SGD", "Adam", "natural gradient", "block-diagonal NG", "KFAC, standard damping",
                     "KFAC, heuristic damping", "FOOF"):  # fmt: skip
            assert f"| {name} |" in text
