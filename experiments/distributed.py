"""Data-parallel runs on torch.distributed: who this process is, its shard of each batch, the reductions.

A run started by ``torchrun --nproc-per-node N -m experiments run ...`` (or
``eos run --nproc N``, which starts that command) has N processes, one per
device. :func:`setup` joins them (backend nccl on CUDA, gloo on the CPU) and
returns a :class:`Distributed`; a plain ``eos run`` gets ``None`` and nothing
here is used.

What each rank does (experiments/train.py):

* Every rank builds the same task and model from the same seed, and asks the
  task for the same step's batch (tasks draw batches from (seed, step), so
  the ranks agree without communicating); :meth:`Distributed.shard` gives
  the rank its part: every chunk is split by example into N contiguous
  pieces (sizes differ by at most one), with weight ``w_c n_piece / n_c``.
  Since a chunk's loss is a mean over its examples, the ranks' weighted sums
  add up to the single-process objective. The gradient is synchronised by
  DistributedDataParallel (which averages, so each rank scales its loss by
  N) with one all-reduce per step; the per-step train loss is summed over
  ranks at each tracking step, one all-reduce for the whole interval.
* Sharpness: each rank's tracker holds its shard of the tracking chunks
  (whole chunks when BatchNorm is measured with batch statistics, which
  must stay a chunk's) and all-reduces every Hessian product
  (:mod:`eos_toolkit.hvp`), so every rank runs the same solve and makes its
  stop decisions together with the others. Evaluation (tracking loss,
  validation, test) runs on every rank on the whole split: cheap next to
  the Hessian, and it needs no communication.
* Dropout: torch's global generator is reseeded per rank from (seed, rank)
  once the model is built, and checkpoints keep every rank's state.
* Rank 0 alone writes the run record and checkpoints; the others write
  nothing. On resume rank 0 reads the record and the checkpoint and sends
  them to the others, so the run directory need only be on rank 0's machine.

Not equal to one process: BatchNorm layers in training mode normalise each
rank's piece of a step's batch with its own statistics (use SyncBatchNorm or
a model without BatchNorm when that matters), and dropout masks come from
other streams. Ranks must see the same data files (each reads its own copy).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from eos_toolkit.batches import shard_batches, shard_weighted

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: ``cuda:local_rank`` when the run asks for CUDA, else as asked."""
        if requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def shard(self, chunks: list) -> list:
        """This rank's piece of every ``(inputs, targets, weight)`` chunk, weights rescaled (module docstring).

        A chunk with fewer examples than ranks leaves some ranks without a
        piece of it; every rank must still get some example of the step, so
        the largest chunk must have at least ``world_size`` examples (decided
        alike on every rank: all of them raise, or none).
        """
        largest = max((len(t) for _, t, _ in chunks), default=0)
        if largest < self.world_size:
            raise ValueError(f"the largest chunk of this step's batch has {largest} examples, fewer than the "
                             f"{self.world_size} ranks, so some rank would have nothing to train on: use a larger "
                             "batch_size (or chunk_size) or fewer processes")
        return shard_weighted(chunks, self.rank, self.world_size)

    def shard_batches(self, batches: list, chunk_weights: list[float] | None, *,
                      whole_chunks: bool = False) -> tuple[list, list[float] | None]:
        """This rank's part of fixed tracking chunks (:func:`eos_toolkit.batches.shard_batches`)."""
        return shard_batches(batches, self.rank, self.world_size, chunk_weights=chunk_weights,
                             whole_chunks=whole_chunks)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (an all-reduce; on the CPU for a gloo-only group, else where the tensor is)."""
        where = (tensor.cpu() if self.backend == "gloo" else tensor).clone()
        dist.all_reduce(where)
        return where.to(tensor.device)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def describe(self, device: torch.device) -> dict:
        """For environment.json: world size, backend, and each rank's host and device."""
        import socket

        ranks = self.gather({"host": socket.gethostname(), "device": str(device),
                             **({"device_name": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})})
        return {"world_size": self.world_size, "backend": self.backend, "ranks": ranks}


def launched() -> bool:
    """Whether this process was started by torchrun (RANK, WORLD_SIZE and LOCAL_RANK set).

    LOCAL_RANK too: some cluster jobs set RANK and WORLD_SIZE for other
    purposes, and a sweep worker there must not try to join a group.
    """
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(device: str = "auto") -> Distributed | None:
    """Join the process group torchrun describes (once); None in a plain single-process run.

    A process that already joined a group (a test, a notebook) keeps it.

    Backend: gloo for CPU tensors and, where CUDA exists, nccl for CUDA
    tensors in the same group (``"cpu:gloo,cuda:nccl"``), so a run on either
    device, and its resume, which joins before reading the record, can use
    it. A world of one is still a group, so ``torchrun --nproc-per-node 1``
    runs the distributed code paths.
    """
    joined = current()
    if joined is not None or not launched():
        return joined
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {os.environ['RANK']} is local rank {local} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s): use at most that many processes per machine")
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return current()


def on_main_rank(group: Distributed | None, action: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """Run ``action()`` on rank 0 (or the only process), which returns ``(kept, shared)``.

    Rank 0 gets both; the other ranks get ``(None, shared)``, or rank 0's
    error raised: its checks (a record already there, a lock held elsewhere)
    must stop every rank, not leave the others waiting in a collective.
    """
    if group is None:
        return action()
    kept = outcome = None
    if group.is_main:
        try:
            kept, shared = action()
            outcome = ("ok", shared)
        except Exception as exc:
            outcome = exc
    outcome = group.broadcast(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return kept, outcome[1]


def leave(group: Distributed | None) -> None:
    """Leave the process group this command joined (a clean exit for nccl); nothing without one."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


def seed_rank(group: Distributed | None, seed: int) -> None:
    """Give each rank its own stream of torch's global generator (dropout masks), from (seed, rank).

    Called after the model is built (every rank builds it from the same
    seed); the tasks draw their batches from their own generators.
    """
    if group is not None:
        import numpy as np

        torch.manual_seed(int(np.random.SeedSequence([seed, 1 << 20, group.rank]).generate_state(1)[0]))


def current() -> Distributed | None:
    """The group this process already joined (None when it joined none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=dist.get_backend())


LAUNCH_COMMAND = "EOS_LAUNCH_COMMAND"  # the user's command, for environment.json (the ranks see torchrun's)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs ``python -m experiments <argv>`` on ``nproc`` processes of this machine.

    Several machines: start torchrun yourself on each (README).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "experiments", *argv]
