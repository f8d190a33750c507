"""Experiments on real data beyond the demo: the M-FAC optimizer against SGD, N:M pruning of a
digits CNN, damping, Laplace (``python -m benchmarks experiments [name]``, from a checkout; they
need PyTorch). The digits data and MLP are ``rank1inv.examples.digits``.
"""

from __future__ import annotations

import sys

import numpy as np

from rank1inv import StaticInverse
from rank1inv.examples import progress
from rank1inv.examples.digits import SIZES, load_digits, loss_and_grad, pruning_report, train, unflatten


# ------------------------------------------------------------------------------ M-FAC vs SGD and Adam
def training_report(steps: int = 300, batch: int = 32, seed: int = 0) -> str:
    """Training loss after ``steps`` steps on the digits MLP of M-FAC against first-order
    baselines (SGD plain and with momentum 0.9, Adam), M-FAC without and with momentum, each at
    its best learning rate from a grid (tuned on the final training loss; the best point must
    be interior to its grid, so the grids below were widened until it was)."""
    import torch

    from rank1inv.adapters.torch import MFAC

    Xtr, ytr, _, _ = load_digits(seed)
    X, Y = torch.from_numpy(Xtr), torch.from_numpy(ytr)

    def model():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def run(make_opt):
        net = model()
        return _torch_train(net, make_opt(net.parameters()), X, Y, steps, batch, seed)

    lr_only = lambda lrs: [(lr, None) for lr in lrs]
    mfac_grid = [(lr, dp) for dp in (1e-3, 1e-2, 1e-1, 1.0) for lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)]
    grids = {
        "SGD": (lambda lr, _: lambda p: torch.optim.SGD(p, lr=lr), lr_only((0.1, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0))),
        "SGD, momentum 0.9": (
            lambda lr, _: lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
            lr_only((0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3)),
        ),
        "Adam": (
            lambda lr, _: lambda p: torch.optim.Adam(p, lr=lr),
            lr_only((1e-3, 3e-3, 6e-3, 1e-2, 2e-2, 3e-2, 6e-2)),
        ),
        "M-FAC (ngrads=32)": (lambda lr, dp: lambda p: MFAC(p, lr=lr, ngrads=32, damp=dp), mfac_grid),
        "M-FAC, momentum 0.9": (
            lambda lr, dp: lambda p: MFAC(p, lr=lr, ngrads=32, damp=dp, momentum=0.9),
            mfac_grid,
        ),
    }
    lines = [
        f"Training loss after {steps} steps (batch {batch}) on the digits MLP, each at its best grid point",
        "(SGD and Adam: 7 learning rates; M-FAC: 8 learning rates x dampings 1e-3, 1e-2, 1e-1, 1), one seed:",
        "",
    ]
    best = {}
    for name, (make, grid) in grids.items():
        losses = [run(make(lr, dp)) for lr, dp in progress.track(grid, name)]
        i = int(np.argmin(losses))
        best[name] = losses[i]
        lr, dp = grid[i]
        row = [(l, x) for (l, d), x in zip(grid, losses) if d == dp]  # the lr sweep at the best damping
        j = [l for l, _ in row].index(lr)
        edge = "" if 0 < j < len(row) - 1 else "  (best at the grid's edge)"
        where = f"lr={lr:g}" + ("" if dp is None else f", damp={dp:g}")
        cells = ", ".join(f"{l:g}: {x:.4f}" for l, x in row)
        lines.append(f"{name:22} best {losses[i]:.4f} at {where}{edge}   (lr: {cells})")
    first = min((k for k in best if not k.startswith("M-FAC")), key=best.get)
    second = min((k for k in best if k.startswith("M-FAC")), key=best.get)
    verdict = "lower" if best[second] < best[first] else "not lower"
    lines += ["", f"Reading: the best M-FAC run ({second}, {best[second]:.4f}) is {verdict} than the best "
              f"first-order baseline ({first}, {best[first]:.4f}), on one seed; M-FAC had "
              f"{len(mfac_grid) / 7:.1f}x the tuning budget (its damping too)."]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------ second-order optimizers
