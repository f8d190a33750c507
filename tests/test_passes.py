"""Passes over G with float64 accumulation: compiled CPU kernel, tile fallback, native mode."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import host

from rank1inv import _backend, _passes, _precision, cpu

xp = _backend.namespace_from_argument(None)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9, 17, 25])
@pytest.mark.parametrize("d", [1, 7, 8, 9, 513, 2049, 8193, 20000])
def test_cpu_kernel_matches_float64(m, d, k, storage):
    """Single-vector and multi-vector passes (column chunks, row blocks and tails; bfloat16's
    split column order with its last < 8 columns) against float64 on the stored values."""
    if not cpu.available():
        pytest.skip("CPU extension not built")
    rng = np.random.default_rng(m * d * k)
    wide = rng.standard_normal((m, d + 5)).astype(np.float32).astype(_precision.numpy_dtype(storage))
    G = wide[None, :, 2 : 2 + d]  # a strided block view (leading dimension d + 5)
    x = rng.standard_normal((1, d, k))
    c = rng.standard_normal((1, m, k))
    G64 = G.astype(np.float64)
    assert cpu.usable(G, k) and not cpu.usable(G, cpu.MAX_COLUMNS + 1)
    np.testing.assert_allclose(cpu.project(G, x), G64 @ x, rtol=1e-12, atol=1e-12 * np.sqrt(d))
    Gt, tol = G64.transpose(0, 2, 1), 1e-12 * np.sqrt(m)
    np.testing.assert_allclose(cpu.combine(G, x, c, 0.5, -2.0), 0.5 * x - 2.0 * (Gt @ c), rtol=1e-12, atol=tol)
    np.testing.assert_allclose(cpu.combine(G, None, c, 0.0, 3.0), 3.0 * (Gt @ c), rtol=1e-12, atol=tol)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("m, k", [(5, 1), (9, 1), (17, 1), (6, 3)])
def test_project_across_column_tiles(storage, m, k):
    """d spans three of project's column tiles (32768) with a tail: the partial sums of every
    tile add up to the float64 product of the stored values."""
    if not cpu.available():
        pytest.skip("CPU extension not built")
    d = 2 * 32768 + 4465
    rng = np.random.default_rng(m + k)
    G = rng.standard_normal((1, m, d)).astype(np.float32).astype(_precision.numpy_dtype(storage))
    x = rng.standard_normal((1, d, k))
    assert cpu.usable(G, k)
    np.testing.assert_allclose(cpu.project(G, x), G.astype(np.float64) @ x, rtol=1e-12, atol=1e-12 * np.sqrt(d))


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("k", [1, 3])
def test_every_finite_16_bit_value_decodes_exactly(storage, k):
    """Every finite bit pattern of the storage type (zeros, subnormals, the largest values, both
    signs), shuffled over 8 rows with a tail of columns: project and combine against float64."""
    if not cpu.available():
        pytest.skip("CPU extension not built")
    dtype = _precision.numpy_dtype(storage)
    bits = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        finite = bits[np.isfinite(bits.view(dtype).astype(np.float64))]
    rng = np.random.default_rng(k)
    G = rng.permutation(finite)[: 8 * (finite.size // 8 - 3)].reshape(8, -1)[None].view(dtype)
    G64 = G.astype(np.float64)
    assert G.shape[2] % 8 == 5  # a tail after the split groups of 8
    d = G.shape[2]
    x = rng.standard_normal((1, d, k))
    c = rng.standard_normal((1, 8, k))
    scale = np.abs(G64) @ np.abs(x)
    assert np.all(np.abs(cpu.project(G, x) - G64 @ x) <= 1e-14 * scale)
    want = 0.5 * x - 2.0 * (G64.transpose(0, 2, 1) @ c)
    bound = 1e-14 * (0.5 * np.abs(x) + 2.0 * (np.abs(G64).transpose(0, 2, 1) @ np.abs(c)))
    assert np.all(np.abs(cpu.combine(G, x, c, 0.5, -2.0) - want) <= bound)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("nb,m,B", [(2, 1, 9), (3, 5, 8193), (40, 17, 100), (300, 4, 30)])
def test_cpu_kernel_on_blocks(nb, m, B, k):
    """Batched equal blocks as StaticInverse lays them out: column blocks of one G (m, d)."""
    if not cpu.available():
        pytest.skip("CPU extension not built")
    rng = np.random.default_rng(nb * m * B)
    G = rng.standard_normal((m, nb * B + 3)).astype(np.float32)
    Gg = np.transpose(G[:, 3:].reshape(m, nb, B), (1, 0, 2))  # strides (B, d + 3, 1) elements
    x = rng.standard_normal((nb, B, k))
    c = rng.standard_normal((nb, m, k))
    G64 = Gg.astype(np.float64)
    assert cpu.usable(Gg, k)
    np.testing.assert_allclose(cpu.project(Gg, x), G64 @ x, rtol=1e-12, atol=1e-12 * np.sqrt(B))
    ref = 0.5 * x - 2.0 * (G64.transpose(0, 2, 1) @ c)
    np.testing.assert_allclose(cpu.combine(Gg, x, c, 0.5, -2.0), ref, rtol=1e-12, atol=1e-12 * np.sqrt(m))


@pytest.mark.parametrize("nb,k", [(1, 1), (1, 3), (7, 1)])
def test_parallel_split_matches_serial(monkeypatch, nb, k):
    if not cpu.available():
        pytest.skip("CPU extension not built")
    rng = np.random.default_rng(0)
    G = rng.standard_normal((37, 40000)).astype(np.float32)
    Gg = np.transpose(G[:, : 40000 // nb * nb].reshape(37, nb, -1), (1, 0, 2))
    x = rng.standard_normal((nb, Gg.shape[2], k))
    c = rng.standard_normal((nb, 37, k))
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 1)
    monkeypatch.setattr(cpu, "_workers", lambda: 3)
    par = cpu.project(Gg, x), cpu.combine(Gg, x, c, 1.0, -1.0)
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 1 << 60)
    ser = cpu.project(Gg, x), cpu.combine(Gg, x, c, 1.0, -1.0)
    for a, b in zip(par, ser):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("accumulate", ["float64", "native"])
def test_group_passes_tile_fallback(monkeypatch, accumulate, xp):
    """The tiled float64 conversion (used without compiled kernels) on batched block groups,
    with budgets small enough for many tiles and a partial last one in every pass."""
    monkeypatch.setattr(_backend, "kernels", lambda xp: None)
    for name in ("TILE_ELEMENTS", "BLAS3_TILE_ELEMENTS", "GPU_TILE_ELEMENTS"):
        monkeypatch.setattr(_passes, name, 64)
    ns = _backend.namespace_from_argument(xp)
    rng = np.random.default_rng(1)
    G64 = rng.standard_normal((3, 5, 43)).astype(np.float32).astype(np.float64)
    X = rng.standard_normal((3, 43, 2))
    C = rng.standard_normal((3, 5, 2))
    Gg, Xd, Cd = (xp.asarray(a) for a in (G64.astype(np.float32), X, C))
    tol = 1e-12 if accumulate == "float64" else 1e-5

    def close(a, ref, rtol=tol):
        np.testing.assert_allclose(host(a), ref, rtol=rtol, atol=tol)

    close(_passes.gram(ns, Gg, accumulate), G64 @ G64.transpose(0, 2, 1))
    close(_passes.column_gram(ns, Gg, accumulate), G64.transpose(0, 2, 1) @ G64)
    close(_passes.project(ns, Gg, Xd, accumulate), G64 @ X)
    close(_passes.combine(ns, Gg, Xd, Cd, 2.0, -0.5, accumulate), 2.0 * X - 0.5 * (G64.transpose(0, 2, 1) @ C))
    close(_passes.column_sumsq(ns, Gg), (G64**2).sum(axis=1), rtol=1e-12)
    L = np.linalg.cholesky(G64 @ G64.transpose(0, 2, 1) + np.eye(5))
    Ld = xp.asarray(L)
    W = _passes.map_tiles(ns, Gg, lambda b0, b1, t: _backend.solve_triangular(ns, Ld[b0:b1], t, lower=True))
    close(W, np.linalg.solve(L, G64), rtol=1e-12)


def test_tiles_cover_everything():
    for count, length, width in [(1, 10, 3), (5, 7, 100), (3, 1000, 50), (1, 1, 1)]:
        seen = np.zeros((count, length), dtype=int)
        for b0, b1, c0, c1 in _passes.tiles(count, length, width, budget=512):
            seen[b0:b1, c0:c1] += 1
        assert np.all(seen == 1)


_FORK_CHILD = """
import os, sys
import numpy as np
from rank1inv import cpu
rng = np.random.default_rng(2)
Gg = rng.standard_normal((1, 8, 1 << 18)).astype(np.float32)  # above PARALLEL_MIN: uses the pool
x = rng.standard_normal((1, 1 << 18, 1))
expected = cpu.project(Gg, x)
pid = os.fork()
if pid == 0:
    os._exit(0 if np.array_equal(cpu.project(Gg, x), expected) else 3)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_passes_work_in_a_forked_child():
    """The worker pool started by the parent does not exist in a forked child (it used to
    deadlock there): the child must start its own. Run in a fresh interpreter, away from the
    threads other tests start (JAX, torch)."""
    if not cpu.available():
        pytest.skip("CPU extension not built")
    try:
        done = subprocess.run([sys.executable, "-c", _FORK_CHILD], timeout=60, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child's pass did not finish within 60 s")
    assert done.returncode == 0, done.stderr
