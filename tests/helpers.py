"""Shared test helpers: host copies, dense float64 references, and processes on 127.0.0.1."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from rank1inv import testing

STORAGE = ["float32", "float64", "bfloat16", "float16"]
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root (rank1inv/, benchmarks/, tools/)


def checkout_env(**variables) -> dict:
    """os.environ for a subprocess that imports this checkout's rank1inv (its root first on
    PYTHONPATH, installed or not), plus ``variables``."""
    path = os.pathsep.join([str(CHECKOUT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, **variables, PYTHONPATH=path)


def host(a):
    """A float64 NumPy copy of an array from any backend."""
    if hasattr(a, "get"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def family(name, m, d, *, scale=1.0, seed=0, dtype="float32"):
    """``testing.gradients`` in any storage dtype; None where the values do not fit it (float16
    overflows beyond 65504: the huge row, scale 100)."""
    from rank1inv import _precision, testing

    G = testing.gradients(name, m, d, scale=scale, seed=seed, dtype="float64")
    if np.max(np.abs(G)) > _precision.of(dtype).max_value:
        return None
    return np.ascontiguousarray(G.astype(_precision.numpy_dtype(dtype)))


def tolerances(dtype):
    """(backward error, diag/entry relative error) targets of docs/design.md §8 for a storage dtype."""
    from rank1inv import _precision

    policy = _precision.of(dtype)
    return policy.eta, policy.rel


def dense_inverse(G, damp, scale=None, block_sizes=None):
    F = testing.dense_fisher(host(G), damp, scale, block_sizes)
    return F, np.linalg.inv(F), np.linalg.cond(F)


def to_device(xp, G):
    """A host array on the backend under test (bfloat16 as its bit patterns on CuPy)."""
    from rank1inv import _precision

    if xp is not np and G.dtype == _precision.numpy_dtype("bfloat16"):
        return xp.asarray(G.view(np.uint16))
    return xp.asarray(G)


def conv_patches(x, conv):
    """Rows a_ip of a torch Conv2d by explicit loops (no F.unfold): (B, P, C_in·kh·kw), channel-major
    like the weight."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    import torch

    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(H):
        for j in range(W):
            window = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            rows.append(window.reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


DISTRIBUTED_TIMEOUT_S = 60  # gloo's timeout in the distributed tests' workers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, tmp_path, limit_s=3 * DISTRIBUTED_TIMEOUT_S):
    """Run fn(rank, world, port, out_dir) in ``world`` fresh processes on 127.0.0.1 and return
    each rank's rank{r}.json; a process that does not finish within ``limit_s`` is killed and
    the test fails (a hang is a failure, not a wait)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:  # pragma: no cover
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
