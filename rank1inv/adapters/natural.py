"""PyTorch: layer factors of per-sample gradients, the exact subsampled natural gradient and FOOF
(the exact-natural-gradient paper: §2.1 and appendix I for the factors and the natural gradient, §4 and appendix K for
FOOF).

``layer_factors`` (also ``linear_factors``) runs one forward and one backward pass and returns
the per-sample gradients of every Linear, Conv1d and Conv2d as a ``rank1inv.FactoredGradients``
(A: each layer's inputs, a convolution's patches; E: the gradients of each sample's own loss with
respect to the layer's outputs), without forming the B×d per-sample gradients and without
touching ``.grad``. The optimizers below, and KFAC in ``kfac.py``, are built on it.
"""

from __future__ import annotations

import math
import numbers

import torch  # noqa: TID253 (this module is the adapter)

from ..factored import FactoredGradients
from ..static import StaticInverse
from .torch import Descent, to_array, to_tensor, trainable

__all__ = ["layer_factors", "linear_factors", "layer_pairs", "layer_inputs", "layer_errors", "NaturalGradient", "FOOF"]


FACTOR_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def _factor_layers(model: torch.nn.Module):
    """The model's Linear, Conv1d and Conv2d modules in parameter order; ValueError unless every
    trainable parameter is the weight or bias of one of them (the order of ``model_vector``), and
    for a convolution unless groups = 1 and the padding is zeros (what patches express)."""
    owner = {}
    for module in model.modules():
        if isinstance(module, FACTOR_LAYERS):
            for name in ("weight", "bias"):
                p = getattr(module, name)
                if p is not None:
                    owner[id(p)] = module
    layers = []
    for name, p in trainable(model):
        module = owner.get(id(p))
        if module is None:
            raise ValueError(
                f"parameter {name!r} is not the weight or bias of an nn.Linear, nn.Conv1d or nn.Conv2d: layer "
                "factors cover those layers only (freeze it, or use per-sample gradients and StaticInverse)"
            )
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
            if module.groups != 1:
                raise ValueError(
                    f"parameter {name!r}: a convolution with groups={module.groups}; factors need groups=1"
                )
            if module.padding_mode != "zeros":
                raise ValueError(f"parameter {name!r}: padding_mode={module.padding_mode!r}; factors need 'zeros'")
            _conv_padding(module)
        if p is module.weight:
            if layers and layers[-1][0] is module:
                raise ValueError(f"parameter {name!r}: a layer's weight must come before its bias")
            layers.append([module, False])
        elif not layers or layers[-1][0] is not module:
            raise ValueError(f"parameter {name!r}: a bias is trainable while its weight is not")
        else:
            layers[-1][1] = True
    if not layers:
        raise ValueError("the model has no trainable nn.Linear, nn.Conv1d or nn.Conv2d layers")
    return [(module, has_bias) for module, has_bias in layers]


def _conv_padding(module) -> tuple:
    """A convolution's padding as numbers per spatial dimension ('valid' is 0; 'same' where it
    pads symmetrically, as F.unfold can only do)."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError("padding='same' with an even effective kernel pads asymmetrically; factors need explicit "
                         "symmetric padding")  # fmt: skip
    return tuple(t // 2 for t in total)


def layer_inputs(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a of a layer's per-sample gradient Σ_p e_p a_pᵀ: (B, n_in) for a Linear applied to
    (B, n_in); (B, P, n_in) for a Linear over positions (B, ..., n_in) and for a convolution, whose
    patches (F.unfold, in the weight's (C_in, k…) order) are its positions (the
    exact-natural-gradient paper's appendix on convolutions). Memory: a convolution's patches
    hold B·P·C_in·∏k values, ∏k times its input."""
    if isinstance(module, torch.nn.Linear):
        return x if x.ndim == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
    spatial = len(module.kernel_size)
    if x.ndim != spatial + 2:
        raise ValueError(f"a Conv{spatial}d got input of shape {tuple(x.shape)}; factors need a batch dimension")
    pad = _conv_padding(module)
    if spatial == 1:  # as a 2-D convolution of height 1
        x = x[:, :, None, :]
        geometry = dict(kernel_size=(1, *module.kernel_size), dilation=(1, *module.dilation), padding=(0, *pad),
                        stride=(1, *module.stride))  # fmt: skip
    else:
        geometry = dict(kernel_size=module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)
    return torch.nn.functional.unfold(x, **geometry).transpose(1, 2)


