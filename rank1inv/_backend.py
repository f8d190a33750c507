"""The backend line: the only module that dispatches on the array library (NumPy/SciPy or
CuPy) for what the array API standard lacks.

Everything above it is written against the array API standard through ``array_api_compat``
(``rank1inv.cpu``/``rank1inv.cuda`` hold the compiled kernels, ``_precision`` the dtype
policy; both are below this line too). What the standard lacks lives here, once per backend:
triangular solves, the LinearOperator class, host transfers of small values, decoding of
16-bit storage and the kernel dispatch. Dask arrays are the d-long *data* of operators over
a Dask G (``dask_namespace``; ``ldexp`` and ``cast_result`` map over their chunks; docs/design.md
§13). Arrays of other libraries (torch, JAX) are refused at the public entry points with a
TypeError that names the adapter to use (``foreign_array_message``); see docs/design.md §5.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import array_api_compat
import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from . import _precision, cpu
from ._protocols import Kernels

_ADAPTERS = {
    "torch": "rank1inv.adapters.torch.to_array(tensor)",
    "jax": "rank1inv.adapters.jax.to_array(array)",
}


def _numpy_namespace():
    return array_api_compat.array_namespace(np.empty(0))


def _cupy_namespace():
    import cupy

    return array_api_compat.array_namespace(cupy.empty(0))


def _is_cupy_array(x) -> bool:
    return array_api_compat.is_cupy_array(x)


def namespace(*arrays):
    """The array namespace shared by ``arrays`` (NumPy or CuPy); TypeError if they mix
    libraries or come from another one. Works for every storage dtype (array_api_compat
    itself refuses ml_dtypes' bfloat16)."""
    kinds = set()
    for a in arrays:
        if isinstance(a, np.ndarray):
            kinds.add("numpy")
        elif _is_cupy_array(a):
            kinds.add("cupy")
        else:
            raise TypeError(foreign_array_message(a, "array"))
    if len(kinds) > 1:
        raise TypeError(
            "arrays from different array libraries were mixed (NumPy and CuPy); pass all arrays from one library"
        )
    return _cupy_namespace() if kinds == {"cupy"} else _numpy_namespace()


def foreign_array_message(x, name: str) -> str:
    """The TypeError text for an argument that is not a NumPy/CuPy array or a list."""
    lib = type(x).__module__.split(".")[0]
    where = f"{type(x).__module__}.{type(x).__name__}"
    if array_api_compat.is_torch_array(x):
        lib = "torch"
    elif array_api_compat.is_jax_array(x):
        lib = "jax"
    hint = _ADAPTERS.get(lib)
    if hint:
        return (
            f"{name} is a {where}; rank1inv operates on NumPy and CuPy arrays: convert it with {hint} "
            "(zero-copy through DLPack)"
        )
    return f"{name} must be a NumPy or CuPy array (or a nested list), not {where}"


def namespace_from_argument(xp):
    """Resolve the ``xp=`` argument (None, a module, or a compat namespace)."""
    if xp is None:
        return _numpy_namespace()
    name = getattr(xp, "__name__", "")
    if name in ("numpy", "array_api_compat.numpy"):
        return _numpy_namespace()
    if name in ("cupy", "array_api_compat.cupy"):
        return _cupy_namespace()
    raise TypeError(f"xp must be None, numpy or cupy, not {xp!r}")


def namespace_name(xp) -> str:
    """ "numpy" or "cupy" (what pickled objects keep instead of the namespace module)."""
    return "cupy" if is_cupy(xp) else "numpy"


def is_cupy(xp) -> bool:
    return array_api_compat.is_cupy_namespace(xp)


def is_array(x) -> bool:
    """A NumPy or CuPy array (any dtype)."""
    return isinstance(x, np.ndarray) or _is_cupy_array(x)


def is_dask_array(x) -> bool:
    """A Dask array (accepted by ``StaticInverse`` as gradients chunked along d, ``rank1inv.chunked``)."""
    return array_api_compat.is_dask_array(x)


@functools.cache
def dask_namespace():
    """The array-API namespace of Dask arrays: the *data* namespace of an operator over a Dask G
    (docs/design.md §13), whose m×m algebra runs in the namespace of G's chunks."""
    import dask.array

    return array_api_compat.array_namespace(dask.array.empty(0))


class Namespaces(NamedTuple):
    """The backend record of an operator's arrays (docs/design.md §13): ``data`` holds the d-long
    arrays (G, right-hand sides, products, diagonals), ``algebra`` the m×m work (Gram matrices,
    factors, coefficients). The same NumPy or CuPy namespace for in-memory G; Dask's and its
    chunks' namespace for a Dask G, so that no factor or coefficient is ever a lazy array."""

    data: object
    algebra: object


def namespaces(G) -> Namespaces:
    """The ``Namespaces`` of gradients G: a NumPy/CuPy array or a Dask array of their chunks
    (TypeError otherwise, naming the adapter for torch/JAX)."""
    if is_dask_array(G):
        return Namespaces(dask_namespace(), namespace(G._meta))
    xp = namespace(G)
    return Namespaces(xp, xp)


def is_foreign_array(x) -> bool:
    """An array of another library (torch, JAX, Dask, ...), which the public API refuses."""
    return not is_array(x) and (array_api_compat.is_array_api_obj(x) or hasattr(x, "__dlpack__"))


def device(x):
    return array_api_compat.device(x)


def dtype_name(dtype) -> str:
    """'float32', 'float64', 'bfloat16', ... for a NumPy/CuPy dtype, scalar type or string."""
    name = _precision.name_of(dtype)
    if name is not None:
        return name
    try:
        return np.dtype(dtype).name
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1]).name


