"""PyTorch: KFAC beside the exact natural gradient and FOOF (the exact-natural-gradient paper's
comparison: KFAC with standard and with heuristic damping, §3.1 eq. 3–4, derived in appendix E).

Per layer with weight W (n_out × n, n = n_in + 1 with a bias, the bias as a constant input 1),
KFAC replaces the layer's block of the Fisher by a Kronecker product of two small factors,

    A = (1/B)·Σ_i Σ_p a_ip a_ipᵀ   (n × n),    S = (1/(B·P))·Σ_i Σ_p e_ip e_ipᵀ   (n_out × n_out),

from the layer's inputs a and the gradients e of each sample's own loss with respect to its
outputs (``natural.layer_pairs``: labels drawn from the model for the true Fisher, the targets
for the empirical one), over P positions for a convolution or a layer over tokens (P = 1 for a
Linear on (B, n_in): then S ⊗ A is the exact Fisher block when a and e are independent; for P > 1
this is the "expand" convention of Kronecker factors for convolutions). In the parameters'
row-major layout the block is S ⊗ A, and the direction for the gradient Gw (n_out × n) is

    standard damping:  vec Δ = (S ⊗ A + λI)⁻¹ vec Gw
                       = Q_S [(Q_Sᵀ Gw Q_A) / (s aᵀ + λ)] Q_Aᵀ       (eigendecompositions of S, A)
    heuristic damping: Δ = (S + (√λ/π) I)⁻¹ Gw (A + π√λ I)⁻¹,
                       π = √((tr A / n) / (tr S / n_out))             (the π-split of λ)

Both factors are exponential moving averages (decay ``ema``) and are decomposed again every
``inverse_every`` steps (amortised inversion). Cost per step: a forward and backward pass for
a and e, O(B·P·(n² + n_out²)) per layer for the factors and, on a refresh, O(n³ + n_out³).
"""

from __future__ import annotations

import math

import torch  # noqa: TID253 (this module is the adapter)

from .natural import (
    _check_moving_average,
    _check_positive,
    _checked_options,
    _factor_layers,
    _group_of,
    _layer_gradient,
    _pop_layer_states,
    _stage_layer_step,
    layer_pairs,
    model_param_groups,
)
from .torch import Descent

__all__ = ["KFAC", "kronecker_factors"]

DAMPINGS = ("standard", "heuristic")


def kronecker_factors(layers, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, S) per layer in float64 from ``natural.layer_pairs``'s output (module docstring)."""
    out = []
    for (_, has_bias), (a, e) in zip(layers, pairs):
        batch = a.shape[0]
        a = a.reshape(-1, a.shape[-1]).to(torch.float64)
        e = e.reshape(-1, e.shape[-1]).to(torch.float64)
        if has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
        positions = e.shape[0] // batch
        out.append((a.T @ a / batch, e.T @ e / (batch * positions)))
    return out


def pi_split(A: torch.Tensor, S: torch.Tensor) -> float:
    """π = √((tr A / n) / (tr S / n_out)), 1 where either trace is 0 (a factor with no signal)."""
    ta, ts = float(torch.trace(A)) / A.shape[0], float(torch.trace(S)) / S.shape[0]
    return math.sqrt(ta / ts) if ta > 0 and ts > 0 else 1.0


