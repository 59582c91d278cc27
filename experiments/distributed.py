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
* Sharpness: each rank's tracker holds its shard of the tracking chunks and
  all-reduces every Hessian product (:mod:`eos_toolkit.hvp`), so every rank
  runs the same solve. Evaluation (tracking loss, validation, test) runs on
  every rank on the whole split: cheap next to the Hessian, and it needs no
  communication.
* Rank 0 alone writes the run record and checkpoints; the others write
  nothing. On resume rank 0 reads the record and the checkpoint and sends
  them to the others, so the run directory need only be on rank 0's machine.

Not equal to one process: BatchNorm layers in training mode normalise each
rank's piece with its own statistics (use SyncBatchNorm or a model without
BatchNorm when that matters), and dropout masks differ per rank.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

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
        piece of it; every rank must still get some example of the step.
        """
        pieces = []
        for inputs, targets, weight in chunks:
            n = len(targets)
            start, stop = _bounds(n, self.rank, self.world_size)
            if stop > start:
                pieces.append((_slice(inputs, start, stop), targets[start:stop], weight * (stop - start) / n))
        if not pieces:
            raise ValueError(f"rank {self.rank} has no example of this step's batch: "
                             f"{sum(len(t) for _, t, _ in chunks)} examples cannot be split over "
                             f"{self.world_size} ranks; use a larger batch or fewer processes")
        return pieces

    def shard_batches(self, batches: list, chunk_weights: list[float] | None) -> tuple[list, list[float] | None]:
        """This rank's part of fixed ``(inputs, targets)`` chunks, for the Hessian operator.

        By example, as :meth:`shard`, when the loss is a plain mean
        (``chunk_weights`` None); whole chunks dealt round-robin otherwise,
        since a chunk's normaliser does not split.
        """
        if chunk_weights is None:
            return [(x, y) for x, y, _ in self.shard([(x, y, 1.0) for x, y in batches])], None
        mine = list(range(self.rank, len(batches), self.world_size))
        if not mine:
            raise ValueError(f"{len(batches)} tracking chunks with their own normalisers cannot be dealt to "
                             f"{self.world_size} ranks; use a smaller chunk_size or fewer processes")
        return [batches[i] for i in mine], [chunk_weights[i] for i in mine]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (an all-reduce; on the CPU for gloo)."""
        where = tensor if self.backend == "nccl" else tensor.cpu()
        where = where.clone()
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


def _bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _slice(inputs, start: int, stop: int):
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_slice(i, start, stop) for i in inputs)
    raise TypeError(f"cannot split inputs of type {type(inputs).__name__} by example; expected tensors")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str = "auto") -> Distributed | None:
    """Join the process group torchrun describes (once); None in a plain single-process run.

    A process that already joined a group (a test, a notebook) keeps it.

    Backend: nccl when the run uses CUDA (``device`` auto with a GPU, or
    cuda), gloo on the CPU. A world of one is still a group, so
    ``torchrun --nproc-per-node 1`` runs the distributed code paths.
    """
    joined = current()
    if joined is not None or not launched():
        return joined
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def current() -> Distributed | None:
    """The group this process already joined (None when it joined none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=dist.get_backend())


def torchrun_command(nproc: int, argv: list[str], *, nnodes: int = 1, node_rank: int = 0,
                     master: str | None = None) -> list[str]:
    """The command that runs ``python -m experiments <argv>`` on ``nproc`` processes per machine.

    One machine: a local rendezvous (``--standalone``). Several: ``nnodes``,
    this machine's ``node_rank`` and rank 0's ``master`` address as
    ``HOST:PORT``, the same command on every machine.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not master:
            raise ValueError("a run over several machines needs --master HOST:PORT (rank 0's machine)")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master.rsplit(':', 1)[0]}",
                f"--master-port={master.rsplit(':', 1)[1] if ':' in master else 29500}"]
    return cmd + ["-m", "experiments", *argv]
