"""The fused VRAdam step: Triton kernels, a handful of launches, no host sync.

The implementation ``"fused"`` of :func:`vradam.functional.vradam_step`
(same math and contract; see that module). The exact rule needs the norm of
every velocity before any parameter may move, so the step is two passes over
memory with a tiny reduction between them, all on the device::

    pass 1 (per group, per dtype)   v, m <- moments(g);  partial[chunk] = sum |v|^p (or |g|^p)
    reduce (one program)            s[group] = sum of its partials;  s[all] = sum of all
    pass 2 (per group, per dtype)   eta = lr / (1 + min(beta3 s, alpha1))
                                    p <- p (1 - eta wd) - eta vhat / (sqrt(mhat) + eps)

Bytes per float32 parameter: pass 1 reads g, v, m and writes v, m (20); pass 2
reads p, v, m and writes p (16): 36 in all, against AdamW's 28.

**Multi-tensor kernels over a chunk table, not flat buffers.** Each launch
walks a table with one row per chunk of up to ``chunk`` elements of one tensor
(its pointers, element range and step-count pointer), so the launch count is
2 x (groups x dtypes) + 1 whatever the number of tensors. Flat buffers would
save the table but make the optimizer own the storage: parameters would have
to be re-pointed into one buffer (breaking ``p.data = ...``, FSDP shards and
other owners of the storage), and gradients arrive wherever autograd or a
DDP bucket put them, so they would need a copy per step. The table works on the
tensors ``torch.optim`` already holds, with ``state_dict`` unchanged. It is
built on the host once per set of tensors, uploaded without a sync (pinned
memory, non-blocking copy) and cached by the tensors' addresses (the last
eight sets, and every set a CUDA graph captured); it is rebuilt only when an
address changes (for example gradients freed by ``zero_grad(set_to_none=True)``
and reallocated elsewhere).

**Step counts.** Counts on the parameters' device (``capturable`` / ``fused``
state) are advanced by pass 1 and read by pass 2 through their pointers, so the
step is exact and capturable in a CUDA graph with no extra launch. Counts on
the CPU are advanced on the host and uploaded to a device mirror each step
(non-blocking; exact, but not capturable). Bias corrections are formed in
float64 in the kernel: ``1 - beta**t = 1 - exp(t ln beta)``.

**Dtypes.** float32, bfloat16 and float16 parameters (gradients of the same
dtype); moments in whatever dtype the optimizer keeps them (float32 or the
parameter's). All arithmetic and the norm are float32. float64 parameters are
refused: kernel scalars travel as float32, so the result would not be float64
accurate (use ``impl="foreach"``).

**Layout.** Each parameter, its gradient and both moments must share one
dense layout (same strides, no gaps): the kernels walk raw storage. Contiguous
and permuted-dense (e.g. transposed, channels-last) parameters qualify; a
parameter viewing a strided slice does not, and is refused with a ValueError.

**The lagged variant** (:func:`fused_lagged_step`, not the default): gate step
t with the previous step's norm, ``eta_t = lr / (1 + min(beta3 s_{t-1},
alpha1))``, so moments, this step's partial norm and the update happen in one
pass (28 bytes per parameter, AdamW's traffic). It differs from the exact rule
whenever s changes between steps: the damping answers a gradient spike one step
late (the spike itself is taken at the undamped rate), and at step 1 the rate
is always lr. With the velocity gate the lag is mild, since
v_t - v_{t-1} = (1 - beta1)(g_t - v_{t-1}) is a small part of v_t once v has
built up; with the gradient gate s_{t-1} and s_t come from different batches.

**Sharded parameters** (FSDP2, DTensor): :func:`vradam.functional.vradam_step`
(and so ``VRAdam(..., fused=True)``) hands this step the local shards, which
the kernels take like any tensor, and a ``reduce_sums`` that all-reduces the
per-group sums ``s`` between the reduction and pass 2 (one collective on the
G + 1 entries; :mod:`vradam.distributed`). A parameter that this rank holds
whole alongside others (``GroupTensors.counted`` False) writes its partial
sums to slots the reduction never reads. Calling :func:`fused_step` directly
with DTensors raises a ValueError.

**Without CUDA.** Triton is an optional extra (``pip install
'eos-toolkit[fused]'``). This module imports without it; calling the step then
raises a RuntimeError saying so. Parameters off CUDA raise a ValueError, except
under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module
first imports the kernels), where CPU tensors run the same kernels slowly;
the tests use that.

Example (needs CUDA and triton)::

    import torch
    from vradam import VRAdam

    model = torch.nn.Linear(512, 512).cuda()
    opt = VRAdam(model.parameters(), lr=1e-3, fused=True)
    model(torch.randn(8, 512, device="cuda")).square().mean().backward()
    opt.step()              # three launches for any number of tensors
    opt.telemetry()["eta"]  # eta_t as a 0-dim CUDA tensor, no sync
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from vradam.distributed import is_dtensor
from vradam.group import GroupTensors, SumReducer, Telemetry

__all__ = [
    "DEFAULT_CONFIG",
    "SUPPORTED_PARAM_DTYPES",
    "FusedConfig",
    "fused_lagged_step",
    "fused_step",
    "is_available",
    "is_interpreted",
    "unsupported_reason",
]

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTENSOR_REASON = (
    "some tensors are DTensors; allowed: plain tensors (step DTensor parameters through "
    "vradam_step or VRAdam, which pass the fused step their local shards and all-reduce "
    "the norm, or use impl='foreach')"
)
_PLAN_CACHE_SIZE = 8


@dataclass(frozen=True)
class FusedConfig:
    """Launch shape: elements per chunk (one program), per tile, and warps per program."""

    chunk: int = 8192
    block: int = 1024
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk", "block", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value}; allowed: a power of two >= 1")
        if self.chunk < self.block:
            raise ValueError(f"chunk={self.chunk}; allowed: chunk >= block ({self.block})")


DEFAULT_CONFIG = FusedConfig()


# ------------------------------------------------------------------ triton


def _load_kernels() -> ModuleType | None:
    try:
        return importlib.import_module("vradam._triton_kernels")
    except ImportError:
        return None


_KERNELS = _load_kernels()


def is_available() -> bool:
    """True when Triton imported, so the fused step can run (on CUDA, or interpreted)."""
    return _KERNELS is not None


def is_interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return _KERNELS is not None and _KERNELS.INTERPRETED


def _kernels() -> ModuleType:
    if _KERNELS is None:
        raise RuntimeError(
            "impl='fused' needs Triton, which is not installed; "
            "pip install 'eos-toolkit[fused]' (or use impl='foreach')"
        )
    return _KERNELS


# ----------------------------------------------------------------- checks


def unsupported_reason(groups: list[GroupTensors]) -> str | None:
    """Why the fused step cannot take these tensors, or None when it can.

    Checks Triton, plain tensors (not DTensors), the device (CUDA, or CPU under
    the interpreter), one device for all, parameter and moment dtypes, and the
    shared dense layout.
    """
    if _KERNELS is None:
        return "Triton is not installed (pip install 'eos-toolkit[fused]')"
    params = [p for g in groups for p in g.params]
    if not params:
        return "there is no parameter with a gradient"
    if any(is_dtensor(t) for g in groups for t in g.params + g.grads + g.exp_avgs + g.exp_avg_sqs):
        return _DTENSOR_REASON
    device = params[0].device
    allowed_device = "cpu" if is_interpreted() else "cuda"
    if device.type != allowed_device:
        return (
            f"parameters are on {device}; allowed: device type 'cuda' "
            "(CPU tensors only under TRITON_INTERPRET=1)"
        )
    for gi, g in enumerate(groups):
        for i, (p, grad, v, m) in enumerate(zip(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs)):
            where = f"group {gi}, parameter {i}"
            if any(t.device != device for t in (p, grad, v, m)):
                return f"{where} is not on {device} with all its state; allowed: one device"
            if p.dtype not in SUPPORTED_PARAM_DTYPES or grad.dtype != p.dtype:
                return (
                    f"{where} has dtype {p.dtype} (gradient {grad.dtype}); allowed: "
                    "float32, bfloat16, float16 with a gradient of the same dtype"
                )
            if v.dtype != m.dtype or v.dtype not in SUPPORTED_PARAM_DTYPES:
                return (
                    f"{where} has moments of dtype {v.dtype} / {m.dtype}; "
                    "allowed: both float32, bfloat16 or float16"
                )
            if not (p.stride() == grad.stride() == v.stride() == m.stride() and _is_dense(p)):
                return (
                    f"{where} (shape {tuple(p.shape)}) does not share one dense layout with "
                    "its gradient and moments; allowed: same strides, no gaps"
                )
    return None


def _is_dense(t: Tensor) -> bool:
    """True when t covers exactly numel consecutive elements in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


