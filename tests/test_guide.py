"""docs/guide.md's code runs as written: each ```python block is executed with the names it
assumes (a small torch model with a layer named "fc", its batches, gradients, a damping)
defined first. The sharded (torch.distributed, FSDP2), CuPy-streamed and Dask-cluster blocks
need several processes, a GPU or a cluster and are covered by their own tests instead."""

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
ELSEWHERE = ("torch.distributed", "fully_shard", "cupy", "dask")  # tests/test_distributed.py, _streamed, _chunked


def names():
    """What the guide's snippets take as given."""
    torch = pytest.importorskip("torch")
    import rank1inv as r1
    from rank1inv import testing
    from rank1inv.adapters import torch as r1t  # imported once, in the guide's PyTorch section

    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(hidden=torch.nn.Linear(8, 12), act=torch.nn.Tanh(),
                                            fc=torch.nn.Linear(12, 4)))  # fmt: skip
    X, Y = torch.randn(4096, 8), torch.randint(0, 4, (4096,))
    batches = [(X[i : i + 4], Y[i : i + 4]) for i in range(0, 4096, 4)]
    loss_fn = lambda mdl, b: torch.nn.functional.cross_entropy(mdl(b[0]), b[1])
    d = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    G = testing.gradients("lowrank", 64, d, seed=1)
    w = rng.standard_normal(d)
    return {
        "np": np, "r1": r1, "r1t": r1t, "torch": torch, "op": r1.StaticInverse(G, 1e-3), "model": model,
        "batches": batches, "loss_fn": loss_fn,
        "G": G, "G_new": testing.gradients("iid", 3, d, seed=2), "g": G[0], "g2": G[1], "d": d, "dim": d,
        "capacity": 16, "damp": 1e-3, "x": rng.standard_normal(d), "w": w, "weights_only": np.ones(d, bool),
        "rows_of_layer1": np.arange(0, 108), "rows_of_layer2": np.arange(108, d),
        "fresh_gradients": lambda w, mask: G, "batches_of_gradients": (G[i : i + 8] for i in range(0, 64, 8)),
        "inputs": X[:32], "targets": Y[:32],
    }  # fmt: skip


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_guide_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if any(word in code for word in ELSEWHERE):
        pytest.skip("needs several processes, a GPU or a cluster (tested in its own module)")
    namespace = names()
    if "jax" in code:
        jax = pytest.importorskip("jax")
        namespace.update(jax=jax, params=jax.numpy.ones(5), grads=jax.numpy.full(5, 0.1))
    if "laplace_torch" in code:
        try:
            import laplace  # noqa: F401
        except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision that does not match torch
            pytest.skip(f"needs laplace-torch ({err})")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{GUIDE}:block {index}", "exec"), namespace)
    for value in list(namespace.values()):  # a block that defines a test runs it
        if callable(value) and getattr(value, "__name__", "").startswith("test_"):
            value()
