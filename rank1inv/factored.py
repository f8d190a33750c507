"""Gradients of linear layers given as factors, never as an m×d array (the exact-natural-gradient paper §2.1, app. I).

For a mini-batch of m samples, the per-sample gradient of a linear layer's weight is the outer
product e_i a_iᵀ of the backpropagated error e_i (n_out) and the input activation a_i (n_in).
With A (m × n_in) and E (m × n_out) per layer, G's rows are never formed:

    G·u  = Σ_k rowsum(A_k ⊙ (E_k·mat(u_k)))        (that paper's eq. 21)
    GGᵀ  = Σ_k (A_kA_kᵀ) ⊙ (E_kE_kᵀ)                (eq. 22)
    Gᵀw  = per layer E_kᵀ·diag(w)·A_k               (eq. 23, in the weight's own layout)

A layer applied at P positions (a convolution's patches, a linear layer over the tokens of a
sequence: that paper's appendix on convolutions) has per-sample gradients that are sums of P
outer products, g_i = Σ_p e_ip a_ipᵀ, given as 3-D factors A (m, P, n_in), E (m, P, n_out):

    G·u  = Σ_p rowsum(A_p ⊙ (E_p·mat(u)))           O(m·P·n_in·n_out)
    Gᵀw  = Σ_i,p w_i e_ip a_ipᵀ                      O(m·P·n_in·n_out)
    GGᵀ  = Σ_p,q (A_pA_qᵀ) ⊙ (E_pE_qᵀ)              O(m²·P²·(n_in + n_out)), factored, or
         = rows of G formed in tiles, then G·Gᵀ       O(m·P·n_in·n_out + m²·n_in·n_out), explicit;

the Gram matrix takes the cheaper of the two routes per layer (``gram_route``).

Flattening order (``torch.nn.Linear``): each layer's weight (n_out, n_in) row-major, then, with
a bias, its n_out bias entries (the bias's per-sample gradient is e_i: a factor pair (1, E)).

``FactoredGradients`` is accepted by ``StaticInverse`` wherever an (m, d) array is. Inside, a
run of blocks sees a ``FactoredView`` of shape (count, m, size), which the passes of
``rank1inv._passes`` recognise (one dispatch line each): whole segments use the formulas above
(O(m·size) for products, O(m²·(n_in + n_out)) for the Gram matrix), other column ranges build
float64 tiles of G on the fly. Memory: the factors (and float64 copies of them), O(m²) per
block, and tiles of at most ``TILE_ELEMENTS`` float64 values; entries whiten their columns on demand
(O(m²) per index) instead of caching L⁻¹G.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, _checks, _precision
from ._passes import TiledView
from ._protocols import GradientSource

__all__ = ["FactoredGradients"]

TILE_ELEMENTS = 1 << 18  # float64 elements per tile of G built from the factors (2 MiB)
PAIR_ELEMENTS = 1 << 22  # float64 elements of one chunk of the position-pair products AAᵀ, EEᵀ (32 MiB)


class FactoredGradients(GradientSource):
    """m per-sample gradients of linear layers, as factor pairs.

    Parameters
    ----------
    layers : sequence of (A, E)
        A (m, n_in) input activations and E (m, n_out) backpropagated errors per layer, all with
        the same m; or, for a layer applied at P positions (convolution patches, tokens),
        A (m, P, n_in) and E (m, P, n_out), row i's gradient being Σ_p E[i, p] A[i, p]ᵀ.
        NumPy or CuPy (one namespace), float32 or float64 (the result dtype of all factors is
        the storage dtype). Referenced, not copied.
    bias : bool or sequence of bool
        Whether each layer has a bias (its n_out coordinates follow the weight's).

    Shape (m, d) with d = Σ_k n_out·n_in (+ n_out with a bias: for P positions the bias's
    gradient is Σ_p E[i, p]). Cost of every query: see the module docstring; memory
    m·Σ_k P_k·(n_in + n_out) for the factors (and a float64 copy), never m·d.
    """

    def __init__(self, layers, *, bias=False):
        layers = list(layers)
        if not layers:
            raise ValueError("layers must hold at least one (A, E) pair")
        if isinstance(bias, (bool, np.bool_)):
            biases = [bool(bias)] * len(layers)
        elif isinstance(bias, (list, tuple)) and all(isinstance(b, (bool, np.bool_)) for b in bias):
            biases = [bool(b) for b in bias]
        else:
            raise TypeError(f"bias must be a bool or a list of bools (one per layer), got {bias!r}")
        if len(biases) != len(layers):
            raise ValueError(f"bias must be a bool or one per layer ({len(layers)}), got {len(biases)}")
        arrays = [a for pair in layers for a in _pair(pair)]
        self.xp = _backend.namespace(*arrays)
        m = arrays[0].shape[0]
        names = set()
        for k, (A, E) in enumerate(_pair(p) for p in layers):
            if A.ndim not in (2, 3) or A.ndim != E.ndim:
                raise ValueError(
                    f"layer {k}: A and E must both be 2-D (m, n) or both 3-D (m, P, n) for P positions, got "
                    f"shapes {tuple(A.shape)} and {tuple(E.shape)}"
                )
            if A.ndim == 3 and A.shape[1] != E.shape[1]:
                raise ValueError(f"layer {k}: A has {A.shape[1]} positions, E has {E.shape[1]}")
            for name, X in (("A", A), ("E", E)):
                if X.shape[0] != m:
                    raise ValueError(f"layer {k}: {name} has {X.shape[0]} rows, layer 0 has {m}")
                kind = _precision.name_of(X.dtype)
                if kind not in ("float32", "float64"):
                    raise TypeError(f"layer {k}: {name} must be float32 or float64, got {X.dtype}")
                names.add(kind)
        self.dtype = self.xp.float64 if "float64" in names else self.xp.float32
        self.segments = []  # (A, E, start): coordinates start .. start + n_out·n_in, row-major (n_out, n_in)
        start = 0
        self.layer_sizes = []
        for (A, E), has_bias in zip((_pair(p) for p in layers), biases):
            size = 0
            for a, e in [(A, E)] + ([(None, E)] if has_bias else []):
                n_in = 1 if a is None else a.shape[-1]
                self.segments.append(Segment(self.xp, a, e, start + size, self.dtype))
                size += e.shape[-1] * n_in
            self.layer_sizes.append(size)
            start += size
        self.shape = (m, start)
        self.ndim = 2

    @property
    def anchor(self):
        """An array on the factors' device (for allocations)."""
        return self.segments[0].E

    def to_dense(self, dtype=None):
        """The explicit (m, d) G: O(m·d) memory, for tests and small problems. float64 by
        default, the exact products e_r·a_c (what the operator uses); ``dtype`` rounds them."""
        G = _columns(self.xp, self.segments, 0, self.shape[1])
        return G if dtype is None else self.xp.astype(G, dtype)

    def view(self, start: int, count: int, size: int) -> FactoredView:
        """The blocks G[:, start + b·size : start + (b+1)·size], b < count, as a group view."""
        return FactoredView(self, start, count, size)


def _pair(pair):
    try:
        A, E = pair
    except (TypeError, ValueError) as err:
        raise TypeError("every layer must be an (A, E) pair of arrays") from err
    return _checks.as_array(A, "A"), _checks.as_array(E, "E")


class Segment:
    """One factored outer-product segment: coordinates start + r·n_in + c hold e_r·a_c (a = 1 for
    a bias), or Σ_p e_pr·a_pc over P positions for 3-D factors. Values are read as float64."""

    def __init__(self, xp, A, E, start: int, dtype):
        self.xp, self.start = xp, start
        ones = (*E.shape[:-1], 1)  # a bias: the constant input 1 at every position
        self.A64 = xp.ones(ones, dtype=xp.float64, device=_backend.device(E)) if A is None else _f64(xp, A, dtype)
        self.E64 = _f64(xp, E, dtype)
        self.E = E
        self.positions = E.shape[1] if E.ndim == 3 else None  # P for a sum of P outer products per row
        self.n_in, self.n_out = self.A64.shape[-1], self.E64.shape[-1]
        self.size = self.n_in * self.n_out
        self.stop = start + self.size


def _f64(xp, X, dtype):
    """X rounded to the storage dtype, as float64 (its exact value)."""
    return xp.astype(xp.astype(X, dtype), xp.float64)


def _split(scale: float) -> tuple[float, float]:
    """(σ_a, σ_e), powers of two with σ_a·σ_e = σ (a power of two): each factor takes half of
    the frame, so that neither e·a nor the Gram matrix's products overflow before it is applied
    (docs/design.md §4)."""
    k = math.frexp(scale)[1] - 1
    return math.ldexp(1.0, k // 2), math.ldexp(1.0, k - k // 2)


def _split_rows(xp, scale):
    """``_split`` per row for a per-row frame σ (m,) (a device array): (σ_a (m, 1), σ_e (m, 1))."""
    k = _backend.frexp_exponent(xp, scale) - 1
    half = k // 2
    one = xp.ones(scale.shape, dtype=xp.float64, device=_backend.device(scale))
    return _backend.ldexp(xp, one, half)[:, None], _backend.ldexp(xp, one, k - half)[:, None]


def _scaled(s, scale):
    """(σ_a·A, σ_e·E) of a segment, float64; ``scale`` a float or one σ_i per row (m,)."""
    if isinstance(scale, float):
        if scale == 1.0:
            return s.A64, s.E64
        sa, se = _split(scale)
        return s.A64 * sa, s.E64 * se
    sa, se = _split_rows(s.xp, scale)
    if s.positions is not None:
        sa, se = sa[:, :, None], se[:, :, None]
    return s.A64 * sa, s.E64 * se


def gram_route(m: int, positions: int | None, n_in: int, n_out: int) -> str:
    """ "factored" or "explicit": the cheaper way to a segment's Gram matrix (module docstring).
    Without positions the factored route (O(m²·(n_in + n_out))) always wins."""
    if positions is None:
        return "factored"
    factored = m * m * positions * positions * (n_in + n_out)
    explicit = m * positions * n_in * n_out + m * m * n_in * n_out
    return "factored" if factored <= explicit else "explicit"


def _position_gram(xp, A, E):
    """Σ_p,q (A_pA_qᵀ) ⊙ (E_pE_qᵀ) for A (m, P, n_in), E (m, P, n_out): (m, m) float64, in chunks
    of rows so that the (rows·P) × (m·P) products stay below ``PAIR_ELEMENTS``."""
    m, P = A.shape[0], A.shape[1]
    A2, E2 = xp.reshape(A, (m * P, A.shape[2])), xp.reshape(E, (m * P, E.shape[2]))
    out = xp.empty((m, m), dtype=xp.float64, device=_backend.device(A))
    rows = max(1, PAIR_ELEMENTS // max(1, m * P * P))
    for i0 in range(0, m, rows):
        i1 = min(m, i0 + rows)
        KA = A2[i0 * P : i1 * P, :] @ xp.matrix_transpose(A2)
        KE = E2[i0 * P : i1 * P, :] @ xp.matrix_transpose(E2)
        out[i0:i1, :] = xp.sum(xp.reshape(KA * KE, (i1 - i0, P, m, P)), axis=(1, 3))
    return out


def _block_scale(scale, b: int):
    """The frame of block b: a float, or its rows' σ_i (m,)."""
    return scale if isinstance(scale, float) else scale[b, :]


def _columns(xp, segments, c0: int, c1: int, scale=1.0):
    """Columns c0:c1 of σG as a float64 (m, c1 − c0) array, built from the factors (σ a float
    or one value per row, (m,))."""
    m = segments[0].E64.shape[0]
    out = xp.zeros((m, c1 - c0), dtype=xp.float64, device=_backend.device(segments[0].E64))
    for s in segments:
        lo, hi = max(c0, s.start), min(c1, s.stop)
        if lo >= hi:
            continue
        A, E = _scaled(s, scale)
        if s.positions is None:
            j = xp.arange(lo - s.start, hi - s.start)
            r, c = j // s.n_in, j % s.n_in
            out[:, lo - c0 : hi - c0] = xp.take(E, r, axis=1) * xp.take(A, c, axis=1)
        else:  # the rows r0:r1 of each sample's Σ_p e_p a_pᵀ that cover lo:hi, then the columns
            r0, r1 = (lo - s.start) // s.n_in, (hi - s.start - 1) // s.n_in + 1
            W = xp.matmul(xp.permute_dims(E[:, :, r0:r1], (0, 2, 1)), A)  # (m, r1 − r0, n_in)
            flat = xp.reshape(W, (m, (r1 - r0) * s.n_in))
            first = lo - s.start - r0 * s.n_in
            out[:, lo - c0 : hi - c0] = flat[:, first : first + hi - lo]
    return out


class FactoredView(TiledView):
    """``count`` consecutive blocks of ``size`` columns of a FactoredGradients, starting at
    ``start``: a ``_passes.TiledView`` of shape (count, m, size) whose Gram matrix, products and
    output pass use the factors' formulas (the other passes run on tiles built from them)."""

    def __init__(self, source: FactoredGradients, start: int, count: int, size: int):
        self.source, self.start, self.count, self.size = source, start, count, size
        self.xp = source.xp
        self.shape = (count, source.shape[0], size)
        self.dtype = source.dtype
        self.ndim = 3

    @property
    def device(self):
        return _backend.device(self.source.anchor)

    def _block_segments(self, b: int):
        """(segment, whole) for the segments overlapping block b; whole = the segment lies
        inside the block."""
        lo, hi = self.start + b * self.size, self.start + (b + 1) * self.size
        return [(s, lo <= s.start and s.stop <= hi) for s in self.source.segments if s.start < hi and s.stop > lo]

    def block_columns(self, b: int, c0: int, c1: int, scale=1.0):
        """Columns c0:c1 (local) of block b of σG as float64 (m, c1 − c0) (σ: the group's frame)."""
        base = self.start + b * self.size
        return _columns(self.xp, self.source.segments, base + c0, base + c1, _block_scale(scale, b))

    def float64_tiles(self, budget: int, rows: bool = False, scale=1.0):
        """Tiles as ``_passes.float64_tiles`` yields them, built from the factors, of at most
        ``TILE_ELEMENTS`` (whatever the caller's budget: the point is never to hold much of G)."""
        m = self.shape[1]
        budget = min(budget, TILE_ELEMENTS)
        if rows:  # whole blocks, all rows (the dense group's column Gram matrix: size ≤ m)
            for b in range(self.count):
                yield b, b + 1, 0, m, self.block_columns(b, 0, self.size, scale)[None, ...]
            return
        step = max(1, budget // max(m, 1))
        for b in range(self.count):
            for c0 in range(0, self.size, step):
                c1 = min(self.size, c0 + step)
                yield b, b + 1, c0, c1, self.block_columns(b, c0, c1, scale)[None, ...]

    # -- the factored formulas (exact-natural-gradient paper, eq. 21–23) per whole segment, tiles elsewhere
    def gram(self, accumulate: str, scale=1.0, weights=None):
        """(σG_b)(σG_b)ᵀ per block, (count, m, m) float64: Σ over whole segments of
        (AAᵀ) ⊙ (EEᵀ) (eq. 22 of the exact-natural-gradient paper; with P positions the cheaper of
        the position-pair sum and explicit tiles, ``gram_route``), tiles for the rest (and with
        column ``weights``)."""
        if weights is not None:
            return super().gram(accumulate, scale, weights)
        budget = TILE_ELEMENTS
        xp = self.xp
        m = self.shape[1]
        out = xp.zeros((self.count, m, m), dtype=xp.float64, device=_backend.device(self.source.anchor))
        for b in range(self.count):
            sb = _block_scale(scale, b)
            for s, whole in self._block_segments(b):
                if whole and s.positions is None:
                    A, E = _scaled(s, sb)
                    out[b, ...] += (A @ xp.matrix_transpose(A)) * (E @ xp.matrix_transpose(E))
                elif whole and gram_route(m, s.positions, s.n_in, s.n_out) == "factored":
                    A, E = _scaled(s, sb)
                    out[b, ...] += _position_gram(xp, A, E)
                else:  # straddling a block edge, or P positions whose explicit rows are cheaper
                    lo = max(self.start + b * self.size, s.start) - (self.start + b * self.size)
                    for _, t in self._partial_with_offsets(b, s, lo, budget, sb):
                        out[b, ...] += t @ xp.matrix_transpose(t)
        return out

    def _segment_columns(self, b: int, s: Segment, c0: int, c1: int, scale=1.0):
        base = self.start + b * self.size
        return _columns(self.xp, [s], base + c0, base + c1, scale)

    def project(self, X, accumulate: str, scale=1.0):
        """(σG_b)·X per block for X (count, size, k) float64 → (count, m, k): rowsum(A ⊙ (E·U))
        per whole segment (eq. 21 of the exact-natural-gradient paper), tiles for the rest."""
        budget = TILE_ELEMENTS
        xp = self.xp
        m, k = self.shape[1], X.shape[-1]
        out = xp.zeros((self.count, m, k), dtype=xp.float64, device=_backend.device(X))
        for b in range(self.count):
            base = self.start + b * self.size
            sb = _block_scale(scale, b)
            for s, whole in self._block_segments(b):
                if whole:
                    A, E = _scaled(s, sb)
                    U = xp.reshape(X[b, s.start - base : s.stop - base, :], (s.n_out, s.n_in, k))
                    axes = 1 if s.positions is None else (1, 2)  # and over the positions
                    for q in range(k):  # g_i·u = e_iᵀ·U·a_i = rowsum(A ⊙ (E·U))
                        out[b, :, q] += xp.sum(A * (E @ U[:, :, q]), axis=axes)
                else:
                    lo = max(base, s.start) - base
                    for c0, t in self._partial_with_offsets(b, s, lo, budget, sb):
                        out[b, ...] += t @ X[b, c0 : c0 + t.shape[1], :]
        return out

    def _partial_with_offsets(self, b: int, s: Segment, lo: int, budget: int, scale=1.0):
        hi = min(self.start + (b + 1) * self.size, s.stop) - (self.start + b * self.size)
        step = max(1, min(budget, TILE_ELEMENTS) // max(self.shape[1], 1))
        for c0 in range(lo, hi, step):
            yield c0, self._segment_columns(b, s, c0, min(hi, c0 + step), scale)

    def combine(self, X, C, alpha: float, beta: float, accumulate: str, scale=1.0, out=None):
        """alpha·X + beta·(σG_b)ᵀC per block, (count, size, k) float64: Eᵀ·diag(c)·A per whole
        segment, in the weight's own layout (eq. 23 of the exact-natural-gradient paper)."""
        budget = TILE_ELEMENTS
        xp = self.xp
        k = C.shape[-1]
        if out is None:
            out = xp.empty((self.count, self.size, k), dtype=xp.float64, device=_backend.device(C))
        for b in range(self.count):
            base = self.start + b * self.size
            low = xp.zeros((self.size, k), dtype=xp.float64, device=_backend.device(C))
            sb = _block_scale(scale, b)
            for s, whole in self._block_segments(b):
                if whole:
                    A, E = _scaled(s, sb)
                    if s.positions is not None:  # Σ_i,p c_i e_ip a_ipᵀ: positions as more rows
                        rows = A.shape[0] * s.positions
                        A, E = xp.reshape(A, (rows, s.n_in)), xp.reshape(E, (rows, s.n_out))
                    for q in range(k):  # per layer Eᵀ·diag(c)·A, the weight's own layout
                        c = C[b, :, q] if s.positions is None else xp.repeat(C[b, :, q], s.positions)
                        W = xp.matrix_transpose(E) @ (A * c[:, None])
                        low[s.start - base : s.stop - base, q] = xp.reshape(W, (-1,))
                else:
                    lo = max(base, s.start) - base
                    for c0, t in self._partial_with_offsets(b, s, lo, budget, sb):
                        low[c0 : c0 + t.shape[1], :] += xp.matrix_transpose(t) @ C[b, ...]
            out[b, ...] = beta * low if X is None else alpha * X[b, ...] + beta * low
        return out

    def columns(self, blocks, offsets):
        """σ-free columns g_j for (block, local offset) pairs: (n, m) float64."""
        xp = self.xp
        m = self.shape[1]
        n = offsets.shape[0]
        out = xp.empty((n, m), dtype=xp.float64, device=_backend.device(offsets))
        j = _backend.to_host(blocks) * self.size + _backend.to_host(offsets) + self.start
        for t, col in enumerate(j.tolist()):
            out[t, :] = _columns(xp, self.source.segments, col, col + 1)[:, 0]
        return out

    def row_max_abs(self, weights=None):
        """max_j |G[b, i, j]·w_j| per block and row, from the factors: host float64 (count, m).
        A segment inside block b contributes max|e_i|·max|a_i| for row i (the largest entry of
        the outer product e_i a_iᵀ, exactly); weights and segments that straddle a block edge
        (and segments with P positions, whose entries are sums) are read from float64 tiles."""
        xp = self.xp
        m = self.shape[1]
        out = xp.zeros((self.count, m), dtype=xp.float64, device=_backend.device(self.source.anchor))
        for b in range(self.count):
            base = self.start + b * self.size
            for s, whole in self._block_segments(b):
                if whole and weights is None and s.positions is None:
                    ea = xp.max(xp.abs(s.E64), axis=1) if s.E64.shape[1] else xp.zeros(m, dtype=xp.float64)
                    aa = xp.max(xp.abs(s.A64), axis=1) if s.A64.shape[1] else xp.zeros(m, dtype=xp.float64)
                    with np.errstate(over="ignore", invalid="ignore"):
                        part = ea * aa  # inf only if an entry of G itself exceeds float64
                else:
                    lo = max(base, s.start) - base
                    part = xp.zeros(m, dtype=xp.float64, device=_backend.device(out))
                    for c0, t in self._partial_with_offsets(b, s, lo, TILE_ELEMENTS):
                        t = xp.abs(t) if weights is None else xp.abs(t) * weights[b, None, c0 : c0 + t.shape[1]]
                        part = xp.maximum(part, xp.max(t, axis=1))
                out[b, :] = xp.maximum(out[b, :], part)
        return np.asarray(_backend.to_host(out), dtype=np.float64)
