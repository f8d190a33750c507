"""Block layouts and masks over a model's parameters (for block-diagonal inverses and pruning)."""

from __future__ import annotations

import numbers

import numpy as np
import torch  # noqa: TID253 (this module is the adapter)

from .vectors import trainable


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
