"""``python -m tools.gpu_check --out DIR [--dry-run]``: the checks a lent GPU should run, in
order of value, within about 6 minutes of device time.

Each step runs as a subprocess with its own timeout, and the markdown report DIR/report.md is
written after every step, so a run cut short still leaves the results of the steps it finished.
``--dry-run`` prints the steps with their estimated times (on one H100/H200) and runs nothing.
How to run it with the device tool: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    estimate_s: int  # on one H100/H200, NVRTC compilation included
    timeout_s: int


def steps(out: Path) -> list[Step]:
    py = sys.executable
    pytest = (py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider")
    return [
        Step("kernels against their mirrors", (*pytest, "tests/test_cuda.py", "tests/test_window.py"), 45, 150),
        Step(
            "the operators on CuPy (no 10 000-push drift loop)",
            (
                *pytest,
                "tests/test_static.py",
                "tests/test_dynamic.py",
                "tests/test_backend.py",
                "tests/test_coef.py",
                "tests/test_reliability.py",
                "tests/test_laplace.py",
                "tests/test_factored.py",
                "tests/test_streamed.py",
                "tests/test_chunked.py",
                "-k",
                "not no_drift",
            ),  # fmt: skip
            120,
            240,
        ),
        Step(
            "benchmark, quick",
            (py, "-m", "benchmarks", "--device", "gpu", "--quick", "--out", str(out / "bench_quick.md")),
            60,
            150,
        ),  # fmt: skip
        Step(
            "benchmark, full rows",
            (py, "-m", "benchmarks", "--device", "gpu", "--out", str(out / "bench_full.md")),
            120,
            240,
        ),  # fmt: skip
    ]


def _device_name() -> str:
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        return props["name"].decode()
    except Exception as err:  # no CuPy or no device: the report says so
        return f"no CUDA device ({type(err).__name__}: {err})"


def run(out: Path, dry_run: bool = False) -> int:
    plan = steps(out)
    total = sum(s.estimate_s for s in plan)
    if dry_run:
        for s in plan:
            print(f"~{s.estimate_s:4d} s  {s.name}:  {' '.join(s.argv)}")
        print(f"~{total:4d} s  in all (estimated device time on one H100/H200)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    lines = [
        "# rank1inv GPU check",
        "",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {_device_name()}",
        f"command: python -m tools.gpu_check --out {out}",
        "",
    ]
    report.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    worst = 0
    for s in plan:
        t0 = time.perf_counter()
        try:
            done = subprocess.run(s.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=s.timeout_s)
            rc, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            rc, text = 124, f"timed out after {s.timeout_s} s\n{err.stdout or ''}{err.stderr or ''}"
        elapsed = time.perf_counter() - t0
        worst = max(worst, rc)
        tail = "\n".join(str(text).strip().splitlines()[-40:])
        lines += [f"## {s.name} — rc {rc}, {elapsed:.0f} s (estimated {s.estimate_s} s)", "",
                  f"    {' '.join(s.argv)}", "", "```", tail, "```", ""]  # fmt: skip
        report.write_text("\n".join(lines) + "\n")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.gpu_check",
        description="The checks a lent GPU should run, in order of value, within about 6 minutes of device time: "
        "the GPU tests, then the GPU benchmarks, each step a subprocess with its own timeout; DIR/report.md is "
        "rewritten after every step. How to run it with the device tool: docs/benchmarks.md.",
    )
    p.add_argument("--out", default="gpu-check", help="folder for report.md and the benchmark tables")
    p.add_argument("--dry-run", action="store_true", help="list the steps with their estimated device time")
    args = p.parse_args(argv)
    return run(Path(args.out), args.dry_run)


if __name__ == "__main__":
    import sys

    sys.exit(main())
