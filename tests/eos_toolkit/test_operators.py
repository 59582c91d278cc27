"""The preconditioned Hessian (P given as data) and the scipy adapter, against dense matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from eos_toolkit.hvp import hessian_operator
from eos_toolkit.operators import MatrixOperator, as_scipy_linear_operator, preconditioned_operator
from eos_toolkit.solvers import lanczos
from tests.eos_toolkit.reference import DT, dense_hessian, regression_data, tanh_mlp

mse = nn.functional.mse_loss


def train(model, optimizer, x, y, steps: int):
    for _ in range(steps):
        optimizer.zero_grad()
        mse(model(x), y).backward()
        optimizer.step()


def test_preconditioned_sharpness_equals_dense_after_adam_steps():
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, x, y, steps=4)
    op = hessian_operator(model, mse, [(x, y)])
    # P written from Cohen et al. 2022 with the state read here; given to the operator as data.
    t = 4
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    P = (1 - 0.9 ** t) * (torch.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    pre = preconditioned_operator(op, P)
    as_list = preconditioned_operator(op, op.unflatten(P))  # parameter-shaped P gives the same operator
    probe = torch.randn(op.dim, dtype=DT)
    assert torch.equal(pre.matvec(probe), as_list.matvec(probe))
    H = dense_hessian(model, mse, x, y)
    dense = H / torch.sqrt(P).unsqueeze(0) / torch.sqrt(P).unsqueeze(1)
    exact = torch.linalg.eigvalsh(dense)
    res = lanczos(pre, 2, max_iter=pre.dim, tol=1e-10)
    assert torch.allclose(res.eigenvalues, exact.flip(0)[:2], rtol=1e-8, atol=0)
    # Same spectrum as P^-1 H; the eigenvector maps back through P^-1/2.
    u = pre.to_original(res.eigenvectors[:, 0])
    w = torch.linalg.solve(torch.diag(P), H @ u)
    assert torch.allclose(w, res.eigenvalues[0] * u, atol=1e-8 * float(res.eigenvalues[0]))


def test_preconditioner_of_the_wrong_length_is_refused():
    model = tanh_mlp()
    x, y = regression_data(4, 5, 3)
    op = hessian_operator(model, mse, [(x, y)])
    with pytest.raises(ValueError, match=r"diag must have shape"):
        preconditioned_operator(op, torch.ones(op.dim + 1, dtype=DT))


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
