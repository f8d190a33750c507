"""Run under ``mpiexec -n P``: a sharded StaticInverse over mpi4py against the single-process
operator (every rank checks its own slice and the replicated queries; exit code 1 on failure)."""

import sys

import numpy as np
from mpi4py import MPI

import rank1inv as r1
from rank1inv import testing


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    failures = []
    for dtype in ("float64", "float32"):
        G = testing.gradients("clusters", 10, 157, seed=3, dtype=dtype)
        m, d = G.shape
        cuts = np.linspace(0, d, size + 1).astype(int)
        lo, hi = cuts[rank], cuts[rank + 1]
        op = r1.StaticInverse(np.ascontiguousarray(G[:, lo:hi]), 1e-3, comm=comm)
        ref = r1.StaticInverse(G, 1e-3)
        X = np.random.default_rng(7).standard_normal((d, 2))
        before = op.communicator.bytes_sent
        Y = np.asarray(op @ X[lo:hi], np.float64)
        sent = op.communicator.bytes_sent - before
        F = testing.dense_fisher(G.astype(np.float64), 1e-3, 1.0 / m)
        Y_all = np.concatenate(comm.allgather(Y))
        eta = 5e-12 if dtype == "float64" else 1e-7
        checks = {
            "eta": testing.backward_error(F, Y_all, X) <= eta,
            "diag": np.allclose(op.diag(), ref.diag()[lo:hi], rtol=1e-6),
            "entries": np.allclose(
                op.entries([0, 80, d - 1], [3, 80, d - 1]), ref.entries([0, 80, d - 1], [3, 80, d - 1]), rtol=1e-6
            ),  # fmt: skip
            "logdet": abs(op.logdet() - ref.logdet()) <= 1e-10 * abs(ref.logdet()),
            "bytes O(m)": sent <= 8 * 2 * (m + 4),
        }
        failures += [f"{dtype} {name}" for name, ok in checks.items() if not ok]
    print(f"rank {rank}: {'ok' if not failures else 'FAILED ' + ', '.join(failures)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
