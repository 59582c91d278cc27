"""Collectives of an operator whose data are sharded over processes (``torch.distributed``).

A Hessian over data split between ranks is the sum of each rank's weighted
part: every product ends with one all-reduce, so every rank holds the
full-data product and runs the same solve on identical vectors.  What makes
that safe lives here: the all-reduce itself (on the CPU for gloo, on the
operator's device otherwise), stop decisions made together (:meth:`Collective.agree`),
and a debug check that every rank really passes the same vectors.

Without a process group every method is the identity and nothing is
communicated, so the operators use one code path either way.

Example (one process)::

    >>> import torch
    >>> alone = Collective(None, torch.device("cpu"))
    >>> alone.active, alone.agree(True), alone.all_reduce(torch.ones(2)).tolist()
    (False, True, [1.0, 1.0])
"""
from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU.  For timing only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: timing only


class Collective:
    """The process group a rank's products are summed over, or none (``process_group=None``)."""

    def __init__(self, process_group, device: torch.device):
        self.process_group = process_group
        self.device = device

    @property
    def active(self) -> bool:
        return self.process_group is not None

    def _where(self) -> torch.device:
        """Where this rank's collectives run: the CPU for gloo, else the operator's device.

        A group with a backend per device type (``"cpu:gloo,cuda:nccl"``, what
        ``experiments.distributed.setup`` makes where CUDA exists) takes
        tensors on either; an nccl-only group needs the operator on the GPU.
        """
        backend = torch.distributed.get_backend(self.process_group)
        return torch.device("cpu") if backend == "gloo" else self.device

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or ``op``) over the group, in place when the tensor already lives where collectives run."""
        if not self.active:
            return tensor
        where = self._where()
        buffer = tensor if tensor.device == where else tensor.to(where)
        torch.distributed.all_reduce(buffer, op=op or torch.distributed.ReduceOp.SUM, group=self.process_group)
        return buffer if buffer is tensor else buffer.to(tensor.device)

    def maximum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over the group (the slowest rank's times, the largest errors)."""
        return self.all_reduce(tensor, torch.distributed.ReduceOp.MAX) if self.active else tensor

    def agree(self, flag: bool) -> bool:
        """``flag`` on every rank if it holds on every rank; as is without a group.

        Ranks compute identical decisions from identical all-reduced products
        on identical hardware; this makes them agree even where arithmetic
        differs (mixed CPUs), so no rank stops while another asks for a product.
        """
        if not self.active:
            return flag
        agreed = self.all_reduce(torch.tensor([float(not flag)], dtype=torch.float64))
        return float(agreed) == 0.0  # sync: the caller syncs for its decision anyway

    def any(self, flag: bool) -> bool:
        """``flag`` if it holds on any rank (every rank takes the branch one rank must take); as is alone."""
        return not self.agree(not flag)

    def check_replicated(self, block: torch.Tensor) -> None:
        """Raise unless every rank passed the same vectors (debug mode: one small all-reduce per product)."""
        b = block.to(torch.float64)
        stride = max(1, b.shape[-1] // 101)
        fingerprint = torch.stack([b.sum(), b.square().sum(), b[..., ::stride].sum()])
        both = self.maximum(torch.cat([fingerprint, -fingerprint]))
        high, low = both[:3], -both[3:]
        if not torch.equal(high, low):  # sync: debug mode only
            raise RuntimeError(
                f"rank {torch.distributed.get_rank()}: the ranks passed different vectors to a distributed "
                f"Hessian product (fingerprints from {low.tolist()} to {high.tolist()}). Every rank must run "
                "the solver on identical vectors: seed each rank's generator identically.")
