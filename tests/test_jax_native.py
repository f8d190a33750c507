"""M-FAC with the window in the optax state (rank1inv/adapters/jax_native.py): its direction
equals DynamicInverse.push_apply on the same gradients, and it is a pure optax transformation
(jit, vmap, scan, schedules, inject_hyperparams, chain, pickling)."""

import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import rank1inv as r1  # noqa: E402
from rank1inv import testing  # noqa: E402
from rank1inv.adapters.jax_native import native_mfac, window_direction  # noqa: E402


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("m", [1, 7, 32])
@pytest.mark.parametrize("family", ["iid", "lowrank"])
def test_direction_equals_push_apply_float32(m, family):
    """x64 off (JAX's default): float32 ring and Gram system; after 3·m pushes the direction
    is within 1e-4 of the float64-accumulated DynamicInverse on the well-conditioned family and
    within 1e-2 on the low-rank one (float32 Cholesky of a system conditioned ~1e5: measured,
    and the reason to enable x64 for ill-conditioned windows)."""
    d, damp = 200, 1e-2
    G = testing.gradients(family, 3 * m, d, seed=m, dtype="float32")
    ref = r1.DynamicInverse(d, m, damp, scale=1.0 / m, dtype="float32")
    ring, gram, exps = jnp.zeros((m, d), jnp.float32), jnp.zeros((m, m), jnp.float32), jnp.zeros(m, jnp.int32)
    step = jax.jit(window_direction, static_argnums=())
    worst = 0.0
    for i, g in enumerate(G):
        want = ref.push_apply(g)
        got, ring, gram, exps, _ = step(ring, gram, exps, jnp.int32(i), jnp.asarray(g), damp, 1.0 / m)
        worst = max(worst, relative(got, want))
    assert worst <= (1e-4 if family == "iid" else 1e-2)


def test_direction_equals_push_apply_x64():
    with jax.enable_x64(True):
        for m in (1, 7, 32):
            d, damp = 150, 1e-3
            G = testing.gradients("lowrank", 3 * m, d, seed=m, dtype="float64")
            ref = r1.DynamicInverse(d, m, damp, scale=1.0 / m, dtype="float64")
            ring, gram, exps = jnp.zeros((m, d), jnp.float64), jnp.zeros((m, m), jnp.float64), jnp.zeros(m, jnp.int32)
            step = jax.jit(window_direction)  # eagerly, each push re-traces the cond and the loop: 78 s
            for i, g in enumerate(G):
                want = ref.push_apply(g)
                got, ring, gram, exps, _ = step(ring, gram, exps, jnp.int32(i), jnp.asarray(g), damp, 1.0 / m)
                assert relative(got, want) <= 1e-9


def _worst_backward_error(family, m, x64, d=300, damp=1e-3, magnitude=1.0):
    """The largest η = ‖Fy − g‖/(‖F‖‖y‖ + ‖g‖) of the jitted direction y over the last m of 3·m
    pushes, F = λI + (1/m)·Σ gᵢgᵢᵀ the dense float64 matrix of the window as stored."""
    dtype = "float64" if x64 else "float32"
    with jax.enable_x64(x64):
        G = (testing.gradients(family, 3 * m, d, seed=m, dtype="float64") * magnitude).astype(dtype)
        acc = jnp.float64 if x64 else jnp.float32
        state = (jnp.zeros((m, d), dtype), jnp.zeros((m, m), acc), jnp.zeros(m, jnp.int32))
        step = jax.jit(window_direction)
        worst = 0.0
        for i, g in enumerate(G):
            got, *rest, ok = step(*state, jnp.int32(i), jnp.asarray(g), damp, 1.0 / m)
            state = tuple(rest)
            assert bool(ok)
            if i >= 2 * m and np.any(g):
                window = np.asarray(G[i + 1 - m : i + 1], np.float64)
                F = damp * np.eye(d) + (window.T @ window) / m
                worst = max(worst, testing.backward_error(F, np.asarray(got, np.float64), np.asarray(g, np.float64)))
        return worst


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("family", testing.FAMILIES)
def test_direction_meets_the_backward_error_targets(family, x64):
    """η ≤ 1e-6 with x64 off (float32 ring and system) and ≤ 1e-12 with x64 on, m ∈ {1, 7, 32},
    every test family: on (near-)dependent gradients only through the corrected form (the plain
    push_apply form alone gave 1e-5…1.2e-3 and 1e-14…5e-12 there, docs/benchmarks.md)."""
    for m in (1, 7, 32):
        assert _worst_backward_error(family, m, x64) <= (1e-12 if x64 else 1e-6), m


@pytest.mark.parametrize("family,x64", [("collinear", False), ("duplicate", True)])
def test_direction_meets_the_targets_on_a_wide_window(family, x64):
    """m = 256 over d = 300: the family whose float32 refinement contracts slowest (collinear),
    and the one whose float64 plain form was worst (duplicates)."""
    assert _worst_backward_error(family, 256, x64) <= (1e-12 if x64 else 1e-6)


