"""DynamicInverse: the M-FAC sliding window (add / remove / replace / push / push_apply /
push_many), with O(dm + m²) updates (docs/design.md §6)."""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Any, cast

import numpy as np

from . import _backend, _checks, _passes, _precision, _scaling, _window_state
from ._blocks import Layout
from ._operator import InverseOperator, Variants, may_overflow
from ._protocols import GradientSpaceGroup, Group
from .groups import window as _window
from .groups.dense import DenseGroup
from .groups.woodbury import WoodburyGroup
from .static import StaticInverse


def _inverse_scale(scale_mode, capacity: int, count: int) -> float:
    """n = 1/s, M-FAC's m in M = λ⁻¹GGᵀ + n·I."""
    if scale_mode is None:
        return float(capacity)
    if scale_mode == "count":
        return float(max(count, 1))
    return 1.0 / scale_mode


class _Staged:
    """The new values of one update, computed before anything is committed (``_commit``)."""

    __slots__ = ("G_rows", "gram", "gram_rows", "step_rows", "ages", "counter", "R", "column", "frames",
                 "slot_exp", "dense", "steps", "rescaled")  # fmt: skip
    G_rows: Any
    gram: Any
    gram_rows: Any
    step_rows: Any
    ages: Any
    counter: Any
    R: Any
    column: Any
    frames: Any
    slot_exp: Any
    dense: Any
    steps: Any
    rescaled: Any

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


