"""The main job: ``python -m rank1inv demo``.

Part 1 builds a StaticInverse for an embedded default problem (low-rank gradients, the regime
real networks produce), checks it against a dense float64 inverse next to the paper's float32
algorithm, and times both. Part 2 (``--skip-pruning`` to omit) is the pruning experiment of
``rank1inv.examples.digits`` on the UCI digits data shipped with the package.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .. import StaticInverse, _backend, reference, testing
from . import digits, progress
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
    # speed where it matters: m = 256 gradients of a 100 000-parameter model; the ratio of each
    # round (reference, then ours, interleaved) so that a busy machine shows as a spread
    G = testing.gradients("lowrank", 256, 100_000, seed=seed)
    rounds = Timer(timer.xp, repeat=15).rounds(
        lambda: reference.static_diag(*reference.static_precompute(G, damp), damp),
        lambda: StaticInverse(G, damp).diag(),
    )
    faster = [r for r, _, _ in rounds]  # time(paper)/time(ours) per round, sorted
    _, t_ref, t_ours = rounds[len(rounds) // 2]
    lines += [
        f"{'same, m = 256, d = 100 000 [ms]':34}{1e3 * t_ours:>14.2e}{1e3 * t_ref:>18.2e}   "
        f"({faster[len(faster) // 2]:.1f}× faster: median of {len(faster)} rounds, {faster[0]:.1f}–{faster[-1]:.1f}×)",
        "",
        "Full benchmarks (from a checkout): python -m benchmarks",
    ]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rank1inv demo",
        description="The main job, about 40 s on 2 quiet cores. Part 1: F⁻¹ for 64 low-rank gradients against a "
        "dense float64 inverse and the paper's float32 algorithm (accuracy), then speed at m = 256, "
        "d = 100 000. Part 2: OBS pruning of a digits MLP trained on the embedded UCI digits data.",
    )
    p.add_argument("--skip-pruning", action="store_true", help="only part 1")
    p.add_argument("--out", default=".", help="folder for the plot of part 2 (default: the current one)")
    p.add_argument("--no-plot", action="store_true", help="no plot (it needs matplotlib: pip install rank1inv[plot])")
    args = p.parse_args(argv)
    start = time.perf_counter()
    print("Running part 1: accuracy, then speed in 5 interleaved rounds (about 30 s on 2 cores) ...", flush=True)
    print("\n".join(accuracy_and_speed()))
    print(f"(part 1: {time.perf_counter() - start:.0f} s)", flush=True)
    if not args.skip_pruning:
        print()
        print("Running part 2: training a digits MLP, then pruning it (about 10 s on 2 cores) ...", flush=True)
        plot = None
        if not args.no_plot:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            plot = str(Path(args.out) / "rank1inv_pruning.png")
        with progress.reporting():  # a bar on stderr while the methods run
            print(digits.pruning_report(plot=plot))
    print(f"(total: {time.perf_counter() - start:.0f} s)")
    return 0
