"""Optimizers in continuous time, as a central flow needs them: gradient descent, RMSProp, Adam, VRAdam.

A central flow (:mod:`eos_toolkit.central_flow`; Cohen, Damian, Talwalkar,
Kolter and Lee, "Understanding Optimization in Deep Learning with Central
Flows", ICLR 2025) follows the time average ``w`` of an optimizer's
iterates ``w + delta`` while they oscillate at the edge of stability.  Every
optimizer here is written as one preconditioned flow, time in steps::

    dw/dt = -rho D^-1 gbar,          gbar = E[grad L(w + delta)]

with ``rho`` the rate, ``D`` a positive diagonal (1 for gradient descent)
and ``delta`` the oscillation, of covariance ``Sigma = U X U^T`` along the
top eigenvectors ``U`` of ``D^-1 H`` (``U^T D U = I``).  The step is
stable while ``lambda_max(D^-1 H) <= tau / rho`` (:mod:`eos_toolkit.thresholds`),
``tau = 2`` for gradient descent and RMSProp and ``2 (1 + beta1) / (1 - beta1)``
(38 at 0.9) for Adam and VRAdam.  To second order in ``delta``::

    gbar      = grad L(w) + 1/2 grad <H(w), Sigma>  = g + 1/2 sum_ij X_ij D^3L[u_i, u_j, .]
    E[g^2]    = g^2 + diag(H Sigma H)                (elementwise squares)
    E[L]      = L(w) + 1/2 tr(H Sigma)                (the loss the flow predicts)

**Gradient descent** (``w <- w - eta g``): ``rho = eta``, ``D = 1``, no state;
the paper's flow.

**RMSProp** (torch's ``RMSprop``: ``nu_t = alpha nu_{t-1} + (1 - alpha) g_t^2``,
``w <- w - eta g_t / (sqrt(nu_t) + eps)``): ``D = sqrt(nu) + eps``.  The
recurrence is exactly ``nu_t - nu_{t-1} = ((1 - alpha) / alpha)(g_t^2 - nu_t)``
in the value ``nu_t`` the step uses, hence the paper's ODE
``dnu/dt = ((1 - alpha) / alpha)(E[g^2] - nu)``, with ``E[g^2]`` as above
(the paper's approximation: the cross term ``g * D^3L[Sigma]`` of the same
order is left out there and here).  ``nu(0) = (1 - alpha) g(w_0)^2``, the
value the first discrete step uses.

**Adam** (this toolkit's extension; the paper has no momentum).  Discrete:
``m_t = beta1 m + (1 - beta1) g_t``, ``nu_t`` as RMSProp with ``beta2``,
``w <- w - eta mhat_t / (sqrt(nuhat_t) + eps)`` with the bias corrections
``mhat = m / (1 - beta1^t)``, ``nuhat = nu / (1 - beta2^t)``.  Assumptions:

(A1) the momentum is quasi-static: ``mhat = gbar``.  Its memory, about
``1 / (1 - beta1)`` = 10 steps, is short next to the time on which the
flow moves, and for a constant gradient ``mhat = g`` exactly.  Momentum
then leaves one trace: the threshold.  A period-two oscillation through
the moving average has gain ``(1 - beta1) / (1 + beta1)``, so the flip
mode of ``D^-1 H`` goes unstable at ``2 (1 + beta1) / ((1 - beta1) eta)``
(Cohen et al. 2022, the "adaptive edge of stability").  Keeping ``m`` as a
state of its own would make the constraint act on ``d^2 S / dt^2`` (``X``
would no longer enter ``dw/dt``); the quasi-static form keeps the paper's
mechanism.  (A2) ``nuhat`` carries the bias correction of the discrete step
``t + 1`` at flow time ``t``; ``nu(0) = (1 - beta2) g(w_0)^2``.  So ``D``
has no ``1 - beta1^t`` factor, unlike the preconditioner the toolkit's
adapter reads from Adam's raw ``exp_avg`` (the two agree to 0.5% once
``t > 50``).  A1 fails in the first tens of steps, while the moving
average is still filling; and the flow's fast modes, rate up to
``tau = 38`` per step, need Euler steps ten times shorter than gradient
descent's (:mod:`eos_toolkit.central_flow` takes them).

**VRAdam** (this toolkit's extension): Adam at the gated rate
``rho = lr / (1 + min(beta3 s, alpha1))`` with ``s = E|m|^2`` (raw ``m``,
the paper's gate).  (A3) ``m = mbar + m_osc``: the quasi-static part is
``mbar = (1 - beta1^(t+1)) gbar`` (the raw moving average of a constant
gradient) and the oscillation of the gradient along the edge directions,
``H delta``, of period two, passes through the moving average with gain
``(1 - beta1) / (1 + beta1)``, so
``E|m|^2 = |mbar|^2 + ((1 - beta1) / (1 + beta1))^2 tr(H Sigma H)``.
This is the expectation of the gate's input only: the gate also sees the
alternating cross term ``2 (-1)^t mbar . m_osc``, and the correlation of
``eta_t`` with the step's own sign is of the same order as the terms kept
(small at ``beta1 = 0.9``, where ``m_osc`` is 0.05 of ``H delta``; not at
``beta1 = 0``).
(A4) the gate is evaluated with the oscillation of the previous substep,
so ``rho`` is known when ``X`` is chosen and the complementarity problem
stays linear; its drift ``d rho / dt`` is the previous substep's
difference.  The threshold moves with the gate: ``38 / rho``, the
toolkit's ``precond_threshold_eta``.  The lag is harmless while the
oscillation's share of the gate is small (its gain squared is 0.0028 at
``beta1 = 0.9``); where it is large (``beta1 = 0``, ``beta3 tr(H Sigma H)``
near 1) the explicit gate makes the sharpness jitter by a few percent
about the threshold.

Not covered, each a clear error (:func:`flow_rule_for`): weight decay,
momentum SGD and Nesterov, centered RMSprop or RMSprop with momentum,
AMSGrad, RAdam, VRAdam gates other than the paper's (``gate="velocity"``,
``power=2``, ``norm_scope="global"``), and param groups with different
hyperparameters.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> rule = flow_rule_for(torch.optim.Adam([p], lr=1e-3))
    >>> rule.name, round(rule.threshold(1e-3), 6)
    ('adam', 38000.0)
    >>> flow_rule_for(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    Traceback (most recent call last):
    ...
    ValueError: no central flow for SGD with momentum=0.9: flows exist for gradient descent, RMSProp, Adam and VRAdam (momentum 0, no weight decay)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import GatedAdam
from .thresholds import adam_threshold, gd_threshold

#: the optimizers a central flow exists for (the error messages list them)
FLOW_FAMILIES = "gradient descent, RMSProp, Adam and VRAdam (momentum 0, no weight decay)"


@dataclass
class FlowState:
    """What a flow carries besides the weights: the time (in steps) and the second moment ``nu``."""

    t: float = 0.0
    nu: torch.Tensor | None = None


class FlowRule:
    """One optimizer in continuous time (module docstring).  ``lr`` may change between steps (a schedule)."""

    name = "base"
    display = "base"
    has_moment = False  # carries nu
    gated = False  # rho depends on the oscillation (VRAdam)

    def __init__(self, lr: float):
        self.lr = float(lr)

    def threshold(self, rate: float) -> float:
        """``tau / rate``: the bound on ``lambda_max(D^-1 H)``."""
        return float(gd_threshold(rate))

    def start(self, gradient: torch.Tensor) -> FlowState:
        """The state at ``w_0`` whose gradient is ``gradient``."""
        return FlowState()

    def state_from(self, optimizer: torch.optim.Optimizer, params, gradient: torch.Tensor, t: int) -> FlowState:
        """The state at a running optimizer's weights after ``t`` steps: the ``nu`` its next step will use.

        ``params``: the parameters in the flat order of ``gradient`` (the
        gradient at the current weights).  Before any step: :meth:`start`.
        """
        return FlowState(t=float(t))

    def rate(self, state: FlowState, gbar_sq_norm: float = 0.0, oscillation_sq: float = 0.0) -> float:
        """``rho``: ``lr``, or VRAdam's gated rate from ``|gbar|^2`` and ``tr(H Sigma H)``."""
        return self.lr

    def denominator(self, state: FlowState) -> torch.Tensor | None:
        """``D`` (None: the identity)."""
        return None

    def moment_velocity(self, state: FlowState, mean_sq: torch.Tensor, homogeneous: bool) -> torch.Tensor:
        """``dnu/dt`` for ``E[g^2] = mean_sq``; ``homogeneous``: the part linear in ``mean_sq`` only."""
        raise NotImplementedError

    def denominator_velocity(self, state: FlowState, dnu: torch.Tensor, homogeneous: bool) -> torch.Tensor:
        """``dD/dt`` for ``dnu/dt = dnu``; ``homogeneous``: without the drift of the bias correction."""
        raise NotImplementedError

    def advance(self, state: FlowState, dnu: torch.Tensor | None, dt: float) -> FlowState:
        nu = None if state.nu is None else (state.nu + dt * dnu).clamp_min(0.0)
        return FlowState(t=state.t + dt, nu=nu)


