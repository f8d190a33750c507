"""``python -m tools.api_docs``: write docs/api.md from the public modules' ``__all__`` and the
docstrings (``tests/test_api_docs.py`` checks it is current)."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"

# the public modules, in the order of the reference; optional dependencies are skipped when absent
MODULES = (
    "rank1inv",
    "rank1inv.obs",
    "rank1inv.laplace",
    "rank1inv.testing",
    "rank1inv.reference",
    "rank1inv.sharded",
    "rank1inv.chunked",
    "rank1inv.streamed",
    "rank1inv.factored",
    "rank1inv.adapters.torch",
    "rank1inv.adapters.natural",
    "rank1inv.adapters.jax",
    "rank1inv.adapters.laplace_torch",
)
# classes that users reach through methods rather than by name
RETURNED = (("rank1inv._operator", "FisherOperator"), ("rank1inv._operator", "PowerOperator"))


def _members(cls):
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name != "__matmul__":
            continue
        owner = member.fget if isinstance(member, property) and member.fget is not None else member
        if getattr(owner, "__module__", "rank1inv").split(".")[0] != "rank1inv":
            continue  # inherited from torch.optim, NamedTuple, laplace-torch ...
        if callable(member) or isinstance(member, property):
            yield name, member


def public_members():
    """(owner title, owner, name, member) for every documented public name, each object once (a
    class re-exported by a later module is not repeated): per module its functions and constants
    first, then each class with its public methods and properties (inherited ones included)."""
    out, seen = [], set()
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # an optional dependency (torch, jax) is not installed
            continue
        objects = [(n, getattr(mod, n)) for n in mod.__all__]
        objects = [(n, o) for n, o in objects if not inspect.ismodule(o) and id(o) not in seen]
        seen.update(id(o) for _, o in objects)
        functions = [(n, o) for n, o in objects if not inspect.isclass(o)]
        if functions:
            out.append((modname, mod, None, mod))
            out += [(modname, mod, n, o) for n, o in functions]
        for name, obj in objects:
            if inspect.isclass(obj):
                out.append((f"{modname}.{name}", obj, None, obj))
                out += [(f"{modname}.{name}", obj, n, m) for n, m in _members(obj)]
    for modname, name in RETURNED:
        obj = getattr(importlib.import_module(modname), name)
        title = f"{name} (returned by fisher() and power())"
        out.append((title, obj, None, obj))
        out += [(title, obj, n, m) for n, m in _members(obj)]
    return out


def render() -> str:
    lines = ["# API reference", "", "Generated from `__all__` and the docstrings by `python -m tools.api_docs`.", ""]
    current = None
    for title, owner, name, member in public_members():
        if title != current:
            current = title
            lines += [f"## {title}", "", inspect.getdoc(owner) or "", ""]
        if name is None:
            continue
        target = member.fget if isinstance(member, property) else member
        try:
            sig = "" if isinstance(member, property) or not callable(target) else str(inspect.signature(target))
        except (TypeError, ValueError):
            sig = "(...)"
        doc = inspect.getdoc(target) if callable(target) or isinstance(member, property) else repr(target)
        lines += [f"### `{name}{sig}`", "", doc or "", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.api_docs",
        description="Rewrite docs/api.md from the docstrings of rank1inv's public names (__all__ of the package "
        "and its adapters); tests/test_api_docs.py fails when it is stale. Takes a few seconds.",
    )
    p.add_argument("--check", action="store_true", help="only say whether docs/api.md is current (exit 1 if not)")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = API.read_text() == text
        print("docs/api.md is current" if current else "docs/api.md is stale: run python -m tools.api_docs")
        return 0 if current else 1
    API.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
