"""CUDA kernels: nvcc compiles them (CPU CI), NumPy mirrors match float64 references (CPU),
kernels match their mirrors (GPU only)."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import host

import rank1inv as r1
from benchmarks import paper_kernels
from rank1inv import _backend, _precision, testing
from rank1inv.cuda import SOURCES, mirrors
from rank1inv.groups import coefficients as _coef

CUDA_DIR = Path(r1.__file__).parent / "cuda"
ARCHS = ("80", "90")


ALL_SOURCES = [CUDA_DIR / s for s in SOURCES] + sorted((Path(__file__).parents[1] / "benchmarks" / "cuda").glob("*.cu"))


@pytest.mark.parametrize("source", ALL_SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_with_nvcc(source, tmp_path):
    """Every .cu file of the repository (the library's and the benchmarks') compiles for sm_80 and sm_90."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [nvcc, "-std=c++14", *gencode, "-c", str(source), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_launch_constants_match_the_defines():
    """The launchers and mirrors use the kernels' own constants (read from the #defines)."""
    import re

    from rank1inv.groups import coefficients as _coef

    defines = {}
    for source in SOURCES:
        for name, value in re.findall(r"^#define (\w+) (\d+)\b", (CUDA_DIR / source).read_text(), re.M):
            defines[name] = int(value)
    for name in ("PROJECT_THREADS", "PROJECT_PER_THREAD", "COMBINE_THREADS", "COMBINE_PER_THREAD", "DROP_THREADS",
                 "DROP_PER_THREAD", "TILE"):  # fmt: skip
        assert defines[name] == getattr(mirrors, name), name
    assert _coef.TILE == defines["TILE"]


def test_sources_are_shipped():
    assert {"mfac_b.cu", "passes.cu", "cholesky_update.cu"} <= set(SOURCES)


@pytest.mark.parametrize("m", [1, 7, 32, 33, 100])
def test_forward_substitution_mirror_is_algorithm_2(m):
    """The kernel's tiled recursion equals Algorithm 2's q and a triangular solve."""
    from rank1inv import reference

    xp = _backend.namespace_from_argument(None)
    rng = np.random.default_rng(m)
    A = rng.standard_normal((m, m + 10))
    damp, n = 0.1, float(m)
    D, _ = _coef.coefficients(xp, A @ A.T, damp, n)
    b = rng.standard_normal(m)
    q = paper_kernels.forward_substitution_mirror(D, n, b)
    U = D + n * np.eye(m)
    np.testing.assert_allclose(U.T @ q, b, rtol=1e-10, atol=1e-10 * np.abs(b).max())
    # Algorithm 2 (reference) computes the same q inside its IHVP; compare through the result
    G, x = A, rng.standard_normal(m + 10)
    Dp, Bp = reference.dynamic_coefficients(A @ A.T, damp, n, dtype=np.float64)
    q2 = paper_kernels.forward_substitution_mirror(Dp, n, (G @ x) / damp)
    y = x / damp - (q2 @ Bp) @ G
    np.testing.assert_allclose(y, reference.dynamic_apply(G, Dp, Bp, damp, n, x), rtol=1e-9, atol=1e-9)


STORAGE = ["float32", "bfloat16", "float16"]


