"""Side by side with laplace-torch: full-covariance Laplace with an empirical-Fisher backend.

``python -m benchmarks --laplace`` (needs the ``bench`` extra: laplace-torch and the CPU
torch). Three parts, one markdown table:

1. agreement on a digits MLP small enough for laplace-torch's d×d posterior (d = 1210): posterior
   covariance and variance, log marginal likelihood, both from the same per-sample gradients of the
   summed cross-entropy;
2. time and extra memory of ours for 100 posterior samples and for the linearised predictive
   variance of 10 inputs (100 Jacobian rows) at d ≈ 10⁵ and 10⁶, with m = 256 gradients;
3. what laplace-torch's full Laplace does at those d, in a child process with its address space
   capped (``PEER_MEMORY_LIMIT``), so that a d×d allocation fails instead of swapping.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np

from rank1inv.examples import progress

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the child scripts import benchmarks

PEER_MEMORY_LIMIT = 16 << 30  # bytes of address space for the laplace-torch child process
PEER_TIMEOUT = 600  # seconds


def mlp(hidden: int, dtype):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    return net.to(dtype)


def digits(dtype):
    import torch

    from rank1inv.examples.digits import load_digits

    X, y, Xt, yt = load_digits(0)
    return torch.tensor(X, dtype=dtype), torch.tensor(y), torch.tensor(Xt, dtype=dtype), torch.tensor(yt)


def _train(net, X, y, steps: int = 300):
    import torch

    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
        opt.step()
    return net


def per_sample_gradients(net, X, y, chunk_size=None):
    """(n, d) NumPy array: gradients of each sample's cross-entropy for labels y (the rows of a
    Fisher of the summed loss), in the order of ``net.named_parameters()``; torch.func, vmapped
    ``chunk_size`` samples at a time (None: all)."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, x, t):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (x[None],)), t[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, X, y)
    return torch.cat([g.pop(n).reshape(len(y), -1) for n in params], 1).numpy()


def import_peer():
    """laplace-torch's ``Laplace`` and ``CurvlinopsEF``, or SystemExit saying how to install it.
    laplace-torch requires torchvision, which torchmetrics imports whenever it is installed; next
    to the CPU torch wheel pip's torchvision is a CUDA build that does not load (``operator
    torchvision::nms does not exist``), and laplace-torch runs without it."""
    try:
        from laplace import Laplace
        from laplace.curvature import CurvlinopsEF
    except ImportError as e:
        raise SystemExit(f"the side-by-side needs laplace-torch: pip install -e '.[bench]' ({e})") from e
    except RuntimeError as e:
        if "torchvision" not in str(e):
            raise
        raise SystemExit(
            "laplace-torch failed to import because the installed torchvision does not match this torch "
            f"({e}); laplace-torch runs without torchvision: pip uninstall -y torchvision"
        ) from e
    return Laplace, CurvlinopsEF


def agreement(rows, lam: float = 0.5):
    import torch

    Laplace, CurvlinopsEF = import_peer()

    from rank1inv import laplace as ours
    from rank1inv.adapters import torch as ta
    from rank1inv.static import StaticInverse

    X, y, Xt, _ = digits(torch.float64)
    net = _train(mlp(16, torch.float64), X, y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=128)
    t0 = time.perf_counter()
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="full",
                 backend=CurvlinopsEF, prior_precision=lam)  # fmt: skip
    la.fit(loader)
    cov_peer = la.posterior_covariance.detach().numpy()
    lml_peer = float(la.log_marginal_likelihood())
    t_peer = time.perf_counter() - t0
    t0 = time.perf_counter()
    G = per_sample_gradients(net, X, y)
    op = StaticInverse(G, lam, scale=1.0)
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(net(X), y, reduction="sum"))
    lml = ours.log_marginal_likelihood(op, loss, ta.model_vector(net))
    t_ours = time.perf_counter() - t0
    cov = op.to_dense()
    d = cov.shape[0]
    cov_diff = np.linalg.norm(cov - cov_peer) / np.linalg.norm(cov_peer)
    rows.append(
        ("posterior covariance, relative Frobenius difference", cov_diff, "", f"d = {d}, m = {len(y)}, λ = {lam}")
    )
    var_diff = np.max(np.abs(np.diag(cov) - np.diag(cov_peer)) / np.diag(cov_peer))
    rows.append(("posterior variance, max relative difference", var_diff, "", ""))
    lml_diff = abs(lml - lml_peer) / abs(lml_peer)
    rows.append(
        ("log marginal likelihood, relative difference", lml_diff, "", f"ours {lml:.6f}, laplace-torch {lml_peer:.6f}")
    )
    f_mu, f_var = la._glm_predictive_distribution(Xt[:50])
    J = ta.output_jacobians(net, Xt[:50])
    var = ours.predictive_variance(op, J.reshape(-1, d)).reshape(50, 10)
    peer_var = np.diagonal(f_var.detach().numpy(), axis1=1, axis2=2)
    pred_diff = np.max(np.abs(var - peer_var) / peer_var)
    rows.append(("GLM predictive variance, max relative difference", pred_diff, "", "50 test inputs × 10 classes"))
    rows.append(("fit + covariance + evidence, laplace-torch", t_peer, "s", "d×d posterior"))
    rows.append(("per-sample gradients + operator + evidence, ours", t_ours, "s", "torch.func per-sample gradients"))


