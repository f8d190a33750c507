"""DynamicInverse: the M-FAC sliding window (add / remove / replace / push / push_apply)."""

from __future__ import annotations

import numbers

import numpy as np

from . import _backend, _checks, _coef, _passes
from ._blocks import Layout
from ._dense import DenseGroup
from ._operator import InverseOperator
from ._woodbury import WoodburyGroup

STATE_FORMAT = "rank1inv.DynamicInverse/1"


def _inverse_scale(scale_mode, capacity: int, count: int) -> float:
    """n = 1/s, M-FAC's m in M = λ⁻¹GGᵀ + n·I."""
    if scale_mode is None:
        return float(capacity)
    if scale_mode == "count":
        return float(max(count, 1))
    return 1.0 / scale_mode


class DynamicInverse(InverseOperator):
    """F⁻¹ for F = λI + s·Σ gᵢgᵢᵀ over a window of at most ``capacity`` gradients.

    Parameters
    ----------
    dim : int
        d, the length of each gradient.
    capacity : int
        The number of slots (M-FAC's m). G is preallocated as (capacity, dim) zeros.
    damp : float > 0
        λ.
    scale : None, "count" or float > 0
        s. None: 1/capacity (M-FAC: the window starts as zeros); "count": 1/len(window) at
        every moment (every add/remove then recomputes all coefficients); a float as given.
    dtype : "float32" (default) or "float64"
        Storage dtype of the window.
    xp : None (NumPy), numpy or cupy
        The array library holding the window.
    accumulate : "float64" (default) or "native"
        As in StaticInverse.

    State: G (capacity×dim, ``dtype``), and in float64 the Gram matrix GGᵀ, D and B
    (``rank1inv._coef``), in slot order. A new or replaced gradient costs one pass over G for
    its Gram row (recomputed from stored data, never downdated) plus O((capacity − k)·capacity²)
    to refresh D and B from its slot k on. When dim ≤ capacity, queries use the dim×dim matrix
    F instead (rebuilt on the first query after a change, O(dim²·capacity)), since the
    gradient-space form loses accuracy there.

    Every mutating call either succeeds or raises and leaves the window bit-for-bit unchanged.
    """

    def __init__(self, dim, capacity, damp, *, scale=None, dtype="float32", xp=None, accumulate="float64"):
        self._dim = _checks.positive_int(dim, "dim")
        self._capacity = _checks.positive_int(capacity, "capacity")
        self._damp = _checks.damp(damp)
        self._scale_mode = _checks.scale(scale)
        self._dtype = _checks.float_dtype(dtype)
        self._accumulate = _checks.accumulate(accumulate)
        self._xp = xp = _backend.namespace_from_argument(xp)
        self._layout = Layout(self._dim)
        cap = self._capacity
        self._G = xp.zeros((cap, self._dim), dtype=getattr(xp, self._dtype))
        dev = _backend.device(self._G)
        self._ages = np.full(cap, -1, dtype=np.int64)  # host bookkeeping: -1 = empty slot
        self._counter = 0
        self._gram = xp.zeros((cap, cap), dtype=xp.float64, device=dev)
        self._D, self._B = _coef.coefficients(xp, self._gram, self._damp, self._n(0))
        self._group = None

    # -- sizes and scale ----------------------------------------------------------------
    def __len__(self) -> int:
        return int(np.count_nonzero(self._ages >= 0))

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return self._capacity

    @property
    def scale(self) -> float:
        """s in F = λI + s·GᵀG right now."""
        return 1.0 / self._n(len(self))

    def _n(self, count: int) -> float:
        return _inverse_scale(self._scale_mode, self._capacity, count)

    @property
    def _uses_dense(self) -> bool:
        return self._dim <= self._capacity

    def _width(self) -> int:
        return self._capacity

    def _anchor(self):
        return self._G

    # -- queries --------------------------------------------------------------------------
    def _groups(self):
        if self._group is None:
            xp = self._xp
            Gg = self._G[None, ...]
            s = self.scale
            if self._uses_dense:
                self._group = DenseGroup(xp, Gg, self._damp, s, self._accumulate)
            else:
                factor = _coef.MfacFactor(xp, self._D, self._B, 1.0 / s, self._damp, gram=self._gram)
                self._group = WoodburyGroup(
                    xp, Gg, self._damp, s, self._accumulate, factor=factor, gram=self._gram[None]
                )
        return [self._group]

    def gradients(self):
        """The stored gradients, oldest first: a new (len, dim) array of ``dtype``."""
        order = self.slots()
        xp = self._xp
        if not order:
            return xp.zeros((0, self._dim), dtype=self._G.dtype)
        return xp.take(self._G, xp.asarray(np.array(order), device=_backend.device(self._G)), axis=0)

    def slots(self) -> list[int]:
        """Occupied slots, oldest first."""
        occ = np.flatnonzero(self._ages >= 0)
        return [int(i) for i in occ[np.argsort(self._ages[occ], kind="stable")]]

    def _free_slot(self) -> int | None:
        """The lowest empty slot, or None when the window is full."""
        free = np.flatnonzero(self._ages < 0)
        return int(free[0]) if free.size else None

    # -- updates ----------------------------------------------------------------------------
    def add(self, g) -> int:
        """Store g in a free slot and return the slot. ValueError when the window is full.
        Cost: one pass over G (O(d·capacity)) plus the coefficient refresh from that slot."""
        g_s = self._gradient(g)
        slot = self._free_slot()
        if slot is None:
            raise ValueError(f"the window is full ({self._capacity} gradients); use push() or remove() first")
        self._update(slot, g_s, self._counter)
        return slot

    def remove(self, slot) -> None:
        """Empty an occupied slot. Cost O(capacity²) plus the coefficient refresh."""
        slot = self._occupied(slot)
        self._update(slot, None, -1)

    def replace(self, slot, g) -> None:
        """Overwrite the gradient in an occupied slot; the slot keeps its age."""
        slot = self._occupied(slot)
        g_s = self._gradient(g)
        self._update(slot, g_s, int(self._ages[slot]))

    def push(self, g) -> int:
        """Add g, evicting the oldest gradient when full (the M-FAC step); returns its slot."""
        return self._push(self._gradient(g))

    def push_apply(self, g):
        """Push g, then return F⁻¹g for the new window: shape (dim,), dtype of g promoted with
        ``dtype``. Two passes over G in all (the Gram row, then Gᵀc) plus O(capacity²); five
        instead of the second when g is (nearly) a combination of other stored gradients and
        the coefficients cancel (an O(capacity³) eigendecomposition too).

        g lies in the window, so F⁻¹g = (1/s)·Gᵀ K⁻¹ e_slot exactly (K = GGᵀ + (λ/s)I); this
        avoids the cancellation of λ⁻¹(g − Gᵀc) for small λ. The result is for g rounded to
        the storage dtype, as stored.
        """
        g_s = self._gradient(g)
        out_dtype = self._xp.result_type(getattr(g, "dtype", self._xp.float64), self._G.dtype)
        slot = self._push(g_s)
        xp = self._xp
        grp = self._groups()[0]
        g64 = xp.astype(g_s, xp.float64)[None, :, None]
        if self._uses_dense:
            y = grp.apply(g64)
        else:
            e = xp.zeros((1, self._capacity, 1), dtype=xp.float64, device=_backend.device(self._G))
            e[0, slot, 0] = 1.0
            y = grp.apply_to_gradients(e, g64, self._gram[None, :, slot : slot + 1])
        return xp.astype(y[0, :, 0], out_dtype)

    def _push(self, g_s) -> int:
        slot = self._free_slot()
        if slot is None:  # full: the oldest gradient makes way
            slot = self.slots()[0]
        self._update(slot, g_s, self._counter)
        return slot

    # -- internals ----------------------------------------------------------------------------
    def _gradient(self, g):
        """Validate g and return it rounded to the storage dtype (a new array). One scalar
        read-back (max |g|) covers the non-finite and the overflow checks."""
        if not _backend.is_cupy(self._xp):
            g = _checks.as_array(g, "g")
        elif not _backend.is_array(g):
            raise TypeError(f"g must be a CuPy array for this window, not {type(g).__name__}")
        xp = _checks.same_backend(self._xp, g, "g", "this window")
        if g.ndim != 1 or g.shape[0] != self._dim:
            raise ValueError(f"g must have shape ({self._dim},), got {tuple(g.shape)}")
        _checks.float_kind(g, "g")
        top = float(xp.max(xp.abs(g))) if g.shape[0] else 0.0
        if not np.isfinite(top):
            raise ValueError("g contains non-finite values (nan or inf)")
        if top > float(xp.finfo(self._G.dtype).max):
            raise ValueError(f"g overflows the window dtype {self._dtype}")
        return xp.astype(g, self._G.dtype, copy=True)

    def _occupied(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral):
            raise TypeError(f"slot must be an int, not {type(slot).__name__}")
        slot = int(slot)
        if not 0 <= slot < self._capacity:
            raise IndexError(f"slot {slot} out of range [0, {self._capacity})")
        if self._ages[slot] < 0:
            raise IndexError(f"slot {slot} is empty")
        return slot

    def _update(self, slot: int, g_s, age: int) -> None:
        """Stage every new value, then commit; nothing is changed if staging raises."""
        xp = self._xp
        cap = self._capacity
        if g_s is None:
            row = xp.zeros((cap,), dtype=xp.float64, device=_backend.device(self._G))
        else:
            g64 = xp.astype(g_s, xp.float64)
            row = _passes.project(xp, self._G[None, ...], g64[None, :, None], self._accumulate)
            row = xp.asarray(row[0, :, 0], copy=True)
            row[slot] = xp.sum(g64 * g64)  # the slot's old row is still in G
        gram = xp.asarray(self._gram, copy=True)
        gram[slot, :] = row
        gram[:, slot] = row
        ages = self._ages.copy()
        ages[slot] = age
        count = int(np.count_nonzero(ages >= 0))
        n_old, n_new = self._n(len(self)), self._n(count)
        start = slot if n_new == n_old else 0
        try:
            D, B = _coef.coefficients(xp, gram, self._damp, n_new, start, (self._D, self._B))
        except ValueError as err:
            raise ValueError(f"this gradient cannot be stored: {err}") from err
        ok = xp.all(xp.isfinite(row)) & xp.all(xp.isfinite(D)) & xp.all(xp.isfinite(B))
        if not bool(ok):  # one scalar read-back for all three
            raise ValueError("g is too large: its inner products or the coefficients overflow float64")
        # commit
        if g_s is None:
            self._G[slot, :] = 0
        else:
            self._G[slot, :] = g_s
        self._gram, self._D, self._B, self._ages = gram, D, B, ages
        if age >= self._counter:
            self._counter = age + 1
        self._group = None

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain numbers and host NumPy arrays: the whole window, enough to resume bit-for-bit."""
        h = _backend.to_host
        return {
            "format": STATE_FORMAT,
            "dim": self._dim,
            "capacity": self._capacity,
            "damp": self._damp,
            "scale": self._scale_mode,
            "dtype": self._dtype,
            "accumulate": self._accumulate,
            "gradients": np.array(h(self._G), copy=True),
            "ages": self._ages.copy(),
            "counter": self._counter,
            "gram": np.array(h(self._gram), copy=True),
            "D": np.array(h(self._D), copy=True),
            "B": np.array(h(self._B), copy=True),
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``. dim, capacity and dtype must match this window; damp, scale
        and accumulate are taken from the state. Every field is validated: the stored Gram against
        a recomputation from the gradients (O(d·capacity²)), D and B by their residuals
        (O(capacity³)); a malformed state raises ValueError/TypeError and leaves the window
        unchanged."""
        if not isinstance(state, dict):
            raise TypeError("state must be a dict from state_dict()")
        need = {
            "format",
            "dim",
            "capacity",
            "damp",
            "scale",
            "dtype",
            "accumulate",
            "gradients",
            "ages",
            "counter",
            "gram",
            "D",
            "B",
        }
        missing = need - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"unknown state format {state['format']!r}")
        if (state["dim"], state["capacity"], state["dtype"]) != (self._dim, self._capacity, self._dtype):
            raise ValueError(
                f"state is for dim={state['dim']}, capacity={state['capacity']}, dtype={state['dtype']}; "
                f"this window has dim={self._dim}, capacity={self._capacity}, dtype={self._dtype}"
            )
        damp = _checks.damp(state["damp"])
        scale_mode = _checks.scale(state["scale"])
        accumulate = _checks.accumulate(state["accumulate"])
        xp = self._xp
        cap, dim = self._capacity, self._dim

        def array(name, shape, dtype):
            a = state[name]
            a = _backend.to_host(a) if _backend.is_array(a) else np.asarray(a)
            if tuple(a.shape) != shape or a.dtype != np.dtype(dtype):
                raise ValueError(f"state[{name!r}] must be {dtype} of shape {shape}, got {a.dtype} {tuple(a.shape)}")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise ValueError(f"state[{name!r}] contains non-finite values")
            return a

        G = array("gradients", (cap, dim), self._dtype)
        ages = array("ages", (cap,), "int64")
        gram, D, B = (array(k, (cap, cap), "float64") for k in ("gram", "D", "B"))
        counter = state["counter"]
        occ = ages[ages >= 0]
        if np.any(ages < -1) or len(np.unique(occ)) != len(occ):
            raise ValueError("state['ages'] must hold distinct ages >= 0 for occupied slots and -1 for empty ones")
        if not isinstance(counter, numbers.Integral) or (len(occ) and counter <= occ.max()) or counter < 0:
            raise ValueError("state['counter'] must be an int larger than every age")
        if np.any(G[ages < 0] != 0):
            raise ValueError("state['gradients'] has non-zero rows in empty slots")

        G_dev = xp.asarray(G, copy=True)
        n = _inverse_scale(scale_mode, cap, len(occ))
        fresh = _backend.to_host(_passes.gram(xp, G_dev[None, ...], accumulate)[0, ...])
        # the stored rows were accumulated in another order: equal to rounding, |Δ| ≪ ‖g_i‖‖g_j‖
        norms = np.sqrt(np.diagonal(fresh))
        if np.any(np.abs(gram - fresh) > 1e-8 * np.outer(norms, norms)):
            raise ValueError("state['gram'] is inconsistent with state['gradients']")
        _coef.check(_backend.namespace(gram), gram, D, B, damp, n)
        # commit
        self._damp, self._scale_mode, self._accumulate = damp, scale_mode, accumulate
        self._G = G_dev
        self._ages, self._counter = ages.copy(), int(counter)
        self._gram, self._D, self._B = (xp.asarray(a, copy=True) for a in (gram, D, B))
        self._group = None

    def __repr__(self) -> str:
        return (
            f"DynamicInverse(dim={self._dim}, capacity={self._capacity}, len={len(self)}, dtype={self._dtype}, "
            f"damp={self._damp:g}, scale={self.scale:g})"
        )
