"""The M-FAC optimizer and the staged parameter step shared by this package's optimizers."""

from __future__ import annotations

import numbers

import torch  # noqa: TID253 (this module is the adapter)

from ... import _precision
from ..._comm import agreement as _comm_agreement
from ..._comm import as_communicator
from ...dynamic import DynamicInverse, staged_push_apply
from .convert import _TORCH_STORAGE, _cuda_context, to_array, to_tensor
from .dtensor import local_shard, mesh_group
from .pruning import _relative_factor
from .vectors import GradientBuffer


class Descent:
    """The step of this package's optimizers, staged then committed (nothing is written until
    every parameter's new value is known to be finite): heavy-ball momentum on the
    (preconditioned) direction d (``state["momentum_buffer"]``, as torch.optim.SGD), decoupled
    weight decay p ← (1 − lr·weight_decay)·p, then p ← p − lr·d. The arithmetic runs in at least
    float32 (a 16-bit parameter's direction is never cast to 16 bits on its own: only the new
    parameter is, and an overflow raises OverflowError before any parameter changes)."""

    def __init__(self):
        self._writes = []

    def add(self, state: dict, p: torch.Tensor, d: torch.Tensor, lr, momentum: float, weight_decay: float) -> None:
        """Stage one parameter's step (out of place). ValueError for a direction of the wrong
        shape or a momentum buffer that does not fit the parameter (a state from another model)."""
        if d.shape != p.shape:
            raise ValueError(f"a direction of shape {tuple(d.shape)} for a parameter of shape {tuple(p.shape)}")
        work = torch.promote_types(p.dtype, torch.float32)
        d = d.to(work)
        buf = None
        if momentum:
            old = state.get("momentum_buffer")
            if old is not None and old.shape != p.shape:
                raise ValueError(f"the momentum buffer has shape {tuple(old.shape)}, its parameter {tuple(p.shape)}: "
                                 "the optimizer state is from another model")  # fmt: skip
            buf = d.clone() if old is None else old.to(work) * momentum + d
            d = buf
        lr = float(lr)
        new = p.detach().to(work)
        if weight_decay:
            new = new * (1.0 - lr * weight_decay)
        new = (new - lr * d).to(p.dtype)
        if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(p).all()):
            raise OverflowError(f"the step leaves the {p.dtype} range of a parameter (|lr·direction| too large)")
        self._writes.append((state, p, new, buf))

    def commit(self) -> None:
        """Write every staged step (nothing here can fail)."""
        with torch.no_grad():
            for state, p, new, buf in self._writes:
                if buf is not None:
                    state["momentum_buffer"] = buf
                p.copy_(new)
        self._writes = []


def descend(state: dict, p: torch.Tensor, d: torch.Tensor, lr, momentum: float, weight_decay: float) -> None:
    """One parameter's ``Descent`` step, staged and committed at once."""
    step = Descent()
    step.add(state, p, d, lr, momentum, weight_decay)
    step.commit()


