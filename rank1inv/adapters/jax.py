"""JAX adapter: zero-copy conversion, pytree ravel/unravel, and M-FAC as an optax transformation.

No curvature math here: gradients go to a ``DynamicInverse`` on the host (NumPy) through DLPack.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from .. import _precision
from ..dynamic import DynamicInverse


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


class _Window:
    """The host side of ``mfac``: one DynamicInverse, created by ``init``."""

    def __init__(self, ngrads, damp, scale, dtype=None):
        self.ngrads, self.damp, self.scale, self.dtype = ngrads, damp, scale, dtype
        self.window: DynamicInverse | None = None

    def reset(self, dim: int, dtype) -> None:
        name = self.dtype or _precision.of(dtype).name
        self.window = DynamicInverse(dim, self.ngrads, self.damp, scale=self.scale, dtype=name)

    def push_apply(self, g):
        g = np.asarray(g)
        return np.asarray(self.window.push_apply(g), dtype=g.dtype)


def mfac(learning_rate: float, *, ngrads: int = 1024, damp: float = 1e-5, momentum: float = 0.0, scale=None,
         dtype=None):  # fmt: skip
    """M-FAC (M-FAC §4.2) as an ``optax.GradientTransformation``: updates = −lr·F⁻¹g (with
    optional heavy-ball momentum), F the damped empirical Fisher of the last ``ngrads`` gradients.

    The window lives on the host in a ``DynamicInverse`` created by ``init``; ``update`` reaches
    it through ``jax.experimental.io_callback(ordered=True)``, so it works eagerly and inside
    ``jax.jit`` (calls stay in program order). It cannot be ``vmap``-ed or differentiated, and one
    transformation serves one training run (``init`` starts a new window). ``window_of(tx)``
    returns the window (e.g. for ``state_dict()`` checkpoints). ``dtype`` is the window's storage
    dtype (None: the parameters'; "bfloat16"/"float16" halve the memory of float32 ones).
    """
    host = _Window(ngrads, damp, scale, None if dtype is None else _precision.of(dtype).name)

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        host.reset(flat.shape[0], flat.dtype)
        return MFACState(count=jnp.zeros((), jnp.int32), momentum=jnp.zeros_like(flat))

    def update_fn(updates, state, params=None):
        del params
        flat, unravel = ravel_pytree(updates)
        shape = jax.ShapeDtypeStruct(flat.shape, flat.dtype)
        direction = jax.experimental.io_callback(host.push_apply, shape, flat, ordered=True)
        buf = momentum * state.momentum + direction if momentum else direction
        new_state = MFACState(count=state.count + 1, momentum=buf if momentum else state.momentum)
        return unravel(-learning_rate * buf), new_state

    update_fn.host = host
    return optax.GradientTransformation(init_fn, update_fn)


def window_of(tx) -> DynamicInverse:
    """The DynamicInverse behind a transformation made by ``mfac`` (after ``init``)."""
    host = getattr(tx.update, "host", None)
    if host is None or host.window is None:
        raise ValueError("not an initialised rank1inv mfac transformation")
    return host.window
