"""Output Jacobians of a model with respect to its trainable parameters (torch.func)."""

from __future__ import annotations

import torch  # noqa: TID253 (this module is the adapter)

from .convert import to_array
from .vectors import trainable


def functional_model(model: torch.nn.Module, names):
    """f(params, x): the model's output for one input x (no batch axis) as a function of the
    parameters named in ``names`` (a dict name → tensor), every other parameter and buffer held
    fixed at its current value (torch.func.functional_call; the model is not modified)."""
    from torch.func import functional_call

    chosen = set(names)
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    fixed.update(dict(model.named_buffers()))

    def f(params, x):
        return functional_call(model, {**fixed, **params}, (x[None, ...],))[0]

    return f


def output_jacobians(model: torch.nn.Module, inputs: torch.Tensor, *, chunk: int = 64):
    """Jacobians of the model's outputs with respect to its trainable parameters, one per
    input: a (n, C, d) NumPy/CuPy array (C outputs per input, d coordinates in the order of
    ``model_vector``), for ``rank1inv.laplace.predictive_variance`` after a reshape to
    (n·C, d). torch.func (vmap of jacrev over ``functional_call``), ``chunk`` inputs at a
    time; frozen parameters and buffers are held fixed. The model is not modified."""
    from torch.func import jacrev, vmap

    names = [n for n, _ in trainable(model)]
    params = {n: p.detach() for n, p in trainable(model)}
    jac = vmap(jacrev(functional_model(model, names)), in_dims=(None, 0))
    parts = []
    for a in range(0, inputs.shape[0], chunk):
        J = jac(params, inputs[a : a + chunk])  # dict of (c, C, *shape)
        parts.append(torch.cat([J[n].reshape(J[n].shape[0], J[n].shape[1], -1) for n in names], dim=2))
    return to_array(torch.cat(parts, dim=0).contiguous())
