"""rank1inv: the inverse of λI + s·Σ gᵢgᵢᵀ as a linear operator, without forming a d×d matrix.

``StaticInverse`` serves a fixed set of gradients (pruning), ``DynamicInverse`` a sliding
window (the M-FAC optimizer). Both share one query API; ``obs`` is the pruning toolkit.
See ``docs/guide.md``.
"""

from . import chunked, obs, sharded  # noqa: F401 - the variants register with their base classes
from ._precision import AccuracyWarning
from .accumulated import BlockAccumulator
from .chunked import DaskInverse
from .dynamic import DynamicInverse, push_apply_all
from .factored import FactoredGradients
from .sharded import ShardedInverse, ShardedWindow, reshard
from .static import StaticInverse
from .streamed import StreamedGradients

__all__ = ["StaticInverse", "DynamicInverse", "FactoredGradients", "StreamedGradients", "BlockAccumulator",
           "push_apply_all", "ShardedInverse", "ShardedWindow", "DaskInverse", "reshard", "AccuracyWarning",
           "obs"]  # fmt: skip
__version__ = "0.1.0"
