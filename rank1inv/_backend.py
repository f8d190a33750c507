"""The backend line: the only module that names NumPy, SciPy or CuPy.

Everything above it is written against the array API standard through
``array_api_compat``. What the standard lacks lives here, once per backend:
triangular solves, the LinearOperator class, host transfers of small values and
the CuPy RawKernel dispatch.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import scipy.linalg

FLOAT_DTYPES = ("float32", "float64")


def namespace(*arrays):
    """The array namespace shared by ``arrays``; TypeError if they mix backends."""
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as err:
        raise TypeError(
            "arrays from different array libraries were mixed "
            f"({', '.join(sorted({type(a).__module__ + '.' + type(a).__name__ for a in arrays}))}); "
            "pass all arrays from one library (NumPy or CuPy)"
        ) from err


def namespace_from_argument(xp):
    """Resolve the ``xp=`` argument (None, a module, or a compat namespace)."""
    if xp is None:
        return array_api_compat.array_namespace(np.empty(0))
    name = getattr(xp, "__name__", "")
    if name in ("numpy", "array_api_compat.numpy"):
        return array_api_compat.array_namespace(np.empty(0))
    if name in ("cupy", "array_api_compat.cupy"):
        import cupy

        return array_api_compat.array_namespace(cupy.empty(0))
    raise TypeError(f"xp must be None, numpy or cupy, not {xp!r}")


def is_cupy(xp) -> bool:
    return array_api_compat.is_cupy_namespace(xp)


def is_array(x) -> bool:
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, (int, float))


def device(x):
    return array_api_compat.device(x)


def dtype_name(dtype) -> str:
    """'float32', 'float64', ... for a NumPy/CuPy dtype, scalar type or string."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1]).name


def to_host(x) -> np.ndarray:
    """A NumPy copy of a (small) array, from any backend."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def all_finite(xp, x) -> bool:
    return bool(xp.all(xp.isfinite(x)))


# --------------------------------------------------------------------------- linear algebra
def cholesky(xp, a):
    """Lower Cholesky factor of a (batched) SPD float64 matrix; ValueError if not SPD."""
    try:
        c = xp.linalg.cholesky(a)
    except Exception as err:  # numpy.linalg.LinAlgError, cupy's
        raise ValueError(
            "the damped Gram matrix is not numerically positive definite "
            "(damp too small for the scale of the gradients?)"
        ) from err
    if not all_finite(xp, c):  # cuSOLVER reports failure as NaNs; inf input gives NaNs too
        raise ValueError(
            "the damped Gram matrix is not numerically positive definite or not finite "
            "(gradients so large that their inner products overflow float64?)"
        )
    return c


def solve_triangular(xp, a, b, *, lower: bool, trans: bool = False, unit_diagonal: bool = False):
    """Solve ``a x = b`` (or ``aᵀ x = b``) for triangular ``a``; leading batch dims allowed.

    A batch of at least 4× more systems than each has unknowns (block-diagonal layouts with
    many small blocks) is solved by substitution across the whole batch, m array steps instead
    of one library call per system (measured faster on NumPy from about that ratio on)."""
    if a.ndim == 3 and a.shape[0] >= 4 * a.shape[-1]:
        return _substitution(xp, a, b, lower=lower != trans, trans=trans, unit_diagonal=unit_diagonal)
    if is_cupy(xp):
        from cupyx.scipy.linalg import solve_triangular as st

        if a.ndim == 2:
            return st(a, b, lower=lower, trans=int(trans), unit_diagonal=unit_diagonal)
        out = xp.empty_like(b)
        for i in range(a.shape[0]):
            out[i, ...] = st(a[i, ...], b[i, ...], lower=lower, trans=int(trans), unit_diagonal=unit_diagonal)
        return out
    return scipy.linalg.solve_triangular(
        a, b, lower=lower, trans=int(trans), unit_diagonal=unit_diagonal, check_finite=False
    )


def _substitution(xp, a, b, *, lower: bool, trans: bool, unit_diagonal: bool):
    """x with op(a) x = b for a batch a (nb, m, m), b (nb, m, k), op(a) = aᵀ if ``trans``;
    ``lower`` says whether op(a) is lower triangular. Row by row (dot-product form), the same
    operations as LAPACK's unblocked substitution, for all systems at once."""
    t = xp.matrix_transpose(a) if trans else a
    m = t.shape[-1]
    x = xp.zeros(b.shape, dtype=xp.result_type(t.dtype, b.dtype), device=device(b))
    for i in range(m) if lower else range(m - 1, -1, -1):
        done = slice(0, i) if lower else slice(i + 1, m)
        xi = b[:, i : i + 1, :] - t[:, i : i + 1, done] @ x[:, done, :]
        x[:, i : i + 1, :] = xi if unit_diagonal else xi / t[:, i : i + 1, i : i + 1]
    return x


def column_sumsq(xp, t):
    """Σ_i t[b, i, j]² for t (nb, r, c): shape (nb, c), one pass (einsum on NumPy)."""
    if is_cupy(xp):
        return xp.sum(t * t, axis=1)
    return np.einsum("bij,bij->bj", t, t)


def cho_solve(xp, c, b):
    """Solve ``(c cᵀ) x = b`` with a lower Cholesky factor ``c`` (batched)."""
    y = solve_triangular(xp, c, b, lower=True)
    return solve_triangular(xp, c, y, lower=True, trans=True)


# --------------------------------------------------------------------------- operator export
def linear_operator(xp, shape, dtype, matvec, matmat):
    """A symmetric SciPy (NumPy data) or cupyx (CuPy data) LinearOperator."""
    if is_cupy(xp):
        from cupyx.scipy.sparse.linalg import LinearOperator
    else:
        from scipy.sparse.linalg import LinearOperator
    return LinearOperator(
        shape,
        matvec=matvec,
        rmatvec=matvec,
        matmat=matmat,
        rmatmat=matmat,
        dtype=np.dtype(dtype_name(dtype)),
    )


# --------------------------------------------------------------------------- kernels
def kernels(xp):
    """The compiled pass kernels for ``xp``: the CuPy RawKernels, the optional CPU extension for
    NumPy, or None. Each offers ``usable(Gg, k)``, ``project(Gg, X)`` and ``combine(Gg, X, C, a, b)``
    on groups Gg (nb, m, B) (see ``_passes``)."""
    if is_cupy(xp):
        from .cuda import kernels as k

        return k
    from . import cpu

    return cpu if cpu.available() else None
