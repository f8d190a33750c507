"""The package's layers (docs/design.md §2): a module imports only from its own layer or below,
and the imports form no cycle. Function-local imports count like module-level ones; a new
module must be given a layer here (and in the design's diagram)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rank1inv"

LAYERS = [  # lowest first
    ["_precision", "_scaling", "_comm", "_protocols", "cpu", "cuda", "cuda.mirrors", "cuda.kernels"],
    ["_backend"],
    ["_checks", "_blocks", "_passes"],
    ["_chunks", "factored", "streamed"],
    ["groups", "groups.woodbury", "groups.dense", "groups.prior", "groups.window", "groups.coefficients"],
    ["_operator", "accumulated", "static", "_window_state", "dynamic"],
    ["sharded", "chunked"],
    ["obs", "laplace", "reference", "testing"],
    [
        "adapters",
        "adapters.jax",
        "adapters.jax_native",
        "adapters.natural",
        "adapters.kfac",
        "adapters.laplace_torch",
        "adapters.torch",
    ]
    + [f"adapters.torch.{m}" for m in ("convert", "dtensor", "vectors", "layout", "jacobians", "pruning", "optim")],
    ["", "examples", "examples.timing", "examples.progress", "examples.digits", "examples.demo", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules():
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.with_suffix("").relative_to(ROOT).parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name, path, known):
    """The package modules ``name`` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "rank1inv"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "rank1inv":
                base = node.module.split(".")[1:]
            else:
                continue
            targets = [base + [a.name] for a in node.names]
        else:
            continue
        for parts in targets:
            while ".".join(parts) not in known:  # `from . import x` names a module; else a member
                parts = parts[:-1]
            if ".".join(parts) != name:
                found.add(".".join(parts))
    return found


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    assert sorted(set(modules()) - set(LAYER)) == []


def upward(edges):
    return [f"{a} → {b}" for a, targets in edges.items() for b in targets if LAYER[b] > LAYER[a]]


def cycles(edges):
    state, found = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(" → ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_from_a_higher_layer():
    assert upward(graph()) == []


def test_the_imports_form_no_cycle():
    assert cycles(graph()) == []


def test_the_checks_catch_an_upward_and_a_cyclic_import(tmp_path, monkeypatch):
    """A foundation module importing an operator inside a function, and the operator importing
    it back, is both an upward import and a cycle."""
    fake = tmp_path / "rank1inv"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "_precision.py").write_text("def f():\n    from . import static\n")
    (fake / "static.py").write_text("from ._precision import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    edges = graph()
    assert upward(edges) == ["_precision → static"]
    assert cycles(edges) == ["_precision → static → _precision"]
