"""The precision policy: everything the library decides by the storage dtype of the gradients.

Storage is not compute precision (docs/design.md §3): G stays in the caller's dtype, every
reduction over d accumulates in float64, all m×m algebra is float64, and each output is rounded
once. This module is the only place that says, per storage dtype, what the output dtype is,
which accuracy targets and cancellation thresholds apply, and which compiled passes serve it.
Adding a storage dtype is an edit of ``POLICIES`` (and of the kernels that decode it).

16-bit storage: float16 is a NumPy and CuPy dtype; bfloat16 is ``ml_dtypes.bfloat16`` on NumPy
and, as CuPy has no bfloat16, its raw bit patterns in a uint16 array on CuPy (``raw_bits``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes is a dependency; kept importable without it
    ml_dtypes = None  # type: ignore[assignment]


class AccuracyWarning(RuntimeWarning):
    """A result lost its digits to cancellation beyond the conditioning where the accuracy
    targets hold; the value returned is the best bound available (see docs/numerics.md)."""


# float64's machine epsilon (2⁻⁵²): every rounding bound stated in float64 is a multiple of it
EPS64 = float(np.finfo(np.float64).eps)

# 1 − ‖w_j‖² below this many m·ε has no reliable digit left (docs/numerics.md, "diagonal")
DIAGONAL_DIGITS_LOST = 64.0


@dataclass(frozen=True)
class Precision:
    """The policy for one storage dtype.

    name: the dtype's name ("float32", ...). itemsize: bytes per stored value.
    output: dtype name of query results (products, diagonals) unless the caller's x asks for more.
    eta: backward-error target of a product (docs/design.md §8). rel: diag/entry relative-error target
    where cond(F) ≤ 1e9. cancellation: ``groups.woodbury`` recomputes a product when less than this
    fraction of ‖x‖² survives λ⁻¹(x − Gᵀc). refine_condition: it also does when the m×m system's
    condition (estimated from its factor's pivots) exceeds this, where the one-pass Woodbury
    product's error would exceed ``eta`` (docs/numerics.md). native: the dtype the passes use for
    ``accumulate="native"`` (float64 where there is no native BLAS path: 16-bit storage).
    max_value: the largest finite stored value. mantissa_bits: of the stored values (a float64
    product of two of them is exact when 2·bits ≤ 53).
    cpu_pass / cuda_pass: the element type name the compiled passes decode ("f32", "bf16",
    "f16"), or None when only the float64 tiles serve it.
    """

    name: str
    itemsize: int
    output: str
    eta: float
    rel: float
    cancellation: float
    refine_condition: float
    native: str
    max_value: float
    mantissa_bits: int
    cpu_pass: str | None
    cuda_pass: str | None

    @property
    def exact_products(self) -> bool:
        """Whether the float64 product of two stored values is exact (no overflow either)."""
        return 2 * self.mantissa_bits <= 53


# The cancellation thresholds were calibrated on randomized windows of (near-)duplicate and
# low-rank gradients (docs/numerics.md): above them the one-pass result met the target with a
# margin. The 16-bit dtypes accumulate exactly like float32 storage (exact float64 products).
POLICIES = {
    "float64": Precision(
        "float64", 8, "float64", 5e-12, 1e-6, 1e-2, 1e9, "float64", float(np.finfo(np.float64).max), 53, None, None
    ),  # fmt: skip
    "float32": Precision(
        "float32", 4, "float32", 1e-7, 1e-6, 1e-9, 1e14, "float32", float(np.finfo(np.float32).max), 24, "f32", "f32"
    ),  # fmt: skip
    "bfloat16": Precision(
        "bfloat16", 2, "float32", 1e-7, 1e-6, 1e-9, 1e14, "float32", 3.3895313892515355e38, 8, "bf16", "bf16"
    ),  # fmt: skip
    "float16": Precision("float16", 2, "float32", 1e-7, 1e-6, 1e-9, 1e14, "float64", 65504.0, 11, "f16", "f16"),
}
STORAGE = tuple(POLICIES)
STORAGE_TEXT = ", ".join(STORAGE[:-1]) + " or " + STORAGE[-1]


def name_of(dtype) -> str | None:
    """The policy name of a dtype (NumPy/CuPy dtype, scalar type, ml_dtypes type or string), or
    None when it is not a storage dtype."""
    if isinstance(dtype, str):
        key = dtype.rsplit(".", 1)[-1]
        return key if key in POLICIES else None
    try:
        key = np.dtype(dtype).name
    except TypeError:
        key = str(dtype).rsplit(".", 1)[-1].strip("'>")
    return key if key in POLICIES else None


def of(dtype) -> Precision:
    """The policy of a storage dtype; TypeError naming the supported ones otherwise."""
    key = name_of(dtype)
    if key is None:
        raise TypeError(f"storage dtype must be {STORAGE_TEXT}, got {dtype!r}")
    if key == "bfloat16" and ml_dtypes is None:  # pragma: no cover
        raise TypeError("bfloat16 storage needs the ml_dtypes package")
    return POLICIES[key]


def numpy_dtype(name: str):
    """The NumPy dtype that stores ``name`` on the host (bfloat16: ``ml_dtypes.bfloat16``)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def raw_bits(name: str, cupy: bool) -> bool:
    """Whether ``name`` is kept as raw uint16 bit patterns (bfloat16 on CuPy)."""
    return cupy and name == "bfloat16"


def storage_dtype(xp, name: str, cupy: bool):
    """The array dtype that holds a ``name`` window in namespace ``xp``."""
    if raw_bits(name, cupy):
        return xp.uint16
    if name == "bfloat16":
        return numpy_dtype(name)
    return getattr(xp, name)


def of_array(x, cupy: bool) -> Precision:
    """The policy of a stored array (a uint16 CuPy array is bfloat16 bit patterns)."""
    if cupy and np.dtype(x.dtype) == np.uint16:
        return POLICIES["bfloat16"]
    return of(x.dtype)