# ------------------------------------------------------------------- plan


@dataclass
class _Launch:
    """One kernel launch: the chunks of one group's tensors of one dtype."""

    table: Tensor  # int64 [chunks, CHUNK_ROW_WIDTH], on the device
    num_chunks: int
    first_partial: int  # where this launch's partial sums start in the partial buffer
    # (beyond the groups' ranges for tensors this rank does not count: never read)
    param_dtype: torch.dtype
    moment_dtype: torch.dtype
    aligned: bool  # every tensor starts on 16 bytes: whole tiles use vector loads


@dataclass
class _Plan:
    """Everything about a set of tensors that stays fixed from step to step."""

    launches: list[list[_Launch]]  # per group
    group_bounds: Tensor  # int64 [groups + 1]: each group's range of counted partial sums
    num_partials: int  # counted ones, then the uncounted (never reduced)
    empty_table: Tensor  # one row with no elements: pass 2 of a group without tensors
    step_mirror: Tensor | None  # device copy of host step counts; None: counts on device


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()  # the last few, least recent first
_CAPTURED_PLANS: list[_Plan] = []  # used by a CUDA graph: kept for the process's life


def _plan_key(groups: list[GroupTensors], config: FusedConfig) -> tuple:
    """The addresses and sizes a plan depends on (host reads only)."""
    return (config,) + tuple(
        (
            tuple(p.data_ptr() for p in g.params),
            tuple((p.numel(), p.dtype) for p in g.params),
            tuple(t.data_ptr() for t in g.grads),
            tuple(t.data_ptr() for t in g.exp_avgs),
            g.exp_avgs[0].dtype if g.exp_avgs else None,
            tuple(t.data_ptr() for t in g.exp_avg_sqs),
            tuple(t.data_ptr() for t in g.steps),
            g.steps[0].device if g.steps else None,
            None if g.counted is None else tuple(g.counted),
        )
        for g in groups
    )


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> device without a sync (pinned memory, non-blocking copy)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _steps_in_place(groups: list[GroupTensors], device: torch.device) -> bool:
    """True when the kernels can advance and read the step counts where they are."""
    return all(s.device == device and s.dtype == torch.float32 for g in groups for s in g.steps)


