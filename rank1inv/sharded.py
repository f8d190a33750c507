"""Operators over gradients sharded along d across processes (docs/design.md §12).

Each rank holds the same m rows restricted to its own coordinates, G_local (m, d_r). Every
reduction over d (the Gram matrix, G·x, ‖x‖², max|x|, max|G|) is a sum or maximum of per-shard
results, so a query costs one all-reduce of O(m) floats per pass (O(m²) once for the Gram
matrix) and the output λ⁻¹(x − Gᵀc) is computed shard-locally. The reductions happen in
``rank1inv._passes`` (``ShardedView``, ``max_over_ranks``), plus the normalization of
right-hand sides (``_global_max``) and the global-index queries here.

Every collective call agrees on success or failure across ranks before anything is committed:
each rank validates its own inputs, then one reduction carries the "I refused" flag and the
values every rank must pass alike (``_comm.agreement``, ``_comm.agreed_max``), fused into the
call's first collective where that collective's size does not depend on the inputs. A rank that
refused raises its own error, the others a ``_comm.Refused``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _backend, _checks, _comm, _passes, _precision
from ._comm import Communicator, as_communicator, rank_offsets
from ._operator import FisherOperator, PowerOperator, may_overflow
from ._protocols import GradientView
from .dynamic import DynamicInverse
from .static import StaticInverse

__all__ = ["ShardedInverse", "ShardedWindow", "reshard"]

ONE_DAMP = "sharded gradients take one damping value (per-block or per-coordinate damps: not yet)"


class ShardedView(GradientView):
    """A group (nb, m, B_local) holding this rank's columns of gradients sharded along d: each
    pass is the one-process pass of ``_passes`` on the local array, and the passes that reduce
    over d (the Gram matrix, projections, row maxima) all-reduce their m-sized results here, in
    one collective each (docs/design.md §12); the others work on the local columns."""

    materialized = True
    communicator: Communicator

    def __init__(self, local, comm: Communicator, global_size: int):
        self.local, self.communicator, self.global_size = local, comm, global_size
        self.shape, self.dtype = local.shape, local.dtype
        self.xp = _backend.namespace(local)

    @property
    def device(self):
        return _backend.device(self.local)

    @property
    def global_width(self) -> int:
        return self.global_size

    def _sum(self, a):
        return _passes.sum_over_ranks(self.xp, self, a)

    def _sum_pair(self, a, b):
        """(Σ a, Σ b) over the ranks in one all-reduce."""
        xp = self.xp
        both = self._sum(xp.concat([xp.reshape(a, (-1,)), xp.reshape(b, (-1,))]))
        return xp.reshape(both[: a.size], a.shape), xp.reshape(both[a.size :], b.shape)

    def gram(self, accumulate: str, scale=1.0, weights=None):
        return self._sum(_passes.gram(self.xp, self.local, accumulate, scale, weights))

    def column_gram(self, accumulate: str, scale=1.0):
        raise ValueError("blocks no wider than m (parameter space) cannot be sharded along d")

    def project(self, X, accumulate: str, scale=1.0):
        return self._sum(_passes.project(self.xp, self.local, X, accumulate, scale))

    def project_sumsq(self, X, accumulate: str, scale=1.0, weights=None):
        return self._sum_pair(*_passes.project_sumsq(self.xp, self.local, X, accumulate, scale, weights))

    def project_gram(self, X, accumulate: str, scale=1.0):
        return self._sum_pair(*_passes.project_gram(self.xp, self.local, X, accumulate, scale))

    def combine(self, X, C, alpha: float, beta: float, accumulate: str, scale=1.0, out=None):
        return _passes.combine(self.xp, self.local, X, C, alpha, beta, accumulate, scale,
                               overwrite=out is not None and out is X)  # fmt: skip

    def column_sumsq(self, scale=1.0, weights=None):
        return _passes.column_sumsq(self.xp, self.local, scale, weights)

    def map_tiles(self, fn, scale=1.0, weights=None):
        return _passes.map_tiles(self.xp, self.local, fn, scale, weights)

    def columns(self, blocks, offsets):
        return _passes.columns(self.xp, self.local, blocks, offsets)

    def row_max_abs(self, weights=None):
        local = _passes.row_max_abs(self.xp, self.local, weights)
        return np.asarray(self.communicator.allreduce_max(local.reshape(-1)), dtype=np.float64).reshape(local.shape)

    def max_abs(self) -> float:
        return float(self.communicator.allreduce_max(np.array([_passes.max_abs(self.xp, self.local)]))[0])


def _scale_code(scale) -> float:
    """A number standing for a scale argument (checked equal across ranks)."""
    return -1.0 if scale is None else -2.0 if scale == "count" else float(scale)


def _code(options, value) -> float:
    return float(list(options).index(value))


class _Agreeing:
    """Products of an operator over shards: each rank checks its right-hand sides, and one
    reduction of max|x| carries the agreement on the number of columns (docs/design.md §12)."""

    def _ranks(self):  # pragma: no cover - set by the operators
        raise NotImplementedError

    def _bound_holds(self) -> bool:
        """Whether ``may_overflow``'s bound on F⁻¹x applies (not for F or F^p)."""
        return False

    def _product(self, x, name):
        with _backend.device_scope(self._xp, self._anchor()):
            err, top, k = None, 0.0, 0
            try:
                X, was_1d, out_dtype = self._rhs(x, name)
                top = float(self._xp.max(self._xp.abs(X))) if X.size else 0.0
                if not np.isfinite(top):
                    raise ValueError(f"{name} contains non-finite values (nan or inf)")
                k = X.shape[1]
            except (TypeError, ValueError) as exc:
                err = exc
            (top,) = _passes.max_over_ranks(self._ranks(), [top], err, "product", finite=True, columns=k)
            Y64 = self._apply64(X, name)
            if self._bound_holds() and not may_overflow(top, self.global_dim, min(self._damps()), out_dtype):
                Y = _backend.cast_result(self._xp, Y64, out_dtype, "the product")
            else:  # one rank's slice may overflow where another's does not: agree on the outcome
                with _passes.agreement(self._ranks(), "product"):
                    Y = _backend.cast_result(self._xp, Y64, out_dtype, "the product")
            return Y[:, 0] if was_1d else Y

    def _damps(self):
        d = self.damp
        return d if isinstance(d, tuple) else (d,)


