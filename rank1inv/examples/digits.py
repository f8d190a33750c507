"""The digits MLP and its OBS pruning experiment (the demo's part 2).

Data: the UCI handwritten digits (``rank1inv/examples/data``, CC BY 4.0), 1797 images of 8×8 pixels,
split 70/30 into train and test with a fixed seed. The model is a 64-32-10 tanh MLP written in
NumPy (2410 parameters).
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np

from .. import StaticInverse, obs
from . import progress

DATA = Path(__file__).parent / "data" / "digits.csv.gz"
SIZES = (64, 32, 10)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


def load_digits(seed: int = 0):
    """(X_train, y_train, X_test, y_test): pixels scaled to [0, 1] as float32, labels int64."""
    with gzip.open(DATA, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    X = (data[:, :64] / 16.0).astype(np.float32)
    y = data[:, 64].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.7 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return X[tr], y[tr], X[te], y[te]


# ------------------------------------------------------------------------------ the MLP
def _shapes():
    a, h, c = SIZES
    return [(a, h), (h,), (h, c), (c,)]


def num_params() -> int:
    return sum(int(np.prod(s)) for s in _shapes())


def unflatten(w):
    out, i = [], 0
    for s in _shapes():
        n = int(np.prod(s))
        out.append(w[i : i + n].reshape(s))
        i += n
    return out


def init(seed: int = 0):
    rng = np.random.default_rng(seed)
    parts = []
    for s in _shapes():
        parts.append(rng.standard_normal(s).ravel() / np.sqrt(s[0]) if len(s) == 2 else np.zeros(s[0]))
    return np.concatenate(parts)


def loss_and_grad(w, X, y):
    """Mean cross-entropy and its gradient (float64)."""
    W1, b1, W2, b2 = unflatten(np.asarray(w, dtype=np.float64))
    h = np.tanh(X @ W1 + b1)
    z = h @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.mean(np.log(p[np.arange(n), y] + 1e-300))
    dz = p
    dz[np.arange(n), y] -= 1.0
    dz /= n
    dh = (dz @ W2.T) * (1.0 - h * h)
    grad = np.concatenate([(X.T @ dh).ravel(), dh.sum(0), (h.T @ dz).ravel(), dz.sum(0)])
    return loss, grad


def accuracy(w, X, y) -> float:
    W1, b1, W2, b2 = unflatten(np.asarray(w, dtype=np.float64))
    return float(np.mean(np.argmax(np.tanh(X @ W1 + b1) @ W2 + b2, axis=1) == y))


def weight_mask():
    """True for the entries of the weight matrices, False for biases (which are not pruned)."""
    return np.concatenate([np.full(int(np.prod(s)), len(s) == 2) for s in _shapes()])


def train(X, y, *, epochs: int = 30, batch: int = 32, lr: float = 0.01, seed: int = 0, start=None, frozen=None):
    """Adam on mini-batches from ``init(seed)`` (or a copy of ``start``); entries where the boolean
    ``frozen`` is True keep their starting value (a pruned weight stays zero). Returns the flat
    weights (float64)."""
    rng = np.random.default_rng(seed)
    w = init(seed) if start is None else np.array(start, dtype=np.float64)
    live = None if frozen is None else ~np.asarray(frozen)
    m1, m2 = np.zeros_like(w), np.zeros_like(w)
    t = 0
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for a in range(0, len(y), batch):
            idx = perm[a : a + batch]
            _, g = loss_and_grad(w, X[idx], y[idx])
            if live is not None:
                g = g * live
            t += 1
            m1 = 0.9 * m1 + 0.1 * g
            m2 = 0.999 * m2 + 0.001 * g * g
            w -= lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-8)
    return w


def batch_gradients(w, X, y, m: int, batch: int = 16, seed: int = 0):
    """m mini-batch-averaged gradients at w, as an (m, d) float32 array."""
    rng = np.random.default_rng(seed)
    G = np.empty((m, len(w)), dtype=np.float32)
    for i in range(m):
        idx = rng.choice(len(y), size=batch, replace=False)
        G[i] = loss_and_grad(w, X[idx], y[idx])[1]
    return G


# ------------------------------------------------------------------------------ pruning
def pruning_table(*, m: int = 256, relative_damp: float = 1e-2, block_size: int = 128, steps: int = 4, seed: int = 0):
    """Test accuracy after one-shot pruning of the weight matrices (biases kept) at each
    sparsity, for every method, and OBS with recomputation (``obs.prune_in_steps``, ``steps``
    steps). λ = relative_damp · mean diag(GᵀG/m), fixed a priori (not tuned on the test set)."""
    Xtr, ytr, Xte, yte = load_digits(seed)
    w = train(Xtr, ytr, seed=seed)
    G = batch_gradients(w, Xtr, ytr, m, seed=seed)
    damp = relative_damp * float(np.mean(np.sum(G.astype(np.float64) ** 2, axis=0)) / m)
    full = StaticInverse(G, damp)
    blocked = StaticInverse(G, damp, block_size=block_size)
    keep = weight_mask()
    fresh = lambda wc, mk: batch_gradients(wc, Xtr, ytr, m, seed=seed + 1)
    methods = {
        "magnitude": lambda s: obs.prune(full, w, s, method="magnitude", update=None, prunable=keep),
        "OBD": lambda s: obs.prune(full, w, s, method="obd", update=None, prunable=keep),
        "OBS full": lambda s: obs.prune(full, w, s, prunable=keep),
        f"OBS blocks of {block_size}": lambda s: obs.prune(blocked, w, s, prunable=keep),
        "OBS exact joint": lambda s: obs.prune(full, w, s, update="exact", prunable=keep),
        f"OBS full, {steps} steps recomputed": lambda s: obs.prune_in_steps(w, s, steps, fresh, damp, prunable=keep),
        f"OBS exact, {steps} steps recomputed": lambda s: obs.prune_in_steps(
            w, s, steps, fresh, damp, update="exact", prunable=keep),
    }  # fmt: skip
    pruned = {
        name: [fn(s)[1] for s in SPARSITIES]
        for name, fn in progress.track(methods.items(), "pruning at each sparsity", len(methods))
    }
    results = {name: [accuracy(wp, Xte, yte) for wp in ws] for name, ws in pruned.items()}
    tuned = {  # the same short fine-tune of both, the pruned weights held at zero
        name: [accuracy(fine_tune(wp, keep, Xtr, ytr, seed), Xte, yte) for wp in pruned[name]]
        for name in progress.track(FINE_TUNED(steps), "fine-tuning the pruned models")
    }
    return accuracy(w, Xte, yte), damp, results, tuned


FINE_TUNE_EPOCHS = 2
FINE_TUNED = lambda steps: ("magnitude", f"OBS exact, {steps} steps recomputed")


def fine_tune(w, prunable, X, y, seed: int = 0):
    """``FINE_TUNE_EPOCHS`` epochs of Adam (lr 1e-3) from the pruned weights ``w``, its zeros among
    the ``prunable`` entries held at zero (the sparsity is kept)."""
    frozen = np.asarray(prunable) & (np.asarray(w) == 0)
    return train(X, y, epochs=FINE_TUNE_EPOCHS, lr=1e-3, seed=seed + 7, start=w, frozen=frozen)


def reading(results: dict) -> list[str]:
    """One line per sparsity: the best OBS variant against magnitude pruning, then what the
    numbers say (computed from them, not assumed)."""
    mag = results["magnitude"]
    obs_rows = {name: accs for name, accs in results.items() if name.startswith("OBS")}
    lines, wins = [], []
    for i, s in enumerate(SPARSITIES):
        name = max(obs_rows, key=lambda n: obs_rows[n][i])
        best = obs_rows[name][i]
        wins.append(best >= mag[i])
        lines.append(f"{s:>4.0%}: best OBS ({name}) {best:.1%} against magnitude {mag[i]:.1%}")
    kept = [f"{s:.0%}" for s, w in zip(SPARSITIES, wins) if w]
    lost = [f"{s:.0%}" for s, w in zip(SPARSITIES, wins) if not w]
    text = f"Reading: OBS keeps at least magnitude pruning's accuracy at {', '.join(kept) or 'no sparsity'}"
    if lost:
        text += (f"; not at {', '.join(lost)}, where this {num_params()}-parameter model has few weights left "
                 "(far past the papers' regime: docs/experiments.md)")  # fmt: skip
    recomputed = [n for n in obs_rows if "recomputed" in n]
    if recomputed:
        one, many = obs_rows["OBS full"], obs_rows[recomputed[0]]
        gain = max(b - a for a, b in zip(one, many))
        text += f". Recomputing the inverse between steps adds up to {100 * gain:.1f} points over one-shot OBS."
    return lines + [text]


def tuned_reading(tuned: dict) -> str:
    """What the fine-tuned table says: where OBS's head start survives the fine-tune."""
    (mag_name, mag), (obs_name, acc) = tuned.items()
    ahead = [f"{s:.0%} (+{100 * (b - a):.1f})" for s, a, b in zip(SPARSITIES, mag, acc) if b > a]
    behind = [f"{s:.0%}" for s, a, b in zip(SPARSITIES, mag, acc) if b <= a]
    text = f"Reading: after the same fine-tune {obs_name} is ahead of magnitude at {', '.join(ahead) or 'no sparsity'}"
    return text + (f"; not at {', '.join(behind)}." if behind else ".")


