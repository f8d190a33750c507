"""rank1inv.adapters.laplace_torch against laplace-torch's own FullLaplace (its d×d posterior is
the dense float64 reference) on a digits MLP, a small CNN and a regression MLP, with the
empirical Fisher and the GGN; storage dtypes against the dense matrix of the stored rows;
sampled-Fisher rows against their definition; 2 gloo processes against one. Skipped where
laplace-torch is not installed."""

import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian
except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision that does not match torch
    pytest.skip(f"laplace-torch is not importable ({err})", allow_module_level=True)

from helpers import DISTRIBUTED_TIMEOUT_S, spawn  # noqa: E402

from rank1inv.adapters import laplace_torch as lt  # noqa: E402
from rank1inv.examples.digits import load_digits  # noqa: E402

PRIOR = 0.5


@pytest.fixture(autouse=True)
def float64_default():
    """laplace-torch 0.3's Curvlinops backends form H = linop @ torch.eye(d) in torch's default
    dtype: with float32 their H of a float64 model is only float32-accurate (1.8e-8 relative on
    the MLP here), so the reference runs with float64 as the default (restored afterwards)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def trained(net, X, y, loss, steps=150):
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        opt.zero_grad()
        loss(net(X[idx]), y[idx]).backward()
        opt.step()
    return net


def problem(kind: str, n: int = 150):
    """(model, train loader, test inputs, likelihood, sigma_noise): float64, trained briefly."""
    torch.manual_seed(0)
    if kind == "regression":
        X = torch.rand(n, 3, dtype=torch.float64) * 4 - 2
        y = torch.stack([torch.sin(X.sum(1)), torch.cos(X[:, 0])], 1) + 0.1 * torch.randn(n, 2, dtype=torch.float64)
        net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)).double()
        net = trained(net, X, y, torch.nn.functional.mse_loss)
        Xt = torch.rand(12, 3, dtype=torch.float64) * 4 - 2
        lik, sigma = "regression", 0.3
    else:
        Xa, ya, Xb, _ = load_digits(0)
        X, y, Xt = (torch.tensor(a[:n]) for a in (Xa, ya, Xb[:12]))
        X, Xt = X.double(), Xt.double()
        if kind == "cnn":
            X, Xt = X.reshape(-1, 1, 8, 8), Xt.reshape(-1, 1, 8, 8)
            net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                      torch.nn.Linear(108, 10)).double()  # fmt: skip
        else:
            net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
        net = trained(net, X, y, torch.nn.functional.cross_entropy)
        lik, sigma = "classification", 1.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64)
    return net, loader, Xt, lik, sigma


def pair(kind, backend, n=150, **ours):
    net, loader, Xt, lik, sigma = problem(kind, n)
    ref = Laplace(net, lik, subset_of_weights="all", hessian_structure="full", backend=backend,
                  prior_precision=PRIOR, sigma_noise=sigma)  # fmt: skip
    mine = Laplace(net, lik, subset_of_weights="all", hessian_structure="rank1inv", backend=backend,
                   prior_precision=PRIOR, sigma_noise=sigma, **ours)  # fmt: skip
    ref.fit(loader)
    mine.fit(loader)
    return ref, mine, Xt, net


CASES = [("mlp", CurvlinopsEF, {}), ("mlp", CurvlinopsGGN, {}), ("cnn", CurvlinopsEF, {}), ("cnn", CurvlinopsGGN, {}),
         ("regression", CurvlinopsEF, {}), ("regression", CurvlinopsGGN, {}),
         ("mlp", CurvlinopsEF, {"chunks": 100}), ("cnn", CurvlinopsEF, {"chunks": 64}),
         ("mlp", CurvlinopsGGN, {"chunks": 100})]  # fmt: skip


@pytest.mark.parametrize("kind,backend,ours", CASES, ids=[f"{k}-{b.__name__}{'-dask' * bool(o)}" for k, b, o in CASES])
def test_equals_full_laplace(kind, backend, ours):
    """Evidence (scalar, per-tensor and per-coordinate priors), posterior precision and variance,
    GLM predictive and its link approximations, log_prob: FullLaplace's to 1e-8 or better.
    The cases cover both sides of Woodbury: m = N rows (ef) or N·C (ggn) against d; with
    ``chunks`` the passes of a scalar prior run over Dask column blocks (d > m) and the rest in
    process."""
    if ours:
        pytest.importorskip("dask.array")
    ref, mine, Xt, _ = pair(kind, backend, **ours)
    assert isinstance(mine, lt.Rank1invLaplace) and mine.curvature == ("ef" if backend is CurvlinopsEF else "ggn")
    if ours:
        from rank1inv.chunked import DaskInverse

        assert isinstance(mine.posterior, DaskInverse) == (mine.n_params > mine.num_rows)
    d = mine.n_params
    gen = torch.Generator().manual_seed(1)
    priors = [torch.tensor([0.3]), torch.rand(mine.n_layers, generator=gen, dtype=torch.float64) * 3 + 0.1,
              torch.rand(d, generator=gen, dtype=torch.float64) * 3 + 0.1, torch.tensor([2e3])]  # fmt: skip
    for prior in priors:
        a, b = ref.log_marginal_likelihood(prior.clone()), mine.log_marginal_likelihood(prior.clone())
        assert abs(float(a - b)) <= 1e-8 * abs(float(a)), prior.numel()
    assert rel(mine.posterior_precision, ref.posterior_precision) <= 1e-12
    assert rel(mine.posterior_covariance, ref.posterior_covariance) <= 1e-9
    assert rel(mine.posterior_variance, torch.diagonal(ref.posterior_covariance)) <= 1e-9
    assert rel(mine.posterior_scale @ mine.posterior_scale, ref.posterior_covariance) <= 1e-9
    Js, _ = ref.backend.jacobians(Xt)
    assert rel(mine.functional_variance(Js), ref.functional_variance(Js)) <= 1e-9
    assert rel(mine.functional_covariance(Js), ref.functional_covariance(Js)) <= 1e-9
    theta = ref.mean + 0.01 * torch.randn(d, generator=gen, dtype=torch.float64)
    assert abs(float(mine.log_prob(theta) - ref.log_prob(theta))) <= 1e-8 * abs(float(ref.log_prob(theta)))
    if ref.likelihood == "regression":
        for joint in (False, True):
            (fa, va), (fb, vb) = ref(Xt, pred_type="glm", joint=joint), mine(Xt, pred_type="glm", joint=joint)
            assert rel(fb, fa) <= 1e-12 and rel(vb, va) <= 1e-9
    else:
        for link in ("probit", "bridge", "bridge_norm"):
            pa, pb = ref(Xt, pred_type="glm", link_approx=link), mine(Xt, pred_type="glm", link_approx=link)
            assert float((pa - pb).abs().max()) <= 1e-8, link


@pytest.mark.parametrize("kind", ["mlp", "regression"])
def test_marglik_tuning_and_sigma_gradient_match(kind):
    """laplace-torch's own optimize_prior_precision (Adam on the log prior through our
    differentiable log det) reaches the same prior; the evidence's gradient in σ is the same."""
    ref, mine, _, _ = pair(kind, CurvlinopsGGN)
    for structure in ("scalar", "layerwise", "diag"):
        ref.optimize_prior_precision(method="marglik", prior_structure=structure, n_steps=30)
        mine.optimize_prior_precision(method="marglik", prior_structure=structure, n_steps=30)
        assert rel(mine.prior_precision, ref.prior_precision) <= 1e-8, structure
    if kind == "regression":  # d = 386 > m = 300: the per-coordinate prior takes the operator's path
        for start in (torch.tensor([0.7]), torch.linspace(0.2, 3.0, mine.n_params)):
            grads = []
            for la in (ref, mine):
                sigma = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
                prior = start.clone().requires_grad_(True)
                la.log_marginal_likelihood(prior, sigma).backward()
                grads.append(torch.cat([sigma.grad[None], prior.grad]))
            assert rel(grads[1], grads[0]) <= 1e-8, start.numel()


