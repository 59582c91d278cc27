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

What a tracking step measures and what a step buffers is the
:class:`~eos_toolkit.monitor.EoSMonitor`'s, the same object a user's own loop
uses; the loop adds the task's evaluations, checkpoints, divergence and
targets. Host-device syncs happen only at tracking steps (one to read the
buffered per-step metrics, and the eigensolver's own), so the training steps
between them run asynchronously on a GPU.

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
import os
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
from eos_toolkit.monitor import EoSMonitor, environment
from experiments import distributed
from experiments.config import RunConfig
from experiments.optim import build_optimizer, build_scheduler, parameter_groups
from experiments.resolve import resolve, resolved
from experiments.tasks import build_task
from experiments.tasks.base import Task

CHECKPOINT_NAME = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"  # the one before, kept until the new one is complete


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
    return {**environment(device), "git_commit": _git_commit(),
            "command": os.environ.get(distributed.LAUNCH_COMMAND) or " ".join(sys.argv)}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
        self.total = task.total_steps
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total)
        # What a tracking step measures, and the per-step metrics: the monitor a user's own loop uses too.
        # Its record writer is set by train() / resume() on rank 0 (the other ranks write nothing).
        self.monitor = EoSMonitor(
            self.model, self.optimizer, task.loss_fn, track_batches, every=cfg.track_every, k=cfg.track_k,
            precondition=cfg.track_precond, method=cfg.hvp_method, bn_mode=cfg.hessian_bn_mode,
            tol=cfg.lanczos_tol, max_iter=cfg.lanczos_max_iter, seed=cfg.seed, chunk_weights=track_weights,
            process_group=None if group is None else torch.distributed.group.WORLD,
            loss_reduction="sum",  # each rank's train loss is its part of the step's objective
            diverge_factor=cfg.diverge_factor, density_every=cfg.track_density_every,
            density_probes=cfg.density_probes, density_steps=cfg.density_steps)
        self.interval_start: tuple[int, float] | None = None  # (step, time) where throughput counting began
        self.throughput_rows: list = []
        self.step = 0

    @property
    def writer(self) -> record.RunWriter | None:
        """The run record's writer (None on ranks other than 0, and before train() / resume() set it)."""
        return self.monitor.writer

    @writer.setter
    def writer(self, writer: record.RunWriter | None) -> None:
        self.monitor.writer = writer

    @property
    def final(self) -> dict[str, float]:
        return self.monitor.final

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
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._gradient()
        grad_norm = None
        if self.cfg.clip_norm is not None:  # the global norm before clipping, a device tensor (no sync)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm)
        self.optimizer.step()
        self.monitor.observe_step(loss, grad_norm=grad_norm)  # before the scheduler: the rate this step used
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1

    # ---- writing, divergence, tracking ------------------------------------
    def _flush(self) -> tuple[str | None, int]:
        """Write buffered per-step rows (one sync).

        Returns ``("diverged", step)`` at the first non-finite or exploding
        train loss (the monitor drops the rows after that step), ``("target",
        step)`` once the train loss reached ``target_loss``, else ``(None, step)``.
        """
        values = self.monitor.flush()
        if self.monitor.diverged_at is not None:
            return "diverged", self.monitor.diverged_at
        target = self.cfg.target_loss
        reached = target is not None and any(m == names.TRAIN_LOSS and v <= target for _, m, v in values)
        return ("target" if reached else None), self.step

    def _track(self) -> str | None:
        """Tracking measurements at the current step; returns 'target' when target_acc is reached."""
        t, cfg = self.step, self.cfg
        first_rows, self.throughput_rows = self.throughput_rows, []
        evaluated = {}
        for split in self.task.splits:
            if split != names.TEST or (t == self.total and cfg.evaluate_test):  # the test split only at the end
                evaluated.update(self.task.evaluate(split))
        measured = self.monitor.measure(evaluated, first_rows=first_rows)
        if cfg.target_acc is not None:
            track_acc = names.split_metric(names.TRACK, "acc")
            if track_acc not in measured:
                raise ValueError(f"target_acc is set but task {cfg.task!r} records no {track_acc}; use target_loss")
            if measured[track_acc] >= cfg.target_acc:
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
            "task": self.task.state_dict(),
            **self.monitor.state_dict(),  # its step is the run's; the tracker's vectors, the previous update
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
        self.monitor.load_state_dict(state)  # after the model: its parameters start the next update
        self.task.load_state_dict(state.get("task", {}))
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
                        self.monitor.event("diverged", step=at,
                                          reason=f"train loss not finite or above {cfg.diverge_factor:g} x initial")
                        return RunResult(self.run_dir, "diverged", at, self.final)
                    if self.step % cfg.checkpoint_every == 0 or at_end:
                        self._checkpoint()
                    if self._track() == "target" or outcome == "target":
                        self.monitor.event("target_reached", step=self.step)
                        break
                    self.interval_start = (self.step, time.perf_counter())
                if at_end:
                    break
                self.train_step()
                if on_step is not None:
                    on_step(self.step, self.total)
        except Exception as exc:
            self.monitor.event("failed", step=self.step, error=f"{type(exc).__name__}: {exc}")
            raise
        self.monitor.event("finished", step=self.step)
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
            trainer.writer = None  # rank 0 writes the run's one record
        trainer.monitor.event("started", step=0, total_steps=trainer.total)
        return trainer.run(on_step)


def check_same_data(run_dir: Path, recorded: dict, loaded: dict) -> None:
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
    check_same_data(run_dir, rec.environment.get("data", {}), trainer.task.data_info)
    used, passed_over = trainer.load_checkpoint(rec.metrics)
    main = group is None or group.is_main
    trainer.writer = record.RunWriter.open(run_dir, lock=lock) if main else None
    if not rec.environment:  # deleted or emptied: written again, and said so
        env = _environment(trainer)  # a collective under data parallelism: every rank describes itself
        if main:
            trainer.writer.update_environment(**env, rewritten_on_resume=record.utc_now())
    if main:  # the checkpoint at step t was taken before step t's tracking: replay from t
        trainer.writer.truncate_metrics_after(trainer.step - 1)
    trainer.monitor.event("resumed", step=trainer.step, checkpoint=used,
                          **({"passed_over": passed_over} if passed_over else {}))
    return trainer.run(on_step)