class DynamicInverse(Variants, InverseOperator):
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
        every moment (so an add or remove that changes the count refactors the m×m system,
        O(m³)); a float as given.
    dtype : "float32" (default), "float64", "bfloat16" or "float16"
        Storage dtype of the window (2 bytes per value for the 16-bit ones); query results are
        float64 for float64 storage and float32 otherwise.
    xp : None (NumPy), numpy or cupy
        The array library holding the window.
    accumulate : "float64" (default) or "native"
        As in StaticInverse.

    State: G (capacity×dim, ``dtype``) in slot order; in float64, the Gram matrix of the window
    (capacity², slot order) and the upper Cholesky factor R of its damped m×m system in age
    order (oldest first), plus one spare capacity² buffer for updates: 24·capacity² bytes of
    m×m state (1.5 GiB at capacity 8192). Costs per call (m = capacity, d = dim):

    - push, push_apply, add: one pass over G for the new Gram row, O(dm), plus O(m²): the
      oldest gradient's row and column leave the factor by a rank-one update, the new one
      enters by a triangular solve;
    - remove: O(m²); replace(slot) of the k-th oldest: O(dm + k² + m·(m − k)²), the factor is
      recomputed from that position;
    - every ``capacity`` such updates the next one refactors from the stored Gram matrix
      (O(m³), amortised O(m²) per step), which bounds the rounding any entry accumulates;
    - queries: products O(dm + m²) per vector, D and B (``coefficients``) O(m³) when asked.

    When dim ≤ capacity queries use the dim×dim matrix F (gradient space loses accuracy there),
    refactored at every update (O(dim²·capacity)).

    Every mutating call either succeeds or raises and leaves the window bit-for-bit unchanged.
    """

    _variants = []  # ShardedWindow (comm=...): ``_operator.Variants``

    def __init__(self, dim, capacity, damp, *, scale=None, dtype="float32", xp=None, accumulate="float64",
                 comm=None):  # fmt: skip
        if comm is not None:  # pragma: no cover - Variants makes a sharded.ShardedWindow for a comm
            raise TypeError("a communicator makes the sharded window (rank1inv.sharded.ShardedWindow)")
        self._lock = threading.RLock()  # every public call holds it (docs/guide.md, "Threads")
        self._dim = _checks.positive_int(dim, "dim")
        self._capacity = _checks.positive_int(capacity, "capacity")
        self._damp = _checks.damp(damp)
        self._scale_mode = _checks.scale(scale)
        self._storage = _checks.float_dtype(dtype)
        self._policy = _precision.of(self._storage)
        self._dtype = self._policy.output
        self._accumulate = _checks.accumulate(accumulate)
        self._xp = xp = _backend.namespace_from_argument(xp)
        self._layout = Layout(self._dim)
        cap = self._capacity
        self._G = xp.zeros((cap, self._dim), dtype=self._array_dtype())
        dev = _backend.device(self._G)
        self._ages = np.full(cap, -1, dtype=np.int64)  # host bookkeeping: -1 = empty slot
        self._slot_exp = np.zeros(cap, dtype=np.int64)  # exponent of max|g| per occupied slot
        self._counter = 0
        self._frames = self._slot_frames(self._slot_exp, self._ages)  # E_i per slot (docs/design.md §4)
        self._gram = xp.zeros((cap, cap), dtype=xp.float64, device=dev)  # frame Gram, slot order
        self._R = xp.eye(cap, dtype=xp.float64, device=dev)  # factor, age order, padded
        self._spare = xp.empty((cap, cap), dtype=xp.float64, device=dev)
        self._steps = 0  # factor updates since the last refactorization
        self._dense = self._stage_dense(_Staged(G_rows={}, ages=self._ages, slot_exp=self._slot_exp))
        self._group = None
        self._coef = None

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

    @property
    def storage_dtype(self) -> str:
        """The dtype the window stores gradients in ("float32", "float64", "bfloat16", "float16")."""
        return self._storage

    def _n(self, count: int) -> float:
        return _inverse_scale(self._scale_mode, self._capacity, count)

    def _array_dtype(self):
        return _precision.storage_dtype(self._xp, self._storage, _backend.is_cupy(self._xp))

    @property
    def _uses_dense(self) -> bool:
        return self._total_dim() <= self._capacity

    def _total_dim(self) -> int:
        """d over all shards (this window's dim on one process)."""
        return self._dim

    def _view(self, Gg):
        """The group array the passes reduce: Gg itself, or its ShardedView (``sharded``), through
        which every cross-rank reduction of the window goes (docs/design.md §12)."""
        return Gg

    def _width(self) -> int:
        return self._capacity

    def _gradient_count(self) -> int:
        return len(self)

    def _anchor(self):
        return self._G

    def _mu(self, count: int, frames) -> np.ndarray:
        """μ'_i = σ_i²λ/s per slot for the window size ``count`` (host float64 (cap,))."""
        return _scaling.row_damping(self._damp, 1.0 / self._n(count), frames)

    def _log_pad(self, count: int, frames, ages) -> float:
        """Σ log μ'_i over the empty slots (the padding of the window's factor)."""
        empty = frames[ages < 0]
        base = math.log(self._damp) + math.log(self._n(count))
        return float(empty.size * base - 2.0 * math.log(2.0) * float(empty.sum()))

    def _slot_frames(self, slot_exp, ages) -> np.ndarray:
        """The frame E_i of every slot (docs/design.md §4, ``_scaling.frames_from_exponents``
        over the occupied slots; empty slots count as zero gradients), for the smallest s the
        window can have (its largest damping term): one shared frame while the gradients'
        magnitudes fit one, one per slot beyond (host int64 (cap,))."""
        e = np.where(ages >= 0, slot_exp, _scaling.NO_ROW)
        s_min = 1.0 / self._n(self._capacity)
        return _scaling.frames_from_exponents(e, self._damp, s_min, self._policy.exact_products)

    def _dense_frame(self, slot_exp, ages) -> int:
        """The one frame E of the dense path (dim ≤ capacity, docs/design.md §4)."""
        occupied = slot_exp[ages >= 0]
        top = math.ldexp(1.0, int(occupied.max())) if occupied.size else 0.0
        s_min = 1.0 / self._n(self._capacity)
        return _scaling.frame_exponent(top, self._damp, s_min, self._policy.exact_products)

    # -- queries --------------------------------------------------------------------------
    def _order(self):
        return _window.host_order(self._ages)

    def _groups(self) -> list[Group]:
        if self._group is None:
            xp = self._xp
            if self._uses_dense:
                self._group = self._dense
            else:
                n = len(self)
                order = xp.asarray(self._order(), device=_backend.device(self._G))
                factor = _window.WindowFactor(xp, self._R, order, self._log_pad(n, self._frames, self._ages))
                f = self._frames
                frame = int(f[0]) if f[0] == f[-1] and np.all(f == f[0]) else f[None, :]
                top = np.where(self._ages >= 0, _scaling.pow2_array(self._slot_exp), 0.0)  # max|g| to a factor 2
                self._group = WoodburyGroup(
                    xp, self._view(self._G[None, ...]), self._damp, self.scale, self._accumulate,
                    frame=frame, factor=factor, gram=self._gram[None, ...], row_max=top[None, :],
                    exact_products=self._policy.exact_products,
                )  # fmt: skip
        return [self._group]

    @_backend.on_device
    def gradients(self):
        """The stored gradients, oldest first: a new (len, dim) array in the storage dtype."""
        order = self._order()
        xp = self._xp
        if not order.size:
            return xp.zeros((0, self._dim), dtype=self._G.dtype)
        return xp.take(self._G, xp.asarray(order, device=_backend.device(self._G)), axis=0)

    def slots(self) -> list[int]:
        """Occupied slots, oldest first."""
        return [int(i) for i in self._order()]

    @_backend.on_device
    def coefficients(self):
        """M-FAC's (D, B) for the window in age order (oldest first), each (len, len) float64:
        D upper triangular, B lower triangular with diagonal 1/λ (M-FAC eq. 8–10, with n = 1/s).
        Derived from the factor when asked, O(m²) for D and O(m³) for B (the blocked CUDA kernel
        on CuPy), and cached until the next change."""
        if self._coef is None:
            n = len(self)
            frames = self._frames[self._order()]
            self._coef = _window.mfac_coefficients(self._xp, self._R, n, self._damp, self._n(n), frames)
        return self._coef

    @_backend.on_device
    def with_damp(self, damp):
        """A StaticInverse of the window as it is now (oldest first) with damping λ' and this
        window's scale: O(d·len) to copy the gradients plus O(len³), the window's Gram matrix
        reused (no pass over G for it). The window itself is unchanged and can keep moving."""
        lam = _checks.damp(damp)
        n = len(self)
        if n == 0:
            raise ValueError("the window is empty: there is no StaticInverse of zero gradients")
        G = self.gradients()
        if self._uses_dense or self._dim <= n:
            return StaticInverse(G, lam, scale=self.scale, accumulate=self._accumulate)
        host = self._order()
        order = self._xp.asarray(host, device=_backend.device(self._G))
        gram = self._xp.take(self._xp.take(self._gram, order, axis=0), order, axis=1)
        return StaticInverse(G, lam, scale=self.scale, accumulate=self._accumulate,
                             _gram=(gram, self._frames[host]))  # fmt: skip

    # -- updates ----------------------------------------------------------------------------
    @_backend.on_device
    def add(self, g) -> int:
        """Store g in a free slot and return the slot. ValueError when the window is full.
        Cost: one pass over G (O(d·capacity)) plus O(capacity²)."""
        g_s, e, _ = self._gradient(g, what="add")
        slot = self._free_slot()
        if slot is None:
            raise ValueError(f"the window is full ({self._capacity} gradients); use push() or remove() first")
        self._commit(self._stage_pushes([(slot, g_s, e)]))
        return slot

    @_backend.on_device
    def push(self, g) -> int:
        """Add g, evicting the oldest gradient when full (the M-FAC step); returns its slot.
        Cost: one pass over G plus O(capacity²)."""
        g_s, e, _ = self._gradient(g)
        slot = self._next_slot(self._ages)
        self._commit(self._stage_pushes([(slot, g_s, e)]))
        return slot

    @_backend.on_device
    def push_many(self, G_new) -> list[int]:
        """Push the k rows of G_new (k, dim) in order, as k calls of ``push`` would (the same
        window to rounding), and return their slots. One pass over the window for all k Gram
        rows (O(d·capacity·k); up to 8 rows per pass of the compiled CPU kernel, BLAS-3 tiles
        beyond) plus O(capacity²·k), or one O(capacity³) refactorization when k ≥ capacity
        (the window is then the last capacity rows). Atomic: a rejected row leaves the window
        unchanged."""
        view = self._view(self._G[None, ...])
        with _passes.agreement(view, "push_many", "rows") as agreed:
            G_new = _checks.as_array(G_new, "G_new", self._xp)
            _checks.same_backend(self._xp, G_new, "G_new", "this window")
            if G_new.ndim != 2 or G_new.shape[1] != self._dim:
                raise ValueError(f"G_new must have shape (k, {self._dim}), got {tuple(G_new.shape)}")
            _checks.float_kind(G_new, "G_new", cupy=_backend.is_cupy(self._xp))
            agreed.set(rows=G_new.shape[0])
        local = [_passes.max_abs(self._xp, G_new[i, :]) for i in range(G_new.shape[0])]
        tops = _passes.max_over_ranks(view, local, None, "push_many")
        rows = [self._checked(G_new[i, :], float(top), f"G_new[{i}]") for i, top in enumerate(tops)]
        ages = self._ages.copy()
        items = []
        for t, (g_s, e, _) in enumerate(rows):
            slot = self._next_slot(ages)
            ages[slot] = self._counter + t
            items.append((slot, g_s, e))
        if items:
            self._commit(self._stage_pushes(items))
        return [slot for slot, _, _ in items]

    @_backend.on_device
    def remove(self, slot) -> None:
        """Empty an occupied slot. Cost O(capacity²) (O(capacity³) with scale="count")."""
        with _passes.agreement(self._view(self._G[None, ...]), "remove", "slot") as agreed:
            slot = self._occupied(slot)
            agreed.set(slot=slot)
        n = len(self)
        k = self._position(slot)
        ages = self._ages.copy()
        ages[slot] = -1
        slot_exp = self._slot_exp.copy()
        slot_exp[slot] = 0
        stage = _Staged(G_rows={slot: None}, gram=self._gram, gram_rows={slot: None}, ages=ages,
                        counter=self._counter, frames=self._slot_frames(slot_exp, ages), slot_exp=slot_exp)  # fmt: skip
        keep = ages >= 0
        self._rescaled(stage, keep)
        if stage.rescaled or self._n(n - 1) != self._n(n):
            self._stage_factorization(stage)
        elif not (self._refresh_due(1) and self._try_factorization(stage)):
            _window.drop(self._xp, self._R, self._spare, n, k)
            stage.R, stage.steps = self._spare, (self._steps + 1) % self._capacity
        stage.dense = self._stage_dense(stage)
        self._commit(stage)

    @_backend.on_device
    def replace(self, slot, g) -> None:
        """Overwrite the gradient in an occupied slot; the slot keeps its age. Cost: one pass over
        G plus O(k² + capacity·(capacity − k)²) for the k-th oldest (O(capacity²) for the
        newest, O(capacity³) for the oldest)."""
        g_s, e, _ = self._gradient(g, what="replace", slot=slot)
        slot = int(slot)
        stage = self._stage_rows([(slot, g_s, e)], self._ages.copy())
        if stage.rescaled:
            self._stage_factorization(stage)
        elif not (self._refresh_due(1) and self._try_factorization(stage)):
            R = self._spare
            R[...] = self._R
            try:
                _window.refresh_from(self._xp, R, self._K_age(stage), self._position(slot))
            except ValueError as err:
                raise ValueError(f"this gradient cannot be stored: {err}") from err
            stage.R, stage.steps = R, (self._steps + 1) % self._capacity
        stage.dense = self._stage_dense(stage)
        self._commit(stage)

    def push_apply(self, g):
        """Push g, then return F⁻¹g for the new window: shape (dim,), dtype of g promoted with the
        result dtype. Two passes over G in all (the Gram row, then Gᵀc) plus O(capacity²); five
        instead of the second when g is (nearly) a combination of other stored gradients and
        the coefficients cancel (an O(capacity³) eigendecomposition too).

        g lies in the window, so F⁻¹g = (1/s)·Gᵀ K⁻¹ e_slot exactly (K = GGᵀ + (λ/s)I); this
        avoids the cancellation of λ⁻¹(g − Gᵀc) for small λ. The result is for g rounded to
        the storage dtype, as stored. Atomic: if the push or the result fails (e.g. an
        OverflowError because F⁻¹g does not fit its dtype), the window is as it was.
        """
        return push_apply_all([self], [g])[0]

    @_backend.on_device
    def _prepare_push(self, g):
        """Validate and stage a push of g: (stage, slot, g_s, output dtype, max|g|). Writes nothing."""
        g_s, e, top = self._gradient(g, what="push_apply")
        kind = _precision.name_of(getattr(g, "dtype", None)) if _backend.is_array(g) else "float64"
        xp = self._xp
        out_dtype = xp.float64 if (kind == "float64" or self._dtype == "float64") else self.dtype
        slot = self._next_slot(self._ages)
        return self._stage_pushes([(slot, g_s, e)]), slot, g_s, out_dtype, top

    @_backend.on_device
    def _apply_to_stored(self, slot: int, g_s, out_dtype, top: float):
        """F⁻¹g for the gradient g_s stored in ``slot`` (push_apply's second half; ``top`` is
        max|g| over all ranks). The one-pass form needs no float64 copy of g; the corrected form
        builds it on demand."""
        xp = self._xp
        grp = self._groups()[0]
        e_x = _scaling.exponent(top)

        def normalized():
            g64 = xp.empty((1, self._dim, 1), dtype=xp.float64, device=_backend.device(self._G))
            _backend.decode_into(xp, g64[0, :, 0], g_s)
            return _backend.ldexp(xp, g64, -e_x, out=g64)

        if self._uses_dense:
            y, exponent = grp.apply(normalized()), e_x + grp.inverse_exponent
        else:
            E = xp.zeros((1, self._capacity, 1), dtype=xp.float64, device=_backend.device(self._G))
            E[0, slot, 0] = 1.0
            # G'x̂ = D·G·g·2^-e = (the new Gram row, D·G·g·σ_slot)·2^(E_slot − e)
            E_slot = int(self._frames[slot])
            P = _backend.ldexp(xp, self._gram[None, :, slot : slot + 1], E_slot - e_x)
            woodbury = cast(GradientSpaceGroup, grp)  # a window wider than it is long
            y, exponent = woodbury.apply_to_gradients(E, normalized, P, e_x, row_frame=E_slot)
        y = _backend.ldexp(xp, y[0, :, 0], exponent, out=y[0, :, 0])
        view = self._view(self._G[None, ...])
        if _passes.communicator(view) is None or not may_overflow(top, self._total_dim(), self._damp, out_dtype):
            return _backend.cast_result(xp, y, out_dtype, "F⁻¹g")
        with _passes.agreement(view, "push_apply"):  # a slice may overflow where another does not
            return _backend.cast_result(xp, y, out_dtype, "F⁻¹g")

    # -- internals: validation ----------------------------------------------------------------
    def _gradient(self, g, name: str = "g", what: str = "push", slot=None):
        """Validate g (and an occupied ``slot`` for ``replace``) and return (g rounded to the
        storage dtype (a new array), exponent of max|g| in storage, max|g|). One reduction of
        max|g| (over all ranks, carrying their agreement, docs/design.md §12) covers the
        non-finite and the overflow checks."""
        xp = self._xp
        err, top = None, 0.0
        checks: dict[str, Any] = {}
        try:
            if slot is not None:
                checks["slot"] = self._occupied(slot)
            g = _checks.as_array(g, name, xp)
            _checks.same_backend(xp, g, name, "this window")
            if g.ndim != 1 or g.shape[0] != self._dim:
                raise ValueError(f"{name} must have shape ({self._dim},), got {tuple(g.shape)}")
            _checks.float_kind(g, name, cupy=_backend.is_cupy(xp))  # CuPy uint16: bfloat16 bits
            top = _passes.max_abs(xp, g)
        except (TypeError, ValueError, IndexError) as exc:
            err = exc
            checks = {"slot": 0} if slot is not None else {}
        view = self._view(self._G[None, ...])
        top = float(_passes.max_over_ranks(view, [top], err, what, **checks)[0])
        return self._checked(g, top, name)

    def _checked(self, g, top: float, name: str):
        """(g rounded to storage, exponent, max|g|) after the checks that need max|g| over all
        ranks (the same verdict on every rank)."""
        if not math.isfinite(top):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
        if top > self._policy.max_value:
            raise ValueError(f"{name} overflows the window dtype {self._storage} (max |{name}| = {top:.3g})")
        # the exponent of max|g| before rounding to storage may be one too small: the frame it
        # chooses only needs to be right within docs/design.md §4's margin
        e = _scaling.exponent(top) if top > 0 else _scaling.NO_ROW
        return _backend.encode(self._xp, g, self._storage), e, top

    def _occupied(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral):
            raise TypeError(f"slot must be an int, not {type(slot).__name__}")
        slot = int(slot)
        if not 0 <= slot < self._capacity:
            raise IndexError(f"slot {slot} out of range [0, {self._capacity})")
        if self._ages[slot] < 0:
            raise IndexError(f"slot {slot} is empty")
        return slot

    def _free_slot(self) -> int | None:
        """The lowest empty slot, or None when the window is full."""
        free = np.flatnonzero(self._ages < 0)
        return int(free[0]) if free.size else None

    def _next_slot(self, ages) -> int:
        """The slot a push takes: the lowest empty one, else the oldest's."""
        free = np.flatnonzero(ages < 0)
        if free.size:
            return int(free[0])
        return int(np.argmin(ages))

    def _position(self, slot: int) -> int:
        """Age position of an occupied slot (0 = oldest)."""
        return int(np.flatnonzero(self._order() == slot)[0])

    def _refresh_due(self, steps: int) -> bool:
        """Whether ``steps`` more factor updates reach the refresh interval (``capacity``)."""
        return self._steps + steps >= self._capacity

    # -- internals: staging -------------------------------------------------------------------
    def _stage_rows(self, items, ages):
        """Frame and Gram rows for new gradients items = [(slot, g_s, exponent)] written into
        their slots in order (a later item may take an earlier one's slot): one pass over the
        window for all of them (before anything is written), plus their own k×k Gram matrix.

        ``step_rows[t]`` is item t's row against the slots as they are when it is written (for
        the factor); ``gram_rows`` the final row of every slot that ends up with a new gradient.
        """
        xp = self._xp
        slot_exp = self._slot_exp.copy()
        final_ages = ages.copy()
        for slot, _, e in items:
            slot_exp[slot] = e
            final_ages[slot] = max(final_ages[slot], 0)
        frames = self._slot_frames(slot_exp, final_ages)
        stage = _Staged(gram=self._gram, frames=frames)
        keep = np.ones(self._capacity, dtype=bool)
        keep[[slot for slot, _, _ in items]] = False
        self._rescaled(stage, keep)  # the shared frame moved: the others' Gram entries follow
        gram = stage.gram
        k = len(items)
        X = xp.empty((1, self._dim, k), dtype=xp.float64, device=_backend.device(self._G))
        for t, (slot, g_s, _) in enumerate(items):
            _backend.decode_into(xp, X[0, :, t], g_s)
            if frames[slot]:
                X[0, :, t] *= _scaling.pow2(-int(frames[slot]))  # σ_t·g: exact, in place
        # slots past the last occupied one hold zero rows: the pass skips them (a filling window
        # reads n rows, not capacity)
        occupied = np.flatnonzero(self._ages >= 0)
        hi = int(occupied[-1]) + 1 if occupied.size else 0
        cross = xp.zeros((self._capacity, k), dtype=xp.float64, device=_backend.device(self._G))
        sigma = self._row_scale(frames[:hi])
        # the rows against the stored gradients and their own Gram matrix: one reduction over d
        P, inner = _passes.project_gram(xp, self._view(self._G[None, :hi, :]), X, self._accumulate, sigma)
        cross[:hi, :] = P[0, ...]
        inner = inner[0, ...]  # (k, k)
        holder, step_rows = {}, []  # holder: slot -> batch item stored there now
        for t, (slot, _, _) in enumerate(items):
            row = xp.asarray(cross[:, t], copy=True)
            for other, t_other in holder.items():
                row[other] = inner[t_other, t]
            holder[slot] = t
            row[slot] = inner[t, t]
            step_rows.append(row)
        gram_rows = {}
        for slot, t in holder.items():
            row = xp.asarray(cross[:, t], copy=True)
            for other, t_other in holder.items():
                row[other] = inner[t_other, t]
            gram_rows[slot] = row
        return _Staged(G_rows={slot: g_s for slot, g_s, _ in items}, gram=gram, gram_rows=gram_rows,
                       step_rows=step_rows, ages=ages, counter=self._counter, frames=frames,
                       slot_exp=slot_exp, steps=self._steps, rescaled=stage.rescaled)  # fmt: skip

    def _rescaled(self, stage, keep) -> None:
        """When the staged frames of slots ``keep`` (a host bool mask) differ from the current
        ones, the staged Gram matrix becomes a rescaled copy (exact: powers of two, elementwise,
        so no overflowing scale factor) and ``stage.rescaled`` asks for a new factor."""
        stage.rescaled = bool(np.any(stage.frames[keep] != self._frames[keep]))
        if stage.rescaled:
            k = _scaling.rescale_exponents(self._frames, stage.frames)
            stage.gram = _backend.ldexp(self._xp, stage.gram, self._xp.asarray(k, device=_backend.device(self._gram)))

    def _row_scale(self, frames):
        """The passes' frame for slots with ``frames``: a float if they share one, else σ_i (1, n)."""
        if frames.size == 0 or np.all(frames == frames[0]):
            return _scaling.pow2(-int(frames[0])) if frames.size else 1.0
        return self._xp.asarray(_scaling.pow2_array(-frames)[None, :], device=_backend.device(self._G))

    def _stage_pushes(self, items):
        """Stage pushes of items = [(slot, g_s, exponent)] in order (each slot empty or the
        oldest's): per item, the evicted gradient leaves the factor (``_window.drop``) and the
        new one enters last (``_window.new_column``), O(m²) each. The factor is recomputed
        instead when the frame or the count-dependent scale changes or when k ≥ capacity
        (required: a failure refuses the push), and when the refresh interval is reached
        (opportunistic: if that factorization fails, the updates are used)."""
        cap = self._capacity
        ages = self._ages.copy()
        stage = self._stage_rows(items, ages)
        order = list(self._order())
        steps = []  # per item: (age position of the evicted gradient or None, window size before)
        for slot, _, _ in items:
            k = None
            if ages[slot] >= 0:  # the oldest gradient makes way
                k = order.index(slot)
                order.pop(k)
            steps.append((k, len(order)))
            ages[slot] = stage.counter
            stage.counter += 1
            order.append(slot)
        n0, n_final = len(self), len(order)
        stage.ages = ages
        required = stage.rescaled or len(items) >= cap or self._n(n_final) != self._n(n0)
        refresh = not required and self._refresh_due(len(items))
        if required:
            self._stage_factorization(stage)
        elif not (refresh and self._try_factorization(stage)):
            self._stage_updates(stage, items, steps, n_final)
            if refresh:  # the refresh failed: try again after another capacity updates
                stage.steps = len(items)
        stage.dense = self._stage_dense(stage)
        return stage

    def _stage_updates(self, stage, items, steps, n_final) -> None:
        """The factor work of ``_stage_pushes`` by O(m²) updates (drop, then append, per item)."""
        xp = self._xp
        mu = self._mu(n_final, stage.frames)
        order = list(self._order())
        R = None  # the factor being updated: self._R until the first write, then the spare
        for t, ((slot, _, _), (k, n)) in enumerate(zip(items, steps)):
            row = stage.step_rows[t]
            solved = None
            if k is not None:
                order.pop(k)
            idx = xp.asarray(np.asarray(order, dtype=np.int64), device=_backend.device(row))
            a = xp.take(row, idx)  # the new gradient's K' row against the window in age order
            if k is not None:  # the drop also solves R̃ᵀr = a for the new column (one sweep)
                solved = _window.drop(xp, self._R if R is None else R, self._spare, n + 1, k, rhs=a)
                R = self._spare
            base = self._R if R is None else R
            try:
                r, rho = _window.new_column(xp, base, n, a, float(row[slot]) + float(mu[slot]), solved=solved)
            except ValueError as err:
                raise ValueError(f"this gradient cannot be stored: {err}") from err
            if R is None and len(items) == 1:
                stage.column = (n, r, rho)  # written into self._R by _commit: no copy
            else:
                if R is None:
                    self._spare[...] = self._R
                    R = self._spare
                _window.write_column(R, n, r, rho)
            order.append(slot)
        stage.R = R
        stage.steps = self._steps + len(items)

    def _try_factorization(self, stage) -> bool:
        """A refresh: the staged window's factor from scratch if that succeeds (True), else
        nothing (False: the window is beyond the conditioning where a fresh Cholesky factor
        exists, and the updated factor serves on)."""
        try:
            self._stage_factorization(stage)
        except ValueError:
            return False
        return True

    def _K_age(self, stage):
        """The staged window's K' (n×n, age order) from the stored Gram matrix and the staged
        rows. O(cap²)."""
        xp = self._xp
        order = _window.host_order(stage.ages)
        gram = self._merged_gram(stage)
        idx = xp.asarray(order, device=_backend.device(gram))
        K = xp.take(xp.take(gram, idx, axis=0), idx, axis=1)
        n = order.shape[0]
        mu = xp.asarray(self._mu(n, stage.frames)[order], device=_backend.device(gram))
        return K + mu[:, None] * xp.eye(n, dtype=xp.float64, device=_backend.device(gram))

    def _merged_gram(self, stage):
        """A copy of the staged frame Gram matrix with the staged rows written in. O(cap²)."""
        gram = stage.gram * 1.0
        _write_rows(gram, stage.gram_rows)
        return gram

    def _stage_factorization(self, stage) -> None:
        """The staged window's factor from scratch (O(m³)); ValueError if not positive definite."""
        try:
            stage.R = _window.factorize(self._xp, self._K_age(stage), self._capacity)
        except ValueError as err:
            raise ValueError(f"this gradient cannot be stored: {err}") from err
        stage.steps = 0

    def _stage_dense(self, stage):
        """For dim ≤ capacity: the dim×dim group of the staged window, so that a window whose F
        is not numerically positive definite is refused here, not at the next query."""
        if not self._uses_dense:
            return None
        xp = self._xp
        G = xp.asarray(self._G, copy=True)
        for slot, g_s in stage.G_rows.items():
            G[slot, :] = 0 if g_s is None else g_s
        n = int(np.count_nonzero(stage.ages >= 0))
        frame = self._dense_frame(stage.slot_exp, stage.ages)
        try:
            return DenseGroup(xp, G[None, ...], self._damp, 1.0 / self._n(n), self._accumulate, frame=frame)
        except ValueError as err:
            raise ValueError(f"this gradient cannot be stored: {err}") from err

    def _commit(self, stage):
        """Write a staged update (nothing here can fail); returns a function that restores the
        window as it was before, bit for bit (O(d + capacity) per written slot)."""
        before = dict(self.__dict__)
        old_G = {slot: self._xp.asarray(self._G[slot, :], copy=True) for slot in stage.G_rows}
        gram = stage.gram
        old_gram = {slot: self._xp.asarray(gram[slot, :], copy=True) for slot in stage.gram_rows}
        old_column = None
        for slot, g_s in stage.G_rows.items():
            self._G[slot, :] = 0 if g_s is None else g_s
        _write_rows(gram, stage.gram_rows)
        self._gram = gram
        if stage.column is not None:
            n = stage.column[0]
            old_column = (n, self._xp.asarray(self._R[: n + 1, n], copy=True))
            _window.write_column(self._R, *stage.column)
        elif stage.R is self._spare:
            self._R, self._spare = self._spare, self._R
        elif stage.R is not None:
            self._R = stage.R
        self._ages, self._counter = stage.ages, stage.counter
        self._slot_exp, self._frames, self._steps = stage.slot_exp, stage.frames, stage.steps
        self._dense = stage.dense
        self._group = None
        self._coef = None

        def undo():
            self.__dict__.update(before)
            for slot, row in old_G.items():
                self._G[slot, :] = row
            _write_rows(gram, old_gram)
            if old_column is not None:
                n, col = old_column
                self._R[: n + 1, n] = col

        return undo

    # -- state ----------------------------------------------------------------------------
    @_backend.on_device
    def state_dict(self, *, xp=None) -> dict:
        """The whole window as plain Python values and arrays, enough to resume bit for bit.

        Arrays are host NumPy arrays, or arrays of the namespace ``xp`` if given (e.g. ``torch``,
        for ``torch.save`` and ``torch.load(weights_only=True)``). The state round-trips through
        ``np.savez``/``np.load`` (no pickle), ``torch.save``, ``pickle`` and ``copy.deepcopy``.
        bfloat16 gradients are stored as their uint16 bit patterns. Fields: format, dim,
        capacity, damp, scale ("capacity", "count" or a float), dtype, accumulate, gradients
        (capacity×dim, slot order), ages, counter, frames (int64 per slot, docs/design.md §4),
        steps, gram (float64 Gram matrix in the frames, slot order) and factor (its damped
        system's upper Cholesky factor, age order, padded with the identity)."""
        return _window_state.state_dict(self, xp)

    @_backend.on_device
    def load_state_dict(self, state, *, rebuild: bool = False) -> None:
        """Load a ``state_dict()`` (format 3, or formats 1 and 2 of earlier versions). dim, capacity and dtype
        must match this window; damp, scale and accumulate are taken from the state. Arrays may
        be NumPy, CuPy or torch (CPU) arrays; scalars may be 0-d arrays (``np.load``).

        Everything is checked against the stored gradients, which are the ground truth: the
        Gram matrix against a recomputation (O(d·capacity²); entries must agree within
        8·ε·(√d + 1)·‖g_i‖‖g_j‖, 18× the largest rounding difference measured), the factor by
        its componentwise residual (O(capacity³)). A state that fails raises ValueError and
        leaves the window unchanged; ``rebuild=True`` recomputes both from the gradients instead
        (O(d·capacity² + capacity³); the resumed window then agrees with the saved one to
        rounding, not bit for bit). Format-1 states always have their factor rebuilt from their
        validated Gram matrix (their D and B are not used)."""
        _window_state.load_state_dict(self, state, rebuild)

    @staticmethod
    def _staged(**fields) -> _Staged:
        """A staging record of an update (``_window_state`` builds one to check a state)."""
        return _Staged(**fields)

    def _empty_like(self, damp, scale_mode, accumulate):
        """An empty window of this one's dim, capacity, dtype and backend (on the same ranks)."""
        return DynamicInverse(self._dim, self._capacity, damp, scale=scale_mode, dtype=self._storage, xp=self._xp,
                              accumulate=accumulate)  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"DynamicInverse(dim={self._dim}, capacity={self._capacity}, len={len(self)}, dtype={self._storage}, "
            f"damp={self._damp:g}, scale={self.scale:g})"
        )


