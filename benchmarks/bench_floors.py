"""The CPU floors (``python -m benchmarks --floors [--quick]``): the figures of docs/benchmarks.md's
floor sections, each a ratio measured in one run.

- IHVP / floor and push_apply / floor (``Timer.ratio``: blocks of calls against blocks of the
  two float32 BLAS passes), three rounds each, every round printed (the VMs' memory speed drifts
  within minutes, so one figure is not enough);
- bfloat16 / float32 time of the IHVP and of push_apply over the same rounded values, by pairs
  of adjacent calls in alternating order (median and quartiles of the per-pair ratios: adjacent
  calls see the same memory phase, blocks seconds apart need not);
- each compiled pass alone against the BLAS call that streams the same float32 bytes
  (``cpu.project`` against ``G @ x``, ``cpu.combine`` against ``c @ G``), and each pass's
  bandwidth with one worker and with all.
"""

from __future__ import annotations

import itertools

import numpy as np

from rank1inv import DynamicInverse, StaticInverse, _backend, cpu
from rank1inv.examples.timing import Timer

from .bench import _fill, _LowRank, _lowrank

ROUNDS = 3


def _ratios(lines, timer, name, fn, floor, repeat=None):
    for _ in range(ROUNDS):
        r, t, f = timer.ratio(fn, floor, repeat)
        lines.append(f"| {name} | {r:.3f} | {t * 1e3:.2f} / {f * 1e3:.2f} ms |")


def _passes(lines, timer, m: int, d: int):
    """Each compiled float32 pass against float32 BLAS on the same G, and GB/s per worker count."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((m, d), dtype=np.float32)
    x, c = rng.standard_normal(d).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    X, C = x.astype(np.float64)[None, :, None], c.astype(np.float64)[None, :, None]
    Gg = G[None]
    project = lambda: cpu.project(Gg, X)
    combine = lambda: cpu.combine(Gg, None, C, 0.0, 1.0)
    for name, fn, blas in (("project", project, lambda: G @ x), ("combine", combine, lambda: c @ G)):
        r, t, f = timer.ratio(fn, blas)
        lines.append(f"| float32 {name} / BLAS (m={m}, d={d:.0e}) | {r:.3f} | {t * 1e3:.2f} / {f * 1e3:.2f} ms |")
    workers = cpu._workers()
    for storage in ("float32", "bfloat16"):
        Gs = (G if storage == "float32" else _backend.encode(np, G, storage))[None]
        for w in sorted({1, workers}):
            with _workers_at(w):
                tp = timer(lambda: cpu.project(Gs, X))
                tc = timer(lambda: cpu.combine(Gs, None, C, 0.0, 1.0))
            gb = Gs.nbytes / 1e9
            lines.append(f"| {storage} project GB/s, {w} worker(s) (m={m}, d={d:.0e}) | {gb / tp:.1f} | "
                         f"combine {gb / tc:.1f} GB/s |")  # fmt: skip


class _workers_at:
    """Temporarily run the compiled passes on ``n`` workers (restored on exit)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.saved = cpu._workers
        cpu._workers = lambda: self.n

    def __exit__(self, *exc):
        cpu._workers = self.saved


def run(quick: bool = False) -> str:
    """The floor table as markdown (about 3 min on 2 cores; about 10 GB of gradients and windows
    by their array sizes, not measured; ``quick``: small sizes, a few seconds, a smoke test only)."""
    xp = np
    timer = Timer(xp, repeat=3 if quick else 9, pause=0.0 if quick else None)
    lines = ["| measurement | value | note |", "|---|---|---|"]
    m, d = (64, 20_000) if quick else (256, 100_000)
    G = _lowrank(xp, m, d)
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    c = np.random.default_rng(2).standard_normal(m).astype(np.float32)
    op = StaticInverse(G, 1e-4)
    _ratios(lines, timer, f"StaticInverse IHVP / floor (m={m}, d={d:.0e})", lambda: op @ x, lambda: (G @ x, c @ G))

    m, d = (128, 5_000) if quick else (1024, 20_000)
    fresh_count = m + 64  # cycled: a gradient comes back only after it left the window
    G = _LowRank(xp, d, seed=m).matrix(m + fresh_count)
    w = DynamicInverse(d, m, 1e-4, xp=xp)
    _fill(w, G, m)
    fresh = itertools.cycle(range(m, m + fresh_count))
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    c = np.random.default_rng(2).standard_normal(m).astype(np.float32)
    Gw = w._G
    _ratios(lines, timer, f"push_apply / floor, full window (m={m}, d={d:.0e})",
            lambda: w.push_apply(G[next(fresh)]), lambda: (Gw @ x, c @ Gw), repeat=6)  # fmt: skip

    m, d = (64, 50_000) if quick else (256, 2_000_000)
    base = _LowRank(xp, d, seed=5).matrix(2 * m + 64)
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    ops = {}
    for name in ("float32", "bfloat16"):
        Gs = base if name == "float32" else _backend.encode(xp, base, name)
        win = DynamicInverse(d, m, 1e-4, dtype=name, xp=xp)
        _fill(win, Gs, m)
        ops[name] = (StaticInverse(Gs[:m], 1e-4), win, Gs, itertools.cycle(range(m, 2 * m + 64)))
    (sb, wb, Gb, fb), (sf, wf, Gf, ff) = ops["bfloat16"], ops["float32"]
    pairs = 8 if quick else 40
    cases = [
        ("IHVP", lambda: sb @ x, lambda: sf @ x),
        ("push_apply", lambda: wb.push_apply(Gb[next(fb)]), lambda: wf.push_apply(Gf[next(ff)])),
    ]
    for what, fn, ref in cases:
        q50, q25, q75, a, b = timer.paired(fn, ref, pairs)
        lines.append(f"| bfloat16 / float32 {what} time (m={m}, d={d:.0e}) | {q50:.3f} | "
                     f"quartiles {q25:.3f}–{q75:.3f}; {a * 1e3:.1f} / {b * 1e3:.1f} ms |")  # fmt: skip
    ops = sb = wb = Gb = sf = wf = Gf = base = None
    _passes(lines, timer, *((64, 50_000) if quick else (256, 2_000_000)))
    lines.insert(0, f"compiled CPU passes: {cpu.available()}, workers: {cpu._workers()}\n")
    return "\n".join(lines)
