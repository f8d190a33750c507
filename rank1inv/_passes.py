"""Passes over the stored gradients with float64 accumulation (docs/design.md §3).

G is kept in the caller's dtype; every reduction over the long dimension accumulates in
float64 and each output is rounded once. Here that is done by converting cache-sized tiles
of G to float64 and handing them to BLAS, so memory stays O(tile) and the work is still
matrix-matrix where it can be. ``accumulate="native"`` skips the conversion (one BLAS call
in the storage dtype, the M-FAC reference behaviour).

Every pass takes ``scale``, the frame of ``rank1inv._scaling``: a power of two σ applied to all
of G, or one power of two σ_i per block and row, an array (nb, m) (gradients whose magnitudes
differ beyond what one frame holds); it computes with σG (row i times σ_i). Where float64
products of stored values are exact and cannot overflow (float32 and 16-bit storage) σ is
folded into the vectors or results, exactly; float64 storage with σ ≠ 1 (only for gradients
beyond 2^±256) is scaled tile by tile.

A *group* is an array ``Gg`` of shape (nb, m, B): nb equal blocks, each an m×B slice of G, or a
``_protocols.GradientView`` of that shape: a ``TiledView`` (gradients as layer factors,
``rank1inv.factored``), a ``rank1inv._chunks.ColumnChunks`` view (G read in column chunks:
Dask, host streaming) or a ``rank1inv.sharded.ShardedView`` (this rank's columns). Each pass
dispatches a view to its method of the same name in one line; the views run these functions
on the arrays they hold.
With float32 storage, passes with few vectors (the IHVP and push_apply hot path has one) go to
compiled kernels when ``_backend.kernels`` has them: the optional CPU extension
(``rank1inv.cpu``, up to 8 vectors, any number of blocks) on NumPy, the RawKernels
(``rank1inv.cuda``, one vector, one block) on CuPy. float64 storage needs no conversion and
makes one BLAS call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _backend, _comm, _precision
from ._comm import Communicator
from ._protocols import Array, GradientView, GroupGradients

TILE_ELEMENTS = 1 << 18  # float64 elements per tile on CPU for matrix-vector work (2 MiB, ~L2)
BLAS3_TILE_ELEMENTS = 1 << 22  # on CPU for matrix-matrix work (32 MiB): fewer, larger BLAS-3 calls
GPU_TILE_ELEMENTS = 1 << 25  # on CuPy for all work (256 MiB): each tile costs kernel launches


# -------------------------------------------------------------------- views and ranks (§12)
def communicator(Gg: GroupGradients) -> Communicator | None:
    """The Communicator of a view across ranks, None for any other group (one process)."""
    return Gg.communicator if isinstance(Gg, GradientView) else None


def agreement(Gg: GroupGradients, what: str, *names: str):
    """``_comm.agreement`` over the ranks of ``Gg`` (a no-op but for re-raising on one process):
    a call's local validation, then one reduction of the "I refused" flag and ``names``."""
    return _comm.agreement(communicator(Gg), what, *names)


def max_over_ranks(
    Gg: GroupGradients, values, err=None, what: str = "call", finite: bool = False, **checks
) -> np.ndarray:
    """The elementwise max of host ``values`` over the ranks of ``Gg`` (nan where any rank has a
    nan), carrying the agreement on ``err`` and ``checks`` in the same reduction
    (``_comm.agreed_max``); on one process ``err`` is raised and ``values`` returned."""
    return _comm.agreed_max(communicator(Gg), values, err, what, finite, **checks)


def sum_over_ranks(xp, Gg: GroupGradients, a):
    """The elementwise sum of ``a`` over the ranks of ``Gg`` (``a`` itself on one process)."""
    comm = communicator(Gg)
    if comm is None:
        return a
    return xp.asarray(comm.allreduce_sum(_backend.to_host(a)), device=_backend.device(a))


def global_width(Gg: GroupGradients) -> int:
    """B of the group's blocks over all shards."""
    return Gg.global_width if isinstance(Gg, GradientView) else Gg.shape[2]


def device_of(Gg: GroupGradients):
    """The device of a group's arrays (local shard, factors, or chunks' results)."""
    return Gg.device if isinstance(Gg, GradientView) else _backend.device(Gg)