def _build_plan(groups: list[GroupTensors], device: torch.device, config: FusedConfig) -> _Plan:
    kernels = _kernels()
    in_place = _steps_in_place(groups, device)
    num_steps = sum(len(g.steps) for g in groups)
    step_mirror = None if in_place else torch.zeros(num_steps, dtype=torch.float32, device=device)
    launches: list[list[_Launch]] = []
    uncounted: list[_Launch] = []
    bounds = [0]
    step_index = 0
    for g in groups:
        buckets: dict[tuple[torch.dtype, torch.dtype, bool], list[list[int]]] = {}
        counted = [True] * len(g.params) if g.counted is None else g.counted
        for i, (p, grad, v, m, s) in enumerate(
            zip(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps)
        ):
            step_ptr = s.data_ptr() if in_place else step_mirror[step_index].data_ptr()
            step_index += 1
            ptrs = [p.data_ptr(), grad.data_ptr(), v.data_ptr(), m.data_ptr()]
            n = p.numel()
            rows = buckets.setdefault((p.dtype, v.dtype, bool(counted[i])), [])
            for start in range(0, max(n, 1), config.chunk):
                rows.append(ptrs + [start, min(start + config.chunk, n), step_ptr, 0])
        group_launches = []
        first_partial = bounds[-1]
        for (param_dtype, moment_dtype, is_counted), rows in buckets.items():
            table = _upload(torch.tensor(rows, dtype=torch.int64), device)
            aligned = all(ptr % 16 == 0 for row in rows for ptr in row[:4])
            launch = _Launch(table, len(rows), first_partial, param_dtype, moment_dtype, aligned)
            group_launches.append(launch)
            if is_counted:
                first_partial += len(rows)
            else:
                uncounted.append(launch)
        launches.append(group_launches)
        bounds.append(first_partial)
    num_partials = bounds[-1]
    for launch in uncounted:  # their partial sums go past every group's range
        launch.first_partial = num_partials
        num_partials += launch.num_chunks
    empty_row = torch.zeros(1, kernels.CHUNK_ROW_WIDTH, dtype=torch.int64)
    return _Plan(
        launches=launches,
        group_bounds=_upload(torch.tensor(bounds, dtype=torch.int64), device),
        num_partials=num_partials,
        empty_table=_upload(empty_row, device),
        step_mirror=step_mirror,
    )


