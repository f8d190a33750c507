"""Smoke tests of the benchmark driver: every row is produced, positive and finite (speed itself
is measured by `python -m benchmarks`, never asserted by tests)."""

import math

import pytest

from benchmarks import bench


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


def test_floors_bench_runs():
    from benchmarks import bench_floors

    _check(
        bench_floors.run(quick=True),
        [
            "StaticInverse IHVP / floor",
            "push_apply / floor, full window",
            "bfloat16 / float32 IHVP time",
            "bfloat16 / float32 push_apply time",
            "float32 project / BLAS",
            "float32 combine / BLAS",
            "bfloat16 project GB/s, 1 worker",
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


def test_gpu_check_dry_run_fits_the_device_budget(capsys):
    """The device script's steps, estimated at ≤ 6 minutes of H100/H200 time in all."""
    from pathlib import Path

    from tools import gpu_check

    assert gpu_check.run(Path("unused"), dry_run=True) == 0
    text = capsys.readouterr().out
    assert "kernels against their mirrors" in text and "benchmark, full rows" in text
    assert sum(s.estimate_s for s in gpu_check.steps(Path("x"))) <= 360
    assert all(s.timeout_s >= s.estimate_s for s in gpu_check.steps(Path("x")))
    tests = [a for s in gpu_check.steps(Path("x")) for a in s.argv if a.startswith("tests/")]
    missing = [a for a in tests if not (gpu_check.ROOT / a).is_file()]  # one path per argument
    assert tests and not missing, missing


def test_cli_help_exits_zero():
    from rank1inv.__main__ import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2


def test_dask_bench_runs():
    pytest.importorskip("distributed")
    from benchmarks import bench_dask

    text = bench_dask.run(m=8, d=1 << 19)
    assert "bytes sent back by the chunks' tasks per IHVP (2 chunks) | 144 |" in text, text  # 2 · 8 · (8 + 1)


def test_timer_paired_orders_its_quartiles():
    """Timer.paired alternates the order within pairs and returns ordered quartiles of the
    per-pair ratios and both median times (no timing is asserted)."""
    import numpy as np

    from rank1inv.examples.timing import Timer

    calls = []
    q50, q25, q75, a, b = Timer(np, pause=0.0).paired(lambda: calls.append("f"), lambda: calls.append("r"), pairs=6)
    assert calls[2:] == ["r", "f", "f", "r"] * 3  # after one untimed call of each
    assert 0 < q25 <= q50 <= q75 and a > 0 and b > 0
