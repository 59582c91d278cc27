"""What the curvature engine needs to know about an optimizer: its preconditioner, rate and threshold.

The stability picture of an optimizer is one inequality (Cohen et al. 2021,
2022): a step with rate ``eta`` and diagonal preconditioner ``P`` is stable on
a quadratic with Hessian ``H`` while ``lambda_max(P^-1 H)`` stays below the
threshold of the optimizer's momentum form (:mod:`eos_toolkit.thresholds`,
the one home of every threshold formula). eos_toolkit measures
``lambda_max(P^-1 H)`` for any ``P`` it is given as data (the operators
never read an optimizer); this module says what ``P``, ``eta`` and the
threshold are for each optimizer family, read from the optimizer's live state. One adapter per
family, chosen by the optimizer's class (:func:`adapter_for`): torch.optim's
SGD, Adam, AdamW, RAdam and RMSprop by their classes, and any optimizer that
is AdamW at a rate it chooses each step (VRAdam) by the protocol it
satisfies, :class:`GatedAdam`, so this package never imports the optimizer.
An optimizer without an adapter is a clear error, never Adam's formula by
default; :func:`register_adapter` teaches the toolkit a new family.

Each adapter is defined by the identity its tests check against the
optimizer's own step: after a step with scheduled rate ``lr``,

    theta_{t+1} - theta_t = -rate * P^-1 * direction      (weight decay aside)

with ``rate = effective_rate(optimizer, lr)``, ``P = preconditioner(...)`` and
``direction`` the momentum-form quantity of the family:

===========  ==================================  ===============================  =========================
family       P (diagonal)                        direction                        threshold (at rate)
===========  ==================================  ===============================  =========================
SGD          none (the raw Hessian)              g; heavy ball: buf;              2/eta; heavy ball
                                                 Nesterov: g + beta buf           2(1+b)/((1-d) eta);
                                                                                  Nesterov 2(1+b)/((1+2b) eta)
Adam, AdamW  (1 - beta1^t)(sqrt(v_t/(1-beta2^t)) + eps)   exp_avg (m_t)           2(1+beta1)/((1-beta1) eta)
GatedAdam    as Adam; rate = eta_t (the gate)    exp_avg                          as Adam
RAdam        (1-beta1^t)(sqrt(v_t)+eps) / (sqrt(1-beta2^t) r_t) once rho_t > 5,   as Adam
             else (1 - beta1^t) (plain momentum steps)
RMSprop      sqrt(v_t) + eps (centered: sqrt(v_t - gbar_t^2) + eps)   g; with momentum P * buf   2/eta; momentum 2(1+b)/eta
===========  ==================================  ===============================  =========================

(``d`` is SGD's dampening; ``r_t`` RAdam's rectification; torch's RMSprop
momentum is heavy-ball form, so its threshold is the heavy-ball one, 10x
below the EMA form's at 0.9.) RAdam's rectification is folded into ``P``, so
its preconditioned sharpness is compared with the same ``38/lr`` line as
Adam's. Param groups with different rates fold the ratio to group 0's rate
into ``P`` (preconditioned families) so one threshold applies.

Which step: a measurement at tracking step ``t`` (parameters theta_t, before
step ``t`` is taken) is compared with the step that produced theta_t, step
``t - 1``: its scheduled ``lr``, its effective rate and the preconditioner it
left in the optimizer state (``eos_toolkit/record.py`` documents this for the
recorded thresholds).

Example::

    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.Adam([p], lr=0.1)
    >>> adapter = adapter_for(opt)
    >>> adapter.name, adapter.preconditioned, round(adapter.threshold(opt, 0.1), 6)
    ('adam', True, 380.0)
    >>> adapter.preconditioner(opt, [p]) is None   # no state before the first step
    True
    >>> adapter_for(torch.optim.NAdam([p]))
    Traceback (most recent call last):
    ...
    ValueError: no stability adapter for NAdam: its preconditioner and threshold are unknown to the toolkit; adapters exist for Adam, AdamW, RAdam, RMSprop, SGD and any GatedAdam optimizer such as VRAdam (register_adapter adds one)
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from .thresholds import adam_threshold, gd_threshold, heavy_ball_threshold, nesterov_threshold

Rate = float | torch.Tensor


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError(f"a parameter of shape {tuple(param.shape)} is not managed by the optimizer")


def _step_count(state: dict) -> float | torch.Tensor:
    """The state's step count: a float for a CPU count (as torch.optim computes bias corrections), else a device tensor."""
    step = state["step"]
    if isinstance(step, torch.Tensor) and step.device.type == "cpu":
        return float(step)  # CPU tensor: no device sync
    return step


