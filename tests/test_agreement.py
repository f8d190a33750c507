"""Every collective entry point of the sharded operators agrees on success (docs/design.md §12).

Two gloo processes on 127.0.0.1. In each case rank 1 passes something invalid (or something
that differs from rank 0's) while rank 0's call is valid: every rank must raise (rank 1 its own
error, rank 0 a Refused that carries rank 1's reason, or both the same ValueError about values
that must agree), no rank may commit, and the two ranks must still be in step afterwards (a
valid product on both gives the slices of one result; the windows' replicated state is equal).
Bounded by gloo's timeout (10 s) and the spawn limit.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from test_distributed import cuts, spawn  # noqa: E402

D, M, CAP = 60, 6, 5


def _outcome(fn):
    try:
        fn()
        return ["ok", ""]
    except Exception as err:  # the outcome is what is compared
        return [type(err).__name__, str(err)[:300]]


def agreement_worker(rank, world, port, out_dir):
    import datetime

    import rank1inv as r1
    from rank1inv import laplace, testing
    from rank1inv._comm import digest

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=10))
    bad = rank == 1
    lo, hi = cuts(D, world)[rank], cuts(D, world)[rank + 1]
    n = hi - lo
    G = testing.gradients("iid", M, D, seed=1, dtype="float64")[:, lo:hi].copy()
    rng = np.random.default_rng(3)
    X = rng.standard_normal((D, 2))[lo:hi]
    results = {}
    try:
        op = r1.StaticInverse(G, 1e-2, comm="torch")
        w = r1.DynamicInverse(n, CAP, 1e-2, dtype="float64", comm="torch")
        pool = testing.gradients("iid", 12, D, seed=2, dtype="float64")[:, lo:hi]
        for g in pool[:4]:
            w.push(np.ascontiguousarray(g))

        def window_digest():
            st = w.state_dict()
            return list(digest(st["ages"], st["gram"], st["factor"], st["frames"], st["counter"]))

        good_state = w.state_dict()
        tampered = dict(good_state)
        if bad:
            tampered["gram"] = good_state["gram"] * (1 + 1e-3)
        other_damp = dict(good_state, damp=0.5 if bad else good_state["damp"])
        cases = {
            # construction: values every rank must pass alike
            "static damp": lambda: r1.StaticInverse(G, 0.5 if bad else 1e-2, comm="torch"),
            "static scale": lambda: r1.StaticInverse(G, 1e-2, scale=2.0 if bad else None, comm="torch"),
            "static dtype": lambda: r1.StaticInverse(G.astype(np.float32) if bad else G, 1e-2, comm="torch"),
            "static rows": lambda: r1.StaticInverse(G[:-1] if bad else G, 1e-2, comm="torch"),
            "static 1-D": lambda: r1.StaticInverse(G[0] if bad else G, 1e-2, comm="torch"),
            "static block": lambda: r1.StaticInverse(G, 1e-2, block_size=5 if bad else None, comm="torch"),
            "window capacity": lambda: r1.DynamicInverse(n, CAP + bad, 1e-2, comm="torch"),
            "window dtype": lambda: r1.DynamicInverse(
                n, CAP, 1e-2, dtype="float32" if bad else "float64", comm="torch"
            ),  # fmt: skip
            "window accumulate": lambda: r1.DynamicInverse(
                n, CAP, 1e-2, accumulate="native" if bad else "float64", comm="torch"
            ),  # fmt: skip
            # queries
            "product length": lambda: op @ (X[:-1] if bad else X),
            "product columns": lambda: op @ (X[:, :1] if bad else X),
            "product nan": lambda: op @ np.where(bad, np.nan, X),
            "product foreign": lambda: op @ (torch.zeros(n, 2) if bad else X),
            "matvec": lambda: op.matvec(X[:, 0] * (np.inf if bad else 1.0)),
            "fisher product": lambda: op.fisher() @ (X[:-1] if bad else X),
            "power product": lambda: op.power(0.5) @ (X[:, :1] if bad else X),
            "entries count": lambda: op.entries([0, 1, 2] if bad else [0, 1], [3, 4, 5] if bad else [3, 4]),
            "entries values": lambda: op.entries([0, 2 if bad else 1], [3, 4]),
            "entries range": lambda: op.entries([0, D + 5 if bad else 1], [3, 4]),
            "diag indices": lambda: op.diag([1, 2] if bad else [1]),
            "submatrix": lambda: op.submatrix([1, 2, 3] if bad else [1, 2]),
            "column": lambda: op.column(7 if bad else 8),
            "sample size": lambda: op.sample(3 if bad else 2, rng=0),
            "sample noise": lambda: op.sample_from_noise(np.zeros(op.noise_dim + bad)),
            "with_damp": lambda: op.with_damp(0.3 if bad else 0.2),
            "window product": lambda: w @ (X[:-1] if bad else X),
            "lml weights": lambda: laplace.log_marginal_likelihood(op, 1.0, np.zeros(n + bad)),
            "tune bounds": lambda: laplace.tune_damp(op, 1.0, np.zeros(n), bounds=(True, 2.0) if bad else (1e-3, 2.0)),
            "predictive rows": lambda: laplace.predictive_variance(op, rng.standard_normal((3 + bad, n))),
            # window updates
            "push length": lambda: w.push(np.ones(n + bad)),
            "push nan": lambda: w.push(np.where(bad, np.nan, np.ones(n))),
            "add full": lambda: w.add(np.ones(n + bad)),
            "push_apply": lambda: w.push_apply(np.ones(n) if not bad else np.ones(n, dtype=np.int64)),
            "push_many rows": lambda: w.push_many(pool[4 : 7 if bad else 6].copy()),
            "push_many nan": lambda: w.push_many(np.where(bad, np.nan, pool[4:6])),
            "remove slot": lambda: w.remove(w.slots()[1 if bad else 0]),
            "remove empty": lambda: w.remove(CAP - 1 if bad else w.slots()[0]),
            "replace slot": lambda: w.replace(w.slots()[1 if bad else 0], np.ones(n)),
            "replace g": lambda: w.replace(w.slots()[0], np.ones(n + bad)),
            "load tampered": lambda: w.load_state_dict(tampered),
            "load damp": lambda: w.load_state_dict(other_damp),
            "load junk": lambda: w.load_state_dict("junk" if bad else good_state),
            "window with_damp": lambda: w.with_damp(0.3 if bad else 0.2),
        }
        reference_y = np.asarray(op @ X, np.float64)
        for name, case in cases.items():
            before = window_digest()
            outcome = _outcome(case)
            after = window_digest()
            y = np.asarray(op @ X, np.float64)  # still in step: the same collectives on both ranks
            wy = np.asarray(w @ X, np.float64)
            results[name] = dict(outcome=outcome, unchanged=before == after, digest=after,
                                 in_step=bool(np.allclose(y, reference_y, rtol=1e-13, atol=0)),
                                 wy=wy.tolist())  # fmt: skip
        # an MFAC step where rank 1 has no gradient for one parameter
        from rank1inv.adapters.torch import MFAC

        p1 = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        p2 = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = MFAC([p1, p2], lr=0.1, ngrads=2, damp=1e-1, comm="torch")
        p1.grad = torch.ones(n, dtype=torch.float64)
        p2.grad = None if bad else torch.ones(3, dtype=torch.float64)
        outcome = _outcome(opt.step)
        results["mfac step"] = dict(outcome=outcome, unchanged=p1.detach().abs().sum().item() == 0, in_step=True,
                                    digest=[len(opt._windows[0][0])], wy=[])  # fmt: skip
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)


def test_every_collective_entry_point_refuses_on_every_rank(tmp_path):
    ranks = spawn(agreement_worker, 2, tmp_path, limit_s=240)
    r0, r1 = ranks
    assert len(r0) == len(r1) > 40
    for name in r0:
        a, b = r0[name], r1[name]
        assert b["outcome"][0] != "ok", (name, b)  # rank 1's input was invalid
        assert a["outcome"][0] != "ok", (name, a)  # rank 0's valid call must refuse too
        if a["outcome"][0] == "Refused":  # carries rank 1's reason
            assert "rank 1 refused" in a["outcome"][1] and b["outcome"][0] in a["outcome"][1], (name, a, b)
        else:  # a value both ranks must pass alike: the same error everywhere
            assert a["outcome"] == b["outcome"], (name, a, b)
        assert a["unchanged"] and b["unchanged"], name  # nothing committed anywhere
        assert a["in_step"] and b["in_step"], name
        assert a["digest"] == b["digest"], name  # the replicated state is the same on both ranks