def push_apply_all(windows, gradients) -> list:
    """Push gradients[i] into windows[i] for every i and return [F_i⁻¹g_i], as one step: every
    push is validated and staged first and the windows are written only if all succeed, and a
    result that fails (OverflowError) undoes every push. For models whose parameters are split
    over several windows (one per block or layer): the step happens everywhere or nowhere.
    Cost: the sum of the ``push_apply`` calls."""
    results, _ = staged_push_apply(windows, gradients)
    return results


def staged_push_apply(windows, gradients):
    """``push_apply_all`` that also returns ``undo()``, which restores every window as it was
    (bit for bit): for callers whose step can still fail after the pushes (an optimizer writing
    its parameters), so that their step too happens everywhere or nowhere."""
    windows, gradients = list(windows), list(gradients)
    if len(windows) != len(gradients):
        raise ValueError(f"got {len(windows)} windows and {len(gradients)} gradients")
    if len({id(w) for w in windows}) != len(windows):
        raise ValueError("each window may appear once in one step")
    with _holding(windows):
        results, undo = _staged_push_apply(windows, gradients)

    def undo_held():
        with _holding(windows):
            undo()

    return results, undo_held


def _holding(windows):
    """Every window's lock, taken in one order (no deadlock between steps over shared windows)."""
    held = contextlib.ExitStack()
    for w in sorted(windows, key=id):
        held.enter_context(w._lock)
    return held


def _staged_push_apply(windows, gradients):
    prepared = [w._prepare_push(g) for w, g in zip(windows, gradients)]
    undos = []

    def undo():
        for u in reversed(undos):
            u()
        undos.clear()

    try:
        for w, (stage, *_) in zip(windows, prepared):
            with _backend.device_scope(w._xp, w._anchor()):
                undos.append(w._commit(stage))
        results = [w._apply_to_stored(slot, g_s, dt, top) for w, (_, slot, g_s, dt, top) in zip(windows, prepared)]
    except BaseException:
        undo()
        raise
    return results, undo


def _write_rows(gram, rows) -> None:
    """gram[s, :] = gram[:, s] = row for each slot s (zeros for None), in place."""
    for slot, row in rows.items():
        if row is None:
            gram[slot, :] = 0.0
            gram[:, slot] = 0.0
        else:
            gram[slot, :] = row
            gram[:, slot] = row
