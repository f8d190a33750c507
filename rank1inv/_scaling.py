"""Power-of-two scaling: results invariant under scaling of x, G and λ (docs/design.md §4).

Every computation runs in a *frame* where the numbers are of order one, and the result is
scaled back by a power of two at the very end, so nothing overflows or underflows in between
whatever the magnitudes of the inputs (as long as the result itself is representable):

- each right-hand side x is divided by 2^e, block by block, with e the exponent of the block's
  max|x| (``rank1inv._operator``);
- each gradient g_i of a group is multiplied by σ_i = 2^-E_i (``row_frames``; ``frame_exponent``
  for one frame), which makes the m×m system K' = D(GGᵀ)D + (λ/s)·D², D = diag(σ_i), of order
  one whatever the gradients' magnitudes, also when they differ by more than the float64 range
  of their products (docs/design.md §4);
- the result of a group in its frame is multiplied by 2^(e + out) (``_backend.ldexp``), where
  ``out`` is the group's output exponent (``inverse_exponent``, ``fisher_exponent``).

Scaling by a power of two is exact (barring underflow to subnormals of terms that are then
negligible against the largest ones), so the frame changes no rounding error.
"""

from __future__ import annotations

import math

import numpy as np

NO_ROW = -(10**6)  # the exponent of a zero gradient: below every frame, so its frame is the damping's

# Within this range of exponents no frame is needed: the Gram matrix of float64 gradients with
# max|g| ≤ 2^256 cannot overflow (d·2^512 ≪ 2^1024) and (λ/s) ≤ 2^512 is far from overflow.
# Keeping σ = 1 there leaves ordinary problems on their fastest path (no scaled copies).
SAFE_EXPONENT = 256


def exponent(value: float) -> int:
    """e with value = f·2^e, 0.5 ≤ |f| < 1 (``math.frexp``); 0 for value = 0."""
    return math.frexp(value)[1] if value else 0


def split(value: float) -> tuple[float, int]:
    """(f, e) with value = f·2^e, 0.5 ≤ f < 1, for a positive finite float."""
    return math.frexp(value)


def frame_exponent(max_abs: float, damp: float, scale: float, exact_products: bool) -> int:
    """E such that σ = 2^-E makes the gradients and μ = λ/s of order one: σ·max|g| ≤ 1 and
    σ²·μ ≤ 1, one of them near 1. Returns 0 while both are within ``SAFE_EXPONENT`` (for
    storage whose float64 products are exact and cannot overflow, only μ can need a frame)."""
    e_mu = damping_exponent(damp, scale)
    e_g = exponent(max_abs) if max_abs > 0 else NO_ROW
    if exact_products:
        e_g = min(e_g, 0)  # float32/16-bit products never overflow float64
    E = max(e_g, e_mu)
    return 0 if abs(E) <= SAFE_EXPONENT else E


def damping_exponent(damp: float, scale: float) -> int:
    """⌈log₂(λ/s)/2⌉ (rounded up): the frame in which μ' = σ²λ/s is at most of order one."""
    return (exponent(damp) - exponent(scale) + 1 + 1) // 2


def row_exponents(row_max) -> np.ndarray:
    """The exponents e_i of max|g_i| for an array of row maxima (host float64, any shape): int64,
    ``NO_ROW`` where a row is zero."""
    top = np.asarray(row_max, dtype=np.float64)
    e = np.frexp(top)[1].astype(np.int64)
    return np.where(top > 0, e, NO_ROW)


# Rows whose frames differ by at most this many binades share one frame (the largest): their Gram
# entries in it are at least 2^-960 of order one, far from underflow. Beyond it every row keeps
# its own frame (docs/design.md §4).
SPREAD_LIMIT = 480


def row_frames(row_max, damp: float, scale: float, exact_products: bool) -> np.ndarray:
    """The frames E_i of a group's rows (host int64, the shape of ``row_max``, (..., m): the last
    axis holds one block's rows). Each row needs ``frame_exponent`` of its own max|g_i|; rows of
    one block whose needs differ by at most ``SPREAD_LIMIT`` share the largest (one frame per
    block, the usual case, 0 for ordinary problems); beyond it each row keeps its own, so that
    σ_i·max|g_i| ≤ 1 and σ_i²·λ/s ≤ 1 for every row whatever the magnitudes. For storage whose
    float64 products are exact (float32, 16-bit) one frame always serves."""
    return frames_from_exponents(row_exponents(row_max), damp, scale, exact_products)