def materialized(Gg: GroupGradients) -> bool:
    """Whether the group is held in memory as such (an array or a shard of one), so that caching
    an m×B float64 whitening of it is reasonable (not for layer factors or column chunks)."""
    return not isinstance(Gg, GradientView) or Gg.materialized


def is_unit(scale) -> bool:
    """Whether the frame ``scale`` is σ = 1 (no scaling)."""
    return isinstance(scale, float) and scale == 1.0


def _per_row(scale) -> bool:
    return not isinstance(scale, float)


def row_scale(xp, scale, b0: int = 0, b1: int | None = None, s0: int = 0, s1: int | None = None):
    """The frame of blocks b0:b1 (rows s0:s1) shaped to multiply (b, m, ·) arrays: σ itself, or
    the (b, m, 1) slice of a per-row frame (a device array of ``xp``)."""
    if not _per_row(scale):
        return scale
    return scale[b0:b1, s0:s1, None]


def _outer_scale(scale):
    """σ_iσ_j for a Gram matrix: σ², or the (nb, m, m) array of a per-row frame."""
    if not _per_row(scale):
        return scale * scale
    return scale[:, :, None] * scale[:, None, :]


def tile_budget(xp, matrix: bool = False) -> int:
    """float64 elements per tile: cache-sized on CPU, launch-amortising on a GPU."""
    if _backend.is_cupy(xp):
        return GPU_TILE_ELEMENTS
    return BLAS3_TILE_ELEMENTS if matrix else TILE_ELEMENTS