def _plan_for(groups: list[GroupTensors], device: torch.device, config: FusedConfig) -> _Plan:
    """The cached plan for these tensors, building (and checking) it on a miss."""
    key = _plan_key(groups, config)
    plan = _PLANS.get(key)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if plan is not None:
        _PLANS.move_to_end(key)
        if capturing and not any(p is plan for p in _CAPTURED_PLANS):
            _CAPTURED_PLANS.append(plan)  # the graph reads its tables at every replay
        return plan
    if capturing:
        raise RuntimeError(
            "the fused VRAdam step met new tensors while a CUDA graph is being captured; "
            "take one step with the same parameters, gradients and state before capturing"
        )
    reason = unsupported_reason(groups)
    if reason is not None:
        raise ValueError(f"impl='fused' cannot step these parameters: {reason}")
    plan = _build_plan(groups, device, config)
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _refresh_step_mirror(plan: _Plan, groups: list[GroupTensors]) -> None:
    """Advance step counts kept off the kernels' reach and copy them to the mirror."""
    steps = [s for g in groups for s in g.steps]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "capturing the fused VRAdam step needs step counts on the parameters' device "
            "(VRAdam(..., capturable=True) or fused=True)"
        )
    torch._foreach_add_(steps, 1)
    stacked = torch.stack(steps).to(torch.float32)
    if stacked.device.type == "cpu" and plan.step_mirror.device.type != "cpu":
        plan.step_mirror.copy_(stacked.pin_memory(), non_blocking=True)
    else:
        plan.step_mirror.copy_(stacked)


# ---------------------------------------------------------------- scalars


def _log_beta(beta: float) -> float:
    """ln(beta), with -inf for beta = 0 so that beta**t = exp(t ln beta) = 0."""
    return math.log(beta) if beta > 0.0 else -math.inf


def _lr_argument(lr: float | Tensor, device: torch.device) -> tuple[float | Tensor, bool]:
    """(value passed to the kernel, whether it is a pointer)."""
    if not isinstance(lr, Tensor):
        return float(lr), False
    if lr.device == device:
        return lr, True
    return lr.item(), False  # a CPU tensor: host memory, no device sync


def _gate_flags(gate: str, power: float) -> dict:
    return dict(GATE_IS_VELOCITY=gate == "velocity", POWER_IS_TWO=power == 2.0)


