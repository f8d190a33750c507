"""PyTorch and JAX adapters: shared memory, optimizer steps equal DynamicInverse, exact resume."""

import io

import numpy as np
import pytest

import rank1inv as r1

torch = pytest.importorskip("torch")


def test_torch_conversions_share_memory():
    from rank1inv.adapters import torch as ta

    t = torch.arange(6, dtype=torch.float32)
    a = ta.to_array(t)
    a[2] = 42.0
    assert t[2].item() == 42.0
    back = ta.to_tensor(a)
    back[3] = -1.0
    assert t[3].item() == -1.0 and a[3] == -1.0
    p = torch.nn.Parameter(torch.ones(3))
    assert ta.to_array(p).base is not None or ta.to_array(p).flags.writeable


def test_torch_flatten_unflatten_and_buffer():
    from rank1inv.adapters import torch as ta

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    flat = ta.flatten(model.parameters())
    assert flat.shape == (3 * 4 + 4 + 4 * 2 + 2,)
    views = ta.unflatten(flat, model.parameters())
    for v, p in zip(views, model.parameters()):
        assert torch.equal(v, p.detach())
    views[0][0, 0] = 7.0
    assert flat[0].item() == 7.0  # views share the vector
    out = torch.empty_like(flat)
    assert ta.flatten(model.parameters(), out=out) is out
    buf = ta.GradientBuffer(list(model.parameters()))
    model(torch.ones(5, 3)).sum().backward()
    first = buf.gather()
    ptr = first.data_ptr()
    model(torch.ones(5, 3)).sum().backward()
    assert buf.gather().data_ptr() == ptr  # no reallocation
    with pytest.raises(ValueError):
        ta.unflatten(flat[:-1], model.parameters())


def test_torch_gradients_collects_rows():
    from rank1inv.adapters import torch as ta

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    xs = [torch.randn(8, 4) for _ in range(3)]

    def loss_fn(mdl, batch):
        return (mdl(batch) ** 2).mean()

    G = ta.gradients(model, loss_fn, xs, 3)
    assert G.shape == (3, 5)
    for i, x in enumerate(xs):
        model.zero_grad()
        loss_fn(model, x).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        np.testing.assert_allclose(G[i], ref.numpy(), rtol=1e-6)
    op = r1.StaticInverse(G, 1e-3)
    assert op.shape == (5, 5)
    with pytest.raises(ValueError, match="fewer"):
        ta.gradients(model, loss_fn, xs, 4)


def _mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = _batch(i)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_mfac_step_equals_dynamic_inverse():
    from rank1inv.adapters import torch as ta

    model = _mlp()
    params = list(model.parameters())
    opt = ta.MFAC(params, lr=0.1, ngrads=4, damp=1e-2)
    w = r1.DynamicInverse(sum(p.numel() for p in params), 4, 1e-2)
    for i in range(7):
        x, y = _batch(i)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = ta.flatten(params).clone()
        g = torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy()
        expected = before.numpy() - 0.1 * w.push_apply(g)
        opt.step()
        after = ta.flatten(params).numpy()
        np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize(
    "param_dtype,storage", [("bfloat16", None), ("float16", None), ("float32", "bfloat16"), ("float32", "float16")]
)
def test_mfac_16bit_storage(param_dtype, storage):
    """16-bit parameters get a 16-bit window; a 16-bit window of float32 gradients halves the
    memory. The step equals a DynamicInverse of the same storage fed the same gradients."""
    from rank1inv.adapters import torch as ta

    torch.manual_seed(0)
    model = _mlp().to(getattr(torch, param_dtype))
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    opt = ta.MFAC(params, lr=0.1, ngrads=4, damp=1e-2, dtype=storage)
    name = storage or param_dtype
    w = r1.DynamicInverse(d, 4, 1e-2, dtype=name)
    assert opt._windows[0][0]._G.nbytes == 2 * 4 * d
    for i in range(6):
        x, y = _batch(i)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(params[0].dtype)).float(), y).backward()
        before = ta.flatten(params).float().clone()
        g = ta.to_array(torch.cat([p.grad.reshape(-1) for p in params]))
        step = w.push_apply(np.array(g, copy=True))
        opt.step()
        after = ta.flatten(params).float()
        expected = before - 0.1 * torch.from_numpy(np.asarray(step, dtype=np.float32))
        tol = 2**-7 if param_dtype != "float32" else 1e-6  # the parameters' own rounding
        assert torch.allclose(
            after, expected.to(params[0].dtype).float(), rtol=tol, atol=tol * float(expected.abs().max())
        )