def test_gridsearch_matches():
    ref, mine, Xt, _ = pair("mlp", CurvlinopsEF)
    Xa, ya, Xb, yb = load_digits(0)
    val = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.tensor(Xb[:80]).double(), torch.tensor(yb[:80])), batch_size=40
    )
    for la in (ref, mine):
        la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=9, pred_type="glm")
    assert float(mine.prior_precision) == pytest.approx(float(ref.prior_precision), rel=1e-12)


def test_samples_have_the_posterior_law_and_the_nn_predictive_restores_the_model():
    ref, mine, Xt, net = pair("mlp", CurvlinopsEF)
    before = [p.detach().clone() for p in net.parameters()]
    n = 4000
    S = mine.sample(n, generator=torch.Generator().manual_seed(0)) - mine.mean
    again = mine.sample(n, generator=torch.Generator().manual_seed(0)) - mine.mean
    assert torch.equal(S, again)  # the generator fixes the draws
    Sigma = ref.posterior_covariance
    # projections on fixed directions: var(vᵀx) = vᵀΣv within 6 standard errors (√(2/n) relative)
    V = torch.randn(mine.n_params, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    V[:, :3] = torch.linalg.eigh(Sigma).eigenvectors[:, -3:]  # the widest directions too
    var = (S @ V).var(dim=0)
    truth = torch.einsum("dk,de,ek->k", V, Sigma, V)
    assert torch.all((var / truth - 1).abs() <= 6 * (2 / n) ** 0.5), var / truth
    mean = (S @ V).mean(dim=0)
    assert torch.all(mean.abs() <= 6 * (truth / n).sqrt())
    probs = mine(Xt, pred_type="nn", link_approx="mc", n_samples=50)
    assert probs.shape == (len(Xt), 10) and torch.allclose(probs.sum(1), torch.ones(len(Xt), dtype=torch.float64))
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    draws = mine.predictive_samples(Xt, pred_type="glm", n_samples=7)
    assert draws.shape == (7, len(Xt), 10)
    mc = []
    for la in (mine, ref):  # laplace-torch's MC link draws from torch's global generator: the same draws
        with torch.random.fork_rng():
            torch.manual_seed(5)
            mc.append(la(Xt, pred_type="glm", link_approx="mc", n_samples=200))
    assert float((mc[0] - mc[1]).abs().max()) <= 1e-8


def test_the_api_benchmark_runs_small():
    """``python -m benchmarks --laplace-api`` at a tiny width: every stage runs and is timed."""
    from benchmarks import bench_laplace_api

    rows, facts = bench_laplace_api.stages(4)
    assert len(rows) == 4 and all(t > 0 for _, t, _, _ in rows) and facts["m"] == 1257
    assert np.isfinite(facts["evidence"]) and facts["prior"] > 0


def test_state_dict_resumes_exactly_and_refuses_another_curvature():
    ref, mine, Xt, net = pair("mlp", CurvlinopsEF)
    mine.optimize_prior_precision(method="marglik", n_steps=10)
    buffer = io.BytesIO()
    torch.save(mine.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    fresh = lt.Rank1invLaplace(net, "classification", backend=CurvlinopsEF)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_marginal_likelihood(), mine.log_marginal_likelihood())
    assert torch.equal(fresh(Xt, pred_type="glm"), mine(Xt, pred_type="glm"))
    other = lt.Rank1invLaplace(net, "classification", backend=CurvlinopsGGN)
    with pytest.raises(ValueError, match="curvature"):
        other.load_state_dict(state)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float64-memmap"])
def test_storage_dtypes_are_exact_for_the_stored_rows(storage, tmp_path):
    """With 16/32-bit rows the posterior is the one of the rounded rows, computed exactly: the
    evidence and predictive against a dense float64 matrix built from ``la.H`` itself."""
    net, loader, Xt, lik, _ = problem("mlp")
    kwargs = {"storage": storage.split("-")[0]}
    if storage.endswith("memmap"):
        kwargs["storage_path"] = str(tmp_path / "rows.bin")
    la = lt.Rank1invLaplace(net, lik, prior_precision=PRIOR, curvature="ef", **kwargs)
    la.fit(loader)
    assert la.H.dtype == lt.STORAGE[kwargs["storage"]]
    if storage.endswith("memmap"):
        assert os.path.getsize(tmp_path / "rows.bin") == la.H.numel() * 8
    R = la.H.to(torch.float64)
    P = R.T @ R + PRIOR * torch.eye(la.n_params, dtype=torch.float64)
    log_det_ratio = torch.linalg.slogdet(P)[1] - la.n_params * np.log(PRIOR)
    assert abs(float(la.log_det_ratio - log_det_ratio)) <= 1e-10 * float(log_det_ratio)
    Js, _ = la._jacobians(Xt)
    dense = torch.einsum("ncp,pq,nkq->nck", Js, torch.linalg.inv(P), Js)
    assert rel(la.functional_variance(Js), dense) <= 1e-7  # float32 products of the stored rows


def test_dask_rows_from_a_memory_map_on_a_local_cluster(tmp_path):
    """chunks= with a bfloat16 memory map on a LocalCluster (two worker processes on 127.0.0.1,
    each task reading its columns from the file): the answers of the in-process operator over
    the same stored rows (they differ only in the order of float64 sums)."""
    distributed = pytest.importorskip("distributed")
    net, loader, Xt, lik, _ = problem("cnn")
    common = dict(prior_precision=PRIOR, curvature="ef", storage="bfloat16")
    plain = lt.Rank1invLaplace(net, lik, **common)
    plain.fit(loader)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster, timeout="60s"):  # fmt: skip
        la = lt.Rank1invLaplace(net, lik, storage_path=str(tmp_path / "rows.bin"), chunks=200, **common)
        la.fit(loader)
        assert torch.equal(la.H, plain.H)
        Js, _ = la._jacobians(Xt)
        for prior in (torch.rand(la.n_layers, dtype=torch.float64) + 0.1, torch.tensor([0.3])):  # it stays set
            a, b = la.log_marginal_likelihood(prior.clone()), plain.log_marginal_likelihood(prior.clone())
            assert abs(float(a - b)) <= 1e-12 * abs(float(b))
        assert type(la.posterior).__name__ == "DaskInverse"
        assert rel(la.functional_variance(Js), plain.functional_variance(Js)) <= 1e-12
        assert rel(la.posterior_variance, plain.posterior_variance) <= 1e-12
        draws = [x.sample(8, generator=torch.Generator().manual_seed(2)) for x in (la, plain)]
        assert rel(draws[0], draws[1]) <= 1e-12
        pa, pb = la(Xt, link_approx="probit"), plain(Xt, link_approx="probit")
        assert float((pa - pb).abs().max()) <= 1e-12
        # a second fit appended in memory (override=False) and a loaded state: the Dask blocks
        # come from H, not from the file, which holds only the last fit's rows
        for x in (la, plain):
            x.fit(loader, override=False)
        assert rel(la.functional_variance(Js), plain.functional_variance(Js)) <= 1e-12
        other = lt.Rank1invLaplace(net, lik, storage_path=str(tmp_path / "other.bin"), chunks=200, **common)
        other.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*loader.dataset[:20]), batch_size=8))
        other.load_state_dict(plain.state_dict())
        assert rel(other.functional_variance(Js), plain.functional_variance(Js)) <= 1e-12


