"""StaticInverse over gradients sharded along d: 2 and 4 processes with torch.distributed (gloo on
127.0.0.1), every query against the single-process operator (docs/design.md §12)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from helpers import DISTRIBUTED_TIMEOUT_S as TIMEOUT_S  # noqa: E402
from helpers import checkout_env, spawn  # noqa: E402


def cuts(d, world):
    return np.linspace(0, d, world + 1).astype(int)


def worker(rank, world, port, out_dir):
    import datetime

    import rank1inv as r1
    from rank1inv import testing

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    results = {}
    try:
        for dtype in ("float64", "float32"):
            for family in ("iid", "clusters", "huge_row"):
                G = testing.gradients(family, 10, 157, seed=3, dtype=dtype)
                m, d = G.shape
                lo, hi = cuts(d, world)[rank], cuts(d, world)[rank + 1]
                op = r1.StaticInverse(np.ascontiguousarray(G[:, lo:hi]), 1e-3, comm="torch")
                assert op.local_range == (lo, hi) and op.global_dim == d
                rng = np.random.default_rng(7)
                X = rng.standard_normal((d, 2))
                before, calls = op.communicator.bytes_sent, op.communicator.collectives
                Y = op @ X[lo:hi]
                sent = op.communicator.bytes_sent - before
                calls = op.communicator.collectives - calls
                idx = np.array([0, 5, d // 2, d - 1])
                z = rng.standard_normal((2, d + m))  # the global noise: z₁ (d), z₂ (m)
                S = op.sample_from_noise(np.concatenate([z[:, lo:hi], z[:, d:]], axis=1))
                from rank1inv import laplace

                theta = rng.standard_normal(d)
                J = rng.standard_normal((3, d))
                lml = laplace.log_marginal_likelihood(op, 2.0, theta[lo:hi])
                pv = np.asarray(laplace.predictive_variance(op, J[:, lo:hi]), np.float64).tolist()
                results[f"{dtype}-{family}-laplace"] = dict(lml=lml, pv=pv)
                results[f"{dtype}-{family}"] = dict(
                    Y=np.asarray(Y, dtype=np.float64).tolist(), diag=np.asarray(op.diag(), np.float64).tolist(),
                    entries=np.asarray(op.entries(idx, idx[::-1]), np.float64).tolist(),
                    sub=np.asarray(op.submatrix(idx), np.float64).tolist(), logdet=op.logdet(),
                    column=np.asarray(op.column(d // 2), np.float64).tolist(),
                    sample=np.asarray(S, np.float64).tolist(), bytes=sent, calls=calls, m=m,
                    draws=np.asarray(op.sample(3, rng=11), np.float64).tolist(),
                    redamped=np.asarray(op.with_damp(0.5) @ X[lo:hi], np.float64).tolist(),
                )  # fmt: skip
        for dtype in ("float64", "float32"):  # the sliding window over shards
            pool = testing.gradients("clusters", 13, 157, seed=5, dtype=dtype)
            d = pool.shape[1]
            lo, hi = cuts(d, world)[rank], cuts(d, world)[rank + 1]
            w = r1.DynamicInverse(hi - lo, 8, 1e-2, dtype=dtype, comm="torch")
            for g in pool[:12]:
                w.push(np.ascontiguousarray(g[lo:hi]))
            before, calls = w.communicator.bytes_sent, w.communicator.collectives
            y = w.push_apply(np.ascontiguousarray(pool[12, lo:hi]))
            sent = w.communicator.bytes_sent - before
            calls = w.communicator.collectives - calls
            X = np.random.default_rng(8).standard_normal((d, 2))
            state = w.state_dict()
            w2 = r1.DynamicInverse(hi - lo, 8, 1e-2, dtype=dtype, comm="torch")
            w2.load_state_dict(state)
            results[f"window-{dtype}"] = dict(
                y=np.asarray(y, np.float64).tolist(), Y=np.asarray(w @ X[lo:hi], np.float64).tolist(),
                Y2=np.asarray(w2 @ X[lo:hi], np.float64).tolist(), diag=np.asarray(w.diag(), np.float64).tolist(),
                entries=np.asarray(w.entries([0, 100], [3, 100]), np.float64).tolist(), logdet=w.logdet(), bytes=sent,
                calls=calls, plain_calls=_push_apply_calls(dtype, lo, hi),
                redamped=np.asarray(w.with_damp(0.5) @ X[lo:hi], np.float64).tolist(),
                fisher=np.asarray(w.fisher() @ X[lo:hi], np.float64).tolist(),
                half=np.asarray(w.power(-0.5) @ (w.power(-0.5) @ X[lo:hi]), np.float64).tolist(),
            )  # fmt: skip
            np.savez(os.path.join(out_dir, f"state-{dtype}-{rank}.npz"), **state)
            if dtype == "float64":  # a window saved by one process, loaded on `world` ranks
                from rank1inv.sharded import reshard

                single = dict(np.load(os.path.join(out_dir, "single.npz")))
                mine = reshard([single], np.diff(cuts(d, world)))[rank]
                w3 = r1.DynamicInverse(hi - lo, 8, 1e-2, dtype=dtype, comm="torch")
                w3.load_state_dict(mine)
                results["resharded"] = np.asarray(w3 @ X[lo:hi], np.float64).tolist()
        op = r1.StaticInverse(np.ones((3, 40)) + np.arange(40) / 40 * (1 + rank), 1.0, comm="torch")
        x_bad = np.ones((op.shape[0], 2))
        if rank == world - 1:
            x_bad[0, 1] = np.nan  # on one rank only: every rank must refuse the product
        try:
            op @ x_bad
            results["nan"] = "accepted"
        except ValueError as err:
            results["nan"] = str(err)
        results["mfac"] = mfac_run(world, rank)
        try:  # a rank with a different m: every rank gets the error, none hangs
            r1.StaticInverse(np.ones((3 if rank == 0 else 4, 40)), 1.0, comm="torch")
            results["mismatch"] = "accepted"
        except ValueError as err:
            results["mismatch"] = str(err)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)


def _push_apply_calls(dtype, lo, hi) -> int:
    """Collectives of one push_apply into a full sharded window of iid gradients (no
    cancellation: the one-pass form)."""
    import rank1inv as r1
    from rank1inv import testing

    pool = testing.gradients("iid", 10, 157, seed=9, dtype=dtype)
    w = r1.DynamicInverse(hi - lo, 8, 1e-2, dtype=dtype, comm="torch")
    for g in pool[:9]:
        w.push(np.ascontiguousarray(g[lo:hi]))
    before = w.communicator.collectives
    w.push_apply(np.ascontiguousarray(pool[9, lo:hi]))
    return w.communicator.collectives - before


def mfac_run(world, rank, steps=6):
    """M-FAC on L(w) = Σ_i (c_i·w − y_i)², w sharded across ranks (or whole for world = 1):
    the final w (this rank's slice)."""
    from rank1inv.adapters.torch import MFAC

    rng = np.random.default_rng(2)
    C, target = rng.standard_normal((20, 157)), rng.standard_normal(20)
    lo, hi = cuts(157, world)[rank], cuts(157, world)[rank + 1]
    w = torch.nn.Parameter(torch.zeros(hi - lo, dtype=torch.float64))
    opt = MFAC([w], lr=0.5, ngrads=4, damp=1e-1, comm="torch" if world > 1 else None)
    Cr = torch.from_numpy(C[:, lo:hi])
    for _ in range(steps):
        partial = Cr @ w.detach()
        if world > 1:
            dist.all_reduce(partial)
        residual = partial - torch.from_numpy(target)
        w.grad = 2 * Cr.T @ residual
        opt.step()
    return w.detach().numpy().tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_static_inverse_equals_single_process(world, tmp_path):
    import rank1inv as r1
    from rank1inv import testing

    single = r1.DynamicInverse(157, 8, 1e-2, dtype="float64")  # saved by one process
    pool = testing.gradients("clusters", 13, 157, seed=5, dtype="float64")
    for g in pool:
        single.push(g)
    np.savez(tmp_path / "single.npz", **single.state_dict())
    ranks = spawn(worker, world, tmp_path)
    for dtype in ("float64", "float32"):
        eta, rel = (5e-12, 1e-6) if dtype == "float64" else (1e-7, 1e-6)
        for family in ("iid", "clusters", "huge_row"):
            key = f"{dtype}-{family}"
            G = testing.gradients(family, 10, 157, seed=3, dtype=dtype)
            m, d = G.shape
            ref = r1.StaticInverse(G, 1e-3)
            F = testing.dense_fisher(G.astype(np.float64), 1e-3, 1.0 / m)
            rng = np.random.default_rng(7)
            X = rng.standard_normal((d, 2))
            z = rng.standard_normal((2, d + m))
            Y = np.concatenate([np.array(rk[key]["Y"]) for rk in ranks])
            assert testing.backward_error(F, Y, X) <= eta, key
            np.testing.assert_allclose(Y, np.asarray(ref @ X, np.float64), rtol=0, atol=1e-6 * np.abs(Y).max())
            redamped = np.concatenate([np.array(rk[key]["redamped"]) for rk in ranks])
            F_half = testing.dense_fisher(G.astype(np.float64), 0.5, 1.0 / m)
            assert testing.backward_error(F_half, redamped, X) <= eta, key  # with_damp of a ShardedInverse
            diag = np.concatenate([rk[key]["diag"] for rk in ranks])
            np.testing.assert_allclose(diag, np.asarray(ref.diag(), np.float64), rtol=rel)
            idx = np.array([0, 5, d // 2, d - 1])
            for rk in ranks:  # global-index queries: the same values on every rank
                assert rk[key]["entries"] == ranks[0][key]["entries"] and rk[key]["logdet"] == ranks[0][key]["logdet"]
                np.testing.assert_allclose(rk[key]["entries"], ref.entries(idx, idx[::-1]), rtol=rel, atol=1e-12)
                np.testing.assert_allclose(rk[key]["sub"], ref.submatrix(idx), rtol=rel, atol=1e-9)
                assert abs(rk[key]["logdet"] - ref.logdet()) <= 1e-10 * abs(ref.logdet())
                assert rk[key]["bytes"] <= 8 * 2 * (m + 4)  # O(m) per product, independent of d
                assert rk[key]["calls"] == 3  # the agreement (with max|x|), max|x| per column, G·x with ‖x‖²
            column = np.concatenate([rk[key]["column"] for rk in ranks])
            np.testing.assert_allclose(column, np.asarray(ref.column(d // 2), np.float64), rtol=0,
                                       atol=1e-6 * np.abs(column).max())  # fmt: skip
            S = np.concatenate([np.array(rk[key]["sample"]) for rk in ranks], axis=1)
            np.testing.assert_allclose(S, np.asarray(ref.sample_from_noise(z), np.float64), rtol=0,
                                       atol=1e-6 * np.abs(S).max())  # fmt: skip
            from rank1inv import laplace

            theta, J = rng.standard_normal(d), rng.standard_normal((3, d))
            lml = laplace.log_marginal_likelihood(ref, 2.0, theta)
            pv = np.asarray(laplace.predictive_variance(ref, J), np.float64)
            for rk in ranks:
                assert abs(rk[key + "-laplace"]["lml"] - lml) <= 1e-9 * abs(lml)
                np.testing.assert_allclose(rk[key + "-laplace"]["pv"], pv, rtol=1e-6)
            draws = [np.array(rk[key]["draws"]) for rk in ranks]
            assert all(np.isfinite(x).all() for x in draws)
            if world > 1:  # independent z₁ across ranks even with one seed
                assert not np.allclose(draws[0][:, :3], draws[1][:, :3])
    for dtype in ("float64", "float32"):  # windows
        key = f"window-{dtype}"
        pool = testing.gradients("clusters", 13, 157, seed=5, dtype=dtype)
        ref = r1.DynamicInverse(157, 8, 1e-2, dtype=dtype)
        for g in pool[:12]:
            ref.push(g)
        y_ref = np.asarray(ref.push_apply(pool[12]), np.float64)
        X = np.random.default_rng(8).standard_normal((157, 2))
        tol = 1e-12 if dtype == "float64" else 1e-6
        redamped = ref.with_damp(0.5) @ X
        pairs = (("y", y_ref), ("Y", ref @ X), ("Y2", ref @ X), ("diag", ref.diag()), ("redamped", redamped),
                 ("fisher", ref.fisher() @ X), ("half", ref @ X))  # fmt: skip
        for name, want in pairs:
            got = np.concatenate([np.array(rk[key][name]) for rk in ranks])
            np.testing.assert_allclose(got, np.asarray(want, np.float64), rtol=0, atol=tol * np.abs(want).max(),
                                       err_msg=f"{key} {name}")  # fmt: skip
        for rk in ranks:
            np.testing.assert_allclose(rk[key]["entries"], ref.entries([0, 100], [3, 100]), rtol=1e-6, atol=1e-9)
            assert abs(rk[key]["logdet"] - ref.logdet()) <= 1e-10 * abs(ref.logdet())
            assert rk[key]["bytes"] <= 8 * (3 * 8 + 16)  # push_apply: O(capacity), not O(d)
            assert rk[key]["plain_calls"] == 2  # max|g| with the agreement, the Gram row with ‖g‖²
    X = np.random.default_rng(8).standard_normal((157, 2))
    got = np.concatenate([np.array(rk["resharded"]) for rk in ranks])  # 1 → world ranks
    np.testing.assert_allclose(got, single @ X, rtol=0, atol=1e-12 * np.abs(single @ X).max())
    from rank1inv.sharded import reshard

    for dtype in ("float64", "float32"):  # world ranks → 1
        saved = [dict(np.load(tmp_path / f"state-{dtype}-{r}.npz")) for r in range(world)]
        (merged,) = reshard(saved, [157])
        w1 = r1.DynamicInverse(157, 8, 1e-2, dtype=dtype)
        w1.load_state_dict(merged)
        ref = r1.DynamicInverse(157, 8, 1e-2, dtype=dtype)
        for g in testing.gradients("clusters", 13, 157, seed=5, dtype=dtype):
            ref.push(g)
        np.testing.assert_allclose(np.asarray(w1 @ X, np.float64), np.asarray(ref @ X, np.float64), rtol=0,
                                   atol=1e-6 * np.abs(np.asarray(ref @ X)).max())  # fmt: skip
    w = np.concatenate([np.array(rk["mfac"]) for rk in ranks])
    ref_w = np.array(mfac_run(1, 0))  # sums over shards in another order: equal to rounding
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-9 * np.abs(ref_w).max())
    for rk in ranks:
        assert "same number of gradients" in rk["mismatch"]
        assert "non-finite" in rk["nan"]  # a nan on one rank reaches every rank's max|x|


def fsdp_run(world, rank, steps=5):
    """M-FAC with momentum on a small tanh MLP (float64), the same batch every step on every rank:
    the final parameters (whole) and the optimizer's bytes sent by this rank per step."""
    from rank1inv.adapters.torch import MFAC

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = MFAC(model.parameters(), lr=0.3, ngrads=3, damp=1e-1, momentum=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
    sent = []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = sum(w.communicator.bytes_sent for ws in opt._windows for w in ws) if world > 1 else 0
        opt.step()
        if world > 1:
            sent.append(sum(w.communicator.bytes_sent for ws in opt._windows for w in ws) - before)
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [t.detach().reshape(-1).tolist() for t in whole], sent


def fsdp_worker(rank, world, port, out_dir):
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        params, sent = fsdp_run(world, rank)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor

        from rank1inv.adapters.torch import MFAC

        replicated = torch.nn.Parameter(distribute_tensor(torch.zeros(8), init_device_mesh("cpu", (world,)),
                                                          [Replicate()]))  # fmt: skip
        try:
            MFAC([replicated], lr=0.1, ngrads=2)
            refused = "accepted"
        except ValueError as err:
            refused = str(err)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(dict(params=params, sent=sent, refused=refused), fh)


def test_mfac_on_an_fsdp2_model_equals_single_process(tmp_path):
    """``fully_shard`` (FSDP2) on 2 gloo processes: MFAC takes the DTensor parameters as they are
    (the mesh's group, local shards), and trains exactly as one process on the whole model."""
    pytest.importorskip("torch.distributed.fsdp")
    ranks = spawn(fsdp_worker, 2, tmp_path)
    ref, _ = fsdp_run(1, 0)
    for rk in ranks:
        for got, want in zip(rk["params"], ref):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    for rk in ranks:  # O(ngrads) floats per step (new Gram row, IHVP, scalars), not O(d)
        assert rk["sent"] and max(rk["sent"]) <= 8 * 4 * (3 + 8), rk["sent"]
        assert "Shard placement" in rk["refused"]  # a replicated DTensor would count its coordinates twice


def absent_worker(rank, world, port, out_dir):
    """Rank 1 never enters a push's collectives (a program bug, not a refusal): rank 0 must get
    an error from the engine's timeout, not hang, and keep its window as it was."""
    import datetime
    import time

    import rank1inv as r1

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=5))
    w = r1.DynamicInverse(10, 4, 1e-2, comm="torch")
    w.push(np.ones(10))
    result = {}
    start = time.monotonic()
    if rank == 0:
        try:
            w.push(np.arange(10.0))
            result["error"] = None
        except Exception as err:  # the engine's timeout
            result["error"], result["text"] = type(err).__name__, str(err)[:200]
    result["seconds"], result["len"] = time.monotonic() - start, len(w)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    if rank == 1:
        time.sleep(8)  # alive but absent from the collective: rank 0 must time out, not hang
    os._exit(0)  # the group is broken: no destroy_process_group (it would wait on the lost peer)


def test_a_rank_that_never_calls_leaves_the_others_an_error_not_a_hang(tmp_path):
    ranks = spawn(absent_worker, 2, tmp_path, limit_s=60)
    assert ranks[0]["error"] is not None and 4 < ranks[0]["seconds"] < 30, ranks[0]  # gloo's 5 s timeout
    assert ranks[0]["len"] == 1  # the push that failed was not taken


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_static_inverse_over_mpi(world):
    """``mpiexec -n 2/4`` with mpi4py and an MPI from pip wheels (mpich), on this host only."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    worker = Path(__file__).resolve().parent / "workers" / "mpi_sharded.py"
    env = checkout_env()
    res = subprocess.run([mpiexec, "-n", str(world), "-host", "localhost", sys.executable, str(worker)],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": ok") == world, res.stdout
