"""Gradients in host memory streamed to the compute device, one pass per reduction
(docs/design.md §14).

``StaticInverse(StreamedGradients(G_host, xp=cupy), damp)`` keeps G (m, d) on the host (a
NumPy array or a ``numpy.memmap`` larger than the GPU) and computes on the GPU: every pass over
G copies it chunk by chunk through two page-locked staging buffers and two device buffers, the
copy of chunk i+1 running on its own stream while the passes over chunk i run on the current
one (the M-FAC appendix's paging, with one streamed pass per reduction and no page swaps). The
m×m algebra, right-hand sides and results live on the device. With ``xp=None`` (NumPy) the same
pipeline runs on the host: the mirror that the CPU tests check, including a simulated
asynchronous copier under which a missing wait gives a wrong answer.
"""

from __future__ import annotations

import operator

import numpy as np

from . import _backend, _checks, _precision
from ._chunks import ColumnChunks
from ._protocols import GradientSource

__all__ = ["StreamedGradients"]

CHUNK_BYTES = 1 << 27  # bytes of G per chunk (128 MiB): two staging and two device buffers of it


class StreamedGradients(_backend.HoldsNamespace, GradientSource):
    """m gradients (m, d) in host memory, for an operator that computes on ``xp``.

    Parameters
    ----------
    G : NumPy array or memmap (m, d); float64, float32, bfloat16 (``ml_dtypes``) or float16
        Referenced, not copied, never modified (do not modify it while an operator uses it).
    xp : None (NumPy: the host mirror) or cupy
        Where the computation runs.
    chunk_bytes : int
        Bytes of G per streamed chunk (whole columns; at least one column). Device memory: two
        chunks plus float64 tiles of the passes; host: two pinned chunks.
    copier : None or an object with the methods of ``_backend.HostToDevice``
        How chunks reach the device (the default: pinned buffers and a copy stream on CuPy);
        the tests pass a simulated asynchronous one.

    Every pass over G reads it once from the host: O(m·d) bytes over the host-to-device link
    per reduction (an IHVP has two passes, construction two).
    """

    def __init__(self, G, *, xp=None, chunk_bytes: int = CHUNK_BYTES, copier=None):
        if not isinstance(G, np.ndarray):
            raise TypeError(f"G must be a NumPy array or memmap in host memory, not {type(G).__name__}")
        if G.ndim != 2:
            raise ValueError(f"G must have ndim 2, got shape {tuple(G.shape)}")
        self.storage = _checks.float_kind(G, "G")
        self.xp = _backend.namespace_from_argument(xp)
        cupy = _backend.is_cupy(self.xp)
        self.host = G.view(np.uint16) if _precision.raw_bits(self.storage, cupy) else G  # bfloat16 bits on CuPy
        self.dtype = _precision.storage_dtype(self.xp, self.storage, cupy)
        self.shape = tuple(G.shape)
        m = max(1, G.shape[0])
        self.chunk_columns = max(1, int(_checks.positive_int(chunk_bytes, "chunk_bytes")) // (m * G.itemsize))
        self.anchor = self.xp.zeros((1,), dtype=self.xp.float64)
        self.copier = copier

    def view(self, start: int, count: int, size: int):
        """The group array of the one block (start 0, count 1, size d)."""
        if (start, count, size) != (0, 1, self.shape[1]):
            raise ValueError("streamed gradients serve one block: pass block_size=None")
        return StreamedView(self, self.copier)

    def __repr__(self) -> str:
        return f"StreamedGradients(m={self.shape[0]}, d={self.shape[1]}, storage={self.storage})"


class _Slot:
    """One staging buffer, one device buffer and their two events. Flat, so that a chunk of any
    width c is a C-contiguous (m, c) view of each (CuPy's asynchronous ``set`` needs one, and
    the compiled passes read contiguous groups)."""

    def __init__(self, xp, copier, m, width, dtype):
        self.pinned = _backend.pinned_empty(xp, (m * width,), np.dtype(dtype))
        self.device = xp.empty((m * width,), dtype=dtype)
        self.copied, self.consumed = copier.event(), copier.event()

    def views(self, m, c):
        """(host staging, device) buffers as (m, c) arrays."""
        return _as_matrix(self.pinned, m, c), _as_matrix(self.device, m, c)


def _as_matrix(flat, m, c):
    return flat[: m * c].reshape((m, c))


class StreamedView(ColumnChunks):
    """The group (1, m, d) of ``StreamedGradients``: each pass streams the chunks (``chunks``)
    and runs the one-process pass on each; sums in chunk order; results on the device."""

    def __init__(self, source: StreamedGradients, copier=None):
        self.source, self.xp = source, source.xp
        m, d = source.shape
        self.shape, self.dtype = (1, m, d), source.dtype
        w = source.chunk_columns
        self.cuts = tuple(min(w, d - a) for a in range(0, d, w))
        self._copier = copier
        self._slots = None
        self._device = _backend.device(source.anchor)

    def __getstate__(self):
        state = super().__getstate__()
        state["_slots"], state["_copier"] = None, None  # buffers and streams are rebuilt on use
        return state

    def _buffers(self):
        if self._slots is None:
            xp, (m, _) = self.xp, self.source.shape
            self._copier = self._copier or _backend.HostToDevice(xp)
            width = self.cuts[0]
            self._slots = [_Slot(xp, self._copier, m, width, self.dtype) for _ in range(min(2, len(self.cuts)))]
        return self._copier, self._slots

    def chunks(self):
        """Yield (c0, c1, chunk): chunk (1, m, c1-c0) on the device, valid until the next one.
        Chunk i+1 is staged and its copy issued before chunk i is handed out."""
        copier, slots = self._buffers()
        G = self.source.host
        starts = np.concatenate([[0], np.cumsum(self.cuts)]).tolist()
        n, m = len(self.cuts), self.shape[1]

        def at(i):  # (slot, first column, stop column) of chunk i
            return slots[i % len(slots)], starts[i], starts[i + 1]

        def stage(i):
            slot, c0, c1 = at(i)
            host, device = slot.views(m, c1 - c0)
            copier.host_wait(slot.copied)  # the previous copy from this pinned buffer has read it
            np.copyto(host, G[:, c0:c1])  # page-in of a memmap happens here
            copier.copy(device, host, slot.consumed, slot.copied)

        stage(0)
        for i in range(n):
            if i + 1 < n:
                stage(i + 1)  # overlaps the passes the caller runs on chunk i
            slot, c0, c1 = at(i)
            copier.compute_waits(slot.copied)
            yield c0, c1, slot.views(m, c1 - c0)[1][None, ...]
            copier.compute_done(slot.consumed)

    def _reduce(self, fn, X=None, combine=operator.add):
        xp, out = self.xp, None
        for c0, c1, g in self.chunks():
            part = fn(xp, g) if X is None else fn(xp, g, X[:, c0:c1, :])
            out = part if out is None else combine(out, part)
        return out

    def _map(self, fn, X=None, *, rows=None, width=None):
        xp, d = self.xp, self.shape[2]
        shape = (1, d, width) if width is not None else (1, rows, d) if rows is not None else (1, d)
        out = xp.empty(shape, dtype=xp.float64, device=_backend.device(self.source.anchor))
        for c0, c1, g in self.chunks():
            part = fn(xp, g) if X is None else fn(xp, g, X[:, c0:c1, :])
            if width is not None:
                out[:, c0:c1, :] = part
            else:
                out[..., c0:c1] = part
        return out

    def columns(self, blocks, offsets):
        """Columns of G at ``offsets``: (n, m) float64 on the device (gathered on the host)."""
        xp = self.xp
        idx = _backend.to_host(offsets)
        cols = xp.asarray(np.ascontiguousarray(self.source.host[:, idx].T))
        out = xp.empty(cols.shape, dtype=xp.float64)
        _backend.decode_into(xp, out, cols)
        return out