def pruning_report(plot: str | None = None, **kw) -> str:
    t0 = time.perf_counter()
    dense, damp, results, tuned = pruning_table(**kw)
    head = f"{'method':32}" + "".join(f"{s:>8.0%}" for s in SPARSITIES)
    lines = [
        f"Part 2 — pruning the weight matrices ({int(weight_mask().sum())} of {num_params()} parameters) of a "
        f"{'-'.join(map(str, SIZES))} MLP trained on UCI",
        f"digits; 256 mini-batch gradients, λ = {damp:.2e}; test accuracy of the dense model {dense:.1%}.",
        "Test accuracy after pruning to each sparsity:",
        "",
        head,
    ]
    lines += [f"{name:32}" + "".join(f"{a:>8.1%}" for a in accs) for name, accs in results.items()]
    lines += [
        "",
        *reading(results),
        "",
        f"After a short fine-tune ({FINE_TUNE_EPOCHS} epochs of Adam, pruned weights held at zero):",
        "",
        head,
    ]
    lines += [f"{name:32}" + "".join(f"{a:>8.1%}" for a in accs) for name, accs in tuned.items()]
    lines += ["", tuned_reading(tuned), f"({time.perf_counter() - t0:.0f} s)"]
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            lines.append("(matplotlib not installed: no plot)")
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            for name, accs in results.items():
                ax.plot([100 * s for s in SPARSITIES], [100 * a for a in accs], marker="o", label=name)
            ax.set_xlabel("sparsity [%]")
            ax.set_ylabel("test accuracy [%]")
            ax.set_title("Pruning a digits MLP (UCI digits, test accuracy)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(plot, dpi=120)
            lines.append(f"plot written to {plot}")
    return "\n".join(lines)