def _outputs(plan: _Plan, num_groups: int, device: torch.device) -> tuple[Tensor, ...]:
    """Fresh buffers of one step: partial sums, s per group (+ all), eta, clamp flags."""
    return (
        torch.empty(max(plan.num_partials, 1), dtype=torch.float32, device=device),
        torch.empty(num_groups + 1, dtype=torch.float32, device=device),
        torch.empty(num_groups, dtype=torch.float32, device=device),
        torch.empty(num_groups, dtype=torch.bool, device=device),
    )


def _telemetry(sq_norms: Tensor, etas: Tensor, clamped: Tensor, norm_scope: str) -> list[Telemetry]:
    """Per group: 0-dim views of eta, of s (the group's or the global one) and of the flag."""
    num_groups = len(etas)
    return [
        Telemetry(
            eta=etas[gi],
            sq_norm=sq_norms[num_groups if norm_scope == "global" else gi],
            clamped=clamped[gi],
        )
        for gi in range(num_groups)
    ]


# ------------------------------------------------------------------- step


def fused_step(
    groups: list[GroupTensors], *, gate: str, power: float, norm_scope: str,
    reduce_sums: SumReducer | None = None, config: FusedConfig | None = None,
) -> list[Telemetry]:
    """One exact VRAdam step over all groups (contract: :func:`vradam.functional.vradam_step`).

    ``config`` sets the launch shape (default :data:`DEFAULT_CONFIG`). Returns
    one Telemetry per group, float32 0-dim tensors on the parameters' device.
    ``reduce_sums`` (sharded parameters) sums the G + 1 norms over ranks
    between the reduction and pass 2.
    """
    kernels = _kernels()
    config = config or DEFAULT_CONFIG
    device = _device_of(groups)
    plan = _plan_for(groups, device, config)
    if plan.step_mirror is not None:
        _refresh_step_mirror(plan, groups)
    num_groups = len(groups)
    partials, sq_norms, etas, clamped = _outputs(plan, num_groups, device)
    flags = _gate_flags(gate, power)

    for g, group_launches in zip(groups, plan.launches):
        for launch in group_launches:
            kernels.first_pass_kernel[(launch.num_chunks,)](
                launch.table, partials, launch.first_partial,
                g.beta1, 1.0 - g.beta1, g.beta2, 1.0 - g.beta2, float(power),
                GRAD_DTYPE=kernels.TRITON_DTYPES[launch.param_dtype],
                MOMENT_DTYPE=kernels.TRITON_DTYPES[launch.moment_dtype],
                MAXIMIZE=bool(g.maximize), INCREMENT_STEPS=plan.step_mirror is None,
                ALIGNED=launch.aligned, CHUNK=config.chunk, BLOCK=config.block,
                num_warps=config.num_warps,
                **flags,
            )
    kernels.reduce_norm_kernel[(1,)](
        partials, plan.group_bounds, sq_norms, num_groups, BLOCK=config.block,
        num_warps=config.num_warps,
    )
    _reduce_over_ranks(sq_norms, reduce_sums)
    for gi, (g, group_launches) in enumerate(zip(groups, plan.launches)):
        norm_slot = num_groups if norm_scope == "global" else gi
        lr, lr_is_pointer = _lr_argument(g.lr, device)
        # a group without tensors still runs one empty program: it writes the telemetry
        runs = group_launches or [
            _Launch(plan.empty_table, 1, 0, torch.float32, torch.float32, aligned=False)]
        for k, launch in enumerate(runs):
            kernels.second_pass_kernel[(launch.num_chunks,)](
                launch.table, sq_norms, norm_slot, etas, clamped, gi if k == 0 else -1,
                lr, g.beta3, g.alpha1, _log_beta(g.beta1), _log_beta(g.beta2), g.eps,
                g.weight_decay,
                PARAM_DTYPE=kernels.TRITON_DTYPES[launch.param_dtype],
                MOMENT_DTYPE=kernels.TRITON_DTYPES[launch.moment_dtype],
                LR_IS_POINTER=lr_is_pointer,
                ALIGNED=launch.aligned, CHUNK=config.chunk, BLOCK=config.block,
                num_warps=config.num_warps,
            )
    return _telemetry(sq_norms, etas, clamped, norm_scope)