def plain_float(xp, x) -> bool:
    """float32 or float64 (BLAS-able) storage, as opposed to 16-bit storage."""
    return x.dtype in (xp.float32, xp.float64)


def decode_into(xp, out, src):
    """out[...] = src as float64, for every storage dtype, exactly. On CuPy, bfloat16 bit
    patterns are widened by a shift, and float32 subnormals are decoded from their bits: CuPy
    compiles its kernels with -ftz=true, which would flush them to zero where the CPU keeps
    them (CPU/GPU parity; the pass kernels decode the same way)."""
    if is_cupy(xp) and src.dtype == xp.uint16:
        out[...] = (src.astype(xp.uint32) << 16).view(xp.float32)
    elif is_cupy(xp) and src.dtype == xp.float32:
        _decode_float32_cupy(out, src)
    else:
        out[...] = src


def _decode_float32_cupy(out, src):
    import cupy

    kernel = _float32_decoder()
    kernel(src.view(cupy.uint32), out)


@functools.cache
def _float32_decoder():
    import cupy

    return cupy.ElementwiseKernel(
        "uint32 u",
        "float64 y",
        """
        const unsigned e = (u >> 23) & 0xffu;
        const double v = e ? (double)__uint_as_float(u & 0x7fffffffu) : (double)(u & 0x7fffffu) * 1.401298464324817e-45;
        y = (u >> 31) ? -v : v;
        """,
        "rank1inv_decode_float32",
    )


def decoded(xp, a):
    """``a`` as an array of a standard float dtype: itself, or bfloat16 bits decoded (CuPy),
    or ml_dtypes values widened to float32 (NumPy). For small pieces (checks, reductions)."""
    if plain_float(xp, a) or a.dtype == xp.float16:
        return a
    if is_cupy(xp) and a.dtype == xp.uint16:
        return (a.astype(xp.uint32) << 16).view(xp.float32)
    return a.astype(np.float32)


def to_host(x) -> np.ndarray:
    """A NumPy copy of a (small) array, from any backend."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def device_scope(xp, anchor):
    """A context in which new arrays land on ``anchor``'s device: array-api-compat's CuPy
    ``zeros``/``empty``/``eye`` ignore ``device=`` and allocate on the current device, so every
    public entry point runs under this scope (a no-op on NumPy)."""
    if not is_cupy(xp) or anchor is None:
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(anchor.device.id)


def on_device(method):
    """Decorator: run a method of an object with ``_xp`` and ``_anchor()`` under its device, and
    under the object's ``_lock`` when it has one (a window: docs/guide.md, "Threads")."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        lock = self.__dict__.get("_lock")
        with lock if lock is not None else contextlib.nullcontext(), device_scope(self._xp, self._anchor()):
            return method(self, *args, **kwargs)

    return wrapper