class ShardedQueries(_Agreeing):
    """The queries of an operator over shards that need more than the local passes: global
    indices, the normalization of right-hand sides, joint samples; each with its agreement.
    Needs ``_comm``, ``_offsets`` (the ranks' first coordinates and d) and ``_global_dim``."""

    _comm: Communicator
    _offsets: np.ndarray
    _global_dim: int
    _xp: Any

    @property
    def global_dim(self) -> int:
        """d over all ranks."""
        return self._global_dim

    @property
    def communicator(self) -> Communicator:
        """The Communicator (``bytes_sent`` counts what this rank sent)."""
        return self._comm

    @property
    def local_range(self) -> tuple[int, int]:
        """(first, stop) global coordinates held by this rank."""
        r = self._comm.rank
        return int(self._offsets[r]), int(self._offsets[r + 1])

    def _bound_holds(self) -> bool:
        return True

    def _global_max(self, top):
        # right-hand sides are finite on every rank (checked and agreed in ``_product``)
        xp = self._xp
        host = _backend.to_host(top)
        return xp.asarray(self._comm.allreduce_max_finite(host).reshape(host.shape), device=_backend.device(top))

    def _sum_over_ranks(self, a):
        return self._comm.allreduce_sum(np.asarray(a, dtype=np.float64))

    def _max_over_ranks(self, a):
        return self._comm.allreduce_max(np.asarray(a, dtype=np.float64))

    def _identity(self):
        """This rank's rows of the d×d identity: (d_local, d), the right-hand sides of ``to_dense``."""
        xp = self._xp
        lo, hi = self.local_range
        eye = xp.zeros((hi - lo, self._global_dim), dtype=xp.float64, device=_backend.device(self._anchor()))
        eye[:, lo:hi] = xp.eye(hi - lo, dtype=xp.float64, device=_backend.device(self._anchor()))
        return eye

    def fisher(self):
        """F as an operator over the shards: products and diag on this rank's slice."""
        return _ShardedFisher(self)

    def power(self, p):
        """F^p as an operator over the shards: products on this rank's slice."""
        return _ShardedPower(self, super().power(p).exponent)  # super() validates p

    def _global_indices(self, what: str, pairs):
        """Global index arrays from ``pairs`` = [(value, name)], checked on this rank and agreed
        across ranks (their count and a digest of their values) in one reduction."""
        xp = self._xp
        with _passes.agreement(self._ranks(), what, "count", "indices_1", "indices_2") as agreed:
            out = [_checks.indices(xp, v, self._global_dim, n) for v, n in pairs]
            if any(a.shape != out[0].shape for a in out):
                n0, n1 = out[0].shape[0], out[1].shape[0]
                raise ValueError(f"rows and cols must have the same length, got {n0} and {n1}")
            h = _comm.digest(*[_backend.to_host(a) for a in out])
            agreed.set(count=out[0].shape[0], indices_1=h[0], indices_2=h[1])
        return out

    def _entries64(self, r, c, out_dtype):
        """F⁻¹[r_t, c_t] for global indices, the same on every rank: each rank whitens the columns
        it owns, two all-reduces of n·m floats assemble them."""
        xp = self._xp
        (grp,) = self._groups()
        lo, hi = self.local_range
        m = grp.Gg.shape[1]

        def gathered(idx):
            host = _backend.to_host(idx)
            mine = np.nonzero((host >= lo) & (host < hi))[0]
            W = np.zeros((host.shape[0], m + 1))
            if mine.size:
                local = xp.asarray(host[mine] - lo, device=_backend.device(idx))
                W[mine, :m] = _backend.to_host(grp.whitened(local))
                W[mine, m] = _backend.to_host(xp.sum(grp.columns(local, common=True) ** 2, axis=1))
            return self._comm.allreduce_sum(W)

        Wr = gathered(r)
        Wc = Wr if c is r else gathered(c)  # diag(indices) asks for the same columns twice
        same = _backend.to_host(r) == _backend.to_host(c)
        value = same.astype(np.float64) - np.sum(Wr[:, :m] * Wc[:, :m], axis=1)
        if same.any():
            value[same] = _backend.to_host(grp.bounded(xp.asarray(value[same]), xp.asarray(Wr[same, m]),
                                                        xp.zeros(int(same.sum()), dtype=xp.int64)))  # fmt: skip
        out = _backend.ldexp(xp, xp.asarray(value / grp.damp_fraction), grp.inverse_exponent)
        return _backend.cast_result(xp, out, out_dtype, "the entries")

    def diag(self, indices=None):
        """The local slice of diag F⁻¹ (indices=None), or entries at global ``indices``."""
        if indices is None:
            return super().diag()
        (idx,) = self._global_indices("diag", [(indices, "indices")])
        return self._entries64(idx, idx, out_dtype=self.dtype)

    def entries(self, rows, cols):
        """F⁻¹[rows[t], cols[t]] for global indices, shape (n,), the same on every rank."""
        r, c = self._global_indices("entries", [(rows, "rows"), (cols, "cols")])
        return self._entries64(r, c, out_dtype=self.dtype)

    def submatrix(self, indices):
        """Dense F⁻¹[indices][:, indices] for global indices, (k, k), the same on every rank."""
        xp = self._xp
        (idx,) = self._global_indices("submatrix", [(indices, "indices")])
        idx = _backend.to_host(idx)
        k = idx.shape[0]
        rr, cc = np.repeat(idx, k), np.tile(idx, k)
        vals = self._entries64(xp.asarray(rr), xp.asarray(cc), out_dtype=self.dtype)
        return xp.reshape(vals, (k, k))

    def column(self, j):
        """This rank's slice of F⁻¹e_j for a global index j (the same j on every rank)."""
        xp = self._xp
        (idx,) = self._global_indices("column", [(j, "j")])
        if idx.shape[0] != 1:
            raise ValueError("column takes a single index")
        (j,) = _backend.to_host(idx).tolist()
        lo, hi = self.local_range
        e = xp.zeros((self._dim,), dtype=xp.float64, device=_backend.device(self._anchor()))
        if lo <= j < hi:
            e[j - lo] = 1.0
        return xp.astype(self._product(e, "e_j"), self.dtype)

    def sample_from_noise(self, z):
        """As ``StaticInverse.sample_from_noise`` on this rank's slice: z = (z₁ for the local
        coordinates, z₂ of length m); z₂ is taken from rank 0 (broadcast), so the draw is one
        joint sample whatever the other ranks pass (the number of draws must agree)."""
        xp = self._xp
        m = self._groups()[0].Gg.shape[1]
        with _passes.agreement(self._ranks(), "sample_from_noise", "draws") as agreed:
            z = _checks.as_array(z, "z", xp)
            if np.iscomplexobj(_backend.to_host(z)):
                raise TypeError(f"z must be real (standard normals), got {z.dtype}")
            host = np.array(_backend.to_host(z), dtype=np.float64)
            if host.ndim not in (1, 2) or host.shape[-1] != self.noise_dim:
                raise ValueError(f"z must have shape ({self.noise_dim},) or (n, {self.noise_dim}), got {host.shape}")
            if not np.all(np.isfinite(host)):
                raise ValueError("z contains non-finite values (nan or inf)")
            agreed.set(draws=-1 if host.ndim == 1 else host.shape[0])
        host[..., -m:] = self._comm.broadcast(host[..., -m:])
        return super().sample_from_noise(xp.asarray(host, device=_backend.device(self._anchor())))

    def sample(self, size=None, *, rng=None):
        """This rank's slice of exact draws from N(0, F⁻¹): z₁ from a stream mixed with the rank
        (independent across ranks even when every rank passes the same seed or generator),
        z₂ from rank 0 (``sample_from_noise``); ``SAMPLE_CHUNK`` samples at a time."""
        with _passes.agreement(self._ranks(), "sample", "size") as agreed:
            n = 1 if size is None else _checks.positive_int(size, "size")
            base = _backend.as_rng(np, rng)
            agreed.set(size=-1 if size is None else n)
        return super().sample(size, rng=np.random.default_rng([int(base.integers(2**63)), self._comm.rank]))

    def _agreed_damp(self, damp):
        """``damp`` checked (one value) and agreed across ranks."""
        with _passes.agreement(self._ranks(), "with_damp", "damp") as agreed:
            if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating)):
                raise ValueError(ONE_DAMP)
            lam = _checks.damp(damp)
            agreed.set(damp=lam)
        return lam