def test_torch_bfloat16_conversion_shares_memory():
    from rank1inv.adapters import torch as ta

    t = torch.randn(7, dtype=torch.bfloat16)
    a = ta.to_array(t)
    assert str(a.dtype) == "bfloat16" and np.shares_memory(a, t.view(torch.uint16).numpy())
    back = ta.to_tensor(a)
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    op = r1.StaticInverse(ta.to_array(torch.randn(3, 7, dtype=torch.bfloat16)), 1e-2)
    assert op.storage_dtype == "bfloat16" and op.dtype == np.float32


def test_mfac_options_run():
    from rank1inv.adapters import torch as ta

    for kw in ({"momentum": 0.9, "weight_decay": 1e-2}, {"blocks": "groups"}, {"blocks": 20}, {"scale": "count"}):
        model = _mlp()
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.01}]
        opt = ta.MFAC(groups, lr=0.05, ngrads=3, damp=1e-1, **kw)
        _train(model, opt, 5)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError):
        ta.MFAC(_mlp().parameters(), lr=0.1, blocks="layers")
    with pytest.raises(ValueError):
        ta.MFAC(_mlp().parameters(), lr=-1.0)


def test_mfac_resume_is_exact():
    from rank1inv.adapters import torch as ta

    a = _mlp()
    opt_a = ta.MFAC(a.parameters(), lr=0.05, ngrads=5, damp=1e-2, momentum=0.5)
    _train(a, opt_a, 10)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)  # plain tensors and Python scalars only
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model_state = {k: v.clone() for k, v in a.state_dict().items()}
    _train(a, opt_a, 50, start=10)

    b = _mlp()
    b.load_state_dict(model_state)
    opt_b = ta.MFAC(b.parameters(), lr=0.05, ngrads=5, damp=1e-2, momentum=0.5)
    opt_b.load_state_dict(state)
    _train(b, opt_b, 50, start=10)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


jax = pytest.importorskip("jax")


def test_jax_conversions_share_memory():
    from rank1inv.adapters import jax as ja

    raw = np.empty(8 + 16, dtype=np.float32)  # JAX shares only 64-byte aligned buffers
    off = (-raw.ctypes.data % 64) // 4
    x = raw[off : off + 8]
    x[:] = np.arange(8)
    j = ja.to_jax(x)
    assert j.unsafe_buffer_pointer() == x.ctypes.data
    back = ja.to_array(j)
    assert back.ctypes.data == x.ctypes.data
    tree = {"a": jax.numpy.ones((2, 3)), "b": [jax.numpy.zeros(4)]}
    flat, unravel = ja.ravel(tree)
    assert flat.shape == (10,)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: bool((u == v).all()), unravel(flat), tree))


