"""Input validation shared by every public entry point.

Each check raises a TypeError/ValueError/IndexError whose message names the
argument and the problem; none of them modifies its input.
"""

from __future__ import annotations

import math
import numbers

from . import _backend

ACCUMULATE = ("float64", "native")


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
    try:
        name = _backend.dtype_name(value)
    except TypeError as err:
        raise TypeError(f"dtype must be float32 or float64, got {value!r}") from err
    if name not in _backend.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {name}")
    return name


def as_array(x, name: str):
    """``x`` itself if it is a NumPy/CuPy array; a NumPy array for nested lists/tuples."""
    if _backend.is_array(x):
        return x
    if isinstance(x, (list, tuple)):
        return _backend.namespace_from_argument(None).asarray(x)
    raise TypeError(f"{name} must be an array (NumPy or CuPy), not {type(x).__name__}")


def float_kind(x, name: str) -> str:
    """'float32' or 'float64', the dtype of array ``x``; TypeError for any other dtype."""
    kind = _backend.dtype_name(x.dtype)
    if kind not in _backend.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {kind}")
    return kind


def float_array(x, name: str, ndims: tuple[int, ...]):
    """Namespace of ``x`` after checking it is a finite float32/float64 array of allowed ndim."""
    xp = _backend.namespace(x)
    if x.ndim not in ndims:
        raise ValueError(f"{name} must have ndim in {ndims}, got shape {tuple(x.shape)}")
    float_kind(x, name)
    if not _backend.all_finite(xp, x):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return xp


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
    if _backend.is_array(idx):
        same_backend(xp, idx, name, "the operator")
        arr = idx
    else:
        try:
            arr = xp.asarray(idx)
        except Exception as err:
            raise TypeError(f"{name} must be integers") from err
    if arr.ndim == 0:
        arr = xp.reshape(arr, (1,))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.shape[0] and not xp.isdtype(arr.dtype, "integral"):
        raise TypeError(f"{name} must be integers, got {arr.dtype}")
    arr = xp.astype(arr, xp.int64)
    if arr.shape[0]:
        lo, hi = int(xp.min(arr)), int(xp.max(arr))
        if lo < 0 or hi >= dim:
            raise IndexError(f"{name} out of range for dimension {dim}: min {lo}, max {hi}")
    return arr