def optimizers_report(
    steps: int = 200, batch: int = 64, seeds=(0, 1, 2), plot: str | None = None, quick: bool = False, net: str = "mlp"
) -> str:
    """The exact-natural-gradient paper's comparison on a digits model (PyTorch; ``net`` "mlp"
    or "cnn"): SGD, Adam, the exact subsampled natural gradient (true Fisher from the same batch,
    ``NaturalGradient``), its block-diagonal form (one block per layer), KFAC with standard and
    with heuristic damping (true Fisher) and FOOF, each at the best setting of a small lr
    (× damping) grid, chosen by the mean final training loss over ``seeds``; training loss
    against steps and wall time (mean over seeds)."""
    import time

    import torch

    from rank1inv.adapters.kfac import KFAC
    from rank1inv.adapters.natural import FOOF, NaturalGradient

    if net not in ("mlp", "cnn"):
        raise ValueError(f"net must be 'mlp' or 'cnn', got {net!r}")
    if net == "mlp":
        Xtr, ytr, _, _ = load_digits(0)
        X, Y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    else:
        X, Y, _, _ = _cnn_data(0)

    def model(seed):
        if net == "cnn":
            return digits_cnn(seed)
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    takes_inputs = ("natural gradient", "block-diagonal NG", "KFAC, standard damping", "KFAC, heuristic damping")

    def run(kind, lr, damp, seed):
        net = model(seed)
        gen_f = torch.Generator().manual_seed(seed)
        if kind == "SGD":
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        elif kind == "Adam":
            opt = torch.optim.Adam(net.parameters(), lr=lr)
        elif kind in ("natural gradient", "block-diagonal NG"):
            structure = "full" if kind == "natural gradient" else "layer"
            opt = NaturalGradient(net, lr=lr, damp=damp, momentum=0.9, generator=gen_f, structure=structure)
        elif kind.startswith("KFAC"):
            damping = "standard" if "standard" in kind else "heuristic"
            opt = KFAC(net, lr=lr, damp=damp, damping=damping, momentum=0.9, generator=gen_f)
        else:
            opt = FOOF(net, lr=lr, damp=damp, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        curve, clock, t0 = [], [], time.perf_counter()
        for step in range(steps):
            idx = torch.randint(0, len(Y), (batch,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X[idx]), Y[idx]).backward()
            try:
                opt.step(X[idx]) if kind in takes_inputs else opt.step()
            except ValueError as e:  # a diverged run: the optimizer refuses non-finite steps
                if "non-finite" not in str(e) and "positive definite" not in str(e):
                    raise
                points = sum(1 for t in range(steps) if t % 10 == 9 or t == steps - 1)
                curve += [float("inf")] * (points - len(curve))
                clock += [time.perf_counter() - t0] * (points - len(clock))
                break
            if step % 10 == 9 or step == steps - 1:
                with torch.no_grad():
                    loss = torch.nn.functional.cross_entropy(net(X), Y).item()
                curve.append(loss if np.isfinite(loss) else float("inf"))
                clock.append(time.perf_counter() - t0)
        return np.array(curve), np.array(clock)

    grids = {
        "SGD": [(lr, None) for lr in (0.1, 0.3, 1.0)],
        "Adam": [(lr, None) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 0.1)],
        "natural gradient": [(lr, dp) for lr in (0.01, 0.03, 0.1, 0.3, 1.0) for dp in (1e-2, 1e-1, 1.0, 10.0)],
        "block-diagonal NG": [(lr, dp) for lr in (0.01, 0.03, 0.1, 0.3, 1.0) for dp in (1e-2, 1e-1, 1.0, 10.0)],
        "KFAC, standard damping": [
            (lr, dp) for lr in (1e-3, 3e-3, 0.01, 0.03, 0.1) for dp in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
        ],
        "KFAC, heuristic damping": [(lr, dp) for lr in (3e-3, 0.01, 0.03, 0.1) for dp in (1e-3, 1e-2, 1e-1, 1.0)],
        "FOOF": [(lr, dp) for lr in (0.1, 0.3, 1.0) for dp in (1e-2, 1e-1, 1.0, 10.0)],
    }
    if quick:  # one setting each (a smoke test)
        grids = {kind: grid[len(grid) // 2 : len(grid) // 2 + 1] for kind, grid in grids.items()}
    rows, curves = [], {}
    for kind, grid in grids.items():
        results = []
        for lr, dp in progress.track(grid, f"{kind} ({len(seeds)} seeds each)"):
            runs = [run(kind, lr, dp, seed) for seed in seeds]
            final = np.array([c[-1] for c, _ in runs])
            results.append((float(np.mean(final)), float(np.std(final)), lr, dp, runs))
        mean, std, lr, dp, runs = min(results, key=lambda r: r[0])
        curve = np.mean([c for c, _ in runs], axis=0)
        clock = np.mean([t for _, t in runs], axis=0)
        curves[kind] = (curve, clock)
        half = curve[len(curve) // 2 - 1]
        lrs, dps = sorted({g[0] for g in grid}), sorted({g[1] for g in grid if g[1] is not None})
        edge = (len(lrs) > 1 and lr in (lrs[0], lrs[-1])) or (len(dps) > 1 and dp in (dps[0], dps[-1]))
        rows.append(f"| {kind} | {lr:g}{'*' if edge else ''} | {'–' if dp is None else f'{dp:g}'} | {half:.4f} | "
                    f"{mean:.4f} ± {std:.4f} | {clock[-1] / steps * 1e3:.2f} |")  # fmt: skip
    lines = [
        f"{'digits MLP (64-32-10, tanh)' if net == 'mlp' else 'digits CNN (' + DIGITS_CNN + ')'}, {steps} steps "
        f"of batch {batch}, momentum 0.9 for all but Adam, "
        f"best of the grid by the mean final training loss over seeds {tuple(seeds)}:",
        "",
        f"| optimizer | lr | damping | training loss at step {steps // 2} | final training loss (mean ± std) | "
        "ms per step |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "(* the best point lies on the edge of its grid)",
    ]
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            lines.append("\n(matplotlib is not installed: no plot)")
        else:
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for kind, (curve, clock) in curves.items():
                xs = np.minimum(np.arange(10, 10 * len(curve) + 1, 10), steps)
                axes[0].semilogy(xs, curve, label=kind)
                axes[1].semilogy(clock, curve, label=kind)
            axes[0].set_xlabel("step")
            axes[1].set_xlabel("wall time (s)")
            for ax in axes:
                ax.set_ylabel("training loss")
                ax.legend()
            fig.tight_layout()
            fig.savefig(plot, dpi=100)
            plt.close(fig)
            lines.append(f"\n(plot: {plot})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ a digits CNN (PyTorch)
DIGITS_CNN = "conv 1→8 3×3, ReLU, max-pool 2, conv 8→16 3×3, ReLU, linear 256→10"


def digits_cnn(seed: int = 0):
    """Conv(1→8, 3×3) – ReLU – max-pool 2 – Conv(8→16, 3×3) – ReLU – Linear(256 → 10) on the 8×8
    digits (3 818 parameters)."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10),
    )  # fmt: skip


def _cnn_data(seed: int = 0):
    import torch

    Xtr, ytr, Xte, yte = load_digits(seed)
    as_images = lambda X: torch.from_numpy(X).reshape(-1, 1, 8, 8)
    return as_images(Xtr), torch.from_numpy(ytr), as_images(Xte), torch.from_numpy(yte)


def _torch_train(net, opt, X, Y, steps: int, batch: int = 32, seed: int = 0) -> float:
    """``steps`` optimizer steps on random mini-batches; returns the final full-batch training loss."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(Y), (batch,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[idx]), Y[idx]).backward()
        opt.step()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(X), Y).item()
    return loss if np.isfinite(loss) else float("inf")


def _cnn_accuracy(net, X, Y) -> float:
    import torch

    with torch.no_grad():
        return float((net(X).argmax(1) == Y).float().mean())


def nm_report(seed: int = 0, ngrads: int = 128, train_steps: int = 1500) -> str:
    """Test accuracy of the digits CNN pruned in one shot to N:M semi-structured sparsity (2:4
    and 4:8 along the input dimension of every weight whose rows allow it: the second
    convolution and the linear layer), magnitude against OBS (``prune_model(nm=…)``: groups
    chosen by OBS saliency with the exact joint update inside each group, a block-diagonal
    inverse Fisher with one block per layer from ``ngrads`` mini-batch gradients)."""
    import torch

    from rank1inv.adapters import torch as ta

    X, Y, Xte, Yte = _cnn_data(seed)
    net = digits_cnn(seed)
    _torch_train(net, torch.optim.Adam(net.parameters(), lr=3e-3), X, Y, train_steps, seed=seed)
    dense = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, len(Y), (16,), generator=gen) for _ in range(ngrads)]
    batches = [(X[i], Y[i]) for i in batches]
    loss = lambda model, b: torch.nn.functional.cross_entropy(model(b[0]), b[1])
    from rank1inv import obs as obs_

    rows = [("dense", _cnn_accuracy(net, Xte, Yte), None)]
    for n, m in progress.track(((2, 4), (4, 8)), "N:M patterns"):
        segments = ta.nm_segments(net, m)
        w = ta.model_vector(net).astype(np.float64)
        variants = {
            "magnitude": lambda: obs_.prune_nm(None_op(w), w, n, m, segments=segments, method="magnitude"),
        }
        mask, new = variants["magnitude"]()
        ta.write_vector(net, new.astype(np.float32))
        rows.append((f"{n}:{m} magnitude", _cnn_accuracy(net, Xte, Yte), _nm_ok(mask, segments, n, m)))
        for update, label in ((None, "OBS mask only"), ("exact", "OBS, exact group updates")):
            net.load_state_dict(dense)
            G = ta.gradients(net, loss, batches, ngrads)
            op = StaticInverse(G, obs_.relative_damp(G, 1e-2), block_size=ta.blocks_from_model(net))
            mask, new = obs_.prune_nm(op, w, n, m, segments=segments, update=update)
            ta.write_vector(net, new.astype(np.float32))
            rows.append((f"{n}:{m} {label}", _cnn_accuracy(net, Xte, Yte), _nm_ok(mask, segments, n, m)))
        net.load_state_dict(dense)
    prunable = sum(b - a for a, b in ta.nm_segments(net, 4))
    lines = [
        f"N:M pruning of a digits CNN ({sum(p.numel() for p in net.parameters())} parameters; the second "
        f"convolution and the linear layer, {prunable} weights), one shot,",
        f"{ngrads} gradients of batch 16, λ = 1e-2·mean diag(GᵀG/m), one block per layer. Test accuracy:",
        "",
    ]
    lines += [f"{name:32}{acc:>8.1%}" + ("" if ok is None else f"   (mask valid: {ok})") for name, acc, ok in rows]
    return "\n".join(lines)


def None_op(w):
    """A placeholder operator for magnitude N:M pruning (which needs only w's namespace)."""
    return StaticInverse(np.zeros((1, len(w))), 1.0)


def _nm_ok(mask, segments, n, m) -> bool:
    """Exactly n kept in every group of m of every segment."""
    mask = np.asarray(mask)
    return all(bool(np.all(mask[a:b].reshape(-1, m).sum(1) == n)) for a, b in segments)


def damping_report(steps: int = 300, seed: int = 0) -> str:
    """M-FAC on the digits CNN with absolute dampings and with damp="relative:…" (λ from the
    first gradient's scale): final training loss after ``steps`` steps at the best lr of a grid."""

    from rank1inv.adapters.torch import MFAC

    X, Y, _, _ = _cnn_data(seed)
    lrs = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    lines = [f"M-FAC (ngrads=32) on the digits CNN, {steps} steps of batch 32, final training loss at the best lr:", ""]
    dampings = (1e-3, 1e-2, 1e-1, 1.0, "relative:1", "relative:30", "relative:100", "relative:300")
    for damp in progress.track(dampings, "dampings (an lr sweep each)"):
        losses = []
        for lr in lrs:
            net = digits_cnn(seed)
            opt = MFAC(net.parameters(), lr=lr, ngrads=32, damp=damp)
            losses.append(_torch_train(net, opt, X, Y, steps, seed=seed))
        i = int(np.argmin(losses))
        lines.append(f"damp={damp!s:14} best {losses[i]:.4f} at lr={lrs[i]:g}   ("
                     + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in zip(lrs, losses)) + ")")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------ Laplace
