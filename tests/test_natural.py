"""Layer factors from torch models, the exact subsampled natural gradient and FOOF, against
torch.func per-sample gradients and dense float64 formulas (the exact-natural-gradient paper)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from helpers import conv_patches  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from rank1inv.adapters import natural  # noqa: E402


def mlp(dtype, bias=True):
    torch.manual_seed(0)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(6, 5, bias=bias), torch.nn.Tanh(), L(5, 4, bias=bias), torch.nn.Tanh(),
                               L(4, 3, bias=bias)).to(dtype)  # fmt: skip


class Tokens(torch.nn.Module):
    """A Linear applied to each of 5 tokens of 4 features, then a Linear on the concatenation."""

    def __init__(self):
        super().__init__()
        self.token, self.head = torch.nn.Linear(4, 3), torch.nn.Linear(15, 3)

    def forward(self, x):
        h = torch.tanh(self.token(x.reshape(x.shape[0], 5, 4)))
        return self.head(h.reshape(x.shape[0], -1))


def conv_models():
    """(name, model, input shape): strides, padding (numbers, 'valid', 'same'), dilation, no bias,
    Conv1d, tokens."""
    torch.manual_seed(0)
    C1, C2 = torch.nn.Conv1d, torch.nn.Conv2d
    cnn = torch.nn.Sequential(C2(2, 3, 3, stride=2, padding=1), torch.nn.Tanh(),
                              C2(3, 4, (2, 3), dilation=(2, 1), padding="valid", bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(24, 3))  # fmt: skip
    seq = torch.nn.Sequential(C1(2, 3, 3, stride=2, padding=2, dilation=2), torch.nn.Tanh(),
                              C1(3, 2, 3, padding="same"), torch.nn.Flatten(), torch.nn.Linear(12, 3))  # fmt: skip
    return [("cnn", cnn, (7, 2, 9, 8)), ("conv1d", seq, (6, 2, 11)), ("tokens", Tokens(), (6, 20))]


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


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("case", range(3))
def test_layer_factors_of_convolutions_and_tokens(dtype, tol, case):
    """Rows Σ_p e_ip a_ipᵀ (patches as positions, the paper's appendix on convolutions) equal
    torch.func per-sample gradients."""
    name, net, shape = conv_models()[case]
    net = net.to(dtype)
    x, y = torch.randn(*shape, dtype=dtype), torch.randint(0, 3, (shape[0],))
    G = per_sample(net, x, y)
    FG = natural.layer_factors(net, x, y, fisher="empirical")
    assert FG.shape == G.shape
    np.testing.assert_allclose(FG.to_dense(), G, rtol=0, atol=tol * np.abs(G).max())
    assert any(s.positions for s in FG.segments)  # the 3-D route, not an explicit copy


@pytest.mark.parametrize("structure", ["full", "layer"])
def test_natural_gradient_on_a_cnn(structure):
    """(λI + F̂)⁻¹g on a CNN, F̂ whole or block-diagonal per layer (the paper's Figure 2B/C)."""
    _, net, shape = conv_models()[0]
    net = net.double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    G = per_sample(net, x, y)
    opt = natural.NaturalGradient(net, lr=1.0, damp=0.1, fisher="empirical", structure=structure)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy()
    before = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy().copy()
    opt.step(x, y)
    after = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    F = G.T @ G / G.shape[0]
    if structure == "layer":
        sizes = [m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in net if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]  # fmt: skip
        mask = np.zeros_like(F, dtype=bool)
        for a, b in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes)):
            mask[a:b, a:b] = True
        F = np.where(mask, F, 0.0)
    ref = np.linalg.solve(0.1 * np.eye(len(g)) + F, g)
    assert np.abs((before - after) - ref).max() <= 1e-10 * np.abs(ref).max()


def test_foof_on_a_convolution_against_the_dense_formula():
    """C = the mean of a aᵀ over every patch of the batch (bias as the input 1), ΔW = ∇W (λI + C)⁻¹."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    net = torch.nn.Sequential(conv, torch.nn.Flatten())
    opt = natural.FOOF(net, lr=1.0, damp=0.5, ema=0.0, momentum=0.0)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    torch.sum(net(x) ** 2).backward()
    a = conv_patches(x, conv).reshape(-1, 18)
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1).numpy()
    C = a.T @ a / a.shape[0]
    G = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], 1).numpy()
    W0 = torch.cat([conv.weight.detach().reshape(3, -1), conv.bias.detach()[:, None]], 1).numpy().copy()
    opt.step()
    W1 = torch.cat([conv.weight.detach().reshape(3, -1), conv.bias.detach()[:, None]], 1).numpy()
    np.testing.assert_allclose(W0 - W1, G @ np.linalg.inv(0.5 * np.eye(19) + C), rtol=1e-10, atol=1e-12)
    opt.remove_hooks()


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
    for conv, match in ((torch.nn.Conv2d(2, 2, 3, groups=2), "groups=2"),
                        (torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
                        (torch.nn.Conv2d(2, 2, 2, padding="same"), "asymmetrically")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            natural.layer_factors(torch.nn.Sequential(conv, torch.nn.Flatten()), torch.randn(4, 2, 5, 5))
    with pytest.raises(ValueError, match="batch dimension"):
        natural.layer_factors(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3)), torch.randn(2, 5, 5))

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
