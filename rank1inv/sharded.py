"""StaticInverse over gradients sharded along d across processes (docs/design.md §12).

Each rank holds the same m rows restricted to its own coordinates, G_local (m, d_r). Every
reduction over d (the Gram matrix, G·x, ‖x‖², max|x|, max|G|) is a sum or maximum of per-shard
results, so a query costs one all-reduce of O(m) floats per pass (O(m²) once for the Gram
matrix) and the output λ⁻¹(x − Gᵀc) is computed shard-locally. The reductions happen in one
place, ``rank1inv._passes`` (``ShardedView``), plus the normalization of right-hand sides
(``_global_max``) and the global-index queries here.
"""

from __future__ import annotations

import numpy as np

from . import _backend, _checks
from ._comm import as_communicator, rank_offsets, same_on_every_rank
from ._operator import FisherOperator, PowerOperator
from ._passes import ShardedView
from .dynamic import DynamicInverse
from .static import StaticInverse


class ShardedQueries:
    """The queries of an operator over shards that need more than the local passes: global
    indices, the normalization of right-hand sides, joint samples. Needs ``_comm``, ``_offsets``
    (the ranks' first coordinates and d) and ``_global_dim``."""

    @property
    def global_dim(self) -> int:
        """d over all ranks."""
        return self._global_dim

    @property
    def communicator(self):
        """The Communicator (``bytes_sent`` counts what this rank sent)."""
        return self._comm

    @property
    def local_range(self) -> tuple[int, int]:
        """(first, stop) global coordinates held by this rank."""
        r = self._comm.rank
        return int(self._offsets[r]), int(self._offsets[r + 1])

    def _global_max(self, top):
        xp = self._xp
        return xp.asarray(self._comm.allreduce_max(_backend.to_host(top)), device=_backend.device(top))

    def to_dense(self, max_dim: int = 0):
        """Refused: the matrix is spread over the ranks (use ``submatrix`` with global indices)."""
        raise ValueError("to_dense of a sharded operator would be only this rank's diagonal block")

    def fisher(self):
        """F as an operator over the shards: products and diag on this rank's slice."""
        return _ShardedFisher(self)

    def power(self, p):
        """F^p as an operator over the shards: products on this rank's slice."""
        return _ShardedPower(self, super().power(p).exponent)  # super() validates p

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
                W[mine, :m] = _backend.to_host(grp._rows(local))
                W[mine, m] = _backend.to_host(xp.sum(grp._columns(local) ** 2, axis=1))
            return self._comm.allreduce_sum(W)

        Wr = gathered(r)
        Wc = Wr if c is r else gathered(c)  # diag(indices) asks for the same columns twice
        same = _backend.to_host(r) == _backend.to_host(c)
        value = same.astype(np.float64) - np.sum(Wr[:, :m] * Wc[:, :m], axis=1)
        if same.any():
            value[same] = _backend.to_host(grp._bounded(xp.asarray(value[same]), xp.asarray(Wr[same, m])))
        out = _backend.ldexp(xp, xp.asarray(value / grp.damp_f), grp.inverse_exponent)
        return _backend.cast_result(xp, out, out_dtype, "the entries")

    def diag(self, indices=None):
        """The local slice of diag F⁻¹ (indices=None), or entries at global ``indices``."""
        if indices is None:
            return super().diag()
        xp = self._xp
        idx = _checks.indices(xp, indices, self._global_dim, "indices")
        return self._entries64(idx, idx, out_dtype=self.dtype)

    def entries(self, rows, cols):
        """F⁻¹[rows[t], cols[t]] for global indices, shape (n,), the same on every rank."""
        xp = self._xp
        r = _checks.indices(xp, rows, self._global_dim, "rows")
        c = _checks.indices(xp, cols, self._global_dim, "cols")
        if r.shape != c.shape:
            raise ValueError(f"rows and cols must have the same length, got {r.shape[0]} and {c.shape[0]}")
        return self._entries64(r, c, out_dtype=self.dtype)

    def submatrix(self, indices):
        """Dense F⁻¹[indices][:, indices] for global indices, (k, k), the same on every rank."""
        xp = self._xp
        idx = _backend.to_host(_checks.indices(xp, indices, self._global_dim, "indices"))
        k = idx.shape[0]
        rr, cc = np.repeat(idx, k), np.tile(idx, k)
        vals = self._entries64(xp.asarray(rr), xp.asarray(cc), out_dtype=self.dtype)
        return xp.reshape(vals, (k, k))

    def column(self, j):
        """This rank's slice of F⁻¹e_j for a global index j."""
        xp = self._xp
        (j,) = _backend.to_host(_checks.indices(xp, j, self._global_dim, "j")).tolist()
        lo, hi = self.local_range
        e = xp.zeros((self._dim, 1), dtype=xp.float64, device=_backend.device(self._anchor()))
        if lo <= j < hi:
            e[j - lo, 0] = 1.0
        return _backend.cast_result(xp, self._apply64(e)[:, 0], self.dtype, "the column")

    def sample_from_noise(self, z):
        """As ``StaticInverse.sample_from_noise`` on this rank's slice: z = (z₁ for the local
        coordinates, z₂ of length m); z₂ is taken from rank 0 (broadcast), so the draw is one
        joint sample whatever the other ranks pass."""
        xp = self._xp
        z = _checks.as_array(z, "z", xp)
        m = self._groups()[0].Gg.shape[1]
        host = np.array(_backend.to_host(z), dtype=np.float64)
        if host.ndim not in (1, 2) or host.shape[-1] != self.noise_dim:
            raise ValueError(f"z must have shape ({self.noise_dim},) or (n, {self.noise_dim}), got {host.shape}")
        host[..., -m:] = self._comm.broadcast(host[..., -m:])
        return super().sample_from_noise(xp.asarray(host, device=_backend.device(self._anchor())))

    def sample(self, size=None, *, rng=None):
        """This rank's slice of exact draws from N(0, F⁻¹): z₁ from a stream mixed with the rank
        (independent across ranks even when every rank passes the same seed or generator),
        z₂ from rank 0 (``sample_from_noise``); ``SAMPLE_CHUNK`` samples at a time."""
        base = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        return super().sample(size, rng=np.random.default_rng([int(base.integers(2**63)), self._comm.rank]))


