"""A Hugging Face ``TrainerCallback`` that tracks sharpness against the optimizer's stability threshold.

::

    from eos_toolkit.integrations.huggingface import EoSTrainerCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    EoSTrainerCallback.attach(trainer, train, n=64, chunk_size=16, every=10, out="runs/mine")
    trainer.train()

The tracking objective is the model's own loss (``model(**batch).loss``) on
the first ``n`` examples of the data set you name, collated by the trainer's
data collator in chunks of ``chunk_size`` and averaged with each chunk weighted
by its number of examples (for sequences of one length, the token mean over
all of them).  At the start it measures the initial weights (step 0); after
every optimizer step it records the update (no host sync), and every
``every`` steps it measures: what :class:`eos_toolkit.monitor.EoSMonitor`
records, written to the run record at ``out`` and, for a callback made with
:meth:`EoSTrainerCallback.attach`, logged through ``trainer.log`` (so every
reporting integration, TensorBoard included, gets it) under ``eos/``.

The monitor's state is saved beside each checkpoint the trainer writes
(``eos_monitor.pt`` in ``checkpoint-<step>``); ``trainer.train(resume_from_checkpoint=...)``
continues warm, and the record continues where the checkpoint was taken.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from eos_toolkit.integrations.tensorboard import tag
from eos_toolkit.monitor import EoSMonitor

STATE_FILE = "eos_monitor.pt"


class ModelLoss(nn.Module):
    """A model whose forward takes a batch's tensors positionally (in ``keys`` order) and returns its loss.

    The curvature engine calls ``module(*inputs)``; a model a ``Trainer``
    trains takes keyword tensors and returns its loss as ``outputs["loss"]``
    (a ``ModelOutput``, or any mapping).
    """

    def __init__(self, model: nn.Module, keys: Sequence[str]):
        super().__init__()
        self.model, self.keys = model, tuple(keys)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        outputs = self.model(**dict(zip(self.keys, tensors)))
        return outputs["loss"] if isinstance(outputs, Mapping) else outputs.loss  # a ModelOutput is a Mapping


def model_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss :class:`ModelLoss` returned (the targets are inside the batch already)."""
    return outputs


def tracking_chunks(data, n: int, chunk_size: int, collate) -> tuple[list[dict], list[float]]:
    """The first ``n`` examples of ``data``, collated in chunks of ``chunk_size``; each chunk's example count."""
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"the tracking data must be a data set with __getitem__ and __len__, got {type(data).__name__}")
    if not (isinstance(n, int) and 1 <= n <= len(data)):
        raise ValueError(f"n must be an integer in [1, {len(data)}] (the data set's size), got {n!r}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    chunks, sizes = [], []
    for start in range(0, n, chunk_size):
        examples = [data[i] for i in range(start, min(n, start + chunk_size))]
        chunks.append(collate(examples))
        sizes.append(float(len(examples)))
    return chunks, sizes


class EoSTrainerCallback(TrainerCallback):
    """Run :class:`~eos_toolkit.monitor.EoSMonitor` in a Hugging Face ``Trainer`` (module docstring).

    ``data``: the data set the tracking examples are taken from (its first
    ``n``).  ``monitor_options``: any keyword of
    :class:`~eos_toolkit.monitor.EoSMonitor` (``k``, ``method``, ``tol``,
    ``config``, ``sinks``, ...).  Make it with :meth:`attach` to log through
    the trainer too.
    """

    def __init__(self, data, *, n: int = 32, chunk_size: int = 8, every: int = 10,
                 out: str | os.PathLike | None = None, trainer=None, **monitor_options):
        self.data, self.n, self.chunk_size, self.every, self.out = data, n, chunk_size, every, out
        self.trainer, self.monitor_options = trainer, monitor_options
        self.monitor: EoSMonitor | None = None
        self._lr: float | None = None

    @classmethod
    def attach(cls, trainer, data, **options) -> EoSTrainerCallback:
        """A callback added to ``trainer`` that also logs through ``trainer.log``."""
        callback = cls(data, trainer=trainer, **options)
        trainer.add_callback(callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if optimizer is None:
            raise ValueError("EoSTrainerCallback needs the trainer's optimizer, and there is none yet: "
                             "attach the callback to a Trainer that is training")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper: the optimizer inside
        collate = getattr(train_dataloader, "collate_fn", None) or _stack
        chunks, sizes = tracking_chunks(self.data, self.n, self.chunk_size, collate)
        keys = list(chunks[0])
        if "labels" not in keys:
            raise ValueError(f"the collated tracking batches have no labels (keys {keys}); the model's loss needs them")
        device = next(model.parameters()).device
        batches = [(tuple(c[k].to(device) for k in keys), c["labels"].to(device)) for c in chunks]
        group, restored = None, self._restored(args, state)
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            from eos_toolkit.batches import shard_batches

            group = torch.distributed.group.WORLD
            batches, sizes = shard_batches(batches, args.process_index, args.world_size, chunk_weights=sizes)
        options = dict(self.monitor_options)
        sinks = list(options.pop("sinks", ()))
        if self.trainer is not None:
            sinks.append(self._log)
        self.monitor = EoSMonitor(ModelLoss(model, keys), optimizer, model_loss, batches, every=self.every,
                                  chunk_weights=sizes, process_group=group,
                                  out=self.out if state.is_world_process_zero else None, sinks=sinks,
                                  state=restored, **options)
        if restored is None:
            self.monitor.start()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The rate this step used: the trainer moves its scheduler on before on_step_end.
        inner = getattr(optimizer, "optimizer", optimizer) if optimizer is not None else self.monitor.optimizer
        self._lr = float(inner.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step(lr=self._lr)

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        monitor_state = self.monitor.state_dict()
        if state.is_world_process_zero:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(monitor_state, directory / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()

    @staticmethod
    def _restored(args, state) -> dict | None:
        """The monitor state saved with the checkpoint training resumes from (None for a new run)."""
        if state.global_step == 0:
            return None
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        return torch.load(path, weights_only=True) if path.exists() else None

    def _log(self, rows) -> None:
        """The tracking metrics through ``trainer.log`` (every reporting integration), under ``eos/``."""
        latest = {}
        for step, metric, value in rows:
            if step == self.monitor.step_count:
                latest[tag(metric)] = float(value)
        if latest:
            self.trainer.log(latest)


def _stack(examples: list[dict]) -> dict:
    """Examples of equal-length tensors (or numbers) stacked into one batch."""
    return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}
