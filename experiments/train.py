"""The one training loop: train, track sharpness against the stability threshold, record.

At step t (parameters theta_t after t updates) the loop

1. every ``track_every`` steps (and at the first and last step): writes the
   buffered per-step metrics, checks for divergence and targets, saves a
   checkpoint, then measures on the fixed tracking subset: loss, accuracy,
   top-k Hessian eigenvalues, for Adam-family optimizers the preconditioned
   sharpness from the live optimizer state, and the stability thresholds;
2. takes one optimizer step and buffers, on the device and without a host
   sync, the per-step metrics: train loss, the scheduled rate, the effective
   rate (VRAdam's eta_t), s_t and the clamp flag, the update norm, the cosine
   between successive updates and the update's projection on the latest top
   Hessian eigenvector.

Host-device syncs happen only at tracking steps (one to read the buffered
per-step metrics, and the eigensolver's own), so the training steps between
them run asynchronously on a GPU.

Resume: a checkpoint at tracking step t holds everything the rest of the run
depends on (model, optimizer, scheduler, RNG states, the tracker's warm-start
vectors, the previous update). Resuming truncates the metrics after t - 1 and
replays from t, so on CPU the resumed run's metrics equal an uninterrupted
run's exactly (wall-clock metrics aside).

Data parallelism (``torchrun`` or ``eos run --nproc N``): each rank trains on
its shard of every step's batch under DistributedDataParallel, tracks
sharpness on its shard of the tracking set with all-reduced Hessian
products, and rank 0 alone writes the record; the metrics are the global
ones. See :mod:`experiments.distributed`.

Divergence: a NaN / Inf train loss, or one above ``diverge_factor`` times the
initial loss, stops the run with a ``diverged`` event at that step; the record
stays complete. Diverging is a result, not a crash.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from eos_toolkit import metrics as names
from eos_toolkit import record
from eos_toolkit.batches import as_args
from eos_toolkit.solvers import gaussian_density, slq_density
from eos_toolkit.tracker import SharpnessTracker
from experiments import distributed
from experiments.adapters import adapter_for
from experiments.config import RunConfig
from experiments.resolve import resolve, resolved
from experiments.optim import build_optimizer, build_scheduler, parameter_groups
from experiments.tasks import build_task
from experiments.tasks.base import Task

CHECKPOINT_NAME = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"  # the one before, kept until the new one is complete
# Points of the grid a spectral density is evaluated on (its cost is set by density_probes x density_steps).
DENSITY_GRID = 400


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | diverged
    step: int  # the last step reached
    final: dict = field(default_factory=dict)  # last value of each metric


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def environment_info(device: torch.device) -> dict:
    """Versions, machine and code revision, for environment.json."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "command": os.environ.get(distributed.LAUNCH_COMMAND) or " ".join(sys.argv),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class _NoRecord:
    """The record of a rank other than 0: it writes nothing (rank 0 writes the run's one record)."""

    def _nothing(self, *args, **kwargs) -> None:
        return None

    event = log_metrics = log_density = update_environment = truncate_metrics_after = _nothing


