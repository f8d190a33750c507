"""KFAC (rank1inv/adapters/kfac.py) against a dense float64 reference of the same Kronecker
matrix, its factors from inputs and output gradients computed here independently (forward hooks
and explicit patch loops, no F.unfold), both dampings, moving averages, amortised inversion,
resume and refusal."""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import conv_patches as patches  # noqa: E402

from rank1inv.adapters import kfac  # noqa: E402


def mlp():
    torch.manual_seed(0)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(6, 5), torch.nn.Tanh(), L(5, 4, bias=False), torch.nn.Tanh(), L(4, 3)).double()


def cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(3, 2, 2, dilation=2, bias=False), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).double()  # fmt: skip


def reference_factors(net, x, y):
    """(A, S, module) per layer: inputs and output gradients of the summed per-sample losses,
    by hooks and autograd here (the empirical Fisher)."""
    layers = [m for m in net if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o: seen.__setitem__(m, (a[0], o))) for m in layers]
    out = net(x)
    for h in handles:
        h.remove()
    errs = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), [seen[m][1] for m in layers])
    B = x.shape[0]
    result = []
    for m, e in zip(layers, errs):
        a = seen[m][0].detach()
        if isinstance(m, torch.nn.Conv2d):
            a = patches(a, m)
            e = e.reshape(B, e.shape[1], -1).transpose(1, 2)
        else:
            a, e = a[:, None, :], e[:, None, :]
        if m.bias is not None:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2)
        P = a.shape[1]
        A = torch.einsum("bpi,bpj->ij", a, a) / B
        S = torch.einsum("bpi,bpj->ij", e, e) / (B * P)
        result.append((A.numpy(), S.numpy(), m))
    return result


def layer_gradient(m):
    g = m.weight.grad.reshape(m.weight.shape[0], -1)
    return torch.cat([g, m.bias.grad[:, None]], 1).numpy() if m.bias is not None else g.numpy()


def layer_weights(m):
    w = m.weight.detach().reshape(m.weight.shape[0], -1)
    return torch.cat([w, m.bias.detach()[:, None]], 1).numpy().copy() if m.bias is not None else w.numpy().copy()


def dense_direction(A, S, G, damp, damping):
    """vec Δ = M⁻¹ vec G with the dense Kronecker matrix M (row-major: S ⊗ A)."""
    n_out, n = G.shape
    if damping == "standard":
        M = np.kron(S, A) + damp * np.eye(n_out * n)
    else:
        pi = math.sqrt((np.trace(A) / n) / (np.trace(S) / n_out))
        M = np.kron(S + math.sqrt(damp) / pi * np.eye(n_out), A + pi * math.sqrt(damp) * np.eye(n))
    return np.linalg.solve(M, G.reshape(-1)).reshape(n_out, n)


def batch(net, seed, B=7):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 6) if isinstance(net[0], torch.nn.Linear) else (B, 2, 7, 7)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("damping", ["standard", "heuristic"])
def test_step_equals_the_dense_kronecker_inverse(make, damping):
    net = make()
    x, y = batch(net, 1)
    opt = kfac.KFAC(net, lr=1.0, damp=0.05, damping=damping, fisher="empirical", ema=0.0)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    refs = reference_factors(net, x, y)
    before = [(layer_gradient(m), layer_weights(m)) for _, _, m in refs]
    opt.step(x, y)
    for (A, S, m), (G, W0) in zip(refs, before):
        ref = dense_direction(A, S, G, 0.05, damping)
        assert np.abs((W0 - layer_weights(m)) - ref).max() <= 1e-10 * np.abs(ref).max()


