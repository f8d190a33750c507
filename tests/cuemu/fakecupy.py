"""A stand-in for the parts of CuPy that ``rank1inv/cuda/kernels.py`` uses, running the kernels
through the CPU emulator of ``cuda_emu.h`` (see README.md here).

``sys.modules["cupy"] = fakecupy`` before importing ``rank1inv.cuda.kernels`` makes the real
launchers compile their ``RawModule`` sources with the host compiler (under ASan/UBSan when
``SANITIZE`` is set, the default) and launch them here. Arrays are NumPy arrays of the subclass
``EmuArray`` (which has ``.data.ptr``). Each launch copies every array argument into a fresh
``malloc`` block of exactly its size (ASan puts a red zone after it), runs the grid, and copies
the blocks back; arguments that share memory share one block. ``POLICY`` and ``SEED`` choose
the schedule (``cuda_emu.h``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("CUEMU_CACHE", tempfile.gettempdir())) / "rank1inv-cuemu"
SANITIZE = os.environ.get("CUEMU_SANITIZE", "1") == "1"
POLICY = 0
SEED = 0
POLICIES = {"forward": 0, "reverse": 1, "random": 2, "warp-ahead": 3}

float64, float32, float16, uint16, int32, int64 = (np.float64, np.float32, np.float16, np.uint16, np.int32,
                                                   np.int64)  # fmt: skip


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


class EmuArray(np.ndarray):
    """A NumPy array that answers ``.data.ptr`` like a CuPy array."""

    @property
    def data(self):
        return _Pointer(self.__array_interface__["data"][0])


def _wrap(a):
    return np.asarray(a).view(EmuArray)


def asarray(a, dtype=None):
    """A copy, as ``cupy.asarray`` of host data is (device memory is never the host's)."""
    return _wrap(np.array(a, dtype=dtype, copy=True))


def ascontiguousarray(a, dtype=None):
    return _wrap(np.ascontiguousarray(a, dtype=dtype))


def empty(shape, dtype=float64):
    return _wrap(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype=dtype))  # poisoned


def zeros(shape, dtype=float64):
    return _wrap(np.zeros(shape, dtype=dtype))


class _Device:
    id = 0


class cuda:
    @staticmethod
    def Device():
        return _Device()


_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
            np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}  # fmt: skip
_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


def _compiler_flags():
    flags = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-shared", "-fPIC", "-w"]
    if SANITIZE:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    return flags


class RawModule:
    """Compiles ``code`` with the emulator header and one C entry point per name expression."""

    def __init__(self, code: str, options=(), name_expressions=None):
        names = list(name_expressions or re.findall(r'extern "C" __global__ void (\w+)', code))
        self._index = {name: i for i, name in enumerate(names)}
        wrappers = "\n".join(
            f'extern "C" void cuemu_launch_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f"unsigned bz, int policy, unsigned seed, void** argv) {{ cuemu::launch(&{name}, dim3(gx, gy, gz), "
            f"dim3(bx, by, bz), policy, seed, argv); }}"
            for i, name in enumerate(names)
        )
        source = f'#include "{HERE / "cuda_emu.h"}"\n{code}\n{wrappers}\n'
        flags = _compiler_flags()
        key = hashlib.sha256((source + " ".join(flags) + (HERE / "cuda_emu.h").read_text()).encode()).hexdigest()[:16]
        CACHE.mkdir(parents=True, exist_ok=True)
        lib = CACHE / f"{key}.so"
        if not lib.exists():
            src = CACHE / f"{key}.cpp"
            src.write_text(source)
            tmp = CACHE / f"{key}.{os.getpid()}.so"
            res = subprocess.run(["g++", *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"the emulated kernels do not compile:\n{res.stderr[-4000:]}")
            tmp.replace(lib)
        self._lib = ctypes.CDLL(str(lib))

    def get_function(self, name: str):
        return _Kernel(getattr(self._lib, f"cuemu_launch_{self._index[name]}"), name)


class _Kernel:
    def __init__(self, fn, name):
        self._fn, self.name = fn, name

    def __call__(self, grid, block, args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        keep, buffers, argv = [], {}, (ctypes.c_void_p * len(args))()
        try:
            for i, a in enumerate(args):
                if isinstance(a, np.ndarray):
                    if not a.flags.c_contiguous:
                        raise ValueError(f"{self.name}: argument {i} is not contiguous")
                    key = (a.__array_interface__["data"][0], a.nbytes)
                    if key not in buffers:
                        ptr = _libc.malloc(max(a.nbytes, 1))
                        ctypes.memmove(ptr, key[0], a.nbytes)
                        buffers[key] = (ptr, a)
                    holder = ctypes.c_void_p(buffers[key][0])
                else:
                    holder = _SCALARS[np.asarray(a).dtype](a.item() if hasattr(a, "item") else a)
                keep.append(holder)
                argv[i] = ctypes.addressof(holder)
            self._fn(*(ctypes.c_uint(v) for v in grid + block), ctypes.c_int(POLICY), ctypes.c_uint(SEED), argv)
            for (addr, nbytes), (ptr, a) in buffers.items():
                if a.flags.writeable:
                    ctypes.memmove(addr, ptr, nbytes)
        finally:
            for ptr, _ in buffers.values():
                _libc.free(ptr)