def test_blocked_widening_equals_whole_widening_x64():
    """A float32 ring under x64 (float64 accumulation) wider than one block (m = 64: blocks of
    16 384 columns, d = 2 blocks + a tail of 37): the blocked passes give the directions of the
    whole-ring widening to float64 rounding, and push_apply's on these well-conditioned
    gradients."""
    with jax.enable_x64(True):
        m, d, damp = 64, 2 * 16384 + 37, 1e-2
        G = testing.gradients("iid", m + 8, d, seed=3, dtype="float32")
        ref = r1.DynamicInverse(d, m, damp, scale=1.0 / m, dtype="float32")
        steps = {b: jax.jit(lambda *a, b=b: window_direction(*a, widen_blocks=b)) for b in (True, False)}
        states = {b: (jnp.zeros((m, d), jnp.float32), jnp.zeros((m, m), jnp.float64), jnp.zeros(m, jnp.int32))
                  for b in (True, False)}  # fmt: skip
        for i, g in enumerate(G):
            out = {}
            for b, step in steps.items():
                out[b], *rest, _ = step(*states[b], jnp.int32(i), jnp.asarray(g), damp, 1.0 / m)
                states[b] = tuple(rest)
            assert out[True].dtype == jnp.float64
            assert relative(out[True], out[False]) <= 1e-13
            assert relative(out[True], ref.push_apply(g.astype(np.float64))) <= 1e-10  # a float64 result


def _problem():
    w = {"a": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 4)), jnp.float32)

    def loss(p, xb):
        return jnp.mean(jnp.tanh(xb @ p["a"] + p["b"]) ** 2)

    return w, x, loss


def test_pure_jit_scan_and_pickling_resume_bit_for_bit():
    w, x, loss = _problem()
    tx = native_mfac(0.1, ngrads=4, damp=1e-3, momentum=0.5)

    @jax.jit
    def step(carry, xb):
        p, s = carry
        g = jax.grad(loss)(p, xb)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss(p, xb)

    s0 = tx.init(w)
    u1, _ = tx.update(jax.grad(loss)(w, x[:8]), s0, w)
    u2, _ = tx.update(jax.grad(loss)(w, x[:8]), s0, w)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))  # pure
    batches = x.reshape(8, 8, 4)
    (p_scan, s_scan), losses = jax.lax.scan(step, (w, s0), batches)
    straight = (w, s0)
    for i in range(8):
        straight, _ = step(straight, batches[i])
    carry = (w, s0)
    for i in range(4):
        carry, _ = step(carry, batches[i])
    carry = pickle.loads(pickle.dumps(jax.device_get(carry)))  # checkpoint midway, resume
    for i in range(4, 8):
        carry, _ = step(carry, batches[i])
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(straight)):
        assert bool(jnp.array_equal(a, b))  # the resumed run is the same run
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves((p_scan, s_scan))):
        # scan compiles the step inside a loop: XLA may fuse differently, so rounding may differ,
        # and 8 float32 steps on this rank-deficient window (tied columns) amplify it to ~2e-4
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-3, atol=1e-6)