@pytest.mark.parametrize("damping", ["standard", "heuristic"])
def test_moving_averages_and_amortised_inversion(damping):
    """ema = 0.5, decompositions refreshed every 2 steps: step 1 preconditions with step 0's."""
    net = cnn()
    opt = kfac.KFAC(net, lr=0.5, damp=0.1, damping=damping, fisher="empirical", ema=0.5, inverse_every=2)
    running, decomposed = None, None
    for t in range(3):
        x, y = batch(net, 10 + t)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        refs = reference_factors(net, x, y)
        running = [(A, S) if running is None else (0.5 * running[k][0] + 0.5 * A, 0.5 * running[k][1] + 0.5 * S)
                   for k, (A, S, _) in enumerate(refs)]  # fmt: skip
        if t % 2 == 0:
            decomposed = running
        before = [(layer_gradient(m), layer_weights(m)) for _, _, m in refs]
        opt.step(x, y)
        for (A, S), (_, _, m), (G, W0) in zip(decomposed, refs, before):
            ref = 0.5 * dense_direction(A, S, G, 0.1, damping)
            assert np.abs((W0 - layer_weights(m)) - ref).max() <= 1e-10 * np.abs(ref).max()


def test_true_fisher_draws_labels_with_the_generator():
    net = mlp()
    x, _ = batch(net, 2)
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(net(x), 1), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    for model, fisher in ((a, "true"), (b, "empirical")):
        opt = kfac.KFAC(model, lr=1.0, damp=0.1, fisher=fisher, ema=0.0, generator=torch.Generator().manual_seed(5))
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        opt.step(x, labels if fisher == "empirical" else None)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_resume_is_bit_exact():
    def run(net, opt, steps):
        for t in steps:
            x, y = batch(net, 30 + t)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step(x, y)

    make = lambda net: kfac.KFAC(net, lr=0.3, damp=0.1, fisher="empirical", momentum=0.9, ema=0.9, inverse_every=2)
    net = cnn()
    opt = make(net)
    run(net, opt, range(3))
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    run(net, opt, range(3, 6))
    other = cnn()
    other.load_state_dict(weights)
    opt2 = make(other)
    opt2.load_state_dict(state)
    run(other, opt2, range(3, 6))
    for p, q in zip(net.parameters(), other.parameters()):
        assert torch.equal(p, q)
    wrong = kfac.KFAC(cnn(), lr=0.3, damping="heuristic")
    with pytest.raises(ValueError, match="damping='heuristic'"):
        wrong.load_state_dict(state)


