"""Independent answers for the curvature tests: dense Hessians and small float64 models."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, hessian

DT = torch.float64


def split_flat(flat: torch.Tensor, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A flat vector -> {name: tensor} in the given order (written here, not borrowed from the library)."""
    params = dict(model.named_parameters())
    out, start = {}, 0
    for n in names:
        size = params[n].numel()
        out[n] = flat[start:start + size].reshape(params[n].shape)
        start += size
    return out


def flat_params(model: nn.Module, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def dense_hessian(model: nn.Module, loss_fn, x, y, names: list[str] | None = None,
                  engine: str = "func") -> torch.Tensor:
    """The dense Hessian of ``loss_fn(model(x), y)`` in the named parameters; model used as it is.

    engine "func": ``torch.func.hessian``; "autograd": ``torch.autograd.functional.hessian``.
    torch 2.13's ``torch.func.hessian`` returns an asymmetric (wrong) matrix for a
    Transformer block with a LayerNorm after a residual branch; the symmetry
    check below keeps such a reference from passing silently.
    """
    names = names or [n for n, _ in model.named_parameters()]

    def loss_of(flat):
        return loss_fn(functional_call(model, split_flat(flat, model, names), (x,)), y)

    theta = flat_params(model, names)
    H = hessian(loss_of)(theta) if engine == "func" else torch.autograd.functional.hessian(loss_of, theta)
    assert (H - H.T).abs().max() <= 1e-10 * H.abs().max(), "reference Hessian is not symmetric"
    return H


def tanh_mlp(seed: int = 0, sizes=(5, 6, 4, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(DT)


def regression_data(n: int, d_in: int, d_out: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


class SmallCNN(nn.Module):
    """conv -> BatchNorm -> tanh -> linear, on 1 x 6 x 6 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def cnn_loss_plain(flat: torch.Tensor, model: SmallCNN, x, y, batch_stats: bool) -> torch.Tensor:
    """The SmallCNN's MSE written with torch.nn.functional, BatchNorm spelled out by hand."""
    p = split_flat(flat, model, [n for n, _ in model.named_parameters()])
    h = nn.functional.conv2d(x, p["conv.weight"], p["conv.bias"])
    if batch_stats:
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean = model.bn.running_mean.view(1, -1, 1, 1)
        var = model.bn.running_var.view(1, -1, 1, 1)
    h = (h - mean) / torch.sqrt(var + model.bn.eps)
    h = h * p["bn.weight"].view(1, -1, 1, 1) + p["bn.bias"].view(1, -1, 1, 1)
    out = nn.functional.linear(torch.tanh(h).flatten(1), p["fc.weight"], p["fc.bias"])
    return ((out - y) ** 2).mean()


class BatchNormHeadCNN(nn.Module):
    """conv -> BatchNorm2d -> tanh -> linear -> BatchNorm1d -> tanh -> linear, on 1 x 5 x 5 images.

    BatchNorm1d on a batch of one example has one value per channel, which
    torch refuses in training mode.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn2d = nn.BatchNorm2d(2)
        self.hidden = nn.Linear(2 * 3 * 3, 4)
        self.bn1d = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.bn2d(self.conv(x))).flatten(1)
        return self.out(torch.tanh(self.bn1d(self.hidden(h))))


def batch_norm_head_loss(flat: torch.Tensor, model: BatchNormHeadCNN, chunks) -> torch.Tensor:
    """The size-weighted MSE of :class:`BatchNormHeadCNN` over chunks, written out with
    torch.nn.functional, each chunk normalised by its own batch statistics (spelled out by hand)."""
    p = split_flat(flat, model, [n for n, _ in model.named_parameters()])

    def normalise(h, dims, weight, bias, eps):
        mean = h.mean(dim=dims, keepdim=True)
        var = h.var(dim=dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (h.dim() - 2)
        return (h - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)

    total = sum(len(y) for _, y in chunks)
    loss = 0.0
    for x, y in chunks:
        h = nn.functional.conv2d(x, p["conv.weight"], p["conv.bias"])
        h = torch.tanh(normalise(h, (0, 2, 3), p["bn2d.weight"], p["bn2d.bias"], model.bn2d.eps)).flatten(1)
        h = nn.functional.linear(h, p["hidden.weight"], p["hidden.bias"])
        h = torch.tanh(normalise(h, (0,), p["bn1d.weight"], p["bn1d.bias"], model.bn1d.eps))
        out = nn.functional.linear(h, p["out.weight"], p["out.bias"])
        loss = loss + len(y) / total * ((out - y) ** 2).mean()
    return loss


class CausalBlock(nn.Module):
    """A pre-norm causal Transformer block; attention written out (or via fused SDPA)."""

    def __init__(self, d: int = 4, heads: int = 2, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.fused:
            att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            att = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag(eigenvalues) Q^T`` for a random orthogonal ``Q``; returns the matrix and ``Q``."""
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return (Q * eigenvalues) @ Q.T, Q
