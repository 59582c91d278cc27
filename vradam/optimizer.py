"""``VRAdam``: the torch.optim class shell around :mod:`vradam.functional`.

VRAdam is AdamW whose rate is gated by the velocity's squared norm::

    eta_t = lr / (1 + min(beta3 * s_t, alpha1)),   s_t = sum over parameters of |v_t|^power

``lr`` is the maximal rate alpha_0 and is the param group's ``lr`` key, so every
``torch.optim.lr_scheduler`` drives it unchanged; the effective rate lies in
``[lr / (1 + alpha1), lr]``. Weight decay is decoupled and uses eta_t. With
``beta3=0`` the optimizer is exactly ``torch.optim.AdamW`` (same defaults).
The math, ``norm_scope`` ("global": one norm over all groups, the paper;
"group": one per group, the public code) and ``gate`` ("velocity", the paper;
"gradient", the public code's old default) are documented in
:mod:`vradam.functional`.

State per parameter uses torch Adam's names: ``step`` (0-dim float32, on the
CPU unless ``capturable`` or ``fused``), ``exp_avg`` (v_t, raw) and
``exp_avg_sq`` (m_t, raw). After each step, :meth:`VRAdam.telemetry` returns
the gate of a group as 0-dim device tensors (no sync); they live in the param
group dicts under ``eta``, ``sq_norm`` and ``clamped`` and therefore travel
with ``state_dict()``.

**Distributed runs.** Under DDP (plain parameters, gradients already averaged)
every rank holds whole tensors and computes the full s_t alone: no
collective. Under FSDP2 (``fully_shard``) or any DTensor layout, the update is
elementwise and each rank applies it to its local shards (moments stay
DTensors laid out like their parameters); only s_t needs the other ranks.
Each rank sums |x|^power over its local shards per param group, and ONE
all-reduce (SUM) per step of that vector of per-group sums, before any
parameter moves, gives every rank the global s_t for both ``norm_scope``
values (global: the sum of the reduced entries). It runs over the ranks that
hold different shards: the mesh dimensions with a ``Shard`` placement (FSDP:
the mesh; HSDP ``(Replicate, Shard)``: the shard dimension only, never the
replicas). A tensor held whole along such a dimension (``Replicate`` there, or
a plain tensor among DTensors) is counted by one rank of it only. So
``telemetry()`` reports the same global eta, sq_norm and clamped on every rank,
all-reduced on the device, without a host sync. Every rank must call
``step()``; all DTensor parameters must share one DeviceMesh (ValueError
otherwise). Details: :mod:`vradam.distributed`.

Example::

    >>> import torch
    >>> from vradam import VRAdam
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = VRAdam(model.parameters(), lr=1e-2, beta3=1.0, alpha1=10.0)
    >>> loss = model(torch.randn(8, 4)).pow(2).mean()
    >>> loss.backward(); _ = opt.step(); opt.zero_grad()
    >>> tel = opt.telemetry()          # {"eta", "sq_norm", "clamped"}
    >>> bool(tel["eta"] <= 1e-2)       # reading it is the caller's choice of sync
    True
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from vradam import fused_triton
from vradam.functional import validate_hyperparameters, validate_options, vradam_step
from vradam.group import GroupTensors

_OPTIMIZER_WIDE = ("gate", "power", "norm_scope")
_TELEMETRY_KEYS = ("eta", "sq_norm", "clamped")
_FOREACH_DEVICE_TYPES = ("cuda", "xpu")


class VRAdam(torch.optim.Optimizer):
    """Velocity-Regularized Adam (arXiv 2505.13196), a drop-in for AdamW.

    Args:
        params: parameters or param group dicts (per group: lr, betas, beta3,
            alpha1, eps, weight_decay, maximize).
        lr: maximal rate alpha_0 (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        beta3: gate strength (>= 0); 0 gives AdamW.
        alpha1: cap on beta3 * s_t (>= 0); eta_t >= lr / (1 + alpha1).
        eps: added to sqrt(mhat) (>= 0).
        weight_decay: decoupled, scaled by eta_t (>= 0), AdamW's default.
        gate: "velocity" or "gradient" (optimizer-wide).
        power: exponent of the gate's norm, > 0 (optimizer-wide).
        norm_scope: "global" or "group" (optimizer-wide).
        maximize: ascend instead of descend.
        foreach: use the ``torch._foreach_*`` path; None picks it when every
            parameter is on CUDA / XPU, as torch.optim does.
        capturable: keep step counts on the parameters' device (CUDA graphs).
        fused: use the "fused" implementation, :mod:`vradam.fused_triton`
            (CUDA parameters only; FSDP2 / DTensor shards too, with the same
            single all-reduce).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 1.0,
        alpha1: float = 10.0,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        gate: str = "velocity",
        power: float = 2.0,
        norm_scope: str = "global",
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        fused: bool | None = None,
    ) -> None:
        validate_hyperparameters(
            lr=lr, betas=betas, beta3=beta3, alpha1=alpha1, eps=eps, weight_decay=weight_decay
        )
        validate_options(gate=gate, power=power, norm_scope=norm_scope)
        if fused and foreach:
            raise ValueError("fused=True and foreach=True exclude each other; pick one")
        defaults = dict(
            lr=lr, betas=tuple(betas), beta3=beta3, alpha1=alpha1, eps=eps,
            weight_decay=weight_decay, gate=gate, power=power, norm_scope=norm_scope,
            maximize=maximize, foreach=foreach, capturable=capturable, fused=bool(fused),
        )
        super().__init__(params, defaults)
        if fused:
            self._check_fused_available()

    # ------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ValueError(f"a param group must be a dict with a 'params' entry, got {param_group!r}"[:200])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in _OPTIMIZER_WIDE:
            if group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key}={group[key]!r} in a param group; {key} is optimizer-wide, "
                    f"allowed: the constructor's value {self.defaults[key]!r}"
                )
        validate_hyperparameters(
            lr=group["lr"], betas=group["betas"], beta3=group["beta3"], alpha1=group["alpha1"],
            eps=group["eps"], weight_decay=group["weight_decay"],
        )
        for p in group["params"]:
            if p.is_complex():
                raise ValueError("complex parameters are not supported; allowed: real dtypes")
        _reset_telemetry(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in _OPTIMIZER_WIDE:
                if group[key] != self.defaults[key]:
                    raise ValueError(
                        f"state_dict has {key}={group[key]!r}, this optimizer "
                        f"{self.defaults[key]!r}; {key} must match"
                    )
            if any(key not in group for key in _TELEMETRY_KEYS):
                _reset_telemetry(group)
            device = _group_device(group)
            for key in _TELEMETRY_KEYS:
                group[key] = group[key].to(device)

    # -------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One VRAdam step; ``closure`` is evaluated with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [self._group_tensors(group) for group in self.param_groups]
        if not any(g.params for g in groups):
            return loss
        telemetry = vradam_step(
            groups,
            gate=self.defaults["gate"],
            power=self.defaults["power"],
            norm_scope=self.defaults["norm_scope"],
            impl=self._impl_name(),
        )
        for group, tel in zip(self.param_groups, telemetry):
            group["eta"], group["sq_norm"], group["clamped"] = tel
        return loss

    def telemetry(self, group_index: int = 0) -> dict[str, Tensor]:
        """The gate of the last step for one group, as 0-dim device tensors.

        ``eta``: effective rate eta_t; ``sq_norm``: s_t; ``clamped``: bool,
        beta3 * s_t >= alpha1. Before the first step: lr, 0, False. Reading
        them (``.item()``) is the caller's sync, not the optimizer's.
        """
        if not -len(self.param_groups) <= group_index < len(self.param_groups):
            raise ValueError(
                f"group_index={group_index}; allowed: 0 <= group_index < {len(self.param_groups)}"
            )
        group = self.param_groups[group_index]
        return {key: group[key] for key in _TELEMETRY_KEYS}

    # ---------------------------------------------------------- helpers

    def _group_tensors(self, group: dict[str, Any]) -> GroupTensors:
        """Gather the parameters that have a gradient, creating state on first sight."""
        on_device_steps = group["capturable"] or group["fused"]
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("VRAdam does not support sparse gradients; use dense ones")
            state = self.state[p]
            if not state:
                step_device = p.device if on_device_steps else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        return GroupTensors(
            params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps,
            lr=group["lr"], beta1=beta1, beta2=beta2, beta3=group["beta3"],
            alpha1=group["alpha1"], eps=group["eps"], weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )

    def _impl_name(self) -> str:
        """Which of :data:`vradam.functional.IMPLEMENTATIONS` steps this optimizer."""
        if self.defaults["fused"]:
            return "fused"
        foreach = self.defaults["foreach"]
        if foreach is None:
            foreach = all(
                p.device.type in _FOREACH_DEVICE_TYPES
                for group in self.param_groups
                for p in group["params"]
            )
        return "foreach" if foreach else "single_tensor"

    def _check_fused_available(self) -> None:
        if not fused_triton.is_available():
            raise RuntimeError(
                "fused=True needs Triton, which did not import; install it "
                "(pip install 'eos-toolkit[fused]') or use foreach=True"
            )
        # Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors: tests use it.
        allowed = "cpu" if fused_triton.is_interpreted() else "cuda"
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != allowed:
                    raise ValueError(
                        f"fused=True needs CUDA parameters, got one on {p.device}; "
                        f"allowed: device type {allowed!r} (or use foreach=True)"
                    )


class VRAdamReference(VRAdam):
    """``VRAdam`` that always steps with :func:`vradam.reference.reference_step` (for tests and audits)."""

    def _impl_name(self) -> str:
        return "reference"


def _group_device(group: dict[str, Any]) -> torch.device:
    params = group["params"]
    return params[0].device if params else torch.device("cpu")


def _reset_telemetry(group: dict[str, Any]) -> None:
    """Telemetry before any step: eta = lr, s = 0, not clamped."""
    device = _group_device(group)
    dtype = (
        torch.float64
        if any(p.dtype == torch.float64 for p in group["params"])
        else torch.float32
    )
    group["eta"] = torch.as_tensor(group["lr"], dtype=dtype, device=device).clone()
    group["sq_norm"] = torch.zeros((), dtype=dtype, device=device)
    group["clamped"] = torch.zeros((), dtype=torch.bool, device=device)