def all_finite(xp, x) -> bool:
    return bool(xp.all(xp.isfinite(x)))


# --------------------------------------------------------------------------- linear algebra
def cholesky(xp, a):
    """Lower Cholesky factor of a (batched) SPD float64 matrix; ValueError if not SPD.

    On CuPy, cuSOLVER's failure code is checked (``cupyx.errstate(linalg="raise")``): with
    CuPy's default it is ignored and a failed factorisation can return a finite partial factor."""
    try:
        if is_cupy(xp):
            import cupyx

            with cupyx.errstate(linalg="raise"):
                c = xp.linalg.cholesky(a)
        else:
            c = xp.linalg.cholesky(a)
    except Exception as err:  # numpy.linalg.LinAlgError, cupy's
        raise ValueError(
            "the damped Gram matrix is not numerically positive definite "
            "(damp too small for the scale of the gradients?)"
        ) from err
    if not all_finite(xp, c):  # inf input gives NaNs
        raise ValueError(
            "the damped Gram matrix is not numerically positive definite or not finite "
            "(gradients so large that their inner products overflow float64?)"
        )
    return c


def pivot_condition(xp, factor, lower: bool) -> float:
    """max_i K_ii / L_ii² for a batch of triangular factors (nb, n, n) of K = LLᵀ (``lower``) or
    RᵀR: how much of each row's norm its elimination leaves, the inverse of the smallest relative
    pivot, a lower estimate of the condition of the equilibrated K (1.0 for none). Zero rows or
    decoupled directions count as well conditioned; near-duplicates do not. O(nb·n²)."""
    F = to_host(factor)
    if F.ndim == 2:
        F = F[None, ...]
    if F.size == 0 or F.shape[-1] == 0:
        return 1.0
    diag = np.abs(np.diagonal(F, axis1=-2, axis2=-1))
    norms = np.sum(F * F, axis=-1 if lower else -2)  # rows of L, columns of R: K's diagonal
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diag > 0, norms / (diag * diag), np.inf)
    return float(np.max(ratio))


def eigh(xp, a):
    """Eigenvalues (ascending) and eigenvectors of symmetric float64 matrices (nb, m, m). A batch
    of one goes to the 2-D solver: CuPy sends stacks to cuSOLVER's batched Jacobi method, slow
    beyond small m."""
    if a.ndim == 3 and a.shape[0] == 1:
        lam, Q = xp.linalg.eigh(a[0, ...])
        return lam[None, ...], Q[None, ...]
    return xp.linalg.eigh(a)


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


def sumsq(xp, X):
    """Σ_i X[b, i, j]² for X (nb, n, k): (nb, k), without an X-sized temporary on NumPy."""
    if is_cupy(xp):
        return xp.sum(X * X, axis=1)
    return np.einsum("bij,bij->bj", X, X)


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
        LinearOperator = scipy.sparse.linalg.LinearOperator
    return LinearOperator(
        shape,
        matvec=matvec,
        rmatvec=matvec,
        matmat=matmat,
        rmatmat=matmat,
        dtype=np.dtype(dtype_name(dtype)),
    )


# --------------------------------------------------------------------------- kernels
def kernels(xp) -> Kernels | None:
    """The compiled pass kernels for ``xp``: the CuPy RawKernels, the optional CPU extension for
    NumPy, or None. Each offers ``usable(Gg, k)``, ``project(Gg, X)`` and ``combine(Gg, X, C, a, b)``
    on groups Gg (nb, m, B) (see ``_passes``)."""
    if is_cupy(xp):
        from .cuda import kernels as k  # noqa: PLC0415 (it imports CuPy)

        return k
    return cpu if cpu.available() else None


# --------------------------------------------------------------------------- host → device
def pinned_empty(xp, shape, dtype):
    """A host NumPy array for staging copies to xp's device: page-locked on CuPy (so that the
    copy is asynchronous), ordinary memory on NumPy."""
    if is_cupy(xp):
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


