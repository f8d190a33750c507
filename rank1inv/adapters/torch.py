"""PyTorch adapter: zero-copy conversion, flat gradients, and the M-FAC optimizer.

No curvature math here: tensors are handed to ``DynamicInverse`` / ``StaticInverse`` as NumPy
(CPU) or CuPy (CUDA) arrays through DLPack, sharing memory, and results come back the same way.
"""

from __future__ import annotations

import contextlib
import numbers

import numpy as np
import torch

from .. import _precision
from .._comm import agreement as _comm_agreement
from .._comm import as_communicator
from ..dynamic import DynamicInverse, staged_push_apply


# ------------------------------------------------------------------------------ conversion
def to_array(tensor: torch.Tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``tensor``'s memory (detached, zero-copy).
    bfloat16 tensors become ``ml_dtypes.bfloat16`` arrays on the CPU and uint16 bit patterns on
    CUDA (CuPy has no bfloat16; rank1inv reads uint16 CuPy arrays as bfloat16)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_array takes a torch.Tensor, not {type(tensor).__module__}.{type(tensor).__name__}"
                        " (NumPy and CuPy arrays go to rank1inv as they are)")  # fmt: skip
    t = tensor.detach()
    bits = t.dtype == torch.bfloat16
    if bits:
        t = t.view(torch.uint16)
    if t.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(t)
    if t.device.type != "cpu":
        raise TypeError(f"tensors on {t.device.type} are not supported (CPU or CUDA only)")
    a = t.numpy()
    return a.view(_precision.numpy_dtype("bfloat16")) if bits else a


def to_tensor(array) -> torch.Tensor:
    """A tensor sharing the memory of a NumPy or CuPy array (zero-copy, via DLPack); bfloat16
    arrays (ml_dtypes) become bfloat16 tensors."""
    if isinstance(array, np.ndarray):
        if array.dtype == _precision.numpy_dtype("bfloat16"):
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    if not hasattr(array, "__dlpack__"):
        raise TypeError(f"to_tensor takes a NumPy or CuPy array, not {type(array).__module__}.{type(array).__name__}")
    return torch.from_dlpack(array)


def _cuda_context(tensor, stream: bool = False):
    """For a CUDA tensor: CuPy's device set to the tensor's, and with ``stream`` CuPy's current
    stream set to torch's current stream on it (so kernels, DLPack hand-overs and CuPy's pool
    reuse are ordered with torch's work). A no-op on the CPU."""
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(tensor.device.index))
    if stream:
        stack.enter_context(cupy.cuda.ExternalStream(torch.cuda.current_stream(tensor.device).cuda_stream))
    return stack


_TORCH_STORAGE = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


# ------------------------------------------------------------------------------ flat vectors
def _tensors(params) -> list[torch.Tensor]:
    ps = list(params)
    if not ps or not all(isinstance(p, torch.Tensor) for p in ps):
        raise TypeError("params must be a non-empty iterable of tensors (e.g. model.parameters())")
    return ps


def flatten(params, out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate tensors into one 1-D tensor (``out`` reused when given: no allocation)."""
    ps = _tensors(params)
    n = sum(p.numel() for p in ps)
    if out is None:
        out = torch.empty(n, dtype=ps[0].dtype, device=ps[0].device)
    elif out.shape != (n,):
        raise ValueError(f"out must have shape ({n},), got {tuple(out.shape)}")
    a = 0
    with torch.no_grad():
        for p in ps:
            out[a : a + p.numel()].copy_(p.reshape(-1))
            a += p.numel()
    return out


def unflatten(vector: torch.Tensor, params) -> list[torch.Tensor]:
    """Views of ``vector`` shaped like each of ``params`` (zero-copy)."""
    ps = _tensors(params)
    n = sum(p.numel() for p in ps)
    if vector.shape != (n,):
        raise ValueError(f"vector must have shape ({n},), got {tuple(vector.shape)}")
    views, a = [], 0
    for p in ps:
        views.append(vector[a : a + p.numel()].view(p.shape))
        a += p.numel()
    return views


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (e.g. a parameter of an FSDP2 model)."""
    kind = _dtensor_type()
    return kind is not None and isinstance(t, kind)


def local_shard(t: torch.Tensor, what: str = "parameter") -> torch.Tensor:
    """This rank's shard of a DTensor sharded along one mesh dimension (its local tensor, the
    same storage: in-place updates write the DTensor), or ``t`` itself. ValueError for a
    replicated or partial placement, whose local tensor is not a disjoint piece of the whole
    (every rank would count its coordinates)."""
    if not is_dtensor(t):
        return t
    if t.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in t.placements):
        raise ValueError(
            f"a DTensor {what} must be sharded (Shard placement) on a 1-D device mesh, got placements "
            f"{tuple(t.placements)}; replicated or partial tensors would count their coordinates on every rank"
        )
    return t.to_local()


