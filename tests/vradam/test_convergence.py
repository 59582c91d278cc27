"""Convergence sanity: a convex quadratic, Rosenbrock, and the gate at a large rate."""

from __future__ import annotations

import pytest
import torch

from vradam import VRAdam


def _quadratic(dim: int = 8):
    """f(x) = 1/2 x^T A x - b^T x, A symmetric positive definite (condition number 20)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 10.0, dim, dtype=torch.float64)) @ q.T
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    minimiser = torch.linalg.solve(a, b)
    return (lambda x: 0.5 * x @ a @ x - b @ x), minimiser


@pytest.mark.parametrize("gate", ["velocity", "gradient"])
def test_reaches_the_minimum_of_a_convex_quadratic(gate):
    loss_fn, minimiser = _quadratic()
    x = torch.nn.Parameter(torch.zeros_like(minimiser))
    steps = 1500
    opt = VRAdam([x], lr=0.05, weight_decay=0.0, gate=gate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
        sched.step()
    assert torch.linalg.vector_norm(x.detach() - minimiser) < 1e-3


def test_makes_progress_on_rosenbrock():
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))

    def rosenbrock(p):
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    start = rosenbrock(xy).item()
    opt = VRAdam([xy], lr=0.05, weight_decay=0.0)
    for _ in range(1500):
        opt.zero_grad()
        rosenbrock(xy).backward()
        opt.step()
    assert rosenbrock(xy).item() < start / 100  # 12.5 -> about 0.02, in the valley
    assert torch.linalg.vector_norm(xy.detach() - 1.0) < 0.5  # from 2.6 away


def test_clamp_engages_where_adamw_oscillates():
    loss_fn, minimiser = _quadratic()
    lr, alpha1 = 1.0, 10.0

    def run(opt_cls, **kwargs):
        x = torch.nn.Parameter(torch.full_like(minimiser, 3.0))
        opt = opt_cls([x], lr=lr, weight_decay=0.0, **kwargs)
        losses, etas, clamped = [], [], []
        for _ in range(60):
            opt.zero_grad()
            loss = loss_fn(x)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if isinstance(opt, VRAdam):
                etas.append(opt.telemetry()["eta"].item())
                clamped.append(bool(opt.telemetry()["clamped"]))
        return torch.tensor(losses), etas, clamped

    adamw_losses, _, _ = run(torch.optim.AdamW)
    increases = (adamw_losses[1:] > adamw_losses[:-1]).sum().item()
    assert increases >= 10, "AdamW at this rate should oscillate"

    _, etas, clamped = run(VRAdam, beta3=1.0, alpha1=alpha1)
    assert any(clamped)
    assert min(etas) == pytest.approx(lr / (1 + alpha1))
    assert all(lr / (1 + alpha1) * (1 - 1e-12) <= e <= lr for e in etas)
