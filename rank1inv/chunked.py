"""StaticInverse over a Dask array G (m, d) chunked along d (docs/design.md §13).

Every reduction over d is a sum of per-chunk partial results (an m-vector per right-hand side,
the m×m Gram matrix once), so a pass over G is one task per column chunk of G, run wherever
Dask's scheduler puts it (threads, or the workers of a ``dask.distributed`` cluster), and the
partial results are summed pairwise in a fixed tree: the result does not depend on the
scheduler or on which worker ran what, and equals the one-process result up to the order of
that sum. Only m-sized results come back to the client, where the m×m algebra runs in the
namespace of G's chunks (NumPy or CuPy). Products, the diagonal and columns stay lazy Dask
arrays: the output pass λ⁻¹(x − Gᵀc) is local to each chunk.

The seam is the one of sharded gradients (``_passes.ShardedView``): ``_passes`` dispatches a
``ChunkedView`` to its methods in one line per pass; the operator reads the d-long data through
its data namespace (``_BlockOperator._data``, here Dask's) and does its m×m algebra in ``_xp``.
"""

from __future__ import annotations

import operator

import numpy as np

from . import _backend, _checks
from ._chunks import ColumnChunks
from ._operator import FisherOperator, PowerOperator, argument
from .static import StaticInverse

__all__ = ["DaskInverse"]


def _dask():
    try:
        import dask
        import dask.array
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("Dask gradients need dask: pip install 'rank1inv[dask]'") from err
    return dask


def _tree(parts, combine):
    """parts (Delayed) combined pairwise, in a fixed order: one Delayed."""
    from dask import delayed

    while len(parts) > 1:
        parts = [
            delayed(combine)(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), 2)
        ]
    return parts[0]


def _on_chunk(fn, g, *rest):
    """fn applied to one column chunk g (m, c) of G as a group (1, m, c), in g's namespace."""
    return fn(_backend.namespace(g), g[None, ...], *rest)


class ChunkedView(ColumnChunks):
    """The group array (1, m, d) of a Dask G (m, d) with one chunk along m and any chunks along d.

    Reductions run one task per chunk and return an array of the chunks' namespace on the
    client (computed); d-local passes return lazy Dask arrays chunked like G's columns."""

    def __init__(self, G):
        self.G = G
        m, d = G.shape
        self.shape, self.dtype = (1, m, d), G.dtype
        self.cuts = G.chunks[1]
        self.xp = _backend.namespace(G._meta)  # the namespace of the chunks: the m×m algebra's
        self.bytes_reduced = 0  # bytes of the partial results the chunks' tasks emitted (all reductions)

    def _aligned(self, X):
        """X (1, d, k) rechunked to G's column chunks, one chunk along k."""
        return X.rechunk({0: 1, 1: self.cuts, 2: -1})

    def _reduce(self, fn, X=None, combine=operator.add):
        dask = _dask()
        from dask import delayed

        blocks = list(self.G.to_delayed()[0, :])
        if X is None:
            parts = [delayed(_on_chunk)(fn, g) for g in blocks]
        else:
            xs = list(self._aligned(X).to_delayed()[0, :, 0])
            parts = [delayed(_on_chunk)(fn, g, x) for g, x in zip(blocks, xs)]
        (out,) = dask.compute(_tree(parts, combine))
        sizes = [int(np.asarray(_backend.to_host(a)).nbytes) for a in (out if isinstance(out, tuple) else (out,))]
        self.bytes_reduced += len(parts) * sum(sizes)  # one result per chunk
        return out

    def _map(self, fn, X=None, *, rows=None, width=None):
        da = _dask().array
        G3 = self.G[None, :, :]
        meta = self.xp.empty((0,) * (2 if rows is None and width is None else 3))
        run = lambda *blocks: fn(_backend.namespace(blocks[-1]), blocks[-1], *blocks[:-1])
        if width is not None:  # (1, c, width): aligned with X's chunks, or new
            if X is None:
                return da.blockwise(run, "bjk", G3, "bij", new_axes={"k": width}, dtype=np.float64,
                                    concatenate=True, meta=meta)  # fmt: skip
            return da.blockwise(run, "bjk", self._aligned(X), "bjk", G3, "bij", dtype=np.float64, concatenate=True,
                                meta=meta)  # fmt: skip
        if rows is None:
            return G3.map_blocks(run, drop_axis=1, dtype=np.float64, meta=meta)
        return G3.map_blocks(run, chunks=((1,), (rows,), self.cuts), dtype=np.float64, meta=meta)

    def columns(self, blocks, offsets):
        """Columns of G at ``offsets`` (the one block): (n, m) float64 in the chunks' namespace.
        One gather of n·m values."""
        dask = _dask()
        idx = _backend.to_host(offsets)
        (cols,) = dask.compute(self.G[:, idx])
        xp = self.xp
        out = xp.empty((idx.shape[0], self.shape[1]), dtype=xp.float64)
        _backend.decode_into(xp, out, xp.matrix_transpose(cols))
        return out


