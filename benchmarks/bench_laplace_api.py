"""laplace-torch's own API over rank1inv at d ≈ 10⁶: ``python -m benchmarks --laplace-api``.

A digits MLP 64-13333-10 (d = 999 985, float32) is fitted with
``Laplace(model, "classification", subset_of_weights="all", hessian_structure="rank1inv",
backend=CurvlinopsEF)`` on the 1257 training digits (m = 1257 empirical-Fisher rows, float32:
5.0 GB), then laplace-torch's own ``optimize_prior_precision(method="marglik")`` (100 Adam steps),
the GLM probit predictive of 100 test inputs (1000 Jacobian rows) and 100 posterior samples are
timed, each with its peak resident memory above what the process held before it (Linux VmHWM,
reset per stage). ``--world 2``: the same calls with the rows split along d over 2 gloo
processes on 127.0.0.1 (``comm="torch"``), one row per rank. ``--chunks W``: the same calls
with the rows as a Dask array of column blocks of width W (``chunks=W``, Dask's threaded
scheduler in this process). laplace-torch's FullLaplace cannot
start at this d: its d×d float32 precision alone is 3.6 TiB (``python -m benchmarks --laplace``
shows it failing). ``--quick``: hidden width 1333 (d ≈ 10⁵).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import time
from pathlib import Path

from rank1inv.examples import progress

HIDDEN, QUICK_HIDDEN = 13333, 1333
INPUTS, DRAWS = 100, 100


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measured(fn):
    """(seconds, extra peak resident MiB above the resident set before the call) of fn()."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:  # pragma: no cover - not Linux
        pass
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, max(0, _rss_kib("VmHWM") - before) / 1024


def stages(hidden: int, comm=None, chunks=None) -> tuple[list, dict]:
    """Fit, marglik tuning, the GLM predictive and samples: rows (stage, seconds, MiB, note)."""
    import torch
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF

    import rank1inv.adapters.laplace_torch  # noqa: F401 (registers hessian_structure="rank1inv")
    from benchmarks.bench_laplace import _train, digits, mlp

    X, y, Xt, yt = digits(torch.float32)
    net = _train(mlp(hidden, torch.float32), X, y, steps=50)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64)
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="rank1inv",
                 backend=CurvlinopsEF, storage="float32", comm=comm, chunks=chunks)  # fmt: skip
    rows, facts = [], {}
    t, mib = _measured(lambda: la.fit(loader))
    rows.append(("fit: per-sample gradients into the rows", t, mib, f"rows {la.H.numel() * 4 / 2**30:.2f} GiB"))
    t, mib = _measured(lambda: la.optimize_prior_precision(method="marglik", pred_type="glm"))
    facts.update(prior=float(la.prior_precision), evidence=float(la.log_marginal_likelihood()))
    rows.append(("optimize_prior_precision(marglik), 100 Adam steps", t, mib, "Gram matrix and its spectrum once"))
    out = {}
    t, mib = _measured(lambda: out.update(p=la(Xt[:INPUTS], pred_type="glm", link_approx="probit")))
    facts["accuracy"] = float((out["p"].argmax(1) == yt[:INPUTS]).double().mean())
    rows.append((f"GLM probit predictive of {INPUTS} inputs", t, mib, f"{INPUTS * 10} Jacobian rows"))
    t, mib = _measured(lambda: out.update(s=la.sample(DRAWS, generator=torch.Generator().manual_seed(0))))
    rows.append((f"{DRAWS} posterior samples", t, mib, f"the samples {out['s'].numel() * 4 / 2**20:.0f} MiB"))
    facts.update(d=la.n_params, m=la.num_rows)
    return rows, facts


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    try:
        rows, facts = stages(int(os.environ["RANK1INV_BENCH_HIDDEN"]), comm="torch")
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(dict(rows=rows, facts=facts)))


def _sharded(hidden: int, world: int) -> list:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RANK1INV_BENCH_HIDDEN"] = str(hidden)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, port, tmp), nprocs=world, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def run(quick: bool = False, world: int = 1, chunks: int | None = None) -> str:
    hidden = QUICK_HIDDEN if quick else HIDDEN
    lines = ["| stage | processes | seconds | extra peak memory (MiB) | note |", "|---|---|---|---|---|"]
    progress.step(f"one process, hidden width {hidden}")
    rows, facts = stages(hidden)
    gc.collect()  # the first Laplace object's rows, before the next part allocates its own
    lines += [f"| {name} | 1 | {t:.3g} | {mib:.0f} | {note} |" for name, t, mib, note in rows]
    if chunks is not None:
        progress.step(f"Dask column blocks of width {chunks}")
        dask_rows, dask_facts = stages(hidden, chunks=chunks)
        lines += [f"| {name} | 1, Dask blocks of {chunks} | {t:.3g} | {mib:.0f} | {note} |"
                  for name, t, mib, note in dask_rows]  # fmt: skip
        if abs(dask_facts["evidence"] - facts["evidence"]) > 1e-6 * abs(facts["evidence"]):
            lines.append(f"| evidence differs over Dask: {dask_facts['evidence']} | | | | |")
    if world > 1:
        progress.step(f"{world} gloo processes, the rows split along d")
        for r, res in enumerate(_sharded(hidden, world)):
            lines += [f"| {name} | rank {r} of {world} | {t:.3g} | {mib:.0f} | {note} |"
                      for name, t, mib, note in res["rows"]]  # fmt: skip
            if abs(res["facts"]["evidence"] - facts["evidence"]) > 1e-6 * abs(facts["evidence"]):
                lines.append(f"| evidence differs on rank {r}: {res['facts']['evidence']} | | | | |")
    lines.append(f"\nd = {facts['d']}, m = {facts['m']} rows; tuned prior precision {facts['prior']:.4g}, "
                 f"log evidence {facts['evidence']:.6g}, probit accuracy on the {INPUTS} inputs "
                 f"{facts['accuracy']:.3f}")  # fmt: skip
    return "\n".join(lines)
