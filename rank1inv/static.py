"""StaticInverse: F⁻¹ for a fixed set of gradients (WoodFisher / M-FAC pruning)."""

from __future__ import annotations

import copy

import numpy as np

from . import _backend, _checks, _precision
from ._blocks import Layout
from ._operator import InverseOperator, Variants
from ._protocols import GradientSource, Group
from .accumulated import AccumulatedBlocks, BlockAccumulator, consume
from .factored import FactoredGradients
from .groups import make_group, redamp_group
from .streamed import StreamedGradients


def _damp_layout(dim: int, block_size, damp):
    """(damp as stored: a float or a tuple per block, the layout keyed by per-block damps)."""
    sizes = Layout(dim, block_size).block_sizes
    value = _checks.damps(damp, len(sizes), dim)
    if isinstance(value, tuple):
        return value, Layout(dim, sizes, keys=[(v,) for v in value])
    return value, Layout(dim, sizes)


class StaticInverse(Variants, InverseOperator):
    """The inverse of F = λI + s·Σ gᵢgᵢᵀ for the m rows gᵢ of G, as a linear operator.

    Parameters
    ----------
    G : array (m, d), NumPy or CuPy; float64, float32, bfloat16 or float16; or a
        ``rank1inv.FactoredGradients`` (per-sample gradients of linear layers as factors: no
        m×d array is formed), a ``rank1inv.StreamedGradients`` (host memory streamed to the
        device once per pass), or a Dask array chunked along d (``rank1inv.chunked``: one task
        per chunk and pass, lazy results)
        bfloat16 is ``ml_dtypes.bfloat16`` on NumPy and its bit patterns in a uint16 array on CuPy
        (which has no bfloat16 dtype).
        The gradients, one per row. Referenced, not copied, and never modified: do not modify it
        while the operator is in use (a memory-mapped G whose file is truncated meanwhile kills
        the process with SIGBUS at the next pass over it: the operating system's behaviour, which
        no library can catch; a value changed to nan or inf is reported by the next result's
        OverflowError as non-finite). Query results are float64 for float64 G and float32
        otherwise (a float64 x promotes its product). Torch and JAX tensors go through
        ``rank1inv.adapters`` (zero-copy); other arrays are refused with a TypeError.
        Or a ``rank1inv.BlockAccumulator``: the blocks' Gram matrices accumulated from a
        stream of gradients that were not kept (``from_stream``; its block layout is the
        operator's, and it may keep accumulating: the operator keeps what it had).
    damp : float > 0, or a sequence of them, one per block or one per coordinate
        λ (the prior precision, in Laplace terms): one value, one per diagonal block of
        ``block_size`` (per-layer priors; ``damp`` then returns the tuple), or a vector δ of
        length d for F = diag(δ) + s·GᵀG (Woodbury in the rescaled gradients G·diag(δ)^(-1/2),
        never formed; max δ / min δ ≤ 2^1000; ``power``, ``eigenvalues`` and ``gram_spectra``
        need one value per block).
    scale : None, "count" or float > 0
        s; None and "count" mean 1/m.
    block_size : None, int, or sequence of ints
        Block-diagonal approximation: consecutive blocks of this size (the last may be shorter),
        or explicit block lengths summing to d (e.g. one per layer). None: one block.
    accumulate : "float64" (default) or "native"
        "float64": every reduction over d accumulates in float64 and outputs are rounded once.
        "native": passes over G run in the storage dtype (faster, reference-code accuracy).

    Cost: construction O(dm²) as matrix-matrix products (float64 Gram matrix of each block, or
    the B×B Fisher block where B ≤ m) plus O(m³) per block. Products O(dm) per column; entries
    O(m) each after a one-time O(dm²) whitening (cached, 8·d·m bytes); see the user guide.
    """

    _variants = []  # ShardedInverse (comm=...), DaskInverse (a Dask G): ``Variants``

    def __init__(self, G, damp, *, scale=None, block_size=None, accumulate="float64", comm=None, _gram=None):
        if comm is not None:  # pragma: no cover - Variants makes a sharded.ShardedInverse for a comm
            raise TypeError("a communicator makes the sharded operator (rank1inv.sharded.ShardedInverse)")
        G, xp, policy = self._accept(G, damp, block_size)
        if isinstance(G, AccumulatedBlocks):
            block_size = G.block_sizes
        m, d = G.shape
        if m < 1 or d < 1:
            raise ValueError(f"G must have at least one row and one column, got shape {tuple(G.shape)}")
        s = _checks.scale(scale)
        self._scale = 1.0 / m if s in (None, "count") else s
        self._accumulate = _checks.accumulate(accumulate)
        self._damp, self._layout = _damp_layout(d, block_size, damp)
        self._xp, self._dim, self._dtype = xp, d, _precision.of(policy).output
        self._storage = policy
        self._G = G
        source = self._make_source(G)
        with _backend.device_scope(xp, self._anchor()):  # CuPy allocations on G's device, not the current one
            self._group_list = [
                source.make_group(run, self._run_damp(i), self._scale, self._accumulate)
                if isinstance(source, AccumulatedBlocks)
                else make_group(xp, source, run, self._run_damp(i), self._scale, self._accumulate, _gram)
                for i, run in enumerate(self._layout.runs)
            ]

    @classmethod
    def from_stream(cls, batches, damp, *, dim: int, block_size=None, scale=None, dtype=None,
                    accumulate="float64") -> StaticInverse:  # fmt: skip
        """F⁻¹ from a stream of gradients that is never stored: ``batches`` yields gradients
        (d,) or mini-batches of them (k, d), NumPy or CuPy (torch through
        ``rank1inv.adapters.torch.gradient_stream``). Each run of blocks of B ≤ m keeps the
        float64 sums Σ g_bg_bᵀ (d·B·8 bytes in all, whatever m), wide runs the gradients' slices
        while they are smaller (``rank1inv.BlockAccumulator``). Every query of StaticInverse is
        served, equal to ``StaticInverse(G, damp, block_size=...)`` on the same gradients stored
        in ``dtype`` (None: the first batch's). Cost: O(d·B) flops per gradient as float64
        GEMMs, then O(B³) per block."""
        sizes = Layout(_checks.positive_int(dim, "dim"), block_size).block_sizes
        _checks.damps(damp, len(sizes), dim)  # refused before the stream is read
        _checks.scale(scale)
        _checks.accumulate(accumulate)
        return cls(consume(batches, dim, block_size, dtype), damp, scale=scale, accumulate=accumulate)

    def _accept(self, G, damp, block_size):
        """(G as the groups read it, the namespace of the m×m algebra, the storage dtype name), after
        the checks this kind of gradients needs (overridden by the variants: Dask)."""
        if isinstance(G, BlockAccumulator):
            G = G._parts()
        if isinstance(G, AccumulatedBlocks):  # Gram matrices of a stream, never an m×d array
            if block_size is not None and Layout(G.shape[1], block_size).block_sizes != G.block_sizes:
                raise ValueError("block_size must be None or the accumulator's own block layout")
            return G, G.xp, G.storage
        if isinstance(G, FactoredGradients):  # layer factors, never an m×d array
            return G, G.xp, _precision.name_of(G.dtype)
        if isinstance(G, StreamedGradients):  # host memory, streamed to xp's device per pass
            if block_size is not None or G.shape[1] <= G.shape[0]:
                raise ValueError("streamed gradients take one block (block_size=None) and d > m")
            _checks.one_damp(damp, "streamed gradients")
            return G, G.xp, G.storage
        G = _checks.as_array(G, "G")
        xp = _backend.namespace(G)
        if G.ndim != 2:
            raise ValueError(f"G must have ndim 2, got shape {tuple(G.shape)}")
        return G, xp, _checks.float_kind(G, "G", cupy=_backend.is_cupy(xp))  # CuPy uint16: bfloat16 bits

    def _make_source(self, G):
        """What the groups read the gradients from (overridden for sharded gradients)."""
        return G

    def _run_damp(self, i: int):
        if isinstance(self._damp, np.ndarray):
            run = self._layout.runs[i]
            return self._damp[run.start : run.stop]
        key = self._layout.run_keys[i]
        return self._damp if key is None else key[-1]

    @property
    def damp(self):
        """λ: a float, a tuple with one value per block, or (per-coordinate damping) a new
        NumPy float64 array of length d."""
        return self._damp.copy() if isinstance(self._damp, np.ndarray) else self._damp

    @_backend.on_device
    def with_damp(self, damp) -> StaticInverse:
        """The same gradients with damping λ' (a scalar, or one value per block): a new operator
        sharing G and every Gram matrix, O(m³) per block and no pass over G, so a scan over many
        damps costs one O(dm²) construction. This operator is unchanged. A per-coordinate prior
        (before or after) is the exception: its Gram matrix G·D⁻¹·Gᵀ changes, so the operator is
        rebuilt, O(dm²)."""
        new_damp = _checks.damps(damp, len(self._layout.block_sizes), self._dim)
        if isinstance(new_damp, np.ndarray) or isinstance(self._damp, np.ndarray):
            # a per-coordinate prior changes the rescaled gradients G·Ĉ: their Gram matrix is new
            return StaticInverse(self._G, new_damp, scale=self._scale, block_size=self._layout.block_sizes,
                                 accumulate=self._accumulate)  # fmt: skip
        per_block = new_damp if isinstance(new_damp, tuple) else (new_damp,) * len(self._layout.block_sizes)
        old_run = [i for i, run in enumerate(self._layout.runs) for _ in range(run.count)]
        # runs never cross the old ones, so each new run is a slice of one old group
        layout = Layout(self._dim, self._layout.block_sizes, keys=list(zip(old_run, per_block)))
        groups = []
        for run, (i, lam) in zip(layout.runs, layout.run_keys):
            b0 = (run.start - self._layout.runs[i].start) // run.size
            groups.append(redamp_group(self._group_list[i], lam, (b0, b0 + run.count)))
        new = copy.copy(self)
        new._damp, new._layout, new._group_list = new_damp, layout, groups
        return new

    def _groups(self) -> list[Group]:
        return self._group_list

    def _anchor(self):
        return self._G.anchor if isinstance(self._G, (GradientSource, AccumulatedBlocks)) else self._G

    def _width(self) -> int:
        return self._G.shape[0]

    @property
    def num_gradients(self) -> int:
        """m, the number of gradients."""
        return self._G.shape[0]

    @property
    def scale(self) -> float:
        """s in F = λI + s·GᵀG."""
        return self._scale

    @property
    def storage_dtype(self) -> str:
        """The dtype G is stored in ("float64", "float32", "bfloat16" or "float16")."""
        return self._storage

    def __repr__(self) -> str:
        return (
            f"StaticInverse(m={self.num_gradients}, d={self._dim}, storage={self._storage}, damp={_show(self._damp)}, "
            f"scale={self._scale:g}, blocks={len(self._layout.block_sizes)})"
        )


def _show(damp) -> str:
    if isinstance(damp, np.ndarray):
        return f"per-coordinate ({damp.min():g}…{damp.max():g})"
    return f"{damp:g}" if isinstance(damp, float) else "(" + ", ".join(f"{v:g}" for v in damp) + ")"
