"""M-FAC with its window as arrays in the optax state: pure ``init``/``update`` that XLA compiles
(jit, vmap, scan, donation, sharding), no host callback (docs/design.md §16).

This is the one place where window math is written twice: XLA needs the window as pure array
functions, while ``DynamicInverse`` updates its factor in place. It keeps the formulas of
docs/design.md §6 and the numerics policy where XLA allows: the Gram row of each new gradient is
one pass over the ring (accumulated in float64 when ``jax_enable_x64`` is on, in float32
otherwise), the direction is the push_apply form F⁻¹g_j = (1/s)·Gᵀ·K⁻¹e_j (no cancellation for
a stored gradient, K = GGᵀ + (λ/s)I over the occupied slots), and the m×m system is factored
afresh each step by one Cholesky call (O(m³), one LAPACK/cuSOLVER call under XLA, with no drift
to accumulate): measured, it is 5.7 % of the update at d = 10⁵, m = 256 (0.3 % with x64), the
most an O(m²) update as a loop of rank-one steps could save (docs/benchmarks.md).

Frames (docs/design.md §4, per row): slot i holds h_i = 2^(−k_i)·g_i with 2^(k_i−1) ≤ max|g_i| <
2^(k_i), so the ring's values and the Gram matrix HHᵀ stay near 1 whatever the gradients'
magnitudes; with D = diag(2^(−k)), F⁻¹g_j = (2^(−k_j)/s)·Hᵀ·K'⁻¹e_j, K' = HHᵀ + (λ/s)·D², and
K' is solved after a Jacobi scaling formed without squares of the frames, so the damping term
neither overflows nor underflows where the answer itself fits (``window_direction``).

Cancellation: when the coefficients K̂⁻¹e_j cancel among (nearly) dependent rows (less than
1/100 of their terms survives in ‖Ĥᵀ·K̂⁻¹e_j‖²), the direction is recomputed, under
``lax.cond``, by the corrected form of ``groups/woodbury.py`` (a spectral factor, the residual
taken through the ring, refinement: ``_corrected_direction``), as ``DynamicInverse.push_apply``
does (docs/design.md §3, §16). It costs five passes and more per refinement plus an m×m
eigendecomposition, only on the pushes that take it; under ``vmap`` XLA turns the ``cond`` into
a select and every lane computes both forms.

Refusal: a gradient with a nan or inf leaves the window exactly as it was (ring, Gram matrix,
frames, count and momentum: selects of one row, O(d)) and makes the update NaN, so
``optax.apply_if_finite`` skips the step, or the NaN shows in the parameters; XLA has no
exceptions to raise from compiled code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax  # noqa: TID253 (this module is the adapter)
import jax.numpy as jnp  # noqa: TID253 (this module is the adapter)
import optax  # noqa: TID253 (this module is the adapter)
from jax.flatten_util import ravel_pytree  # noqa: TID253 (this module is the adapter)

from .. import _precision
from ..groups import woodbury


class NativeMFACState(NamedTuple):
    """The whole window as arrays: ``ring`` (m, d) the last m gradients in their frames, in the
    parameters' dtype (slot i holds push number i mod m), ``gram`` (m, m) the framed rows' Gram
    matrix in the accumulation dtype, ``exponents`` (m,) int32 each slot's frame k_i (module
    docstring), ``count`` (int32) the accepted pushes so far, ``momentum`` (d,) the heavy-ball
    buffer."""

    ring: jax.Array
    gram: jax.Array
    exponents: jax.Array
    count: jax.Array
    momentum: jax.Array


def _accumulation_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


_LAYOUT = {jnp.dtype(jnp.float32): (jnp.int32, 23, 127), jnp.dtype(jnp.float64): (jnp.int64, 52, 1023)}


def _float_of(x):
    """The float32/float64 dtype arithmetic on x runs in (16-bit floats in float32)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(x.dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _power_of_two(e, dtype):
    """2^e exactly, by its bit pattern (e clipped to the normal range): jnp.ldexp's range checks
    cost XLA a dozen more fused passes per use, measured on the digits step."""
    ints, mantissa_bits, bias = _LAYOUT[jnp.dtype(dtype)]
    e = jnp.clip(jnp.asarray(e).astype(ints), 1 - bias, bias)
    return jax.lax.bitcast_convert_type((e + bias) << mantissa_bits, dtype)


def _exponent(x):
    """k with 2^(k−1) ≤ x < 2^k for a positive normal x (frexp's exponent, by the bit pattern)."""
    ints, mantissa_bits, bias = _LAYOUT[jnp.dtype(x.dtype)]
    field = (jax.lax.bitcast_convert_type(x, ints) >> mantissa_bits) & (2 * bias + 1)
    return (field - (bias - 1)).astype(jnp.int32)


def _times_power_of_two(x, e):
    """x·2^e exactly unless the result leaves the range, |e| up to twice the exponent range
    (two multiplications by powers of two)."""
    dtype = _float_of(x)
    half = e // 2
    return x.astype(dtype) * _power_of_two(half, dtype) * _power_of_two(e - half, dtype)


# Below this fraction of the sum of its terms left in ‖Ĥᵀ·K̂⁻¹e_j‖², the direction is recomputed by
# the corrected form (the float64 value is the storage policy's, rank1inv._precision).
_CANCELLATION = {jnp.dtype(jnp.float32): 1e-2, jnp.dtype(jnp.float64): _precision.POLICIES["float64"].cancellation}
# A refinement step below this fraction of the coefficients is at rounding level (float64 value: woodbury's)
_REFINE_TOLERANCE = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.float64): woodbury.REFINE_TOLERANCE}
# Refinement stops when a step is more than this times the one before: woodbury's 0.5 in float64;
# in float32 the steps contract by about κ·ε₃₂ and not monotonically, and stopping at the first
# that does not halve left η at 4.7e-6 on the collinear family at m = 256 (1.2e-7 with 2).
_STALLED = {jnp.dtype(jnp.float32): 2.0, jnp.dtype(jnp.float64): 0.5}

