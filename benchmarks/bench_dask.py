"""Dask: an IHVP over a chunked G on a ``dask.distributed`` LocalCluster, against NumPy.

``python -m benchmarks --dask`` builds ``StaticInverse`` over a Dask G (m × d float32, in
column chunks of ``CHUNK`` coordinates, persisted on two worker processes of this machine) and
times construction and an IHVP (``(op @ x).compute()``) against the same operator over the
NumPy array, and reports the bytes the chunks' tasks send back per reduction (the partial
results: m² per chunk for the Gram matrix, m·k + k per chunk for a product), which depend on m
and the number of chunks, not on d.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from rank1inv.examples import progress

CHUNK = 1 << 18


def _median(fn, repeat=5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(m: int = 64, d: int = 4_000_000) -> str:
    import dask.array as da
    from distributed import Client, LocalCluster

    from rank1inv import StaticInverse, testing

    rng = np.random.default_rng(0)
    G = rng.standard_normal((m, d), dtype=np.float32) + rng.standard_normal((1, d), dtype=np.float32)
    x = rng.standard_normal(d)
    progress.step("NumPy reference")
    ref = StaticInverse(G, 1e-3)
    t_numpy = _median(lambda: ref @ x)
    build_numpy = _median(lambda: StaticInverse(G, 1e-3), repeat=3)
    rows = [f"m = {m}, d = {d:.0e}, float32, chunks of {CHUNK} coordinates", "",
            "| measurement | value | unit |", "|---|---|---|"]  # fmt: skip
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster):  # fmt: skip
        with warnings.catch_warnings():  # the benchmark's own data travels in the graph once, on purpose
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            Gd = da.from_array(G, chunks=(m, CHUNK)).persist()
            xd = da.from_array(x, chunks=CHUNK).persist()
        progress.step("Dask cluster up: construction and IHVP")
        build = _median(lambda: StaticInverse(Gd, 1e-3), repeat=3)
        op = StaticInverse(Gd, 1e-3)
        view = op._group_list[0].Gg
        before = view.bytes_reduced
        y = (op @ xd).compute()
        per_product = view.bytes_reduced - before
        t_dask = _median(lambda: (op @ xd).compute())
        F_err = testing.relative_error(y, ref @ x)
    n = -(-d // CHUNK)
    rows += [
        f"| construction, Dask (2 workers) / NumPy | {build:.3g} / {build_numpy:.3g} | s |",
        f"| IHVP, Dask (2 workers) / NumPy | {t_dask * 1e3:.4g} / {t_numpy * 1e3:.4g} | ms |",
        f"| bytes sent back by the chunks' tasks per IHVP ({n} chunks) | {per_product} | B |",
        f"| … per chunk and right-hand side (8·(m + 1)) | {per_product // n} | B |",
        f"| G itself (what a gather to one process would move) | {G.nbytes} | B |",
        f"| max relative difference to the NumPy result | {F_err:.1e} | |",
    ]
    return "\n".join(rows)