def test_sampled_fisher_rows_are_sampled_label_gradients():
    """Each "fisher" row is (p − e_k)ᵀJ/√S for some class k (classification) or −εᵀJ/√S, a
    vector in the row space of J (regression); with S large RᵀR approaches the GGN."""
    for kind in ("mlp", "regression"):
        net, loader, Xt, lik, _ = problem(kind, n=20)
        S = 3
        la = lt.Rank1invLaplace(net, lik, curvature="fisher", backend_kwargs={"num_samples": S},
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
        la.fit(loader)
        X = loader.dataset.tensors[0]
        J, f = la._jacobians(X)
        rows = la.H.reshape(len(X), S, -1) * S**0.5
        if kind == "mlp":
            p = torch.softmax(f, -1)
            candidates = torch.einsum("nk,nkd->nd", p, J)[:, None, :] - J  # (n, C, d): (p − e_k)ᵀJ
            dist = (rows[:, :, None, :] - candidates[:, None, :, :]).norm(dim=-1).min(dim=-1).values
            assert float(dist.max()) <= 1e-12 * float(candidates.norm(dim=-1).max())
        else:
            coef = torch.linalg.lstsq(J.transpose(1, 2), rows.transpose(1, 2)).solution  # rows = coefᵀJ
            assert rel(torch.einsum("nks,nkd->nsd", coef, J), rows) <= 1e-12


def test_last_layer_equals_laplace_torch_last_layer():
    net, loader, Xt, lik, _ = problem("mlp")
    flags = [p.requires_grad for p in net.parameters()]
    ref = Laplace(net, lik, subset_of_weights="last_layer", hessian_structure="full", backend=CurvlinopsEF,
                  prior_precision=PRIOR)  # fmt: skip
    mine = Laplace(net, lik, subset_of_weights="last_layer", hessian_structure="rank1inv", backend=CurvlinopsEF,
                   prior_precision=PRIOR)  # fmt: skip
    assert isinstance(mine, lt.Rank1invLLLaplace) and mine.n_params == 90
    ref.fit(loader)
    mine.fit(loader)
    a, b = ref.log_marginal_likelihood(), mine.log_marginal_likelihood()
    assert abs(float(a - b)) <= 1e-8 * abs(float(a))
    pa, pb = ref(Xt, pred_type="glm"), mine(Xt, pred_type="glm")
    assert float((pa - pb).abs().max()) <= 1e-8
    assert [p.requires_grad for p in net.parameters()] == flags


def test_refusals_and_no_side_effects():
    net, loader, Xt, lik, _ = problem("mlp", n=10)
    with pytest.raises(ValueError, match="enable_backprop"):
        lt.Rank1invLaplace(net, lik, enable_backprop=True)
    with pytest.raises(ValueError, match="curvature rows"):
        lt.Rank1invLaplace(net, lik, backend=CurvlinopsHessian)
    with pytest.raises(ValueError, match="curvature must be"):
        lt.Rank1invLaplace(net, lik, curvature="kfac")
    with pytest.raises(ValueError, match="chunks must be"):
        lt.Rank1invLaplace(net, lik, chunks=0)
    with pytest.raises(ValueError, match="pass one"):
        lt.Rank1invLaplace(net, lik, chunks=100, comm="torch")  # refused before any process group is needed
    with pytest.raises(ValueError, match="storage"):
        lt.Rank1invLaplace(net, lik, storage="int8")
    with pytest.raises(ValueError, match="Length of prior precision"):
        lt.Rank1invLaplace(net, lik, prior_precision=torch.ones(3))
    la = lt.Rank1invLaplace(net, lik)
    with pytest.raises(AttributeError, match="not fitted"):
        la.log_marginal_likelihood()
    bad = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xt[:4], torch.full((4,), 99)), batch_size=2)
    with pytest.raises(IndexError):  # a label outside the 10 classes, in the loss of the first batch
        la.fit(bad)
    assert la.H is None and la.n_outputs == 0 and la.n_data == 0  # a fit that raises changes nothing
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    la.fit(loader)
    la(Xt, pred_type="glm")
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in net.parameters())
    wide = torch.nn.Sequential(torch.nn.Linear(64, 70), torch.nn.Linear(70, 10)).double()
    big = lt.Rank1invLaplace(wide, lik, curvature="ef")
    big.fit(loader)
    with pytest.raises(ValueError, match="posterior_variance"):
        _ = big.posterior_covariance
    assert big.posterior_variance.shape == (big.n_params,)


