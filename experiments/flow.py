"""``eos flow RUN_DIR``: integrate the central flow of a full-batch run beside a replay of the run.

The run's config rebuilds its task, model and optimizer from the same seed
(the data are checked against the record's checksums, as a resume does), so
the flow starts from the run's initial weights.  The flow
(:class:`eos_toolkit.central_flow.CentralFlow`, on a copy of the model) and
the optimizer (a replay of the run's steps, on the model itself) then
advance side by side, one unit of flow time per optimizer step: the
replay gives the real iterate ``w_real(t)`` whose displacement from the
flow's point is compared with the predicted oscillation.  The replay's
train loss is checked against the record's (a full-batch run is
deterministic on one device; the largest relative difference is reported).

What is written into the same record (names in :mod:`eos_toolkit.metrics`,
``flow_*``), every step: the flow's loss and predicted loss, its sharpness
and threshold, its rate, the edge count, the predicted variance, the
measured displacement, the distance, and the cost of the unit of time
beside the replay step's.  Events ``flow_started`` and ``flow_finished``
(the cost summary and the replay check) bracket them.

Bad input is a one-line error: a minibatch run (no deterministic trajectory
to average), an optimizer without a flow (:func:`eos_toolkit.flow_rules.flow_rule_for`),
gradient clipping, a run whose data are missing, and a record that already
holds a flow (``replace=True`` rewrites it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from eos_toolkit import metrics as names
from eos_toolkit import record
from eos_toolkit.central_flow import EDGE_FRACTION, CentralFlow, FlowStartError
from eos_toolkit.curvature_gradient import wrong_third_derivative_modules
from eos_toolkit.flow_rules import flow_rule_for
from eos_toolkit.hvp import hessian_operator
from eos_toolkit.method_choice import choose_method
from experiments.config import ConfigError, RunConfig
from experiments.resolve import resolve
from experiments.train import build_trainer, check_same_data


@dataclass
class FlowResult:
    run_dir: Path
    steps: int
    rule: str
    flow_seconds_per_step: float
    replay_seconds_per_step: float
    replay_max_rel_diff: float
    saturated: bool  # every tracked eigenvalue was at the edge at some step: more may have been


def _recorded_steps(rec: record.RunRecord) -> int:
    """The optimizer steps the record holds (its last train_loss row + 1)."""
    losses = rec.metrics[rec.metrics.metric == names.TRAIN_LOSS]
    return int(losses.step.max()) + 1 if len(losses) else 0


def check_flow_config(cfg: RunConfig) -> None:
    """A one-line error for a run no flow can follow (the optimizer's own check comes with its rule)."""
    if not cfg.full_batch:
        raise ConfigError(f"a central flow needs a full-batch run (full_batch=true); task {cfg.task!r} ran "
                          "minibatches, which have no deterministic trajectory to average")
    if cfg.clip_norm is not None:
        raise ConfigError(f"no central flow with gradient clipping (clip_norm={cfg.clip_norm!r})")


def check_flow_model(model: torch.nn.Module) -> None:
    """Refuse normalisation layers whose third derivatives torch gets wrong, or whose training objective
    (batch statistics) differs from any fixed-data loss (:func:`~eos_toolkit.curvature_gradient.wrong_third_derivative_modules`)."""
    model.train()
    wrong = wrong_third_derivative_modules(model)
    if wrong:
        raise ValueError(f"no central flow through {', '.join(wrong)}: its third derivatives are wrong in torch "
                         "(use a LayerNorm in plain tensor operations; no BatchNorm)")


def _first_step_below(rec: record.RunRecord, rule: str, start: int) -> int | None:
    """The first tracked step >= ``start`` at which the run's (preconditioned) sharpness was at or below its threshold."""
    m = rec.metrics
    sharp, thresh = ((names.SHARPNESS, names.THRESHOLD) if rule == "gd" else
                     (names.PRECOND_SHARPNESS, names.at_eta(names.PRECOND_THRESHOLD) if rule == "vradam"
                      else names.PRECOND_THRESHOLD))
    wide = m[m.metric.isin([sharp, thresh])].pivot_table(index="step", columns="metric", values="value")
    if sharp not in wide or thresh not in wide:
        return None
    below = wide[(wide.index >= start) & (wide[sharp] <= wide[thresh])]
    return int(below.index[0]) if len(below) else None


def integrate_flow(run_dir: str | Path, *, start: int = 0, steps: int | None = None, substeps: int = 4, k: int = 3,
                   edge: float = EDGE_FRACTION, tol: float = 1e-4, replace: bool = False,
                   on_step: Callable[[int, int], None] | None = None) -> FlowResult:
    """Integrate the central flow of the run in ``run_dir`` and record it.

    ``start``: the step from which the flow starts, from the replay's weights
    and optimizer state there (a flow must start at or below its threshold;
    RMSProp's and Adam's first steps are far above theirs).  ``steps``:
    units of flow time (default: to the run's last step).  ``k``:
    eigenpairs tracked per refresh (the edge may hold up to ``k``);
    ``tol``: their Lanczos residual tolerance, tighter than a tracking
    step's (the third derivatives are taken along the vectors).
    """
    run_dir = Path(run_dir)
    with record.RunLock(run_dir):
        rec = record.read_run(run_dir)
        cfg = resolve(RunConfig.from_dict(rec.config))
        check_flow_config(cfg)
        if rec.status == "incomplete":
            raise ValueError(f"{run_dir} is incomplete (still running, or killed): resume it first")
        has_flow = any(names.is_flow_metric(m) for m in rec.metrics.metric.unique())
        if has_flow and not replace:
            raise FileExistsError(f"{run_dir} already holds a central flow; pass --replace to integrate it again")
        available = _recorded_steps(rec)
        if not 0 <= start < available:
            raise ValueError(f"start must lie in [0, {available - 1}] (the steps the run recorded), got {start}")
        steps = available - start if steps is None else steps
        if not 1 <= steps <= available - start:
            raise ValueError(f"steps must lie in [1, {available - start}] (the steps the run recorded after start "
                             f"{start}), got {steps}")
        trainer = build_trainer(cfg, run_dir)
        check_same_data(run_dir, rec.environment.get("data", {}), trainer.task.data_info)
        rule = flow_rule_for(trainer.optimizer)
        check_flow_model(trainer.model)
        for _ in range(start):  # the replay up to the flow's start
            trainer.train_step()
            trainer.monitor.flush()
        flow_model = copy.deepcopy(trainer.model)
        chunks = trainer.task.train_chunks(0)
        op = hessian_operator(flow_model, trainer.task.loss_fn, [(x, y) for x, y, _ in chunks],
                              chunk_weights=[w for _, _, w in chunks], bn_mode=cfg.hessian_bn_mode,
                              method="forward_over_reverse" if cfg.hvp_method == "auto" else cfg.hvp_method,
                              dtype=torch.float64)
        if cfg.hvp_method == "auto":
            choose_method(op, torch.randn(op.dim, k, dtype=op.dtype, device=op.device,
                                          generator=torch.Generator(op.device).manual_seed(cfg.seed)))
        real_params = [p for p in trainer.model.parameters() if p.requires_grad]
        state = rule.state_from(trainer.optimizer, real_params, op.loss_and_gradient()[1], start)
        rule.lr = float(trainer.optimizer.param_groups[0]["lr"])
        flow = CentralFlow(op, rule, state=state, k=k, substeps=substeps, edge=edge, tol=tol,
                           max_iter=cfg.lanczos_max_iter,
                           generator=torch.Generator(op.device).manual_seed(cfg.seed))
        try:
            flow.check_start()
        except FlowStartError as err:
            below = _first_step_below(rec, rule.name, start + 1)
            hint = f": e.g. --start {below}, the first tracked step the run was below it" if below else ""
            raise FlowStartError(f"at step {start} {err} (eos flow --start STEP){hint}") from None
        writer = record.RunWriter(run_dir)  # nothing is written before everything above has been checked
        if has_flow:
            writer.drop_metrics(names.is_flow_metric)
        writer.event("flow_started", step=start, rule=rule.name, substeps=substeps, k=k, edge=edge, tol=tol,
                     hvp_method=op.method, steps=steps)
        try:
            result = _integrate(trainer, rule, flow, op, writer, rec, start, steps, on_step)
        except Exception as exc:  # the rows written so far stay; the record says where and why it stopped
            writer.event("flow_failed", step=trainer.step, error=f"{type(exc).__name__}: {exc}")
            raise
        writer.event("flow_finished", step=start + steps, flow_seconds_per_step=result.flow_seconds_per_step,
                     replay_seconds_per_step=result.replay_seconds_per_step,
                     replay_max_rel_diff=result.replay_max_rel_diff, saturated=result.saturated)
        return result


def _integrate(trainer, rule, flow, op, writer, rec, first, steps, on_step) -> FlowResult:
    """The lockstep loop of :func:`integrate_flow`: flow step, replay step, one block of rows per step."""
    recorded = rec.metrics[rec.metrics.metric == names.TRAIN_LOSS].set_index("step").value
    real_params = [p for p in trainer.model.parameters() if p.requires_grad]
    flow_seconds = replay_seconds = 0.0
    worst = 0.0
    for t in range(first, first + steps):
        w_flow = flow.w
        w_real = torch.cat([p.detach().reshape(-1) for p in real_params]).to(op.dtype)
        begin = time.perf_counter()
        trainer.train_step()
        values = trainer.monitor.flush()  # the replay's per-step rows (written nowhere)
        replay = time.perf_counter() - begin
        # the schedule's rate of step t + 1, so that the flow's rate is linear across the unit
        measured = flow.step(next_lr=float(trainer.optimizer.param_groups[0]["lr"]))
        loss = next(v for _, m, v in values if m == names.TRAIN_LOSS)
        if t in recorded.index:
            worst = max(worst, abs(loss - recorded[t]) / max(abs(recorded[t]), 1e-30))
        d = w_real - w_flow
        rows = [(t, names.FLOW_LOSS, measured.loss), (t, names.FLOW_PREDICTED_LOSS, measured.predicted_loss),
                (t, names.FLOW_SHARPNESS, measured.sharpness), (t, names.FLOW_THRESHOLD, measured.threshold),
                (t, names.FLOW_RATE, measured.rate), (t, names.FLOW_EDGE_COUNT, measured.edge_count),
                (t, names.FLOW_VARIANCE, measured.variance),
                (t, names.FLOW_VARIANCE_TOP, measured.variances[0]),
                (t, names.FLOW_DISTANCE, float(d.norm())),
                (t, names.FLOW_MATVECS, measured.hessian_matvecs),
                (t, names.FLOW_THIRD_DERIVATIVES, measured.third_derivatives),
                (t, names.FLOW_SECONDS, measured.seconds), (t, names.FLOW_REPLAY_SECONDS, replay)]
        if measured.directions is not None:
            along = (measured.directions.T @ d).square()
            rows += [(t, names.FLOW_DISPLACEMENT_TOP, float(along[0])),
                     (t, names.FLOW_DISPLACEMENT, float(along.sum()))]
        writer.log_metrics(rows)
        flow_seconds += measured.seconds
        replay_seconds += replay
        if on_step is not None:
            on_step(t + 1 - first, steps)
    return FlowResult(writer.run_dir, steps, rule.name, flow_seconds / steps, replay_seconds / steps, worst,
                      flow.saturated)
