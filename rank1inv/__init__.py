"""rank1inv: the inverse of λI + s·Σ gᵢgᵢᵀ as a linear operator, without forming a d×d matrix.

``StaticInverse`` serves a fixed set of gradients (pruning), ``DynamicInverse`` a sliding
window (the M-FAC optimizer). Both share one query API; ``obs`` is the pruning toolkit.
See ``docs/guide.md``.
"""

from . import obs
from ._precision import AccuracyWarning
from .dynamic import DynamicInverse, push_apply_all
from .factored import FactoredGradients
from .static import StaticInverse
from .streamed import StreamedGradients

__all__ = ["StaticInverse", "DynamicInverse", "FactoredGradients", "StreamedGradients", "push_apply_all",
           "AccuracyWarning", "obs"]  # fmt: skip
__version__ = "0.1.0"
