"""What a chunk of data is to the curvature engine, and to a training loop that shares its data.

A chunk is ``(inputs, targets)``: ``inputs`` a tensor (one model argument) or
a tuple / list of the model's positional arguments, ``targets`` a tensor whose
leading dimension counts the chunk's examples.  The model is called as
``model(*as_args(inputs))`` wherever a chunk is used, so training and
Hessian products call it alike.

Example::

    >>> import torch
    >>> len(as_args(torch.zeros(2, 3))), len(as_args((torch.zeros(2), torch.ones(2))))
    (1, 2)
    >>> chunk_size(torch.zeros(5, 10))
    5
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
