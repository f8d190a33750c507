"""Layer factors from torch models, the exact subsampled natural gradient and FOOF, against
torch.func per-sample gradients and dense float64 formulas (the exact-natural-gradient paper)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.func import functional_call, grad, vmap  # noqa: E402

from rank1inv.adapters import natural  # noqa: E402


def mlp(dtype, bias=True):
    torch.manual_seed(0)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(6, 5, bias=bias), torch.nn.Tanh(), L(5, 4, bias=bias), torch.nn.Tanh(),
                               L(4, 3, bias=bias)).to(dtype)  # fmt: skip


def per_sample(net, x, y, loss="cross_entropy"):
    params = {n: p.detach() for n, p in net.named_parameters()}

    def f(p, xi, yi):
        out = functional_call(net, p, (xi[None],))
        if loss == "cross_entropy":
            return torch.nn.functional.cross_entropy(out, yi[None])
        return 0.5 * torch.sum((out - yi[None]) ** 2)

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], 1).double().numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_are_the_per_sample_gradients(dtype, bias):
    net = mlp(dtype, bias)
    x, y = torch.randn(9, 6, dtype=dtype), torch.randint(0, 3, (9,))
    G = per_sample(net, x, y)
    FG = natural.linear_factors(net, x, y, fisher="empirical")
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(FG.to_dense(), G, rtol=0, atol=tol * np.abs(G).max())
    # the true Fisher: labels drawn from the model with the generator's stream
    labels = torch.multinomial(torch.softmax(net(x).detach(), 1), 1, generator=torch.Generator().manual_seed(4))[:, 0]
    FT = natural.linear_factors(net, x, fisher="true", generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(FT.to_dense(), per_sample(net, x, labels), rtol=0, atol=tol * np.abs(G).max())
    for p in net.parameters():
        assert p.grad is None  # .grad untouched


def test_linear_factors_mse():
    net = mlp(torch.float64)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    FG = natural.linear_factors(net, x, y, fisher="empirical", loss="mse")
    np.testing.assert_allclose(FG.to_dense(), per_sample(net, x, y, "mse"), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("fisher_batch", ["same", "independent"])
def test_natural_gradient_direction(dtype, tol, fisher_batch):
    """(λI + F̂)⁻¹g from per-sample gradients against the optimizer's step (appendix I.5: F̂ on
    an independent batch too)."""
    net = mlp(dtype)
    x, y = torch.randn(9, 6, dtype=dtype), torch.randint(0, 3, (9,))
    xf, yf = (x, y) if fisher_batch == "same" else (torch.randn(7, 6, dtype=dtype), torch.randint(0, 3, (7,)))
    G = per_sample(net, xf, yf)
    opt = natural.NaturalGradient(net, lr=1.0, damp=0.1, fisher="empirical")
    torch.nn.functional.cross_entropy(net(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double().numpy()
    before = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double().numpy()
    opt.step(xf, yf)
    after = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double().numpy()
    ref = np.linalg.solve(0.1 * np.eye(G.shape[1]) + G.T @ G / G.shape[0], g)
    assert np.abs((before - after) - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("window", [1024, 8])  # dense C; truncated-EMA rows through Woodbury
def test_foof_step_against_the_dense_formula(window):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(12, 3)).double()
    opt = natural.FOOF(net, lr=1.0, damp=0.5, ema=0.5, momentum=0.0, window=window)
    xs = [torch.randn(4, 12, dtype=torch.float64) for _ in range(3)]
    C = rows = None
    for step, x in enumerate(xs):
        opt.zero_grad()
        out = net(x)
        torch.sum(out**2).backward()
        a = torch.cat([x, torch.ones(4, 1, dtype=x.dtype)], 1).numpy()
        cov = a.T @ a / 4
        if window >= 13:
            C = cov if C is None else 0.5 * C + 0.5 * cov
        else:  # the last 8 rows of √w·a (weights ema^age·(1 − ema), the first batch weight 1)
            rows = a / 2.0 if step == 0 else np.vstack([rows * np.sqrt(0.5), a / 2.0 * np.sqrt(0.5)])[-8:]
            C = rows.T @ rows
        grad_w = torch.cat([net[0].weight.grad, net[0].bias.grad[:, None]], 1).numpy()
        W0 = torch.cat([net[0].weight, net[0].bias[:, None]], 1).detach().numpy().copy()
        opt.step()
        W1 = torch.cat([net[0].weight, net[0].bias[:, None]], 1).detach().numpy()
        ref = grad_w @ np.linalg.inv(0.5 * np.eye(13) + C)
        np.testing.assert_allclose(W0 - W1, ref, rtol=1e-10, atol=1e-12)
    opt.remove_hooks()


def test_errors_name_the_problem():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    with pytest.raises(ValueError, match="not the weight or bias of an nn.Linear"):
        natural.linear_factors(net, torch.randn(4, 3))
    seq = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="sequences or patches"):
        natural.linear_factors(seq, torch.randn(4, 5, 3))

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(ValueError, match="applied 2 times"):
        natural.linear_factors(Twice(), torch.randn(4, 3))
    with pytest.raises(ValueError, match="targets"):
        natural.linear_factors(seq, torch.randn(4, 3), fisher="empirical")
    opt = natural.NaturalGradient(seq, lr=0.1)
    with pytest.raises(ValueError, match="backward"):
        opt.step(torch.randn(4, 3))
    with pytest.raises(ValueError, match="lr"):
        natural.NaturalGradient(seq, lr=-1.0)
