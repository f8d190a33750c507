"""StaticInverse: F⁻¹ for a fixed set of gradients (WoodFisher / M-FAC pruning)."""

from __future__ import annotations

import math

from . import _backend, _checks, _passes, _precision, _scaling
from ._blocks import Layout
from ._dense import DenseGroup
from ._operator import InverseOperator
from ._woodbury import WoodburyGroup


def group_view(xp, G, run):
    """The run's blocks of G (m, d) as a group array (count, m, size): a view, no copy."""
    m = G.shape[0]
    return xp.permute_dims(xp.reshape(G[:, run.start : run.stop], (m, run.count, run.size)), (1, 0, 2))


def make_group(xp, G, run, damp: float, scale: float, accumulate: str):
    """The group serving one run of equal blocks of G (m, d): gradient space if the blocks are
    wider than m (Woodbury), parameter space otherwise (docs/design.md §3: no cancellation). Its frame
    (docs/design.md §4) comes from the run's max|G|, which is also the finiteness check."""
    Gg = group_view(xp, G, run)
    top = _passes.max_abs(xp, Gg)
    if not math.isfinite(top):
        raise ValueError("G contains non-finite values (nan or inf)")
    exact = _precision.of_array(G, _backend.is_cupy(xp)).exact_products
    frame = _scaling.frame_exponent(top, damp, scale, exact)
    if run.size > G.shape[0]:
        return WoodburyGroup(xp, Gg, damp, scale, accumulate, frame=frame)
    return DenseGroup(xp, Gg, damp, scale, accumulate, frame=frame)


class StaticInverse(InverseOperator):
    """The inverse of F = λI + s·Σ gᵢgᵢᵀ for the m rows gᵢ of G, as a linear operator.

    Parameters
    ----------
    G : array (m, d), NumPy or CuPy; float64, float32, bfloat16 or float16
        bfloat16 is ``ml_dtypes.bfloat16`` on NumPy and its bit patterns in a uint16 array on CuPy
        (which has no bfloat16 dtype).
        The gradients, one per row. Referenced, not copied, and never modified: do not modify it
        while the operator is in use. Query results are float64 for float64 G and float32
        otherwise (a float64 x promotes its product). Torch and JAX tensors go through
        ``rank1inv.adapters`` (zero-copy); other arrays are refused with a TypeError.
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
        xp = _backend.namespace(G)
        if G.ndim != 2:
            raise ValueError(f"G must have ndim 2, got shape {tuple(G.shape)}")
        policy = _checks.float_kind(G, "G", cupy=_backend.is_cupy(xp))  # CuPy uint16: bfloat16 bits
        m, d = G.shape
        if m < 1 or d < 1:
            raise ValueError(f"G must have at least one row and one column, got shape {tuple(G.shape)}")
        self._damp = _checks.damp(damp)
        s = _checks.scale(scale)
        self._scale = 1.0 / m if s in (None, "count") else s
        self._accumulate = _checks.accumulate(accumulate)
        self._layout = Layout(d, block_size)
        self._xp, self._dim, self._dtype = xp, d, _precision.of(policy).output
        self._storage = policy
        self._G = G
        with _backend.device_scope(xp, G):  # CuPy allocations on G's device, not the current one
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
    def storage_dtype(self) -> str:
        """The dtype G is stored in ("float64", "float32", "bfloat16" or "float16")."""
        return self._storage

    def __repr__(self) -> str:
        return (
            f"StaticInverse(m={self.num_gradients}, d={self._dim}, storage={self._storage}, damp={self._damp:g}, "
            f"scale={self._scale:g}, blocks={len(self._layout.block_sizes)})"
        )