class GradientDescentFlow(FlowRule):
    name, display = "gd", "GD"


class RMSPropFlow(FlowRule):
    """torch's RMSprop (momentum 0, not centered): ``D = sqrt(nu) + eps``."""

    name, display = "rmsprop", "RMSProp"
    has_moment = True

    def __init__(self, lr: float, alpha: float, eps: float):
        super().__init__(lr)
        self.alpha, self.eps = float(alpha), float(eps)
        self.speed = (1 - self.alpha) / self.alpha  # dnu/dt = speed (E[g^2] - nu)

    state_key = "square_avg"  # torch's RMSprop; Adam's and VRAdam's: exp_avg_sq

    def start(self, gradient):
        return FlowState(nu=(1 - self.alpha) * gradient.square())

    def state_from(self, optimizer, params, gradient, t):
        states = [optimizer.state.get(p, {}) for p in params]
        if t == 0 or not all(self.state_key in s for s in states):
            return FlowState(t=float(t), nu=self.start(gradient).nu)
        previous = torch.cat([s[self.state_key].reshape(-1) for s in states]).to(gradient)
        return FlowState(t=float(t), nu=self.alpha * previous + (1 - self.alpha) * gradient.square())

    def moment_velocity(self, state, mean_sq, homogeneous):
        return self.speed * (mean_sq if homogeneous else mean_sq - state.nu)

    def _nu_hat(self, state):
        return state.nu

    def denominator(self, state):
        return self._nu_hat(state).sqrt() + self.eps

    def denominator_velocity(self, state, dnu, homogeneous):
        root = self._nu_hat(state).sqrt()
        safe = torch.where(root > 0, root, torch.ones_like(root))
        return torch.where(root > 0, dnu / (2 * safe), torch.zeros_like(root))


