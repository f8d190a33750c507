"""Optimizer steps that happen whole or not at all (MFAC, FOOF, NaturalGradient): a step that
raises changes no parameter, no window and no statistic; states from another model are refused;
16-bit parameters never receive inf."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rank1inv.adapters.natural import FOOF, NaturalGradient  # noqa: E402
from rank1inv.adapters.torch import MFAC  # noqa: E402


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def batch(seed, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def stats_copy(opt):
    return {k: {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items() if n != "op"}
            for k, st in opt._stats.items()}  # fmt: skip


def stats_equal(a, b):
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a
    )


# ----------------------------------------------------------------------------- FOOF
def foof_step(opt, model, seed):
    x, y = batch(seed)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()


def test_foof_refuses_a_nan_gradient_and_a_nan_input_without_poisoning():
    model = mlp()
    opt = FOOF(model, lr=0.1, damp=1e-2)
    foof_step(opt, model, 1)
    before, stats = snapshot(model), stats_copy(opt)
    x, y = batch(2)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert same(before, snapshot(model)) and stats_equal(stats, stats_copy(opt))
    x[3, 1] = float("nan")  # a batch with a NaN input
    opt.zero_grad()
    out = model(x)
    torch.nn.functional.cross_entropy(out[:3], y[:3]).backward()  # finite loss, NaN-polluted inputs
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert same(before, snapshot(model)) and stats_equal(stats, stats_copy(opt))
    for seed in (4, 5, 6):  # the averages were not poisoned: later steps work
        foof_step(opt, model, seed)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_foof_step_without_an_input_for_one_layer_advances_no_layer():
    model = mlp()
    opt = FOOF(model, lr=0.1, damp=1e-2)
    foof_step(opt, model, 1)
    before, stats, steps = snapshot(model), stats_copy(opt), opt._steps
    x, y = batch(2)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt._inputs[id(model[2])].clear()  # as if the last layer had not run
    with pytest.raises(ValueError, match="no input was captured for layer 1"):
        opt.step()
    assert same(before, snapshot(model)) and stats_equal(stats, stats_copy(opt)) and opt._steps == steps


def test_foof_step_calls_the_closure_and_uses_its_inputs():
    model, twin = mlp(), mlp()
    opt, ref = FOOF(model, lr=0.1, damp=1e-2), FOOF(twin, lr=0.1, damp=1e-2)
    x, y = batch(3)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        model(batch(9)[0])  # no gradients: not captured
    loss = opt.step(closure)
    assert calls == [True] and float(loss.detach()) > 0
    foof_step(ref, twin, 3)  # the same batch through the explicit form
    assert same(snapshot(model), snapshot(twin))


def test_foof_resumes_bit_for_bit():
    model = mlp()
    opt = FOOF(model, lr=0.1, damp=1e-2, inverse_every=3, window=6)  # one dense layer, one Woodbury
    for seed in range(4):
        foof_step(opt, model, seed)
    saved_model = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()
    twin = mlp(seed=1)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), saved_model):
            p.copy_(q)
    twin_opt = FOOF(twin, lr=0.1, damp=1e-2, inverse_every=3, window=6)
    twin_opt.load_state_dict(state)
    for seed in range(4, 9):
        foof_step(opt, model, seed)
        foof_step(twin_opt, twin, seed)
    assert same(snapshot(model), snapshot(twin))


def test_natural_gradient_refuses_nan_inputs_and_gradients():
    model = mlp()
    opt = NaturalGradient(model, lr=0.1, damp=1e-2)
    x, y = batch(1)
    loss_of(model, x, y).backward()
    before = snapshot(model)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(bad)
    model[0].bias.grad[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(x)
    assert same(before, snapshot(model))


# ----------------------------------------------------------------------------- MFAC
def test_mfac_16bit_parameters_never_receive_inf():
    """F⁻¹g beyond float16's 65 504: OverflowError, nothing written (no −inf weights)."""
    p = torch.nn.Parameter(torch.zeros(40, dtype=torch.float16))
    opt = MFAC([p], lr=1.0, ngrads=2, damp=1e-12)
    g1 = torch.linspace(-1, 1, 40, dtype=torch.float16)
    g1[0] = 0.0
    p.grad = g1.clone()
    opt.step()  # F⁻¹g of a lone gradient is small
    before, windows = p.detach().clone(), [w.state_dict() for w in opt._windows[0]]
    g2 = g1.clone()
    g2[0] = 1e-6  # off the first gradient by δ ≈ √(λ/s): F⁻¹g ≈ δ/(λ + sδ²) ≈ 7e5 there, beyond float16
    p.grad = g2
    with pytest.raises(OverflowError):
        opt.step()
    assert torch.equal(p, before) and bool(torch.isfinite(p).all())
    after = [w.state_dict() for w in opt._windows[0]]
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(windows, after) for k in x if isinstance(x[k], np.ndarray))
    opt.param_groups[0]["lr"] = 1e-6  # the same direction, a step that fits float16
    opt.step()
    assert bool(torch.isfinite(p).all()) and not torch.equal(p, before)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"ngrads": 0}, {"bogus": 1}, {"dtype": "int8"}, {"damp": "relative:-1"}])
def test_mfac_refused_parameter_group_is_not_kept(bad):
    model = torch.nn.Linear(4, 3, dtype=torch.float64)
    extra = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = MFAC([model.weight], lr=0.1, ngrads=2, damp=1e-2, blocks="groups")
    with pytest.raises((TypeError, ValueError)):
        opt.add_param_group({"params": [extra], **bad})
    assert len(opt.param_groups) == 1 and len(opt._windows) == 1
    opt.add_param_group({"params": [model.bias]})  # a valid group afterwards activates only itself
    assert len(opt.param_groups) == 2 and len(opt._windows) == 2
    extra.grad = torch.ones(5, dtype=torch.float64)
    model.weight.grad = torch.ones(3, 4, dtype=torch.float64)
    model.bias.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert bool((extra == 0).all())  # the refused group's parameter was never stepped


def test_mfac_refuses_a_state_from_a_differently_shaped_model():
    a = torch.nn.Linear(6, 2, dtype=torch.float64)  # 14 parameters
    f64 = torch.float64
    b = torch.nn.Sequential(torch.nn.Linear(2, 4, dtype=f64), torch.nn.Linear(1, 2, bias=False, dtype=f64))
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters()) == 14
    opt_a = MFAC(a.parameters(), lr=0.1, ngrads=2, damp=1e-2, momentum=0.5)
    for _ in range(2):
        opt_a.zero_grad()
        a(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
        opt_a.step()
    opt_b = MFAC(b.parameters(), lr=0.1, ngrads=2, damp=1e-2, momentum=0.5)
    before = [w.state_dict() for w in opt_b._windows[0]]
    with pytest.raises(ValueError, match="another model|parameter groups|parameters"):
        opt_b.load_state_dict(opt_a.state_dict())
    after = [w.state_dict() for w in opt_b._windows[0]]
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(before, after) for k in x if isinstance(x[k], np.ndarray))
    assert not opt_b.state  # nothing loaded


def test_mfac_refuses_sparse_gradients_clearly():
    emb = torch.nn.Embedding(10, 3, sparse=True, dtype=torch.float64)
    opt = MFAC(emb.parameters(), lr=0.1, ngrads=2, damp=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="dense"):
        opt.step()
