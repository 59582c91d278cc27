"""Edge-of-stability measurements in anyone's training loop: one object, the same record as ``eos run``.

:class:`EoSMonitor` is what a training step's tracking is, wherever the loop
lives: ``eos run``'s loop, a plain PyTorch loop, a Lightning or Hugging Face
callback (:mod:`eos_toolkit.integrations`).  Called after every
``optimizer.step()``, it records

* per step, on the device and without a host sync: the train loss (when the
  loop passes it), the scheduled rate ``lr`` and the effective rate ``eta``
  (VRAdam's eta_t), VRAdam's s_t and clamp, the update's norm, its cosine to
  the previous update and its component along the latest top Hessian
  eigenvector (whose sign flips are the oscillation), the gradient norm when
  the loop clips;
* every ``every`` steps, at the parameters the steps produced: one host sync
  for the buffered rows, the tracking loss (or the loop's own evaluation),
  the top-k Hessian eigenvalues, the preconditioned ones where the
  optimizer has a preconditioner, and the thresholds of the step that
  produced the parameters (its ``lr``; for VRAdam also its eta_t), and
  optionally the spectral density.

What a preconditioner, rate and threshold are for the optimizer comes from
its adapter (:mod:`eos_toolkit.adapters`, found from the optimizer itself);
an optimizer without one gets plain sharpness, no threshold, and one warning.
Metric names are :mod:`eos_toolkit.metrics`; the record format is
:mod:`eos_toolkit.record`, so ``eos plot``, ``eos report`` and
``analysis.load_runs`` read a monitored loop's record as they read a run's.

Which step a measurement belongs to: step ``t`` is the parameters after
``t`` updates.  :meth:`EoSMonitor.start` measures step 0 (call it before the
first update); each :meth:`EoSMonitor.step` records the update just taken
(step ``t - 1`` to ``t``) and, when ``t`` is a multiple of ``every``,
measures at ``t``.  Read the rate before the scheduler steps: call
``monitor.step(loss)`` between ``optimizer.step()`` and ``scheduler.step()``.

Data parallelism: give each rank its shard of the tracking batches and the
``process_group``; products are all-reduced, every rank runs the same solve,
and only the rank that holds the writer (rank 0 by default) writes.

Example (a plain loop)::

    >>> import tempfile, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> mse = torch.nn.functional.mse_loss
    >>> monitor = EoSMonitor(model, opt, mse, [(x, y)], every=5, out=tempfile.mkdtemp() + "/run")
    >>> measured = monitor.start()
    >>> for _ in range(10):
    ...     opt.zero_grad(); loss = mse(model(x), y); loss.backward(); opt.step()
    ...     measured = monitor.step(loss) or measured
    >>> monitor.close()
    >>> sorted(k for k in measured if "threshold" in k), measured["precond_sharpness"] > 0
    (['precond_threshold'], True)
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from . import metrics as names
from . import record
from .adapters import OptimizerAdapter, adapter_for
from .batches import as_args
from .modes import module_mode
from .settings import AUTO
from .solvers import gaussian_density, slq_density
from .tracker import SharpnessTracker

DENSITY_GRID = 400  # points of the grid a spectral density is evaluated on
Row = tuple[int, str, "float | torch.Tensor"]


class NoAdapterWarning(UserWarning):
    """The optimizer has no stability adapter: plain sharpness only, no preconditioned line, no threshold."""


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Detached tensors concatenated into one vector."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def environment(device: torch.device) -> dict:
    """Versions and machine, for a record's environment.json (a caller adds what else it knows)."""
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device), "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


