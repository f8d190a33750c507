"""Smoke tests of the benchmark driver: every row is produced, positive and finite (speed itself
is measured by `python -m rank1inv bench`, never asserted by tests)."""

import math

import pytest

from rank1inv import bench


def _rows(text):
    rows = [
        line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| measurement")
    ]
    return {r[0].lstrip("| "): float(r[1]) for r in rows}


def _check(text, expected):
    rows = _rows(text)
    for prefix in expected:
        assert any(name.startswith(prefix) for name in rows), f"no row {prefix!r} in\n{text}"
    assert all(math.isfinite(v) and v > 0 for v in rows.values()), text


def test_cpu_bench_runs():
    _check(
        bench.run("cpu", quick=True),
        [
            "floor",
            "StaticInverse IHVP",
            "precompute + full diagonal",
            "DynamicInverse push_apply",
            "push_apply / floor, full window",
            "push_apply time",
            "fill an m=",
        ],  # fmt: skip
    )


@pytest.mark.gpu
def test_gpu_bench_runs():
    _check(
        bench.run("gpu", quick=True),
        [
            "device-to-device copy bandwidth",
            "IHVP / floor",
            "push_apply / floor",
            "B kernel",
            "static precompute",
            "push_apply / floor, full window",
        ],  # fmt: skip
    )
