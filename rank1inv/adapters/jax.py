"""JAX adapter: zero-copy conversion, pytree ravel/unravel, and M-FAC as an optax transformation.

Two M-FACs: ``native_mfac`` keeps the window as arrays in the optax state (pure, jit/vmap/scan,
no host callback: ``rank1inv.adapters.jax_native``), ``mfac`` sends gradients to a
``DynamicInverse`` on the host through ``io_callback`` — for what only that window has: its
power-of-two frames and refusals, 16-bit storage with float64 accumulation, its CuPy kernels,
and ``state_dict`` interchange with the NumPy/torch windows.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax  # noqa: TID253 (this module is the adapter)
import jax.numpy as jnp  # noqa: TID253 (this module is the adapter)
import numpy as np
import optax  # noqa: TID253 (this module is the adapter)
from jax.flatten_util import ravel_pytree  # noqa: TID253 (this module is the adapter)

from .. import _precision
from ..dynamic import DynamicInverse, staged_push_apply
from .jax_native import NativeMFACState, native_mfac

__all__ = ["to_array", "to_jax", "ravel", "mfac", "window_of", "MFACState", "native_mfac", "NativeMFACState"]


def to_array(x: jax.Array):
    """A NumPy (CPU) or CuPy (GPU) array sharing ``x``'s buffer (zero-copy, via DLPack).
    JAX arrays are immutable: do not write through the result while ``x`` is in use."""
    platform = next(iter(x.devices())).platform
    if platform == "gpu":
        import cupy

        return cupy.from_dlpack(x)
    return np.from_dlpack(x)


def to_jax(array) -> jax.Array:
    """A JAX array sharing the memory of a NumPy or CuPy array, via DLPack. JAX shares only
    buffers aligned to 64 bytes; others are copied (JAX's rule, not ours)."""
    return jax.dlpack.from_dlpack(array)


def ravel(tree):
    """(flat 1-D array, unravel function) for a pytree of arrays (``jax.flatten_util``)."""
    return ravel_pytree(tree)


class MFACState(NamedTuple):
    count: jax.Array
    momentum: jax.Array  # flat momentum buffer (zeros when momentum == 0)
    window: jax.Array  # int32 id of this state's host window (each init makes its own)


_WINDOW_IDS = itertools.count()  # ids unique across transformations: a foreign state is never a match


class _Windows:
    """The host side of ``mfac``: one DynamicInverse per ``init``, by an id unique in the process."""

    def __init__(self, ngrads, damp, scale, dtype=None):
        self.ngrads, self.damp, self.scale, self.dtype = ngrads, damp, scale, dtype
        self.windows: dict[int, DynamicInverse] = {}

    def new(self, dim: int, dtype) -> int:
        name = self.dtype or _precision.of(dtype).name
        key = next(_WINDOW_IDS)
        if key > np.iinfo(np.int32).max:  # pragma: no cover - 2^31 inits in one process
            raise OverflowError("too many mfac windows in this process")
        self.windows[key] = DynamicInverse(dim, self.ngrads, self.damp, scale=self.scale, dtype=name)
        return key

    def push_apply(self, key, g):
        g = np.asarray(g)
        if int(key) not in self.windows:  # under jit the id is only known here
            raise ValueError("this state was made by another transformation's init")
        (direction,), undo = staged_push_apply([self.windows[int(key)]], [g])
        with np.errstate(over="ignore"):
            out = np.asarray(direction, dtype=g.dtype)
        if not np.all(np.isfinite(out)):  # e.g. F⁻¹g beyond float16's 65 504: never a silent inf
            undo()  # the step did not happen: the window is as it was
            raise OverflowError(f"the M-FAC direction does not fit the gradients' dtype {g.dtype}")
        return out


def _is_batched(x) -> bool:
    """Whether x is traced by ``jax.vmap`` (io_callback cannot be batched)."""
    try:
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:  # pragma: no cover - a JAX without that private module
        return False
    return isinstance(x, BatchTracer)


def mfac(learning_rate: float, *, ngrads: int = 1024, damp: float = 1e-5, momentum: float = 0.0, scale=None,
         dtype=None):  # fmt: skip
    """M-FAC (M-FAC §4.2) as an ``optax.GradientTransformation``: updates = −lr·F⁻¹g (with
    optional heavy-ball momentum), F the damped empirical Fisher of the last ``ngrads`` gradients.

    Each ``init`` creates its own window, a ``DynamicInverse`` on the host named by an id in the
    state; ``update`` reaches it through ``jax.experimental.io_callback(ordered=True)``, so it
    works eagerly and inside ``jax.jit`` (calls stay in program order). The window cannot live in
    the state as arrays: its O(m²) updates are sequential host work (or CuPy kernels), not XLA
    operations; the cost is one host round trip of the d-long gradient and direction per step.
    ``update`` refuses, at the call, a state that is not from this transformation's ``init``
    (TypeError/ValueError), non-finite gradients (ValueError) and ``vmap`` (TypeError); under
    ``jit`` the first two and a direction that overflows a 16-bit dtype (OverflowError) are
    raised inside the callback, which JAX reports as its own runtime error carrying that
    message (nothing is pushed). ``window_of(tx, state)`` returns the window
    (e.g. for ``state_dict()`` checkpoints). ``dtype`` is the windows' storage dtype (None: the
    parameters'; "bfloat16"/"float16" halve the memory of float32 ones).
    """
    host = _Windows(ngrads, damp, scale, None if dtype is None else _precision.of(dtype).name)

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        key = host.new(flat.shape[0], flat.dtype)
        return MFACState(count=jnp.zeros((), jnp.int32), momentum=jnp.zeros_like(flat), window=jnp.int32(key))

    def update_fn(updates, state, params=None):
        del params
        if not isinstance(state, MFACState):
            raise TypeError(
                f"update needs the state returned by this transformation's init, got {type(state).__name__}"
            )
        if not host.windows:
            raise ValueError("update before init: call tx.init(params) first")
        flat, unravel = ravel_pytree(updates)
        if _is_batched(flat) or _is_batched(state.window):
            raise TypeError("the rank1inv mfac transformation cannot be vmap-ed (its window is host state)")
        if flat.shape != state.momentum.shape:
            raise ValueError(f"updates have {flat.shape[0]} values, the state was made for {state.momentum.shape[0]}")
        if not isinstance(state.window, jax.core.Tracer) and int(state.window) not in host.windows:
            raise ValueError("this state was made by another transformation's init")
        if not isinstance(flat, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(flat))):
            raise ValueError("updates contain non-finite values (nan or inf); the window is unchanged")
        shape = jax.ShapeDtypeStruct(flat.shape, flat.dtype)
        direction = jax.experimental.io_callback(host.push_apply, shape, state.window, flat, ordered=True)
        buf = momentum * state.momentum + direction if momentum else direction
        new_state = MFACState(count=state.count + 1, momentum=buf if momentum else state.momentum, window=state.window)
        return unravel(-learning_rate * buf), new_state

    update_fn.host = host
    return optax.GradientTransformation(init_fn, update_fn)


def window_of(tx, state: MFACState | None = None) -> DynamicInverse:
    """The DynamicInverse behind a transformation made by ``mfac``: the one of ``state``, or of
    the latest ``init``."""
    host = getattr(tx.update, "host", None)
    if host is None or not host.windows:
        raise ValueError("not an initialised rank1inv mfac transformation")
    key = max(host.windows) if state is None else int(state.window)
    return host.windows[key]
