"""Blocked OBS from a stream: accumulating m gradients into blocks of B (``BlockAccumulator``),
against a float64 GEMM of the same shapes, with the traced peak memory against what a stored G
needs; then diag F⁻¹ and one OBS prune of the accumulated operator.

``python -m benchmarks --blocks [--quick]``: d = 10⁶ (m = 1024) and d = 10⁷ (m = 256), B = 50,
float32 batches of 16. Two float64 GEMM references on the same shapes, per batch:
"in cache" is ``matmul(Xᵀ, X, out=P)`` over (nb, 16, 50) in the accumulation's own block chunks
into one reused scratch buffer (the flop floor: no sums are read or written); "to memory" is the
one batched ``matmul`` of all nb blocks writing its (nb, 50, 50) output (the GEMM a user would
call). The accumulation must also read and write the d·B·8 bytes of sums once per batch.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

import rank1inv as r1
from rank1inv import accumulated, obs
from rank1inv.examples import progress


def _gemm_to_memory_seconds(nb: int, k: int, B: int, repeat: int) -> float:
    X = np.ones((nb, k, B))
    P = np.empty((nb, B, B))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.matmul(X.transpose(0, 2, 1), X, out=P)
        best = min(best, time.perf_counter() - t)
    return best


def _gemm_seconds(nb: int, k: int, B: int, repeat: int) -> float:
    step = max(1, accumulated.TILE_BYTES // (8 * B * (k + B)))
    X = np.ones((min(step, nb), k, B))
    P = np.empty((min(step, nb), B, B))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for b0 in range(0, nb, step):
            n = min(step, nb - b0)
            np.matmul(X[:n].transpose(0, 2, 1), X[:n], out=P[:n])
        best = min(best, time.perf_counter() - t)
    return best


def row(d: int, m: int, B: int = 50, k: int = 16, prune: bool = True) -> dict:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((k, d)).astype(np.float32)
    batches = [base * np.float32(1.0 + i / 4) for i in range(4)]  # made before the timing
    batch = batches[0]
    acc = r1.BlockAccumulator(d, B)
    tracemalloc.start()
    t = time.perf_counter()
    for i in range(m // k):
        acc.add_many(batches[i % 4])
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "d": d,
        "m": m,
        "B": B,
        "accumulate_s": seconds,
        "gemm_rate": _gemm_seconds(d // B, k, B, 3) * (m // k) / seconds,
        "gemm_memory_rate": _gemm_to_memory_seconds(d // B, k, B, 2) * (m // k) / seconds,
        "peak_MiB": peak / 2**20,
        "peak_vs_blocks": peak / (d * B * 8 + batch.nbytes),
        "stored_G_MiB": m * d * 4 / 2**20,
    }
    if prune:
        t = time.perf_counter()
        op = r1.StaticInverse(acc, 1e-3)
        out["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        op.diag()
        out["diag_s"] = time.perf_counter() - t
        w = rng.standard_normal(d)
        t = time.perf_counter()
        obs.prune(op, w, 0.5)
        out["obs_prune_s"] = time.perf_counter() - t
    return out


def run(quick: bool = False) -> str:
    shapes = [(10**5, 256, True)] if quick else [(10**6, 1024, True), (10**7, 256, False)]
    rows = [row(d, m, prune=prune) for d, m, prune in progress.track(shapes, "blocks from a stream, d and m")]
    lines = [
        "| d | m | accumulate [s] | rate vs GEMM in cache | rate vs GEMM to memory | peak [MiB] "
        "| peak / (blocks + batch) | stored G [MiB] "
        "| build [s] | diag [s] | OBS prune 50 % [s] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tail = " | ".join(f"{r[k]:.2f}" if k in r else "–" for k in ("build_s", "diag_s", "obs_prune_s"))
        lines.append(
            f"| {r['d']:.0e} | {r['m']} | {r['accumulate_s']:.2f} | {r['gemm_rate']:.2f} | {r['gemm_memory_rate']:.2f} "
            f"| {r['peak_MiB']:.0f} "
            f"| {r['peak_vs_blocks']:.3f} | {r['stored_G_MiB']:.0f} | {tail} |"
        )
    return "\n".join(lines)