def _same_in_every_group(optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> None:
    first = optimizer.param_groups[0]
    for i, group in enumerate(optimizer.param_groups[1:], start=1):
        for key in keys:
            if group.get(key) != first.get(key):
                raise ValueError(
                    f"param group {i} has {key}={group.get(key)!r} but group 0 has {first.get(key)!r}: one "
                    f"stability threshold needs the same {key} in every group")


class OptimizerAdapter:
    """Base class: the preconditioner, effective rate, threshold and step direction of one family.

    ``preconditioned``: whether the family's stability is read on
    ``lambda_max(P^-1 H)`` (True) or on the raw ``lambda_max(H)``.
    ``gated``: whether the effective rate differs from the scheduled ``lr``
    by a factor the optimizer chooses per step (VRAdam's eta_t).
    """

    name = "base"
    preconditioned = False
    gated = False
    #: group keys that must agree across param groups for one threshold
    uniform_keys: tuple[str, ...] = ()

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ValueError if the optimizer's configuration has no single threshold."""
        _same_in_every_group(optimizer, self.uniform_keys)

    def threshold(self, optimizer: torch.optim.Optimizer, rate: Rate) -> Rate:
        raise NotImplementedError

    def effective_rate(self, optimizer: torch.optim.Optimizer, lr: Rate) -> Rate:
        """The rate of the last step, given the scheduled ``lr`` it was taken with."""
        return lr

    def group_rate(self, optimizer: torch.optim.Optimizer, group: dict) -> Rate:
        """A group's current rate (compared with group 0's to fold differences into ``P``)."""
        return group["lr"]

    def base_preconditioner(self, optimizer, param, group) -> torch.Tensor | None:
        """``P`` for one parameter (same shape), or None when its state is missing."""
        return torch.ones_like(param)

    def direction(self, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preconditioner(self, optimizer: torch.optim.Optimizer, params) -> torch.Tensor | None:
        """The diagonal of ``P`` flattened over ``params`` (in order), or None if any lacks state.

        On the parameters' device, without host syncs. Groups whose rate
        differs from group 0's contribute ``P * rate_0 / rate_group``.
        """
        groups = optimizer.param_groups
        index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}  # one pass, not one per parameter
        rate0 = self.group_rate(optimizer, groups[0])
        scale = {}  # group -> rate_0 / rate_group, computed once per group
        diags = []
        for p in params:
            if id(p) not in index:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is not managed by the optimizer")
            i = index[id(p)]
            diag = self.base_preconditioner(optimizer, p, groups[i])
            if diag is None:
                return None
            if i:
                if i not in scale:
                    scale[i] = _rate_ratio(rate0, self.group_rate(optimizer, groups[i]))
                diag = diag * scale[i]
            diags.append(diag.detach().reshape(-1))
        return torch.cat(diags)

    def predicted_update(self, optimizer: torch.optim.Optimizer, params, lr: float) -> torch.Tensor:
        """``-rate * P^-1 * direction`` flattened over ``params``: the step the adapter says was taken.

        For checking an adapter against the optimizer's own step (weight decay 0).
        """
        P = self.preconditioner(optimizer, params)
        if P is None:
            raise ValueError("the optimizer has no state for these parameters yet: take a step first")
        d = torch.cat([self.direction(optimizer, p).reshape(-1) for p in params])
        return -self.effective_rate(optimizer, lr) * d / P


def _rate_ratio(rate0: Rate, rate: Rate) -> Rate:
    """``rate0 / rate``: 1 for equal rates (a schedule at 0 moves every group to 0), inf for a group that
    does not move while group 0 does (its P is infinite: it sets no bound).  Tensors stay on the device."""
    if isinstance(rate0, torch.Tensor) or isinstance(rate, torch.Tensor):
        rate0, rate = torch.as_tensor(rate0), torch.as_tensor(rate)
        return torch.where(rate0 == rate, torch.ones_like(rate0 / 1.0), rate0 / rate)
    if rate0 == rate:
        return 1.0
    return rate0 / rate if rate else math.inf


class SGDAdapter(OptimizerAdapter):
    """torch.optim.SGD: gradient descent, heavy ball (with dampening) or Nesterov; the raw Hessian."""

    name = "sgd"
    uniform_keys = ("lr", "momentum", "dampening", "nesterov")

    def threshold(self, optimizer, rate):
        group = optimizer.param_groups[0]
        beta = group["momentum"]
        if beta == 0:
            return gd_threshold(rate)
        if group["nesterov"]:
            return nesterov_threshold(rate, beta)
        # buf <- beta buf + (1 - d) g; theta -= lr buf: heavy ball at rate lr (1 - d).
        return heavy_ball_threshold(rate * (1 - group["dampening"]), beta)

    def direction(self, optimizer, param):
        group = _group_of(optimizer, param)
        beta = group["momentum"]
        if beta == 0:
            return param.grad
        buf = optimizer.state[param]["momentum_buffer"]
        if group["nesterov"]:
            return param.grad + beta * buf
        return buf  # buf <- beta buf + (1 - d) g: the dampening is in the threshold


class AdamAdapter(OptimizerAdapter):
    """torch.optim.Adam and AdamW (amsgrad: the running maximum of v)."""

    name = "adam"
    preconditioned = True
    uniform_keys = ("betas",)

    def threshold(self, optimizer, rate):
        return adam_threshold(rate, optimizer.param_groups[0]["betas"][0])

    @staticmethod
    def second_moment_state(optimizer, param, group):
        """(state, beta1, beta2, step count), or None before the parameter's first step."""
        state = optimizer.state.get(param, {})
        if "exp_avg_sq" not in state or "step" not in state:
            return None
        return (state, *group["betas"], _step_count(state))

    def base_preconditioner(self, optimizer, param, group):
        moments = self.second_moment_state(optimizer, param, group)
        if moments is None:
            return None
        state, beta1, beta2, step = moments
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        return (1 - beta1 ** step) * ((v / (1 - beta2 ** step)).sqrt() + group["eps"])

    def direction(self, optimizer, param):
        return optimizer.state[param]["exp_avg"]


@runtime_checkable
class GatedAdam(Protocol):
    """An optimizer whose step is AdamW's at a rate it chooses each step (VRAdam's gate).

    Adam-shaped state per parameter (``step``, ``exp_avg``, ``exp_avg_sq``),
    Adam's group keys (``betas``, ``eps``, ``amsgrad`` absent or False), and
    ``telemetry(i)["eta"]``: the rate group ``i`` stepped with, a 0-dim
    tensor, also kept as the group's ``"eta"`` key.  VRAdam satisfies it.
    """

    def telemetry(self, group_index: int = 0) -> dict: ...


class GatedAdamAdapter(AdamAdapter):
    """A :class:`GatedAdam` optimizer: Adam's preconditioner at the gated rate eta_t (per group as it gates)."""

    name = "gated_adam"
    gated = True

    def effective_rate(self, optimizer, lr):
        # eta_t of group 0's last step, a 0-dim device tensor (lr is inside it already).
        return optimizer.telemetry(0)["eta"].detach().clone()

    def group_rate(self, optimizer, group):
        return group["eta"]


class RAdamAdapter(AdamAdapter):
    """torch.optim.RAdam: rectified steps once the variance is tractable (rho_t > 5), momentum steps before."""

    name = "radam"

    def base_preconditioner(self, optimizer, param, group):
        moments = self.second_moment_state(optimizer, param, group)
        if moments is None:
            return None
        state, beta1, beta2, step = moments
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * beta2 ** step / bc2
        plain = torch.full_like(param, 1.0) * bc1
        if isinstance(rho_t, float) and rho_t <= 5.0:
            return plain
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        rect = math.sqrt(rect) if isinstance(rect, float) else rect.clamp_min(0).sqrt()
        rectified = bc1 * (state["exp_avg_sq"].sqrt() + group["eps"]) / (bc2 ** 0.5 * rect)
        if isinstance(rho_t, float):
            return rectified
        return torch.where(rho_t > 5.0, rectified, plain)  # device step count: no sync


class RMSpropAdapter(OptimizerAdapter):
    """torch.optim.RMSprop: P = sqrt(v) + eps; torch's momentum is heavy-ball form."""

    name = "rmsprop"
    preconditioned = True
    uniform_keys = ("momentum",)

    def threshold(self, optimizer, rate):
        beta = optimizer.param_groups[0]["momentum"]
        return heavy_ball_threshold(rate, beta) if beta > 0 else gd_threshold(rate)

    def base_preconditioner(self, optimizer, param, group):
        state = optimizer.state.get(param, {})
        if "square_avg" not in state:
            return None
        v = state["square_avg"]
        if group.get("centered"):
            v = v - state["grad_avg"] ** 2
        return v.sqrt() + group["eps"]

    def direction(self, optimizer, param):
        group = _group_of(optimizer, param)
        if group["momentum"] > 0:  # buf <- beta buf + g / P; theta -= lr buf
            return self.base_preconditioner(optimizer, param, group) * optimizer.state[param]["momentum_buffer"]
        return param.grad


_ADAPTERS: dict[type, OptimizerAdapter] = {
    torch.optim.SGD: SGDAdapter(),
    torch.optim.Adam: AdamAdapter(),
    torch.optim.AdamW: AdamAdapter(),
    torch.optim.RAdam: RAdamAdapter(),
    torch.optim.RMSprop: RMSpropAdapter(),
}
_GATED_ADAM = GatedAdamAdapter()


def register_adapter(optimizer_class: type, adapter: OptimizerAdapter) -> None:
    """Teach the toolkit an optimizer family (check it with :meth:`OptimizerAdapter.predicted_update`)."""
    _ADAPTERS[optimizer_class] = adapter


def adapter_for_class(optimizer_class: type) -> OptimizerAdapter:
    """The adapter of exactly this class (a subclass may change the step, so it is not inherited), or of
    the :class:`GatedAdam` protocol the class satisfies."""
    if optimizer_class in _ADAPTERS:
        return _ADAPTERS[optimizer_class]
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, GatedAdam):
        return _GATED_ADAM
    known = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise ValueError(
        f"no stability adapter for {optimizer_class.__name__}: its preconditioner and threshold are unknown to "
        f"the toolkit; adapters exist for {known} and any GatedAdam optimizer such as VRAdam (register_adapter "
        "adds one)")


def adapter_for(optimizer: torch.optim.Optimizer) -> OptimizerAdapter:
    """The adapter of ``optimizer``'s class, after checking that one threshold applies to all its groups."""
    adapter = adapter_for_class(type(optimizer))
    adapter.check(optimizer)
    return adapter
