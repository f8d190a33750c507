"""The JAX-native M-FAC window against optax.adam and against the NumPy window.

``python -m benchmarks --jax``: (1) one jitted training step (forward, backward, update, with
the state donated) of the digits MLP 64-32-10 (d = 2410, batch 32) with ``native_mfac``
(m = 32), with the host-window ``mfac`` and with ``optax.adam``; (2) the bare update at
d = 10⁵, m = 256 (jitted, donated) against ``DynamicInverse.push_apply`` on the same gradients,
for iid gradients and for the duplicate family (where both windows take their corrected form
every other push). Medians of interleaved rounds; x64 as JAX's default (off) unless ``JAX_ENABLE_X64=1``.
``accuracy_table()`` (``--jax --numerics``): the direction's backward error against the dense
F of the window after 3·m pushes, and its forward error and that of the float64-accumulated
``DynamicInverse.push_apply`` against a long-double-refined reference, per test family and m,
with x64 off and on (docs/design.md §16).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rank1inv as r1
from rank1inv import testing
from rank1inv.adapters import jax as r1j
from rank1inv.adapters.jax_native import native_mfac
from rank1inv.examples import progress
from rank1inv.examples.digits import SIZES, load_digits


def _mlp_init(seed=0):
    rng = np.random.default_rng(seed)
    params = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        params.append({"w": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                       "b": jnp.zeros(b, jnp.float32)})  # fmt: skip
    return params


def _loss(params, x, y):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h, y))


def _step_time(tx, batches, steps: int = 200) -> float:
    params = _mlp_init()
    state = tx.init(params)

    def step(params, state, x, y):
        g = jax.grad(_loss)(params, x, y)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    step = jax.jit(step, donate_argnums=(0, 1))
    for x, y in batches[:5]:
        params, state = step(params, state, x, y)
    jax.block_until_ready(params)
    times = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t = time.perf_counter()
        params, state = step(params, state, x, y)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bare_update(G: np.ndarray, m: int) -> tuple[float, float]:
    """Median seconds of one jitted, donated native_mfac update and of ``DynamicInverse.push_apply``
    over the last 2·m of the float32 gradients G (3·m, d), after a full window of the first m."""
    d = G.shape[1]
    tx = native_mfac(1e-2, ngrads=m, damp=1e-3)
    state = tx.init(jnp.zeros(d, jnp.float32))
    update = jax.jit(tx.update, donate_argnums=(1,))
    Gj = jnp.asarray(G)
    for i in range(m):  # a full window first
        _, state = update(Gj[i], state)
    jax.block_until_ready(state)
    w = r1.DynamicInverse(d, m, 1e-3, dtype="float32")
    for g in G[:m]:
        w.push(g)
    ours, theirs = [], []
    for i in range(m, 3 * m):
        t = time.perf_counter()
        u, state = update(Gj[i], state)
        jax.block_until_ready(u)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        w.push_apply(G[i])
        theirs.append(time.perf_counter() - t)
    return statistics.median(ours), statistics.median(theirs)


def run(quick: bool = False) -> str:
    X, y, _, _ = load_digits(0)
    batches = [(jnp.asarray(X[i : i + 32], jnp.float32), jnp.asarray(y[i : i + 32])) for i in range(0, 1216, 32)]
    steps = 50 if quick else 200
    rows = []
    rounds = {"adam": [], "native_mfac": [], "native_mfac, check_finite=False": [], "host mfac": []}
    for _ in progress.track(range(3), "digits MLP steps: adam, native_mfac, host mfac"):  # interleaved rounds
        rounds["adam"].append(_step_time(optax.adam(1e-3), batches, steps))
        rounds["native_mfac"].append(_step_time(native_mfac(1e-2, ngrads=32, damp=1e-3), batches, steps))
        rounds["native_mfac, check_finite=False"].append(
            _step_time(native_mfac(1e-2, ngrads=32, damp=1e-3, check_finite=False), batches, steps)
        )
        rounds["host mfac"].append(_step_time(r1j.mfac(1e-2, ngrads=32, damp=1e-3), batches, steps))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    for k in ("native_mfac", "native_mfac, check_finite=False", "host mfac"):
        rows.append((f"digits MLP step, {k} / adam", med[k] / med["adam"], f"{1e3 * med[k]:.3f} ms"))
    rows.append(("digits MLP step, adam", med["adam"] * 1e3, "ms"))
    d, m = (20_000, 64) if quick else (100_000, 256)
    progress.step(f"bare update, d = {d}, m = {m}")
    G = np.random.default_rng(1).standard_normal((3 * m, d)).astype(np.float32)
    a, b = _bare_update(G, m)
    bare = a
    rows.append(
        (f"bare update d={d}, m={m}: native_mfac / NumPy push_apply", a / b, f"{1e3 * a:.2f} / {1e3 * b:.2f} ms")
    )
    progress.step(f"bare update, duplicate gradients, d = {d}, m = {m}")
    a, b = _bare_update(testing.gradients("duplicate", 3 * m, d, seed=1), m)
    rows.append(
        (f"bare update d={d}, m={m}, duplicate gradients (corrected form): native_mfac / NumPy push_apply",
         a / b, f"{1e3 * a:.2f} / {1e3 * b:.2f} ms")
    )  # fmt: skip
    # the O(m³) refactorisation's share of the update: the bound on what an O(m²) update could save
    K = jnp.asarray(np.cov(G[:m]) + np.eye(m), jnp.float32)
    chol = jax.jit(jnp.linalg.cholesky)
    jax.block_until_ready(chol(K))
    spent = []
    for _ in range(50):
        t = time.perf_counter()
        jax.block_until_ready(chol(K))
        spent.append(time.perf_counter() - t)
    c = statistics.median(spent)
    rows.append((f"m×m Cholesky (m={m}) / bare update", c / bare, f"{1e3 * c:.3f} ms: the most an O(m²) update saves"))
    lines = [f"x64: {jax.config.read('jax_enable_x64')}, device: {jax.devices()[0].platform}", "",
             "| measurement | value | note |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {value:.3g} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


def _refined(F: np.ndarray, G, damp: float, scale: float, g: np.ndarray) -> np.ndarray:
    """F⁻¹g for F = λI + s·GᵀG (the float64 matrix F and G, the window as stored), by a float64
    solve refined three times with residuals g − Fy formed from G in long double (64-bit
    mantissa on x86): accurate to about κ(F)·2⁻⁶⁴ + 2⁻⁵³, a reference against which both
    windows' forward errors are read."""
    G64 = np.asarray(G, np.float64)
    Gl, gl = G64.astype(np.longdouble), np.asarray(g, np.float64).astype(np.longdouble)
    y = np.linalg.solve(F, np.asarray(g, np.float64))
    for _ in range(3):
        yl = y.astype(np.longdouble)
        r = gl - (np.longdouble(damp) * yl + np.longdouble(scale) * (Gl.T @ (Gl @ yl)))
        y = (yl + np.linalg.solve(F, r.astype(np.float64)).astype(np.longdouble)).astype(np.float64)
    return y