def layer_errors(module: torch.nn.Module, e: torch.Tensor) -> torch.Tensor:
    """The gradients e of the loss with respect to a layer's outputs, arranged like
    ``layer_inputs``: (B, n_out) or (B, P, n_out)."""
    if isinstance(module, torch.nn.Linear):
        return e if e.ndim == 2 else e.reshape(e.shape[0], -1, e.shape[-1])
    return e.reshape(e.shape[0], e.shape[1], -1).transpose(1, 2)


def layer_factors(model: torch.nn.Module, inputs, targets=None, *, fisher: str = "true", generator=None,
                  loss: str = "cross_entropy") -> FactoredGradients:  # fmt: skip
    """Per-sample gradients of every trainable Linear, Conv1d and Conv2d of ``model`` at
    ``inputs``, as factors (``linear_factors`` is the same function).

    fisher="true": labels drawn from the model's predictive distribution (softmax of the
    outputs; ``generator`` a torch.Generator): F̂ estimates the Fisher (that paper's eq. 1).
    fisher="empirical": the given ``targets``. The per-sample losses are summed, so row i is the
    gradient of sample i's own loss (a mean-reduced batch loss would scale every row by 1/B).
    loss: "cross_entropy" (classification, outputs (B, C)) or "mse" (½‖f − y‖², labels drawn
    from N(f, I) for the true Fisher). Shape (B, d), d in the order of ``model_vector(model)``;
    the model and its ``.grad`` are not changed. Each layer must be applied once per forward. A
    Linear applied to (B, n_in) gives 2-D factors; one applied to (B, ..., n_in) (tokens) and a
    convolution (patches) give 3-D factors with P positions (``FactoredGradients``). Cost: one
    forward and one backward pass; memory B·Σ(P·(n_in + n_out)) (``layer_inputs``).
    """
    layers, pairs = layer_pairs(model, inputs, targets, fisher=fisher, generator=generator, loss=loss)
    pairs = [(to_array(a.contiguous()), to_array(e.contiguous())) for a, e in pairs]
    return FactoredGradients(pairs, bias=[b for _, b in layers])


def layer_pairs(model: torch.nn.Module, inputs, targets=None, *, fisher: str = "true", generator=None,
                loss: str = "cross_entropy"):  # fmt: skip
    """``layer_factors``'s torch tensors: ([(module, has_bias)], [(a, e)]) per layer, a and e
    detached, (B, n) or (B, P, n) (``layer_inputs``, ``layer_errors``). Same arguments and cost."""
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
    if fisher == "empirical" and targets is None:
        raise ValueError("fisher='empirical' needs the targets")
    layers = _factor_layers(model)
    seen = {id(m): [] for m, _ in layers}

    def hook(module, args, output):
        seen[id(module)].append((args[0], output))

    handles = [m.register_forward_hook(hook) for m, _ in layers]
    try:
        with torch.enable_grad():
            out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    for calls in (seen[id(m)] for m, _ in layers):
        if len(calls) != 1:
            raise ValueError(f"a layer was applied {len(calls)} times in one forward pass; factors need exactly one")
    with torch.no_grad():  # the layers' rows first: a wrong input shape is named before anything else
        inputs_of = [layer_inputs(m, seen[id(m)][0][0].detach()) for m, _ in layers]
    if loss == "cross_entropy" and out.ndim != 2:
        raise ValueError(f"loss='cross_entropy' needs model outputs of shape (B, classes), got {tuple(out.shape)}")
    with torch.no_grad():
        if fisher == "true":
            if loss == "cross_entropy":
                y = torch.multinomial(torch.softmax(out.detach(), dim=1), 1, generator=generator)[:, 0]
            else:
                y = out.detach() + torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        else:
            y = targets
    if loss == "cross_entropy":
        total = torch.nn.functional.cross_entropy(out, y, reduction="sum")
    else:
        total = 0.5 * torch.sum((out - y) ** 2)
    outputs = [seen[id(m)][0][1] for m, _ in layers]
    errors = torch.autograd.grad(total, outputs)
    with torch.no_grad():
        pairs = [(a, layer_errors(m, e.detach())) for a, (m, _), e in zip(inputs_of, layers, errors)]
    return layers, pairs


