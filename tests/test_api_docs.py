"""Every public name (the ``__all__`` of the public modules) and every public method is
documented, and docs/api.md is generated from them (regenerate with ``python -m tools.api_docs``)."""

import inspect

from tools.api_docs import API, public_members, render


def test_every_public_member_is_documented():
    missing = [
        f"{title}.{n}"
        for title, _, n, m in public_members()
        if (callable(m) or isinstance(m, property)) and not inspect.getdoc(m.fget if isinstance(m, property) else m)
    ]
    assert not missing, missing


def test_api_reference_is_current():
    assert API.read_text() == render(), "docs/api.md is stale: run python -m tools.api_docs"
