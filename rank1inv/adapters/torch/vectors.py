"""Flat vectors of a model's trainable parameters and gradients."""

from __future__ import annotations

import torch  # noqa: TID253 (this module is the adapter)

from .convert import to_array, to_tensor
from .dtensor import local_shard


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


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the parameters with ``requires_grad``, in the order of
    ``model.named_parameters()``: the coordinates of ``gradients(model, ...)`` and of every flat
    vector below. Frozen parameters are in none of them."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


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


def _batch_gradients(model: torch.nn.Module, loss_fn, batches, m: int | None):
    """(buffer, generator): the generator yields the flat gradient of ``loss_fn(model, b)`` for
    each batch b (at most m), as a view of ``buffer`` valid until the next one; the model's
    ``.grad`` fields are restored whenever it stops, and fewer than m batches raise ValueError."""
    params = [p for p in model.parameters() if p.requires_grad]
    buf = GradientBuffer(params)

    def each():
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        count = 0
        try:
            for b in batches:
                if m is not None and count == m:
                    break
                for p in params:
                    p.grad = None
                loss_fn(model, b).backward()
                yield buf.gather()
                count += 1
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        if m is not None and count < m:
            raise ValueError(f"batches yielded {count} batches, fewer than m={m}")

    return buf, each()


def gradient_stream(model: torch.nn.Module, loss_fn, batches, m: int | None = None, *, batch: int = 16):
    """Yield the gradients of ``loss_fn(model, b)`` (a scalar loss) for the batches ``b`` of
    ``batches`` (at most m of them), ``batch`` at a time as new (k, d) NumPy/CuPy arrays, for
    ``StaticInverse.from_stream`` or a ``BlockAccumulator``: no m×d array is ever formed (one
    (batch, d) buffer at a time). The model's ``.grad`` fields are restored whenever the
    generator stops. Cost: one backward pass per gradient."""
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"m must be a positive int or None, got {m!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    _, each = _batch_gradients(model, loss_fn, batches, m)
    out = []
    for g in each:
        out.append(g.clone())
        if len(out) == batch:
            piece, out = torch.stack(out), []
            yield to_array(piece)
    if out:
        yield to_array(torch.stack(out))


def gradients(model: torch.nn.Module, loss_fn, batches, m: int):
    """m gradients (one per batch, each the gradient of the batch's mean loss) as an (m, d)
    NumPy/CuPy array for ``StaticInverse``. ``loss_fn(model, batch)`` returns a scalar loss;
    ``batches`` yields at least m batches. The model's own ``.grad`` fields are restored."""
    buf, each = _batch_gradients(model, loss_fn, batches, m)
    G = torch.empty((m, buf.buffer.numel()), dtype=buf.buffer.dtype, device=buf.buffer.device)
    for i, g in enumerate(each):
        G[i].copy_(g)
    return to_array(G)
