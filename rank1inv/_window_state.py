"""The window's state: its format (``state_dict``) and the validation of an untrusted state
(``load_state_dict``) against the stored gradients, the ground truth (docs/design.md §6,
"State"). The functions take the window; ``DynamicInverse.state_dict``/``load_state_dict`` call
them.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend, _checks, _passes, _precision, _scaling
from ._comm import digest
from .groups import window as _window

STATE_FORMAT = "rank1inv.DynamicInverse/3"
STATE_FORMATS = ("rank1inv.DynamicInverse/1", "rank1inv.DynamicInverse/2", STATE_FORMAT)
# legitimate differences between a stored Gram entry and a fresh recomputation stay below
# 0.45·ε·√d·‖g_i‖‖g_j‖ (measured, docs/numerics.md); states beyond 8·ε·(√d + 1) are refused
GRAM_TOLERANCE = 8.0
# the stored factor must reproduce K' to c·n·ε·(|R|ᵀ|R|) componentwise (Cholesky's own bound is
# n·ε; updates add a few ε per step of an entry's life, which is ≤ REFRESH_STEPS)
FACTOR_TOLERANCE = 64.0


def state_dict(w, xp=None) -> dict:
    """``DynamicInverse.state_dict`` (its docstring lists the fields): host copies, or arrays
    of ``xp``."""
    h = _backend.to_host
    grads = np.array(h(w._G), copy=True)
    if w._storage == "bfloat16":
        grads = grads.view(np.uint16)
    state = {
        "format": STATE_FORMAT,
        "dim": w._dim,
        "capacity": w._capacity,
        "damp": w._damp,
        "scale": "capacity" if w._scale_mode is None else w._scale_mode,
        "dtype": w._storage,
        "accumulate": w._accumulate,
        "gradients": grads,
        "ages": w._ages.copy(),
        "counter": w._counter,
        "frames": w._frames.copy(),
        "steps": w._steps,
        "gram": np.array(h(w._gram), copy=True),
        "factor": np.array(h(w._R), copy=True),
    }
    if xp is not None:
        state = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    return state


def load_state_dict(w, state, rebuild: bool) -> None:
    """``DynamicInverse.load_state_dict`` (its docstring states the contract and the costs):
    validate everything against the stored gradients, then commit, or raise ValueError with
    the window unchanged."""
    view = w._view(w._G[None, ...])
    cap = w._capacity
    err, tops, digest = None, np.zeros(cap), (0.0, 0.0)
    parsed: dict = {}
    try:  # 1. this rank's state, read and checked locally
        parsed = _parse_state(w, state)
        tops, digest = parsed["tops"], parsed["digest"]
    except (TypeError, ValueError) as exc:
        err = exc
    # every rank learns whether any refused, and whether the replicated fields are the same on
    # every rank, in the reduction of the gradients' max|g| (docs/design.md §12)
    tops = _passes.max_over_ranks(view, tops, err, "load_state_dict", replicated_fields_1=digest[0],
                                  replicated_fields_2=digest[1])  # fmt: skip
    if not np.all(np.isfinite(tops)):
        raise ValueError("state['gradients'] contains non-finite values")
    p = parsed
    ages, xp = p["ages"], w._xp
    if np.any(tops[ages < 0] != 0):
        raise ValueError("state['gradients'] has non-zero rows in empty slots")
    slot_exp = _scaling.row_exponents(tops)
    slot_exp[ages < 0] = 0
    # 2. the window as it would be (its construction agrees on damp, scale and accumulate),
    # and the Gram matrix recomputed from the gradients (a reduction over d)
    trial = w._empty_like(p["damp"], p["scale"], p["accumulate"])
    trial._G, trial._ages, trial._counter, trial._slot_exp = p["G"], ages.copy(), p["counter"], slot_exp
    required = trial._slot_frames(slot_exp, ages)
    fresh = _passes.gram(xp, trial._view(p["G"][None, ...]), p["accumulate"], trial._row_scale(required))[0, ...]
    with _passes.agreement(view, "load_state_dict"):  # 3. the derived arrays, checked locally
        _check_state(w, trial, p, required, fresh, rebuild)
    # commit (the window keeps its own lock, which this call holds)
    w.__dict__.update({k: v for k, v in trial.__dict__.items() if k != "_lock"})


def _parse_state(w, state) -> dict:
    """A state's fields read and checked against this window (no collective): format, sizes,
    damp/scale/accumulate, gradients (on the device), ages, counter, and max|g| per slot."""
    state = _state_mapping(state)
    need = {"format", "dim", "capacity", "damp", "scale", "dtype", "accumulate", "gradients", "ages",
            "counter", "gram"}  # fmt: skip
    missing = need - set(state)
    if missing:
        raise ValueError(f"state is missing {sorted(missing)}")
    fmt = _scalar(state["format"], str, "format")
    if fmt not in STATE_FORMATS:
        raise ValueError(f"unknown state format {fmt!r}; this version reads {STATE_FORMATS}")
    v1, v2 = fmt == STATE_FORMATS[0], fmt == STATE_FORMATS[1]
    extra = set() if v1 else {"frame" if v2 else "frames", "steps", "factor"}
    if not extra <= set(state):
        raise ValueError(f"state is missing {sorted(extra - set(state))}")
    dim, cap = _scalar(state["dim"], int, "dim"), _scalar(state["capacity"], int, "capacity")
    dtype = _scalar(state["dtype"], str, "dtype")
    if (dim, cap, dtype) != (w._dim, w._capacity, w._storage):
        raise ValueError(
            f"state is for dim={dim}, capacity={cap}, dtype={dtype}; "
            f"this window has dim={w._dim}, capacity={w._capacity}, dtype={w._storage}"
        )
    damp = _checks.damp(_scalar(state["damp"], float, "damp"))
    raw_scale = state["scale"]
    raw_scale = None if raw_scale is None else _scalar(raw_scale, (str, float), "scale")
    scale_mode = _checks.scale(None if raw_scale == "capacity" else raw_scale)
    accumulate = _checks.accumulate(_scalar(state["accumulate"], str, "accumulate"))
    grads = _host_array(state["gradients"], "gradients")
    want = np.uint16 if w._storage == "bfloat16" else _precision.numpy_dtype(w._storage)
    if w._storage == "bfloat16" and grads.dtype == _precision.numpy_dtype("bfloat16"):
        grads = grads.view(np.uint16)
    if grads.shape != (cap, dim) or grads.dtype != want:
        raise ValueError(f"state['gradients'] must be {np.dtype(want)} of shape {(cap, dim)}, "
                         f"got {grads.dtype} {grads.shape}")  # fmt: skip
    ages = _host_array(state["ages"], "ages")
    if ages.shape != (cap,) or ages.dtype.kind not in "iu":
        raise ValueError(f"state['ages'] must be int64 of shape {(cap,)}, got {ages.dtype} {ages.shape}")
    ages = ages.astype(np.int64)
    counter = _scalar(state["counter"], int, "counter")
    occ = ages[ages >= 0]
    if np.any(ages < -1) or len(np.unique(occ)) != len(occ):
        raise ValueError("state['ages'] must hold distinct ages >= 0 for occupied slots and -1 for empty ones")
    if (len(occ) and counter <= occ.max()) or counter < 0:
        raise ValueError("state['counter'] must be an int larger than every age")
    G_host = grads.view(_precision.numpy_dtype("bfloat16")) if w._storage == "bfloat16" else grads
    tops = np.array([_passes.max_abs(_backend.namespace(G_host), G_host[i]) for i in range(cap)])
    xp = w._xp
    G_dev = xp.asarray(grads, copy=True)
    if w._storage == "bfloat16" and not _backend.is_cupy(xp):
        G_dev = G_dev.view(_precision.numpy_dtype("bfloat16"))
    return dict(state=state, v1=v1, v2=v2, damp=damp, scale=scale_mode, accumulate=accumulate, G=G_dev,
                ages=ages, counter=counter, tops=tops, digest=_replicated_digest(state))  # fmt: skip


def _check_state(w, trial, p, required, fresh, rebuild: bool) -> None:
    """The state's frames, Gram matrix and factor checked against the recomputed Gram matrix
    ``fresh`` (in the ``required`` frames) and written into ``trial`` (no collective)."""
    state, v1, v2, ages = p["state"], p["v1"], p["v2"], p["ages"]
    xp, cap = w._xp, w._capacity
    order = _window.host_order(ages)
    n = order.shape[0]
    F = 0
    if v1 or v2:  # one frame F for the window: the Gram matrix and factor move to the per-slot frames
        F = 0 if v1 else _scalar(state["frame"], int, "frame")
        if v2 and abs(F - int(required.max())) > 2:
            raise ValueError(f"state['frame'] = {F} does not fit the gradients (expected about {required.max()})")
        frames = required
        to_slot = _scaling.rescale_exponents(np.full(cap, F), frames)  # gram: 2^(2F − E_i − E_j)
    else:
        frames = _host_array(state["frames"], "frames")
        if frames.shape != (cap,) or frames.dtype.kind not in "iu":
            raise ValueError(f"state['frames'] must be int64 of shape {(cap,)}, got {frames.dtype} {frames.shape}")
        frames = frames.astype(np.int64)
        # a slot's exponent was taken before rounding to storage: it may be one below the stored one's
        bad = (np.abs(frames - required) > 1) | ((ages < 0) & (frames != required))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"state['frames'][{i}] = {frames[i]} does not fit the gradients (expected {required[i]})")
        to_slot = None
        if np.any(frames != required):  # the recomputation, in the state's frames (exact)
            k = _scaling.rescale_exponents(required, frames)
            fresh = _backend.ldexp(xp, fresh, xp.asarray(k, device=_backend.device(fresh)))
    trial._frames = frames
    if rebuild:
        gram = fresh
    else:
        gram_state = _host_array(state["gram"], "gram")
        _expect_float64(gram_state, (cap, cap), "gram")
        gram = gram_state if to_slot is None else _backend.ldexp(np, gram_state, to_slot)
        gram = xp.asarray(gram, copy=True)
        _check_gram(xp, gram, fresh, trial._total_dim())
    trial._gram = gram
    K_age = trial._K_age(trial._staged(gram=gram, gram_rows={}, ages=ages, frames=frames))
    if rebuild or v1:
        try:
            trial._R = _window.factorize(xp, K_age, cap)
        except ValueError as err:
            raise ValueError(f"the state's window is not numerically positive definite: {err}") from err
        trial._steps = 0
    else:
        R = _host_array(state["factor"], "factor")
        _expect_float64(R, (cap, cap), "factor")
        if v2 and n:  # K' = D_r·K'_2·D_r, D_r = diag(2^(F − E_i)) in age order: R·D_r
            R = np.array(R, copy=True)
            R[:n, :n] = _backend.ldexp(np, R[:n, :n], (F - frames[order])[None, :])
        trial._R = xp.asarray(R, copy=True)
        _check_factor(xp, trial._R, K_age, n)
        steps = _scalar(state["steps"], int, "steps")
        if steps < 0:
            raise ValueError("state['steps'] must be >= 0")
        trial._steps = min(steps, cap)
    if trial._uses_dense:
        trial._dense = trial._stage_dense(trial._staged(G_rows={}, ages=ages, slot_exp=trial._slot_exp))


REPLICATED = ("format", "capacity", "damp", "scale", "dtype", "accumulate", "ages", "counter", "frame", "frames",
              "steps", "gram", "factor")  # fmt: skip


def _replicated_digest(state) -> tuple[float, float]:
    """``_comm.digest`` of the fields every rank of a sharded window holds alike, so that one
    reduction can tell whether they are equal (docs/design.md §12)."""
    parts = []
    for key in REPLICATED:
        if key in state:
            value = state[key]
            parts += [key, _host_array(value, key) if hasattr(value, "shape") else np.asarray(value)]
    return digest(*parts)


def _state_mapping(state) -> dict:
    if isinstance(state, dict):
        return state
    if hasattr(state, "keys") and hasattr(state, "__getitem__"):  # np.load's NpzFile, mappings
        return {k: state[k] for k in state.keys()}
    raise TypeError("state must be a dict from state_dict()")


def _scalar(value, kind, name: str):
    """A Python scalar of type ``kind`` (or one of a tuple) from a scalar or a 0-d array (as
    np.load returns them)."""
    if hasattr(value, "shape") and tuple(value.shape) == () and hasattr(value, "item"):
        value = value.item()
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, bool):
        if int in kinds and isinstance(value, numbers.Integral):
            return int(value)
        if float in kinds and isinstance(value, numbers.Real):
            return float(value)
        if str in kinds and isinstance(value, str):
            return value
    raise ValueError(f"state[{name!r}] must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def _host_array(value, name: str) -> np.ndarray:
    """A host NumPy array from NumPy, CuPy or torch arrays (or nested lists)."""
    if _backend.is_array(value):
        return _backend.to_host(value)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as err:
        raise ValueError(f"state[{name!r}] is not an array") from err


def _expect_float64(a, shape, name: str) -> None:
    if a.shape != shape or a.dtype != np.float64:
        raise ValueError(f"state[{name!r}] must be float64 of shape {shape}, got {a.dtype} {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"state[{name!r}] contains non-finite values")


def _check_gram(xp, gram, fresh, dim: int) -> None:
    """The stored Gram matrix must equal a recomputation from the gradients to rounding: within
    GRAM_TOLERANCE·ε·(√d + 1)·‖g_i‖‖g_j‖ (both accumulate the same exact products in float64)."""
    norms = xp.sqrt(xp.linalg.diagonal(fresh))
    bound = (GRAM_TOLERANCE * _precision.EPS64 * (math.sqrt(dim) + 1.0)) * (norms[:, None] * norms[None, :])
    excess = float(xp.max(xp.abs(gram - fresh) - bound))
    if excess > 0 or not bool(xp.all(gram == xp.matrix_transpose(gram))):
        raise ValueError(
            "state['gram'] is inconsistent with state['gradients'] (beyond the rounding of a recomputation, "
            "or not symmetric); pass rebuild=True to recompute it from the gradients (O(d·m² + m³))"
        )


def _check_factor(xp, R, K_age, n: int) -> None:
    """R must be the padded upper Cholesky factor of K_age (n×n) to FACTOR_TOLERANCE·n·ε,
    componentwise: |R_aᵀR_a − K| ≤ c·n·ε·|R_a|ᵀ|R_a|."""
    cap = R.shape[0]
    eye = xp.eye(cap, dtype=xp.float64, device=_backend.device(R))
    Ra = R[:n, :n]
    pad_ok = bool(xp.all(R[n:, :] == eye[n:, :])) and bool(xp.all(R[:n, n:] == 0))
    if not pad_ok or bool(xp.any(xp.tril(Ra, k=-1) != 0)) or not bool(xp.all(xp.linalg.diagonal(Ra) > 0)):
        raise ValueError("state['factor'] must be upper triangular with a positive diagonal, padded with the identity")
    absR = xp.abs(Ra)
    bound = (FACTOR_TOLERANCE * max(n, 1) * _precision.EPS64) * (xp.matrix_transpose(absR) @ absR)
    if bool(xp.any(xp.abs(xp.matrix_transpose(Ra) @ Ra - K_age) > bound)):
        raise ValueError(
            "state['factor'] is inconsistent with state['gram']; pass rebuild=True to recompute it (O(m³))"
        )
