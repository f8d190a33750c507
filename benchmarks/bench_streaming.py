"""Out of core: an IHVP over a memory-mapped G on disk, against reading the same file.

``python -m benchmarks --out-of-core DIR`` writes a float32 G (m × d, a few GB) into DIR,
measures the sequential read speed of that file (64 MiB ``readinto`` blocks into one buffer),
then builds ``StaticInverse(np.memmap(...))`` and times IHVPs, which read G twice. Extra memory
is what the process allocates (tracemalloc: NumPy's and the library's buffers; the mapped
file's pages are the page cache's, not the process's). The file is deleted afterwards. With a
warm page cache both sides read memory; where the page cache can be dropped (Linux, root) the
cold rows compare an IHVP with a first read of the file from the disk.
"""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np

from rank1inv.examples import progress

BLOCK = 64 << 20


def _write(path: str, m: int, d: int) -> None:
    G = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(m, d))
    rng = np.random.default_rng(0)
    base = rng.standard_normal((16, d)).astype(np.float32)
    for i in range(m):  # low rank plus noise, written row by row
        G[i] = base[i % 16] * rng.standard_normal() + 0.1 * rng.standard_normal(d).astype(np.float32)
    G.flush()
    del G


def _read_file(path: str) -> int:
    """Read the file sequentially in ``BLOCK`` pieces into one buffer; the bytes read."""
    buf, total = bytearray(BLOCK), 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            total += n
    return total


def _read_speed(path: str) -> float:
    """Bytes per second of ``_read_file``, best of 2."""
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        total = _read_file(path)
        best = max(best, total / (time.perf_counter() - t0))
    return best


def _drop_caches() -> bool:
    """Empty the page cache (Linux, root); False where that is not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def run(directory: str, m: int = 256, d: int = 4_000_000) -> str:
    from rank1inv.static import StaticInverse

    path = os.path.join(directory, "rank1inv_G.npy")
    try:
        progress.step(f"writing {4 * m * d / 2**30:.1f} GiB of G to {path}")
        _write(path, m, d)
        progress.step("construction and IHVPs from the memory map")
        size = os.path.getsize(path)
        G = np.load(path, mmap_mode="r")
        x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
        tracemalloc.start()
        t0 = time.perf_counter()
        op = StaticInverse(G, 1e-3)
        t_build = time.perf_counter() - t0
        build_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        op @ x  # the first pass maps the pages
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            op @ x
            times.append(time.perf_counter() - t0)
        ihvp_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        read = _read_speed(path)
        t = min(times)
        stream = 2 * G.nbytes / t
        cold = []
        if _drop_caches():  # from the disk: the file's first read, then an IHVP's
            t0 = time.perf_counter()
            _read_file(path)
            t_read_cold = time.perf_counter() - t0
            _drop_caches()
            t0 = time.perf_counter()
            op @ x
            t_ihvp_cold = time.perf_counter() - t0
            cold = [
                ("sequential read of the file, cold cache", size / t_read_cold / 2**30, "GiB/s", "after drop_caches"),
                ("IHVP, cold cache", t_ihvp_cold * 1e3, "ms", "the first pass reads the disk, the second the cache"),
                ("cold IHVP / cold read of the file (time)", t_ihvp_cold / t_read_cold, "×",
                 "the IHVP streams the file at 1/this of the read speed: target ≤ 1/0.7 = 1.43"),
            ]  # fmt: skip
        rows = [
            ("file", size / 2**30, "GiB", f"float32 G, m = {m}, d = {d}, memory-mapped read-only"),
            ("sequential read of the file", read / 2**30, "GiB/s", "64 MiB readinto blocks, best of 2"),
            ("construction (Gram matrix, factor)", t_build, "s", "one streamed pass, BLAS-3 tiles"),
            ("extra memory, construction (peak)", build_peak / 2**20, "MiB", "tracemalloc"),
            ("IHVP", t * 1e3, "ms", "best of 3, after a first one"),
            ("IHVP streaming rate (2 passes over G)", stream / 2**30, "GiB/s", ""),
            ("IHVP rate / sequential read", stream / read, "×", "target ≥ 0.7"),
            ("extra memory, IHVP (peak)", ihvp_peak / 2**20, "MiB", "target ≤ 256 MiB"),
        ] + cold
    finally:
        if os.path.exists(path):
            os.remove(path)
    lines = ["| measurement | value | unit | note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b:.3g} | {c} | {n} |" for a, b, c, n in rows]
    return "\n".join(lines)
