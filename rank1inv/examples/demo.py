"""The main job: ``python -m rank1inv demo``.

Part 1 builds a StaticInverse for an embedded default problem (low-rank gradients, the regime
real networks produce), checks it against a dense float64 inverse next to the paper's float32
algorithm, and times both. Part 2 (``--skip-pruning`` to omit) is the pruning experiment of
``rank1inv.examples.digits`` on the UCI digits data shipped with the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .. import StaticInverse, _backend, reference, testing
from . import digits
from .timing import Timer


def accuracy_and_speed(m: int = 64, d: int = 800, damp: float = 1e-6, seed: int = 0) -> list[str]:
    G = testing.gradients("lowrank", m, d, seed=seed)
    F = testing.dense_fisher(G, damp)
    Finv = np.linalg.inv(F)
    x = np.random.default_rng(seed + 1).standard_normal(d)
    lines = [
        f"Part 1 — F = λI + GᵀG/m for {m} low-rank gradients (rank 8 + 1e-3 noise), d = {d}, λ = {damp:g}, "
        f"float32 storage, cond(F) = {np.linalg.cond(F):.1e}",
        "",
        f"{'':34}{'rank1inv':>14}{'paper (float32)':>18}",
    ]
    op = StaticInverse(G, damp)
    diag = op.diag()
    V, q = reference.static_precompute(G, damp)
    diag_ref = reference.static_diag(V, q, damp)
    timer = Timer(_backend.namespace_from_argument(None), repeat=7)  # warm, median of 7
    t_ours = timer(lambda: StaticInverse(G, damp).diag())
    t_ref = timer(lambda: reference.static_diag(*reference.static_precompute(G, damp), damp))
    eta = testing.backward_error(F, op @ x, x)
    eta_ref = testing.backward_error(F, reference.static_apply(V, q, damp, x), x)
    fwd = np.linalg.norm(op @ x - Finv @ x) / np.linalg.norm(Finv @ x)
    fwd_ref = np.linalg.norm(reference.static_apply(V, q, damp, x) - Finv @ x) / np.linalg.norm(Finv @ x)
    rows = [
        ("IHVP backward error η", eta, eta_ref),
        ("IHVP forward error", fwd, fwd_ref),
        (
            "diag(F⁻¹) max relative error",
            testing.relative_error(diag, np.diag(Finv)),
            testing.relative_error(diag_ref, np.diag(Finv)),
        ),
        ("precompute + diagonal [ms]", 1e3 * t_ours, 1e3 * t_ref),
    ]
    lines += [f"{name:34}{a:>14.2e}{b:>18.2e}" for name, a, b in rows]
    # speed where it matters: m = 256 gradients of a 100 000-parameter model
    G = testing.gradients("lowrank", 256, 100_000, seed=seed)
    slower, t_ref, t_ours = Timer(timer.xp, repeat=3).ratio(
        lambda: reference.static_diag(*reference.static_precompute(G, damp), damp),
        lambda: StaticInverse(G, damp).diag(),
    )
    lines += [
        f"{'same, m = 256, d = 100 000 [ms]':34}{1e3 * t_ours:>14.2e}{1e3 * t_ref:>18.2e}   ({slower:.1f}× faster)",
        "",
        "Full benchmarks (from a checkout): python -m benchmarks",
    ]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rank1inv demo", description=__doc__.splitlines()[0])
    p.add_argument("--skip-pruning", action="store_true", help="only part 1")
    p.add_argument("--out", default=".", help="folder for the plot of part 2 (default: the current one)")
    p.add_argument("--no-plot", action="store_true", help="no plot (it needs matplotlib: pip install rank1inv[plot])")
    args = p.parse_args(argv)
    print("\n".join(accuracy_and_speed()))
    if not args.skip_pruning:
        print()
        plot = None
        if not args.no_plot:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            plot = str(Path(args.out) / "rank1inv_pruning.png")
        print(digits.pruning_report(plot=plot))
    return 0
