"""The JAX-native M-FAC window against optax.adam and against the NumPy window.

``python -m benchmarks --jax``: (1) one jitted training step (forward, backward, update, with
the state donated) of the digits MLP 64-32-10 (d = 2410, batch 32) with ``native_mfac``
(m = 32), with the host-window ``mfac`` and with ``optax.adam``; (2) the bare update at
d = 10⁵, m = 256 (jitted, donated) against ``DynamicInverse.push_apply`` on the same gradients.
Medians of interleaved rounds; x64 as JAX's default (off) unless ``JAX_ENABLE_X64=1``.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rank1inv as r1
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


def run(quick: bool = False) -> str:
    X, y, _, _ = load_digits(0)
    batches = [(jnp.asarray(X[i : i + 32], jnp.float32), jnp.asarray(y[i : i + 32])) for i in range(0, 1216, 32)]
    steps = 50 if quick else 200
    rows = []
    rounds = {"adam": [], "native_mfac": [], "host mfac": []}
    for _ in progress.track(range(3), "digits MLP steps: adam, native_mfac, host mfac"):  # interleaved rounds
        rounds["adam"].append(_step_time(optax.adam(1e-3), batches, steps))
        rounds["native_mfac"].append(_step_time(native_mfac(1e-2, ngrads=32, damp=1e-3), batches, steps))
        rounds["host mfac"].append(_step_time(r1j.mfac(1e-2, ngrads=32, damp=1e-3), batches, steps))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    for k in ("native_mfac", "host mfac"):
        rows.append((f"digits MLP step, {k} / adam", med[k] / med["adam"], f"{1e3 * med[k]:.3f} ms"))
    rows.append(("digits MLP step, adam", med["adam"] * 1e3, "ms"))
    d, m = (20_000, 64) if quick else (100_000, 256)
    progress.step(f"bare update, d = {d}, m = {m}")
    G = np.random.default_rng(1).standard_normal((3 * m, d)).astype(np.float32)
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
    a, b = statistics.median(ours), statistics.median(theirs)
    rows.append(
        (f"bare update d={d}, m={m}: native_mfac / NumPy push_apply", a / b, f"{1e3 * a:.2f} / {1e3 * b:.2f} ms")
    )
    lines = [f"x64: {jax.config.read('jax_enable_x64')}, device: {jax.devices()[0].platform}", "",
             "| measurement | value | note |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {value:.3g} | {note} |" for name, value, note in rows]
    return "\n".join(lines)