def tiles(count: int, length: int, width: int, budget: int = TILE_ELEMENTS):
    """Split (count blocks) × (length) into tiles of about ``budget / width`` elements each.

    Yields (b0, b1, c0, c1): blocks b0:b1, positions c0:c1 along the tiled axis.
    """
    per_block = length * width
    if per_block <= budget:
        step = max(1, budget // per_block)
        for b0 in range(0, count, step):
            yield b0, min(count, b0 + step), 0, length
    else:
        step = max(1, budget // max(width, 1))
        for b in range(count):
            for c0 in range(0, length, step):
                yield b, b + 1, c0, min(length, c0 + step)


def float64_tiles(xp, Gg: Array | TiledView, *, matrix: bool = False, rows: bool = False, scale=1.0):
    """Yield (b0, b1, s0, s1, tile): the tiles of ``tiles`` as float64 arrays of σG (σ =
    ``scale``), along G's columns (tile = Gg[b0:b1, :, s0:s1]) or, with ``rows``, along its rows
    (Gg[b0:b1, s0:s1, :]), of ``tile_budget(xp, matrix)`` elements (a ``TiledView`` builds
    them itself).

    Conversions go into one buffer reused from tile to tile (a fresh multi-MiB array per tile
    costs page faults comparable to the conversion itself), so a tile is only valid until the
    next one is yielded, and must not be written to (float64 storage with σ = 1 yields views
    of G)."""
    if isinstance(Gg, TiledView):
        yield from Gg.float64_tiles(tile_budget(xp, matrix), rows=rows, scale=scale)
        return
    nb, m, B = Gg.shape
    length, width = (m, B) if rows else (B, m)
    buf = None
    for b0, b1, s0, s1 in tiles(nb, length, width, tile_budget(xp, matrix)):
        src = Gg[b0:b1, s0:s1, :] if rows else Gg[b0:b1, :, s0:s1]
        if Gg.dtype == xp.float64 and is_unit(scale):
            yield b0, b1, s0, s1, src
            continue
        if buf is None:  # the first tile is the largest
            buf = xp.empty(src.shape, dtype=xp.float64, device=_backend.device(Gg))
        t = buf[: b1 - b0, : s1 - s0, :] if rows else buf[: b1 - b0, :, : s1 - s0]
        _backend.decode_into(xp, t, src)
        if not is_unit(scale):
            t *= row_scale(xp, scale, b0, b1, *((s0, s1) if rows else (0, None)))
        yield b0, b1, s0, s1, t


def _f64(xp, a):
    return xp.astype(a, xp.float64, copy=False)


def _scaled_tiles(xp, Gg: GroupGradients, scale) -> bool:
    """Whether σ must be applied tile by tile: float64 storage, whose products can overflow."""
    return not is_unit(scale) and not _precision.of_array(Gg, _backend.is_cupy(xp)).exact_products


def _single_call(xp, Gg: GroupGradients, accumulate: str) -> bool:
    """One library call on G as stored: float64 storage accumulates in float64 anyway; "native"
    asks for the storage dtype where the policy has a native pass (not for 16-bit storage,
    which then accumulates in float64 as by default)."""
    policy = _precision.of_array(Gg, _backend.is_cupy(xp))
    return policy.name == "float64" or (accumulate == "native" and policy.native == policy.name)


# -------------------------------------------------------------------- the passes
def gram(xp, Gg: GroupGradients, accumulate: str, scale=1.0, weights=None) -> Array:
    """(σGg·W)(σGg·W)ᵀ per block: (nb, m, m) float64, W = diag(``weights``) (nb, B) float64 or
    None (the identity). Cost O(nb·m²·B).

    Always accumulated in float64, also for ``accumulate="native"``: a float32 Gram matrix of
    nearly dependent gradients is often not even positive definite."""
    if isinstance(Gg, GradientView):
        return Gg.gram(accumulate, scale, weights)
    if weights is not None:
        return _tiled_gram(xp, Gg, scale, weights)
    if Gg.dtype == xp.float64 and is_unit(scale):
        return Gg @ xp.matrix_transpose(Gg)
    nb, m, _ = Gg.shape
    out = xp.zeros((nb, m, m), dtype=xp.float64, device=device_of(Gg))
    tiled = _scaled_tiles(xp, Gg, scale)
    for b0, b1, _, _, t in float64_tiles(xp, Gg, matrix=True, scale=scale if tiled else 1.0):
        out[b0:b1, ...] += t @ xp.matrix_transpose(t)
    return out if tiled else out * _outer_scale(scale)


def _tiled_gram(xp, Gg: GroupGradients, scale, weights):
    nb, m, _ = Gg.shape
    out = xp.zeros((nb, m, m), dtype=xp.float64, device=device_of(Gg))
    for b0, b1, c0, c1, t in float64_tiles(xp, Gg, matrix=True, scale=scale):
        tw = t if weights is None else t * weights[b0:b1, None, c0:c1]
        out[b0:b1, ...] += tw @ xp.matrix_transpose(tw)
    return out


def column_gram(xp, Gg: GroupGradients, accumulate: str, scale=1.0) -> Array:
    """(σGg)ᵀ(σGg) per block: (nb, B, B) float64. Cost O(nb·m·B²). Always float64 (see ``gram``)."""
    if isinstance(Gg, GradientView):
        return Gg.column_gram(accumulate, scale)
    if Gg.dtype == xp.float64 and is_unit(scale):
        return xp.matrix_transpose(Gg) @ Gg
    tiled = _scaled_tiles(xp, Gg, scale) or _per_row(scale)  # per-row σ_i weigh the sum over rows
    out = _tiled_column_gram(xp, Gg, scale if tiled else 1.0)
    return out if tiled else out * (scale * scale)


def _tiled_column_gram(xp, Gg: GroupGradients, scale):
    nb, _, B = Gg.shape
    out = xp.zeros((nb, B, B), dtype=xp.float64, device=device_of(Gg))
    for b0, b1, _, _, t in float64_tiles(xp, Gg, matrix=True, rows=True, scale=scale):
        out[b0:b1, ...] += xp.matrix_transpose(t) @ t
    return out


def project(xp, Gg: GroupGradients, X, accumulate: str, scale=1.0) -> Array:
    """(σGg) X per block: (nb, m, k) float64 for X of shape (nb, B, k). Cost O(nb·m·B·k)."""
    if isinstance(Gg, GradientView):
        return Gg.project(X, accumulate, scale)
    nb, m, B = Gg.shape
    k = X.shape[-1]
    if _scaled_tiles(xp, Gg, scale):
        return _tiled_project(xp, Gg, X, scale)
    if _single_call(xp, Gg, accumulate):
        out = _f64(xp, Gg @ xp.astype(X, Gg.dtype))
    else:
        kern = _backend.kernels(xp)
        if kern is not None and kern.usable(Gg, k):
            out = kern.project(Gg, X)
        else:
            out = _tiled_project(xp, Gg, X, 1.0)
    return out if is_unit(scale) else out * row_scale(xp, scale)


def _tiled_project(xp, Gg: GroupGradients, X, scale):
    nb, m, _ = Gg.shape
    out = xp.zeros((nb, m, X.shape[-1]), dtype=xp.float64, device=device_of(Gg))
    for b0, b1, c0, c1, t in float64_tiles(xp, Gg, scale=scale):
        out[b0:b1, ...] += t @ X[b0:b1, c0:c1, :]
    return out


def project_sumsq(xp, Gg: GroupGradients, X, accumulate: str, scale=1.0, weights=None) -> tuple[Array, Array]:
    """(``project`` of X·W, Σ_i X[b, i, j]²): the first pass of an IHVP and the size of its
    right-hand sides, (nb, m, k) and (nb, k) float64, over all shards, in one reduction: one
    all-reduce of (m + 1)·k floats per block when sharded, one compute when chunked. W =
    diag(``weights``) (nb, B) or None."""
    if isinstance(Gg, GradientView):
        return Gg.project_sumsq(X, accumulate, scale, weights)
    XW = X if weights is None else X * weights[:, :, None]
    return project(xp, Gg, XW, accumulate, scale), _backend.sumsq(xp, X)


def project_gram(xp, Gg: GroupGradients, X, accumulate: str, scale=1.0) -> tuple[Array, Array]:
    """(``project`` of X, XᵀX per block): the Gram row of new window gradients X (nb, B, k)
    against the stored ones and their own k×k Gram matrix, (nb, m, k) and (nb, k, k) float64,
    over all shards in one reduction. σ applies to G only (X arrives scaled)."""
    if isinstance(Gg, GradientView):
        return Gg.project_gram(X, accumulate, scale)
    nb, m, _ = Gg.shape
    P = project(xp, Gg, X, accumulate, scale) if m else xp.zeros((nb, 0, X.shape[-1]), dtype=xp.float64)
    return P, inner_products(xp, X)


def inner_products(xp, X):
    """XᵀX per block (nb, k, k) for X (nb, B, k); for k = 1 no BLAS call (it would wake
    multi-threaded BLAS, docs/benchmarks.md) and no temporary."""
    if X.shape[-1] == 1:
        return xp.reshape(_backend.sumsq(xp, X), (X.shape[0], 1, 1))
    return xp.matrix_transpose(X) @ X


def combine(
    xp, Gg: GroupGradients, X, C, alpha: float, beta: float, accumulate: str, scale=1.0, *, overwrite=False
) -> Array:
    """alpha·X + beta·(σGg)ᵀ C per block: (nb, B, k) float64. Cost O(nb·m·B·k).

    X is (nb, B, k) float64 or None (no alpha term), C is (nb, m, k) float64. This is the
    output pass of an inverse-vector product (alpha = 1/λ, beta = -1/λ) and of a Fisher product.
    With ``overwrite`` the result may be written into X (a d-long float64 array less: each
    element of X is read before its result is written).
    """
    target = X if (overwrite and X is not None) else None
    if isinstance(Gg, GradientView):
        return Gg.combine(X, C, alpha, beta, accumulate, scale, out=target)
    nb, m, B = Gg.shape
    k = C.shape[-1]
    tiled = _scaled_tiles(xp, Gg, scale)
    if not tiled and _per_row(scale):  # σ_i folded into C where products are exact
        C = C * row_scale(xp, scale)
    elif not tiled:
        beta = beta * scale  # σ folded into beta where products are exact
    if not tiled:
        if _single_call(xp, Gg, accumulate):
            low = beta * _f64(xp, xp.matrix_transpose(Gg) @ xp.astype(C, Gg.dtype))
            return low if X is None else alpha * X + low
        kern = _backend.kernels(xp)
        if kern is not None and kern.usable(Gg, k):
            return kern.combine(Gg, X, C, alpha, beta, out=target)
    return _tiled_combine(xp, Gg, X, C, alpha, beta, scale if tiled else 1.0, target)


def _tiled_combine(xp, Gg: GroupGradients, X, C, alpha, beta, scale, out=None):
    nb, _, B = Gg.shape
    k = C.shape[-1]
    out = out if out is not None else xp.empty((nb, B, k), dtype=xp.float64, device=device_of(Gg))
    for b0, b1, c0, c1, t in float64_tiles(xp, Gg, scale=scale):
        part = beta * (xp.matrix_transpose(t) @ C[b0:b1, ...])
        out[b0:b1, c0:c1, :] = part if X is None else alpha * X[b0:b1, c0:c1, :] + part
    return out


def column_sumsq(xp, Gg: GroupGradients, scale=1.0, weights=None) -> Array:
    """Σ_i (σG[i, j]·w_j)² per column: (nb, B) float64 (``weights`` as in ``gram``). Cost O(nb·m·B)."""
    if isinstance(Gg, GradientView):
        return Gg.column_sumsq(scale, weights)
    tiled = _scaled_tiles(xp, Gg, scale) or weights is not None or _per_row(scale)
    out = _tiled_column_sumsq(xp, Gg, scale if tiled else 1.0, weights)
    return out if tiled else out * (scale * scale)


def _tiled_column_sumsq(xp, Gg: GroupGradients, scale, weights):
    nb, _, B = Gg.shape
    out = xp.empty((nb, B), dtype=xp.float64, device=device_of(Gg))
    for b0, b1, c0, c1, t in float64_tiles(xp, Gg, scale=scale):
        out[b0:b1, c0:c1] = _backend.column_sumsq(xp, t if weights is None else t * weights[b0:b1, None, c0:c1])
    return out


def map_tiles(xp, Gg: GroupGradients, fn, scale=1.0, weights=None) -> Array:
    """Results of ``fn(b0, b1, tile)`` over float64 tiles (b1-b0, m, c) of σGg·W (``weights`` as
    in ``gram``), assembled along the columns: fn returns (b1-b0, r, c) (e.g. L⁻¹·tile, r = m)
    or (b1-b0, c) (a per-column reduction); the result is (nb, r, B) or (nb, B). fn must not
    keep the tile (see ``float64_tiles``)."""
    if isinstance(Gg, GradientView) and not isinstance(Gg, TiledView):
        return Gg.map_tiles(fn, scale, weights)
    nb, _, B = Gg.shape
    out = None
    for b0, b1, c0, c1, t in float64_tiles(xp, Gg, matrix=True, scale=scale):
        part = fn(b0, b1, t if weights is None else t * weights[b0:b1, None, c0:c1])
        if out is None:
            out = xp.empty((nb, *part.shape[1:-1], B), dtype=xp.float64, device=device_of(Gg))
        out[b0:b1, ..., c0:c1] = part
    return out


def columns(xp, Gg: GroupGradients, blocks, offsets) -> Array:
    """Columns g_j of blocks ``blocks`` at local ``offsets``: (n, m) float64 (decoded exactly)."""
    if isinstance(Gg, GradientView):
        return Gg.columns(blocks, offsets)
    cols = xp.empty((offsets.shape[0], Gg.shape[1]), dtype=xp.float64, device=_backend.device(offsets))
    _backend.decode_into(xp, cols, Gg[blocks, :, offsets])
    return cols


def column_max_abs(xp, Gg: GroupGradients) -> Array:
    """max_i |G[i, j]| per column: (nb, B) float64 (nan where a column has a nan). O(nb·m·B)."""
    nb, m, B = Gg.shape
    out = xp.empty((nb, B), dtype=xp.float64, device=device_of(Gg))
    for b0, b1, c0, c1, t in float64_tiles(xp, Gg):
        out[b0:b1, c0:c1] = xp.max(xp.abs(t), axis=1)
    return out


def max_abs(xp, Gg: GroupGradients) -> float:
    """max |Gg| for a group (nb, m, B), a matrix (m, d) or a vector (d,) of any storage dtype, as
    a host float (nan or inf if there is a non-finite value; 0.0 if empty). In tiles of about
    ``TILE_ELEMENTS`` values, so the check costs no m·d temporary; one scalar read back."""
    if isinstance(Gg, GradientView):
        return Gg.max_abs()
    if Gg.ndim < 3:
        Gg = xp.reshape(Gg, (1,) * (3 - Gg.ndim) + tuple(Gg.shape))
    nb, m, B = Gg.shape
    if nb * m * B == 0:
        return 0.0
    top = None
    for b0, b1, c0, c1 in tiles(nb, B, m, tile_budget(xp)):
        part = xp.astype(xp.max(xp.abs(_backend.decoded(xp, Gg[b0:b1, :, c0:c1]))), xp.float64)
        top = part if top is None else xp.maximum(top, part)  # nan propagates
    return float(top) if top is not None else 0.0


def row_max_abs(xp, Gg: GroupGradients, weights=None) -> np.ndarray:
    """max_j |G[b, i, j]·w_j| per block and row of a group (nb, m, B), ``weights`` as in ``gram``
    (or None): a host float64 array (nb, m), nan/inf where a row has a non-finite value. The
    per-row frames of ``rank1inv._scaling.row_frames`` come from it (and the finiteness check).
    In tiles, no m·d temporary; one (nb, m) read back."""
    if isinstance(Gg, GradientView):
        return Gg.row_max_abs(weights)
    nb, m, B = Gg.shape
    out = xp.zeros((nb, m), dtype=xp.float64, device=device_of(Gg))
    if nb * m * B == 0:
        return _backend.to_host(out)
    for b0, b1, c0, c1 in tiles(nb, B, m, tile_budget(xp)):
        t = xp.abs(xp.astype(_backend.decoded(xp, Gg[b0:b1, :, c0:c1]), xp.float64))
        if weights is not None:
            t = t * weights[b0:b1, None, c0:c1]
        out[b0:b1, :] = xp.maximum(out[b0:b1, :], xp.max(t, axis=2))  # nan propagates
    return np.asarray(_backend.to_host(out), dtype=np.float64)


# -------------------------------------------------------------------- views built from tiles
class TiledView(GradientView):
    """A view that builds float64 tiles of σG itself (``float64_tiles``): every pass runs on its
    tiles here; subclasses replace the passes they can do better (the layer factors' formulas).
    Subclasses set ``xp``, ``shape``, ``dtype`` and implement ``float64_tiles``, ``columns`` and
    ``device``."""

    xp: Any = None

    def float64_tiles(self, budget: int, rows: bool = False, scale=1.0):  # pragma: no cover - abstract
        """Yield (b0, b1, s0, s1, tile) as ``_passes.float64_tiles`` does, of at most ``budget``."""
        raise NotImplementedError

    def gram(self, accumulate: str, scale=1.0, weights=None):
        return _tiled_gram(self.xp, self, scale, weights)

    def column_gram(self, accumulate: str, scale=1.0):
        return _tiled_column_gram(self.xp, self, scale)

    def project(self, X, accumulate: str, scale=1.0):
        return _tiled_project(self.xp, self, X, scale)

    def project_sumsq(self, X, accumulate: str, scale=1.0, weights=None):
        XW = X if weights is None else X * weights[:, :, None]
        return self.project(XW, accumulate, scale), _backend.sumsq(self.xp, X)

    def project_gram(self, X, accumulate: str, scale=1.0):
        return self.project(X, accumulate, scale), inner_products(self.xp, X)

    def combine(self, X, C, alpha: float, beta: float, accumulate: str, scale=1.0, out=None):
        return _tiled_combine(self.xp, self, X, C, alpha, beta, scale, out)

    def column_sumsq(self, scale=1.0, weights=None):
        return _tiled_column_sumsq(self.xp, self, scale, weights)

    def map_tiles(self, fn, scale=1.0, weights=None):
        return map_tiles(self.xp, self, fn, scale, weights)

    def row_max_abs(self, weights=None):
        xp = self.xp
        nb, m, _ = self.shape
        out = xp.zeros((nb, m), dtype=xp.float64, device=self.device)
        for b0, b1, c0, c1, t in float64_tiles(xp, self):
            t = xp.abs(t) if weights is None else xp.abs(t) * weights[b0:b1, None, c0:c1]
            out[b0:b1, :] = xp.maximum(out[b0:b1, :], xp.max(t, axis=2))
        return np.asarray(_backend.to_host(out), dtype=np.float64)

    def max_abs(self) -> float:
        rows = self.row_max_abs()
        return float(np.max(rows)) if rows.size else 0.0