class ShardedInverse(ShardedQueries, StaticInverse, serves=lambda args, kwargs: kwargs.get("comm") is not None):
    """``StaticInverse(G_local, damp, comm=...)``: F⁻¹ for F = λI + s·GᵀG with G's columns split
    across the ranks of ``comm`` (an mpi4py communicator, a torch.distributed process group, or
    "torch" for the default group). Every rank passes the same m, damp, scale, dtype and
    accumulate (checked in the construction's first reduction: a rank that differs makes every
    rank raise).

    Products take and return this rank's slice (shape (d_r,) or (d_r, k)); ``diag()`` is the
    local slice of the diagonal; ``diag(indices)``, ``entries``, ``submatrix`` take global
    indices and return the same values on every rank; ``logdet`` is the same on every rank;
    ``sample`` returns this rank's slice of one joint draw. One block only (d > m); ``to_dense``
    is refused. Communication per product: an agreement of 4 floats (with max|x|), max|x| per
    column (k floats) and one all-reduce of (m + 1)·k floats, measured by
    ``communicator.bytes_sent``.
    """

    def __init__(self, G, damp, *, comm, scale=None, block_size=None, accumulate="float64"):
        self._comm = as_communicator(comm)
        with _comm.agreement(
            self._comm, "construction", "number_of_gradients", "damp", "scale", "dtype", "accumulate"
        ) as agreed:
            if block_size is not None:
                raise ValueError("block layouts over shards are not supported: pass block_size=None")
            if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating)):
                raise ValueError(ONE_DAMP)
            lam = _checks.damp(damp)
            s = _checks.scale(scale)
            acc = _checks.accumulate(accumulate)
            G = _checks.as_array(G, "G")
            if G.ndim != 2:
                raise ValueError(f"G must have ndim 2, got shape {tuple(G.shape)}")
            kind = _checks.float_kind(G, "G", cupy=_backend.is_cupy(_backend.namespace(G)))
            agreed.set(number_of_gradients=G.shape[0], damp=lam, scale=_scale_code(s),
                       dtype=_code(_precision.STORAGE, kind), accumulate=_code(_checks.ACCUMULATE, acc))  # fmt: skip
        m, d_local = G.shape
        self._offsets = rank_offsets(self._comm, d_local)
        self._global_dim = int(self._offsets[-1])
        if self._global_dim <= m:
            raise ValueError(f"sharded gradients need d > m (got d = {self._global_dim}, m = {m})")
        super().__init__(G, lam, scale=scale, accumulate=acc)

    def with_damp(self, damp):
        """As ``StaticInverse.with_damp``, for one damping value (every rank calls it with the same)."""
        return super().with_damp(self._agreed_damp(damp))

    def _ranks(self):
        return self._group_list[0].Gg

    def _make_source(self, G):  # used by StaticInverse: the group sees this rank's columns only
        return ShardedView(G[None, ...], self._comm, self._global_dim)