def stored(G, dtype):
    """G rounded to a storage dtype, on the host (ml_dtypes for bfloat16)."""
    return G.astype(_precision.numpy_dtype(dtype))


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("d", [1, 7, 2047, 2048, 2049, 5000])
def test_pass_mirrors_match_float64(d, dtype):
    rng = np.random.default_rng(d)
    m = 37
    G = stored(rng.standard_normal((m, d)), dtype)
    x = rng.standard_normal(d)
    c = rng.standard_normal(m)
    G64 = G.astype(np.float64)
    np.testing.assert_allclose(mirrors.project(G, x), G64 @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mirrors.combine(G, x, c, 0.5, -2.0), 0.5 * x - 2.0 * (G64.T @ c), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mirrors.combine(G, None, c, 0.0, 3.0), 3.0 * (G64.T @ c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", ["sweeps", "columns"])
@pytest.mark.parametrize("m", [1, 5, 31, 32, 33, 64, 70, 100])
def test_b_kernel_transcription_matches_direct(m, schedule):
    """The kernel's own block-by-block logic (in-place accumulators, masked edges) reproduces B
    on CPU, for any m."""
    xp = _backend.namespace_from_argument(None)
    rng = np.random.default_rng(m)
    A = rng.standard_normal((m, m + 20))
    damp, n = 0.05, float(m)
    D, B = _coef.coefficients(xp, A @ A.T, damp, n, method="direct")
    tol = 1e-10 * np.abs(B).max()
    np.testing.assert_allclose(mirrors.mfac_b(D, n, damp, schedule=schedule), B, rtol=1e-10, atol=tol)
    # the two schedules perform the same floating-point operations in the same order
    np.testing.assert_array_equal(mirrors.mfac_b(D, n, damp, schedule=schedule), mirrors.mfac_b(D, n, damp))


# ----------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["sweeps", "columns"])
@pytest.mark.parametrize("m", [1, 31, 32, 33, 1000, 1024, 1025, 4097])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_b_kernel_matches_mirror(m, dtype, schedule):
    import cupy

    xp = _backend.namespace_from_argument(cupy)
    rng = np.random.default_rng(m)
    G = rng.standard_normal((m, m + 64))
    gram = G @ G.T
    damp, n = 0.1, float(m)
    D, B_direct = _coef.coefficients(_backend.namespace_from_argument(None), gram, damp, n, method="direct")
    Dd = cupy.asarray(D, dtype=dtype)
    B = _backend.kernels(xp).mfac_b(Dd, n, damp, schedule=schedule)
    tol = 1e-4 if dtype == "float32" else 1e-10
    if m <= 1100:
        B_mirror = _coef.b_blocked(_backend.namespace_from_argument(None), D, n, damp)
        np.testing.assert_allclose(host(B), B_mirror, rtol=tol, atol=tol * np.abs(B_mirror).max())
    np.testing.assert_allclose(host(B), B_direct, rtol=tol, atol=tol * np.abs(B_direct).max())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 31, 32, 33, 1000, 1024, 1025, 4097])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_substitution_kernel_matches_mirror(m, dtype):
    import cupy

    rng = np.random.default_rng(m)
    A = rng.standard_normal((m, m + 16))
    D, _ = _coef.coefficients(_backend.namespace_from_argument(None), A @ A.T, 0.1, float(m))
    b = rng.standard_normal(m)
    q = host(paper_kernels.forward_substitution(cupy.asarray(D, dtype=dtype), float(m), cupy.asarray(b)))
    ref = paper_kernels.forward_substitution_mirror(D, float(m), b)
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(q, ref, rtol=tol, atol=tol * np.abs(ref).max())


def device_storage(cupy, G):
    """A host array of a storage dtype on the device (bfloat16 as its bit patterns)."""
    if G.dtype == _precision.numpy_dtype("bfloat16"):
        return cupy.asarray(G.view(np.uint16))
    return cupy.asarray(G)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("m,d", [(1, 5), (31, 2049), (33, 2047), (300, 5000), (1000, 20_001), (1024, 100_003)])
def test_pass_kernels_match_mirrors(m, d, dtype):
    """Every storage dtype, and subnormal values that CuPy's -ftz=true would flush if the
    kernels converted through float arithmetic: the GPU reads what the CPU reads."""
    import cupy

    xp = _backend.namespace_from_argument(cupy)
    kern = _backend.kernels(xp)
    rng = np.random.default_rng(m)
    G = rng.standard_normal((m, d))
    G[:, ::7] *= 1e-42 if dtype == "float32" else (1e-40 if dtype == "bfloat16" else 1e-6)  # subnormals
    G = stored(G, dtype)
    x = rng.standard_normal(d)
    c = rng.standard_normal(m)
    Gd = device_storage(cupy, G)[None]
    assert kern.usable(Gd, 1)
    p = host(kern.project(Gd, cupy.asarray(x)[None, :, None]))[0, :, 0]
    np.testing.assert_allclose(p, mirrors.project(G, x), rtol=1e-12, atol=1e-12 * float(np.abs(p).max()))
    y = host(kern.combine(Gd, cupy.asarray(x)[None, :, None], cupy.asarray(c)[None, :, None], 0.5, -2.0))[0, :, 0]
    np.testing.assert_allclose(y, mirrors.combine(G, x, c, 0.5, -2.0), rtol=1e-12, atol=1e-12 * float(np.abs(y).max()))
    y0 = host(kern.combine(Gd, None, cupy.asarray(c)[None, :, None], 0.0, 1.0))[0, :, 0]  # push_apply's pass
    np.testing.assert_allclose(
        y0, mirrors.combine(G, None, c, 0.0, 1.0), rtol=1e-12, atol=1e-12 * float(np.abs(y0).max())
    )