class KFAC(torch.optim.Optimizer):
    """KFAC for the Linear, Conv1d and Conv2d layers of ``model`` (module docstring): θ ← θ − lr·Δ
    per layer, Δ the gradient preconditioned by the damped Kronecker factors.

    ``step(inputs, targets=None)`` uses the gradients already in ``.grad`` (the caller's
    ``loss.backward()``) and updates the factors at ``inputs`` (one more forward and backward
    pass, like ``NaturalGradient``). ``damping``: "standard" (the exact inverse of S ⊗ A + λI) or
    "heuristic" (the π-split). ``fisher``: "true" (labels drawn from the model; ``generator``) or
    "empirical" (needs targets). ``loss``: "cross_entropy" or "mse". ``ema`` the factors' moving
    average (0: this batch only), ``inverse_every`` the refresh period of the decompositions;
    momentum and decoupled weight decay as in ``MFAC``; ``params``: torch.optim parameter groups
    over the model's trainable parameters with their own lr, damp (a layer takes its weight's
    group's), momentum and weight_decay. A step is validated and staged for every
    layer before anything is written: a step that raises changes no factor and no parameter.
    ``state_dict`` carries the factors and their decompositions (a resumed run continues bit for
    bit). Memory: n² + n_out² per layer (and the same again for the decompositions).
    """

    def __init__(self, model: torch.nn.Module, lr, *, damp=1e-3, damping="standard", fisher="true", ema=0.95,
                 inverse_every=1, momentum=0.0, weight_decay=0.0, generator=None, loss="cross_entropy",
                 params=None):  # fmt: skip
        self.layers = _factor_layers(model)
        if damping not in DAMPINGS:
            raise ValueError(f"damping must be one of {DAMPINGS}, got {damping!r}")
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
        _check_moving_average(ema, inverse_every)
        _checked_options(dict(momentum=momentum, weight_decay=weight_decay), "")
        self.model, self.damping, self.fisher, self.loss, self.generator = model, damping, fisher, loss, generator
        self.ema, self.inverse_every = float(ema), inverse_every
        defaults = dict(lr=_check_positive(lr, "lr"), damp=_check_positive(damp, "damp"), momentum=momentum,
                        weight_decay=weight_decay)  # fmt: skip
        super().__init__(model_param_groups(model, params), defaults)
        self._factors: list[dict] = [{} for _ in self.layers]
        self._steps = 0

    # -- per layer, out of place
    def _updated(self, st: dict, A, S, damp: float, refresh: bool) -> dict:
        new = dict(st)
        if "A" in st:
            A, S = self.ema * st["A"] + (1 - self.ema) * A, self.ema * st["S"] + (1 - self.ema) * S
        new["A"], new["S"] = A, S
        if refresh or "QA" not in st and "LA" not in st:
            if self.damping == "standard":
                ea, QA = torch.linalg.eigh(A)
                es, QS = torch.linalg.eigh(S)
                # PSD factors: rounding may leave eigenvalues slightly below 0; λ keeps s·a + λ > 0
                new.update(QA=QA, ea=ea.clamp_min(0), QS=QS, es=es.clamp_min(0))
            else:
                pi, root = pi_split(A, S), math.sqrt(damp)
                new.update(LA=self._cholesky(A, pi * root), LS=self._cholesky(S, root / pi))
        return new

    @staticmethod
    def _cholesky(M, shift: float):
        L, info = torch.linalg.cholesky_ex(M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            raise ValueError("a damped Kronecker factor is not numerically positive definite (damp too small?)")
        return L

    def _precondition(self, st: dict, grad, damp: float):
        """Δ for the layer's gradient (n_out, n), float64."""
        g = grad.to(torch.float64)
        if "QA" in st:
            V = st["QS"].T @ g @ st["QA"]
            V = V / (st["es"][:, None] * st["ea"][None, :] + damp)
            return st["QS"] @ V @ st["QA"].T
        left = torch.cholesky_solve(g, st["LS"])  # (S + √λ/π I)⁻¹ Gw
        return torch.cholesky_solve(left.T, st["LA"]).T  # … (A + π√λ I)⁻¹ (symmetric)

    def step(self, inputs, targets=None):
        groups = _group_of(self)
        for p in (p for g in self.param_groups for p in g["params"]):
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise ValueError("the gradient contains non-finite values (nan or inf); the step is refused")
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            raise ValueError("inputs contain non-finite values (nan or inf); the step is refused")
        layers, pairs = layer_pairs(self.model, inputs, targets, fisher=self.fisher, generator=self.generator,
                                    loss=self.loss)  # fmt: skip
        refresh = self._steps % self.inverse_every == 0
        staged, step = [], Descent()
        for k, ((module, has_bias), (A, S)) in enumerate(zip(layers, kronecker_factors(layers, pairs))):
            if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(S).all())):
                raise ValueError(f"layer {k}'s Kronecker factors are not finite; the step is refused")
            damp = groups[id(module.weight)]["damp"]
            st = self._updated(self._factors[k], A, S, damp, refresh)
            staged.append(st)
            grad = _layer_gradient(module, has_bias)
            if grad is not None:
                _stage_layer_step(step, self.state, groups, module, has_bias, self._precondition(st, grad, damp))
        self._factors = staged  # commit (nothing below can fail)
        self._steps += 1
        step.commit()
        return None

    def state_dict(self):
        """torch.optim's state plus KFAC's: the step count, every layer's factors and their
        decompositions (tensors; loads with ``torch.load(weights_only=True)``)."""
        state = super().state_dict()
        state["kfac"] = {"steps": self._steps, "layers": [dict(st) for st in self._factors]}
        return state

    def load_state_dict(self, state_dict):
        state_dict, steps, layers = _pop_layer_states(state_dict, "kfac", len(self.layers), "KFAC")
        for (module, has_bias), st in zip(self.layers, layers):
            n, n_out = module.weight[0].numel() + bool(has_bias), module.weight.shape[0]
            for key, size in (("A", n), ("QA", n), ("LA", n), ("S", n_out), ("QS", n_out), ("LS", n_out)):
                if key in st and tuple(st[key].shape) != (size, size):
                    raise ValueError(f"state_dict's {key!r} has shape {tuple(st[key].shape)}, the layer needs "
                                     f"{(size, size)}")  # fmt: skip
            wrong = {"standard": ("LA", "LS"), "heuristic": ("QA", "QS")}[self.damping]
            if any(key in st for key in wrong):
                raise ValueError(f"state_dict's decompositions are not those of damping={self.damping!r}")
        super().load_state_dict(state_dict)
        self._factors, self._steps = layers, steps
