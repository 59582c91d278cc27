"""VRAdam's functional core: one call updates every parameter group.

The update (DESIGN.md; t counts this parameter's steps, g_t is its gradient,
negated when ``maximize``)::

    v_t   = beta1 v_{t-1} + (1 - beta1) g_t        exp_avg: first moment, the "velocity"
    m_t   = beta2 m_{t-1} + (1 - beta2) g_t^2      exp_avg_sq: second moment
    s_t   = sum |x|^power over the gate source      x = v_t (gate="velocity") or g_t ("gradient")
    eta_t = lr / (1 + min(beta3 s_t, alpha1))       lr is alpha_0, the maximal rate
    theta = theta (1 - eta_t weight_decay) - eta_t vhat / (sqrt(mhat) + eps)
            vhat = v_t / (1 - beta1^t),  mhat = m_t / (1 - beta2^t)

``s_t`` uses the raw moment (not bias-corrected) after this step's update.

* ``norm_scope="global"`` (the paper's definition, the default): ``s_t`` sums over
  every parameter of every group, so all groups share one gate; each group still
  applies its own ``lr``, ``beta3`` and ``alpha1`` to it. This is why one call must
  see all groups: no parameter may move before the last velocity is known.
  ``norm_scope="group"`` (the public reference code's behaviour) resets the sum
  per group, so each group is gated by its own velocity only.
* ``gate="velocity"`` gates on v_t (the paper); ``gate="gradient"`` gates on the
  raw gradient g_t (the public code's old default, used by the paper's best
  CIFAR-10 run and its edge-of-stability figure).
* ``beta3 = 0`` gives ``eta_t = lr / (1 + 0) = lr`` exactly, and the update is
  then exactly AdamW's, decoupled weight decay included.
* The gate never leaves the device: ``s_t``, ``eta_t`` and the clamp flag are
  0-dim tensors, so a step has no host-device synchronisation. Step counts kept
  on the CPU (torch.optim's default) are read as host numbers; that reads host
  memory only. Step counts on the device (capturable mode) stay tensor math.
* ``s_t`` is accumulated in float32 (float64 if any parameter is float64), so
  bf16 / fp16 parameters gate on an accurate norm.
* Sharded parameters (FSDP2, any DTensor layout): :func:`vradam_step` steps
  each rank's local shards and adds up the ranks' partial sums of s_t with one
  all-reduce per step, so every rank gates with the same global s_t; see
  :mod:`vradam.distributed` for what is summed over which ranks.

Contract of :func:`vradam_step` (every implementation honours it):

* ``groups``: one :class:`GroupTensors` per optimizer param group, in order.
  Its lists are aligned and hold only parameters that have a gradient this
  step (a group may be empty). Gradients are dense and share their parameter's
  dtype and device; moments share them too. ``steps`` are 0-dim float32 tensors,
  on the CPU or on the parameter's device.
* The call increments every step by one, updates both moments and the
  parameters in place, and returns one :class:`Telemetry` per group: 0-dim
  tensors on the device of the first parameter. An empty group in "group"
  scope reports ``sq_norm = 0`` and ``eta = lr``.
* At least one group must hold a parameter.
* ``impl`` names one of :data:`IMPLEMENTATIONS`: "reference" (the slow,
  plainly written twin in :mod:`vradam.reference`), "single_tensor" (one
  parameter at a time), "foreach" (``torch._foreach_*`` kernels over lists),
  "fused" (Triton, :mod:`vradam.fused_triton`). Each is called as
  ``fn(groups, gate=..., power=..., norm_scope=..., reduce_sums=...)`` and
  returns ``list[Telemetry]``. It sees plain tensors only (the local shards of
  DTensors). It adds |x|^power of a parameter to its group's local sum only
  where ``GroupTensors.counted`` is None or True for it, and, when
  ``reduce_sums`` is not None, passes one 1-D tensor of local partial sums (per
  group, optionally the total as well) through it once per step, before any
  parameter moves, and gates with what it returns: the same sums over ranks. :mod:`vradam.group` holds the pieces of the gate they share.

Example::

    >>> import torch
    >>> from vradam.functional import GroupTensors, vradam_step
    >>> p = torch.tensor([1.0, -2.0]); g = torch.tensor([0.5, 0.5])
    >>> group = GroupTensors([p], [g], [torch.zeros(2)], [torch.zeros(2)],
    ...                      [torch.tensor(0.0)], lr=0.1, beta1=0.9, beta2=0.999,
    ...                      beta3=1.0, alpha1=10.0, eps=1e-8, weight_decay=0.0)
    >>> (tel,) = vradam_step([group], gate="velocity", power=2.0,
    ...                      norm_scope="global", impl="foreach")
    >>> round(tel.sq_norm.item(), 6)   # |0.1 g|^2 = 0.0025 + 0.0025
    0.005
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vradam.distributed import local_shards
from vradam.fused_triton import fused_step
from vradam.group import (
    GroupTensors,
    StepImpl,
    SumReducer,
    Telemetry,
    accumulation_device_and_dtype,
    group_sums_to_telemetry,
)
from vradam.reference import reference_step
from vradam.settings import GATES, NORM_SCOPES


def vradam_step(
    groups: list[GroupTensors], *, gate: str, power: float, norm_scope: str, impl: str
) -> list[Telemetry]:
    """One VRAdam step over all groups (module docstring: math and contract).

    DTensor parameters are stepped through their local shards, with one
    all-reduce of the per-group partial sums of s_t (:mod:`vradam.distributed`).
    """
    validate_options(gate=gate, power=power, norm_scope=norm_scope)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}; allowed: {tuple(IMPLEMENTATIONS)}")
    if not any(g.params for g in groups):
        raise ValueError("vradam_step needs at least one parameter with a gradient")
    groups, reduce_sums = local_shards(groups)
    return IMPLEMENTATIONS[impl](
        groups, gate=gate, power=power, norm_scope=norm_scope, reduce_sums=reduce_sums
    )


# ---------------------------------------------------------------- validation


def validate_options(*, gate: str, power: float, norm_scope: str) -> None:
    """Raise ValueError for an unknown gate / norm_scope or a power <= 0."""
    if gate not in GATES:
        raise ValueError(f"gate={gate!r}; allowed: {GATES}")
    if norm_scope not in NORM_SCOPES:
        raise ValueError(f"norm_scope={norm_scope!r}; allowed: {NORM_SCOPES}")
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
        raise ValueError(f"power={power!r}; allowed: a finite number > 0")


def validate_hyperparameters(
    *, lr: float | Tensor, betas: tuple[float, float], beta3: float, alpha1: float,
    eps: float, weight_decay: float,
) -> None:
    """Raise ValueError naming the first bad hyperparameter and its allowed range (one error type for all)."""
    def number(name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise ValueError(f"{name}={value!r}; allowed: a real number")
        return float(value)  # construction time only, never inside a step

    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr as a tensor must hold one value, got shape {tuple(lr.shape)}")
    lr_value = number("lr", lr)
    if not 0.0 <= lr_value < math.inf:
        raise ValueError(f"lr={lr_value}; allowed: 0 <= lr < inf")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r}; allowed: a pair (beta1, beta2)")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        if not 0.0 <= number(name, beta) < 1.0:
            raise ValueError(f"{name}={beta}; allowed: 0 <= beta < 1")
    checks = (("beta3", beta3), ("alpha1", alpha1), ("eps", eps), ("weight_decay", weight_decay))
    for name, value in checks:
        if not 0.0 <= number(name, value) < math.inf:
            raise ValueError(f"{name}={value}; allowed: 0 <= {name} < inf")


def _steps_on_host(step: Tensor) -> bool:
    """True when step counts like ``step`` can be read as Python numbers without a sync.

    Under torch.compile they stay tensors too, so the step traces into one graph.
    """
    return step.device.type == "cpu" and not torch.compiler.is_compiling()


def _bias_corrections_on_device(
    steps: list[Tensor], g: GroupTensors, param_dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor]]:
    """1 - beta1^t and sqrt(1 - beta2^t) as tensors, for steps that stay on the device.

    Written as -expm1(t log beta): 1 - beta2^t computed directly in float32 would
    lose about four digits at t = 1.
    """
    dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    ts = [t.to(dtype) for t in steps]
    bc1s = torch._foreach_mul(ts, math.log(g.beta1) if g.beta1 > 0 else -math.inf)
    torch._foreach_expm1_(bc1s)
    torch._foreach_neg_(bc1s)
    bc2_sqrts = torch._foreach_mul(ts, math.log(g.beta2) if g.beta2 > 0 else -math.inf)
    torch._foreach_expm1_(bc2_sqrts)
    torch._foreach_neg_(bc2_sqrts)
    torch._foreach_sqrt_(bc2_sqrts)
    return bc1s, bc2_sqrts


# ---------------------------------------------------------- single tensor


def _sum_abs_pow(x: Tensor, power: float, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(x, power, dtype=dtype).pow(power)


def _counted(g: GroupTensors) -> list[bool]:
    return [True] * len(g.params) if g.counted is None else g.counted


def _single_tensor_step(
    groups: list[GroupTensors], *, gate: str, power: float, norm_scope: str,
    reduce_sums: SumReducer | None = None,
) -> list[Telemetry]:
    device, dtype = accumulation_device_and_dtype(groups)
    group_sums: list[Tensor | None] = []
    for g in groups:
        sums = []
        for grad, v, m, step, counted in zip(
            g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, _counted(g)
        ):
            grad = -grad if g.maximize else grad
            step.add_(1)
            v.lerp_(grad, 1.0 - g.beta1)
            m.mul_(g.beta2).addcmul_(grad, grad, value=1.0 - g.beta2)
            if counted:
                source = v if gate == "velocity" else grad
                sums.append(_sum_abs_pow(source, power, dtype).to(device))
        group_sums.append(torch.stack(sums).sum() if sums else None)

    telemetry = group_sums_to_telemetry(
        group_sums, groups, norm_scope=norm_scope, device=device, dtype=dtype,
        reduce_sums=reduce_sums,
    )
    for g, tel in zip(groups, telemetry):
        neg_eta, decay = -tel.eta, 1.0 - tel.eta * g.weight_decay
        for p, v, m, step in zip(g.params, g.exp_avgs, g.exp_avg_sqs, g.steps):
            # p += -(eta sqrt(bc2) / bc1) * v / (sqrt(m) + eps sqrt(bc2))
            if g.weight_decay != 0.0:
                p.mul_(decay.to(p.device))
            if _steps_on_host(step):
                t = step.item()  # host memory, no device sync
                bc1, bc2_sqrt = 1.0 - g.beta1**t, math.sqrt(1.0 - g.beta2**t)
                denom = m.sqrt().add_(g.eps * bc2_sqrt).div_(neg_eta.to(p.device))
                p.addcdiv_(v, denom, value=bc2_sqrt / bc1)
            else:
                ([bc1], [bc2_sqrt]) = _bias_corrections_on_device([step], g, p.dtype)
                denom = m.sqrt().add_(g.eps * bc2_sqrt)
                p.addcdiv_(v, denom.div_(neg_eta.to(p.device) * bc2_sqrt / bc1))
    return telemetry


# ------------------------------------------------------------ multi tensor


def _by_device_and_dtype(g: GroupTensors) -> list[tuple[list, ...]]:
    """Split a group's aligned lists (and ``counted``) into buckets one foreach kernel can take."""
    index: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(g.params):
        index.setdefault((p.device, p.dtype), []).append(i)
    lists = (g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, _counted(g))
    return [tuple([lst[i] for i in idx] for lst in lists) for idx in index.values()]


