"""Conversion between torch tensors and NumPy/CuPy arrays (zero-copy, DLPack)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch  # noqa: TID253 (this module is the adapter)

from ... import _precision


def to_array(tensor: torch.Tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``tensor``'s memory (detached, zero-copy).
    bfloat16 tensors become ``ml_dtypes.bfloat16`` arrays on the CPU and uint16 bit patterns on
    CUDA (CuPy has no bfloat16; rank1inv reads uint16 CuPy arrays as bfloat16)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_array takes a torch.Tensor, not {type(tensor).__module__}.{type(tensor).__name__}"
                        " (NumPy and CuPy arrays go to rank1inv as they are)")  # fmt: skip
    t = tensor.detach()
    bits = t.dtype == torch.bfloat16
    if bits:
        t = t.view(torch.uint16)
    if t.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(t)
    if t.device.type != "cpu":
        raise TypeError(f"tensors on {t.device.type} are not supported (CPU or CUDA only)")
    a = t.numpy()
    return a.view(_precision.numpy_dtype("bfloat16")) if bits else a


def to_tensor(array) -> torch.Tensor:
    """A tensor sharing the memory of a NumPy or CuPy array (zero-copy, via DLPack); bfloat16
    arrays (ml_dtypes) become bfloat16 tensors."""
    if isinstance(array, np.ndarray):
        if array.dtype == _precision.numpy_dtype("bfloat16"):
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    if not hasattr(array, "__dlpack__"):
        raise TypeError(f"to_tensor takes a NumPy or CuPy array, not {type(array).__module__}.{type(array).__name__}")
    return torch.from_dlpack(array)


def _cuda_context(tensor, stream: bool = False):
    """For a CUDA tensor: CuPy's device set to the tensor's, and with ``stream`` CuPy's current
    stream set to torch's current stream on it (so kernels, DLPack hand-overs and CuPy's pool
    reuse are ordered with torch's work). A no-op on the CPU."""
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(tensor.device.index))
    if stream:
        stack.enter_context(cupy.cuda.ExternalStream(torch.cuda.current_stream(tensor.device).cuda_stream))
    return stack


_TORCH_STORAGE = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
