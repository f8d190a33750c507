"""OBS pruning of a torch model in one call."""

from __future__ import annotations

import math
import numbers

from ... import _backend, obs
from ...static import StaticInverse
from .layout import _layer_of, blocks_from_model, masks_for_model, nm_segments, weight_mask
from .vectors import gradients, model_vector, trainable, write_vector


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
    names = [_layer_of(n) for n, _ in trainable(model)]
    layers = list(dict.fromkeys(names))
    blocks = blocks_from_model(model, per)
    keep = weight_mask(model) if prunable is None else prunable

    def fresh(w, mask):
        write_vector(model, w)
        return gradients(model, loss_fn, batches, ngrads)

    relative = _relative_factor(damp)  # refused before any gradient is taken
    w0 = model_vector(model)
    G0 = fresh(w0, None)
    lam = float(damp) if relative is None else obs.relative_damp(G0, relative)
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
        if head != "relative" or not 0 < factor < math.inf:
            raise ValueError(f"damp must be a number > 0 or 'relative:<factor > 0>', got {damp!r}")
        return factor
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0 < damp < math.inf:
        raise ValueError(f"damp must be a number > 0 or 'relative:<factor>', got {damp!r}")
    return None


def _backend_namespace(a):
    return _backend.namespace(a)