def per_sample_gradients(w, X, y):
    """Gradients of each sample's cross-entropy at w for labels y (rows of G for a Fisher of the
    summed loss): (n, d) float64, in the layout of ``unflatten``."""
    W1, b1, W2, b2 = unflatten(np.asarray(w, dtype=np.float64))
    h = np.tanh(X @ W1 + b1)
    z = h @ W2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = p
    dz[np.arange(len(y)), y] -= 1.0
    dh = (dz @ W2.T) * (1.0 - h * h)
    n = len(y)
    return np.concatenate([np.einsum("na,nh->nah", X, dh).reshape(n, -1), dh,
                           np.einsum("nh,nc->nhc", h, dz).reshape(n, -1), dz], axis=1)  # fmt: skip


def fisher_rows(w, X, y, kind: str, seed: int = 0):
    """Rows G with GᵀG a curvature of the summed cross-entropy at w: "empirical" (the data
    labels), "sampled" (one label per input drawn from the model: the true Fisher, eq. 1 of the
    exact-natural-gradient paper), or "ggn" (exact: J_iᵀ·L_i with L_iL_iᵀ = diag(p_i) − p_ip_iᵀ, C rows per input)."""
    if kind == "empirical":
        return per_sample_gradients(w, X, y)
    z, J = logits_and_jacobians(w, X)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if kind == "sampled":
        rng = np.random.default_rng(seed)
        labels = (p.cumsum(1) > rng.random((len(X), 1))).argmax(1)
        return per_sample_gradients(w, X, labels)
    if kind == "ggn":  # diag(p) − ppᵀ = (diag(√p) − p√pᵀ)(…)ᵀ: a square root without factorising
        root = np.eye(p.shape[1])[None] * np.sqrt(p)[:, :, None] - p[:, :, None] * np.sqrt(p)[:, None, :]
        return np.einsum("ncd,nck->nkd", J, root).reshape(-1, J.shape[2])
    raise ValueError(f"kind must be 'empirical', 'sampled' or 'ggn', got {kind!r}")