_WIDENED = 2**20  # ring values widened to the accumulation dtype at a time (m × block columns)


def _block_width(m: int) -> int:
    """Columns of a narrow ring widened per step of the blocked passes: the power of two nearest
    below 2^20/m, at least 256 (m·width ≈ 2^20 values, 8 MiB of float64: measured at d = 10⁵,
    m = 256, width 4096 runs the Gram row in 9 ms where 2048 takes 11.6 and 16384 21.7)."""
    return max(256, 1 << max(0, (_WIDENED // m).bit_length() - 1))


def _ring_times(ring, h, acc, widen_blocks: bool):
    """ring·h (m,) accumulated in ``acc``. With ``widen_blocks`` a ring narrower than ``acc``
    (float32 or 16-bit values with float64 accumulation under x64; 16-bit with float32) is
    widened one block of columns at a time inside a loop: for ``preferred_element_type`` XLA's
    CPU backend widens the whole m×d ring to ``acc`` (69 ms instead of 9 ms at d = 10⁵, m = 256,
    docs/benchmarks.md). O(md)."""
    m, d = ring.shape
    width = _block_width(m)
    if not widen_blocks or ring.dtype == acc or d <= width:
        return jnp.dot(ring, h, preferred_element_type=acc)
    blocks = d // width

    def add_block(j, total):
        part = jax.lax.dynamic_slice_in_dim(ring, j * width, width, axis=1).astype(acc)
        return total + part @ jax.lax.dynamic_slice_in_dim(h, j * width, width).astype(acc)

    total = jax.lax.fori_loop(0, blocks, add_block, jnp.zeros((m,), acc))
    return total + ring[:, blocks * width :].astype(acc) @ h[blocks * width :].astype(acc)


def _times_ring(c, ring, acc, widen_blocks: bool):
    """cᵀ·ring (d,) accumulated in ``acc``, blocked like ``_ring_times``. O(md)."""
    m, d = ring.shape
    width = _block_width(m)
    if not widen_blocks or ring.dtype == acc or d <= width:
        return jnp.dot(c, ring, preferred_element_type=acc)
    blocks = d // width

    def block(j):
        return c @ jax.lax.dynamic_slice_in_dim(ring, j * width, width, axis=1).astype(acc)

    head = jax.lax.map(block, jnp.arange(blocks)).reshape(-1)
    return jnp.concatenate([head, c @ ring[:, blocks * width :].astype(acc)])


class _Window(NamedTuple):
    """The scaled rows Ĥ = W·H of the window being pushed: ``ring`` as it was (slot j still holds
    the evicted row), ``h`` the new row j, ``w`` the Jacobi weights (0 on empty slots and zero
    rows). Products with Ĥ read the old ring with row j replaced by h, so that the write of h
    into the ring can follow every pass (``window_direction``)."""

    ring: jax.Array
    h: jax.Array
    slot: jax.Array
    w: jax.Array
    widen_blocks: bool

    def transpose_times(self, v):
        """Ĥᵀv (d,) for v (m,), in v's dtype. One pass over the ring."""
        c = self.w * v
        others = jnp.where(jnp.arange(c.shape[0]) == self.slot, jnp.zeros((), c.dtype), c)
        return _times_ring(others, self.ring, c.dtype, self.widen_blocks) + c[self.slot] * self.h.astype(c.dtype)

    def times(self, y):
        """Ĥy (m,) for y (d,), in y's dtype. One pass over the ring."""
        row = _ring_times(self.ring, y, y.dtype, self.widen_blocks)
        return self.w * row.at[self.slot].set(jnp.dot(self.h.astype(y.dtype), y))


def _split(x):
    """(mantissa, exponent) of positive normal x: x = mantissa·2^exponent, mantissa in [0.5, 1)."""
    e = _exponent(x)
    return x * _power_of_two(-e, x.dtype), e


def _plain_direction(window, solved, k):
    """s·F⁻¹g_j = σ_j·w_j·Ĥᵀ·K̂⁻¹e_j (the push_apply form: one pass, exact for a stored g_j
    unless the coefficients K̂⁻¹e_j cancel among nearly dependent rows). O(md)."""
    product = window.transpose_times(solved)
    w_mantissa, w_exponent = _split(jnp.where(window.w[window.slot] > 0, window.w[window.slot], 1))
    return _times_power_of_two(product * w_mantissa, w_exponent - k)  # σ_j = 2^(−k_j), w_j: powers of two apart


def _corrected_direction(window, k, t, q, system, noise, gram):
    """s·F⁻¹g_j without the cancellation of Ĥᵀ·K̂⁻¹e_j: the corrected form of
    ``groups.woodbury.WoodburyGroup._corrected`` for x = ĥ_j in the scaled system K̂ = ĤĤᵀ + N
    (``window_direction``), with its spectral factor (directions whose eigenvalue is at rounding
    dropped), its residual through the ring and its refinement rule; then, as ĤᵀK̂⁻¹e_j = r/n_j for
    r = ĥ_j − ĤᵀK̂⁻¹Ĥĥ_j, s·F⁻¹g_j = σ_j·w_j·(1 + 1/t_j)·r, the factor formed by powers of two.
    Five passes over the ring, two more per further refinement, and one m×m eigendecomposition."""
    acc = system.dtype
    slot, w = window.slot, window.w
    live = w > 0
    theta, Q = jnp.linalg.eigh(system)
    # Drop only the directions whose θ is at the eigensolver's rounding (ε·max θ, absolute): there
    # 1/θ has no digit left. woodbury's SpectralFactor drops more (qᵀĤĤᵀq ≤ m·ε·max, its float64
    # factor's rounding), which in float32 drops directions that carry the answer (measured η
    # 1.4e-3 against 5e-9 on the collinear family at m = 32, docs/benchmarks.md).
    keep = theta > jnp.finfo(acc).eps * jnp.max(theta)
    inverse = jnp.where(keep, 1 / jnp.where(keep, theta, 1), 0)

    def solve(v):
        return jnp.where(live, Q @ ((Q.T @ v) * inverse), 0)

    x = w[slot] * window.h.astype(acc)  # ĥ_j
    C = solve(w * w[slot] * gram[:, slot])  # K̂⁻¹Ĥĥ_j (the Gram column is Ĥĥ_j, no pass)

    def residual(C):
        R = x - window.transpose_times(C)
        D = solve(window.times(R) - noise * C)  # K̂⁻¹(ĤR − NC), zero in exact arithmetic
        size = jnp.max(jnp.abs(D)) / jnp.maximum(jnp.max(jnp.abs(C)), jnp.finfo(acc).tiny)
        return R, D, size

    def more(carry):
        step, _, _, _, size, previous = carry
        stalled = size > _STALLED[jnp.dtype(acc)] * previous
        done = (step >= 1) & ((size <= _REFINE_TOLERANCE[jnp.dtype(acc)]) | stalled)
        return (step < woodbury.MAX_REFINEMENTS) & ~done

    def refine(carry):
        step, C, _, D, size, _ = carry
        C = C + D
        return (step + 1, C, *residual(C), size)

    R, D, size = residual(C)
    carry = (jnp.int32(0), C, R, D, size, jnp.asarray(jnp.inf, acc))
    _, _, R, D, _, _ = jax.lax.while_loop(more, refine, carry)
    r = R - window.transpose_times(D)  # removes R's rounding errors along the rows
    tj, qj = t[slot], q[slot]
    near = tj <= 1  # σ_j(1 + 1/t_j) = 2^(k_j)·(1 + t_j)/q_j (t_j = q_j·2^(−2k_j)), else σ_j·(1 + 1/t_j)
    factor = jnp.where(near, (1 + tj) / jnp.where(near, qj, 1), 1 + 1 / jnp.where(near, 1, tj))
    w_mantissa, w_exponent = _split(jnp.where(live[slot], w[slot], 1))
    return _times_power_of_two(r * (w_mantissa * factor), w_exponent + jnp.where(near, k, -k))


def window_direction(ring, gram, exponents, count, g, damp, scale, check_finite=True, widen_blocks=True):
    """Push g into the window (ring, gram, exponents, count) and return (F⁻¹g, ring', gram',
    exponents', accepted), F = λI + s·Σ gᵢgᵢᵀ over the occupied slots; a non-finite g is not
    pushed (the window comes back unchanged, ``accepted`` False) and its direction is NaN.
    O(m·d) for the Gram row and Gᵀc, O(m³) for the Cholesky factor (with cancellation, the
    corrected form: five passes or more and an m×m eigendecomposition, module docstring); pure (no argument is
    modified). Sharded along d: an all-reduce of 1 value (max|g|) and one of m + 1 (the row).
    ``check_finite=False`` (a static choice) skips the refusal: a non-finite g then poisons the
    window with NaN, and ``accepted`` is always True. ``widen_blocks`` (static): a ring narrower
    than the accumulation dtype is widened a block of columns at a time (``_ring_times``); False
    widens it whole, which a ring sharded along d needs (XLA gathers the blocks of a sharded
    ring: d-long all-gathers per update instead of m + 1 values)."""
    m = ring.shape[0]
    acc = gram.dtype
    slot = count % m
    g = g.astype(ring.dtype)  # as stored (a 16-bit ring): every product uses the stored values
    peak = jnp.max(jnp.abs(g))  # nan or inf exactly when g is not finite
    accepted = jnp.isfinite(peak) if check_finite else jnp.asarray(True)
    k = _exponent(jnp.where(accepted & (peak > 0), peak, 1).astype(acc))
    h = jnp.where(accepted, _times_power_of_two(g, -k), 0).astype(ring.dtype)  # exact: a power of two
    row = _ring_times(ring, h, acc, widen_blocks)  # the new row against every slot
    self_dot = jnp.dot(h, h, preferred_element_type=acc)
    row = row.at[slot].set(self_dot)
    new_gram = gram.at[slot, :].set(row).at[:, slot].set(row)
    new_exponents = exponents.at[slot].set(k)
    occupied = jnp.arange(m) < jnp.minimum(count + 1, m)
    both = occupied[:, None] & occupied[None, :]
    # K' = HHᵀ + μ·D² (μ = λ/s, D = diag 2^(−k)) is solved Jacobi-scaled, K' = W⁻¹K̂W⁻¹ with
    # w_i = 1/√K'_ii = r_i/‖h_i‖, r_i = (1 + t_i)^(−1/2), t_i = μ·2^(−2k_i)/‖h_i‖²: K̂ has a unit
    # diagonal and entries cos θ_ij·r_i·r_j, so neither a tiny nor a huge damping term leaves the
    # range (t_i is formed by powers of two; beyond 2^60, r_i = 2^(k_i)·(μ/‖h_i‖²)^(−1/2) directly).
    norms2 = jnp.diagonal(new_gram)
    live = occupied & (norms2 > 0)
    mu = jnp.asarray(damp / scale, acc)
    q = mu / jnp.where(live, norms2, 1)
    t = _times_power_of_two(q, jnp.clip(-2 * new_exponents, -200, 200))  # beyond 2^±200: either branch decides
    r = jnp.where(
        t <= 2.0**60, jax.lax.rsqrt(1 + jnp.minimum(t, 2.0**60)), _times_power_of_two(jax.lax.rsqrt(q), new_exponents)
    )
    w = jnp.where(live, r * jax.lax.rsqrt(jnp.where(live, norms2, 1)), 0)
    scaled = jnp.where(both, new_gram * w[:, None] * w[None, :], 0)
    system = jnp.where(jnp.eye(m, dtype=bool), jnp.ones((), acc), scaled)  # K̂ (identity on empty slots)
    factor = jnp.linalg.cholesky(system)
    e = (jnp.arange(m) == slot).astype(acc)
    solved = jax.scipy.linalg.cho_solve((factor, True), e)  # K̂⁻¹e_j
    # K̂ = A + N: A = Ĥ·Ĥᵀ for the scaled rows ĥ_i = w_i·h_i (‖ĥ_i‖² = r_i²), N = diag(t_i·r_i²)
    # their damping (1 on empty slots); both are bounded by 1 whatever the frames and λ.
    rows2 = jnp.where(live, norms2 * w * w, 0)
    noise = jnp.where(live, jnp.where(t <= 2.0**60, t * r * r, 1), 1)
    # ‖Ĥᵀĉ‖² = ĉ_j − Σ n_i·ĉ_i² against (Σ |ĉ_i|·‖ĥ_i‖)²: how much of the sum of terms survives
    kept = solved[slot] - jnp.sum(noise * solved * solved)
    terms = jnp.sum(jnp.abs(solved) * jnp.sqrt(rows2)) ** 2
    cancelled = accepted & (kept < _CANCELLATION[jnp.dtype(acc)] * terms)
    window = _Window(ring, h, slot, w, widen_blocks)
    direction = jax.lax.cond(
        cancelled,
        lambda: _corrected_direction(window, k, t, q, system, noise, new_gram),
        lambda: _plain_direction(window, solved, k),
    )
    direction = direction / jnp.asarray(scale, acc)
    stored = jnp.where(accepted, h, ring[slot]) + 0 * direction.astype(h.dtype)  # ordered after the passes
    ring = ring.at[slot].set(stored)
    gram = jnp.where(accepted, new_gram, gram)
    exponents = jnp.where(accepted, new_exponents, exponents)
    direction = jnp.where(accepted, direction, jnp.nan)
    return direction, ring, gram, exponents, accepted


def native_mfac(learning_rate, *, ngrads: int = 1024, damp=1e-5, momentum: float = 0.0, scale=None, dtype=None,
                check_finite: bool = True, widen_blocks: bool = True) -> optax.GradientTransformation:  # fmt: skip
    """M-FAC (M-FAC §4.2) as a pure ``optax.GradientTransformation``: updates = −lr·F⁻¹g with F
    the damped empirical Fisher of the last ``ngrads`` gradients (s = 1/ngrads unless ``scale``),
    the window in the state (``NativeMFACState``).

    ``learning_rate`` and ``damp`` may be numbers or optax schedules (functions of the step
    count); ``optax.inject_hyperparams(native_mfac, static_args=("ngrads", "dtype"))`` makes
    them state. ``dtype`` is the ring's storage dtype (None: the parameters'). The state is a
    pytree of arrays: it jit-compiles with donation, vmaps over independent problems, scans
    over steps and pickles or checkpoints with the rest of the training state, resuming bit for
    bit; with the parameters and the ring sharded along d over a mesh, XLA compiles two
    all-reduces per update, of 1 value (max|g|, for the frame) and of m + 1 (the Gram row and
    ‖h‖²), and the updates equal the unsharded ones to rounding (tests/test_jax_native.py). A
    non-finite gradient is refused: the state comes back unchanged and the updates are NaN
    (module docstring; wrap in ``optax.apply_if_finite`` to skip such steps). ``check_finite=False``
    drops that refusal (a non-finite gradient then poisons the window: use it under
    ``optax.apply_if_finite``, which restores the state itself) and saves its selects, about
    0.06 ms per step on the CPU, which is most of the step on a model as small as the digits MLP
    (docs/benchmarks.md). ``widen_blocks=False`` is for a ring sharded along d whose values are
    narrower than the accumulation dtype (a float32 or 16-bit ring under x64, a 16-bit ring
    without): the blocked widening that makes such a ring's passes fast on one device (the
    bare update at d = 10⁵, m = 256 with x64: 30 ms against 95 ms) makes XLA gather the blocks
    of a sharded ring, d-long all-gathers per update; with False it communicates the m + 1
    values above. Memory: ngrads·d values
    of ``dtype`` plus ngrads² of the accumulation dtype. Cost per step: two passes over the ring
    and one m×m Cholesky; a push whose coefficients cancel (a gradient nearly dependent on the
    window's) takes the corrected form, five passes or more and an m×m eigendecomposition (at
    d = 10⁵, m = 256 on duplicate gradients: 82 ms against 9 ms, docs/benchmarks.md). Sharded,
    that form adds an all-reduce of m + 1 values per residual.
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
            exponents=jnp.zeros((ngrads,), jnp.int32),
            count=jnp.zeros((), jnp.int32),
            momentum=jnp.zeros_like(flat),
        )

    def update_fn(updates, state, params=None):
        del params
        flat, unravel = ravel_pytree(updates)
        lam = damp(state.count) if callable(damp) else damp
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        direction, ring, gram, exponents, accepted = window_direction(
            state.ring, state.gram, state.exponents, state.count, flat, lam, s, check_finite, widen_blocks
        )
        direction = direction.astype(flat.dtype)
        if isinstance(momentum, (int, float)) and momentum == 0:  # the buffer is never read: keep it
            buf, kept = direction, state.momentum  # (selecting it back costs XLA a pass per step)
        else:
            buf = momentum * state.momentum + direction  # NaN if refused
            kept = jnp.where(accepted, buf, state.momentum)
        count = state.count + accepted.astype(jnp.int32)
        new = NativeMFACState(ring=ring, gram=gram, exponents=exponents, count=count, momentum=kept)
        return unravel(-lr * buf), new

    return optax.GradientTransformation(init_fn, update_fn)
