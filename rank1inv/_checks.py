"""Input validation shared by every public entry point.

Each check raises a TypeError/ValueError/IndexError whose message names the
argument and the problem; none of them modifies its input.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend, _precision

ACCUMULATE = ("float64", "native")


def one_damp(value, who: str) -> float:
    """``damp`` for gradients that take one damping value (sharded, chunked, streamed): a real
    number (not a sequence), checked as ``damp``."""
    if isinstance(value, (list, tuple)) or (_backend.is_array(value) and getattr(value, "ndim", 0) >= 1):
        raise ValueError(f"{who} take one damping value (per-block or per-coordinate damps: not yet)")
    return damp(value)


def damp(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if _backend.is_array(value) and getattr(value, "ndim", 1) == 0:
            value = float(value)
        else:
            raise TypeError(f"damp must be a real number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"damp must be finite and > 0, got {value!r}")
    return value


PRIOR_RANGE = 2.0**1000  # largest max δ / min δ of a per-coordinate damping (rank1inv._prior)


def prior_range(delta: np.ndarray) -> None:
    """ValueError unless every δ_j is finite and > 0 and max δ / min δ ≤ ``PRIOR_RANGE``."""
    if not np.all(np.isfinite(delta)) or np.any(delta <= 0):
        raise ValueError("damp must be finite and > 0 in every coordinate")
    if float(delta.max()) / float(delta.min()) > PRIOR_RANGE:
        raise ValueError(
            f"per-coordinate damps span {float(delta.max()) / float(delta.min()):.3g}, more than 2^1000: "
            "not supported (the rescaled gradients would leave the float64 range)"
        )


def damps(value, blocks: int, dim: int | None = None):
    """A damp (float), one per block (tuple of floats, collapsed to a float when all equal), or,
    with ``dim``, one per coordinate (a float64 NumPy array of length dim, when that is not the
    number of blocks)."""
    if isinstance(value, (list, tuple)) or (_backend.is_array(value) and getattr(value, "ndim", 0) == 1):
        host = _backend.to_host(value) if _backend.is_array(value) else None
        n = len(value) if host is None else host.shape[0]
        if dim is not None and n == dim and n != blocks:
            vector = np.array(value if host is None else host, dtype=np.float64)
            prior_range(vector)
            return vector
        if n != blocks:
            raise ValueError(
                f"damp must be one number, one per block ({blocks} blocks)"
                + (f" or one per coordinate ({dim})" if dim is not None else "")
                + f", got {n} values"
            )
        values = tuple(damp(v) for v in (value if host is None else host.tolist()))
        return values[0] if len(set(values)) == 1 else values
    return damp(value)


def scale(value):
    """None, "count" or a positive finite float."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "count":
            return "count"
        raise ValueError(f"scale must be None, 'count' or a positive number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be None, 'count' or a positive number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"scale must be finite and > 0, got {value!r}")
    return value


def accumulate(value) -> str:
    if value not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {value!r}")
    return value


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def float_dtype(value) -> str:
    """A storage dtype name for ``dtype=`` arguments (float64, float32, bfloat16, float16)."""
    try:
        return _precision.of(value).name
    except TypeError as err:
        raise TypeError(f"dtype must be {_precision.STORAGE_TEXT}, got {value!r}") from err


def as_array(x, name: str, xp=None):
    """``x`` itself if it is a NumPy/CuPy array; an array of namespace ``xp`` (NumPy by default)
    for nested lists/tuples and Python scalars; TypeError naming the adapter for torch/JAX
    arrays and others."""
    if _backend.is_array(x):
        return x
    if isinstance(x, (list, tuple)) or (isinstance(x, numbers.Number) and not isinstance(x, bool)):
        ns = xp if xp is not None else _backend.namespace_from_argument(None)
        try:
            return ns.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a rectangular array of numbers") from err
    raise TypeError(_backend.foreign_array_message(x, name))


def float_kind(x, name: str, cupy: bool = False) -> str:
    """The storage dtype name of array ``x``; TypeError for any other dtype."""
    try:
        return _precision.of_array(x, cupy).name
    except TypeError as err:
        raise TypeError(f"{name} must be {_precision.STORAGE_TEXT}, got {x.dtype}") from err


def same_backend(xp, x, name: str, where: str):
    """``x`` must come from the operator's library and device."""
    other = _backend.namespace(x)
    if _backend.is_cupy(other) != _backend.is_cupy(xp):
        raise TypeError(
            f"{name} is a {'CuPy' if _backend.is_cupy(other) else 'NumPy'} array but {where} lives on "
            f"{'CuPy' if _backend.is_cupy(xp) else 'NumPy'}; convert it first"
        )
    return other


def indices(xp, idx, dim: int, name: str):
    """A 1-D integer index array on the operator's backend, each in [0, dim)."""
    if isinstance(idx, np.generic):  # a NumPy scalar (np.int64(3)) is an index like 3
        idx = np.asarray(idx)
    if _backend.is_array(idx):
        same_backend(xp, idx, name, "the operator")
        arr = idx
    elif _backend.is_foreign_array(idx):
        raise TypeError(_backend.foreign_array_message(idx, name))
    else:
        try:
            arr = xp.asarray(idx)
        except Exception as err:
            raise TypeError(f"{name} must be integers") from err
    if arr.ndim == 0:
        arr = xp.reshape(arr, (1,))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.shape[0] and (arr.dtype == xp.bool or not xp.isdtype(arr.dtype, "integral")):
        raise TypeError(f"{name} must be integers, got {arr.dtype}")
    if arr.shape[0] and arr.dtype == xp.uint64:  # values ≥ 2^63 would wrap to negative int64
        hi = int(xp.max(arr))
        if hi >= dim:
            raise IndexError(f"{name} out of range for dimension {dim}: max {hi}")
    arr = xp.astype(arr, xp.int64)
    if arr.shape[0]:
        lo, hi = int(xp.min(arr)), int(xp.max(arr))
        if lo < 0 or hi >= dim:
            raise IndexError(f"{name} out of range for dimension {dim}: min {lo}, max {hi}")
    return arr
