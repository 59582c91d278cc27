"""Is the loss a mean over examples?  What weighting chunks by their size needs.

An operator over several chunks weights chunk ``c`` by ``n_c / N``, which gives
the full-batch loss only when ``loss_fn`` is an unweighted mean over the
targets' leading dimension.  A class-weighted loss, ``ignore_index`` or
masked targets divide by a chunk-dependent normaliser instead; the operator
then needs ``chunk_weights``.  :func:`check_mean_reduction` refuses such a
loss with an error that says so.

Example::

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> chunks = [(torch.randn(4, 3), torch.randn(4, 2)), (torch.randn(2, 3), torch.randn(2, 2))]
    >>> check_mean_reduction(model, torch.nn.functional.mse_loss, chunks, bn_mode="eval")  # a mean: passes
    >>> summed = lambda o, t: torch.nn.functional.mse_loss(o, t, reduction="sum")
    >>> check_mean_reduction(model, summed, chunks, bn_mode="eval")
    Traceback (most recent call last):
    ...
    ValueError: loss_fn is not an unweighted mean over the targets' leading dimension (chunk 0: ...
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .batches import as_args, chunk_size, slice_inputs
from .modes import module_mode


def output_example_shape(model: nn.Module, batches: Sequence, bn_mode: str) -> torch.Size:
    """The shape of the model's output for one example (its dtype and device in a zero tensor's).

    One forward pass without gradients on the first two examples of the first
    chunk: two, not one, because BatchNorm with batch statistics refuses a
    batch of one ("Expected more than 1 value per channel when training").
    Raises when the output is not a tensor indexed by example.
    """
    inputs, targets = batches[0]
    n = min(2, chunk_size(targets))
    with torch.no_grad(), module_mode(model, bn_mode, "off"):
        out = model(*as_args(slice_inputs(inputs, 0, n)))
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        raise ValueError("cannot check that loss_fn is a mean over examples: the model's output is not a tensor "
                         "indexed by example; pass chunk_weights (each chunk's share of the loss's normaliser)")
    return out[:1]


def check_mean_reduction(model: nn.Module, loss_fn: Callable, batches: Sequence, *, bn_mode: str) -> None:
    """Raise ValueError unless ``loss_fn`` is an unweighted mean over the targets' leading dimension.

    Checked on random outputs (shaped like the model's output for one
    example, :func:`output_example_shape`), so the answer does not depend on
    the current parameters (at a zero read-out every example's loss is equal
    and any weighting would pass): in every chunk the loss must equal the
    mean of its examples' losses, and one example from each chunk, taken
    together, must give the mean of their losses (a normaliser that differs
    between chunks).
    """
    example = output_example_shape(model, batches, bn_mode)
    g = torch.Generator(device="cpu").manual_seed(0)
    eps = torch.finfo(example.dtype).eps

    def random_outputs(n: int) -> torch.Tensor:
        return (3 * torch.randn((n, *example.shape[1:]), generator=g, dtype=torch.float64)).to(example)

    def losses(o, y) -> tuple[torch.Tensor, torch.Tensor]:
        each = torch.stack([loss_fn(o[i:i + 1], y[i:i + 1]).double() for i in range(len(y))])
        return loss_fn(o, y).double(), each

    picked_out, picked_y, picked_losses = [], [], []
    for c, (_, y) in enumerate(batches):
        o = random_outputs(chunk_size(y))
        whole, each = losses(o, y)
        checks = [(whole, each.mean(), f"chunk {c}")]
        picked_out.append(o[:1])
        picked_y.append(y[:1])
        picked_losses.append(each[0])
        if c == len(batches) - 1:
            together = loss_fn(torch.cat(picked_out), torch.cat(picked_y)).double()
            checks.append((together, torch.stack(picked_losses).mean(), "one example of each chunk"))
        for got, mean, where in checks:
            gap, scale = float((got - mean).abs()), float(mean.abs()) + 1e-30  # sync: once, at construction
            if not gap <= 1e3 * eps * scale:
                raise ValueError(
                    f"loss_fn is not an unweighted mean over the targets' leading dimension ({where}: the loss "
                    f"is {float(got):.6g} but its examples' losses average to {float(mean):.6g}): a "
                    "class-weighted loss, ignore_index or masked targets divide by a chunk-dependent "
                    "normaliser, so weighting chunks by their size gives a wrong Hessian. Pass chunk_weights "
                    "(each chunk's normaliser, e.g. its sum of class weights or its count of non-ignored "
                    "targets), or one chunk.")
