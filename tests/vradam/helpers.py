"""Small problems shared by the VRAdam tests (float64, a handful of tensors)."""

from __future__ import annotations

import torch


def make_params(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    """Three parameters of different shapes, one of them non-contiguous."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=dtype))
    transposed = torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=dtype).t())
    vector = torch.nn.Parameter(torch.randn(7, generator=gen, dtype=dtype))
    assert not transposed.is_contiguous()
    return [matrix, transposed, vector]


def clone_params(params: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Deep copies that keep shape, dtype and strides (non-contiguity included)."""
    copies = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
        q.copy_(p.detach())
        copies.append(torch.nn.Parameter(q, requires_grad=p.requires_grad))
    return copies


def smooth_loss(params: list[torch.Tensor]) -> torch.Tensor:
    """A non-quadratic loss whose gradient differs from tensor to tensor."""
    total = torch.zeros((), dtype=params[0].dtype)
    for k, p in enumerate(params):
        if p.numel() == 0:
            total = total + p.sum()
            continue
        total = total + (k + 1) * (p - 0.3).pow(2).sum() + torch.sin(3 * p).sum()
    return total


def fill_grads(params: list[torch.Tensor], loss_fn=smooth_loss) -> None:
    for p in params:
        p.grad = None
    loss_fn(params).backward()


def state_of(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict]:
    return [dict(opt.state[p]) for p in params]