def frames_from_exponents(e, damp: float, scale: float, exact_products: bool) -> np.ndarray:
    """``row_frames`` from the rows' exponents e_i (``NO_ROW`` for zero rows)."""
    e = np.atleast_1d(np.asarray(e, dtype=np.int64))
    nonzero = e > NO_ROW
    if exact_products:  # needs within [−149, 0] ∪ {e_mu}: one frame always serves (the hot path)
        top = np.max(np.where(nonzero, np.minimum(e, 0), NO_ROW), axis=-1, keepdims=True)
        E = np.maximum(top, damping_exponent(damp, scale))
        return np.broadcast_to(np.where(np.abs(E) <= SAFE_EXPONENT, 0, E), e.shape).astype(np.int64)
    need = np.maximum(e, damping_exponent(damp, scale))  # each row's own frame, before snapping
    top = np.max(np.where(nonzero, need, np.iinfo(np.int64).min), axis=-1, keepdims=True)
    low = np.min(np.where(nonzero, need, np.iinfo(np.int64).max), axis=-1, keepdims=True)
    any_row = np.any(nonzero, axis=-1, keepdims=True)
    shared = np.where(any_row, top, need.max(axis=-1, keepdims=True))  # all-zero blocks: the damping's
    one = ~any_row | (top - low <= SPREAD_LIMIT)
    E = np.where(one, shared, need)
    return np.where(np.abs(E) <= SAFE_EXPONENT, 0, E).astype(np.int64)


def pow2_array(exponents) -> np.ndarray:
    """2.0**k elementwise (host float64, exact; 0.0 below the subnormal range)."""
    k = np.clip(np.asarray(exponents, dtype=np.int64), -2000, 2000).astype(np.int32)
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(1.0, k)


def pow2(k: int) -> float:
    """2.0**k as a float for |k| ≤ 1023 (exact)."""
    return math.ldexp(1.0, k)


def frame_damping(damp: float, scale: float, E: int) -> float:
    """μ' = σ²·λ/s in the frame σ = 2^-E, without overflow in between (0.0 if it underflows:
    it is then far below rounding of the Gram matrix)."""
    (lf, le), (sf, se) = split(damp), split(scale)
    try:
        return math.ldexp(lf / sf, le - se - 2 * E)
    except OverflowError:  # pragma: no cover - E ≥ ⌈log2(λ/s)/2⌉ whenever a frame is taken
        return math.inf


def row_damping(damp: float, scale: float, frames) -> np.ndarray:
    """μ'_i = σ_i²·λ/s per row for frames E_i (host float64, the shape of ``frames``), by
    exponents: no intermediate overflow, 0.0 where it underflows."""
    (lf, le), (sf, se) = split(damp), split(scale)
    k = le - se - 2 * np.asarray(frames, dtype=np.int64)
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(lf / sf, np.clip(k, -2000, 2000).astype(np.int32))


def rescale_exponents(old, new) -> np.ndarray:
    """The exponents (E_i + E_j) − (E'_i + E'_j) that take a Gram matrix from frames ``old`` to
    ``new`` (both (..., m)): (..., m, m) int64, for ``_backend.ldexp``."""
    old, new = np.asarray(old, dtype=np.int64), np.asarray(new, dtype=np.int64)
    diff = old - new
    return diff[..., :, None] + diff[..., None, :]


def power(fraction: float, exp: int, p: float) -> tuple[float, int]:
    """(f, e) with (fraction·2^exp)^p = f·2^e, computed without overflow for any finite
    exponent: e = ⌊p·exp⌋ and f = fraction^p·2^(p·exp − e) (exact scaling where p·exp is an
    integer, e.g. p = ±1, or p = ±1/2 with exp even)."""
    t = p * exp
    e = math.floor(t)
    return fraction**p * 2.0 ** (t - e), int(e)
