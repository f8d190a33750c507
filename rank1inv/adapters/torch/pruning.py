"""OBS pruning of a torch model in one call."""

from __future__ import annotations

import math
import numbers
import warnings

import torch  # noqa: TID253 (this module is the adapter)

from ... import _backend, obs
from ...accumulated import BlockAccumulator
from ...static import StaticInverse
from .layout import _layer_of, blocks_from_model, masks_for_model, nm_segments, weight_mask
from .vectors import gradient_stream, gradients, model_vector, trainable, write_vector


def prune_model(model, loss_fn, batches, sparsity, *, ngrads: int = 64, damp="relative:1e-2", steps: int = 1,
                per="layer", scope="global", method="obs", update="simultaneous", layer_sparsity=None, nm=None,
                prunable=None, stream=False):  # fmt: skip
    """Prune a torch model in one call: ``ngrads`` gradients from ``batches`` (re-iterable: each
    recomputation step iterates it again), a block-diagonal inverse Fisher (``per``, as in
    ``blocks_from_model``), OBS pruning of its weights (``prunable``: default
    ``weight_mask(model)``, biases kept) to ``sparsity`` in ``steps`` steps of the cubic schedule
    with the inverse rebuilt at the pruned weights before each (``obs.prune_in_steps``), and
    the result written into the model. ``layer_sparsity`` ({layer name or module: fraction}) sets
    per-layer targets (then ``scope="block"`` with one block per layer). ``nm=(n, m)`` instead
    prunes to N:M semi-structured sparsity in one shot (``obs.prune_nm`` over ``nm_segments``;
    a UserWarning names the weights left dense because their input dimension is not a multiple of
    M, e.g. a first 3×3 convolution over one channel).
    ``damp``: a float, or "relative:c" for c·mean diag(GᵀG/m) of the first gradients.
    ``stream=True`` never forms the m×d gradients: they are accumulated into the blocks' Gram
    matrices as they are computed (``gradient_stream`` into a ``rank1inv.BlockAccumulator``:
    d·B·8 bytes for blocks of B whatever ``ngrads``; for per="layer" blocks that are wide, the
    gradients' slices while they are fewer). Returns ``masks_for_model`` of the result. Cost
    per step: m backward passes, one StaticInverse build, one prune."""
    names = [_layer_of(n) for n, _ in trainable(model)]
    layers = list(dict.fromkeys(names))
    blocks = blocks_from_model(model, per)
    keep = weight_mask(model) if prunable is None else prunable

    def fresh(w, mask):
        write_vector(model, w)
        if not stream:
            return gradients(model, loss_fn, batches, ngrads)
        acc = BlockAccumulator(len(w), blocks)
        for piece in gradient_stream(model, loss_fn, batches, ngrads):
            acc.add_many(piece)
        return acc

    relative = _relative_factor(damp)  # refused before any gradient is taken
    w0 = model_vector(model)
    G0 = fresh(w0, None)
    if relative is None:
        lam = float(damp)
    elif stream:
        lam = relative * G0.mean_square()
        if not lam > 0:
            raise ValueError("relative damping of all-zero gradients is zero; pass an absolute damp")
    else:
        lam = obs.relative_damp(G0, relative)
    xp = _backend_namespace(w0)
    if nm is not None:
        n, mm = nm
        _warn_uncovered(model, mm)
        op = StaticInverse(G0, lam, block_size=blocks)
        mask, w = obs.prune_nm(op, xp.astype(w0, xp.float64), n, mm, segments=nm_segments(model, mm))
    else:
        target = sparsity
        if layer_sparsity is not None:
            layer_sparsity = _by_name(model, layer_sparsity)
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


def _by_name(model, layer_sparsity) -> dict:
    """{layer name: fraction} from keys that are layer names or the modules themselves."""
    names = {id(module): name for name, module in model.named_modules()}
    out = {}
    for key, value in dict(layer_sparsity).items():
        if isinstance(key, torch.nn.Module):
            if id(key) not in names:
                raise ValueError(f"layer_sparsity names a module that is not part of the model: {key!r}")
            key = names[id(key)]
        out[key] = value
    return out


def _warn_uncovered(model, m: int) -> None:
    """Warn about the weights N:M pruning leaves dense (input dimension not a multiple of m)."""
    skipped = [f"{name} ({p.numel() // p.shape[0]} inputs)" for name, p in trainable(model)
               if p.ndim >= 2 and (p.numel() // p.shape[0]) % m != 0]  # fmt: skip
    if skipped:
        warnings.warn(
            f"N:M pruning with m={m} leaves these weights dense (their input dimension is not a multiple "
            f"of {m}): {', '.join(skipped)}",
            UserWarning,
            stacklevel=3,
        )


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