class AdamFlow(RMSPropFlow):
    """Adam with quasi-static momentum (A1, A2): ``D = sqrt(nu / (1 - beta2^(t+1))) + eps``, threshold 38/rho."""

    name, display = "adam", "Adam"
    state_key = "exp_avg_sq"

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float):
        super().__init__(lr, alpha=beta2, eps=eps)
        self.beta1, self.beta2 = float(beta1), float(beta2)

    def threshold(self, rate):
        return float(adam_threshold(rate, self.beta1))

    def _correction(self, state):
        return 1 - self.beta2 ** (state.t + 1)

    def _nu_hat(self, state):
        return state.nu / self._correction(state)

    def denominator_velocity(self, state, dnu, homogeneous):
        b = self._correction(state)
        dnu_hat = dnu / b
        if not homogeneous:  # d/dt 1/b(t) = beta2^(t+1) ln(beta2) / b^2
            dnu_hat = dnu_hat + state.nu * (self.beta2 ** (state.t + 1) * math.log(self.beta2) / b ** 2)
        root = self._nu_hat(state).sqrt()
        safe = torch.where(root > 0, root, torch.ones_like(root))
        return torch.where(root > 0, dnu_hat / (2 * safe), torch.zeros_like(root))


class VRAdamFlow(AdamFlow):
    """VRAdam's paper gate on Adam's flow (A3, A4): ``rho = lr / (1 + min(beta3 E|m|^2, alpha1))``."""

    name, display = "vradam", "VRAdam"
    gated = True

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, beta3: float, alpha1: float):
        super().__init__(lr, beta1, beta2, eps)
        self.beta3, self.alpha1 = float(beta3), float(alpha1)

    def gate_input(self, state: FlowState, gbar_sq_norm: float, oscillation_sq: float) -> float:
        """``E|m|^2 = (1 - beta1^(t+1))^2 |gbar|^2 + ((1 - beta1) / (1 + beta1))^2 tr(H Sigma H)``."""
        gain = (1 - self.beta1) / (1 + self.beta1)
        return (1 - self.beta1 ** (state.t + 1)) ** 2 * gbar_sq_norm + gain ** 2 * oscillation_sq

    def rate(self, state, gbar_sq_norm=0.0, oscillation_sq=0.0):
        s = self.gate_input(state, gbar_sq_norm, oscillation_sq)
        return self.lr / (1 + min(self.beta3 * s, self.alpha1))


