"""Adam-preconditioned Hessian and the scipy adapter, against dense matrices and torch's own optimizers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from eos_toolkit.hvp import hessian_operator
from eos_toolkit.operators import (
    MatrixOperator,
    adam_preconditioner,
    as_scipy_linear_operator,
    has_adam_state,
    preconditioned_operator,
)
from eos_toolkit.solvers import lanczos
from tests.eos_toolkit.reference import DT, dense_hessian, flat_params, regression_data, tanh_mlp

mse = nn.functional.mse_loss


def train(model, optimizer, x, y, steps: int):
    for _ in range(steps):
        optimizer.zero_grad()
        mse(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_class, kwargs", [
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)),
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-3, amsgrad=True)),
    (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-6)),
    (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-6, centered=True)),
])
def test_preconditioner_reproduces_the_optimizer_step(optimizer_class, kwargs):
    """Adam's (and RMSprop's) update equals lr * m / P: P is the optimizer's own denominator."""
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    train(model, optimizer, x, y, steps=3)
    before = flat_params(model, [n for n, _ in model.named_parameters()])
    optimizer.zero_grad()
    mse(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    optimizer.step()
    after = flat_params(model, [n for n, _ in model.named_parameters()])
    P = adam_preconditioner(optimizer, list(model.parameters()))
    if optimizer_class is torch.optim.Adam:
        numerator = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    else:
        numerator = grad
    assert torch.allclose(before - after, kwargs["lr"] * numerator / P, rtol=1e-10, atol=0)


def test_preconditioned_sharpness_equals_dense_after_adam_steps():
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, x, y, steps=4)
    op = hessian_operator(model, mse, [(x, y)])
    assert has_adam_state(optimizer, op.parameters)
    pre = preconditioned_operator(op, optimizer)
    # Dense reference, P written from Cohen et al. 2022 with the state read here.
    t = 4
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    P = (1 - 0.9 ** t) * (torch.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    H = dense_hessian(model, mse, x, y)
    dense = H / torch.sqrt(P).unsqueeze(0) / torch.sqrt(P).unsqueeze(1)
    exact = torch.linalg.eigvalsh(dense)
    res = lanczos(pre.matvec, pre.dim, 2, max_iter=pre.dim, tol=1e-10)
    assert torch.allclose(res.eigenvalues, exact.flip(0)[:2], rtol=1e-8, atol=0)
    # Same spectrum as P^-1 H; the eigenvector maps back through P^-1/2.
    u = pre.to_original(res.eigenvectors[:, 0])
    w = torch.linalg.solve(torch.diag(P), H @ u)
    assert torch.allclose(w, res.eigenvalues[0] * u, atol=1e-8 * float(res.eigenvalues[0]))


def test_missing_state_is_reported():
    model = tanh_mlp()
    x, y = regression_data(4, 5, 3)
    op = hessian_operator(model, mse, [(x, y)])
    optimizer = torch.optim.Adam(model.parameters())
    assert not has_adam_state(optimizer, op.parameters)
    with pytest.raises(ValueError, match="optimizer step first"):
        preconditioned_operator(op, optimizer)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, x, y, steps=1)
    assert not has_adam_state(sgd, op.parameters)


def test_scipy_adapter_agrees_with_dense():
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    op = hessian_operator(model, mse, [(x, y)])
    exact = torch.linalg.eigvalsh(dense_hessian(model, mse, x, y))
    values = eigsh(as_scipy_linear_operator(op), k=2, which="LA", return_eigenvectors=False,
                   v0=np.ones(op.dim))
    assert np.allclose(np.sort(values), exact[-2:].numpy(), rtol=1e-8)


def test_matrix_operator_counts_products():
    A = torch.diag(torch.arange(5, dtype=DT))
    op = MatrixOperator(A)
    op.matvec(torch.ones(5, dtype=DT))
    op.matmat(torch.ones(5, 3, dtype=DT))
    assert op.n_matvecs == 4
    with pytest.raises(ValueError, match="square"):
        MatrixOperator(torch.zeros(2, 3))


def test_preconditioner_reproduces_a_vradam_step_at_its_effective_rate():
    """VRAdam keeps torch's Adam state names; its step is eta_t * exp_avg / P."""
    from vradam import VRAdam

    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = VRAdam(model.parameters(), lr=1e-2, beta3=5.0, alpha1=10.0, weight_decay=0.0)
    train(model, optimizer, x, y, steps=3)
    before = flat_params(model, [n for n, _ in model.named_parameters()])
    train(model, optimizer, x, y, steps=1)
    after = flat_params(model, [n for n, _ in model.named_parameters()])
    eta = float(optimizer.telemetry()["eta"])
    assert eta < 1e-2  # the gate is active, so the check is about eta_t, not lr
    P = adam_preconditioner(optimizer, list(model.parameters()))
    exp_avg = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    assert torch.allclose(before - after, eta * exp_avg / P, rtol=1e-10, atol=0)