def fused_lagged_step(
    groups: list[GroupTensors], *, gate: str, power: float, norm_scope: str,
    previous_sq_norms: list[Tensor], config: FusedConfig | None = None,
) -> list[Telemetry]:
    """One pass of the lagged variant: step t gated by s_{t-1} (module docstring).

    ``previous_sq_norms``: per group, the ``sq_norm`` this function returned for
    it at the previous step (0-dim float32 zeros before the first step). The
    returned Telemetry holds eta_t and the clamp flag of this step, and s_t,
    the norm that will gate the next step. Plain tensors only: it does not
    sum s_t over ranks.
    """
    kernels = _kernels()
    config = config or DEFAULT_CONFIG
    device = _device_of(groups)
    if len(previous_sq_norms) != len(groups):
        raise ValueError(
            f"previous_sq_norms has {len(previous_sq_norms)} entries; allowed: one per group "
            f"({len(groups)})"
        )
    plan = _plan_for(groups, device, config)
    if plan.step_mirror is None:
        torch._foreach_add_([s for g in groups for s in g.steps], 1)
    else:
        _refresh_step_mirror(plan, groups)
    num_groups = len(groups)
    partials, sq_norms, etas, clamped = _outputs(plan, num_groups, device)
    flags = _gate_flags(gate, power)
    for gi, (g, group_launches) in enumerate(zip(groups, plan.launches)):
        lr, lr_is_pointer = _lr_argument(g.lr, device)
        previous = previous_sq_norms[gi].to(device=device, dtype=torch.float32)
        if not group_launches:
            etas[gi] = lr / (1.0 + torch.clamp(g.beta3 * previous, max=g.alpha1))
            clamped[gi] = g.beta3 * previous >= g.alpha1
        for k, launch in enumerate(group_launches):
            dtype = kernels.TRITON_DTYPES[launch.param_dtype]
            kernels.one_pass_kernel[(launch.num_chunks,)](
                launch.table, previous, partials, launch.first_partial,
                etas, clamped, gi if k == 0 else -1,
                lr, g.beta1, 1.0 - g.beta1, g.beta2, 1.0 - g.beta2, g.beta3, g.alpha1,
                _log_beta(g.beta1), _log_beta(g.beta2), g.eps, g.weight_decay, float(power),
                PARAM_DTYPE=dtype, GRAD_DTYPE=dtype,
                MOMENT_DTYPE=kernels.TRITON_DTYPES[launch.moment_dtype],
                MAXIMIZE=bool(g.maximize), LR_IS_POINTER=lr_is_pointer,
                ALIGNED=launch.aligned, CHUNK=config.chunk, BLOCK=config.block,
                num_warps=config.num_warps,
                **flags,
            )
    kernels.reduce_norm_kernel[(1,)](
        partials, plan.group_bounds, sq_norms, num_groups, BLOCK=config.block,
        num_warps=config.num_warps,
    )
    return _telemetry(sq_norms, etas, clamped, norm_scope)


def _reduce_over_ranks(sq_norms: Tensor, reduce_sums: SumReducer | None) -> None:
    """Replace the local s per group (and their total) by the sums over ranks."""
    if reduce_sums is None:
        return
    reduced = reduce_sums(sq_norms)
    if reduced is not sq_norms:
        sq_norms.copy_(reduced)


def _device_of(groups: list[GroupTensors]) -> torch.device:
    """The parameters' device, refusing one the kernels cannot run on, and DTensors."""
    if any(is_dtensor(p) for g in groups for p in g.params):
        raise ValueError(f"impl='fused' cannot step these parameters: {_DTENSOR_REASON}")
    device = next(p.device for g in groups for p in g.params)
    if device.type != "cuda" and not (device.type == "cpu" and is_interpreted()):
        raise ValueError(
            f"impl='fused' runs on CUDA tensors, got parameters on {device}; allowed: "
            "device type 'cuda' (CPU tensors only under TRITON_INTERPRET=1), or use "
            "impl='foreach'"
        )
    return device