linear_factors = layer_factors  # the name from when factors covered nn.Linear only


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


GROUP_OPTIONS = ("lr", "damp", "momentum", "weight_decay")


def _checked_options(options: dict, where: str) -> dict:
    out = dict(options)
    for key in ("lr", "damp"):
        if key in out:
            out[key] = _check_positive(out[key], f"{where}{key}")
    if "momentum" in out and not 0.0 <= out["momentum"] < 1.0:
        raise ValueError(f"{where}momentum must be in [0, 1), got {out['momentum']}")
    if "weight_decay" in out and not out["weight_decay"] >= 0:
        raise ValueError(f"{where}weight_decay must be >= 0, got {out['weight_decay']}")
    return out


def _layer_gradient(module, has_bias: bool):
    """The gradient a layer's preconditioner acts on: (n_out, C_in·∏k) (a convolution's weight in
    the patches' order), the bias as one more column (zeros where the bias has no .grad); None
    when the weight has no .grad (torch.optim: no gradient, no step)."""
    W = module.weight
    if W.grad is None:
        return None
    flat = W.grad.reshape(W.shape[0], -1)
    if not has_bias:
        return flat
    column = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
    return torch.cat([flat, column[:, None]], 1)


def _stage_layer_step(step: Descent, state, groups: dict, module, has_bias: bool, delta) -> None:
    """Stage a layer's preconditioned Δ (``_layer_gradient``'s layout) for its weight and, where it
    has a .grad, its bias, each with its parameter group's lr, momentum and weight decay."""
    W, bias = module.weight, module.bias
    stepped_bias = has_bias and bias.grad is not None
    parts = [(W, delta[:, : W[0].numel()])] + ([(bias, delta[:, -1])] if stepped_bias else [])
    for p, d in parts:
        g = groups[id(p)]
        step.add(state[p], p, d.reshape(p.shape), g["lr"], g["momentum"], g["weight_decay"])


def _check_moving_average(ema, inverse_every) -> None:
    """The options of the optimizers that keep statistics as moving averages (FOOF, KFAC)."""
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if isinstance(inverse_every, bool) or not isinstance(inverse_every, int) or inverse_every < 1:
        raise ValueError(f"inverse_every must be an int >= 1, got {inverse_every!r}")


def model_param_groups(model: torch.nn.Module, params) -> list[dict]:
    """torch.optim parameter groups that cover exactly the model's trainable parameters: one
    group for ``params=None``, else ``params`` as torch.optim takes it (a list of dicts with
    "params" and any of lr, damp, momentum, weight_decay), each option checked. The factors
    need every layer, so a missing, repeated or foreign parameter is a ValueError."""
    ordered = [p for _, p in trainable(model)]
    if params is None:
        return [{"params": ordered}]
    groups, seen = [], set()
    for k, group in enumerate(params):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"params[{k}] must be a dict with a 'params' entry (torch.optim's parameter groups)")
        unknown = set(group) - {"params", *GROUP_OPTIONS}
        if unknown:
            raise ValueError(f"params[{k}] has unknown options {sorted(unknown)}; these take {list(GROUP_OPTIONS)}")
        members = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        for p in members:
            if id(p) in seen:
                raise ValueError(f"params[{k}] repeats a parameter of an earlier group")
            seen.add(id(p))
        groups.append({**_checked_options(group, f"params[{k}]."), "params": members})
    names = {id(p): name for name, p in trainable(model)}
    missing = [name for name, p in trainable(model) if id(p) not in seen]
    if missing or seen - set(names):
        raise ValueError(f"the parameter groups must hold exactly the model's trainable parameters; missing "
                         f"{missing}, {len(seen - set(names))} not the model's")  # fmt: skip
    return groups