def logits_and_jacobians(w, X):
    """Logits (n, C) and their Jacobians with respect to w (n, C, d), float64."""
    W1, b1, W2, b2 = unflatten(np.asarray(w, dtype=np.float64))
    h = np.tanh(X @ W1 + b1)
    z = h @ W2 + b2
    n, (a, hid), c = len(X), W1.shape, W2.shape[1]
    eye = np.eye(c)
    back = W2.T[None, :, :] * (1.0 - h * h)[:, None, :]  # (n, C, hid): ∂z_c/∂(pre-activation)
    J = np.concatenate([np.einsum("na,nch->ncah", X, back).reshape(n, c, a * hid), back,
                        np.einsum("nh,ck->nchk", h, eye).reshape(n, c, hid * c),
                        np.broadcast_to(eye, (n, c, c))], axis=2)  # fmt: skip
    return z, J


def _scores(probs, y, bins: int = 15):
    from rank1inv.laplace import expected_calibration_error

    nll = -float(np.mean(np.log(probs[np.arange(len(y)), y] + 1e-300)))
    return float(np.mean(probs.argmax(1) == y)), nll, expected_calibration_error(probs, y, bins)


def laplace_report(seed: int = 0, samples: int = 1000) -> str:
    """Post-hoc Laplace on the digits MLP (three curvatures of all training samples, prior
    precision tuned by the evidence, scalar and per layer): test accuracy, NLL and ECE of the MAP
    model against the linearised predictive (probit, and Monte Carlo with exact samples)."""
    import time

    from rank1inv import laplace
    from rank1inv.static import StaticInverse

    X, y, Xt, yt = load_digits(seed)
    w = train(X, y, seed=seed)
    loss = float(len(y) * loss_and_grad(w, X, y)[0])  # summed negative log likelihood
    layers = [SIZES[0] * SIZES[1] + SIZES[1], SIZES[1] * SIZES[2] + SIZES[2]]
    z, J = logits_and_jacobians(w, Xt)
    n, c, d = J.shape
    probs_map = np.exp(z - z.max(1, keepdims=True))
    probs_map /= probs_map.sum(1, keepdims=True)
    rows = [("MAP", "–", "–", "–", "–", *_scores(probs_map, yt), "–")]
    for kind in progress.track(("empirical", "sampled", "ggn"), "curvatures: fit, tune, calibrate"):
        t0 = time.perf_counter()
        G = fisher_rows(w, X, y, kind, seed)
        full = StaticInverse(G, 1.0, scale=1.0)
        op = StaticInverse(G, 1.0, scale=1.0, block_size=layers)
        for structure, base, per_block in (("full", full, False), ("per layer", op, False), ("per layer", op, True)):
            post, evidence = laplace.tune_damp(base, loss, w, per_block=per_block, bounds=(1e-4, 1e4))
            var = laplace.predictive_variance(post, J.reshape(n * c, d)).reshape(n, c)
            probs = laplace.probit_probabilities(z, var)
            prior = post.damp if isinstance(post.damp, tuple) else (post.damp,)
            rows.append((f"{kind} ({G.shape[0]} rows)", structure, "per layer" if per_block else "one",
                         ", ".join(f"{v:.3g}" for v in prior), f"{evidence:.1f}", *_scores(probs, yt),
                         f"{time.perf_counter() - t0:.2f}"))  # fmt: skip
            t0 = time.perf_counter()
        eps = post.sample(samples, rng=seed)  # (S, d) exact draws from N(0, F⁻¹)
        f = z[None, :, :] + np.einsum("ncd,sd->snc", J, eps)  # linearised logits per draw
        p = np.exp(f - f.max(2, keepdims=True))
        probs_mc = (p / p.sum(2, keepdims=True)).mean(0)
        rows.append((f"{kind}, {samples} exact samples", "per layer", "per layer", "as above", "",
                     *_scores(probs_mc, yt), f"{time.perf_counter() - t0:.2f}"))  # fmt: skip
    lines = [
        f"digits MLP {SIZES}, d = {d}, MAP by Adam (30 epochs, no weight decay), F = Λ₀ + GᵀG from the "
        f"{len(y)} training samples; posterior full (one d×d block) or block-diagonal per layer {layers}; "
        f"linearised predictive on the {n} test "
        "samples (probit unless sampled). Time: building F, tuning, predictive.",
        "",
        "| curvature | posterior | prior | prior precision | log evidence | test accuracy | test NLL | ECE (15 bins) "
        "| time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(str(v) if isinstance(v, str) else f"{v:.4f}" for v in r) + " |" for r in rows]
    return "\n".join(lines)


EXPERIMENTS = {  # name: (what it prints, its time on 2 cores where measured)
    "pruning": ("OBS pruning of a digits MLP (the demo's part 2)", "about 10 s"),
    "nm": ("N:M semi-structured pruning of a digits CNN", "minutes"),
    "training": ("M-FAC against SGD, SGD with momentum and Adam on the digits MLP", "minutes"),
    "damping": ("M-FAC's final loss across dampings on the digits CNN", "minutes"),
    "laplace": ("Laplace: evidence, prior tuning and calibration of the digits MLP", "about 2 min"),
    "optimizers": (
        "exact, block-diagonal natural gradient, KFAC (both dampings), FOOF, SGD, Adam: digits MLP",
        "about 3 min",
    ),
    "optimizers-cnn": ("the same comparison on the digits CNN", "minutes"),
}


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m benchmarks experiments",
        description="The experiments of docs/experiments.md on the embedded UCI digits data (needs torch). "
        + "; ".join(f"{name}: {text} ({t})" for name, (text, t) in EXPERIMENTS.items()),
    )
    p.add_argument("name", nargs="?", default="pruning", choices=list(EXPERIMENTS), help="which (default: pruning)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    reports = {"training": training_report, "pruning": pruning_report, "nm": nm_report, "damping": damping_report,
               "laplace": laplace_report, "optimizers": optimizers_report,
               "optimizers-cnn": lambda: optimizers_report(net="cnn")}  # fmt: skip
    print(reports[args.name]())


if __name__ == "__main__":
    main()
