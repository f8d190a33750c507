"""PyTorch adapter: zero-copy conversion, flat vectors, DTensor shards, block layouts and masks,
output Jacobians, a pruning pipeline, and the M-FAC optimizer (one module each; every name is
importable from here).

No curvature math here: tensors are handed to ``DynamicInverse`` / ``StaticInverse`` as NumPy
(CPU) or CuPy (CUDA) arrays through DLPack, sharing memory, and results come back the same way.
"""

from .convert import to_array, to_tensor
from .dtensor import is_dtensor, local_shard, mesh_group
from .jacobians import output_jacobians
from .layout import blocks_from_model, masks_for_model, nm_segments, weight_mask
from .optim import MFAC, Descent, descend
from .pruning import prune_model
from .vectors import (
    GradientBuffer,
    flatten,
    gradient_stream,
    gradients,
    model_vector,
    trainable,
    unflatten,
    write_vector,
)

__all__ = ["to_array", "to_tensor", "is_dtensor", "local_shard", "mesh_group", "output_jacobians",
           "blocks_from_model", "masks_for_model", "nm_segments", "weight_mask", "MFAC", "Descent", "descend",
           "prune_model", "GradientBuffer", "flatten", "gradient_stream", "gradients", "model_vector", "trainable",
           "unflatten", "write_vector"]  # fmt: skip
