"""Every public function and method of the package face has a docstring, and docs/api.md is
generated from them (regenerate with ``python tests/test_api_docs.py``)."""

import inspect
from pathlib import Path

import numpy as np

import rank1inv as r1
from rank1inv import laplace, obs, testing

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def public_members():
    out = []
    fisher = type(r1.StaticInverse(np.ones((2, 3)), 1.0).fisher())
    power = type(r1.StaticInverse(np.ones((2, 3)), 1.0).power(0.5))
    for cls in (r1.StaticInverse, r1.DynamicInverse, fisher, power):
        for name, member in inspect.getmembers(cls):
            if name.startswith("_") and name not in ("__matmul__",):
                continue
            if callable(member) or isinstance(member, property):
                out.append((cls, name, member))
    for name in ("saliency", "prune", "group_saliency", "prune_groups", "prune_in_steps", "cubic_schedule"):
        out.append((obs, name, getattr(obs, name)))
    out.append((r1.dynamic, "push_apply_all", r1.push_apply_all))
    from rank1inv.chunked import DaskInverse

    for name in ("diag", "column", "fisher", "power", "with_damp", "aslinearoperator", "to_dense", "sample"):
        out.append((DaskInverse, name, getattr(DaskInverse, name)))
    for name in ("to_dense", "view"):
        out.append((r1.FactoredGradients, name, getattr(r1.FactoredGradients, name)))
    out.append((r1.StreamedGradients, "view", r1.StreamedGradients.view))
    for name in ("log_marginal_likelihood", "tune_damp", "predictive_variance", "probit_probabilities",
                 "expected_calibration_error"):  # fmt: skip
        out.append((laplace, name, getattr(laplace, name)))
    for name in ("gradients", "dense_fisher", "backward_error", "relative_error", "entry_error",
                 "assert_inverse_close", "gradient_sets", "block_layouts", "static_problems"):  # fmt: skip
        out.append((testing, name, getattr(testing, name)))
    return out


def render() -> str:
    lines = ["# API reference", "", "Generated from the docstrings by `python tests/test_api_docs.py`.", ""]
    current = None
    for owner, name, member in public_members():
        title = owner.__name__ if inspect.isclass(owner) else f"rank1inv.{owner.__name__.split('.')[-1]}"
        if title != current:
            current = title
            doc = inspect.getdoc(owner) or ""
            lines += [f"## {title}", "", doc, ""]
        target = member.fget if isinstance(member, property) else member
        try:
            sig = "" if isinstance(member, property) else str(inspect.signature(target))
        except (TypeError, ValueError):
            sig = "(...)"
        lines += [f"### `{name}{sig}`", "", inspect.getdoc(target) or "", ""]
    return "\n".join(lines).rstrip() + "\n"


def test_every_public_member_is_documented():
    missing = [
        f"{getattr(o, '__name__', o)}.{n}"
        for o, n, m in public_members()
        if not inspect.getdoc(m.fget if isinstance(m, property) else m)
    ]
    assert not missing, missing


def test_api_reference_is_current():
    assert API.read_text() == render(), "docs/api.md is stale: run python tests/test_api_docs.py"


if __name__ == "__main__":
    API.write_text(render())
