"""Benchmarks: ratios measured in one run (docs/design.md §9).

``python -m benchmarks [--device cpu|gpu] [--quick] [--out FILE]``

Every figure is a ratio of two timings taken in the same process: time / floor (the memory
traffic a product cannot avoid) and time / the paper's algorithm as written (``reference``) on
the same backend. Each timing is the median of several repetitions after a warm-up.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import numpy as np

from rank1inv import DynamicInverse, StaticInverse, _backend, reference
from rank1inv.examples import progress
from rank1inv.examples.timing import SPIN_PAUSE, WARM_UP, WARM_UP_CALLS, Timer  # noqa: F401 - re-exported
from rank1inv.groups import coefficients as _coef


class _LowRank:
    """Gradients like real ones: rank 8 + 1e-3 noise, float32, made row by row on the device
    (so a (m, d) matrix never needs float64 or a second copy)."""

    def __init__(self, xp, d, seed=0):
        rng = np.random.default_rng(seed)
        self.xp, self.d, self.seed = xp, d, seed
        self.V = xp.asarray((rng.standard_normal((8, d)) / np.sqrt(8)).astype(np.float32))

    def row(self, i):
        xp = self.xp
        u = np.random.default_rng([self.seed, i]).standard_normal(8).astype(np.float32)
        g = xp.asarray(u) @ self.V
        if _backend.is_cupy(xp):
            import cupy

            g += cupy.random.default_rng([self.seed, i]).standard_normal(self.d, dtype=cupy.float32) * 1e-3
        else:
            g += (1e-3 * np.random.default_rng([self.seed, i, 1]).standard_normal(self.d)).astype(np.float32)
        return g

    def matrix(self, m, out=None):
        xp = self.xp
        G = xp.empty((m, self.d), dtype=xp.float32) if out is None else out
        for i in range(m):
            G[i, :] = self.row(i)
        return G


def _lowrank(xp, m, d, seed=0):
    return _LowRank(xp, d, seed).matrix(m)


def _row(rows, name, value, unit="", note=""):
    rows.append((name, value, unit, note))
    progress.step(f"{name}: {value:.3g} {unit}")


def cpu_static(rows, timer, xp, m=256, d=100_000):
    G = _lowrank(xp, m, d)
    x = xp.asarray(np.random.default_rng(1).standard_normal(d), dtype=xp.float32)
    c = xp.asarray(np.random.default_rng(2).standard_normal(m), dtype=xp.float32)
    floor = lambda: (G @ x, c @ G)
    op = StaticInverse(G, 1e-4)
    native = StaticInverse(G, 1e-4, accumulate="native")
    ihvp, _, t_floor = timer.ratio(lambda: op @ x, floor)
    ihvp_native, _, _ = timer.ratio(lambda: native @ x, floor)
    blocked = StaticInverse(G, 1e-4, block_size=d // 100)
    ihvp_blocked, _, _ = timer.ratio(lambda: blocked @ x, floor)
    _row(rows, f"floor: float32 G@x + c@G (m={m}, d={d})", t_floor * 1e3, "ms", "two float32 BLAS passes")
    _row(rows, "StaticInverse IHVP / floor", ihvp, "×", "target ≤ 2.5 (float64 accumulation)")
    _row(rows, "StaticInverse IHVP, accumulate='native' / floor", ihvp_native, "×", "")
    _row(rows, "StaticInverse IHVP, 100 equal blocks / floor", ihvp_blocked, "×", "block-diagonal F")
    ours = lambda: StaticInverse(G, 1e-4).diag()
    paper = lambda: reference.static_diag(*reference.static_precompute(G, 1e-4), 1e-4)
    slower, t_paper, t_ours = timer.ratio(paper, ours, repeat=5)
    _row(rows, "precompute + full diagonal", t_ours * 1e3, "ms", "")
    _row(rows, "paper Algorithm 3 + eq. 25 (float32)", t_paper * 1e3, "ms", "")
    _row(rows, "speed-up over the paper (precompute + diag)", slower, "×", "target ≥ 4")


FRESH = 128  # gradients pushed by the dynamic benchmarks, none of them already in the window


def dynamic_push_apply(rows, timer, xp, m, d):
    """push_apply and IHVP of a full window against the floor; returns the window, the
    gradients, an iterator over the indices of fresh gradients not used yet, and the floor."""
    G = _lowrank(xp, m + FRESH, d)
    w = DynamicInverse(d, m, 1e-4, xp=xp)
    for i in range(m):
        w.push(G[i])
    x = xp.asarray(np.random.default_rng(1).standard_normal(d), dtype=xp.float32)
    c = xp.asarray(np.random.default_rng(2).standard_normal(m), dtype=xp.float32)
    Gw = w._G
    floor = lambda: (Gw @ x, c @ Gw)
    fresh = iter(range(m, m + FRESH))  # a gradient pushed twice would be a duplicate in the window
    pa, _, t_floor = timer.ratio(lambda: w.push_apply(G[next(fresh)]), floor)
    ihvp, _, _ = timer.ratio(lambda: w @ x, floor)
    _row(rows, f"floor: float32 G@x + c@G (m={m}, d={d})", t_floor * 1e3, "ms", "")
    _row(rows, "DynamicInverse IHVP / floor", ihvp, "×", "")
    _row(rows, "DynamicInverse push_apply / floor", pa, "×", "target ≤ 3")
    return w, G, fresh, floor


def cpu_dynamic(rows, timer, xp, m=256, d=100_000):
    w, G, fresh, floor = dynamic_push_apply(rows, timer, xp, m, d)
    window = G[:m]
    gram = _backend.to_host(window @ xp.matrix_transpose(window)).astype(np.float64)
    x = xp.asarray(np.random.default_rng(1).standard_normal(d), dtype=xp.float32)

    def paper_step():  # Algorithm 1 (full D and B) + Algorithm 2, float32, as in the reference code
        D, B = reference.dynamic_coefficients(xp.asarray(gram), 1e-4, m)
        reference.dynamic_apply(window, D, B, 1e-4, m, x)

    slower, _, _ = timer.ratio(paper_step, lambda: w.push_apply(G[next(fresh)]), repeat=3)
    _row(rows, "paper Algorithms 1 + 2 per step (float32) / our push_apply", slower, "×", "")
    # a gradient already in the window: its coefficients cancel and the corrected form runs
    dup = w._G[w.slots()[-1]]
    again, _, _ = timer.ratio(lambda: w.push_apply(dup), floor, repeat=3)
    _row(rows, "push_apply of a duplicate (corrected form) / floor", again, "×", "five passes more")


def _fill(w, G, m: int, chunk: int = 256) -> None:
    """Push rows 0..m of G into w, ``chunk`` at a time (push_many holds its rows in float64)."""
    for start in range(0, m, chunk):
        w.push_many(G[start : min(m, start + chunk)])


def window_scaling(rows, timer, xp, sizes, d):
    """push_apply of a full window against the floor for each capacity m (O(dm + m²) per step),
    and the time ratio between the two largest (O(m³) updates would give up to 8 for m×2)."""
    times, floors = {}, {}
    for m in sizes:
        gen = _LowRank(xp, d, seed=m)
        G = gen.matrix(m + FRESH)
        w = DynamicInverse(d, m, 1e-4, xp=xp)
        _fill(w, G, m)
        x = xp.asarray(np.random.default_rng(1).standard_normal(d), dtype=xp.float32)
        c = xp.asarray(np.random.default_rng(2).standard_normal(m), dtype=xp.float32)
        Gw = w._G
        fresh = iter(range(m, m + FRESH))
        ratio, t_ours, t_floor = timer.ratio(lambda: w.push_apply(G[next(fresh)]), lambda: (Gw @ x, c @ Gw), repeat=6)
        times[m], floors[m] = t_ours, t_floor
        target = {1024: "target ≤ 2.5", 4096: "target ≤ 4"}.get(m, "")
        _row(rows, f"push_apply / floor, full window m={m}, d={d}", ratio, "×", f"{t_ours * 1e3:.3g} ms; {target}")
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        _row(rows, f"push_apply time m={b} / m={a} (d={d})", times[b] / times[a], "×", "target ≤ 5 (O(m³): up to 8)")
    return times, floors


def window_fill(rows, xp, m, d):
    """Filling an empty window of capacity m by m single pushes (gradients made beforehand)."""
    G = _LowRank(xp, d, seed=7).matrix(m)
    w = DynamicInverse(d, m, 1e-4, xp=xp)
    t0 = time.perf_counter()
    for i in range(m):
        w.push(G[i])
    if _backend.is_cupy(xp):
        import cupy

        cupy.cuda.Device().synchronize()
    elapsed = time.perf_counter() - t0
    _row(rows, f"fill an m={m} window by {m} pushes (d={d})", elapsed, "s", "target ≤ 3 s at m=1024, d=2e4")


def window_large(rows, timer, xp, m, d):
    """A window of m gradients in gradient space (d > m): push_apply time and the m×m state."""
    gen = _LowRank(xp, d, seed=11)
    w = DynamicInverse(d, m, 1e-4, xp=xp)
    for start in range(0, m, 256):  # rows made chunk by chunk: G need not exist twice
        w.push_many(gen.matrix(min(256, m - start)))
    fresh = [gen.row(m + i) for i in range(6)]
    it = iter(fresh)
    t = timer(lambda: w.push_apply(next(it)), repeat=5)
    state = 3 * m * m * 8
    _row(rows, f"push_apply, full window m={m}, d={d}", t * 1e3, "ms", f"m×m state {state / 2**30:.2f} GiB")


def gpu_suite(rows, quick: bool):
    import cupy

    from rank1inv.cuda import kernels

    from . import paper_kernels

    xp = _backend.namespace_from_argument(cupy)
    timer = Timer(xp, repeat=10)
    total = cupy.cuda.Device().mem_info[1]
    n = 1 << 28
    src = cupy.empty(n, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    copy = timer(lambda: dst.__setitem__(slice(None), src))
    bandwidth = 2 * src.nbytes / copy  # read + write
    _row(rows, "device-to-device copy bandwidth", bandwidth / 1e9, "GB/s", "the floor's bandwidth")
    src = dst = None
    for d in (10**6,) if quick else (10**6, 10**7):
        for m in (256, 1024):
            if 4 * m * d > 0.7 * total:
                continue
            gen = _LowRank(xp, d)
            w = DynamicInverse(d, m, 1e-4, xp=cupy)
            for i in range(m):
                w.push(gen.row(i))
            G = w._G  # the window's storage serves the static operator too (no second copy)
            floor = 2 * G.nbytes / bandwidth
            x = cupy.asarray(np.random.default_rng(1).standard_normal(d), dtype=cupy.float32)
            op = StaticInverse(G, 1e-4)
            ihvp = timer(lambda: op @ x)
            _row(rows, f"IHVP / floor (m={m}, d={d:.0e})", ihvp / floor, "×", "target ≤ 1.2 at d=1e7, m=1024")
            op = None
            fresh = iter([gen.row(m + i) for i in range(FRESH)])  # none already in the window
            pa = timer(lambda: w.push_apply(next(fresh)))
            _row(rows, f"push_apply / floor (m={m}, d={d:.0e})", pa / floor, "×", "target ≤ 1.3 at d=1e7, m=1024")
            w = G = fresh = None
            cupy.get_default_memory_pool().free_all_blocks()
    window_scaling(rows, timer, xp, (1024, 4096) if quick else (1024, 4096, 8192), 10**6)
    for m in (1024, 4096) if quick else (1024, 4096, 8192):
        rng = np.random.default_rng(m)
        A = rng.standard_normal((m, m + 64))
        D, _ = _coef.coefficients(_backend.namespace_from_argument(None), A @ A.T, 1e-3, float(m))
        Dd = cupy.asarray(D)
        from cupyx.scipy.linalg import solve_triangular

        L = _coef.unit_lower(xp, Dd, float(m))
        eye = cupy.eye(m)
        cublas = timer(lambda: solve_triangular(L, eye, lower=True, unit_diagonal=True) / 1e-3, repeat=5)
        for schedule in ("sweeps", "columns"):
            kern = timer(lambda: kernels.mfac_b(Dd, float(m), 1e-3, schedule=schedule), repeat=5)
            note = f"cuBLAS trsm path {cublas * 1e3:.3g} ms; target ≤ 0.3 ms at m=1024"
            _row(rows, f"B kernel m={m} (float64), {schedule}", kern * 1e3, "ms", note)
        b = cupy.ones(m)
        fs = timer(lambda: paper_kernels.forward_substitution(Dd, float(m), b), repeat=5)
        Bd = kernels.mfac_b(Dd, float(m), 1e-3)
        gemv = timer(lambda: Bd @ b, repeat=5)
        _row(rows, f"Algorithm 2 forward substitution m={m}", fs * 1e3, "ms", f"B·p GEMV instead: {gemv * 1e3:.3g} ms")
    m = 1024
    d = 10**6 if quick or 4 * m * 10**7 > 0.7 * total else 10**7
    G = _lowrank(xp, m, d)
    ours = timer(lambda: StaticInverse(G, 1e-4).diag(), repeat=2)
    cupy.get_default_memory_pool().free_all_blocks()
    # the paper's Algorithm 3 overwrites G with V, as the paper does (last use of G)
    paper = timer(lambda: reference.static_diag(*reference.static_precompute(G, 1e-4, overwrite=True), 1e-4), repeat=1)
    _row(rows, f"static precompute + diag, paper / ours (m={m}, d={d:.0e})", paper / ours, "×", "target ≥ 10")
    G = None
    cupy.get_default_memory_pool().free_all_blocks()
    host_streaming(rows, timer, cupy, m=256, d=10**6 if quick else 4 * 10**6)


def host_streaming(rows, timer, cupy, m, d):
    """An IHVP over a host G streamed through pinned buffers (``StreamedGradients``), against
    the pinned host-to-device bandwidth (two passes over G)."""
    import cupyx

    from rank1inv.streamed import StreamedGradients

    Gh = np.random.default_rng(2).standard_normal((m, d), dtype=np.float32)
    pinned = cupyx.empty_pinned((1 << 26,), dtype=np.float32)
    dev = cupy.empty(pinned.shape, dtype=cupy.float32)
    h2d = pinned.nbytes / timer(lambda: dev.set(pinned))
    _row(rows, "pinned host-to-device bandwidth", h2d / 1e9, "GB/s", "the streamed floor's bandwidth")
    pinned = dev = None
    op = StaticInverse(StreamedGradients(Gh, xp=cupy), 1e-3)
    x = cupy.asarray(np.random.default_rng(3).standard_normal(d), dtype=cupy.float32)
    t = timer(lambda: op @ x, repeat=3)
    floor = 2 * Gh.nbytes / h2d
    _row(rows, f"streamed IHVP / H2D floor (m={m}, d={d:.0e}, G on the host)", t / floor, "×",
         f"{t * 1e3:.4g} ms; pageable G: each chunk is also copied into pinned memory on the CPU")  # fmt: skip


def numerics_table(m: int = 64, d: int = 800, seed: int = 0) -> str:
    """docs/design.md §8 metrics for every family: rank1inv (float32 storage, default accumulation) next
    to the paper's static algorithm in float32 (Algorithm 3, eq. 24–25) and its dynamic one
    (Algorithms 1–2). Reference: dense float64 inverse of the float32-rounded gradients."""
    from rank1inv import testing

    rng = np.random.default_rng([seed, 1])  # independent of the gradients' stream
    head = (
        "| family | scale | λ | cond(F) | η ours | η paper static | η paper dynamic | "
        "diag rel. err. ours | diag rel. err. paper | fwd err. ours | fwd err. paper |"
    )
    lines = [head, "|" + "---|" * 11]
    for family in testing.FAMILIES:
        for scale in (1.0, 100.0):
            for damp in (1e-1, 1e-4, 1e-6):
                G = testing.gradients(family, m, d, scale=scale, seed=seed)
                F = testing.dense_fisher(G, damp)
                cond = np.linalg.cond(F)
                Finv = np.linalg.inv(F)
                x = rng.standard_normal(d).astype(np.float32)
                op = StaticInverse(G, damp)
                y = op @ x
                V, q = reference.static_precompute(G, damp)
                y_ref = reference.static_apply(V, q, damp, x)
                D, B = reference.dynamic_coefficients(G.astype(np.float64) @ G.T.astype(np.float64), damp, m)
                y_dyn = reference.dynamic_apply(G, D, B, damp, m, x)
                exact = Finv @ x.astype(np.float64)

                def fwd(v):
                    return np.linalg.norm(v - exact) / np.linalg.norm(exact) if cond <= 1e6 else float("nan")

                def rel(v):
                    return testing.relative_error(v, np.diag(Finv)) if cond <= 1e9 else float("nan")

                vals = (
                    testing.backward_error(F, y, x),
                    testing.backward_error(F, y_ref, x),
                    testing.backward_error(F, y_dyn, x),
                    rel(op.diag()),
                    rel(reference.static_diag(V, q, damp)),
                    fwd(y),
                    fwd(y_ref),
                )
                cells = " | ".join("–" if np.isnan(v) else f"{v:.1e}" for v in vals)
                lines.append(f"| {family} | {scale:g} | {damp:g} | {cond:.1e} | {cells} |")
    return "\n".join(lines)


def storage_speed(rows, timer, xp, m=256, d=2_000_000):
    """IHVP and push_apply with bfloat16 and float16 storage against float32 (the same rounded
    values): the 16-bit passes read half the bytes. Timed by adjacent pairs of calls
    (``Timer.paired``: the VMs' memory speed drifts between blocks of calls seconds apart)."""
    from rank1inv import _precision

    fresh_count = m + 64  # pushed in a cycle: a gradient comes back only after it left the window
    base = _LowRank(xp, d, seed=5).matrix(m + fresh_count)
    x = xp.asarray(np.random.default_rng(1).standard_normal(d), dtype=xp.float32)

    def setup(name):
        G = base if name == "float32" else _backend.encode(xp, base, name)
        w = DynamicInverse(d, m, 1e-4, dtype=name, xp=xp)
        _fill(w, G, m)
        fresh = itertools.cycle(range(m, m + fresh_count))
        return StaticInverse(G[:m], 1e-4), lambda: w.push_apply(G[next(fresh)])

    op32, push32 = setup("float32")
    pairs = 4 * timer.repeat
    for name in ("bfloat16", "float16"):
        op, push = setup(name)
        note = "target ≤ 0.6" if name == "bfloat16" else ""
        for what, fn, ref in (("IHVP", lambda: op @ x, lambda: op32 @ x), ("push_apply", push, push32)):
            q50, q25, q75, _, _ = timer.paired(fn, ref, pairs)
            _row(rows, f"{name} / float32 storage: {what} time (m={m}, d={d:.0e})", q50, "×",
                 "; ".join(filter(None, [f"quartiles {q25:.3g}–{q75:.3g}", note])))  # fmt: skip
        op = push = None
    t_ihvp, t_push = timer(lambda: op32 @ x), timer(push32, repeat=5)
    note = f"push_apply {t_push * 1e3:.3g} ms; {_precision.of('float32').itemsize} bytes per value"
    _row(rows, f"float32 IHVP, push_apply (m={m}, d={d:.0e})", t_ihvp * 1e3, "ms", note)


def storage_memory(rows, m=64, d=10**7):
    """Extra memory (tracemalloc peak beyond the result) of an IHVP and of a push with bfloat16
    storage, against the stored G (2·m·d bytes)."""
    import tracemalloc

    xp = _backend.namespace_from_argument(None)
    gen = _LowRank(xp, d, seed=9)
    w = DynamicInverse(d, m, 1e-4, dtype="bfloat16")
    for i in range(m):
        w.push(gen.row(i))
    op = StaticInverse(w._G, 1e-4)
    x = gen.row(m + 1)
    g = gen.row(m + 2)
    op @ x
    tracemalloc.start()
    try:
        y = op @ x
        ihvp = tracemalloc.get_traced_memory()[1] - y.nbytes
        y = None
        tracemalloc.reset_peak()
        w.push(g)
        push = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = w._G.nbytes
    _row(rows, f"bfloat16 G (m={m}, d={d:.0e})", size / 2**20, "MiB", "2·m·d bytes")
    _row(rows, "IHVP extra memory / bfloat16 G", ihvp / size, "×", f"{ihvp / 2**20:.3g} MiB; target ≤ 0.1")
    _row(rows, "push extra memory / bfloat16 G", push / size, "×", f"{push / 2**20:.3g} MiB; target ≤ 0.1")


def drift_table(pushes: int = 100_000, m: int = 64, d: int = 2000, seed: int = 0) -> str:
    """Accuracy of a window after ``pushes`` pushes (docs/design.md §8 targets), every family, both
    storage dtypes, λ ∈ {1e-1, 1e-4, 1e-6}: each push is a gradient from a pool of 256 of the
    family times (1 + 0.01·N(0, 1)), so exact and near duplicates come and go. Columns: η of
    the window's IHVP (3 random vectors) and of a StaticInverse of the same gradients (float64
    results), η of the last push_apply (its float32/float64 result), the diagonal's relative
    error where cond(F) ≤ 1e9. Reference: dense float64 inverse of the stored gradients."""
    from rank1inv import testing

    lines = [
        f"pushes = {pushes}, capacity m = {m}, d = {d}",
        "",
        "| storage | family | λ | cond(F) | η window | η StaticInverse | η push_apply | diag rel. err. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype in ("float32", "float64"):
        for family in testing.FAMILIES:
            pool = testing.gradients(family, 256, d, seed=seed, dtype=dtype)
            for damp in (1e-1, 1e-4, 1e-6):
                rng = np.random.default_rng([seed, 2])
                w = DynamicInverse(d, m, damp, dtype=dtype)
                for _ in range(pushes - 1):
                    w.push(pool[rng.integers(256)] * (1.0 + 0.01 * rng.standard_normal()))
                g = pool[rng.integers(256)] * (1.0 + 0.01 * rng.standard_normal())
                y = w.push_apply(g)
                G = w.gradients()
                F = testing.dense_fisher(G, damp, 1.0 / m)
                cond = np.linalg.cond(F)
                X = rng.standard_normal((d, 3))
                eta = testing.backward_error(F, w @ X, X)
                eta_static = testing.backward_error(F, StaticInverse(G, damp, scale=1.0 / m) @ X, X)
                eta_pa = testing.backward_error(F, y, np.asarray(g, dtype=dtype).astype(np.float64))
                diag = "–"
                if cond <= 1e9:
                    diag = f"{testing.relative_error(w.diag(), np.diag(np.linalg.inv(F))):.1e}"
                lines.append(
                    f"| {dtype} | {family} | {damp:g} | {cond:.1e} | {eta:.1e} | {eta_static:.1e} | "
                    f"{eta_pa:.1e} | {diag} |"
                )
    return "\n".join(lines)


def plot_window_scaling(times: dict, floor_per_m: dict, path: str) -> bool:
    """push_apply time against m (log-log) with the floor, as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    ms = sorted(times)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(ms, [times[m] * 1e3 for m in ms], "o-", label="push_apply")
    ax.loglog(ms, [floor_per_m[m] * 1e3 for m in ms], "s--", label="floor: two float32 BLAS passes")
    ax.set_xlabel("window capacity m")
    ax.set_ylabel("ms per step")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(device: str = "cpu", quick: bool = False, out: str | None = None, plot: str | None = None) -> str:
    rows: list = []
    xp = _backend.namespace_from_argument(None)
    if device == "gpu":
        gpu_suite(rows, quick)
        import cupy

        where = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    else:
        timer = Timer(xp, repeat=5 if quick else 9, pause=0.0 if quick else None)
        d = 20_000 if quick else 100_000
        cpu_static(rows, timer, xp, d=d)
        cpu_dynamic(rows, timer, xp, d=d)
        times, floors = window_scaling(rows, timer, xp, (256, 512) if quick else (256, 1024, 2048, 4096), 20_000)
        if plot and plot_window_scaling(times, floors, plot):
            _row(rows, "plot of push_apply time against m", len(times), "points", plot)
        window_fill(rows, xp, 256 if quick else 1024, 20_000)
        storage_speed(rows, timer, xp, d=20_000 if quick else 2_000_000)
        if not quick:
            window_large(rows, timer, xp, 8192, 10_000)
            storage_memory(rows)
        from rank1inv import cpu

        where = f"{platform.processor() or platform.machine()}, compiled CPU passes: {cpu.available()}"
    lines = [f"device: {where}", "", "| measurement | value | unit | note |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3g} | {unit} | {note} |" for name, value, unit, note in rows]
    text = "\n".join(lines)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="The benchmarks of docs/benchmarks.md: every figure a ratio of two timings in one run (time / "
        "the memory-traffic floor, time / the paper's algorithm). Without options: the main table (several "
        "minutes on 2 cores; --quick: smaller problems, about 10 s). Each option below prints one other table "
        "instead. 'python -m benchmarks experiments --help' lists the experiments.",
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu (NumPy) or gpu (CuPy on the current device); default cpu")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smaller problems (a smoke test)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--numerics", action="store_true", help="print the accuracy table of docs/numerics.md instead")
    p.add_argument("--drift", type=int, metavar="PUSHES", help="print the window accuracy table after PUSHES pushes")
    p.add_argument("--plot", metavar="PNG", help="also plot push_apply time against m (needs matplotlib)")
    p.add_argument("--laplace", action="store_true", help="print the side-by-side with laplace-torch (bench extra)")
    p.add_argument("--laplace-api", action="store_true",
                   help="print laplace-torch's API over rank1inv at d = 1e6 (laplace extra; ~10 GB)")  # fmt: skip
    p.add_argument("--world", type=int, default=1, metavar="P",
                   help="with --laplace-api: also run it over P gloo processes (comm=)")  # fmt: skip
    p.add_argument("--chunks", type=int, default=None, metavar="W",
                   help="with --laplace-api: also with the rows as Dask column blocks of W (chunks=)")  # fmt: skip
    p.add_argument("--natural", action="store_true", help="print the factored natural-gradient step benchmark (torch)")
    p.add_argument("--out-of-core", metavar="DIR", help="print the memory-mapped IHVP benchmark (writes ~4 GB in DIR)")
    p.add_argument("--dask", action="store_true", help="print the Dask LocalCluster IHVP benchmark (dask extra)")
    p.add_argument("--blocks", action="store_true",
                   help="print the blocks-from-a-stream benchmark (about 3 min and 9 GB at full size)")  # fmt: skip
    p.add_argument("--floors", action="store_true",
                   help="print the CPU floor figures, three rounds each (about 3 min on 2 cores)")  # fmt: skip
    p.add_argument("--jax", action="store_true",
                   help="print the JAX-native M-FAC step benchmark (jax, optax); --numerics: its accuracy")  # fmt: skip
    args = p.parse_args(argv)
    if args.floors:
        from . import bench_floors

        print(bench_floors.run(args.quick))
    elif args.jax:
        from . import bench_jax

        print(bench_jax.accuracy_table() if args.numerics else bench_jax.run(args.quick))
    elif args.blocks:
        from . import bench_blocks

        print(bench_blocks.run(args.quick))
    elif args.dask:
        from . import bench_dask

        print(bench_dask.run())
    elif args.out_of_core:
        from . import bench_streaming

        print(bench_streaming.run(args.out_of_core))
    elif args.natural:
        from . import bench_natural

        print(bench_natural.run())
    elif args.laplace_api:
        from . import bench_laplace_api

        print(bench_laplace_api.run(args.quick, args.world, args.chunks))
    elif args.laplace:
        from . import bench_laplace

        print(bench_laplace.run())
    elif args.numerics:
        print(numerics_table())
    elif args.drift:
        print(drift_table(args.drift))
    else:
        print(run(args.device, args.quick, args.out, args.plot))
