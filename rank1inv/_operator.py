"""The shared query API of StaticInverse and DynamicInverse, and the LinearOperator exports.

An operator is a block-diagonal layout (``rank1inv._blocks``) whose runs of equal blocks are
each served by a *group* (``rank1inv._protocols.Group``: ``groups.woodbury.WoodburyGroup`` or
``groups.dense.DenseGroup``). This module maps the public queries (products, diagonal, entries,
submatrices) onto the groups; it never touches the gradients itself.

Every right-hand side is normalized block by block and column by column (max|x| in
[0.5, 1)) before it reaches a group, and every value a group returns is scaled back by a
power of two at the end (docs/design.md §4): results are invariant under scaling of the inputs
by powers of two over the whole floating-point range, and a result that does not fit the
output dtype raises OverflowError instead of returning inf.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _backend, _checks, _comm, _precision
from ._blocks import Layout
from ._passes import tile_budget
from ._protocols import Array, Group
from .groups.prior import NO_POWER

DENSE_LIMIT = 4096
SAMPLE_CHUNK = 8  # samples per pass over G in ``sample`` (the compiled CPU passes take up to 8 vectors)


def may_overflow(max_x: float, dim: int, damp: float, dtype) -> bool:
    """Whether F⁻¹x might not fit ``dtype``: ‖F⁻¹x‖_∞ ≤ ‖F⁻¹‖₂‖x‖₂ ≤ √d·max|x|/λ (λ the
    smallest damping). A bound every rank of a sharded operator computes alike, so only the
    products it cannot clear agree on their outcome with one more collective (§12)."""
    limit = float(np.finfo(np.dtype(_backend.dtype_name(dtype))).max)
    with np.errstate(over="ignore", divide="ignore"):
        return not (math.sqrt(dim) * float(max_x) / float(damp) <= 0.25 * limit)


def scaled_diagonal(xp, values, exponent, count: int):
    """values (count·B,) of a group times 2^exponent, for an int exponent or one per block
    ((count, 1, 1), as ``groups.woodbury.WoodburyGroup.fisher_exponent`` when blocks' frames differ)."""
    if isinstance(exponent, (int, np.integer)):
        return _backend.ldexp(xp, values, exponent)
    e = xp.asarray(np.reshape(exponent, (count, 1)), device=_backend.device(values))
    return xp.reshape(_backend.ldexp(xp, xp.reshape(values, (count, -1)), e), (-1,))


class Variants:
    """Constructors that pick a variant: a public class (``StaticInverse``, ``DynamicInverse``)
    declares ``_variants = []``, and each subclass that serves some arguments registers itself
    with a predicate, ``class ShardedInverse(StaticInverse, serves=lambda args, kwargs: ...)``
    (docs/design.md §2). Constructing the public class then makes the first variant whose
    predicate accepts the arguments (the base itself if none does). The base never names a
    variant: registration happens when the variant's module is imported (``rank1inv`` imports
    them all)."""

    _variants: list = []

    def __init_subclass__(cls, serves=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if serves is not None:
            public = next(b for b in cls.__mro__[1:] if "_variants" in b.__dict__ and b is not Variants)
            public._variants.append((serves, cls))

    def __new__(cls, *args, **kwargs):
        if "_variants" in cls.__dict__:  # the public class: the first variant that serves these arguments
            for serves, variant in cls._variants:
                if serves(args, kwargs):
                    return super().__new__(variant)
        return super().__new__(cls)


def argument(args, kwargs, name: str, position: int):
    """The constructor argument ``name`` (at ``position``), for the predicates of ``Variants``."""
    return args[position] if len(args) > position else kwargs.get(name)


class _BlockOperator(_backend.HoldsNamespace):
    """Products with a symmetric block-diagonal operator, shape (d, d). Subclasses define
    ``_groups()`` and ``_group_product``."""

    # NumPy defers ``ndarray @ op`` to ``op.__rmatmul__`` (as for scipy's LinearOperator)
    __array_ufunc__ = None

    # set by subclasses
    _xp: Any = None  # the array namespace
    _dim = 0
    _dtype = "float32"  # the output dtype name (the policy's output for the storage dtype)
    _damp: Any  # a float, a tuple of one per block, or a host array (one per coordinate)
    _layout: Layout

    def _groups(self) -> list[Group]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _group_product(self, group: Group, X: Array) -> tuple[Array, Any]:  # pragma: no cover - abstract
        """(values, exponent) of the operator's product with X for one group."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        """(d, d)."""
        return (self._dim, self._dim)

    @property
    def ndim(self) -> int:
        """2 (a matrix)."""
        return 2

    @property
    def dtype(self):
        """dtype of query results: float64 for float64 storage, float32 otherwise (float32 and
        16-bit storage); a float64 x promotes its product to float64."""
        return getattr(self._xp, self._dtype)

    @property
    def damp(self) -> float:
        """λ in F = λI + s·GᵀG."""
        return self._damp

    @property
    def namespace(self):
        """The array-API namespace of the operator's data (``array_api_compat`` NumPy or CuPy)."""
        return self._xp

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Lengths of the diagonal blocks (one entry, d, for the full matrix)."""
        return self._layout.block_sizes

    def _rhs(self, x, name: str):
        """x as a new (d, k) float64 array, plus whether it was 1-D and the output dtype."""
        xp = self._xp
        x = _checks.as_array(x, name, xp)
        _checks.same_backend(xp, x, name, "this operator")
        out_dtype = self._rhs_dtype(x, name)
        X = xp.empty((x.shape[0], 1) if x.ndim == 1 else tuple(x.shape), dtype=xp.float64, device=_backend.device(x))
        _backend.decode_into(xp, X, x[:, None] if x.ndim == 1 else x)
        return X, x.ndim == 1, out_dtype

    def _rhs_dtype(self, x, name: str):
        """The output dtype of a product with x (any array library), after checking x's shape
        ((d,) or (d, k)) and dtype (a storage dtype, an integer or bool)."""
        if x.ndim not in (1, 2) or x.shape[0] != self._dim:
            raise ValueError(f"{name} must have shape ({self._dim},) or ({self._dim}, k), got {tuple(x.shape)}")
        kind = _precision.name_of(x.dtype)
        if kind is None and x.dtype != np.bool_ and not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{name} must be real floating point or integer, got {x.dtype}")
        return self._xp.float64 if (kind == "float64" or self._dtype == "float64") else self.dtype

    def _apply64(self, X, name: str = "x"):
        """Operator times X (d, k) float64 → (d, k) float64, one batch per run of blocks, each
        block and column normalized by a power of two on the way in and scaled back on the way
        out. X is consumed: it is normalized in place and the groups may write into it, so a
        product costs no d-long float64 array beyond X itself on the compiled paths. ValueError
        if X has a non-finite value."""
        xp, dx = self._xp, self._data
        k = X.shape[1]
        out = None
        for run, grp in zip(self._layout.runs, self._groups()):
            part = dx.reshape(X[run.start : run.stop, :], (run.count, run.size, k))
            top = self._global_max(dx.maximum(dx.max(part, axis=1), -dx.min(part, axis=1)))  # max|x|
            if not _backend.all_finite(xp, top):
                raise ValueError(f"{name} contains non-finite values (nan or inf)")
            e = _backend.frexp_exponent(xp, top)[:, None, :]  # (count, 1, k)
            part = _backend.ldexp(xp, part, -e, out=part)
            values, exponent = self._group_product(grp, part)
            values = _backend.ldexp(xp, values, e + exponent, out=values)
            if len(self._layout.runs) == 1:
                return dx.reshape(values, (self._dim, k))
            out = X if out is None else out
            out[run.start : run.stop, :] = xp.reshape(values, (-1, k))
        return out

    def _global_max(self, top):
        """max|x| per block and column over every shard of x (the identity unless sharded), in
        the algebra namespace (computed, for lazy data)."""
        return top

    @property
    def _data(self):
        """The namespace of the d-long arrays (x, products, diagonals): the algebra namespace
        ``_xp`` itself, except over a Dask G (docs/design.md §13)."""
        return self._xp

    def matmat(self, X):
        """Operator times X of shape (d, k) → (d, k). O(dmk): passes over G are shared by all k
        columns (up to 8 per pass in the compiled CPU kernels)."""
        if getattr(X, "ndim", 2) != 2:
            raise ValueError(f"matmat expects a 2-D array, got shape {tuple(X.shape)}")
        return self._product(X, "X")

    def matvec(self, x):
        """Operator times x of shape (d,) (or (d, 1)) → same shape."""
        if getattr(x, "ndim", 1) == 2 and x.shape[1] != 1:
            raise ValueError(f"matvec expects shape ({self._dim},) or ({self._dim}, 1), got {tuple(x.shape)}")
        return self._product(x, "x")

    @_backend.on_device
    def _product(self, x, name):
        X, was_1d, out_dtype = self._rhs(x, name)
        Y = _backend.cast_result(self._xp, self._apply64(X, name), out_dtype, "the product")
        return Y[:, 0] if was_1d else Y

    def __matmul__(self, x):
        """``op @ x``: the product with x of shape (d,) or (d, k), as ``matvec``/``matmat``."""
        return self._product(x, "x")

    def __rmatmul__(self, x):
        """``x @ op`` = (op @ xᵀ)ᵀ (the operator is symmetric), for x of shape (d,) or (k, d)."""
        dx = self._data
        if not _backend.is_dask_array(x):
            x = _checks.as_array(x, "x", self._xp)
            dx = self._xp
        if x.ndim == 2:
            return dx.matrix_transpose(self._product(dx.matrix_transpose(x), "x"))
        return self._product(x, "x")

    def aslinearoperator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (NumPy data) or
        ``cupyx.scipy.sparse.linalg.LinearOperator`` (CuPy data); symmetric, rmatvec = matvec."""
        return _backend.linear_operator(self._xp, self.shape, self.dtype, self.matvec, self.matmat)

    def to_dense(self, max_dim: int = DENSE_LIMIT):
        """The d×d matrix (op.dtype): one product with the identity, O(d²m); refused (ValueError)
        when d > max_dim. Over shards, this rank's rows (d_local, d); over a Dask G, a lazy
        array."""
        d = self.global_dim
        if d > max_dim:
            raise ValueError(
                f"to_dense would build a {d}×{d} matrix; dimension exceeds max_dim={max_dim} "
                "(pass a larger max_dim to force it)"
            )
        Y = self._product(self._identity(), "the identity")
        return Y if _backend.is_dask_array(Y) else _backend.cast_result(self._xp, Y, self.dtype, "the matrix")

    @property
    def global_dim(self) -> int:
        """d over all ranks (d itself unless the operator is sharded along d)."""
        return self._dim

    def _identity(self):
        """The columns e_1 … e_d as this operator's right-hand sides, float64: (d, d), or this
        rank's rows of them over shards."""
        xp, anchor = self._xp, self._anchor()
        with _backend.device_scope(xp, anchor):
            return xp.eye(self._dim, dtype=xp.float64, device=None if anchor is None else _backend.device(anchor))

    def _anchor(self):
        """An array on the operator's device (for allocations)."""
        raise NotImplementedError  # pragma: no cover


class InverseOperator(_BlockOperator):
    """F⁻¹ for F = λI + s·GᵀG (block-diagonal if a block layout is set). Shared query API."""

    def _group_product(self, group, X):
        return group.apply(X), group.inverse_exponent

    @_backend.on_device
    def diag(self, indices=None):
        """Diagonal of F⁻¹: shape (d,), or (len(indices),) for selected indices; op.dtype.

        Full diagonal: O(dm²) once (‖L⁻¹g_j‖² tile by tile, W = L⁻¹G not stored), then cached
        (d floats). Selected indices: O(m) each after the cached whitening of ``entries``.
        Coordinates beyond the conditioning where the diagonal has digits left are returned as
        their lower bound 1/F_jj with an AccuracyWarning (docs/numerics.md).
        """
        xp = self._xp
        if indices is not None:
            idx = _checks.indices(xp, indices, self._dim, "indices")
            return self._entries64(idx, idx, out_dtype=self.dtype)
        parts = [_backend.ldexp(xp, grp.diag(), grp.inverse_exponent) for grp in self._groups()]
        d = parts[0] if len(parts) == 1 else xp.concat(parts)
        return _backend.cast_result(xp, d, self.dtype, "the diagonal")

    @_backend.on_device
    def entries(self, rows, cols):
        """Vector of F⁻¹[rows[t], cols[t]], shape (n,), op.dtype. O(m) per entry after the
        cached whitening W = L⁻¹G (O(dm²) once, 8·d·m bytes; above 2 GiB no cache and O(m²) per
        index instead), zero across blocks."""
        xp = self._xp
        r = _checks.indices(xp, rows, self._dim, "rows")
        c = _checks.indices(xp, cols, self._dim, "cols")
        if r.shape != c.shape:
            raise ValueError(f"rows and cols must have the same length, got {r.shape[0]} and {c.shape[0]}")
        return self._entries64(r, c, out_dtype=self.dtype)

    def _entries64(self, r, c, out_dtype):
        xp = self._xp
        n = r.shape[0]
        out = xp.zeros((n,), dtype=xp.float64, device=_backend.device(r))
        if n == 0:
            return xp.astype(out, out_dtype)
        groups = self._groups()
        run_r, off_r, blk_r = self._layout.locate(xp, r)
        run_c, off_c, blk_c = self._layout.locate(xp, c)
        same = (run_r == run_c) & (blk_r == blk_c)
        chunk = max(1, tile_budget(xp) // max(1, self._width()))
        for g, grp in enumerate(groups):
            pos = xp.nonzero(same & (run_r == g))[0]
            for p0 in range(0, pos.shape[0], chunk):
                p = pos[p0 : p0 + chunk]
                out[p] = _backend.ldexp(xp, grp.pairs(xp.take(off_r, p), xp.take(off_c, p)), grp.inverse_exponent)
        return _backend.cast_result(xp, out, out_dtype, "the entries")

    @_backend.on_device
    def column(self, j):
        """F⁻¹e_j, shape (d,), op.dtype. Cost of one product, O(dm)."""
        xp = self._xp
        idx = _checks.indices(xp, j, self._dim, "j")
        if idx.shape[0] != 1:
            raise ValueError("column takes a single index")
        e = xp.zeros((self._dim, 1), dtype=xp.float64, device=_backend.device(idx))
        e[idx, :] = 1.0
        return _backend.cast_result(xp, self._apply64(e)[:, 0], self.dtype, "the column")

    @_backend.on_device
    def submatrix(self, indices):
        """Dense F⁻¹[indices][:, indices], shape (k, k), op.dtype. O(k²m) after the cached whitening."""
        xp = self._xp
        idx = _checks.indices(xp, indices, self._dim, "indices")
        k = idx.shape[0]
        out = xp.zeros((k, k), dtype=xp.float64, device=_backend.device(idx))
        run, off, _ = self._layout.locate(xp, idx)
        for g, grp in enumerate(self._groups()):
            pos = xp.nonzero(run == g)[0]
            if pos.shape[0]:
                o = xp.take(off, pos)
                out[pos[:, None], pos[None, :]] = _backend.ldexp(xp, grp.cross(o, o), grp.inverse_exponent)
        return _backend.cast_result(xp, out, self.dtype, "the submatrix")

    @_backend.on_device
    def logdet(self) -> float:
        """log det F (a Python float), from the factors: O(m) per block after construction."""
        return math.fsum(self.block_logdets().tolist())

    @_backend.on_device
    def block_logdets(self):
        """log det F_b for every diagonal block, in block order: a NumPy float64 array
        (len(block_sizes),). O(m) per block after construction."""
        return np.concatenate([np.asarray(grp.logdets(), dtype=np.float64) for grp in self._groups()])

    def fisher(self):
        """An operator for F itself (same layout): products, diag, to_dense, aslinearoperator."""
        return FisherOperator(self)

    # -- across ranks: identities here, collectives on operators sharded along d (§12) -------
    @property
    def communicator(self) -> _comm.Communicator | None:
        """The Communicator of an operator sharded along d (``rank1inv.sharded``); None here."""
        return None

    def _agreement(self, what: str, *names: str):
        """A context for a call's local validation: on a sharded operator every rank agrees on
        success (and on ``names``) before any other collective (``_comm.agreement``)."""
        return _comm.agreement(self.communicator, what, *names)

    def _sum_over_ranks(self, a):
        """Host float64 ``a`` summed over the ranks (``a`` itself on one process)."""
        return np.asarray(a, dtype=np.float64)

    def _max_over_ranks(self, a):
        """Host float64 ``a``'s elementwise max over the ranks (``a`` itself on one process)."""
        return np.asarray(a, dtype=np.float64)

    def _width(self) -> int:
        return 1

    def _gradient_count(self) -> int:
        """How many gradients the groups hold (the rank of GᵀG at most)."""
        return self._width()

    # -- Laplace: samples and spectrum (docs/design.md §10) ---------------------------------
    @property
    def noise_dim(self) -> int:
        """Length of the standard-normal vector that ``sample_from_noise`` maps to one sample:
        d, plus m for every block wider than m (the Woodbury blocks)."""
        return self._dim + sum(grp.count * grp.noise_width for grp in self._groups())

    @_backend.on_device
    def sample_from_noise(self, z):
        """The documented map from standard normals to exact draws from N(0, F⁻¹).

        z has shape (noise_dim,) or (n, noise_dim); the result (d,) or (n, d), op.dtype. z[:d]
        is one value per coordinate (z₁); then, for each block wider than m in order, m values
        (z₂, one per gradient slot). Per block, with K = GGᵀ + (λ/s)I:

            Woodbury block: x = λ^(-1/2)·(z₁ − GᵀK⁻¹(G z₁ − √(λ/s)·z₂)) = F⁻¹(√λ z₁ + √s Gᵀz₂)
            dense block:    x = C⁻ᵀ z₁,  F_b = C Cᵀ (Cholesky)

        both linear maps M with M Mᵀ = F_b⁻¹. Cost: two passes over G per n ≤ 8 samples
        (Woodbury), O(B²) per sample (dense); float64 accumulation."""
        xp = self._xp
        z = _checks.as_array(z, "z", xp)
        _checks.same_backend(xp, z, "z", "this operator")
        n_dim = self.noise_dim
        if z.ndim not in (1, 2) or z.shape[-1] != n_dim:
            raise ValueError(f"z must have shape ({n_dim},) or (n, {n_dim}), got {tuple(z.shape)}")
        if not (xp.isdtype(z.dtype, "real floating") or xp.isdtype(z.dtype, "integral")):
            raise TypeError(f"z must be real (standard normals), got {z.dtype}")
        Z = xp.asarray(xp.matrix_transpose(z) if z.ndim == 2 else z[:, None], dtype=xp.float64, copy=True)
        if not _backend.all_finite(xp, Z):
            raise ValueError("z contains non-finite values (nan or inf)")
        k = Z.shape[1]
        out = xp.empty((self._dim, k), dtype=xp.float64, device=_backend.device(Z))
        extra = self._dim
        for run, grp in zip(self._layout.runs, self._groups()):
            Z1 = xp.reshape(Z[run.start : run.stop, :], (run.count, run.size, k))
            width = grp.noise_width
            Z2 = xp.reshape(Z[extra : extra + run.count * width, :], (run.count, width, k))
            extra += run.count * width
            values, e = grp.sample(Z1, Z2)
            out[run.start : run.stop, :] = xp.reshape(_backend.ldexp(xp, values, e), (-1, k))
        Y = _backend.cast_result(xp, out, self.dtype, "the sample")
        return Y[:, 0] if z.ndim == 1 else xp.matrix_transpose(Y)

    @_backend.on_device
    def sample(self, size=None, *, rng=None):
        """Exact draws from N(0, F⁻¹): shape (d,) for size=None, else (size, d); op.dtype.

        ``rng``: None, a seed, or a ``numpy.random.Generator`` (NumPy data; on CuPy the draws
        are then copied to the device) or ``cupy.random.Generator`` (CuPy data). The draws are
        ``sample_from_noise`` of ``noise_dim`` standard normals per sample, ``SAMPLE_CHUNK`` samples
        at a time (extra memory O(SAMPLE_CHUNK·d) beyond the result). O(dm) per sample."""
        n = 1 if size is None else _checks.positive_int(size, "size")
        xp = self._xp
        rng = _backend.as_rng(xp, rng)
        out = xp.empty((n, self._dim), dtype=self.dtype, device=_backend.device(self._anchor()))
        for a in range(0, n, SAMPLE_CHUNK):  # same stream as one draw of (n, noise_dim)
            b = min(n, a + SAMPLE_CHUNK)
            out[a:b, :] = self.sample_from_noise(_backend.standard_normal(xp, rng, (b - a, self.noise_dim), out))
        return out[0, :] if size is None else out

    def eigenvalues(self):
        """The eigenvalues of F other than the copies of λ_b that the structure guarantees: per
        block λ_b + s·eig(G_bᵀG_b) for its min(m, B) largest (as many as the window holds), so
        d − Σ_b min(m_b, B) copies of λ are left out. Descending, a NumPy float64 array.
        O(m³) per block once (``gram_spectra``)."""
        if isinstance(self.damp, np.ndarray):
            raise ValueError("eigenvalues() needs one damping value per block, not per coordinate")
        count = self._gradient_count()
        damps = self.damp if isinstance(self.damp, tuple) else (self.damp,) * len(self.block_sizes)
        parts = [lam + S[: min(S.shape[0], count)] for S, lam in zip(self.gram_spectra(), damps)]
        return np.sort(np.concatenate(parts))[::-1]

    @_backend.on_device
    def gram_spectra(self) -> list:
        """For every diagonal block, in block order, the eigenvalues of s·G_bᵀG_b that can be
        nonzero (min(m, B) of them; those of a window's empty slots are 0): a list of NumPy
        float64 arrays, descending. With them log det F_b(λ) = B·log λ + Σ log1p(s·Λ_i/λ) for any
        λ in O(m) (``rank1inv.laplace.tune_damp``). O(m³) per block once, cached."""
        out: list[np.ndarray] = []
        for grp in self._groups():
            out.extend(np.asarray(row) for row in grp.gram_spectrum())
        return out

    def power(self, p):
        """F^p as an operator (same layout): products ``@``/matvec/matmat, to_dense,
        aslinearoperator. p real (e.g. −1, −1/2, 1/2, 2); ``power(-0.5) @ z`` for z ~ N(0, I_d) is
        another exact sampler. From the eigendecomposition of each block's Gram matrix (O(m³) per
        block, cached), then two passes over G per product. A vector in the span of the
        gradients is not corrected for cancellation as the products of F⁻¹ are
        (docs/numerics.md)."""
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(float(p)):
            raise TypeError(f"p must be a finite real number, got {p!r}")
        if isinstance(self.damp, np.ndarray):
            raise ValueError(NO_POWER)
        return PowerOperator(self, float(p))


class _DerivedOperator(_BlockOperator):
    """An operator that shares the groups, layout and normalization of an InverseOperator."""

    def __init__(self, inverse: InverseOperator):
        self._inverse_op = inverse
        self._xp, self._dim, self._dtype = inverse._xp, inverse._dim, inverse._dtype
        self._damp, self._layout = inverse._damp, inverse._layout

    def _groups(self):
        return self._inverse_op._groups()

    def _anchor(self):
        return self._inverse_op._anchor()

    def _global_max(self, top):
        return self._inverse_op._global_max(top)  # over every shard when the inverse is sharded

    @property
    def _data(self):
        return self._inverse_op._data

    def _rhs(self, x, name: str):
        return self._inverse_op._rhs(x, name)  # same dim and dtype; Dask right-hand sides


class FisherOperator(_DerivedOperator):
    """F = λI + s·GᵀG as an operator, sharing the factors of its InverseOperator."""

    def _group_product(self, group, X):
        return group.apply_fisher(X), group.fisher_exponent

    @_backend.on_device
    def diag(self):
        """Diagonal of F: λ + s·Σ_i G[i, j]², shape (d,), op.dtype. O(dm)."""
        xp = self._xp
        parts = [scaled_diagonal(xp, grp.fisher_diag(), grp.fisher_exponent, grp.count) for grp in self._groups()]
        return _backend.cast_result(xp, parts[0] if len(parts) == 1 else xp.concat(parts), self.dtype, "the diagonal")

    @_backend.on_device
    def logdet(self) -> float:
        """log det F (a Python float), as ``inverse().logdet()``."""
        return self._inverse_op.logdet()

    def inverse(self) -> InverseOperator:
        """The operator for F⁻¹ this one was made from."""
        return self._inverse_op


class PowerOperator(_DerivedOperator):
    """F^p as an operator, sharing the groups of its InverseOperator."""

    def __init__(self, inverse: InverseOperator, p: float):
        super().__init__(inverse)
        self._p = p

    @property
    def exponent(self) -> float:
        """p."""
        return self._p

    def _group_product(self, group, X):
        return group.apply_power(X, self._p)