class MFAC(torch.optim.Optimizer):
    """The M-FAC optimizer (M-FAC §4.2): θ ← θ − lr·F⁻¹g, with F the damped empirical Fisher of
    the last ``ngrads`` gradients, kept by a ``DynamicInverse`` per window (push_apply each step).

    Parameters
    ----------
    params : iterable of tensors or parameter groups
    lr : float > 0, or a one-element floating tensor (as torch.optim: schedulers may write it)
    ngrads : int
        Window length (M-FAC's m).
    damp : float or "relative:c"
        λ in F = λI + s·Σ gᵢgᵢᵀ; "relative:c" chooses λ = c·mean(g²) of each window's first
        gradient at its first step (read it back from ``damps``).
    momentum : float
        Heavy-ball momentum on the preconditioned direction (0: none, as in the paper).
    weight_decay : float
        Decoupled weight decay: θ ← θ − lr·weight_decay·θ.
    scale : None, "count" or float
        As in ``DynamicInverse`` (None: 1/ngrads, the paper's convention).
    blocks : None, "groups" or int
        None: one window over all parameters; "groups": one window per parameter group;
        an int B: consecutive blocks of B coordinates of the flattened parameters, one window each.
    dtype : None, "float64", "float32", "bfloat16" or "float16"
        Storage dtype of the windows. None: the parameters' dtype (float64, float32, bfloat16 and
        float16 parameters all work). A 16-bit window of float32 gradients halves the memory;
        every reduction still accumulates in float64.

    As in ``torch.optim``: parameters with ``requires_grad=False`` are left alone (not in any
    window, not decayed, not stepped); a window whose parameters all have ``grad is None`` is
    skipped for that step (nothing pushed, nothing decayed or stepped); a window with some
    gradients missing is refused, as its parameters are preconditioned jointly (give them
    separate windows with ``blocks="groups"``). ``lr``, ``momentum`` and ``weight_decay`` may
    differ per parameter group; ``ngrads``, ``damp``, ``scale`` and ``dtype`` may too with
    ``blocks="groups"`` (otherwise one window spans the groups and they must agree).
    ``add_param_group`` adds a window (``blocks="groups"``) or restarts the windows over the
    enlarged parameter vector. A step happens in every window or in none.

    ``comm`` (an mpi4py communicator, a torch.distributed process group or "torch"): the
    parameters given to this rank's optimizer are its shard of one model (plain per-rank
    shards); DTensor parameters (an FSDP2 ``fully_shard`` model, Shard placements on a 1-D mesh)
    need no ``comm``: their mesh's group is used and each is stepped through its local shard.
    The window is sharded along d with them
    (``DynamicInverse(comm=...)``): each rank stores ngrads × its own coordinates, and a step
    costs an all-reduce of about ngrads floats for the new Gram row and one for the IHVP. Every
    rank must step together.

    Memory: ngrads × d gradients in ``dtype``, on the parameters' device. ``state_dict()``
    carries the windows (as CPU tensors: it loads with ``torch.load(weights_only=True)``), so a
    resumed run continues bit for bit.
    """

    _WINDOW_KEYS = ("ngrads", "damp", "scale", "dtype")

    def __init__(self, params, lr, *, ngrads=1024, damp=1e-5, momentum=0.0, weight_decay=0.0, scale=None, blocks=None,
                 dtype=None, comm=None):  # fmt: skip
        int_blocks = isinstance(blocks, numbers.Integral) and not isinstance(blocks, bool)
        if not (blocks is None or (isinstance(blocks, str) and blocks == "groups") or (int_blocks and blocks >= 1)):
            raise ValueError(f"blocks must be None, 'groups' or a positive int, got {blocks!r}")
        if comm is not None and (blocks is not None or isinstance(damp, str)):
            raise ValueError("with comm (parameters sharded across ranks) use blocks=None and a numeric damp")
        self.blocks, self._comm = blocks, comm
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ngrads=ngrads, damp=damp, scale=scale,
                        dtype=dtype)  # fmt: skip
        self._check_group(defaults, "the optimizer")
        super().__init__(params, defaults)
        group = mesh_group(p for g in self.param_groups for p in g["params"])  # FSDP2/DTensor parameters
        if group is not None and comm is None:
            if blocks is not None or isinstance(damp, str):
                raise ValueError("with DTensor parameters (sharded across ranks) use blocks=None and a numeric damp")
            self._comm = group
        self._windows, self._buffers = self._make_windows()

    @property
    def damps(self) -> tuple:
        """λ of each window unit (one per parameter group with blocks="groups", else one), as
        floats; None for a "relative:c" damping that its first step has not chosen yet."""
        return tuple(None if w is None else w[0].damp for w in self._windows)

    @staticmethod
    def _check_group(group, where: str) -> None:
        lr, ngrads, momentum, wd = group["lr"], group["ngrads"], group["momentum"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):  # torch.optim accepts a tensor lr (a scheduler may fill_ it)
            if lr.numel() != 1 or not lr.dtype.is_floating_point or lr.requires_grad:
                raise ValueError(f"a tensor lr must be one floating value without grad, got {lr!r} ({where})")
            lr = float(lr)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < float("inf"):
            raise ValueError(f"lr must be a number > 0, got {lr!r} ({where})")
        if isinstance(ngrads, bool) or not isinstance(ngrads, numbers.Integral):
            raise TypeError(f"ngrads must be an int, not {type(ngrads).__name__} ({where})")
        if ngrads < 1:
            raise ValueError(f"ngrads must be >= 1, got {ngrads} ({where})")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum} ({where})")
        if wd < 0:
            raise ValueError(f"weight_decay must be >= 0, got {wd} ({where})")
        if group["dtype"] is not None:
            group["dtype"] = _precision.of(group["dtype"]).name
        _relative_factor(group["damp"])
        unknown = set(group) - {"params", "lr", "momentum", "weight_decay", *MFAC._WINDOW_KEYS}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} ({where}); MFAC takes lr, momentum, "
                             f"weight_decay, {', '.join(MFAC._WINDOW_KEYS)}")  # fmt: skip

    def add_param_group(self, param_group):
        """Add a parameter group (``torch.optim`` semantics). With ``blocks="groups"`` it gets a
        window of its own; otherwise the windows restart over the enlarged parameter vector (their
        dimension changes, so the gradients kept so far cannot carry over)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # a group that is refused is not kept (torch.optim appends before we can check)
            self._check_group(group, f"parameter group {len(self.param_groups) - 1}")
            if hasattr(self, "_windows"):
                windows, buffers = self._make_windows()  # in "groups" mode the existing windows are kept
                self._windows, self._buffers = windows, buffers
        except BaseException:
            self.param_groups.pop()
            raise

    # one "unit" = the trainable parameters whose flattened gradients share one buffer
    def _units(self):
        trainable = [[p for p in g["params"] if p.requires_grad] for g in self.param_groups]
        if self.blocks == "groups":
            return [(g, unit) for g, unit in zip(self.param_groups, trainable) if unit]
        for key in self._WINDOW_KEYS:
            values = {repr(g[key]) for g in self.param_groups}
            if len(values) > 1:
                raise ValueError(
                    f"parameter groups set different {key} ({sorted(values)}) but one window spans them; "
                    "use blocks='groups' for one window per group"
                )
        unit = [p for ps in trainable for p in ps]
        return [(self.param_groups[0], unit)] if unit else []

    def _make_windows(self, reuse: bool = True):
        """Buffers and windows for the current units; with ``reuse`` (``blocks="groups"``) a group
        that had a window keeps it."""
        old = {}
        if reuse:
            old = dict(zip([id(b.params[0]) for b in getattr(self, "_buffers", [])], getattr(self, "_windows", [])))
        windows, buffers = [], []
        for group, unit in self._units():  # refused here, not at step()
            kinds = {p.dtype for p in unit}
            if len(kinds) > 1 or not kinds <= set(_TORCH_STORAGE):
                raise TypeError(
                    f"M-FAC needs the parameters of one window in one dtype of {list(_TORCH_STORAGE.values())}, "
                    f"got {sorted(str(k) for k in kinds)} (use blocks='groups' with one dtype per group)"
                )
            buf = GradientBuffer(unit)
            buffers.append(buf)
            if self.blocks == "groups" and id(unit[0]) in old:
                windows.append(old[id(unit[0])])  # an existing group keeps its window
                continue
            relative = _relative_factor(group["damp"])
            windows.append(None if relative is not None else self._new_windows(buf, group, float(group["damp"])))
        return windows, buffers

    def _new_windows(self, buf, group, damp: float):
        """The windows of one unit (one per block of its flat vector), on its device."""
        t = buf.buffer
        xp = None
        if t.device.type == "cuda":
            import cupy

            xp = cupy
        dtype = group["dtype"] or _TORCH_STORAGE[t.dtype]
        d = t.numel()
        size = d if not isinstance(self.blocks, numbers.Integral) else int(self.blocks)
        with _cuda_context(t):  # the window lives on the parameters' device
            return [
                DynamicInverse(
                    min(size, d - a),
                    int(group["ngrads"]),
                    damp,
                    scale=group["scale"],
                    dtype=dtype,
                    xp=xp,
                    comm=self._comm,
                )
                for a in range(0, d, size)
            ]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one step over every window: validated and staged everywhere before any is written; over
        # shards every rank agrees on which windows step before any collective (docs/design.md §12)
        active, jobs, created = [], [], []
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        comm = None if self._comm is None else as_communicator(self._comm)
        try:
            with _comm_agreement(comm, "MFAC step", "windows") as agreed:
                self._collect(active, jobs, created, group_of)
                unit = {id(b): u for u, b in enumerate(self._buffers)}
                agreed.set(windows=float(sum(1 << min(unit[id(b)], 50) for b, _, _ in active)))
        except BaseException:
            for u in created:  # the step did not happen: the relative damping is chosen again
                self._windows[u] = None
            raise
        if not jobs:
            return loss
        undo = None
        try:
            with _cuda_context(active[0][2], stream=True):  # CuPy works on torch's stream: no race on the buffers
                results, undo = staged_push_apply([w for w, _ in jobs], [v for _, v in jobs])
            results = iter(results)
            step = Descent()
            for buf, windows, g in active:  # the directions stay in the windows' result dtype
                direction = torch.cat([to_tensor(next(results)).to(g.device) for _ in windows])
                self._stage(step, buf, direction)
        except BaseException:
            if undo is not None:
                undo()
            for u in created:  # the step did not happen: the relative damping is chosen again
                self._windows[u] = None
            raise
        step.commit()
        return loss

    def _collect(self, active, jobs, created, group_of) -> None:
        """The windows that step and their gradients (validated, nothing written)."""
        for u, (buf, windows) in enumerate(zip(self._buffers, self._windows)):
            missing = [p.grad is None for p in buf.params]
            if all(missing):
                continue  # torch.optim: no gradient, no step (nothing pushed)
            if any(missing):
                raise ValueError(
                    f"{sum(missing)} of the {len(missing)} parameters of one M-FAC window have no gradient; "
                    "they are preconditioned jointly: set requires_grad=False on unused ones or use "
                    "blocks='groups' to give them separate windows"
                )
            g = buf.gather()
            if windows is None:  # damp="relative:c": λ = c·mean(g²) of the unit's first gradient
                group = group_of[id(buf.params[0])]
                scale = float(torch.mean(g.double() ** 2))
                if not scale > 0:
                    raise ValueError("damp='relative:…' needs a first gradient that is not all zero")
                windows = self._new_windows(buf, group, _relative_factor(group["damp"]) * scale)
                self._windows[u] = windows
                created.append(u)
            active.append((buf, windows, g))
            a = 0
            for w in windows:
                n = w.shape[0]
                jobs.append((w, to_array(g[a : a + n])))
                a += n

    def _stage(self, step, buf, direction):
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        a = 0
        for p, local in zip(buf.params, buf.locals):  # a DTensor is stepped through its local shard
            n = local.numel()
            group = group_of[id(p)]
            d = direction[a : a + n].view_as(local)
            a += n
            step.add(self.state[p], local, d, group["lr"], group["momentum"], group["weight_decay"])

    def state_dict(self):
        """torch.optim's state plus the windows (their arrays as CPU tensors, so the whole dict
        loads with ``torch.load(weights_only=True)``)."""
        state = super().state_dict()
        state["mfac_windows"] = [[] if ws is None else [w.state_dict(xp=torch) for w in ws] for ws in self._windows]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        windows = state_dict.pop("mfac_windows", None)
        if windows is None:
            raise ValueError("state_dict has no 'mfac_windows' (not from an MFAC optimizer)")
        self._check_state_shapes(state_dict)
        fresh, buffers = self._make_windows(reuse=False)
        if len(windows) != len(fresh):
            raise ValueError("state_dict windows do not match this optimizer's layout")
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for u, (buf, states) in enumerate(zip(buffers, windows)):
            if fresh[u] is None and states:  # relative damping chosen in the saved run
                fresh[u] = self._new_windows(buf, group_of[id(buf.params[0])], 1.0)
            if (fresh[u] is None) != (not states) or (fresh[u] is not None and len(fresh[u]) != len(states)):
                raise ValueError("state_dict windows do not match this optimizer's layout")
            for w, s in zip(fresh[u] or [], states):
                w.load_state_dict(s)
        super().load_state_dict(state_dict)
        self._windows, self._buffers = fresh, buffers

    def _check_state_shapes(self, state_dict) -> None:
        """ValueError unless every saved per-parameter tensor (momentum buffers) has its
        parameter's shape: torch.optim maps saved states to parameters by position only, so a
        state from a differently shaped model of the same size would load and half-apply a step."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")  # fmt: skip
        by_index = {}
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("state_dict's parameter groups hold other numbers of parameters than this optimizer's")
            by_index.update(zip(saved["params"], group["params"]))
        for index, entry in state_dict.get("state", {}).items():
            p = by_index.get(index)
            shape = None if p is None else local_shard(p).shape
            for key, value in entry.items():
                if shape is not None and isinstance(value, torch.Tensor) and value.ndim and value.shape != shape:
                    raise ValueError(f"state_dict's {key!r} has shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(local_shard(p).shape)}: it is from another model")  # fmt: skip
