"""One param group as every implementation of the step sees it, and the gate they share.

:class:`GroupTensors` is a group's aligned tensors and hyperparameters;
:class:`Telemetry` is what gated it in one step.  The gate itself,
``eta_t = lr / (1 + min(beta3 s_t, alpha1))``, and the way per-group sums of
``|x|^power`` become each group's ``s_t`` (:func:`group_sums_to_telemetry`)
are written once here and used by the single-tensor, foreach, fused and
reference implementations alike (:mod:`vradam.functional` has the math and
the contract).

Example::

    >>> import torch
    >>> tel = gate_telemetry(torch.tensor(4.0), lr=0.1, beta3=1.0, alpha1=3.0)
    >>> round(tel.eta.item(), 6), bool(tel.clamped)   # 0.1 / (1 + min(4, 3))
    (0.025, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor


@dataclass
class GroupTensors:
    """One param group's tensors (aligned lists) and its hyperparameters."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    lr: float | Tensor
    beta1: float
    beta2: float
    beta3: float
    alpha1: float
    eps: float
    weight_decay: float
    maximize: bool = False
    # Per parameter: whether this rank adds its |x|^power to the group's local
    # sum of s_t (None: all). False for a tensor that other ranks, which reduce
    # s_t together with this one, hold whole too (vradam.distributed).
    counted: list[bool] | None = None


class Telemetry(NamedTuple):
    """What gated one group in one step, as 0-dim device tensors."""

    eta: Tensor  # effective rate eta_t
    sq_norm: Tensor  # s_t, the sum of |x|^power that gated the group
    clamped: Tensor  # bool: beta3 * s_t >= alpha1


SumReducer = Callable[[Tensor], Tensor]
"""1-D local partial sums of s_t -> the same sums over ranks, elementwise (may work in place)."""


class StepImpl(Protocol):
    def __call__(
        self, groups: list[GroupTensors], *, gate: str, power: float, norm_scope: str,
        reduce_sums: SumReducer | None = None,
    ) -> list[Telemetry]: ...


def accumulation_device_and_dtype(groups: list[GroupTensors]) -> tuple[torch.device, torch.dtype]:
    """Where s_t lives (the first parameter's device) and its dtype (float32, or float64)."""
    params = [p for g in groups for p in g.params]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return params[0].device, dtype


def gate_telemetry(sq_norm: Tensor, *, lr: float | Tensor, beta3: float, alpha1: float) -> Telemetry:
    """eta = lr / (1 + min(beta3 s, alpha1)) as device tensor math."""
    scaled = sq_norm * beta3
    eta = lr / (1.0 + torch.clamp(scaled, max=alpha1))
    return Telemetry(eta=eta, sq_norm=sq_norm, clamped=scaled >= alpha1)


def group_sums_to_telemetry(
    group_sums: list[Tensor | None], groups: list[GroupTensors], *, norm_scope: str,
    device: torch.device, dtype: torch.dtype, reduce_sums: SumReducer | None = None,
) -> list[Telemetry]:
    """Per-group partial sums of |x|^power (None for an empty group) -> telemetry.

    ``reduce_sums`` (sharded parameters) first sums the stacked local sums over
    ranks: one call, one collective. "global" then adds all groups' sums into
    one s_t; "group" keeps each its own.
    """
    zero = torch.zeros((), device=device, dtype=dtype)
    sums = [zero if s is None else s.to(device=device, dtype=dtype) for s in group_sums]
    if reduce_sums is not None:
        sums = list(reduce_sums(torch.stack(sums)).unbind())
    if norm_scope == "global":
        total = torch.stack(sums).sum()
        sums = [total] * len(sums)
    return [
        gate_telemetry(s, lr=g.lr, beta3=g.beta3, alpha1=g.alpha1) for s, g in zip(sums, groups)
    ]