@pytest.mark.gpu
def test_non_default_stream_and_linear_operator():
    import cupy
    import cupyx.scipy.sparse.linalg as cspla

    G = cupy.asarray(testing.gradients("lowrank", 64, 5000, seed=0))
    F = testing.dense_fisher(host(G)[:, :300], 1e-2, 1 / 64)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        op = r1.StaticInverse(G, 1e-2)
        x = cupy.asarray(np.random.default_rng(1).standard_normal(5000))
        y = op @ x
        w = r1.DynamicInverse(5000, 16, 1e-2, xp=cupy)
        for row in G[:20]:
            z = w.push_apply(row)
        stream.synchronize()
    ref = r1.StaticInverse(host(G).astype(np.float32), 1e-2)
    np.testing.assert_allclose(host(y), ref @ host(x), rtol=1e-5, atol=1e-6 * float(np.abs(host(y)).max()))
    assert z.shape == (5000,)
    small = r1.StaticInverse(G[:, :300], 1e-2)
    A = small.aslinearoperator()
    assert isinstance(A, cspla.LinearOperator)
    b = cupy.asarray(np.random.default_rng(2).standard_normal(300))
    import inspect

    for solver in (cspla.cg, cspla.minres, cspla.gmres):
        key = "rtol" if "rtol" in inspect.signature(solver).parameters else "tol"
        zs, info = solver(A, b, **{key: 1e-11})
        assert np.linalg.norm(host(zs) - F @ host(b)) <= 1e-5 * np.linalg.norm(F @ host(b)), solver.__name__
    with pytest.raises(TypeError):
        op @ np.ones(5000)


@pytest.mark.gpu
def test_cusolver_failure_is_an_error_not_a_partial_factor():
    """With CuPy's default linalg='ignore' a failed Cholesky factorization can return a finite
    partial factor; rank1inv checks cuSOLVER's code and refuses, as on the CPU."""
    import cupy

    xp = _backend.namespace_from_argument(cupy)
    with pytest.raises(ValueError, match="positive definite"):
        _backend.cholesky(xp, cupy.asarray([[1.0, 2.0], [2.0, 1.0]]))
    w = r1.DynamicInverse(2, 4, 1e-3, dtype="float64", xp=cupy)
    w.add(cupy.asarray([1.0, 0.0]))
    with pytest.raises(ValueError, match="cannot be stored"):
        w.push_apply(cupy.asarray([1e30, 1e30]))
    assert len(w) == 1


@pytest.mark.gpu
def test_b_schedules_are_bitwise_equal_on_the_gpu():
    import cupy

    xp = _backend.namespace_from_argument(cupy)
    for m in (33, 300, 1000):
        A = np.random.default_rng(m).standard_normal((m, m + 8))
        D, _ = _coef.coefficients(_backend.namespace_from_argument(None), A @ A.T, 0.1, float(m))
        Dd = cupy.asarray(D)
        a = _backend.kernels(xp).mfac_b(Dd, float(m), 0.1, schedule="sweeps")
        b = _backend.kernels(xp).mfac_b(Dd, float(m), 0.1, schedule="columns")
        assert bool(cupy.all(a == b)), m


@pytest.mark.gpu
def test_subnormal_gradients_read_the_same_on_gpu_and_cpu():
    """CuPy compiles with -ftz=true; every pass and tile decodes float32 from its bits."""
    import cupy

    G = testing.gradients("iid", 12, 500, seed=2)
    G[:, ::3] *= np.float32(1e-42)  # subnormal float32
    x = np.random.default_rng(0).standard_normal(500)
    for damp in (1e-80, 1e-3):
        cpu = r1.StaticInverse(G, damp)
        gpu = r1.StaticInverse(cupy.asarray(G), damp)
        np.testing.assert_allclose(host(gpu @ cupy.asarray(x)), cpu @ x, rtol=1e-12, atol=1e-12 * np.abs(cpu @ x).max())
        np.testing.assert_allclose(host(gpu.diag()), cpu.diag(), rtol=1e-6)


@pytest.mark.gpu
def test_arrays_on_device_1_while_device_0_is_current():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one device")
    with cupy.cuda.Device(1):
        G = cupy.asarray(testing.gradients("iid", 16, 3000, seed=3))
        w = r1.DynamicInverse(3000, 8, 1e-2, xp=cupy)
    with cupy.cuda.Device(0):
        op = r1.StaticInverse(G, 1e-1)
        with cupy.cuda.Device(1):
            x = cupy.ones(3000, dtype=cupy.float32)
        y = op @ x
        assert y.device.id == 1 and op.diag().device.id == 1
        for row in G[:10]:
            z = w.push_apply(row)
        assert z.device.id == 1 and w._R.device.id == 1
