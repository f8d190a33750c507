"""StaticInverse: F⁻¹ for a fixed set of gradients (WoodFisher / M-FAC pruning)."""

from __future__ import annotations

from . import _checks
from ._blocks import Layout
from ._dense import DenseGroup
from ._operator import InverseOperator
from ._woodbury import WoodburyGroup


def make_group(xp, G, run, damp: float, scale: float, accumulate: str):
    """The group serving one run of equal blocks of G (m, d): gradient space if the blocks are
    wider than m (Woodbury), parameter space otherwise (DESIGN §3: no cancellation)."""
    m = G.shape[0]
    Gg = xp.permute_dims(xp.reshape(G[:, run.start : run.stop], (m, run.count, run.size)), (1, 0, 2))
    if run.size > m:
        return WoodburyGroup(xp, Gg, damp, scale, accumulate)
    return DenseGroup(xp, Gg, damp, scale, accumulate)


class StaticInverse(InverseOperator):
    """The inverse of F = λI + s·Σ gᵢgᵢᵀ for the m rows gᵢ of G, as a linear operator.

    Parameters
    ----------
    G : array (m, d), float32 or float64, NumPy or CuPy
        The gradients, one per row. Referenced, not copied, and never modified: do not modify it
        while the operator is in use.
    damp : float > 0
        λ.
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

    def __init__(self, G, damp, *, scale=None, block_size=None, accumulate="float64"):
        G = _checks.as_array(G, "G")
        xp = _checks.float_array(G, "G", (2,))
        m, d = G.shape
        if m < 1 or d < 1:
            raise ValueError(f"G must have at least one row and one column, got shape {tuple(G.shape)}")
        self._damp = _checks.damp(damp)
        s = _checks.scale(scale)
        self._scale = 1.0 / m if s in (None, "count") else s
        self._accumulate = _checks.accumulate(accumulate)
        self._layout = Layout(d, block_size)
        self._xp, self._dim, self._dtype = xp, d, str(G.dtype)
        self._G = G
        self._group_list = [
            make_group(xp, G, run, self._damp, self._scale, self._accumulate) for run in self._layout.runs
        ]

    def _groups(self):
        return self._group_list

    def _anchor(self):
        return self._G

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
    def block_sizes(self) -> tuple[int, ...]:
        """Lengths of the diagonal blocks (one entry, d, for the full matrix)."""
        return self._layout.block_sizes

    def __repr__(self) -> str:
        return (
            f"StaticInverse(m={self.num_gradients}, d={self._dim}, dtype={self._dtype}, damp={self._damp:g}, "
            f"scale={self._scale:g}, blocks={len(self._layout.block_sizes)})"
        )