def _no_flow(what: str) -> ValueError:
    return ValueError(f"no central flow for {what}: flows exist for {FLOW_FAMILIES}")


def _uniform(optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> dict:
    first = optimizer.param_groups[0]
    for i, group in enumerate(optimizer.param_groups[1:], start=1):
        for key in keys:
            if group.get(key) != first.get(key):
                raise ValueError(f"param group {i} has {key}={group.get(key)!r} but group 0 has "
                                 f"{first.get(key)!r}: a central flow needs one value in every group")
    return first


def flow_rule_for(optimizer: torch.optim.Optimizer) -> FlowRule:
    """The continuous-time form of ``optimizer`` (its group 0 hyperparameters; every group must agree)."""
    kind = type(optimizer).__name__
    if isinstance(optimizer, GatedAdam):
        g = _uniform(optimizer, ("lr", "betas", "eps", "weight_decay", "beta3", "alpha1", "gate", "power",
                                 "norm_scope", "amsgrad"))
        if "beta3" not in g or "alpha1" not in g:
            raise _no_flow(f"{kind} (a gated optimizer without VRAdam's beta3 and alpha1 group keys)")
        paper = {"gate": "velocity", "power": 2.0, "norm_scope": "global"}
        for key, value in paper.items():
            if g.get(key, value) != value:
                raise _no_flow(f"{kind} with {key}={g[key]!r} (the flow models the paper's gate: "
                               f"{', '.join(f'{k}={v!r}' for k, v in paper.items())})")
        rule = VRAdamFlow(g["lr"], *g["betas"], g["eps"], g["beta3"], g["alpha1"])
    elif isinstance(optimizer, torch.optim.SGD):
        g = _uniform(optimizer, ("lr", "momentum", "nesterov", "weight_decay"))
        if g.get("momentum", 0) or g.get("nesterov"):
            raise _no_flow(f"SGD with momentum={g.get('momentum')}" + (" (Nesterov)" if g.get("nesterov") else ""))
        rule = GradientDescentFlow(g["lr"])
    elif isinstance(optimizer, torch.optim.RMSprop):
        g = _uniform(optimizer, ("lr", "alpha", "eps", "momentum", "centered", "weight_decay"))
        if g.get("momentum", 0) or g.get("centered"):
            raise _no_flow(f"RMSprop with momentum={g.get('momentum')}, centered={g.get('centered')}")
        rule = RMSPropFlow(g["lr"], g["alpha"], g["eps"])
    elif type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        g = _uniform(optimizer, ("lr", "betas", "eps", "amsgrad", "weight_decay"))
        if g.get("amsgrad"):
            raise _no_flow(f"{kind} with amsgrad=True")
        rule = AdamFlow(g["lr"], *g["betas"], g["eps"])
    else:
        raise _no_flow(kind)
    if g.get("weight_decay", 0):
        raise ValueError(f"no central flow with weight_decay={g['weight_decay']!r}: the flows are derived "
                         "without weight decay (use 0)")
    if g.get("maximize"):
        raise _no_flow(f"{kind} with maximize=True")
    if isinstance(g["lr"], torch.Tensor):
        rule.lr = float(g["lr"])  # sync: once
    return rule