class ShardedWindow(ShardedQueries, DynamicInverse, serves=lambda args, kwargs: kwargs.get("comm") is not None):
    """``DynamicInverse(dim_local, capacity, damp, comm=...)``: a sliding window whose gradients
    are sharded along d: each rank stores its slice of every gradient (capacity × dim_local) and
    pushes its slice of each new gradient; the m×m state (Gram matrix, factor) is replicated.
    Every rank passes the same capacity, damp, scale, dtype and accumulate. A push costs two
    all-reduces: max|g| with the agreement (5 floats), the new Gram row with ‖g‖² (capacity + 1
    floats); push_apply adds nothing unless its result might overflow (then one agreement of
    1 float). An IHVP costs as for ``ShardedInverse``. Queries as ``ShardedInverse``.
    ``state_dict`` is per rank (its slice of the gradients) and loads on the same layout of ranks
    (``reshard`` for another); ``load_state_dict`` refuses on every rank a state whose replicated
    fields differ across ranks."""

    def __init__(self, dim, capacity, damp, *, comm, scale=None, dtype="float32", xp=None, accumulate="float64"):
        self._comm = as_communicator(comm)
        names = ("capacity", "damp", "scale", "dtype", "accumulate")
        with _comm.agreement(self._comm, "construction", *names) as agreed:
            d_local = _checks.positive_int(dim, "dim")
            cap = _checks.positive_int(capacity, "capacity")
            lam = _checks.damp(damp)
            s = _checks.scale(scale)
            kind = _checks.float_dtype(dtype)
            acc = _checks.accumulate(accumulate)
            _backend.namespace_from_argument(xp)
            agreed.set(capacity=cap, damp=lam, scale=_scale_code(s), dtype=_code(_precision.STORAGE, kind),
                       accumulate=_code(_checks.ACCUMULATE, acc))  # fmt: skip
        self._offsets = rank_offsets(self._comm, d_local)
        self._global_dim = int(self._offsets[-1])
        if self._global_dim <= cap:
            raise ValueError(f"a sharded window needs dim > capacity (got dim = {self._global_dim})")
        super().__init__(d_local, cap, lam, scale=s, dtype=kind, xp=xp, accumulate=acc)

    def _total_dim(self) -> int:
        return self._global_dim

    def _view(self, Gg):
        return ShardedView(Gg, self._comm, self._global_dim)

    def _ranks(self):
        return self._view(self._G[None, ...])

    def _empty_like(self, damp, scale_mode, accumulate):
        return ShardedWindow(self._dim, self._capacity, damp, comm=self._comm, scale=scale_mode, dtype=self._storage,
                             xp=self._xp, accumulate=accumulate)  # fmt: skip

    def with_damp(self, damp):
        """A ShardedInverse of the window as it is now with damping λ' (every rank calls it):
        O(capacity·dim_local) to copy this rank's gradients and one all-reduced Gram matrix."""
        lam = self._agreed_damp(damp)
        if len(self) == 0:
            raise ValueError("the window is empty: there is no StaticInverse of zero gradients")
        return ShardedInverse(self.gradients(), lam, comm=self._comm, scale=self.scale, accumulate=self._accumulate)