class Trainer:
    """Holds one run's state; :meth:`run` is the loop. Build with :func:`train`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, task: Task, device: torch.device,
                 group: distributed.Distributed | None = None):
        self.cfg, self.run_dir, self.task, self.device, self.group = cfg, run_dir, task, device, group
        self.model = task.model
        # What the training step calls: under data parallelism the DDP wrapper, which all-reduces
        # (averages) the gradient; everything else (tracker, evaluation, checkpoints) uses the model itself.
        self.train_model = self.model
        track_batches, track_weights = task.track_batches, task.track_chunk_weights
        if group is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=not task.every_parameter_used)
            batch_stats = cfg.hessian_bn_mode == "batch_stats" and any(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
            track_batches, track_weights = group.shard_batches(track_batches, track_weights,
                                                               whole_chunks=batch_stats)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, task.param_groups(parameter_groups(self.model, cfg)))
        self.adapter = adapter_for(self.optimizer)
        self.total = task.total_steps
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total)
        self.tracker = SharpnessTracker(
            self.model, task.loss_fn, track_batches, k=cfg.track_k, method=cfg.hvp_method,
            bn_mode=cfg.hessian_bn_mode, tol=cfg.lanczos_tol, max_iter=cfg.lanczos_max_iter,
            precondition=cfg.track_precond, seed=cfg.seed, chunk_weights=track_weights,
            process_group=None if group is None else torch.distributed.group.WORLD)
        self.interval_start: tuple[int, float] | None = None  # (step, time) where throughput counting began
        self.throughput_rows: list = []
        self.density_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.prev_update: torch.Tensor | None = None
        # The scheduled and the effective rate of the last step taken (None before the first).
        self.last_lr: float | None = None
        self.last_rate: float | torch.Tensor | None = None
        self.warned_precond = False
        self.noted_fallback = False
        self.initial_loss: float | None = None
        self.pending: list[tuple[int, str, torch.Tensor | float]] = []
        self.writer: record.RunWriter | _NoRecord | None = None
        self.final: dict[str, float] = {}

    # ---- the step's gradient ---------------------------------------------------
    def _gradient(self) -> torch.Tensor:
        """Accumulate this step's gradient into ``.grad``; returns the (device) loss.

        The task gives the step's batch as weighted chunks (one for a
        minibatch, several for a full batch): the objective is sum_c w_c loss_c.
        Under data parallelism the rank takes its pieces of them, and the loss
        returned is its part of the objective (summed over ranks at flushes);
        DDP averages the gradient over ranks, hence the factor ``world_size``,
        and synchronises it once, at the rank's last piece.
        """
        self.model.train()
        chunks = self.task.train_chunks(self.step)
        scale = 1
        if self.group is not None:
            chunks, scale = self.group.shard(chunks), self.group.world_size
        total = None
        for i, (inputs, targets, weight) in enumerate(chunks):
            defer = self.group is not None and i + 1 < len(chunks)
            with self.train_model.no_sync() if defer else contextlib.nullcontext():
                loss = self.task.loss_fn(self.train_model(*as_args(inputs)), targets) * weight
                (loss * scale if scale != 1 else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    # ---- one optimizer step ----------------------------------------------
    def train_step(self) -> None:
        """One optimizer step; its per-step metrics are buffered on the device (no host sync)."""
        before = flat(self.params)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._gradient()
        grad_norm = None
        if self.cfg.clip_norm is not None:  # the global norm before clipping, a device tensor (no sync)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        update = flat(self.params) - before
        t = self.step
        rows = self.pending
        self.last_lr, self.last_rate = float(lr), self.adapter.effective_rate(self.optimizer, float(lr))
        rows += [(t, names.TRAIN_LOSS, loss), (t, names.LR, float(lr)), (t, names.UPDATE_NORM, update.norm()),
                 (t, names.ETA, self.last_rate)]
        if grad_norm is not None:
            rows.append((t, names.GRAD_NORM, grad_norm.detach()))
        if hasattr(self.optimizer, "telemetry"):  # VRAdam: s_t and the clamp, as device tensors
            tel = self.optimizer.telemetry(0)
            rows += [(t, names.VR_SQ_NORM, tel["sq_norm"].detach().clone()),
                     (t, names.VR_CLAMPED, tel["clamped"].detach().clone())]
        if self.prev_update is not None:
            cos = torch.dot(update, self.prev_update) / (update.norm() * self.prev_update.norm()).clamp_min(1e-30)
            rows.append((t, names.UPDATE_COS, cos))
        top = self.tracker.top_eigenvector_flat
        if top is not None:
            rows.append((t, names.UPDATE_PROJ_TOP, torch.dot(update, top.to(update.dtype))))
        self.prev_update = update
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1

    # ---- writing, divergence, tracking ------------------------------------
    def _flush(self) -> tuple[str | None, int]:
        """Write buffered per-step rows (one sync).

        Returns ``("diverged", step)`` at the first non-finite or exploding
        train loss (rows after that step are dropped), ``("target", step)`` once
        the train loss reached ``target_loss``, else ``(None, step)``.
        """
        rows, self.pending = self.pending, []
        if not rows:
            return None, self.step
        tensors = [v for _, _, v in rows if isinstance(v, torch.Tensor)]
        stacked = torch.stack([v.double() for v in tensors]) if tensors else None
        if self.group is not None and stacked is not None:
            # Each rank's train_loss is its part of the objective: one all-reduce for the interval's losses.
            is_loss = torch.tensor([m == names.TRAIN_LOSS for _, m, v in rows if isinstance(v, torch.Tensor)],
                                   device=stacked.device)
            stacked = torch.where(is_loss, self.group.sum(stacked * is_loss), stacked)
        host = iter(stacked.tolist()) if stacked is not None else iter(())
        values = [(s, m, next(host) if isinstance(v, torch.Tensor) else v) for s, m, v in rows]
        outcome = None
        for s, m, v in values:
            if m != names.TRAIN_LOSS:
                continue
            if self.initial_loss is None:
                self.initial_loss = v
            if not math.isfinite(v) or v > self.cfg.diverge_factor * max(self.initial_loss, 1e-12):
                values = [r for r in values if r[0] <= s]
                self.writer.log_metrics(values)
                self.final.update({m: v for _, m, v in values})
                return "diverged", s
            if self.cfg.target_loss is not None and v <= self.cfg.target_loss:
                outcome = "target"
        self.writer.log_metrics(values)
        self.final.update({m: v for _, m, v in values})
        return outcome, self.step

    def _track(self) -> str | None:
        """Tracking measurements at the current step; returns 'target' when target_acc is reached."""
        t, cfg = self.step, self.cfg
        rows: list[tuple[int, str, float]] = self.throughput_rows
        self.throughput_rows = []
        evaluated = {}
        for split in self.task.splits:
            if split != "test" or (t == self.total and cfg.evaluate_test):  # the test split only at the end
                evaluated.update(self.task.evaluate(split))
        if evaluated:  # sync: one transfer for every evaluation metric
            keys = list(evaluated)
            values = torch.stack([evaluated[key].detach().double().reshape(()) for key in keys]).tolist()
            evaluated = dict(zip(keys, values))
        rows += [(t, name, value) for name, value in evaluated.items()]
        rows += self._sharpness_and_thresholds(t)
        if cfg.track_density_every and t % cfg.track_density_every == 0:
            rows += self._density(t)
        self.writer.log_metrics(rows)
        self.final.update({m: v for _, m, v in rows})
        if cfg.target_acc is not None:
            track_acc = names.split_metric(names.TRACK, "acc")
            if track_acc not in evaluated:
                raise ValueError(f"target_acc is set but task {cfg.task!r} records no {track_acc}; use target_loss")
            if evaluated[track_acc] >= cfg.target_acc:
                return "target"
        return None

    def _throughput(self, t: int) -> list[tuple[int, str, float]]:
        """``<unit>_per_second`` over the training steps since the last tracking step (tracking time excluded)."""
        unit, start, self.interval_start = self.task.throughput_unit, self.interval_start, None
        if unit is None or start is None or t <= start[0]:
            return []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync: wall time of the steps
        seconds = time.perf_counter() - start[1]
        return [(t, names.per_second(unit), (t - start[0]) * self.task.items_per_step / max(seconds, 1e-9))]

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
        if self.cfg.track_precond:
            preconditioner = self.adapter.preconditioner(self.optimizer, self.tracker.hessian.parameters)
            if preconditioner is None and self.step > 0 and not self.warned_precond:
                self.warned_precond = True
                self.writer.event("warning", step=t, message=(
                    "preconditioned metrics are NaN: the optimizer has no state for some tracked parameters "
                    "(a parameter that never received a gradient?)"))
        chosen_before = self.tracker.method_choice
        measured = self.tracker.measure(preconditioner)
        if self.tracker.method_choice is not chosen_before:  # hvp_method "auto" chose on this measurement
            self.writer.event("hvp_method", step=t, **self.tracker.method_choice)
        fallback = self.tracker.hessian.kernel_fallback
        if fallback is not None and not self.noted_fallback:  # products switched to plain kernels (once a process)
            self.noted_fallback = True
            self.writer.event("kernel_fallback", step=t, message=fallback)
        if self.last_lr is None and preconditioner is None:
            # Before the first step no preconditioner exists (not a gap): nothing to record.
            measured = {k: v for k, v in measured.items() if not k.startswith("precond_")}
        rows = [(t, name, value) for name, value in measured.items()]
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
            sld = slq_density(op, n_probes=self.cfg.density_probes, n_steps=self.cfg.density_steps,
                              dtype=torch.float64, generator=self.density_generator)
        lo, hi = sld.nodes.min(), sld.nodes.max()
        pad = 0.05 * (hi - lo)
        grid = torch.linspace(lo - pad, hi + pad, DENSITY_GRID, dtype=sld.nodes.dtype, device=sld.nodes.device)
        density = gaussian_density(sld, grid, sigma=float((hi - lo) / 100))  # sync: bounds for the grid width
        self.writer.log_density(t, grid.tolist(), density.tolist())
        return [(t, names.DENSITY_SECONDS, time.perf_counter() - start)]

    # ---- checkpoints --------------------------------------------------------
    def _checkpoint(self) -> None:
        # The ranks hold the same state but their own dropout streams: rank 0 saves the state and every stream.
        rng = {"rng_torch": torch.get_rng_state(),
               "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        ranks_rng = None if self.group is None else self.group.gather(rng)  # a collective: every rank
        if self.group is not None and not self.group.is_main:
            return
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "tracker": self.tracker.state_dict(),
            "task": self.task.state_dict(),
            "density_rng": self.density_generator.get_state(),
            "prev_update": self.prev_update,
            "last_lr": self.last_lr,
            "last_rate": None if self.last_rate is None else float(self.last_rate),
            "warned_precond": self.warned_precond,
            "initial_loss": self.initial_loss,
            **rng,
            "rng_python": list(random.getstate()[1]),
        }
        if ranks_rng is not None:
            state["rng_ranks"] = ranks_rng
        buf = io.BytesIO()
        torch.save(state, buf)
        directory = self.run_dir / record.CHECKPOINT_DIR
        if (directory / CHECKPOINT_NAME).exists():  # kept until the new one is complete
            os.replace(directory / CHECKPOINT_NAME, directory / PREVIOUS_CHECKPOINT)
        record.write_bytes_atomic(directory / CHECKPOINT_NAME, buf.getvalue())

    def load_checkpoint(self, metrics=None) -> tuple[str, list[str]]:
        """Load the newest usable checkpoint; returns its file name and why newer ones were passed over.

        Usable: it loads, and (given the record's ``metrics``) the metrics reach
        the step before it, so that replaying from it loses no row. Tries
        ``last.pt``, then ``previous.pt``; ValueError saying why when neither does.
        Under data parallelism rank 0 chooses and reads the file and sends it
        to the other ranks.
        """
        if self.group is None:
            name, passed_over, _, state = self._pick_checkpoint(metrics)
            self._apply_checkpoint(state)
            return name, passed_over
        found = None
        if self.group.is_main:
            try:
                name, passed_over, data, _ = self._pick_checkpoint(metrics)
                found = (name, passed_over, data)  # the file's bytes travel; each rank loads them onto its device
            except (ValueError, FileNotFoundError) as exc:
                found = exc
        found = self.group.broadcast(found)
        if isinstance(found, Exception):
            raise found
        name, passed_over, data = found
        self._apply_checkpoint(torch.load(io.BytesIO(data), map_location=self.device, weights_only=True))
        return name, passed_over

    def _pick_checkpoint(self, metrics) -> tuple[str, list[str], bytes, dict]:
        """The newest usable checkpoint: its name, why newer ones were passed over, its bytes and its state."""
        directory = self.run_dir / record.CHECKPOINT_DIR
        passed_over = []
        for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT):
            path = directory / name
            if not path.exists():
                continue
            data = path.read_bytes()
            try:
                state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
            except Exception as exc:  # truncated or corrupt file: torch says why in its own words
                passed_over.append(f"{name} does not load ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            if metrics is not None and state["step"] > 0:
                loss = metrics[metrics.metric == names.TRAIN_LOSS]
                reached = int(loss.step.max()) if len(loss) else -1
                if reached < state["step"] - 1:
                    passed_over.append(f"{name} is at step {state['step']} but metrics.csv ends at step {reached}")
                    continue
            return name, passed_over, data, state
        if not passed_over:
            raise FileNotFoundError(f"{self.run_dir} has no checkpoint (in {directory}); it cannot be resumed")
        raise ValueError(f"{self.run_dir} cannot be resumed without losing results: " + "; ".join(passed_over))

    def _apply_checkpoint(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.tracker.load_state_dict(state["tracker"])
        self.task.load_state_dict(state.get("task", {}))
        self.density_generator.set_state(state["density_rng"].cpu())
        self.prev_update = state["prev_update"]
        # .get: checkpoints written before these were kept resume with the step-0 convention
        self.last_lr, self.last_rate = state.get("last_lr"), state.get("last_rate")
        self.warned_precond = state.get("warned_precond", False)
        self.initial_loss = state["initial_loss"]
        rng = state
        if self.group is not None and "rng_ranks" in state:
            rng = state["rng_ranks"][self.group.rank]  # this rank's own dropout stream
        torch.set_rng_state(rng["rng_torch"].cpu())
        if rng["rng_cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["rng_cuda"]])
        random.setstate((3, tuple(state["rng_python"]), None))

    # ---- the loop -----------------------------------------------------------
    def run(self, on_step: Callable[[int, int], None] | None = None) -> RunResult:
        cfg = self.cfg
        try:
            while True:
                at_end = self.step >= self.total
                if self.step % cfg.track_every == 0 or at_end:
                    self.throughput_rows = self._throughput(self.step)  # before writing and checkpointing
                    outcome, at = self._flush()
                    if outcome == "diverged":
                        self.writer.event("diverged", step=at,
                                          reason=f"train loss not finite or above {cfg.diverge_factor:g} x initial")
                        return RunResult(self.run_dir, "diverged", at, self.final)
                    if self.step % cfg.checkpoint_every == 0 or at_end:
                        self._checkpoint()
                    if self._track() == "target" or outcome == "target":
                        self.writer.event("target_reached", step=self.step)
                        break
                    self.interval_start = (self.step, time.perf_counter())
                if at_end:
                    break
                self.train_step()
                if on_step is not None:
                    on_step(self.step, self.total)
        except Exception as exc:
            self.writer.event("failed", step=self.step, error=f"{type(exc).__name__}: {exc}")
            raise
        self.writer.event("finished", step=self.step)
        return RunResult(self.run_dir, "finished", self.step, self.final)


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(cfg: RunConfig, run_dir: Path, group: distributed.Distributed | None = None) -> Trainer:
    """The trainer of a resolved config: seeds set, its task built on the device, nothing written yet."""
    device = resolve_device(cfg.device)
    if group is not None:
        device = group.device(device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    _set_seeds(cfg.seed)
    task = build_task(cfg, device, dtype)
    distributed.seed_rank(group, cfg.seed)
    return Trainer(cfg, run_dir, task, device, group)


def _environment(trainer: Trainer) -> dict:
    env = environment_info(trainer.device)
    env["data"] = trainer.task.data_info
    if trainer.group is not None:  # a collective: every rank describes itself
        env["distributed"] = trainer.group.describe(trainer.device)
    return env


def default_run_dir(cfg: RunConfig, out: str | Path) -> Path:
    """``<out>/<task>-<optimizer>-lr<lr>-s<seed>-<UTC time>[-i]``, reserved by creating it.

    ``mkdir`` is atomic: two runs started in the same second with the same
    config get different directories (the second takes ``-1``), never one.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(out) / f"{cfg.task}-{cfg.optimizer}-lr{cfg.lr:g}-s{cfg.seed}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, i = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, i = Path(f"{base}-{i}"), i + 1


def train(cfg: RunConfig, run_dir: str | Path, *, on_step: Callable[[int, int], None] | None = None) -> RunResult:
    """Start a new run of ``cfg`` recorded in ``run_dir`` (which must not hold a record).

    ``on_step(step, total)`` is called after every optimizer step (progress bars;
    tests use it to simulate a kill).
    """
    cfg = resolved(cfg)  # a copy: the caller's config keeps what it asked for
    run_dir = Path(run_dir)
    group = distributed.setup(cfg.device)  # None unless started by torchrun
    with contextlib.ExitStack() as stack:

        def claim():
            if (run_dir / record.CONFIG_FILE).exists():
                raise FileExistsError(f"{run_dir} already holds a run record; choose a new directory or resume it")
            return stack.enter_context(record.RunLock(run_dir)), None  # before any setup: a second writer learns at once

        lock, _ = distributed.on_main_rank(group, claim)
        trainer = build_trainer(cfg, run_dir, group)
        # The record names the data set actually loaded, so a resume cannot pick another one
        # ("auto" may resolve differently once another data set is fetched).
        cfg.dataset = trainer.task.data_info["dataset"]
        env = _environment(trainer)
        if group is None or group.is_main:
            trainer.writer = record.RunWriter.create(run_dir, cfg.to_dict(), env, lock=lock)
        else:
            trainer.writer = _NoRecord()
        trainer.writer.event("started", step=0, total_steps=trainer.total)
        return trainer.run(on_step)


def _check_same_data(run_dir: Path, recorded: dict, loaded: dict) -> None:
    """Refuse to resume on data other than the run started on (checksums of every split recorded)."""
    for key in ("dataset", "checksum", "test_checksum"):
        if key in recorded and recorded[key] != loaded.get(key):
            raise ValueError(
                f"{run_dir} started on {key} {recorded[key]!r} but resuming would use {loaded.get(key)!r} "
                f"(from {loaded.get('source')}): restore the original data (source {recorded.get('source')!r}) "
                "or start a new run")


def resume(run_dir: str | Path, *, on_step: Callable[[int, int], None] | None = None) -> RunResult:
    """Continue the run recorded in ``run_dir`` from its last checkpoint."""
    run_dir = Path(run_dir)
    group = distributed.setup()  # None unless started by torchrun (or in a process group already)
    with contextlib.ExitStack() as stack:

        def claim():
            if not record.is_run_dir(run_dir):
                raise FileNotFoundError(f"{run_dir} is not a run record: it has no {record.CONFIG_FILE}")
            lock = stack.enter_context(record.RunLock(run_dir))  # a run still going elsewhere is not resumed
            rec = record.read_run(run_dir)
            if rec.status in ("finished", "diverged"):
                raise ValueError(f"{run_dir} is already {rec.status}; nothing to resume")
            recorded = rec.environment.get("distributed", {}).get("world_size", 1) if rec.environment else None
            world = 1 if group is None else group.world_size
            if recorded is not None and recorded != world:
                raise ValueError(f"{run_dir} ran on {recorded} process(es); resume it with the same number "
                                 f"(eos resume --nproc {recorded}), not {world}")
            return lock, rec

        lock, rec = distributed.on_main_rank(group, claim)  # rank 0 reads the record; the others get a copy
        return _resume_locked(run_dir, lock, rec, group, on_step)


def _resume_locked(run_dir: Path, lock, rec, group, on_step) -> RunResult:
    cfg = resolve(RunConfig.from_dict(rec.config))
    trainer = build_trainer(cfg, run_dir, group)
    _check_same_data(run_dir, rec.environment.get("data", {}), trainer.task.data_info)
    used, passed_over = trainer.load_checkpoint(rec.metrics)
    main = group is None or group.is_main
    trainer.writer = record.RunWriter.open(run_dir, lock=lock) if main else _NoRecord()
    if not rec.environment:  # deleted or emptied: written again, and said so
        env = _environment(trainer)
        env["rewritten_on_resume"] = record.utc_now()
        trainer.writer.update_environment(**env)
    # The checkpoint at step t was taken before step t's tracking: replay from t.
    trainer.writer.truncate_metrics_after(trainer.step - 1)
    trainer.writer.event("resumed", step=trainer.step, checkpoint=used, **({"passed_over": passed_over}
                                                                          if passed_over else {}))
    return trainer.run(on_step)