def mesh_group(params):
    """The process group of the DTensor parameters' device mesh (None if there are none);
    ValueError if they mix DTensors and plain tensors or live on different meshes."""
    ps = list(params)
    flags = [is_dtensor(p) for p in ps]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError("the parameters mix DTensors and plain tensors: shard all of them or none")
    meshes = {id(p.device_mesh) for p in ps}
    if len(meshes) > 1:
        raise ValueError("the DTensor parameters live on different device meshes")
    return ps[0].device_mesh.get_group()


class GradientBuffer:
    """One preallocated flat buffer for the gradients of ``params`` (no per-step allocation).
    For DTensor parameters (FSDP2) it holds this rank's shards (``local_shard``)."""

    def __init__(self, params):
        self.params = _tensors(params)
        self.locals = [local_shard(p) for p in self.params]
        p0 = self.locals[0]
        self.buffer = torch.zeros(sum(p.numel() for p in self.locals), dtype=p0.dtype, device=p0.device)

    def gather(self) -> torch.Tensor:
        """Copy each ``p.grad`` (zeros where None; this rank's shard of a DTensor gradient) into
        the buffer and return it."""
        a = 0
        with torch.no_grad():
            for p, local in zip(self.params, self.locals):
                n = local.numel()
                if p.grad is None:
                    self.buffer[a : a + n].zero_()
                else:
                    if p.grad.layout != torch.strided:
                        raise TypeError(f"gradients must be dense (strided) tensors, got layout {p.grad.layout}; "
                                        "convert sparse gradients with .to_dense()")  # fmt: skip
                    grad = local_shard(p.grad, "gradient")
                    if grad.shape != local.shape:
                        raise ValueError(f"a gradient's shard has shape {tuple(grad.shape)}, its parameter's "
                                         f"{tuple(local.shape)}: shard gradients like their parameters")  # fmt: skip
                    self.buffer[a : a + n].copy_(grad.reshape(-1))
                a += n
        return self.buffer


