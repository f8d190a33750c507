"""Fisher blocks accumulated from a stream of gradients, never stored (docs/design.md §15).

Blocked OBS (WoodFisher, the Optimal BERT Surgeon) uses many gradients and small blocks: at
m = 1024 and blocks of B = 50 a stored G (m × d) is 20× the blocks Σ_i g_{i,b}g_{i,b}ᵀ
themselves. ``BlockAccumulator`` adds each gradient's contribution to every block's B×B Gram
matrix in float64 as it arrives and drops the gradient; ``StaticInverse(acc, damp)`` (or
``StaticInverse.from_stream``) then serves every query from those matrices (the dense groups of
docs/design.md §3, which need nothing else).

Frames (docs/design.md §4): each run of equal blocks keeps its sum as 2^(-2A)·Σ gᵀg with A the
exponent of the largest |g| it has seen, so the sums stay of order one; when a larger gradient
arrives the sums are rescaled by a power of two (exact unless a term falls below float64's
range, where it is negligible against the new ones). The group that serves the run reads the
same array with an exponent shift (``groups.dense.DenseGroup``'s ``gram_shift``).

A run keeps the gradients' slices of its blocks instead while they are fewer than B and cost at
most a quarter of its Gram matrices (``m·itemsize ≤ 2·B``): that is StaticInverse's own input
for those blocks (Woodbury when B > m, as for a stored G), so a stream of a few gradients over
wide blocks is served exactly as a stored G. Once more gradients have arrived, the slices are
folded into the Gram matrices and dropped; blocks still wider than the final m are then served
densely (backward-stable, O(B³) per block), which refuses the numerically singular blocks that
the Woodbury form would have handled (damping below about B·ε·‖G_bᵀG_b‖/m).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _backend, _checks, _passes, _precision, _scaling
from ._blocks import Layout, Run
from ._protocols import Group
from .groups import group_view, make_group
from .groups.dense import DenseGroup, _Shape

TILE_BYTES = 2 << 20  # float64 scratch per step of an accumulation (blocks at a time; measured best of 0.5/2/8 MiB)
SLICE_BUDGET = 2  # slices are kept while count·itemsize ≤ SLICE_BUDGET·B (a quarter of the Gram)


class _RunSums:
    """One run of equal blocks: its Gram matrices in frame A, or the gradients' slices."""

    __slots__ = ("run", "gram", "frame", "slices", "block_max")

    def __init__(self, run: Run):
        self.run = run
        self.gram: Any = None  # (count, B, B) float64, 2^(-2·frame)·Σ gᵀg
        self.frame = 0
        self.slices: list = []  # stored-dtype pieces (k, count·B), in arrival order
        self.block_max = np.zeros(run.count)  # max |g| per block seen so far (host)

    def copy(self) -> _RunSums:
        new = _RunSums(self.run)
        new.gram = None if self.gram is None else self.gram.copy()
        new.frame, new.slices = self.frame, list(self.slices)  # slices are never written
        new.block_max = self.block_max.copy()
        return new


