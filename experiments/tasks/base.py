"""The task interface the training loop calls.

A task, built from a validated :class:`~experiments.config.RunConfig` on a
device in a dtype, provides:

``model``                 the ``nn.Module`` being trained (seeded by ``cfg.seed``)
``loss_fn(out, targets)`` the loss of a batch: ``loss_fn(model(*inputs), targets)``
``train_chunks(step)``    the training batch of optimizer step ``step`` as
                          ``[(inputs, targets, weight), ...]`` with weights summing
                          to 1; the step's objective is ``sum_c w_c loss_c``.
                          A pure function of (seed, step) and the run's state,
                          so a resumed run sees the same batches. Full batch or
                          minibatch is the task's configuration, not the loop's.
``track_batches``         fixed ``(inputs, targets)`` chunks the Hessian is measured
                          on, and ``track_chunk_weights`` (None: by size) for losses
                          that are not unweighted means
``evaluate(split)``       metrics of ``"track"``, ``"val"`` or ``"test"`` as
                          ``{name: 0-dim tensor}`` (names like ``val_loss``)
``splits``                which of those the task has
``total_steps``           the run's length in optimizer steps
``data_info``             what was read, from where, with checksums (environment.json)
``throughput_unit``       e.g. ``"tokens"``: the loop records ``tokens_per_second``
                          from ``items_per_step``; None records nothing
``state_dict()``          history the task keeps across steps (saved in checkpoints)
``every_parameter_used``  False when a step's loss may leave some parameter without a
                          gradient (data-parallel runs then look for such parameters
                          every step, which costs a pass over the graph)

Class attributes (read before a task is built): ``options``, the RunConfig
keys the task reads beyond the common ones (``eos tasks`` lists them), and
``defaults``, the values :meth:`RunConfig.validate` fills in for keys left
unset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

Batch = tuple[Any, torch.Tensor]


def chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> list[Batch]:
    """Split (x, y) into consecutive chunks of at most ``size`` examples (views, no copies)."""
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def size_weighted(batches: Sequence[Batch]) -> list[tuple[Any, torch.Tensor, float]]:
    """``(inputs, targets, n_c / N)`` for chunks of a loss that is a mean over examples."""
    n = sum(len(y) for _, y in batches)
    return [(x, y, len(y) / n) for x, y in batches]


def seeded_generator(seed: int, stream: int, step: int = 0) -> torch.Generator:
    """A CPU generator for (run seed, stream, step): streams never share a seed, whatever the step.

    Stream 0 is the per-step training batches, stream 1 the fixed tracking set
    (tasks add their own), so no step's batch can coincide with the tracking set.
    """
    import numpy as np

    state = np.random.SeedSequence([seed, stream, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Task:
    """Base class of the tasks; see the module docstring for the contract."""

    options: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    throughput_unit: ClassVar[str | None] = None
    every_parameter_used: ClassVar[bool] = True
    splits: tuple[str, ...] = ("track",)

    model: torch.nn.Module
    track_batches: list[Batch]
    track_chunk_weights: list[float] | None = None
    total_steps: int
    data_info: dict
    items_per_step: int = 0

    @classmethod
    def resolve_data(cls, cfg) -> str:
        """The data set ``cfg.dataset`` names here (``auto`` resolved), without loading it."""
        raise NotImplementedError

    def loss_fn(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    def train_chunks(self, step: int) -> list[tuple[Any, torch.Tensor, float]]:
        raise NotImplementedError

    def evaluate(self, split: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self, groups: list) -> list:
        """Adjust the optimizer's param groups (from :func:`experiments.optim.parameter_groups`); default: as given."""
        return groups

    def state_dict(self) -> dict:
        """Training history the task keeps (e.g. a GFlowNet's recent samples), saved with each checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