def gradients(model: torch.nn.Module, loss_fn, batches, m: int):
    """m gradients (one per batch, each the gradient of the batch's mean loss) as an (m, d)
    NumPy/CuPy array for ``StaticInverse``. ``loss_fn(model, batch)`` returns a scalar loss;
    ``batches`` yields at least m batches. The model's own ``.grad`` fields are restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    buf = GradientBuffer(params)
    G = torch.empty((m, buf.buffer.numel()), dtype=buf.buffer.dtype, device=buf.buffer.device)
    count = 0
    try:
        for batch in batches:
            if count == m:
                break
            for p in params:
                p.grad = None
            loss_fn(model, batch).backward()
            G[count].copy_(buf.gather())
            count += 1
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    if count < m:
        raise ValueError(f"batches yielded {count} batches, fewer than m={m}")
    return to_array(G)


# ------------------------------------------------------------------------------ models
def trainable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the parameters with ``requires_grad``, in the order of
    ``model.named_parameters()``: the coordinates of ``gradients(model, ...)`` and of every flat
    vector below. Frozen parameters are in none of them."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def blocks_from_model(model: torch.nn.Module, per="layer") -> list[int]:
    """Block lengths over the trainable parameters (``block_size=`` of StaticInverse):
    ``per="layer"`` one block per module that owns parameters (its weight and bias together),
    an int B each layer split into consecutive blocks of at most B (none straddles a layer)."""
    layers = []
    for name, p in trainable(model):
        layer = _layer_of(name)
        if layers and layers[-1][0] == layer:
            layers[-1][1] += p.numel()
        else:
            layers.append([layer, p.numel()])
    if per == "layer":
        return [n for _, n in layers]
    if isinstance(per, bool) or not isinstance(per, numbers.Integral) or per < 1:
        raise ValueError(f"per must be 'layer' or a positive int, got {per!r}")
    return [min(per, n - a) for _, n in layers for a in range(0, n, per)]


def model_vector(model: torch.nn.Module):
    """The trainable parameters as one flat NumPy/CuPy array (a copy, in their dtype)."""
    return to_array(flatten([p for _, p in trainable(model)]).clone())


def write_vector(model: torch.nn.Module, vector) -> None:
    """Copy a flat vector (NumPy/CuPy/torch, length = trainable coordinates) into the model."""
    params = [p for _, p in trainable(model)]
    v = vector if isinstance(vector, torch.Tensor) else to_tensor(vector)
    with torch.no_grad():
        for p, view in zip(params, unflatten(v.to(device=params[0].device), params)):
            p.copy_(view)


def output_jacobians(model: torch.nn.Module, inputs: torch.Tensor, *, chunk: int = 64):
    """Jacobians of the model's outputs with respect to its trainable parameters, one per
    input: a (n, C, d) NumPy/CuPy array (C outputs per input, d coordinates in the order of
    ``model_vector``), for ``rank1inv.laplace.predictive_variance`` after a reshape to
    (n·C, d). torch.func (vmap of jacrev over ``functional_call``), ``chunk`` inputs at a
    time; frozen parameters and buffers are held fixed. The model is not modified."""
    from torch.func import functional_call, jacrev, vmap

    names = [n for n, _ in trainable(model)]
    params = {n: p.detach() for n, p in trainable(model)}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def out(p, x):
        return functional_call(model, {**fixed, **p}, (x[None, ...],))[0]

    jac = vmap(jacrev(out), in_dims=(None, 0))
    parts = []
    for a in range(0, inputs.shape[0], chunk):
        J = jac(params, inputs[a : a + chunk])  # dict of (c, C, *shape)
        parts.append(torch.cat([J[n].reshape(J[n].shape[0], J[n].shape[1], -1) for n in names], dim=2))
    return to_array(torch.cat(parts, dim=0).contiguous())


def weight_mask(model: torch.nn.Module):
    """A boolean flat array: True on weights of two or more dimensions (Linear, Conv), False on
    biases and norms, which pruning usually keeps (``prunable=`` of ``obs.prune``)."""
    return np.concatenate([np.full(p.numel(), p.ndim >= 2) for _, p in trainable(model)])


def masks_for_model(model: torch.nn.Module, mask) -> dict[str, torch.Tensor]:
    """A flat boolean mask (True = kept) as one boolean tensor per trainable parameter, shaped
    like it (an N:M mask of a weight is the format ``torch.sparse.to_sparse_semi_structured``
    accepts once the pruned entries are zero)."""
    params = trainable(model)
    m = torch.from_numpy(np.ascontiguousarray(_to_host(mask)).astype(bool))
    out, a = {}, 0
    for name, p in params:
        out[name] = m[a : a + p.numel()].view(p.shape).to(p.device)
        a += p.numel()
    return out


def nm_segments(model: torch.nn.Module, m: int = 4) -> list[tuple[int, int]]:
    """(start, stop) of every weight (≥ 2 dimensions) whose input dimension — the last of
    ``weight.reshape(out, -1)``, along which sparse tensor cores group — is a multiple of m, in
    the flat vector of ``trainable(model)``; for ``obs.prune_nm``."""
    out, a = [], 0
    for _, p in trainable(model):
        if p.ndim >= 2 and (p.numel() // p.shape[0]) % m == 0:
            out.append((a, a + p.numel()))
        a += p.numel()
    return out


def _to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def prune_model(model, loss_fn, batches, sparsity, *, ngrads: int = 64, damp="relative:1e-2", steps: int = 1,
                per="layer", scope="global", method="obs", update="simultaneous", layer_sparsity=None, nm=None,
                prunable=None):  # fmt: skip
    """Prune a torch model in one call: ``ngrads`` gradients from ``batches`` (re-iterable: each
    recomputation step iterates it again), a block-diagonal inverse Fisher (``per``, as in
    ``blocks_from_model``), OBS pruning of its weights (``prunable``: default
    ``weight_mask(model)``, biases kept) to ``sparsity`` in ``steps`` steps of the cubic schedule
    with the inverse rebuilt at the pruned weights before each (``obs.prune_in_steps``), and
    the result written into the model. ``layer_sparsity`` ({layer name: fraction}) sets
    per-layer targets (then ``scope="block"`` with one block per layer). ``nm=(n, m)`` instead
    prunes to N:M semi-structured sparsity in one shot (``obs.prune_nm`` over ``nm_segments``).
    ``damp``: a float, or "relative:c" for c·mean diag(GᵀG/m) of the first gradients.
    Returns ``masks_for_model`` of the result. Cost per step: m backward passes, one
    StaticInverse build, one prune."""
    from .. import StaticInverse, obs

    names = [_layer_of(n) for n, _ in trainable(model)]
    layers = list(dict.fromkeys(names))
    blocks = blocks_from_model(model, per)
    keep = weight_mask(model) if prunable is None else prunable

    def fresh(w, mask):
        write_vector(model, w)
        return gradients(model, loss_fn, batches, ngrads)

    w0 = model_vector(model)
    G0 = fresh(w0, None)
    if isinstance(damp, str):
        if not damp.startswith("relative:"):
            raise ValueError(f"damp must be a number or 'relative:<factor>', got {damp!r}")
        lam = obs.relative_damp(G0, float(damp.split(":", 1)[1]))
    else:
        lam = float(damp)
    xp = _backend_namespace(w0)
    if nm is not None:
        n, mm = nm
        op = StaticInverse(G0, lam, block_size=blocks)
        mask, w = obs.prune_nm(op, xp.astype(w0, xp.float64), n, mm, segments=nm_segments(model, mm))
    else:
        target = sparsity
        if layer_sparsity is not None:
            unknown = set(layer_sparsity) - set(layers)
            if unknown:
                raise ValueError(f"layer_sparsity names unknown layers {sorted(unknown)}; layers: {layers}")
            if per != "layer":
                raise ValueError("layer_sparsity needs per='layer' (one block per layer)")
            target = [float(layer_sparsity.get(layer, sparsity)) for layer in layers]
            scope = "block"
        first = {"G": G0}

        def gradients_at(w, mask):  # the first step reuses the gradients already taken
            return first.pop("G") if "G" in first else fresh(w, mask)

        if isinstance(target, list):
            op = StaticInverse(G0, lam, block_size=blocks)
            if steps != 1:
                raise ValueError("per-layer targets are pruned in one step (steps=1)")
            mask, w = obs.prune(op, xp.astype(w0, xp.float64), target, method=method, update=update, scope=scope,
                                prunable=keep)  # fmt: skip
        else:
            mask, w = obs.prune_in_steps(xp.astype(w0, xp.float64), target, steps, gradients_at, lam, method=method,
                                         update=update, scope=scope, block_size=blocks, prunable=keep)  # fmt: skip
    write_vector(model, w)
    return masks_for_model(model, mask)


def _relative_factor(damp):
    """c for damp="relative:c", None for a number; ValueError otherwise."""
    if isinstance(damp, str):
        head, _, value = damp.partition(":")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if head != "relative" or not factor > 0:
            raise ValueError(f"damp must be a number > 0 or 'relative:<factor > 0>', got {damp!r}")
        return factor
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not damp > 0:
        raise ValueError(f"damp must be a number > 0 or 'relative:<factor>', got {damp!r}")
    return None


def _backend_namespace(a):
    from .. import _backend

    return _backend.namespace(a)


# ------------------------------------------------------------------------------ optimizer
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
    lr : float
    ngrads : int
        Window length (M-FAC's m).
    damp : float
        λ in F = λI + s·Σ gᵢgᵢᵀ.
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

    @staticmethod
    def _check_group(group, where: str) -> None:
        lr, ngrads, momentum, wd = group["lr"], group["ngrads"], group["momentum"], group["weight_decay"]
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
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
