"""The groups: what serves one run of equal diagonal blocks (``_protocols.Group``), and what they
are made of (docs/design.md §2).

- ``woodbury``: blocks wider than m, in gradient space (Cholesky and spectral factors);
- ``dense``: blocks no wider than m, the B×B block of F itself;
- ``prior``: per-coordinate damping, a Woodbury group of rescaled gradients;
- ``window``: the sliding window's age-ordered factor and its O(m²) updates;
- ``coefficients``: M-FAC's D and B, derived from a window's factor.

``make_group`` picks the group for a run of blocks, ``group_view`` cuts the run out of G, and
``redamp_group`` re-damps a group without reading G again.
"""

from __future__ import annotations

import numpy as np

from .. import _backend, _passes, _precision, _scaling
from .._blocks import Run
from .._protocols import GradientSource, GradientView, Group, GroupGradients
from .dense import DenseGroup
from .prior import PriorGroup
from .woodbury import WoodburyGroup


def group_view(xp, G, run: Run) -> GroupGradients:
    """The run's blocks of G (m, d) as a group array (count, m, size): a view, no copy (a
    ``GradientSource`` gives its own ``GradientView``; a view of one block, sharded or chunked,
    is the group itself)."""
    if isinstance(G, GradientSource):
        return G.view(run.start, run.count, run.size)
    if isinstance(G, GradientView):  # one block (d > m)
        return G
    m = G.shape[0]
    return xp.permute_dims(xp.reshape(G[:, run.start : run.stop], (m, run.count, run.size)), (1, 0, 2))


def make_group(xp, G, run: Run, damp, scale: float, accumulate: str, known=None) -> Group:
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
            return PriorGroup(xp, Gg, delta, scale, accumulate, exact, row_max=rows)
        frame = _scaling.frame_exponent(top, float(xp.max(delta)), scale, exact)
        return DenseGroup(xp, Gg, delta, scale, accumulate, frame=frame, row_max=rows, exact_products=exact)
    if _passes.global_width(Gg) > Gg.shape[1]:  # wider than m (over all shards)
        frames = _scaling.row_frames(rows, damp, scale, exact)
        gram = None
        if known is not None:
            k = _scaling.rescale_exponents(known[1][None, :], frames)
            gram = _backend.ldexp(xp, known[0][None, ...], xp.asarray(k, device=_backend.device(known[0])))
        return WoodburyGroup(
            xp, Gg, damp, scale, accumulate, frame=frames, gram=gram, row_max=rows, exact_products=exact
        )
    frame = _scaling.frame_exponent(top, damp, scale, exact)
    return DenseGroup(xp, Gg, damp, scale, accumulate, frame=frame, row_max=rows, exact_products=exact)


def redamp_group(group: Group, damp: float, blocks: tuple[int, int]) -> Group:
    """Blocks b0:b1 of ``group`` with damping λ' (the frames recomputed for it), the Gram matrix
    reused (frames are powers of two: rescaling it is exact)."""
    b0, b1 = blocks
    rows = group.row_max[b0:b1]
    if isinstance(group, WoodburyGroup):
        frames = _scaling.row_frames(rows, damp, group.scale, group.exact_products)
        return group.redamped(damp, frames, blocks, row_max=rows)
    frame = _scaling.frame_exponent(float(rows.max()), damp, group.scale, group.exact_products)
    return group.redamped(damp, frame, blocks, row_max=rows)
