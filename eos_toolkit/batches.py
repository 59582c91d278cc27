"""What a chunk of data is to the curvature engine, and to a training loop that shares its data.

A chunk is ``(inputs, targets)``: ``inputs`` a tensor (one model argument) or
a tuple / list of the model's positional arguments, ``targets`` a tensor whose
leading dimension counts the chunk's examples.  The model is called as
``model(*as_args(inputs))`` wherever a chunk is used, so training and
Hessian products call it alike.

Under data parallelism each rank holds a shard of the chunks
(:func:`shard_batches`): by example, or whole chunks dealt round-robin where a
chunk must stay whole (its own normaliser, BatchNorm's batch statistics).

Example::

    >>> import torch
    >>> len(as_args(torch.zeros(2, 3))), len(as_args((torch.zeros(2), torch.ones(2))))
    (1, 2)
    >>> chunk_size(torch.zeros(5, 10))
    5
    >>> [example_bounds(5, rank, 2) for rank in range(2)]   # rank 0 takes the extra example
    [(0, 3), (3, 5)]
"""
from __future__ import annotations

import torch


def as_args(inputs) -> tuple:
    """A chunk's inputs as the model's positional arguments: a tuple or list as is, anything else as one."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def chunk_size(targets: torch.Tensor) -> int:
    """The number of examples in a chunk: the targets' leading dimension."""
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        raise ValueError("each chunk's targets must be a tensor with a leading batch dimension")
    return targets.shape[0]


def slice_inputs(inputs, start: int, stop: int):
    """Examples ``start:stop`` of a chunk's inputs (a tensor or a tuple / list of them)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(slice_inputs(i, start, stop) for i in inputs)
    raise TypeError(f"cannot split inputs of type {type(inputs).__name__} by example; expected tensors")


def example_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The examples ``start:stop`` of ``n`` that rank ``rank`` of ``world_size`` holds (contiguous, near-equal)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_weighted(chunks: list, rank: int, world_size: int) -> list:
    """This rank's piece of every ``(inputs, targets, weight)`` chunk, each weight scaled by the piece's share."""
    pieces = []
    for inputs, targets, weight in chunks:
        n = chunk_size(targets)
        start, stop = example_bounds(n, rank, world_size)
        if stop > start:
            pieces.append((slice_inputs(inputs, start, stop), targets[start:stop], weight * (stop - start) / n))
    return pieces


def shard_batches(batches: list, rank: int, world_size: int, *, chunk_weights: list[float] | None = None,
                  whole_chunks: bool = False) -> tuple[list, list[float] | None]:
    """This rank's part of fixed ``(inputs, targets)`` chunks, for a Hessian summed over ranks.

    By example, when the loss is a plain mean and the model does not depend
    on which examples share a chunk; whole chunks dealt round-robin when the
    chunks carry their own normalisers (``chunk_weights``, returned for this
    rank's chunks) or ``whole_chunks`` is set (BatchNorm measured with batch
    statistics: a chunk's statistics must stay the chunk's).
    """
    if chunk_weights is None and not whole_chunks:
        return [(x, y) for x, y, _ in shard_weighted([(x, y, 1.0) for x, y in batches], rank, world_size)], None
    if len(batches) < world_size:
        why = "with their own normalisers" if chunk_weights is not None else \
            "normalised by their own batch statistics (BatchNorm)"
        raise ValueError(f"{len(batches)} tracking chunks {why} cannot be dealt to {world_size} ranks whole: use "
                         "smaller chunks, more tracking examples, or fewer processes")
    mine = list(range(rank, len(batches), world_size))
    return [batches[i] for i in mine], None if chunk_weights is None else [chunk_weights[i] for i in mine]
