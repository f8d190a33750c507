"""StaticInverse: F⁻¹ for a fixed set of gradients (WoodFisher / M-FAC pruning)."""

from __future__ import annotations

import copy

import numpy as np

from . import _backend, _checks, _passes, _precision, _scaling
from ._blocks import Layout
from ._dense import DenseGroup
from ._operator import InverseOperator
from ._prior import PriorGroup
from ._woodbury import WoodburyGroup
from .factored import FactoredGradients
from .streamed import StreamedGradients


def group_view(xp, G, run):
    """The run's blocks of G (m, d) as a group array (count, m, size): a view, no copy (for
    factored gradients a ``FactoredView``, for sharded ones a ``_passes.ShardedView``, for
    chunked or streamed ones a ``_chunks.ColumnChunks`` view)."""
    if isinstance(G, (FactoredGradients, StreamedGradients)):
        return G.view(run.start, run.count, run.size)
    if isinstance(G, _passes.ShardedView) or _passes.is_chunked(G):  # one block (d > m)
        return G
    m = G.shape[0]
    return xp.permute_dims(xp.reshape(G[:, run.start : run.stop], (m, run.count, run.size)), (1, 0, 2))


def make_group(xp, G, run, damp, scale: float, accumulate: str, known=None):
    """The group serving one run of equal blocks of G (m, d): gradient space if the blocks are
    wider than m (Woodbury), parameter space otherwise (docs/design.md §3: no cancellation). Its
    frames (docs/design.md §4: one per block and gradient in gradient space, one per run in
    parameter space) come from the run's max|g_i| per block and row, which is also the finiteness
    check (kept on the group as ``row_max`` for re-damping). ``known`` = (G'G'ᵀ, its per-row
    frames) skips the Gram pass of a one-block Woodbury group (a window's Gram matrix,
    ``DynamicInverse.with_damp``)."""
    Gg = group_view(xp, G, run)
    rows = _passes.row_max_abs(xp, Gg)
    if not np.all(np.isfinite(rows)):
        raise ValueError("G contains non-finite values (nan or inf)")
    top = float(rows.max()) if rows.size else 0.0
    exact = _precision.of_array(G, _backend.is_cupy(xp)).exact_products
    if not isinstance(damp, float):  # per-coordinate δ for the run (docs/design.md §10)
        delta = xp.reshape(xp.asarray(damp, device=_backend.device(G)), (run.count, run.size))
        if run.size > Gg.shape[1]:
            return PriorGroup(xp, Gg, delta, scale, accumulate, exact)
        frame = _scaling.frame_exponent(top, float(xp.max(delta)), scale, exact)
        return DenseGroup(xp, Gg, delta, scale, accumulate, frame=frame)
    if _passes.global_width(Gg) > Gg.shape[1]:  # wider than m (over all shards)
        frames = _scaling.row_frames(rows, damp, scale, exact)
        gram = None
        if known is not None:
            k = _scaling.rescale_exponents(known[1][None, :], frames)
            gram = _backend.ldexp(xp, known[0][None, ...], xp.asarray(k, device=_backend.device(known[0])))
        group = WoodburyGroup(xp, Gg, damp, scale, accumulate, frame=frames, gram=gram)
    else:
        group = DenseGroup(xp, Gg, damp, scale, accumulate, frame=_scaling.frame_exponent(top, damp, scale, exact))
    group.row_max, group.exact_products = rows, exact
    return group


def redamp_group(group, damp: float, blocks):
    """Blocks b0:b1 of ``group`` with damping λ' (the frames recomputed for it), the Gram matrix
    reused (frames are powers of two: rescaling it is exact)."""
    b0, b1 = blocks
    rows = group.row_max[b0:b1]
    if isinstance(group, WoodburyGroup):
        frame = _scaling.row_frames(rows, damp, group.scale, group.exact_products)
    else:
        frame = _scaling.frame_exponent(float(rows.max()), damp, group.scale, group.exact_products)
    new = group.redamped(damp, frame, blocks)
    new.row_max, new.exact_products = rows, group.exact_products
    return new


def _damp_layout(dim: int, block_size, damp):
    """(damp as stored: a float or a tuple per block, the layout keyed by per-block damps)."""
    sizes = Layout(dim, block_size).block_sizes
    value = _checks.damps(damp, len(sizes), dim)
    if isinstance(value, tuple):
        return value, Layout(dim, sizes, keys=[(v,) for v in value])
    return value, Layout(dim, sizes)


class StaticInverse(InverseOperator):
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

    def __init__(self, G, damp, *, scale=None, block_size=None, accumulate="float64", _gram=None, comm=None):
        if isinstance(G, FactoredGradients):  # layer factors, never an m×d array
            xp = G.xp
            policy = _precision.name_of(G.dtype)
        elif isinstance(G, StreamedGradients):  # host memory, streamed to xp's device per pass
            xp, policy = G.xp, G.storage
            if block_size is not None or G.shape[1] <= G.shape[0] or not isinstance(damp, (int, float, np.floating)):
                raise ValueError("streamed gradients take one block (block_size=None), d > m and one damping value")
        else:
            G = _checks.as_array(G, "G")
            xp = _backend.namespace(G)
            if G.ndim != 2:
                raise ValueError(f"G must have ndim 2, got shape {tuple(G.shape)}")
            policy = _checks.float_kind(G, "G", cupy=_backend.is_cupy(xp))  # CuPy uint16: bfloat16 bits
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
                make_group(xp, source, run, self._run_damp(i), self._scale, self._accumulate, _gram)
                for i, run in enumerate(self._layout.runs)
            ]

    def __new__(cls, *args, comm=None, **kwargs):
        if comm is not None and cls is StaticInverse:  # gradients sharded along d
            from .sharded import ShardedInverse

            return super().__new__(ShardedInverse)
        G = args[0] if args else kwargs.get("G")
        if _backend.is_dask_array(G) and cls is StaticInverse:  # chunked along d
            from .chunked import DaskInverse

            return super().__new__(DaskInverse)
        return super().__new__(cls)

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

    def _groups(self):
        return self._group_list

    def _anchor(self):
        return self._G.anchor if isinstance(self._G, (FactoredGradients, StreamedGradients)) else self._G

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
