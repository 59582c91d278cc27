"""A Lightning ``Callback`` that tracks sharpness against the optimizer's stability threshold.

::

    from eos_toolkit.integrations.lightning import EoSCallback

    callback = EoSCallback([(x_track, y_track)], torch.nn.functional.cross_entropy, every=10, out="runs/mine")
    lightning.Trainer(max_steps=1000, callbacks=[callback]).fit(module, loader)

At the start of training it measures the initial weights (step 0); after
every optimizer step it records the update (no host sync), and every
``every`` steps it measures at the new weights: what
:class:`eos_toolkit.monitor.EoSMonitor` records, written to the run record at
``out`` (rank 0) and logged through the trainer's loggers under ``eos/``.
``loss_fn(module(*inputs), targets)`` is the objective on the tracking
batches ``[(inputs, targets), ...]``; under a data-parallel strategy each
rank measures its shard of them and the products are summed over ranks.

The monitor's state (warm-start vectors, previous update, the product-rule
choice) is the callback's ``state_dict``, saved in Lightning's checkpoints:
a run resumed with ``ckpt_path`` continues warm, and its record continues
where the checkpoint was taken.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch

from eos_toolkit.batches import shard_batches
from eos_toolkit.integrations.tensorboard import tag
from eos_toolkit.monitor import EoSMonitor


class EoSCallback(pl.Callback):
    """Run :class:`~eos_toolkit.monitor.EoSMonitor` in a Lightning ``Trainer`` (module docstring).

    ``monitor_options``: any keyword of :class:`~eos_toolkit.monitor.EoSMonitor`
    (``k``, ``method``, ``tol``, ``precondition``, ``config``, ``sinks``, ...).
    ``log``: also log the tracking metrics through the trainer's loggers.
    """

    def __init__(self, batches: Sequence, loss_fn: Callable, *, every: int = 10,
                 out: str | os.PathLike | None = None, log: bool = True, **monitor_options):
        if not batches:
            raise ValueError("batches is empty: pass the tracking batches as a list of (inputs, targets)")
        self.batches, self.loss_fn, self.every, self.out, self.log = list(batches), loss_fn, every, out, log
        self.monitor_options = monitor_options
        self.monitor: EoSMonitor | None = None
        self._restored: dict | None = None
        self._lr: float | None = None
        self._stepped_at = -1

    @property
    def state_key(self) -> str:
        return "EoSCallback"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trained = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        if not trained & {id(p) for p in pl_module.parameters()}:  # none, or Lightning's stand-in for none
            raise ValueError("EoSCallback needs the trainer's optimizer, and the trainer has none for this module: "
                             "configure_optimizers must return one")
        if len(trainer.optimizers) > 1:
            raise ValueError(f"EoSCallback measures against one optimizer's threshold; the trainer has "
                             f"{len(trainer.optimizers)}")
        batches, group = self.batches, None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = torch.distributed.group.WORLD
            batches, _ = shard_batches(batches, trainer.global_rank, trainer.world_size)
        options = dict(self.monitor_options)
        sinks = list(options.pop("sinks", ()))
        if self.log:
            sinks.append(lambda rows: _log(trainer, rows))
        self.monitor = EoSMonitor(pl_module, trainer.optimizers[0], self.loss_fn, batches, every=self.every,
                                  out=self.out if trainer.is_global_zero else None, process_group=group,
                                  sinks=sinks, state=self._restored, **options)
        self._stepped_at = trainer.global_step
        if self._restored is None:
            self.monitor.start()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # The rate this step uses: Lightning moves the scheduler on before on_train_batch_end.
        self._lr = float(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.monitor is None or trainer.global_step == self._stepped_at:
            return  # no optimizer step in this batch (gradient accumulation)
        self._stepped_at = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.monitor.step(loss if isinstance(loss, torch.Tensor) else None, lr=self._lr)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def state_dict(self) -> dict:
        return self.monitor.state_dict() if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict or None


def _log(trainer: pl.Trainer, rows) -> None:
    """The monitor's rows through every logger of the trainer, a dict per step, under ``eos/``."""
    by_step: dict[int, dict[str, float]] = {}
    for step, metric, value in rows:
        by_step.setdefault(int(step), {})[tag(metric)] = float(value)
    for step, values in sorted(by_step.items()):
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