class BlockAccumulator(_backend.HoldsNamespace):
    """The diagonal blocks of Σ gᵢgᵢᵀ, accumulated from gradients that are not kept.

    Parameters
    ----------
    dim : int
        d, the gradients' length.
    block_size : None, int or sequence of ints
        The block layout, as in ``StaticInverse`` (uniform, per layer, a short last block).
    dtype : None or a storage dtype name ("float64", "float32", "bfloat16", "float16")
        The storage precision: gradients are rounded to it first, so the operator equals
        ``StaticInverse`` on the same gradients stored in that dtype. None: the first batch's.

    Memory: d·B·8 bytes of float64 blocks (blocks of B) plus 2 MiB of scratch, whatever the
    number of gradients; a wide run holds its gradients' slices instead while they cost less
    than a quarter of that. NumPy or CuPy, decided by the first batch.
    """

    def __init__(self, dim: int, block_size=None, *, dtype=None):
        self._dim = _checks.positive_int(dim, "dim")
        self._layout = Layout(self._dim, block_size)
        self._storage: Any = None if dtype is None else _precision.of(dtype).name
        self._runs = [_RunSums(run) for run in self._layout.runs]
        self._count = 0
        self._xp: Any = None
        self._shared = False  # an operator reads the current arrays: copy before the next write

    # -- what it holds ---------------------------------------------------------------------
    @property
    def count(self) -> int:
        """m, the number of gradients added so far."""
        return self._count

    @property
    def dim(self) -> int:
        """d, the gradients' length."""
        return self._dim

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """The block lengths (the layout every operator made from it has)."""
        return self._layout.block_sizes

    @property
    def storage_dtype(self) -> str | None:
        """The storage dtype (None until the first batch when it was not given)."""
        return self._storage

    @property
    def shape(self) -> tuple[int, int]:
        """(m, d), as G would have."""
        return (self._count, self._dim)

    def mean_square(self) -> float:
        """mean diag(GᵀG/m) = Σ‖gᵢ‖²/(m·d) (what ``obs.relative_damp`` scales). O(blocks)."""
        if self._count == 0:
            raise ValueError("no gradients accumulated yet")
        total = 0.0
        for r in self._runs:
            if r.gram is not None:  # Σ‖g‖² is the trace of the sums
                total += float(np.ldexp(float(self._xp.sum(self._xp.linalg.diagonal(r.gram))), 2 * r.frame))
            elif r.block_max.max() > 0:  # slices: Σ(σg)² in the frame of their largest entry
                e = _scaling.exponent(float(r.block_max.max()))
                for piece in r.slices:
                    col = _passes.column_sumsq(self._xp, piece[None, ...], _scaling.pow2(-e))
                    total += float(np.ldexp(float(self._xp.sum(col)), 2 * e))
        return total / (self._count * self._dim)

    # -- adding ----------------------------------------------------------------------------
    def add(self, g) -> None:
        """Add one gradient g (d,). O(d·B) flops in float64 BLAS-3 batches; g is not kept."""
        g = _checks.as_array(g, "g", self._xp)
        if g.ndim != 1:
            raise ValueError(f"g must have ndim 1, got shape {tuple(g.shape)}")
        self.add_many(g[None, :])

    def add_many(self, G) -> None:
        """Add the k rows of G (k, d), NumPy or CuPy in any storage dtype (rounded to the
        accumulator's): O(k·d·B) flops as batched float64 GEMMs of at most 2 MiB scratch, plus
        one read and write of the d·B·8 bytes of sums (what bounds it for small k). The
        rows are not kept (except the slices of wide runs, see the class). Non-finite values
        raise ValueError and leave the accumulator unchanged."""
        G = _checks.as_array(G, "G", self._xp)
        xp = _backend.namespace(G)
        if self._xp is not None and xp is not self._xp:
            raise TypeError(f"gradients on {_backend.namespace_name(xp)} after {_backend.namespace_name(self._xp)}")
        if G.ndim != 2 or G.shape[1] != self._dim:
            raise ValueError(f"G must have shape (k, {self._dim}), got {tuple(G.shape)}")
        kind = _checks.float_kind(G, "G", cupy=_backend.is_cupy(xp))
        storage = self._storage or kind
        k = G.shape[0]
        if k == 0:
            return
        stored = G if kind == storage else _backend.encode(xp, G, storage)
        tops = [_passes.row_max_abs(xp, group_view(xp, stored, r.run)) for r in self._runs]  # (count, k)
        if not all(np.all(np.isfinite(t)) for t in tops):
            raise ValueError("G contains non-finite values (nan or inf), or values that overflow its storage dtype")
        # validated: from here on the call cannot fail on its input
        self._xp, self._storage = xp, storage
        if self._shared:
            self._runs = [r.copy() for r in self._runs]
            self._shared = False
        itemsize = _precision.of(storage).itemsize
        for sums, top in zip(self._runs, tops):
            self._add_run(xp, sums, stored, top.max(axis=1), itemsize)
        self._count += k

    def _add_run(self, xp, sums: _RunSums, stored, batch_max, itemsize: int) -> None:
        run = sums.run
        only_zeros = not sums.block_max.any()  # so far: the sums are zero in any frame
        sums.block_max = np.maximum(sums.block_max, batch_max)
        top = float(sums.block_max.max())
        count = self._count + stored.shape[0]
        if sums.gram is None and count <= run.size and count * itemsize <= SLICE_BUDGET * run.size:
            sums.slices.append(xp.asarray(stored[:, run.start : run.stop], copy=True))
            return
        new_frame = _scaling.exponent(top) if top > 0 else sums.frame
        if sums.gram is None:  # fold the kept slices in, then drop them
            sums.gram = xp.zeros((run.count, run.size, run.size), dtype=xp.float64, device=_backend.device(stored))
            sums.frame = new_frame
            pieces, sums.slices = sums.slices, []
            for piece in pieces:
                self._accumulate(xp, sums, piece)
        elif only_zeros:
            sums.frame = new_frame
        elif new_frame > sums.frame:  # a larger gradient: the sums move to its frame, by 2^(2ΔA)
            _backend.ldexp(xp, sums.gram, 2 * (sums.frame - new_frame), out=sums.gram)
            sums.frame = new_frame
        self._accumulate(xp, sums, stored[:, run.start : run.stop])

    @staticmethod
    def _accumulate(xp, sums: _RunSums, piece) -> None:
        """gram[b] += (2^-A·g_b)ᵀ(2^-A·g_b) over the rows of ``piece`` (k, count·B), a few blocks
        at a time through one float64 scratch buffer."""
        run, k = sums.run, piece.shape[0]
        B = run.size
        step = max(1, TILE_BYTES // (8 * B * (k + B)))
        sigma = -sums.frame
        factor = _scaling.pow2(sigma) if abs(sigma) <= 1022 else 0.0
        fused = factor != 0.0 and not _backend.is_cupy(xp) and piece.dtype in (np.float32, np.float64)
        dev = _backend.device(piece)
        buf = xp.empty((min(step, run.count), k, B), dtype=xp.float64, device=dev)
        prod = xp.empty((min(step, run.count), B, B), dtype=xp.float64, device=dev)
        for b0 in range(0, run.count, step):
            b1 = min(run.count, b0 + step)
            t, p = buf[: b1 - b0], prod[: b1 - b0]
            src = xp.permute_dims(xp.reshape(piece[:, b0 * B : b1 * B], (k, b1 - b0, B)), (1, 0, 2))
            if fused:  # decode and scale in one pass (a normal power of two: exact)
                np.multiply(src, factor, out=t)
            else:
                _backend.decode_into(xp, t, src)
                _backend.ldexp(xp, t, sigma, out=t)
            _backend.matmul(xp, xp.matrix_transpose(t), t, out=p)
            sums.gram[b0:b1] += p

    # -- what an operator reads --------------------------------------------------------------
    def _parts(self) -> AccumulatedBlocks:
        """The current sums for an operator (no copy: the next ``add`` copies first)."""
        if self._count == 0:
            raise ValueError("no gradients accumulated yet")
        self._shared = True
        return AccumulatedBlocks(self._xp, self._layout, self._runs, self._count, self._storage)


class AccumulatedBlocks(_backend.HoldsNamespace):
    """What ``StaticInverse`` reads from a ``BlockAccumulator``: its layout, its runs' Gram
    matrices or slices, m and the storage dtype. Immutable (the accumulator copies before it
    writes again)."""

    def __init__(self, xp, layout: Layout, runs: list, count: int, storage: str):
        self.xp, self.layout, self.runs, self.storage = xp, layout, runs, storage
        self.shape = (count, layout.dim)
        self.anchor = next((r.gram for r in runs if r.gram is not None), None)
        if self.anchor is None:
            self.anchor = runs[0].slices[0]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return self.layout.block_sizes

    def make_group(self, run: Run, damp, scale: float, accumulate: str) -> Group:
        """The group serving ``run`` (a run of the operator's layout, inside one of the
        accumulator's runs): from the Gram matrices (no pass over anything of length m·d), or
        from the slices as ``make_group`` does for a stored G."""
        xp = self.xp
        i = int(np.searchsorted(self.layout.run_starts, run.start, side="right")) - 1
        sums = self.runs[i]
        b0 = (run.start - sums.run.start) // sums.run.size
        if sums.gram is None:
            G = sums.slices[0] if len(sums.slices) == 1 else xp.concat(sums.slices, axis=0)
            local = Run(run.start - sums.run.start, run.count, run.size)
            return make_group(xp, G, local, damp, scale, accumulate)
        exact = _precision.of(self.storage).exact_products
        rows = sums.block_max[b0 : b0 + run.count, None]
        top = float(rows.max())
        if isinstance(damp, float):
            frame = _scaling.frame_exponent(top, damp, scale, exact)
        else:
            damp = xp.reshape(xp.asarray(damp, device=_backend.device(sums.gram)), (run.count, run.size))
            frame = _scaling.frame_exponent(top, float(xp.max(damp)), scale, exact)
        gram = sums.gram[b0 : b0 + run.count]
        try:
            return DenseGroup(xp, _Shape(run.count, self.shape[0], run.size), damp, scale, "float64", frame=frame,
                              gram=gram, row_max=rows, exact_products=exact,
                              gram_shift=2 * (sums.frame - frame))  # fmt: skip
        except ValueError as err:
            if self.shape[0] >= run.size:
                raise
            raise ValueError(
                f"blocks of {run.size} are wider than the {self.shape[0]} gradients and numerically singular "
                "at this damping: a stored G would use the Woodbury form, but the accumulator folded the "
                "gradients' slices into Gram matrices once they cost a quarter of them (a larger damp, or "
                "StaticInverse on the stored gradients)"
            ) from err


def consume(batches, dim: int, block_size, dtype) -> AccumulatedBlocks:
    """Accumulate every item of ``batches`` (gradients (d,) or mini-batches (k, d)) into a new
    accumulator and return its parts."""
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError("batches must be an iterable of gradients (d,) or of batches of them (k, d)")
    acc = BlockAccumulator(dim, block_size, dtype=dtype)
    for item in batches:
        item = _checks.as_array(item, "batch", acc._xp)
        if item.ndim == 1:
            acc.add(item)
        else:
            acc.add_many(item)
    return acc._parts()