def _foreach_step(
    groups: list[GroupTensors], *, gate: str, power: float, norm_scope: str,
    reduce_sums: SumReducer | None = None,
) -> list[Telemetry]:
    device, dtype = accumulation_device_and_dtype(groups)
    bucketed = [_by_device_and_dtype(g) for g in groups]

    group_sums: list[Tensor | None] = []
    for g, buckets in zip(groups, bucketed):
        sums = []
        for _, grads, vs, ms, steps, counted in buckets:
            if g.maximize:
                grads = torch._foreach_neg(grads)
            torch._foreach_add_(steps, 1)
            torch._foreach_lerp_(vs, grads, 1.0 - g.beta1)
            torch._foreach_mul_(ms, g.beta2)
            torch._foreach_addcmul_(ms, grads, grads, 1.0 - g.beta2)
            source = vs if gate == "velocity" else grads
            source = [x for x, c in zip(source, counted) if c]
            if source:
                norms = torch._foreach_norm(source, power, dtype=dtype)
                sums.append(torch.stack(norms).pow_(power).sum().to(device))
        group_sums.append(torch.stack(sums).sum() if sums else None)

    telemetry = group_sums_to_telemetry(
        group_sums, groups, norm_scope=norm_scope, device=device, dtype=dtype,
        reduce_sums=reduce_sums,
    )
    for g, buckets, tel in zip(groups, bucketed, telemetry):
        for params, _, vs, ms, steps, _ in buckets:
            eta = tel.eta.to(params[0].device)
            if g.weight_decay != 0.0:
                torch._foreach_mul_(params, 1.0 - eta * g.weight_decay)
            # per parameter: p += -(eta sqrt(bc2) / bc1) * v / (sqrt(m) + eps sqrt(bc2))
            denoms = torch._foreach_sqrt(ms)
            if _steps_on_host(steps[0]):
                ts = [s.item() for s in steps]  # host memory, no device sync
                bc2_sqrts = [math.sqrt(1.0 - g.beta2**t) for t in ts]
                torch._foreach_add_(denoms, [g.eps * b for b in bc2_sqrts])
                torch._foreach_div_(denoms, -eta)
                scales = [b / (1.0 - g.beta1**t) for b, t in zip(bc2_sqrts, ts)]
                torch._foreach_addcdiv_(params, vs, denoms, scales)
            else:
                bc1s, bc2_sqrts = _bias_corrections_on_device(steps, g, params[0].dtype)
                torch._foreach_add_(denoms, torch._foreach_mul(bc2_sqrts, g.eps))
                neg_step_sizes = torch._foreach_div(bc2_sqrts, bc1s)
                torch._foreach_mul_(neg_step_sizes, -eta)
                torch._foreach_div_(denoms, neg_step_sizes)
                torch._foreach_addcdiv_(params, vs, denoms)
    return telemetry


# Every implementation, chosen by name (as torch.optim chooses its single-tensor, foreach and fused paths).
IMPLEMENTATIONS: dict[str, StepImpl] = {
    "reference": reference_step,
    "single_tensor": _single_tensor_step,
    "foreach": _foreach_step,
    "fused": fused_step,
}
