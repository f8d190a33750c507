"""The CUDA kernels on the CPU emulator of tests/cuemu (see its README): every kernel through its
own launcher against the mirrors, under several schedules; and the emulator itself catches a
planted race, a planted out-of-bounds read and a divergent barrier."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import checkout_env

import rank1inv as r1

HERE = Path(__file__).resolve().parent
SUITE = HERE / "cuemu" / "suite.py"
PASSES = Path(r1.__file__).parent / "cuda" / "passes.cu"
TIMEOUT = 300


def _asan_library():
    if shutil.which("g++") is None:
        return None
    out = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


ASAN = _asan_library()
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the CUDA emulator")


def run_suite(*args):
    env = checkout_env(ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", CUEMU_SANITIZE="1" if ASAN else "0")
    if ASAN:
        env["LD_PRELOAD"] = ASAN
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT)  # fmt: skip


def test_every_kernel_on_the_emulator():
    """Two processes (CI has two cores): passes and Algorithm 2; the B kernels and the factor drop."""
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda g: run_suite(*g), [("passes", "forward_substitution"), ("mfac_b", "chol_drop")]))
    for res in runs:
        assert res.returncode == 0 and "all passed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def planted(tmp_path, old, new):
    source = PASSES.read_text()
    assert source.count(old) >= 1, old
    path = tmp_path / "passes.cu"
    path.write_text(source.replace(old, new, 1))
    return f"--source=passes.cu={path}"


def test_emulator_catches_a_planted_race(tmp_path):
    """project without the barrier between the warps' partial sums and their reduction."""
    res = run_suite(
        "passes-quick",
        planted(tmp_path, "        __syncthreads();\n        if (tid < rows) {", "        if (tid < rows) {"),
    )
    assert res.returncode == 1 and "FAIL" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.mark.skipif(ASAN is None, reason="needs AddressSanitizer (libasan)")
def test_emulator_catches_a_planted_out_of_bounds_read(tmp_path):
    """project reading x past its end in the last chunk (the bounds check removed)."""
    res = run_suite("passes-quick", planted(tmp_path, "xv[q] = c < d ? x[c] : 0.0;", "xv[q] = x[c];"))
    assert res.returncode != 0 and "heap-buffer-overflow" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]


def test_emulator_catches_a_divergent_barrier(tmp_path):
    """combine with its first barrier moved inside ``if (tid < rows)``."""
    old = "if (tid < rows) cs[tid] = c[r0 + tid];\n        __syncthreads();"
    new = "if (tid < rows) { cs[tid] = c[r0 + tid]; __syncthreads(); }"
    res = run_suite("passes-quick", planted(tmp_path, old, new))
    assert res.returncode != 0 and "divergent __syncthreads" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