class DaskInverse(StaticInverse, serves=lambda args, kwargs: _backend.is_dask_array(argument(args, kwargs, "G", 0))):
    """``StaticInverse(G, damp)`` for a Dask array G (m, d) chunked along d (NumPy or CuPy
    chunks; float64, float32 or 16-bit): F⁻¹ for F = λI + s·GᵀG with every pass over G run as
    one task per chunk on Dask's scheduler (a ``dask.distributed`` cluster when a Client is
    active) and the m×m work on the client.

    Construction computes max|G| and the Gram matrix (two passes, O(dm²) on the workers, m²
    floats per chunk back to the client). ``op @ x`` (x a Dask array, or a NumPy array, of shape
    (d,) or (d, k)) returns a lazy Dask array chunked like x; building it computes the
    m-sized reductions over x and G (two computes: max|x|, then G·x with ‖x‖²; (m + 1)·k floats
    per chunk come back), and computing it runs the output pass. ``diag()`` is lazy the same way;
    ``diag(indices)``, ``entries``, ``submatrix`` gather the m values of each indexed column and
    return arrays of the chunks' namespace; ``logdet``, ``with_damp``, ``gram_spectra``,
    ``eigenvalues``, ``fisher()``, ``power(p)`` work as usual; ``to_dense`` and the samples are
    lazy Dask arrays. One block only (d > m), one damping value. A lost worker's tasks are rerun
    by Dask from the graph, with the same result (the sums' order is fixed).
    """

    def _accept(self, G, damp, block_size):
        """The Dask checks: two dimensions with known chunk sizes, one block, one damping value,
        d > m; G rechunked to one chunk along m (every task sees whole columns); the m×m algebra in
        the namespace of G's chunks."""
        _dask()
        if not _backend.is_dask_array(G):
            raise TypeError(f"DaskInverse needs a Dask array, not {type(G).__name__}")
        if G.ndim != 2:
            raise ValueError(f"G must have ndim 2, got shape {tuple(G.shape)}")
        if any(isinstance(n, float) and n != n for n in G.shape) or any(
            n != n for c in G.chunks for n in c
        ):  # unknown (nan) chunk sizes
            raise ValueError("G has unknown chunk sizes: call G.compute_chunk_sizes() first")
        if block_size is not None:
            raise ValueError("block layouts over Dask chunks are not supported: pass block_size=None")
        _checks.one_damp(damp, "Dask gradients")
        algebra = _backend.namespaces(G).algebra  # Dask's for the data, the chunks' for the m×m algebra
        policy = _checks.float_kind(G, "G", cupy=_backend.is_cupy(algebra))
        m, d = G.shape
        if m >= 1 and d <= m:
            raise ValueError(f"Dask gradients need d > m (got d = {d}, m = {m}); compute G and pass the array")
        if G.numblocks[0] != 1:
            G = G.rechunk({0: -1})
        return G, algebra, policy

    def _make_source(self, G):
        return ChunkedView(G)

    @property
    def _data(self):
        return _backend.namespaces(self._G).data  # not stored: modules do not pickle

    def _anchor(self):
        return None

    def _global_max(self, top):
        (out,) = _dask().compute(top)
        return out

    def _product(self, x, name):
        Y = super()._product(x, name)
        return Y.rechunk(x.chunks) if _backend.is_dask_array(x) else Y  # chunked like x

    def _rhs(self, x, name: str):
        """x as a lazy (d, k) float64 Dask array chunked like G's columns (NumPy x is wrapped)."""
        da = _dask().array
        if _backend.is_array(x) or isinstance(x, (list, tuple)):
            x = _checks.as_array(x, name, self._xp)
            x = da.from_array(x, chunks=(self._G.chunks[1],) + tuple((n,) for n in x.shape[1:]))
        elif not _backend.is_dask_array(x):
            raise TypeError(_backend.foreign_array_message(x, name))
        out_dtype = self._rhs_dtype(x, name)
        X = (x[:, None] if x.ndim == 1 else x).astype(np.float64)
        return X.rechunk({0: self._G.chunks[1], 1: -1}), x.ndim == 1, out_dtype

    def diag(self, indices=None):
        """diag F⁻¹ as a lazy Dask array (d,) chunked like G's columns (each chunk's task issues
        the AccuracyWarning of ``StaticInverse.diag`` for its coordinates, in the worker's log on a
        cluster); with ``indices``, the entries at those indices, computed."""
        if indices is not None:
            return super().diag(indices)
        return self._per_chunk("diag", "inverse_exponent", "the diagonal")

    def _per_chunk(self, method: str, exponent: str, what: str):
        """A query local in d, ``group.<method>()`` scaled by 2^``group.<exponent>``, as a lazy
        Dask array (d,): each chunk's task runs it on the group restricted to its columns."""
        (grp,) = self._group_list
        dtype = _backend.dtype_name(self.dtype)

        def chunk_values(g):
            xp = _backend.namespace(g)
            local = grp.restricted(g[None, ...])
            values = _backend.ldexp(xp, getattr(local, method)(), getattr(grp, exponent))
            return _backend.cast_result(xp, values, getattr(xp, dtype), what)

        return self._G.map_blocks(chunk_values, drop_axis=0, dtype=np.dtype(dtype))

    def fisher(self):
        """F as an operator over the chunks: lazy products and diagonal."""
        return _DaskFisher(self)

    def power(self, p):
        """F^p as an operator over the chunks: lazy products."""
        return _DaskPower(self, super().power(p).exponent)  # super() validates p

    def column(self, j):
        """F⁻¹e_j as a lazy Dask array (d,): one product."""
        da = _dask().array
        (j,) = _backend.to_host(_checks.indices(self._xp, j, self._dim, "j")).tolist()
        e = da.zeros((self._dim,), chunks=(self._G.chunks[1],), dtype=np.float64)
        e = da.where(da.arange(self._dim, chunks=(self._G.chunks[1],)) == j, 1.0, e)
        return self._product(e, "e_j")

    def aslinearoperator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on NumPy vectors: each product is computed on
        the cluster and returned as NumPy (for SciPy's iterative solvers)."""
        compute = lambda x: np.asarray(_dask().compute(self @ x)[0])
        return _backend.linear_operator(_backend.namespace_from_argument(None), self.shape, self.dtype, compute,
                                        compute)  # fmt: skip

    def sample_from_noise(self, z):
        """``StaticInverse.sample_from_noise`` as a lazy Dask array: z (noise_dim,) or (n, noise_dim)
        (NumPy or Dask; z₁ = z[..., :d] chunked like G's columns, z₂ the last m values) gives
        draws (d,) or (n, d) chunked like G's columns. Two passes over G on the workers (one
        compute for the projection, the output pass lazy); one compute checks z is finite."""
        da = _dask().array
        xp, d = self._xp, self._dim
        if not _backend.is_dask_array(z):
            z = _checks.as_array(z, "z", xp)
        if z.ndim not in (1, 2) or z.shape[-1] != self.noise_dim:
            raise ValueError(f"z must have shape ({self.noise_dim},) or (n, {self.noise_dim}), got {tuple(z.shape)}")
        if not (np.issubdtype(z.dtype, np.floating) or np.issubdtype(z.dtype, np.integer)):
            raise TypeError(f"z must be real (standard normals), got {z.dtype}")
        Z = da.asarray(z).astype(np.float64)
        Z = Z[:, None] if z.ndim == 1 else Z.T  # (noise_dim, k)
        if not bool(_dask().compute(da.isfinite(Z).all())[0]):
            raise ValueError("z contains non-finite values (nan or inf)")
        (grp,) = self._group_list
        Z1 = Z[:d].rechunk({0: self._G.chunks[1], 1: -1})[None, ...]
        (Z2,) = _dask().compute(Z[d:])
        values, e = grp.sample(Z1, xp.asarray(Z2)[None, ...])
        Y = _backend.cast_result(xp, _backend.ldexp(xp, values, e)[0], self.dtype, "the sample")
        return Y[:, 0] if z.ndim == 1 else Y.T

    def sample(self, size=None, *, rng=None):
        """Exact draws from N(0, F⁻¹) as a lazy Dask array, (d,) or (size, d): the standard normals
        come from ``dask.array.random`` seeded by ``rng`` (None, an int, or a NumPy Generator that
        gives the seed), chunked like G's columns, so no d-long array is formed on the client."""
        da = _dask().array
        n = 1 if size is None else _checks.positive_int(size, "size")
        seed = _backend.as_rng(np, rng).integers(2**63)
        chunks = ((n,), tuple(self._G.chunks[1]) + (len(self._layout.runs) * self._G.shape[0],))
        z = da.random.default_rng(int(seed)).standard_normal((n, self.noise_dim), chunks=chunks)
        out = self.sample_from_noise(z)
        return out[0] if size is None else out

    def with_damp(self, damp):
        """As ``StaticInverse.with_damp``, for one damping value (no pass over G)."""
        return super().with_damp(_checks.one_damp(damp, "Dask gradients"))

    def __repr__(self) -> str:
        return super().__repr__().replace("StaticInverse(", "StaticInverse(dask, ", 1)


class _DaskFisher(FisherOperator):
    def diag(self):
        """diag F as a lazy Dask array (d,). O(dm) on the workers."""
        return self._inverse_op._per_chunk("fisher_diag", "fisher_exponent", "the diagonal")


class _DaskPower(PowerOperator):
    pass
