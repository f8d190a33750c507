"""M-FAC with its window as arrays in the optax state: pure ``init``/``update`` that XLA compiles
(jit, vmap, scan, donation, sharding), no host callback (docs/design.md §16).

This is the one place where window math is written twice: XLA needs the window as pure array
functions, while ``DynamicInverse`` updates its factor in place. It keeps the formulas of
docs/design.md §6 and the numerics policy where XLA allows: the Gram row of each new gradient is
one pass over the ring (accumulated in float64 when ``jax_enable_x64`` is on, in float32
otherwise), the direction is the push_apply form F⁻¹g_j = (1/s)·Gᵀ·K⁻¹e_j (no cancellation for
a stored gradient, K = GGᵀ + (λ/s)I over the occupied slots), and the m×m system is factored
afresh each step by one Cholesky call (O(m³), one LAPACK/cuSOLVER call under XLA, with no drift
to accumulate; an O(m²) update as a loop of rank-one steps has not been measured against it).

Not (yet) here: the power-of-two frames of docs/design.md §4 (the ring and the Gram matrix are
held unscaled, so float32 gradients with ‖g‖² outside about [1e-30, 1e30] lose digits: enable
x64 for such gradients), and refusals: a non-finite gradient propagates NaN into the update and
the state, as XLA computations do (check ``jnp.isfinite`` on the loss or the updates).
"""

from __future__ import annotations

from typing import NamedTuple

import jax  # noqa: TID253 (this module is the adapter)
import jax.numpy as jnp  # noqa: TID253 (this module is the adapter)
import optax  # noqa: TID253 (this module is the adapter)
from jax.flatten_util import ravel_pytree  # noqa: TID253 (this module is the adapter)


class NativeMFACState(NamedTuple):
    """The whole window as arrays: ``ring`` (m, d) the last m gradients in the parameters' dtype
    (slot i holds push number i mod m), ``gram`` (m, m) their Gram matrix in the accumulation
    dtype, ``count`` (int32) the pushes so far, ``momentum`` (d,) the heavy-ball buffer."""

    ring: jax.Array
    gram: jax.Array
    count: jax.Array
    momentum: jax.Array


def _accumulation_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def window_direction(ring, gram, count, g, damp, scale):
    """Push g into the window (ring, gram, count) and return (F⁻¹g, ring', gram'), F = λI +
    s·Σ gᵢgᵢᵀ over the occupied slots. O(m·d) for the Gram row and Gᵀc, O(m³) for the
    Cholesky factor; pure (no argument is modified)."""
    m = ring.shape[0]
    acc = gram.dtype
    slot = count % m
    g = g.astype(ring.dtype)  # as stored (a 16-bit ring): every product uses the stored values
    row = jnp.dot(ring, g, preferred_element_type=acc)  # the new gradient against every slot
    self_dot = jnp.dot(g, g, preferred_element_type=acc)
    row = row.at[slot].set(self_dot)
    gram = gram.at[slot, :].set(row).at[:, slot].set(row)
    occupied = jnp.arange(m) < jnp.minimum(count + 1, m)
    both = occupied[:, None] & occupied[None, :]
    mu = jnp.asarray(damp / scale, acc)
    system = jnp.where(both, gram, 0) + jnp.diag(jnp.where(occupied, mu, 1).astype(acc))
    factor = jnp.linalg.cholesky(system)
    e = (jnp.arange(m) == slot).astype(acc)
    c = jax.scipy.linalg.cho_solve((factor, True), e)
    # Gᵀc over the ring as it was (the evicted row weighted 0) plus c_slot·g, then the write:
    # both passes read the old buffer, and the written row depends on the result, so XLA writes
    # in place after them. Measured at d = 10⁵, m = 256: 8 ms per update; 47–57 ms when XLA may
    # schedule the write first (it then copies the m×d ring twice per step).
    others = jnp.where(jnp.arange(m) == slot, jnp.zeros((), acc), c)
    product = jnp.dot(others, ring, preferred_element_type=acc) + c[slot] * g.astype(acc)
    direction = product / jnp.asarray(scale, acc)
    stored = g + 0 * direction.astype(g.dtype)  # the same values, ordered after the passes
    ring = ring.at[slot].set(stored)
    return direction, ring, gram


def native_mfac(learning_rate, *, ngrads: int = 1024, damp=1e-5, momentum: float = 0.0, scale=None,
                dtype=None) -> optax.GradientTransformation:  # fmt: skip
    """M-FAC (M-FAC §4.2) as a pure ``optax.GradientTransformation``: updates = −lr·F⁻¹g with F
    the damped empirical Fisher of the last ``ngrads`` gradients (s = 1/ngrads unless ``scale``),
    the window in the state (``NativeMFACState``).

    ``learning_rate`` and ``damp`` may be numbers or optax schedules (functions of the step
    count); ``optax.inject_hyperparams(native_mfac, static_args=("ngrads", "dtype"))`` makes
    them state. ``dtype`` is the ring's storage dtype (None: the parameters'). The state is a
    pytree of arrays: it jit-compiles with donation, vmaps over independent problems, scans
    over steps and pickles or checkpoints with the rest of the training state, resuming bit for
    bit; with the parameters and the ring sharded along d over a mesh, XLA compiles one
    all-reduce of m + 1 values per update (the Gram row and ‖g‖²) and the updates equal the
    unsharded ones to rounding (tests/test_jax_native.py). Memory: ngrads·d values
    of ``dtype`` plus ngrads² of the accumulation dtype. Cost per step: two passes over the ring
    and one m×m Cholesky.
    """
    if isinstance(ngrads, bool) or not isinstance(ngrads, int) or ngrads < 1:
        raise ValueError(f"ngrads must be a positive int, got {ngrads!r}")
    if isinstance(momentum, (int, float)) and not 0.0 <= momentum < 1.0:  # (a traced value under
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")  # inject_hyperparams)
    s = 1.0 / ngrads if scale is None else scale

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        store = flat.dtype if dtype is None else jnp.dtype(dtype)
        acc = _accumulation_dtype()
        return NativeMFACState(
            ring=jnp.zeros((ngrads, flat.shape[0]), store),
            gram=jnp.zeros((ngrads, ngrads), acc),
            count=jnp.zeros((), jnp.int32),
            momentum=jnp.zeros_like(flat),
        )

    def update_fn(updates, state, params=None):
        del params
        flat, unravel = ravel_pytree(updates)
        lam = damp(state.count) if callable(damp) else damp
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        direction, ring, gram = window_direction(state.ring, state.gram, state.count, flat, lam, s)
        direction = direction.astype(flat.dtype)
        buf = momentum * state.momentum + direction  # momentum 0: exactly the direction
        new = NativeMFACState(ring=ring, gram=gram, count=state.count + 1, momentum=buf)
        return unravel(-lr * buf), new

    return optax.GradientTransformation(init_fn, update_fn)