def accuracy_table(d: int = 300, damp: float = 1e-3, ms=(1, 7, 32, 256)) -> str:
    """native_mfac's direction after 3·m pushes, per family (testing.FAMILIES) and m, x64 off
    (float32 ring and system) and on (float64): over the last m pushes the worst normwise
    backward error η = ‖Fy − g‖/(‖F‖‖y‖ + ‖g‖) of its direction y against the dense float64 F of
    the window as stored (the measure of the targets), the same η of
    ``DynamicInverse.push_apply``, the worst relative difference of the two, and both forward
    errors against a long-double-refined reference (``_refined``): two tables."""
    from rank1inv.adapters.jax_native import window_direction

    head = "| family | " + " | ".join(f"m={m}, f32 | m={m}, x64" for m in ms) + " |"
    rule = "|---|" + "---|" * (2 * len(ms))
    eta_lines, fwd_lines = [head, rule], [head, rule]
    for family in progress.track(testing.FAMILIES, "families"):
        eta_cells, fwd_cells = [], []
        for m in ms:
            for x64 in (False, True):
                dtype = "float64" if x64 else "float32"
                with jax.enable_x64(x64):
                    G = testing.gradients(family, 3 * m, d, seed=m, dtype=dtype)
                    ref = r1.DynamicInverse(d, m, damp, scale=1.0 / m, dtype=dtype)
                    acc = jnp.float64 if x64 else jnp.float32
                    state = (jnp.zeros((m, d), dtype), jnp.zeros((m, m), acc), jnp.zeros(m, jnp.int32))
                    step = jax.jit(window_direction)
                    worst = dict(eta=0.0, eta_ref=0.0, diff=0.0, fwd=0.0, fwd_ref=0.0)
                    for i, g in enumerate(G):
                        want = ref.push_apply(g)
                        got, *rest, _ = step(*state, jnp.int32(i), jnp.asarray(g), damp, 1.0 / m)
                        state = tuple(rest)
                        if i < 2 * m or not np.any(g):
                            continue
                        window = np.asarray(G[i + 1 - m : i + 1], np.float64)
                        F = damp * np.eye(d) + (window.T @ window) / m
                        exact = _refined(F, window, damp, 1.0 / m, g)
                        got = np.asarray(got, np.float64)
                        size = np.linalg.norm(exact)
                        for key, value in (("eta", testing.backward_error(F, got, g)),
                                           ("eta_ref", testing.backward_error(F, want, g)),
                                           ("diff", np.linalg.norm(got - want) / np.linalg.norm(want)),
                                           ("fwd", np.linalg.norm(got - exact) / size),
                                           ("fwd_ref", np.linalg.norm(want - exact) / size)):  # fmt: skip
                            worst[key] = max(worst[key], float(value))
                    eta_cells.append(f"{worst['eta']:.1e} ({worst['eta_ref']:.0e})")
                    fwd_cells.append(f"{worst['fwd']:.1e} / {worst['fwd_ref']:.1e} / {worst['diff']:.1e}")
        eta_lines.append(f"| {family} | " + " | ".join(eta_cells) + " |")
        fwd_lines.append(f"| {family} | " + " | ".join(fwd_cells) + " |")
    return "\n".join(
        [
            "Backward error η of the direction against the dense F of the window (push_apply's η in parentheses):",
            *eta_lines,
            "",
            "Forward error against the refined reference: native / push_apply / their difference:",
            *fwd_lines,
        ]
    )