class EoSMonitor:
    """Sharpness against the optimizer's stability threshold in a training loop, recorded (module docstring).

    ``model``, ``loss_fn`` and ``batches`` (``(inputs, targets)`` chunks the
    Hessian is measured on) as for :class:`~eos_toolkit.tracker.SharpnessTracker`;
    ``optimizer`` the optimizer that trains ``model``.  ``every``: measure
    every N steps.  ``k``, ``method``, ``bn_mode``, ``dropout``, ``tol``,
    ``max_iter``, ``seed``, ``chunk_weights``, ``process_group``: the
    tracker's.  ``precondition``: measure ``P^-1 H`` too (default: where the
    optimizer's adapter has a ``P``).

    Record: ``out`` (a new directory; the monitor creates the record, holds
    its lock, writes ``config`` and the environment) or ``writer`` (an open
    :class:`~eos_toolkit.record.RunWriter`, e.g. the ``eos run`` loop's); with
    neither, nothing is written and :meth:`step` still returns what it
    measured.  ``sinks``: callables given each written block of ``(step,
    metric, value)`` rows (TensorBoard, a framework's loggers).
    ``evaluate``: called at tracking steps for the loop's own metrics
    (``{name: value}``, e.g. ``track_loss`` and ``track_acc``); by default the
    monitor evaluates ``track_loss`` on its batches itself.
    ``loss_reduction``: how ranks' train losses combine (``"mean"`` for
    per-rank means, ``"sum"`` for parts of one objective).
    ``diverge_factor``: a train loss that is not finite or above this times
    the first one ends the record's rows at that step (:attr:`diverged_at`).
    ``density_every``: the spectral density (SLQ, ``density_probes`` x
    ``density_steps`` products) every N steps (0: never).

    Resuming: ``state`` is an earlier :meth:`state_dict` (taken with the
    model's parameters that the loop restores before this); with ``out``,
    the record there is reopened, its rows after the last one written before
    the state was taken are dropped, and a ``resumed`` event is written, so
    the record continues as if never interrupted.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 batches: Sequence, *, every: int = 10, k: int = 1, precondition: bool | None = None,
                 method: str = AUTO, bn_mode: str = "eval", dropout: str = "off", tol: float = 1e-3,
                 max_iter: int = 60, seed: int = 0, chunk_weights=None, process_group=None,
                 out: str | os.PathLike | None = None, config: dict | None = None,
                 writer: record.RunWriter | None = None, sinks: Sequence[Callable] = (),
                 evaluate: Callable[[], dict] | None = None, loss_reduction: str = "mean",
                 diverge_factor: float | None = None, density_every: int = 0, density_probes: int = 4,
                 density_steps: int = 60, state: dict | None = None):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if out is not None and writer is not None:
            raise ValueError("give out (a new record) or writer (an open one), not both")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.every, self.process_group, self.loss_reduction = every, process_group, loss_reduction
        self.diverge_factor, self.evaluate = diverge_factor, evaluate
        self.density_every, self.density_probes, self.density_steps = density_every, density_probes, density_steps
        self.adapter = self._adapter(optimizer)
        has_p = self.adapter is not None and self.adapter.preconditioned
        if precondition is None:
            precondition = has_p
        elif precondition and not has_p:
            raise ValueError(f"precondition=True needs an optimizer with a preconditioner; {type(optimizer).__name__} "
                             "has none (its stability is read on the raw sharpness)")
        self.batches = list(batches)
        _check_batches_fit(model, self.batches)
        self.tracker = SharpnessTracker(model, loss_fn, self.batches, k=k, method=method, bn_mode=bn_mode,
                                        dropout=dropout, tol=tol, max_iter=max_iter, precondition=precondition,
                                        seed=seed, chunk_weights=chunk_weights, process_group=process_group)
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.tracker.hessian.device
        self.density_generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.step_count = 0
        self.prev_params = flat(self.params)  # where the next update starts
        self.prev_update: torch.Tensor | None = None
        self.last_lr: float | None = None  # the scheduled and the effective rate of the last step taken
        self.last_rate: float | torch.Tensor | None = None
        self.warned_precond = False
        self.noted_fallback = False
        self.initial_loss: float | None = None
        self.diverged_at: int | None = None
        self.pending: list[Row] = []
        self.final: dict[str, float] = {}  # the last value of every metric written
        self.written_through = -1  # the last step with a row written
        self.sinks = list(sinks)
        self.owns_writer = out is not None
        self.writer = writer
        if state is not None:
            self.load_state_dict(state)
        if out is not None and self._is_writer_rank():
            if state is None:
                self.writer = record.RunWriter.create(out, config or self._config(k, every), environment(device))
                self.writer.event("started", step=0)
            else:
                self.writer = record.RunWriter.open(out)
                self.writer.truncate_metrics_after(self.written_through)
                self.writer.event("resumed", step=self.step_count)

    # -- set-up ------------------------------------------------------------------------------
    @staticmethod
    def _adapter(optimizer) -> OptimizerAdapter | None:
        try:
            return adapter_for(optimizer)
        except ValueError as err:
            warnings.warn(f"{err}; recording plain sharpness only: no preconditioned sharpness and no threshold",
                          NoAdapterWarning, stacklevel=3)
            return None

    def _is_writer_rank(self) -> bool:
        return self.process_group is None or torch.distributed.get_rank(self.process_group) == 0

    def _config(self, k: int, every: int) -> dict:
        """What the monitor knows of the run: the optimizer, its rate, the tracking settings."""
        group = self.optimizer.param_groups[0]
        name = type(self.optimizer).__name__
        lr = float(group["lr"])
        return {"task": "user-loop", "optimizer": name.lower(), "label": f"{name} lr={lr:g}", "lr": lr,
                "track_every": every, "track_k": k, "track_precond": self.tracker.precondition,
                **{key: group[key] for key in ("momentum", "betas", "eps", "weight_decay", "beta3", "alpha1")
                   if key in group and not isinstance(group[key], torch.Tensor)}}

    # -- per step ------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Remember the parameters before an update (a framework hook); :meth:`step` otherwise uses the last ones."""
        self.prev_params = flat(self.params)

    def observe_step(self, loss: torch.Tensor | float | None = None, *, grad_norm: torch.Tensor | None = None,
                     lr: float | None = None) -> None:
        """Buffer the metrics of the update just taken, on the device, without a host sync.

        ``lr``: the scheduled rate the update used, where the loop's scheduler
        has already moved group 0's ``lr`` on (default: group 0's ``lr`` now).
        """
        current = flat(self.params)
        update = current - self.prev_params
        t, rows = self.step_count, self.pending
        lr = self.optimizer.param_groups[0]["lr"] if lr is None else lr
        self.last_lr = float(lr)
        self.last_rate = self.adapter.effective_rate(self.optimizer, float(lr)) if self.adapter else float(lr)
        if loss is not None:
            rows.append((t, names.TRAIN_LOSS, loss.detach() if isinstance(loss, torch.Tensor) else float(loss)))
        rows += [(t, names.LR, float(lr)), (t, names.UPDATE_NORM, update.norm()), (t, names.ETA, self.last_rate)]
        if grad_norm is not None:
            rows.append((t, names.GRAD_NORM, grad_norm.detach()))
        if self.adapter is not None and self.adapter.gated:  # VRAdam: s_t and the clamp, as device tensors
            telemetry = self.optimizer.telemetry(0)
            rows += [(t, names.VR_SQ_NORM, telemetry["sq_norm"].detach().clone()),
                     (t, names.VR_CLAMPED, telemetry["clamped"].detach().clone())]
        if self.prev_update is not None:
            cos = torch.dot(update, self.prev_update) / (update.norm() * self.prev_update.norm()).clamp_min(1e-30)
            rows.append((t, names.UPDATE_COS, cos))
        top = self.tracker.top_eigenvector_flat
        if top is not None:
            rows.append((t, names.UPDATE_PROJ_TOP, torch.dot(update, top.to(update.dtype))))
        self.prev_update = update
        self.prev_params = current
        self.step_count += 1

    def due(self) -> bool:
        """Whether the current step is a tracking step (a multiple of ``every``)."""
        return self.step_count % self.every == 0

    def step(self, loss: torch.Tensor | float | None = None, *, grad_norm: torch.Tensor | None = None,
             lr: float | None = None) -> dict[str, float] | None:
        """After ``optimizer.step()``: record the update; at a tracking step, measure and return the metrics."""
        self.observe_step(loss, grad_norm=grad_norm, lr=lr)
        if not self.due():
            return None
        self.flush()
        return self.measure()

    def start(self) -> dict[str, float]:
        """Measure at the current parameters as step 0 (before the first update); returns the metrics."""
        self.prev_params = flat(self.params)
        return self.measure()

    # -- writing ------------------------------------------------------------------------------
    def _write(self, rows: list[tuple[int, str, float]]) -> None:
        if not rows:
            return
        if self.writer is not None:
            self.writer.log_metrics(rows)
        for sink in self.sinks:
            sink(rows)
        self.final.update({m: v for _, m, v in rows})
        self.written_through = max(self.written_through, max(s for s, _, _ in rows))

    def event(self, name: str, **fields) -> None:
        """An event in the record (``warning``, ``diverged``, ...), on the writing rank."""
        if self.writer is not None:
            self.writer.event(name, **fields)

    def flush(self) -> list[tuple[int, str, float]]:
        """Write the buffered per-step rows (one host sync); returns them with host values.

        Ranks' train losses are combined by ``loss_reduction`` (one
        all-reduce).  With ``diverge_factor``, the rows end at the first step
        whose train loss is not finite or above the factor times the first
        one, and :attr:`diverged_at` names that step.
        """
        rows, self.pending = self.pending, []
        if not rows:
            return []
        tensors = [v for _, _, v in rows if isinstance(v, torch.Tensor)]
        stacked = torch.stack([v.double().reshape(()) for v in tensors]) if tensors else None
        if self.process_group is not None and stacked is not None:
            is_loss = torch.tensor([m == names.TRAIN_LOSS for _, m, v in rows if isinstance(v, torch.Tensor)],
                                   device=stacked.device)
            combined = self.tracker.hessian.collective.all_reduce(stacked * is_loss)
            if self.loss_reduction == "mean":
                combined = combined / torch.distributed.get_world_size(self.process_group)
            stacked = torch.where(is_loss, combined, stacked)
        host = iter(stacked.tolist()) if stacked is not None else iter(())  # sync: the interval's rows at once
        values = [(s, m, next(host) if isinstance(v, torch.Tensor) else v) for s, m, v in rows]
        for s, m, v in values:
            if m != names.TRAIN_LOSS:
                continue
            if self.initial_loss is None:
                self.initial_loss = v
            if self.diverge_factor is not None and (
                    not math.isfinite(v) or v > self.diverge_factor * max(self.initial_loss, 1e-12)):
                values = [r for r in values if r[0] <= s]
                self.diverged_at = s
                break
        self._write(values)
        return values

    # -- at a tracking step ----------------------------------------------------------------------
    def measure(self, evaluated: dict | None = None, *, first_rows: Sequence = ()) -> dict[str, float]:
        """Measure at the current parameters (step :attr:`step_count`), write and return the metrics.

        ``evaluated``: the loop's own metrics at this step (``{name: value}``;
        default: :attr:`evaluate`'s, else ``track_loss`` on the batches).
        ``first_rows``: rows the loop writes ahead of them (its throughput).
        """
        t = self.step_count
        if evaluated is None:
            evaluated = self.evaluate() if self.evaluate is not None else self._track_loss()
        evaluated = _host_values(evaluated)
        rows = [*first_rows, *((t, name, value) for name, value in evaluated.items())]
        rows += self._sharpness_and_thresholds(t)
        if self.density_every and t % self.density_every == 0:
            rows += self._density(t)
        self._write(rows)
        return {m: v for _, m, v in rows}

    def _track_loss(self) -> dict[str, torch.Tensor]:
        """The loss on the tracking batches (size-weighted mean; eval mode, dropout off)."""
        op = self.tracker.hessian
        total = torch.zeros((), dtype=torch.float64, device=op.device)
        with torch.no_grad(), module_mode(self.model, op.bn_mode, "off"):
            for (x, y), w in zip(op.batches, op.chunk_weights):
                total += self.loss_fn(self.model(*as_args(x)), y).double() * w
        total = op.collective.all_reduce(total)
        return {names.split_metric(names.TRACK, "loss"): total}

    def _sharpness_and_thresholds(self, t: int) -> list[tuple[int, str, float]]:
        """Sharpness (raw, and preconditioned where the optimizer has a P) and the lines it is compared with.

        The rates are those of step t - 1, which produced the measured
        parameters and left P in the optimizer state. Before the first step
        (t = 0) the threshold uses the scheduled rate of step 0, and the
        preconditioned metrics and the gated line are not recorded (no P and
        no eta_t exist yet). A P missing later (a parameter without optimizer
        state) gives NaN preconditioned metrics and one ``warning`` event.
        """
        preconditioner = None
        if self.tracker.precondition:
            preconditioner = self.adapter.preconditioner(self.optimizer, self.tracker.hessian.parameters)
            if preconditioner is None and t > 0 and not self.warned_precond:
                self.warned_precond = True
                self.event("warning", step=t, message=(
                    "preconditioned metrics are NaN: the optimizer has no state for some tracked parameters "
                    "(a parameter that never received a gradient?)"))
        chosen_before = self.tracker.method_choice
        measured = self.tracker.measure(preconditioner)
        if self.tracker.method_choice is not chosen_before:  # hvp_method "auto" chose on this measurement
            self.event("hvp_method", step=t, **self.tracker.method_choice)
        fallback = self.tracker.hessian.kernel_fallback
        if fallback is not None and not self.noted_fallback:  # products switched to plain kernels (once a process)
            self.noted_fallback = True
            self.event("kernel_fallback", step=t, message=fallback)
        if self.last_lr is None and preconditioner is None:
            # Before the first step no preconditioner exists (not a gap): nothing to record.
            measured = {k: v for k, v in measured.items() if not k.startswith(names.PRECOND)}
        rows = [(t, name, value) for name, value in measured.items()]
        if self.adapter is None:
            return rows
        lr = self.last_lr if self.last_lr is not None else float(self.optimizer.param_groups[0]["lr"])
        name = names.PRECOND_THRESHOLD if self.adapter.preconditioned else names.THRESHOLD
        rows.append((t, name, self._threshold(lr)))
        if self.adapter.gated and self.last_rate is not None:  # the line at the effective rate (VRAdam's eta_t)
            rows.append((t, names.at_eta(name), self._threshold(float(self.last_rate))))
        return rows

    def _threshold(self, rate: float) -> float:
        # A schedule may bring the rate to 0 (cosine's last step): no step, no threshold.
        return float(self.adapter.threshold(self.optimizer, rate)) if rate > 0 else math.inf

    def _density(self, t: int) -> list[tuple[int, str, float]]:
        """SLQ spectral density of the Hessian, written to the record's density table."""
        op = self.tracker.hessian
        start = time.perf_counter()
        with op.measurement():  # reuse_graph: one set of graphs for all the density's products
            sld = slq_density(op, n_probes=self.density_probes, n_steps=self.density_steps, dtype=torch.float64,
                              generator=self.density_generator)
        lo, hi = sld.nodes.min(), sld.nodes.max()
        pad = 0.05 * (hi - lo)
        grid = torch.linspace(lo - pad, hi + pad, DENSITY_GRID, dtype=sld.nodes.dtype, device=sld.nodes.device)
        density = gaussian_density(sld, grid, sigma=float((hi - lo) / 100))  # sync: bounds for the grid width
        if self.writer is not None:
            self.writer.log_density(t, grid.tolist(), density.tolist())
        return [(t, names.DENSITY_SECONDS, time.perf_counter() - start)]

    # -- end, state ------------------------------------------------------------------------------
    def close(self, status: str = "finished", **fields) -> None:
        """Write what is buffered and the run's last event (``finished``, ``diverged`` or ``failed``)."""
        self.flush()
        self.event(status, step=self.step_count, **fields)
        if self.owns_writer and self.writer is not None:
            self.writer.close()

    def state_dict(self) -> dict:
        """What a resumed loop needs to continue as if uninterrupted (warm-start vectors included).

        Writes the buffered rows first (one host sync), so the record holds
        everything the state has seen.
        """
        self.flush()
        return {"step": self.step_count, "written_through": self.written_through,
                "tracker": self.tracker.state_dict(), "prev_update": self.prev_update,
                "last_lr": self.last_lr,
                "last_rate": None if self.last_rate is None else float(self.last_rate),
                "warned_precond": self.warned_precond, "initial_loss": self.initial_loss,
                "density_rng": self.density_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after the model's parameters are restored: they are the next update's start)."""
        self.step_count = state["step"]
        self.tracker.load_state_dict(state["tracker"])
        self.prev_update = state["prev_update"]
        # .get: checkpoints written before these were kept resume with the step-0 convention
        self.last_lr, self.last_rate = state.get("last_lr"), state.get("last_rate")
        self.warned_precond = state.get("warned_precond", False)
        self.initial_loss = state["initial_loss"]
        self.density_generator.set_state(state["density_rng"].cpu())
        self.written_through = state.get("written_through", self.step_count - 1)
        self.prev_params = flat(self.params)


def _check_batches_fit(model: nn.Module, batches: list) -> None:
    """One forward pass on the first tracking chunk; a ValueError in one line when the model refuses it."""
    if not batches:
        raise ValueError("batches is empty: pass the tracking batches as a list of (inputs, targets) chunks")
    first = batches[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise ValueError(f"each tracking batch must be a pair (inputs, targets), got {type(first).__name__}"
                         + (f" of length {len(first)}" if isinstance(first, (tuple, list)) else ""))
    device = next(model.parameters()).device
    inputs = first[0]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in as_args(inputs))
    try:
        with torch.no_grad(), module_mode(model, "eval", "off"):
            model(*args)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        raise ValueError(f"the tracking batches do not fit the model: its forward pass on the first one (input "
                         f"shapes {shapes}) failed with {type(err).__name__}: {str(err).splitlines()[0][:200]}; a "
                         "batch is (inputs, targets), inputs the model's positional arguments") from None


def _host_values(metrics: dict) -> dict[str, float]:
    """``{name: float}`` from tensors and numbers, with one host transfer for every tensor."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return {k: float(v) for k, v in metrics.items()}
    values = torch.stack([metrics[k].detach().double().reshape(()) for k in keys]).tolist()  # sync: once
    host = dict(zip(keys, values))
    return {k: host[k] if k in host else float(v) for k, v in metrics.items()}
