"""The internal protocols are the contract (rank1inv/_protocols.py): every implementation has
every declared member, and its methods take the declared parameters (same names, same order;
an implementation may add optional parameters after them)."""

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

import rank1inv as r1
from rank1inv import _protocols, testing

G = testing.gradients("iid", 6, 40, seed=0, dtype="float64")


def members(protocol):
    """(name, declared function or None for an attribute) of a protocol, its bases' included."""
    out = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, _protocols.Protocol) or klass.__module__ != _protocols.__name__:
            continue
        for name in getattr(klass, "__annotations__", {}):
            out.setdefault(name, None)
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                out[name] = value.fget
            elif inspect.isfunction(value):
                out[name] = value
            else:
                out.setdefault(name, None)
    return out


def parameters(fn):
    return [p.name for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def conforms(obj, protocol):
    problems = []
    for name, declared in members(protocol).items():
        if not hasattr(type(obj), name) and not hasattr(obj, name):
            problems.append(f"{type(obj).__name__} lacks {name}")
            continue
        if declared is None:
            continue
        impl = getattr(type(obj), name, None)
        impl = impl.fget if isinstance(impl, property) else impl
        if impl is None or not callable(impl):
            continue
        want, got = parameters(declared), parameters(impl)
        if got[: len(want)] != want:
            problems.append(f"{type(obj).__name__}.{name}{tuple(got)} ≠ {tuple(want)}")
            continue
        extra = list(inspect.signature(impl).parameters.values())[len(want) + 1 :]
        if any(p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD for p in extra):
            problems.append(f"{type(obj).__name__}.{name} adds required parameters")
    return problems


def groups():
    woodbury = r1.StaticInverse(G, 1e-2)._groups()[0]
    dense = r1.StaticInverse(G, 1e-2, block_size=5)._groups()[0]
    prior = r1.StaticInverse(G, np.linspace(1e-2, 1.0, 40))._groups()[0]
    w = r1.DynamicInverse(40, 8, 1e-2, dtype="float64")
    w.push(G[0])
    window = w._groups()[0]
    return {"woodbury": woodbury, "dense": dense, "prior": prior, "window": window}


@pytest.mark.parametrize("kind", ["woodbury", "dense", "prior", "window"])
def test_groups_conform(kind):
    grp = groups()[kind]
    assert conforms(grp, _protocols.Group) == []
    if kind in ("woodbury", "window"):
        assert conforms(grp, _protocols.GradientSpaceGroup) == []


def test_factors_conform():
    grps = groups()
    factors = [grps["woodbury"].factor, grps["woodbury"].spectral, grps["window"].factor]
    assert [type(f).__name__ for f in factors] == ["CholeskyFactor", "SpectralFactor", "WindowFactor"]
    for f in factors:
        assert conforms(f, _protocols.Factor) == []


class _OneRank:
    rank, size, bytes_sent, collectives = 0, 1, 0, 0

    def allreduce_sum(self, a):
        return np.asarray(a, dtype=np.float64)

    allreduce_max = allreduce_max_finite = broadcast = allreduce_sum


def views():
    from rank1inv.sharded import ShardedView

    A, E = G[:, :4], G[:, :3]
    out = {
        "factored": r1.FactoredGradients([(A, E)]).view(0, 1, 12),
        "streamed": r1.StreamedGradients(G).view(0, 1, 40),
        "sharded": ShardedView(G[None, ...], _OneRank(), 40),
    }
    try:
        import dask.array as da

        from rank1inv.chunked import ChunkedView

        out["chunked"] = ChunkedView(da.from_array(G, chunks=(6, 10)))
    except ImportError:  # pragma: no cover - dask is in the test extra
        pass
    return out


@pytest.mark.parametrize("kind", ["factored", "streamed", "sharded", "chunked"])
def test_gradient_views_conform(kind):
    view = views().get(kind)
    if view is None:
        pytest.skip("dask not installed")
    assert isinstance(view, _protocols.GradientView)
    assert conforms(view, _protocols.GradientView) == []


def test_gradient_sources_conform():
    for source in (r1.FactoredGradients([(G[:, :4], G[:, :3])]), r1.StreamedGradients(G)):
        assert isinstance(source, _protocols.GradientSource)
        assert conforms(source, _protocols.GradientSource) == []


def test_kernels_conform():
    """Both backends' kernel modules define every member of ``Kernels`` (None where absent); the
    CUDA one is read from its source (importing it needs CuPy)."""
    from rank1inv import cpu

    names = set(members(_protocols.Kernels))
    missing = [n for n in names if not hasattr(cpu, n)]
    assert not missing, missing
    for name, declared in members(_protocols.Kernels).items():
        impl = getattr(cpu, name)
        if declared is not None and impl is not None:
            assert parameters(impl)[: len(parameters(declared))] == parameters(declared), name
    source = (Path(r1.__file__).parent / "cuda" / "kernels.py").read_text()
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert names <= defined, names - defined
