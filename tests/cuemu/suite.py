"""The project's CUDA kernels on the CPU emulator, through their own launchers
(``rank1inv/cuda/kernels.py`` with ``fakecupy`` as ``cupy``), against the NumPy mirrors and
float64 references, under every schedule policy that the case lists (results must then be bitwise
equal across policies: the kernels' reductions have a fixed order).

    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        python tests/cuemu/suite.py [GROUP ...]

Groups: passes, passes-quick (m = 33 only), mfac_b, forward_substitution, chol_drop (default:
all but passes-quick). Prints one line per
case and exits 1 if any failed; a sanitizer finding aborts the process (exit code ≠ 0, report
on stderr). ``--source NAME=FILE`` compiles FILE instead of rank1inv/cuda/NAME (planted bugs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: benchmarks.paper_kernels
import fakecupy

sys.modules["cupy"] = fakecupy

from benchmarks import paper_kernels  # noqa: E402
from rank1inv import _backend, _precision  # noqa: E402
from rank1inv.cuda import kernels, mirrors  # noqa: E402
from rank1inv.groups import coefficients as _coef  # noqa: E402
from rank1inv.groups import window as _window  # noqa: E402

XP = _backend.namespace_from_argument(None)
ALL = ("forward", "reverse", "random", "warp-ahead")
FAILURES: list[str] = []


def under(policies, fn):
    """fn() under each policy; the results must agree bit for bit. Returns the first."""
    outs = []
    for name in policies:
        fakecupy.POLICY, fakecupy.SEED = fakecupy.POLICIES[name], 7
        outs.append([np.array(a, copy=True) for a in fn()])
    for name, out in zip(policies[1:], outs[1:]):
        for a, b in zip(outs[0], out):
            if not np.array_equal(a, b, equal_nan=True):
                raise AssertionError(f"schedule {name!r} gives a different result than {policies[0]!r}")
    return outs[0]


def close(a, b, tol, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-300)
    err = float(np.abs(a - b).max()) / scale if b.size else 0.0
    if not err <= tol:
        raise AssertionError(f"{what}: max error {err:.3g} > {tol:g} (relative to max |reference|)")


def case(name, fn):
    t0 = time.perf_counter()
    try:
        fn()
        print(f"ok    {name}  ({time.perf_counter() - t0:.2f} s)", flush=True)
    except AssertionError as err:
        FAILURES.append(name)
        print(f"FAIL  {name}: {err}", flush=True)


# ------------------------------------------------------------------------------ passes
def stored(G, dtype):
    """(host array of the storage dtype, its device form: bfloat16 as uint16 bit patterns)."""
    H = G.astype(_precision.numpy_dtype(dtype))
    return H, fakecupy.asarray(H.view(np.uint16) if dtype == "bfloat16" else H)


def passes_case(m, d, dtype, policies):
    rng = np.random.default_rng(m * 7919 + d)
    G = rng.standard_normal((m, d))
    G[:, ::7] *= {"float32": 1e-42, "bfloat16": 1e-40, "float16": 1e-6}[dtype]  # subnormals
    H, Gd = stored(G, dtype)
    x, c = rng.standard_normal(d), rng.standard_normal(m)
    G64 = H.astype(np.float64)

    def run():
        X = fakecupy.asarray(x[None, :, None])
        C = fakecupy.asarray(c[None, :, None])
        p = kernels.project(Gd[None], X)[0, :, 0]
        y = kernels.combine(Gd[None], X, C, 0.5, -2.0)[0, :, 0]
        y0 = kernels.combine(Gd[None], None, C, 0.0, 1.0)[0, :, 0]
        Xin = fakecupy.asarray(x[None, :, None])
        kernels.combine(Gd[None], Xin, C, 0.5, -2.0, out=Xin)  # in place, as the IHVP does
        return p, y, y0, Xin[0, :, 0]

    p, y, y0, y_in = under(policies, run)
    close(p, mirrors.project(H, x), 1e-12, "project vs mirror")
    close(p, G64 @ x, 1e-12, "project vs float64")
    close(y, mirrors.combine(H, x, c, 0.5, -2.0), 1e-12, "combine vs mirror")
    close(y, 0.5 * x - 2.0 * (G64.T @ c), 1e-12, "combine vs float64")
    close(y0, G64.T @ c, 1e-12, "combine without x vs float64")
    if not np.array_equal(y_in, y):
        raise AssertionError("combine in place differs from out of place")


def passes(sizes=(1, 31, 32, 33, 300, 1000, 1025)):
    for m in sizes:
        for d in (1, 2055) if m <= 33 else (2055,):  # one column; one full chunk + a tail
            policies = ALL if m <= 33 else (("forward", "warp-ahead") if m == 300 else ("forward",))
            for dtype in ("float32", "bfloat16", "float16") if m in (33, 300) else ("float32",):
                case(f"passes m={m} d={d} {dtype} {'/'.join(policies)}",
                     lambda m=m, d=d, dtype=dtype, p=policies: passes_case(m, d, dtype, p))  # fmt: skip


# ------------------------------------------------------------------------------ M-FAC's B
def coefficients(m, seed=0):
    rng = np.random.default_rng(m + seed)
    A = rng.standard_normal((m, m + 10))
    D, _ = _coef.coefficients(XP, A @ A.T, 0.1, float(m))
    return D


def mfac_b_case(m, dtype, schedule, policies):
    D = coefficients(m)
    Dd = fakecupy.asarray(D.astype(dtype))
    (B,) = under(policies, lambda: [kernels.mfac_b(Dd, float(m), 0.1, schedule=schedule)])
    tol = 1e-4 if dtype == "float32" else 1e-11
    close(B, mirrors.mfac_b(D.astype(dtype).astype(np.float64), float(m), 0.1, schedule=schedule), tol, "B vs mirror")
    direct = _coef.b_matrix(XP, D, float(m), 0.1) if hasattr(_coef, "b_matrix") else None
    if direct is not None:
        close(B, direct, tol, "B vs direct")
    if not np.all(np.triu(np.asarray(B), 1) == 0):
        raise AssertionError("B is not lower triangular")


def mfac_b():
    for m in (1, 31, 32, 33, 300, 1000, 1025):
        for dtype in ("float64", "float32") if m <= 300 else ("float64",):
            schedules = ("columns", "sweeps") if m <= 300 else ("columns",)
            for schedule in schedules:
                policies = ("forward", "random", "warp-ahead") if m <= 33 else ("forward",)
                case(f"mfac_b m={m} {dtype} {schedule} {'/'.join(policies)}",
                     lambda m=m, dt=dtype, s=schedule, p=policies: mfac_b_case(m, dt, s, p))  # fmt: skip


# ------------------------------------------------------------------------------ Algorithm 2
def forward_substitution_case(m, dtype, policies):
    D = coefficients(m, 1)
    b = np.random.default_rng(m).standard_normal(m)
    Dd, bd = fakecupy.asarray(D.astype(dtype)), fakecupy.asarray(b.astype(dtype))
    (q,) = under(policies, lambda: [paper_kernels.forward_substitution(Dd, float(m), bd)])
    tol = 1e-4 if dtype == "float32" else 1e-10
    close(q, paper_kernels.forward_substitution_mirror(D, float(m), b), tol, "q vs mirror")
    U = D + float(m) * np.eye(m)
    close(U.T @ np.asarray(q, dtype=np.float64), b, tol, "Uᵀq vs b")


def forward_substitution():
    for m in (1, 31, 32, 33, 300, 1025):
        for dtype in ("float64", "float32"):
            policies = ALL if m <= 33 else ("forward",)
            case(f"forward_substitution m={m} {dtype} {'/'.join(policies)}",
                 lambda m=m, dt=dtype, p=policies: forward_substitution_case(m, dt, p))  # fmt: skip


# ------------------------------------------------------------------------------ window factor
def chol_drop_case(n, k, in_place, policies):
    rng = np.random.default_rng(n + k)
    A = rng.standard_normal((n, n + 3))
    R = _window.factorize(XP, A @ A.T + 0.1 * np.eye(n), n + 2)
    ref = np.empty_like(R)
    _window.drop_rows_numpy(XP, R, ref, n, k)

    def run():
        src = fakecupy.asarray(R)
        dst = src if in_place else fakecupy.asarray(np.full_like(R, np.nan))
        kernels.chol_drop(src, dst, n, k)
        return [dst[: n - 1, : n - 1]]

    (out,) = under(policies, run)
    close(out, ref[: n - 1, : n - 1], 1e-13, "dropped factor vs mirror")


def chol_drop():
    for n, k in ((1, 0), (2, 1), (33, 0), (33, 17), (33, 32), (300, 0), (300, 151)):
        for in_place in (False, True):
            policies = ALL if n <= 33 else ("forward",)
            case(f"chol_drop n={n} k={k} {'in place' if in_place else 'copy'} {'/'.join(policies)}",
                 lambda n=n, k=k, ip=in_place, p=policies: chol_drop_case(n, k, ip, p))  # fmt: skip


GROUPS = {
    "passes": passes,
    "passes-quick": lambda: passes((33,)),  # for the planted-bug checks
    "mfac_b": mfac_b,
    "forward_substitution": forward_substitution,
    "chol_drop": chol_drop,
}


def main(argv):
    names = []
    for arg in argv:
        if arg.startswith("--source="):
            name, path = arg.split("=", 1)[1].split("=", 1)
            kernels._module.cache_clear()
            original = kernels._HERE

            class _Sources:  # kernels reads _HERE / name: serve the planted file for that name
                def __truediv__(self, other, name=name, path=path, original=original):
                    return Path(path) if other == name else original / other

            kernels._HERE = _Sources()
        else:
            names.append(arg)
    for name in names or [g for g in GROUPS if g != "passes-quick"]:
        GROUPS[name]()
    print(f"{len(FAILURES)} failed" if FAILURES else "all passed", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