def _group_of(optimizer: torch.optim.Optimizer) -> dict:
    """id(parameter) → its parameter group (read at each step: schedulers change the groups)."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _pop_layer_states(state_dict, key: str, layers: int, owner: str) -> tuple[dict, int, list[dict]]:
    """(torch.optim's part of ``state_dict``, the saved step count, one dict per layer) from an
    optimizer's ``state_dict`` whose extra entry ``key`` holds {"steps", "layers"}; ValueError
    when the entry is missing or has another number of layers. The input is not modified."""
    state_dict = dict(state_dict)
    extra = state_dict.pop(key, None)
    if extra is None:
        raise ValueError(f"state_dict has no {key!r} entry (not from a {owner} optimizer)")
    saved = [dict(st) for st in extra["layers"]]
    if len(saved) != layers:
        raise ValueError(f"state_dict has statistics for {len(saved)} layers, this model has {layers}")
    return state_dict, int(extra["steps"]), saved


def _saved_damps(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """id(parameter) → the damp its group has in ``state_dict`` (torch.optim numbers the
    parameters across the groups in order), or its current one without saved groups."""
    current = _group_of(optimizer)
    saved = state_dict.get("param_groups")
    if not saved:
        return {key: g["damp"] for key, g in current.items()}
    index = [id(p) for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for g in saved:
        for i in g["params"]:
            if not 0 <= i < len(index):
                raise ValueError(f"state_dict's parameter groups name parameter {i}; this optimizer has {len(index)}")
            out[index[i]] = g.get("damp", current[index[i]]["damp"])
    if len(out) != len(index):
        raise ValueError("state_dict's parameter groups do not cover this optimizer's parameters")
    return out


class NaturalGradient(torch.optim.Optimizer):
    """The exact subsampled natural gradient (the exact-natural-gradient paper, appendix I): θ ← θ − lr·(λI + F̂)⁻¹g,
    F̂ = (1/B)·Σ_i g_ig_iᵀ over the per-sample gradients of a batch, from layer factors (no B×d
    array), through ``StaticInverse`` (Woodbury in gradient space where d > B).

    ``step(inputs, targets=None)`` uses the gradients already in ``.grad`` (from the caller's
    ``loss.backward()``) and builds F̂ at ``inputs``: the same batch, or an independent one
    (appendix I.5). ``fisher``: "true" (sampled labels) or "empirical" (needs targets).
    ``structure``: "full" (one F̂ over all parameters) or "layer" (block-diagonal, one F̂ block
    per layer: that paper's block-diagonal natural gradient, Figure 2). The model's trainable
    parameters must all belong to Linear, Conv1d or Conv2d layers (``layer_factors``).
    ``momentum`` (heavy ball on the direction) and decoupled ``weight_decay`` as in ``MFAC``;
    ``params``: torch.optim parameter groups over the model's trainable parameters with their own
    lr, momentum and weight_decay (one F̂, so one damp: groups that disagree on it are refused at
    the step). Cost per step: a forward and backward pass for the factors, O(B²·Σ(n_in + n_out)) for the Gram
    matrix (with P positions the cheaper of O(B²P²(n_in + n_out)) and O(BP·n_in·n_out +
    B²·n_in·n_out) per layer), O(B³) per block, and O(B·d) for the product.
    """

    def __init__(self, model: torch.nn.Module, lr, *, damp=1e-3, fisher="true", momentum=0.0, weight_decay=0.0,
                 generator=None, structure="full", params=None):  # fmt: skip
        _factor_layers(model)
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
        if structure not in ("full", "layer"):
            raise ValueError(f"structure must be 'full' or 'layer', got {structure!r}")
        self.structure = structure
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.model, self.fisher, self.generator = model, fisher, generator
        defaults = dict(lr=_check_positive(lr, "lr"), damp=_check_positive(damp, "damp"), momentum=momentum,
                        weight_decay=weight_decay)  # fmt: skip
        super().__init__(model_param_groups(model, params), defaults)
        self._ordered = [p for _, p in trainable(model)]

    def step(self, inputs, targets=None):
        groups = _group_of(self)
        params = self._ordered
        damps = {g["damp"] for g in self.param_groups}
        if len(damps) != 1:
            raise ValueError(f"the parameter groups have different damp values {sorted(damps)}; the natural gradient "
                             "has one F̂ and one damp")  # fmt: skip
        if any(p.grad is None for p in params):
            raise ValueError("every trainable parameter needs a gradient (call loss.backward() first)")
        g = torch.cat([p.grad.reshape(-1) for p in params])
        if not bool(torch.isfinite(g).all()):
            raise ValueError("the gradient contains non-finite values (nan or inf); the step is refused")
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            raise ValueError("inputs contain non-finite values (nan or inf); the step is refused")
        factors = layer_factors(self.model, inputs, targets, fisher=self.fisher, generator=self.generator)
        batch = factors.shape[0]
        blocks = factors.layer_sizes if self.structure == "layer" else None
        op = StaticInverse(factors, damps.pop(), scale=1.0 / batch, block_size=blocks)
        direction = to_tensor(op @ to_array(g.detach())).to(device=g.device)
        step, offset = Descent(), 0
        for p in params:
            n = p.numel()
            group = groups[id(p)]
            step.add(self.state[p], p, direction[offset : offset + n].view_as(p), group["lr"], group["momentum"],
                     group["weight_decay"])  # fmt: skip
            offset += n
        step.commit()
        return None


class FOOF(torch.optim.Optimizer):
    """FOOF (the exact-natural-gradient paper §4, eq. 6, appendix K): per Linear, Conv1d or Conv2d (weight
    flattened to (n_out, C_in·∏k), a convolution's inputs its patches), ΔW = ∇W·(λI + C)⁻¹ with C an
    exponential moving average (decay ``ema``) of the layer's input second moments aaᵀ (bias as
    a constant input 1), re-inverted every ``inverse_every`` steps; momentum and decoupled weight
    decay as in ``MFAC``; ``params``: torch.optim parameter groups over the model's trainable
    parameters with their own lr, damp (a layer takes its weight's group's), momentum and
    weight_decay.

    Inputs are captured by forward hooks during the caller's own forward passes: every forward
    with gradients enabled since the last ``step`` or ``zero_grad`` contributes (the micro-batches
    of an accumulated gradient; run evaluation passes under ``torch.no_grad()``), so a step is
    ``opt.zero_grad(); loss.backward(); opt.step()`` or ``opt.step(closure)`` (the closure is
    evaluated under ``torch.enable_grad()`` first, as in torch.optim, and its forward supplies the
    inputs). Layers whose input width (plus 1 with a bias) is at most ``window`` keep C as a
    dense matrix and a Cholesky factor; wider ones keep the last ``window`` rows of scaled inputs
    (√(weight)·a over the recent batches: a truncated EMA, weights below ema^k dropped) and
    invert through ``StaticInverse`` (Woodbury), the rule of the block groups. Memory: n_in² per
    narrow layer, window·n_in per wide one.

    A step is validated and staged for every layer (inputs captured and finite, gradients finite,
    new statistics and their factorizations, every parameter's new value) before anything is
    written: a step that raises changes no statistic and no parameter. ``state_dict`` carries the
    statistics and factorizations, so a resumed run continues bit for bit.
    """

    def __init__(self, model: torch.nn.Module, lr, *, damp=1e-3, ema=0.95, inverse_every=1, momentum=0.9,
                 weight_decay=0.0, window=1024, params=None):  # fmt: skip
        self.layers = _factor_layers(model)
        _check_moving_average(ema, inverse_every)
        _checked_options(dict(momentum=momentum, weight_decay=weight_decay), "")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        defaults = dict(lr=_check_positive(lr, "lr"), damp=_check_positive(damp, "damp"), momentum=momentum,
                        weight_decay=weight_decay)  # fmt: skip
        super().__init__(model_param_groups(model, params), defaults)
        self.ema, self.inverse_every, self.window = ema, inverse_every, int(window)
        self._inputs = {id(m): [] for m, _ in self.layers}
        self._stats = {id(m): {} for m, _ in self.layers}
        self._steps = 0
        self._handles = [m.register_forward_hook(self._capture) for m, _ in self.layers]

    def _capture(self, module, args, output):
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._inputs[id(module)].append(layer_inputs(module, args[0].detach()))

    def remove_hooks(self) -> None:
        """Detach the input-capturing hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's zero_grad, and the inputs captured since the last step are dropped."""
        super().zero_grad(set_to_none=set_to_none)
        for captured in self._inputs.values():
            captured.clear()

    def _layer_inputs(self, module, has_bias, k: int):
        """The inputs captured for layer k since the last step, (N, n_in + bias) float64."""
        captured = self._inputs.get(id(module)) or []
        if not captured:
            raise ValueError(f"no input was captured for layer {k}: run a forward pass with gradients enabled before "
                             "step() (or pass a closure)")  # fmt: skip
        a = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured], 0)  # tokens/patches as samples (app. K)
        a = a.to(torch.float64)
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"layer {k}'s captured inputs contain non-finite values (nan or inf); the step is refused")
        if has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
        return a

    def _updated(self, st: dict, a, damp: float, refresh: bool) -> dict:
        """The layer's new statistics (and, when ``refresh``, their new factorization), out of place."""
        new = dict(st)
        n = a.shape[1]
        if n <= self.window:  # dense C
            cov = a.T @ a / a.shape[0]
            new["C"] = cov if "C" not in st else self.ema * st["C"] + (1 - self.ema) * cov
        else:  # rows √w·a of the recent batches, newest last; weights decay by ema per step
            rows = a / math.sqrt(a.shape[0])
            old = st.get("rows")
            new["rows"] = (
                rows
                if old is None
                else torch.cat([old * math.sqrt(self.ema), rows * math.sqrt(1 - self.ema)], 0)[-self.window :]
            )
        if refresh or ("chol" not in st and "op_rows" not in st):
            if "C" in new:
                eye = torch.eye(n, dtype=new["C"].dtype, device=new["C"].device)
                chol, info = torch.linalg.cholesky_ex(new["C"] + damp * eye)
                if int(info) != 0 or not bool(torch.isfinite(chol).all()):
                    raise ValueError("λI + C is not numerically positive definite for a layer (damp too small?)")
                new["chol"] = chol
            else:
                new["op_rows"] = new["rows"]
                new["op"] = StaticInverse(to_array(new["rows"].contiguous()), damp, scale=1.0)
        return new

    @staticmethod
    def _precondition(st: dict, grad):
        """grad (n_out, n) times (λI + C)⁻¹ (C symmetric)."""
        g = grad.to(torch.float64)
        if "chol" in st:
            return torch.cholesky_solve(g.T, st["chol"]).T
        return to_tensor(st["op"].matmat(to_array(g.T.contiguous()))).to(g.device).T

    def step(self, closure=None):
        loss = None
        if closure is not None:
            for captured in self._inputs.values():
                captured.clear()  # the closure's forward supplies this step's inputs
            with torch.enable_grad():
                loss = closure()
        groups = _group_of(self)
        refresh = self._steps % self.inverse_every == 0
        staged, step = {}, Descent()
        for k, (module, has_bias) in enumerate(self.layers):  # 1. validate and stage everything
            a = self._layer_inputs(module, has_bias, k)
            damp = groups[id(module.weight)]["damp"]  # a layer's damp is its weight's group's
            st = self._updated(self._stats[id(module)], a, damp, refresh)
            staged[id(module)] = st
            grad = _layer_gradient(module, has_bias)
            if grad is None:
                continue
            if not bool(torch.isfinite(grad).all()):
                raise ValueError(f"layer {k}'s gradient contains non-finite values (nan or inf); the step is refused")
            _stage_layer_step(step, self.state, groups, module, has_bias, self._precondition(st, grad))
        for key, st in staged.items():  # 2. commit (nothing here can fail)
            self._stats[key] = st
        self._steps += 1
        step.commit()
        for captured in self._inputs.values():
            captured.clear()
        return loss

    def state_dict(self):
        """torch.optim's state plus FOOF's: the step count and every layer's statistics and
        factorization (tensors; loads with ``torch.load(weights_only=True)``)."""
        state = super().state_dict()
        layers = [{k: v for k, v in self._stats[id(m)].items() if k != "op"} for m, _ in self.layers]
        state["foof"] = {"steps": self._steps, "layers": layers}
        return state

    def load_state_dict(self, state_dict):
        state_dict, steps, layers = _pop_layer_states(state_dict, "foof", len(self.layers), "FOOF")
        damps = _saved_damps(self, state_dict)
        stats = {}
        for (module, has_bias), st in zip(self.layers, layers):
            damp = damps[id(module.weight)]
            n = module.weight[0].numel() + bool(has_bias)
            st = dict(st)
            for key in ("C", "chol"):
                if key in st and tuple(st[key].shape) != (n, n):
                    raise ValueError(f"state_dict's {key!r} has shape {tuple(st[key].shape)}, the layer needs {(n, n)}")
            for key in ("rows", "op_rows"):
                if key in st and st[key].shape[-1] != n:
                    raise ValueError(f"state_dict's {key!r} has {st[key].shape[-1]} columns, the layer needs {n}")
            if "op_rows" in st:
                st["op"] = StaticInverse(to_array(st["op_rows"].contiguous()), damp, scale=1.0)
            stats[id(module)] = st
        super().load_state_dict(state_dict)
        self._stats, self._steps = stats, steps