def _ours_at_scale(rows, hidden: int, m: int = 256, draws: int = 100, inputs: int = 10):
    import torch

    from rank1inv import laplace as ours
    from rank1inv.adapters import torch as ta
    from rank1inv.static import StaticInverse

    X, y, Xt, _ = digits(torch.float32)
    net = _train(mlp(hidden, torch.float32), X, y, steps=50)
    d = sum(p.numel() for p in net.parameters())
    G = per_sample_gradients(net, X[:m], y[:m])  # float32 (m, d)
    J = ta.output_jacobians(net, Xt[:inputs]).reshape(-1, d)
    tracemalloc.start()
    t0 = time.perf_counter()
    op = StaticInverse(G, 1.0, scale=len(y) / m)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    S = op.sample(draws, rng=0)
    t_sample = time.perf_counter() - t0
    del S
    t0 = time.perf_counter()
    ours.predictive_variance(op, J)
    t_pred = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    note = f"d = {d}, m = {m}, float32 G ({G.nbytes / 2**20:.0f} MiB, not counted)"
    rows.append((f"ours, operator, d = {d}", t_build, "s", note))
    rows.append((f"ours, {draws} samples, d = {d}", t_sample, "s", "exact draws from N(0, F⁻¹)"))
    rows.append((f"ours, predictive variance of {inputs * 10} Jacobian rows, d = {d}", t_pred, "s", ""))
    out_mib = draws * d * 4 / 2**20
    rows.append(
        (f"ours, peak extra memory, d = {d}", peak / 2**20, "MiB", f"includes the samples out: {out_mib:.0f} MiB")
    )
    return d


PEER_SCRIPT = """
import resource, sys, time, torch
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from laplace import Laplace
from laplace.curvature import CurvlinopsEF
from benchmarks.bench_laplace import digits, mlp
X, y, _, _ = digits(torch.float32)
net = mlp({hidden}, torch.float32)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:{m}], y[:{m}]), batch_size=64)
t0 = time.perf_counter()
try:
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="full",
                 backend=CurvlinopsEF, prior_precision=1.0)
    la.fit(loader)
    la.sample(100)
    print("OK", time.perf_counter() - t0)
except BaseException as err:
    print("FAILED", time.perf_counter() - t0, type(err).__name__, str(err).splitlines()[0][:160])
"""


def _peer_at_scale(rows, hidden: int, d: int, m: int = 256):
    code = textwrap.dedent(PEER_SCRIPT).format(limit=PEER_MEMORY_LIMIT, hidden=hidden, m=m)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PEER_TIMEOUT,
                             cwd=ROOT)  # fmt: skip
        line = (out.stdout.strip().splitlines() or [f"no output (exit {out.returncode}): {out.stderr[-160:]}"])[-1]
    except subprocess.TimeoutExpired:
        line = f"TIMEOUT after {PEER_TIMEOUT} s"
    parts = line.split(" ", 2)
    seconds = float(parts[1]) if len(parts) > 1 and parts[0] in ("OK", "FAILED") else math.nan
    rows.append((f"laplace-torch full Laplace (fit + 100 samples), d = {d}", seconds, "s",
                 f"{line[:200]} (address space capped at {PEER_MEMORY_LIMIT >> 30} GiB; its d×d float32 "
                 f"precision alone is {4 * d * d / 2**30:.0f} GiB)"))  # fmt: skip


def run() -> str:
    import_peer()  # before any work: a missing or broken peer is said at once
    rows: list = []
    progress.step("agreement with laplace-torch on the digits MLP")
    agreement(rows)
    for hidden in (1333, 13333):  # d ≈ 10⁵, 10⁶
        progress.step(f"at scale: hidden width {hidden}, ours then laplace-torch's")
        d = _ours_at_scale(rows, hidden)
        _peer_at_scale(rows, hidden, d)
    lines = ["| measurement | value | unit | note |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3g} | {unit} | {note} |" for name, value, unit, note in rows]
    return "\n".join(lines)
