"""Gradients read as column chunks: the passes of ``_passes`` over a G that is not one array in
the compute namespace (docs/design.md §13).

A ``ColumnChunks`` view has the group shape (1, m, d) (one block, d > m) and splits d into
chunks of whole columns. Every pass is the one-process pass of ``_passes`` on each chunk (a
(1, m, c) group in the chunk's namespace): reductions sum the chunks' m-sized partial results in
a fixed order, d-local passes assemble the chunks' results along the columns. Subclasses say
*how* chunks are reached: ``chunked.ChunkedView`` runs one Dask task per chunk (lazy d-long
results), ``streamed.StreamedView`` copies host chunks to the device through pinned buffers
(eager device results). ``ColumnChunks`` is a ``_protocols.GradientView``: ``_passes``
dispatches it in one line per pass.
"""

from __future__ import annotations

import operator
from abc import abstractmethod

import numpy as np

from . import _backend, _passes
from ._protocols import GradientView

PRIOR_REFUSED = "gradients read in chunks take one damping value (a per-coordinate prior: not yet)"


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


class ColumnChunks(_backend.HoldsNamespace, GradientView):
    """Group array (1, m, d) read chunk by chunk. Subclasses set ``shape``, ``dtype``, ``xp``
    (the namespace of the m×m algebra and of the chunks' results) and ``cuts`` (chunk widths),
    and implement ``_reduce``, ``_map`` and ``columns``."""

    _device = None  # where the chunks' results live (None: the namespace's default device)

    @property
    def device(self):
        return self._device

    @abstractmethod
    def _reduce(self, fn, X=None, combine=operator.add):
        """Σ (``combine``, in a fixed order) over the chunks of fn(xp, G chunk (1, m, c)[, X chunk
        (1, c, k)]): an array of ``xp``."""

    @abstractmethod
    def _map(self, fn, X=None, *, rows=None, width=None):
        """fn(xp, G chunk[, X chunk]) per chunk, assembled along the columns: each result is
        (1, c, width) (``width``), (1, rows, c) (``rows``) or (1, c) (neither)."""

    @abstractmethod
    def columns(self, blocks, offsets):
        """Columns of G at ``offsets``: (n, m) float64 in ``xp``."""

    # -- reductions over d: m-sized results ----------------------------------------------
    def max_abs(self) -> float:
        top = self._reduce(lambda xp, g: np.array(_passes.max_abs(xp, g)), combine=np.maximum)  # nan propagates
        return float(top)

    def row_max_abs(self, weights=None):
        """max_j |G[i, j]| per row: host float64 (1, m) (``_passes.row_max_abs``)."""
        if weights is not None:
            raise ValueError(PRIOR_REFUSED)
        return np.asarray(self._reduce(lambda xp, g: _passes.row_max_abs(xp, g), combine=np.maximum))

    def gram(self, accumulate, scale=1.0, weights=None):
        if weights is not None:
            raise ValueError(PRIOR_REFUSED)
        return self._reduce(lambda xp, g: _passes.gram(xp, g, accumulate, scale))

    def project(self, X, accumulate, scale=1.0):
        return self._reduce(lambda xp, g, x: _passes.project(xp, g, x, accumulate, scale), X)

    def project_sumsq(self, X, accumulate, scale=1.0, weights=None):
        """(project(X), Σ X²) in one reduction (``_passes.project_sumsq``)."""
        if weights is not None:
            raise ValueError(PRIOR_REFUSED)

        def both(xp, g, x):
            return _passes.project(xp, g, x, accumulate, scale), _backend.sumsq(xp, x)

        return self._reduce(both, X, combine=_add_pairs)

    # -- local in d ----------------------------------------------------------------------
    def combine(self, X, C, alpha, beta, accumulate, scale=1.0, out=None):
        """αX + β(σG)ᵀC: (1, d, k) float64 (a new array, or lazy: ``out`` is not used)."""

        def part(xp, g, x=None):
            c = xp.asarray(C, device=_backend.device(g))
            return _passes.combine(xp, g, x, c, alpha, beta, accumulate, scale)

        return self._map(part, X, width=C.shape[-1])

    def column_gram(self, accumulate, scale=1.0):
        raise ValueError("blocks no wider than m (parameter space) cannot be read in column chunks")

    def project_gram(self, X, accumulate, scale=1.0):
        def both(xp, g, x):
            return _passes.project(xp, g, x, accumulate, scale), _passes.inner_products(xp, x)

        return self._reduce(both, X, combine=_add_pairs)

    def column_sumsq(self, scale=1.0, weights=None):
        if weights is not None:
            raise ValueError(PRIOR_REFUSED)
        return self._map(lambda xp, g: _passes.column_sumsq(xp, g, scale))

    def map_tiles(self, fn, scale=1.0, weights=None):
        """As ``_passes.map_tiles``, chunk by chunk (fn sees each chunk's tiles as blocks 0:1)."""
        if weights is not None:
            raise ValueError(PRIOR_REFUSED)
        xp = self.xp
        probe = fn(0, 1, xp.zeros((1, self.shape[1], 0), dtype=xp.float64))  # the output's rank
        run = lambda ns, g: _passes.map_tiles(ns, g, fn, scale)
        return self._map(run) if probe.ndim == 2 else self._map(run, rows=probe.shape[1])