class ShardedInverse(ShardedQueries, StaticInverse):
    """``StaticInverse(G_local, damp, comm=...)``: F⁻¹ for F = λI + s·GᵀG with G's columns split
    across the ranks of ``comm`` (an mpi4py communicator, a torch.distributed process group, or
    "torch" for the default group). Every rank passes the same m, damp, scale and dtype.

    Products take and return this rank's slice (shape (d_r,) or (d_r, k)); ``diag()`` is the
    local slice of the diagonal; ``diag(indices)``, ``entries``, ``submatrix`` take global
    indices and return the same values on every rank; ``logdet`` is the same on every rank;
    ``sample`` returns this rank's slice of one joint draw. One block only (d > m); ``to_dense``
    is refused. Communication per product: 2 all-reduces of m·k floats (+ k per block for the
    normalization), measured by ``communicator.bytes_sent``.
    """

    def __init__(self, G, damp, *, comm, scale=None, block_size=None, accumulate="float64"):
        self._comm = as_communicator(comm)
        if block_size is not None:
            raise ValueError("block layouts over shards are not supported: pass block_size=None")
        if not isinstance(damp, (int, float)) or isinstance(damp, bool):
            raise ValueError("sharded gradients take one damping value (per-block or per-coordinate damps: not yet)")
        G = _checks.as_array(G, "G")
        if G.ndim != 2:
            raise ValueError(f"G must have ndim 2, got shape {tuple(G.shape)}")
        m, d_local = G.shape
        if not same_on_every_rank(self._comm, m):
            raise ValueError(f"every rank must hold the same number of gradients; this rank has m = {m}")
        self._offsets = rank_offsets(self._comm, d_local)
        self._global_dim = int(self._offsets[-1])
        if self._global_dim <= m:
            raise ValueError(f"sharded gradients need d > m (got d = {self._global_dim}, m = {m})")
        super().__init__(G, damp, scale=scale, accumulate=accumulate)

    def with_damp(self, damp):
        """As ``StaticInverse.with_damp``, for one damping value (every rank calls it)."""
        if isinstance(damp, bool) or not isinstance(damp, (int, float)):
            raise ValueError("sharded gradients take one damping value (per-block or per-coordinate damps: not yet)")
        return super().with_damp(damp)

    def _make_source(self, G):  # used by StaticInverse: the group sees this rank's columns only
        return ShardedView(G[None, ...], self._comm, self._global_dim)


class ShardedWindow(ShardedQueries, DynamicInverse):
    """``DynamicInverse(dim_local, capacity, damp, comm=...)``: a sliding window whose gradients
    are sharded along d: each rank stores its slice of every gradient (capacity × dim_local) and
    pushes its slice of each new gradient; the m×m state (Gram matrix, factor) is replicated.
    A push or push_apply costs one all-reduce of about capacity floats for the new Gram row (plus
    a few scalars), an IHVP one of capacity·k. Queries as ``ShardedInverse``. ``state_dict`` is
    per rank (its slice of the gradients) and loads on the same layout of ranks (``reshard``
    for another)."""

    def with_damp(self, damp):
        """A ShardedInverse of the window as it is now with damping λ' (every rank calls it):
        O(capacity·dim_local) to copy this rank's gradients and one all-reduced Gram matrix."""
        lam = _checks.damp(damp)
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


class _LocalOnly:
    def to_dense(self, max_dim: int = 0):
        """Refused: the matrix is spread over the ranks."""
        raise ValueError("to_dense of a sharded operator would be only this rank's diagonal block")


class _ShardedFisher(_LocalOnly, FisherOperator):
    pass


class _ShardedPower(_LocalOnly, PowerOperator):
    pass