class HostToDevice:
    """Copies of host buffers to device buffers that overlap the computation (docs/design.md §14).

    On CuPy, ``copy`` runs on its own non-blocking stream after a given event (the consumer of
    the destination is done with it) and records ``done``; the computation's stream waits for
    ``done`` (``compute_waits``) and records when it has used the buffer (``compute_done``);
    ``host_wait`` blocks the host until a copy has read its pinned source. On NumPy every call
    is synchronous (the mirror of the same protocol)."""

    def __init__(self, xp):
        self._cupy = is_cupy(xp)
        if self._cupy:
            import cupy

            self._cp = cupy
            self._stream = cupy.cuda.Stream(non_blocking=True)

    def event(self):
        return self._cp.cuda.Event(disable_timing=True) if self._cupy else None

    def copy(self, dst, src, after, done):
        """dst (device) ← src (host), once ``after`` has happened; ``done`` when finished."""
        if not self._cupy:
            np.copyto(dst, src)
            return
        self._stream.wait_event(after)
        dst.set(src, stream=self._stream)
        done.record(self._stream)

    def host_wait(self, event):
        if self._cupy:
            event.synchronize()

    def compute_waits(self, event):
        if self._cupy:
            self._cp.cuda.get_current_stream().wait_event(event)

    def compute_done(self, event):
        if self._cupy:
            event.record(self._cp.cuda.get_current_stream())