def test_schedules_inject_hyperparams_chain_and_vmap():
    w, x, loss = _problem()
    g = jax.grad(loss)(w, x[:8])
    sched = optax.linear_schedule(0.1, 0.0, 10)
    tx = optax.chain(optax.clip_by_global_norm(10.0), native_mfac(sched, ngrads=3, damp=lambda c: 1e-3))
    s = tx.init(w)
    u, s = jax.jit(tx.update)(g, s, w)
    inj = optax.inject_hyperparams(native_mfac, static_args=("ngrads", "dtype"))(learning_rate=0.1, ngrads=3)
    si = inj.init(w)
    ui, si = jax.jit(inj.update)(g, si, w)
    plain = native_mfac(0.1, ngrads=3)
    up, _ = plain.update(g, plain.init(w), w)
    for a, b in zip(jax.tree.leaves(ui), jax.tree.leaves(up)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # vmap over independent problems: each lane equals its own run
    gs = jax.tree.map(lambda t: jnp.stack([t, 2 * t]), g)
    states = jax.vmap(plain.init)(jax.tree.map(lambda t: jnp.stack([t, t]), w))
    us, _ = jax.vmap(plain.update)(gs, states)
    single, _ = plain.update(jax.tree.map(lambda t: 2 * t, g), plain.init(w))
    for a, b in zip(jax.tree.leaves(us), jax.tree.leaves(single)):
        np.testing.assert_allclose(a[1], b, rtol=1e-5)
    with pytest.raises(ValueError, match="ngrads"):
        native_mfac(0.1, ngrads=0)


@pytest.mark.parametrize("x64", [False, True])
def test_sharded_along_d_equals_unsharded_and_communicates_m_values(x64):
    """4 host devices (a subprocess: XLA_FLAGS must precede JAX's start): the ring and the
    parameters sharded along d give the unsharded updates to rounding, and XLA compiles
    all-reduces of 1 value (max|g|, the frame) and of m + 1 (the Gram row and ‖h‖²), and in the
    corrected form's branch one more of m + 1 before and one inside its refinement loop (Ĥ·r),
    nothing d-long; with x64 also for a float32 ring widened whole (widen_blocks=False: widened
    in blocks, a sharded ring is gathered)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import checkout_env

    worker = Path(__file__).parent / "workers" / "jax_sharded.py"
    env = checkout_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    argv = [sys.executable, str(worker)] + (["x64"] if x64 else [])
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["ring_sharding"] == "P(None, 'd')"
    assert out["diff"] <= (1e-12 if x64 else 1e-5)
    m = 64 if x64 else 8
    assert sorted(out["collectives"]) == [["all-reduce", 1]] + [["all-reduce", m + 1]] * 3


@pytest.mark.parametrize("x64,magnitude", [(False, 1e20), (False, 1e-20), (True, 2.0**400), (True, 2.0**-400)])
def test_frames_follow_the_gradients_magnitude(x64, magnitude):
    """Gradients far from 1 (‖g‖² beyond float32 at 1e20; beyond float64 at 2^±400): the framed
    window keeps the accuracy it has at magnitude 1 against the framed DynamicInverse, and, on
    duplicates (the corrected form), its backward error target."""
    assert _worst_backward_error("duplicate", 7, x64, d=200, magnitude=magnitude) <= (1e-12 if x64 else 1e-6)
    with jax.enable_x64(x64):
        m, d, damp = 7, 200, 1e-3
        dtype = "float64" if x64 else "float32"
        G = testing.gradients("iid", 3 * m, d, seed=5, dtype="float64") * magnitude
        G = G.astype(dtype)
        ref = r1.DynamicInverse(d, m, damp, scale=1.0 / m, dtype=dtype)
        acc = jnp.float64 if x64 else jnp.float32
        ring, gram, exps = jnp.zeros((m, d), dtype), jnp.zeros((m, m), acc), jnp.zeros(m, jnp.int32)
        worst, step = 0.0, jax.jit(window_direction)
        for i, g in enumerate(G):
            want = ref.push_apply(g)
            got, ring, gram, exps, ok = step(ring, gram, exps, jnp.int32(i), jnp.asarray(g), damp, 1.0 / m)
            assert bool(ok) and bool(jnp.all(jnp.isfinite(got)))
            worst = max(worst, relative(got, want))
        assert worst <= (1e-9 if x64 else 1e-4)


def test_a_non_finite_gradient_leaves_the_window_as_it_was():
    """The refusal: NaN updates and the state unchanged bit for bit, so the run continues as if
    the gradient had never come; optax.apply_if_finite skips the step."""
    w, x, loss = _problem()
    tx = native_mfac(0.1, ngrads=3, damp=1e-3, momentum=0.5)
    update = jax.jit(tx.update)
    grads = [jax.grad(loss)(w, x[8 * i : 8 * i + 8]) for i in range(5)]
    bad = jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), grads[2])

    def run(sequence):
        s, out = tx.init(w), []
        for g in sequence:
            u, s_new = update(g, s)
            if g is bad:
                assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree_util.tree_leaves(u))
                for a, b in zip(jax.tree_util.tree_leaves(s_new), jax.tree_util.tree_leaves(s)):
                    assert np.array_equal(np.asarray(a), np.asarray(b))
            else:
                out.append(u)
            s = s_new
        return out

    clean = run(grads)
    refused = run([*grads[:2], bad, *grads[2:]])
    for u, v in zip(clean, refused):
        for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(v)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    guarded = optax.apply_if_finite(native_mfac(0.1, ngrads=3, damp=1e-3), max_consecutive_errors=5)
    s = guarded.init(w)
    u, s = guarded.update(bad, s)
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree_util.tree_leaves(u))
    assert int(s.notfinite_count) == 1


def test_check_finite_false_drops_only_the_refusal():
    """Without the refusal the finite run is the same run, and a NaN gradient enters the window
    (so such a transformation belongs under optax.apply_if_finite)."""
    w, x, loss = _problem()
    fast, safe = (native_mfac(0.1, ngrads=3, damp=1e-3, check_finite=flag) for flag in (False, True))
    s_fast, s_safe = fast.init(w), safe.init(w)
    for i in range(4):
        g = jax.grad(loss)(w, x[8 * i : 8 * i + 8])
        u_fast, s_fast = jax.jit(fast.update)(g, s_fast)
        u_safe, s_safe = jax.jit(safe.update)(g, s_safe)
        for a, b in zip(jax.tree_util.tree_leaves(u_fast), jax.tree_util.tree_leaves(u_safe)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    bad = jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), g)
    _, s_fast = fast.update(bad, s_fast)
    assert int(s_fast.count) == 5 and bool(jnp.isnan(s_fast.ring).any())
    guarded = optax.apply_if_finite(fast, max_consecutive_errors=3)
    s = guarded.init(w)
    _, s2 = guarded.update(bad, s)
    assert int(s2.notfinite_count) == 1 and not bool(jnp.isnan(s2.inner_state.ring).any())
