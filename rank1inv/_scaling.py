"""Power-of-two scaling: results invariant under scaling of x, G and λ (docs/design.md §4).

Every computation runs in a *frame* where the numbers are of order one, and the result is
scaled back by a power of two at the very end, so nothing overflows or underflows in between
whatever the magnitudes of the inputs (as long as the result itself is representable):

- each right-hand side x is divided by 2^e, block by block, with e the exponent of the block's
  max|x| (``rank1inv._operator``);
- a group of gradients is multiplied by σ = 2^-E (``frame_exponent``), which makes the m×m
  system K' = σ²(GGᵀ) + σ²(λ/s)·I of order one;
- the result of a group in its frame is multiplied by 2^(e + out) (``_backend.ldexp``), where
  ``out`` is the group's output exponent (``inverse_exponent``, ``fisher_exponent``).

Scaling by a power of two is exact (barring underflow to subnormals of terms that are then
negligible against the largest ones), so the frame changes no rounding error.
"""

from __future__ import annotations

import math

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
    e_mu = (exponent(damp) - exponent(scale) + 1 + 1) // 2  # ⌈log2(λ/s)/2⌉, rounded up
    e_g = exponent(max_abs) if max_abs > 0 else -(10**6)
    if exact_products:
        e_g = min(e_g, 0)  # float32/16-bit products never overflow float64
    E = max(e_g, e_mu)
    return 0 if abs(E) <= SAFE_EXPONENT else E


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


def power(fraction: float, exp: int, p: float) -> tuple[float, int]:
    """(f, e) with (fraction·2^exp)^p = f·2^e, computed without overflow for any finite
    exponent: e = ⌊p·exp⌋ and f = fraction^p·2^(p·exp − e) (exact scaling where p·exp is an
    integer, e.g. p = ±1, or p = ±1/2 with exp even)."""
    t = p * exp
    e = math.floor(t)
    return fraction**p * 2.0 ** (t - e), int(e)