# --------------------------------------------------------------------------- pickling
class HoldsNamespace:
    """Base of every object that keeps an array namespace (a module, which pickle refuses):
    pickling and ``copy.deepcopy`` store the namespace by name and restore it on load, so
    operators can be saved, copied and sent to worker processes. Arrays are pickled by their
    own library (CuPy arrays come back on the current device)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        if "_lock" in state:  # a lock is per object: a copy gets its own
            state["_lock"] = _NewLock()
        for key, value in state.items():
            if isinstance(value, type(np)) and (
                array_api_compat.is_numpy_namespace(value) or array_api_compat.is_cupy_namespace(value)
            ):
                state[key] = _NamespaceName(namespace_name(value))
        return state

    def __setstate__(self, state):
        for key, value in state.items():
            if isinstance(value, _NamespaceName):
                state[key] = namespace_from_argument(__import__(value.name))
            elif isinstance(value, _NewLock):
                state[key] = threading.RLock()
        self.__dict__.update(state)


class _NewLock:
    """A lock, pickled as "make a new one"."""


class _NamespaceName:
    """A namespace, pickled by name."""

    def __init__(self, name: str):
        self.name = name


# --------------------------------------------------------------------------- powers of two
def frexp_exponent(xp, a):
    """The integer exponents e of a = f·2^e (0.5 ≤ |f| < 1; 0 for a = 0), elementwise, on a's
    device (NumPy/CuPy ``frexp``; the array API has none)."""
    lib = _library(xp)
    return lib.frexp(a)[1]


def ldexp(xp, a, e, out=None):
    """a·2^e elementwise (one rounding, exact unless the result is subnormal), into ``out`` if
    given (it may be a). An overflow gives inf silently: the callers check their results
    (``cast_result``)."""
    if is_dask_array(a):  # lazy d-long data: chunk by chunk, no ``out`` (Dask arrays are immutable)
        return a.map_blocks(_ldexp_chunk, e=e, dtype=a.dtype)
    lib = _library(xp)
    if lib is np:
        with np.errstate(over="ignore", under="ignore"):
            scale = _power_of_two(a.dtype, e)
            if scale is not None:
                return np.multiply(a, scale, out=out)
            return np.ldexp(a, e, out=out)
    return lib.ldexp(a, e, out=out)


def _power_of_two(dtype, e):
    """2^e in ``dtype`` where every 2^e is a normal number of that dtype (else None): a·2^e is
    then one multiplication, rounded once as ldexp rounds, so the same bits; NumPy's ldexp is a
    scalar loop, 10 ms against 0.5 ms for 2·10⁶ float64 values on the 2-vCPU AMD EPYC VM
    (docs/benchmarks.md)."""
    if not np.issubdtype(dtype, np.floating):
        return None
    e = np.asarray(e)
    info = np.finfo(dtype)
    if e.size == 0 or not np.issubdtype(e.dtype, np.integer) or e.min() < info.minexp or e.max() >= info.maxexp:
        return None
    return np.ldexp(np.ones((), dtype), e)


def matmul(xp, a, b, out=None):
    """a @ b (batched), into ``out`` if given (NumPy's and CuPy's matmul; no temporary)."""
    return _library(xp).matmul(a, b, out=out)


def _ldexp_chunk(a, e):
    xp = namespace(a)
    return ldexp(xp, a, xp.asarray(e, device=device(a)))


def _library(xp):
    if is_cupy(xp):
        import cupy

        return cupy
    return np


def cast_result(xp, y, dtype, what: str):
    """``y`` (float64) as ``dtype``; OverflowError when a value does not fit (a silent inf would
    be a wrong answer). One scalar read back. For a Dask ``y`` the result is lazy and the check
    runs with each chunk: the OverflowError is raised when the result is computed."""
    if is_dask_array(y):
        return y.map_blocks(_cast_chunk, dtype=np.dtype(dtype_name(dtype)), cast_to=dtype_name(dtype), what=what)
    with np.errstate(over="ignore", invalid="ignore"):
        out = xp.astype(y, dtype)
    if not all_finite(xp, out):
        name = dtype_name(dtype)
        if all_finite(xp, y):
            raise OverflowError(
                f"{what} exceeds the {name} range of the result; pass float64 input for a float64 result"
            )
        raise OverflowError(
            f"{what} is not representable in {name}: it has non-finite values (beyond the float64 range, or nan "
            "or inf in the gradients: were they modified, or a memory map's file changed, after construction?)"
        )
    return out


def _cast_chunk(y, cast_to: str, what: str):
    xp = namespace(y)
    return cast_result(xp, y, getattr(xp, cast_to), what)


def encode(xp, x, storage: str):
    """x rounded to the storage dtype ``storage`` (a new array), round to nearest even. float64
    values go to the 16-bit dtypes through float32 (two roundings, on every backend alike);
    bfloat16 on CuPy becomes bit patterns (uint16)."""
    target = _precision.storage_dtype(xp, storage, is_cupy(xp))
    if is_cupy(xp) and x.dtype == xp.uint16 and storage != "bfloat16":
        x = decoded(xp, x)  # bfloat16 bit patterns into another storage dtype
    if storage in ("bfloat16", "float16") and x.dtype == xp.float64:
        x = x.astype(xp.float32)
    if is_cupy(xp) and storage == "bfloat16":
        if x.dtype == xp.uint16:
            return x.copy()
        bits = x.astype(xp.float32).view(xp.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(xp.uint16)
    return x.astype(target, copy=True)


def as_rng(xp, rng):
    """A random generator for xp's arrays: ``rng`` itself if it is a ``numpy.random.Generator``
    (or, on CuPy, a ``cupy.random.Generator``), else a new one seeded by ``rng`` (None or an
    int); TypeError otherwise."""
    if isinstance(rng, np.random.Generator):
        return rng
    if is_cupy(xp):
        import cupy

        if isinstance(rng, cupy.random.Generator):
            return rng
    if isinstance(rng, bool) or not (rng is None or isinstance(rng, (int, np.integer))):
        raise TypeError(f"rng must be None, an int seed or a random Generator, not {type(rng).__name__}")
    if is_cupy(xp):
        import cupy

        return cupy.random.default_rng(rng)
    return np.random.default_rng(rng)


def standard_normal(xp, rng, shape, anchor):
    """float64 standard normals of ``shape`` in xp on ``anchor``'s device, from a generator of
    ``as_rng`` (a NumPy one on CuPy data draws on the host)."""
    z = rng.standard_normal(shape, dtype=np.float64)
    if is_cupy(xp) and isinstance(z, np.ndarray):
        return xp.asarray(z, device=device(anchor))
    return z
