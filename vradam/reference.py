"""The slow twin: VRAdam written line by line from the paper's update.

Every fast path (single-tensor, foreach, fused) is tested against this file,
so it favours being obviously right over being fast. It reads step counts
with ``.item()`` and allocates freely. The math, per DESIGN.md::

    v_t   = beta1 v_{t-1} + (1 - beta1) g_t
    m_t   = beta2 m_{t-1} + (1 - beta2) g_t^2
    s_t   = sum |x|^power   (x = v_t or g_t; over all groups, or per group)
    eta_t = lr / (1 + min(beta3 s_t, alpha1))
    theta = theta (1 - eta_t weight_decay) - eta_t vhat / (sqrt(mhat) + eps)

``norm_scope="global"`` sums s_t over all groups (the paper), ``"group"`` per
group (the public code). ``beta3 = 0`` is AdamW. See :mod:`vradam.functional`
for the contract this function shares with the fast paths.

Example::

    >>> import torch
    >>> from vradam import VRAdamReference
    >>> w = torch.nn.Parameter(torch.tensor([3.0]))
    >>> opt = VRAdamReference([w], lr=0.1)
    >>> w.sum().backward(); _ = opt.step()
    >>> round(w.item(), 4)   # 3 (1 - eta wd) - eta with eta = 0.1 / (1 + 0.1^2)
    2.898
"""

from __future__ import annotations

import torch
from torch import Tensor

from vradam.group import GroupTensors, SumReducer, Telemetry


def reference_step(
    groups: list[GroupTensors], *, gate: str, power: float, norm_scope: str,
    reduce_sums: SumReducer | None = None,
) -> list[Telemetry]:
    """One VRAdam step, plainly written; same contract as ``vradam_step``.

    Sharded parameters: ``groups`` hold the local shards; ``reduce_sums`` adds
    the ranks' partial sums (``vradam_step`` passes both).
    """
    params = [p for group in groups for p in group.params]
    device = params[0].device
    acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    # 1. moments: v_t and m_t for every parameter
    gate_sources: list[list[Tensor]] = []
    for group in groups:
        sources = []
        for i in range(len(group.params)):
            g = group.grads[i]
            if group.maximize:
                g = -g
            v, m = group.exp_avgs[i], group.exp_avg_sqs[i]
            group.steps[i].add_(1)
            v.copy_(group.beta1 * v + (1 - group.beta1) * g)
            m.copy_(group.beta2 * m + (1 - group.beta2) * g * g)
            if group.counted is None or group.counted[i]:  # see GroupTensors.counted
                sources.append(v if gate == "velocity" else g)
        gate_sources.append(sources)

    # 2. s_t: the sum of |x|^power, per group, then over all groups if global;
    #    sharded: the sums of this rank's shards, added up over the ranks
    def sum_abs_pow(xs: list[Tensor]) -> Tensor:
        total = torch.zeros((), dtype=acc_dtype, device=device)
        for x in xs:
            total = total + (x.to(acc_dtype).abs() ** power).sum().to(device)
        return total

    per_group = [sum_abs_pow(sources) for sources in gate_sources]
    everything = sum_abs_pow([x for sources in gate_sources for x in sources])
    if reduce_sums is not None:
        *per_group, everything = reduce_sums(torch.stack(per_group + [everything])).unbind()
    if norm_scope == "global":
        per_group = [everything for _ in groups]

    # 3. eta_t per group, and 4. the AdamW-shaped update at rate eta_t
    telemetry = []
    for group, s in zip(groups, per_group):
        eta = group.lr / (1 + torch.clamp(group.beta3 * s, max=group.alpha1))
        telemetry.append(Telemetry(eta=eta, sq_norm=s, clamped=group.beta3 * s >= group.alpha1))
        for i, p in enumerate(group.params):
            t = group.steps[i].item()
            v, m = group.exp_avgs[i], group.exp_avg_sqs[i]
            v_hat = v / (1 - group.beta1**t)
            m_hat = m / (1 - group.beta2**t)
            eta_here = eta.to(p.device)
            p.copy_(
                p * (1 - eta_here * group.weight_decay)
                - eta_here * v_hat / (m_hat.sqrt() + group.eps)
            )
    return telemetry