def test_a_refused_step_changes_nothing():
    net = mlp()
    opt = kfac.KFAC(net, lr=1.0, damp=0.1, fisher="empirical")
    x, y = batch(net, 3)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step(x, y)
    before = copy.deepcopy(opt.state_dict()["kfac"]), [p.detach().clone() for p in net.parameters()]
    net[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(x, y)
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    net[0].weight.grad[0, 0] = 0.0
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(x_bad, y)
    after = opt.state_dict()["kfac"]
    assert after["steps"] == before[0]["steps"]
    for st, st0 in zip(after["layers"], before[0]["layers"]):
        assert all(torch.equal(st[k], st0[k]) for k in st0)
    for p, p0 in zip(net.parameters(), before[1]):
        assert torch.equal(p, p0)
    for bad, match in (
        (dict(damping="tikhonov"), "damping"),
        (dict(ema=1.0), "ema"),
        (dict(inverse_every=0), "inverse"),
    ):
        with pytest.raises(ValueError, match=match):
            kfac.KFAC(net, lr=1.0, **bad)


@pytest.mark.parametrize("kind", ["KFAC", "NaturalGradient", "FOOF"])
def test_parameter_groups_scale_their_own_layers(kind):
    """torch.optim parameter groups: a group's lr scales only its parameters' steps (the same
    direction otherwise), a scheduler drives them, and groups that do not cover the model refuse."""
    from rank1inv.adapters import natural

    def make(net, params=None):
        if kind == "KFAC":
            return kfac.KFAC(net, lr=1.0, damp=0.1, fisher="empirical", params=params)
        if kind == "NaturalGradient":
            return natural.NaturalGradient(net, lr=1.0, damp=0.1, fisher="empirical", params=params)
        return natural.FOOF(net, lr=1.0, damp=0.1, momentum=0.0, params=params)

    def one_step(net, opt):
        x, y = batch(net, 4)
        before = [p.detach().clone() for p in net.parameters()]
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step() if kind == "FOOF" else opt.step(x, y)
        return [b - p.detach() for b, p in zip(before, net.parameters())]

    a, b = mlp(), mlp()
    first = list(b[0].parameters())
    rest = [p for p in b.parameters() if all(p is not q for q in first)]
    whole = one_step(a, make(a))
    opt = make(b, [{"params": first, "lr": 0.25}, {"params": rest}])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    split = one_step(b, opt)
    for k, (u, v) in enumerate(zip(whole, split)):
        torch.testing.assert_close(v, u * (0.25 if k < len(first) else 1.0), rtol=1e-12, atol=1e-15)
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.5]
    with pytest.raises(ValueError, match="exactly the model's trainable parameters"):
        make(mlp(), [{"params": list(mlp()[0].parameters())}])
    with pytest.raises(ValueError, match="unknown options"):
        make(mlp(), [{"params": list(mlp().parameters()), "betas": (0.9, 0.99)}])
    if kind == "NaturalGradient":
        c = mlp()
        first = list(c[0].parameters())
        rest = [p for p in c.parameters() if all(p is not q for q in first)]
        opt = make(c, [{"params": first, "damp": 1.0}, {"params": rest}])
        x, y = batch(c, 4)
        torch.nn.functional.cross_entropy(c(x), y).backward()
        with pytest.raises(ValueError, match="one damp"):
            opt.step(x, y)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_factors_equal_curvlinops_kfac(make):
    """An independent KFAC: curvlinops' KFACLinearOperator (bench extra; empirical Fisher, the
    "expand" convention, bias joined to the weight) is B·(S ⊗ A) for a summed loss, block by
    block, in the parameters' own order."""
    curvlinops = pytest.importorskip("curvlinops")
    from curvlinops.kfac import FisherType

    from rank1inv.adapters import natural

    net = make()
    x, y = batch(net, 6)
    params = list(net.parameters())
    K = curvlinops.KFACLinearOperator(net, torch.nn.CrossEntropyLoss(reduction="sum"), params, [(x, y)],
                                      fisher_type=FisherType.EMPIRICAL, separate_weight_and_bias=False,
                                      check_deterministic=False)  # fmt: skip
    d = sum(p.numel() for p in params)
    theirs = (K @ torch.eye(d, dtype=torch.float64)).numpy()
    layers, pairs = natural.layer_pairs(net, x, y, fisher="empirical")
    ours, offset = np.zeros((d, d)), 0
    for (m, has_bias), (A, S) in zip(layers, kfac.kronecker_factors(layers, pairs)):
        n_out, n_in = m.weight.shape[0], m.weight[0].numel()
        order = []  # row-major (n_out, n_in + bias) coordinates → the parameters' order
        for r in range(n_out):
            order += [offset + r * n_in + c for c in range(n_in)] + ([offset + n_out * n_in + r] if has_bias else [])
        ours[np.ix_(order, order)] = np.kron(S.numpy(), A.numpy())
        offset += m.weight.numel() + (n_out if has_bias else 0)
    np.testing.assert_allclose(theirs, x.shape[0] * ours, rtol=1e-6, atol=1e-12 * np.abs(theirs).max())


@pytest.mark.parametrize("kind", ["KFAC", "FOOF"])
def test_a_bias_without_gradient_is_not_stepped(kind):
    """torch.optim's rule: a parameter whose .grad is None is left alone (its layer still steps)."""
    from rank1inv.adapters import natural

    net = mlp()
    opt = (kfac.KFAC(net, lr=1.0, damp=0.1, fisher="empirical") if kind == "KFAC"
           else natural.FOOF(net, lr=1.0, damp=0.1))  # fmt: skip
    x, y = batch(net, 8)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    net[0].bias.grad = None
    bias, weight = net[0].bias.detach().clone(), net[0].weight.detach().clone()
    opt.step(x, y) if kind == "KFAC" else opt.step()
    assert torch.equal(net[0].bias, bias) and not torch.equal(net[0].weight, weight)