# ------------------------------------------------------------------- 2 gloo processes against 1
def sharded_worker(rank, world, port, out_dir):
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=DISTRIBUTED_TIMEOUT_S))  # fmt: skip
    try:
        out = {}
        for comm in (None, "torch"):
            net, loader, Xt, lik, _ = problem("cnn", n=60)
            la = lt.Rank1invLaplace(net, lik, prior_precision=PRIOR, curvature="ggn", comm=comm)
            la.fit(loader)
            lml = [float(la.log_marginal_likelihood(p)) for p in (torch.tensor([0.3]), torch.ones(4) * 0.2)]
            la.optimize_prior_precision(method="marglik", n_steps=10)
            out[str(comm)] = dict(
                lml=lml, prior=la.prior_precision.tolist(), probs=la(Xt, pred_type="glm").tolist(),
                samples=la.sample(3, generator=torch.Generator().manual_seed(0)).tolist(),
                variance=la.posterior_variance.tolist(), columns=list(la._columns),
            )  # fmt: skip
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)


def test_two_gloo_processes_equal_one(tmp_path):
    """comm="torch" over 2 processes: each rank holds half the columns of R; evidence, marglik
    tuning, GLM probabilities, samples (same generator) and posterior variance equal the
    one-process run on every rank."""
    ranks = spawn(sharded_worker, 2, tmp_path)
    for r, out in enumerate(ranks):
        one, two = out["None"], out["torch"]
        assert two["columns"] != one["columns"] and one["columns"][0] == 0
        np.testing.assert_allclose(two["lml"], one["lml"], rtol=1e-10)
        np.testing.assert_allclose(two["prior"], one["prior"], rtol=1e-8)
        for key in ("probs", "samples", "variance"):
            np.testing.assert_allclose(two[key], one[key], rtol=1e-8, atol=1e-12, err_msg=f"rank {r} {key}")