def reshard(states, sizes) -> list[dict]:
    """Window states saved by P ranks (``state_dict()`` of each, in rank order; P = 1 for an
    unsharded window) as states for len(sizes) ranks holding ``sizes`` coordinates each (in
    order, summing to the total dim): the gradients are concatenated along d and split again,
    the replicated m×m state is checked equal across the inputs and copied. Host NumPy arrays;
    each rank then calls ``load_state_dict`` on its state (which re-checks the Gram matrix
    across the new ranks). O(capacity·d) memory on the calling process."""
    states = [dict(s) for s in states]
    if not states:
        raise ValueError("reshard needs at least one state")
    replicated = ("format", "capacity", "damp", "scale", "dtype", "accumulate", "ages", "counter", "frames", "steps",
                  "gram", "factor")  # fmt: skip
    first = states[0]
    for r, s in enumerate(states[1:], 1):
        for key in replicated:
            a, b = np.asarray(first[key]), np.asarray(s[key])
            if a.shape != b.shape or not np.array_equal(a, b):
                raise ValueError(f"state {r} differs from state 0 in {key!r}: not shards of one window")
    G = np.concatenate([np.asarray(_backend.to_host(s["gradients"])) for s in states], axis=1)
    sizes = [int(v) for v in sizes]
    if any(v < 1 for v in sizes) or sum(sizes) != G.shape[1]:
        raise ValueError(f"sizes must be positive and sum to dim = {G.shape[1]}, got {sizes}")
    cuts = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        s = {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in first.items()}
        s["dim"], s["gradients"] = int(b - a), np.ascontiguousarray(G[:, a:b])
        out.append(s)
    return out


class _LocalOnly(_Agreeing):
    _inverse_op: Any

    def _identity(self):
        return self._inverse_op._identity()

    def _ranks(self):
        return self._inverse_op._ranks()

    @property
    def global_dim(self) -> int:
        return self._inverse_op.global_dim


class _ShardedFisher(_LocalOnly, FisherOperator):
    pass


class _ShardedPower(_LocalOnly, PowerOperator):
    pass