@pytest.mark.parametrize("jit", [False, True])
def test_jax_mfac_equals_dynamic_inverse(jit):
    optax = pytest.importorskip("optax")
    from rank1inv.adapters import jax as ja

    params = {"w": jax.numpy.ones((3, 2)), "b": jax.numpy.zeros(2)}
    tx = ja.mfac(0.1, ngrads=3, damp=1e-2, momentum=0.5)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    ref = r1.DynamicInverse(8, 3, 1e-2)
    buf = np.zeros(8, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = {"w": jax.numpy.asarray(rng.standard_normal((3, 2)), jax.numpy.float32), "b": jax.numpy.ones(2)}
        updates, state = update(grads, state)
        flat_g, _ = ja.ravel(grads)
        buf = 0.5 * buf + ref.push_apply(np.asarray(flat_g))
        flat_u, _ = ja.ravel(updates)
        np.testing.assert_allclose(np.asarray(flat_u), -0.1 * buf, rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, updates)
    assert len(ja.window_of(tx)) == 3


def test_jax_mfac_16bit_storage():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from rank1inv.adapters import jax as ja

    rng = np.random.default_rng(0)
    for params, storage, expected in (
        ({"w": jnp.ones((5, 3), jnp.bfloat16)}, None, "bfloat16"),
        ({"w": jnp.ones((5, 3), jnp.float32)}, "float16", "float16"),
    ):
        tx = ja.mfac(0.1, ngrads=4, damp=1e-2, dtype=storage)
        state = tx.init(params)
        w_ref = r1.DynamicInverse(15, 4, 1e-2, dtype=expected)
        for _ in range(3):
            g = {"w": jnp.asarray(rng.standard_normal((5, 3)), params["w"].dtype)}
            updates, state = jax.jit(tx.update)(g, state)
            ref = -0.1 * w_ref.push_apply(np.asarray(g["w"]).reshape(-1))
            np.testing.assert_allclose(
                np.asarray(updates["w"], dtype=np.float64).reshape(-1), ref, rtol=1e-2, atol=1e-2
            )
        assert ja.window_of(tx).storage_dtype == expected and ja.window_of(tx)._G.nbytes == 2 * 4 * 15


def test_mfac_follows_torch_optim_semantics():
    """Frozen parameters are left alone, a step without gradients pushes nothing, per-group
    window options are honoured with blocks='groups' and refused across one window."""
    from rank1inv.adapters import torch as ta

    torch.manual_seed(0)
    model = _mlp()
    frozen = model[0].bias
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = ta.MFAC(model.parameters(), lr=0.05, ngrads=3, damp=1e-2, weight_decay=0.1)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert opt._windows[0][0].shape == (d, d)  # the frozen bias is in no window
    _train(model, opt, 3)
    assert torch.equal(frozen, before)  # neither decayed nor stepped
    w = opt._windows[0][0]
    pushed = len(w)
    opt.zero_grad(set_to_none=True)
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients at all: nothing happens
    assert len(w) == pushed and w.state_dict()["counter"] == 3
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    x, y = _batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad = None  # one window, some gradients missing: refused, nothing changed
    with pytest.raises(ValueError, match="no gradient"):
        opt.step()
    assert len(w) == pushed and w.state_dict()["counter"] == 3

    groups = [{"params": list(model[0].parameters()), "damp": 1e-1, "ngrads": 2},
              {"params": list(model[2].parameters()), "lr": 0.01}]  # fmt: skip
    opt = ta.MFAC(groups, lr=0.05, ngrads=4, damp=1e-3, blocks="groups")
    assert [(ws[0].damp, ws[0].capacity) for ws in opt._windows] == [(1e-1, 2), (1e-3, 4)]
    with pytest.raises(ValueError, match="different (ngrads|damp)"):
        ta.MFAC(groups, lr=0.05)
    with pytest.raises(ValueError, match="unknown option"):
        ta.MFAC([{"params": list(model[0].parameters()), "nesterov": True}], lr=0.05)


def test_mfac_add_param_group():
    from rank1inv.adapters import torch as ta

    torch.manual_seed(1)
    model = _mlp()
    opt = ta.MFAC(list(model[0].parameters()), lr=0.05, ngrads=3, damp=1e-2, blocks="groups")
    _train(model, opt, 2)
    first = opt._windows[0]
    opt.add_param_group({"params": list(model[2].parameters()), "damp": 0.5})
    assert opt._windows[0] is first and len(first[0]) == 2  # the old group keeps its window
    assert opt._windows[1][0].damp == 0.5 and len(opt._windows[1][0]) == 0
    _train(model, opt, 2, start=2)
    assert len(opt._windows[1][0]) == 2
    single = ta.MFAC(list(model[0].parameters()), lr=0.05, ngrads=3, damp=1e-2)
    single.add_param_group({"params": list(model[2].parameters())})
    assert single._windows[0][0].shape[0] == sum(p.numel() for p in model.parameters())


def test_jax_each_init_has_its_own_window_and_errors_are_clear():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from rank1inv.adapters import jax as ja

    tx = ja.mfac(0.1, ngrads=3, damp=1e-2)
    g = {"w": jnp.arange(6.0)}
    with pytest.raises(ValueError, match="before init"):
        tx.update(g, ja.MFACState(jnp.zeros((), jnp.int32), jnp.zeros(6), jnp.int32(0)))
    a = tx.init({"w": jnp.zeros(6)})
    b = tx.init({"w": jnp.zeros(6)})
    _, a = jax.jit(tx.update)(g, a)
    _, a = tx.update(g, a)
    assert len(ja.window_of(tx, a)) == 2 and len(ja.window_of(tx, b)) == 0  # not shared
    with pytest.raises(TypeError, match="state returned by"):
        tx.update(g, {"count": 0})
    other = ja.mfac(0.1, ngrads=3, damp=1e-2)
    other.init({"w": jnp.zeros(6)})
    with pytest.raises(ValueError, match="another transformation"):
        other.update(g, ja.MFACState(a.count, a.momentum, jnp.int32(7)))
    with pytest.raises(ValueError, match="5 values, the state was made for 6"):
        tx.update({"w": jnp.arange(5.0)}, b)
    with pytest.raises(TypeError, match="vmap"):
        jax.vmap(lambda gg: tx.update({"w": gg}, b)[0])(jnp.ones((2, 6)))
    # ids are unique across transformations: another one's state is refused, never pushed into
    fresh = ja.mfac(0.1, ngrads=3, damp=1e-2)
    c = fresh.init({"w": jnp.zeros(6)})
    with pytest.raises(ValueError, match="another transformation"):
        tx.update(g, c)
    with pytest.raises(ValueError, match="non-finite"):
        tx.update({"w": jnp.array([1.0, jnp.nan, 0, 0, 0, 0])}, b)
    assert len(ja.window_of(tx, b)) == 0 and len(ja.window_of(fresh, c)) == 0


def test_jax_16bit_direction_that_overflows_is_refused_and_not_pushed():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from rank1inv.adapters import jax as ja

    tx = ja.mfac(0.1, ngrads=3, damp=1e-12, dtype="float32")  # float16 parameters, a float32 window
    s = tx.init({"w": jnp.zeros(6, jnp.float16)})
    g = {"w": jnp.full(6, 1e-6, jnp.float16)}  # F⁻¹g ≈ 3.3e5 > 65 504
    with pytest.raises(Exception, match="does not fit"):  # OverflowError (eager), JAX's error under jit
        tx.update(g, s)
    assert len(ja.window_of(tx, s)) == 0  # the push was undone


def test_model_level_pruning_helpers():
    """Blocks from a model agree with gradients() (frozen parameters excluded from both), flat
    vectors and masks go back into the model, per-layer targets and N:M masks hold."""
    from rank1inv.adapters import torch as ta

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model[0].bias.requires_grad_(False)
    X, Y = torch.randn(200, 8), torch.randint(0, 4, (200,))
    batches = [(X[i : i + 10], Y[i : i + 10]) for i in range(0, 200, 10)]
    loss = lambda mdl, b: torch.nn.functional.cross_entropy(mdl(b[0]), b[1])
    G = ta.gradients(model, loss, batches, 20)
    blocks = ta.blocks_from_model(model)
    assert blocks == [128, 68] and sum(ta.blocks_from_model(model, 50)) == G.shape[1]
    op = r1.StaticInverse(G, 1e-2, block_size=blocks)  # used to fail: frozen parameters counted
    assert op.block_sizes == (128, 68)
    v = ta.model_vector(model)
    ta.write_vector(model, v * 2)
    assert np.allclose(ta.model_vector(model), 2 * v)
    ta.write_vector(model, v)
    frozen = model[0].bias.detach().clone()
    masks = ta.prune_model(model, loss, batches, 0.5, ngrads=20, layer_sparsity={model[0]: 0.25})  # a module
    assert set(masks) == {"0.weight", "2.weight", "2.bias"}
    assert masks["0.weight"].float().mean() == 0.75 and masks["2.weight"].float().mean() == 0.5
    assert torch.all(model[0].weight[~masks["0.weight"]] == 0) and torch.equal(model[0].bias, frozen)
    ta.write_vector(model, v)
    masks = ta.prune_model(model, loss, batches, None, ngrads=20, nm=(2, 4))
    ta.write_vector(model, v)
    with pytest.warns(UserWarning, match=r"dense .*: 0\.weight \(8 inputs\)"):  # 8 is not a multiple of 16
        ta.prune_model(model, loss, batches, None, ngrads=20, nm=(8, 16))
    ta.write_vector(model, v)
    masks = ta.prune_model(model, loss, batches, None, ngrads=20, nm=(2, 4))
    for name in ("0.weight", "2.weight"):
        groups = masks[name].reshape(masks[name].shape[0], -1, 4)
        assert torch.all(groups.sum(-1) == 2)  # 2:4 along the input dimension
    ta.write_vector(model, v)
    masks = ta.prune_model(model, loss, batches, 0.6, ngrads=20, steps=3, damp=1e-2)
    assert abs(float(masks["0.weight"].float().mean() + 0) - 0.4) < 0.1
    before = ta.model_vector(model)
    for bad in ("relative:-1", "relative:inf", "relative:", "rel:1", float("inf"), 0.0):
        with pytest.raises(ValueError, match="damp"):  # one parser for every damp= of the adapter
            ta.prune_model(model, loss, batches, 0.5, ngrads=20, damp=bad)
        assert np.array_equal(ta.model_vector(model), before)  # refused before the model is touched


def test_pruning_from_a_stream_of_gradients_matches_stored_gradients():
    """gradient_stream yields exactly the rows of gradients(); prune_model(stream=True) never
    forms G and prunes as the stored-G pipeline does (same masks, same weights)."""
    import copy

    from rank1inv.adapters import torch as ta

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4)).double()
    X, Y = torch.randn(240, 8, dtype=torch.float64), torch.randint(0, 4, (240,))
    batches = [(X[i : i + 4], Y[i : i + 4]) for i in range(0, 240, 4)]
    loss = lambda mdl, b: torch.nn.functional.cross_entropy(mdl(b[0]), b[1])
    G = ta.gradients(model, loss, batches, 50)
    pieces = list(ta.gradient_stream(model, loss, batches, 50, batch=16))
    assert [p.shape[0] for p in pieces] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate(pieces), G)
    with pytest.raises(ValueError, match="fewer than m"):
        list(ta.gradient_stream(model, loss, batches[:3], 5))
    twin = copy.deepcopy(model)
    a = ta.prune_model(model, loss, batches, 0.5, ngrads=50, per=10, steps=2)
    b = ta.prune_model(twin, loss, batches, 0.5, ngrads=50, per=10, steps=2, stream=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_allclose(ta.model_vector(model), ta.model_vector(twin), rtol=1e-9, atol=1e-12)


def test_mfac_relative_damping():
    from rank1inv.adapters import torch as ta

    model = _mlp()
    opt = ta.MFAC(model.parameters(), lr=0.05, ngrads=3, damp="relative:100")
    assert opt._windows == [None] and opt.damps == (None,)
    x, y = _batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    opt.step()
    assert opt._windows[0][0].damp == pytest.approx(100 * float(torch.mean(g**2)), rel=1e-12)
    assert opt.damps == (opt._windows[0][0].damp,)  # the chosen λ, public and read-only
    with pytest.raises(AttributeError):
        opt.damps = (1.0,)
    with pytest.raises(ValueError, match="relative"):
        ta.MFAC(model.parameters(), lr=0.05, damp="relative:-1")


def test_mfac_takes_a_tensor_lr_like_torch_optim():
    from rank1inv.adapters import torch as ta

    torch.manual_seed(0)
    a, b = _mlp(), _mlp()
    b.load_state_dict(a.state_dict())
    lr = torch.tensor(0.05)
    opt_a = ta.MFAC(a.parameters(), lr=0.05, ngrads=3, damp=1e-2)
    opt_b = ta.MFAC(b.parameters(), lr=lr, ngrads=3, damp=1e-2)
    for step in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            x, y = _batch(step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for bad in (torch.tensor([0.1, 0.2]), torch.tensor(-1.0), torch.tensor(1, dtype=torch.int64)):
        with pytest.raises(ValueError, match="lr"):
            ta.MFAC(b.parameters(), lr=bad)
