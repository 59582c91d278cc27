"""Linear operators built on a Hessian operator: preconditioned Hessian, dense matrices, scipy.

The preconditioned sharpness of an adaptive optimizer (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability") is the top eigenvalue
of ``P^-1 H`` for the optimizer's diagonal preconditioner ``P``, computed
symmetrically as ``P^-1/2 H P^-1/2`` (same spectrum). ``P`` is data here: a
positive vector over the operator's parameters. Which ``P`` (and which
threshold from :mod:`eos_toolkit.thresholds`) belongs to which optimizer is
decided where optimizers are known: one adapter per optimizer family in
``experiments.adapters`` (for Adam, ``P = (1 - beta1^t)(sqrt(v_t / (1 -
beta2^t)) + eps)`` and the threshold is ``adam_threshold(lr, beta1)``), each
checked against the optimizer's own step. This module never reads an
optimizer, so it cannot silently apply Adam's formula to another optimizer.

Example::

    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> from eos_toolkit.hvp import hessian_operator
    >>> op = preconditioned_operator(hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)]),
    ...                              torch.full((4,), 2.0))
    >>> op.matvec(torch.randn(op.dim)).shape
    torch.Size([4])
"""
from __future__ import annotations

import numpy as np
import torch


class PreconditionedOperator:
    """``v -> D^-1/2 A D^-1/2 v`` for a symmetric operator ``A`` and a positive diagonal ``D``.

    Its eigenvalues are those of ``D^-1 A``; an eigenvector ``u`` of this operator
    maps to the eigenvector ``D^-1/2 u`` of ``D^-1 A`` (:meth:`to_original`).
    ``flatten``, ``unflatten`` and ``parameters`` are those of ``A`` (a Hessian operator).
    """

    def __init__(self, op, diag: torch.Tensor):
        if diag.shape != (op.dim,):
            raise ValueError(f"diag must have shape ({op.dim},), got {tuple(diag.shape)}")
        self.op = op
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.inv_sqrt_diag = diag.to(device=op.device, dtype=op.dtype).rsqrt()

    @property
    def n_matvecs(self) -> int:
        return self.op.n_matvecs

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.inv_sqrt_diag * self.op.matvec(self.inv_sqrt_diag * v.to(self.dtype))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        s = self.inv_sqrt_diag.unsqueeze(1)
        return s * self.op.matmat(s * V.to(self.dtype))

    def to_original(self, u: torch.Tensor) -> torch.Tensor:
        """Eigenvector(s) of ``D^-1 A`` from those of this symmetric operator (columns normalised)."""
        w = u * (self.inv_sqrt_diag if u.dim() == 1 else self.inv_sqrt_diag.unsqueeze(1))
        return w / w.norm(dim=0)

    @property
    def parameters(self) -> list[torch.Tensor]:
        return self.op.parameters

    def flatten(self, tensors) -> torch.Tensor:
        return self.op.flatten(tensors)

    def unflatten(self, vec: torch.Tensor, dtype=None) -> list[torch.Tensor]:
        return self.op.unflatten(vec, dtype)


def preconditioned_operator(hess_op, preconditioner) -> PreconditionedOperator:
    """``P^-1/2 H P^-1/2`` from a Hessian operator and the diagonal of ``P``.

    ``preconditioner``: a flat positive tensor of length ``hess_op.dim``, or a
    list of parameter-shaped tensors in the operator's parameter order.
    """
    if isinstance(preconditioner, (list, tuple)):
        preconditioner = hess_op.flatten(preconditioner)
    return PreconditionedOperator(hess_op, preconditioner.detach().reshape(-1))


class MatrixOperator:
    """A dense symmetric matrix as an operator (tests, small problems, cross-checks)."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim, self.dtype, self.device = matrix.shape[0], matrix.dtype, matrix.device
        self.n_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += 1
        return self.matrix @ v.to(self.dtype)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[1]
        return self.matrix @ V.to(self.dtype)


def as_scipy_linear_operator(op):
    """A ``scipy.sparse.linalg.LinearOperator`` over an operator (host round trip per product: cross-checks only)."""
    from scipy.sparse.linalg import LinearOperator

    np_dtype = torch.empty((), dtype=op.dtype).numpy().dtype

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x).reshape(-1)).to(device=op.device, dtype=op.dtype)
        return op.matvec(v).cpu().numpy()

    def matmat(X: np.ndarray) -> np.ndarray:
        V = torch.from_numpy(np.ascontiguousarray(X)).to(device=op.device, dtype=op.dtype)
        return op.matmat(V).cpu().numpy()

    return LinearOperator((op.dim, op.dim), matvec=matvec, matmat=matmat, rmatvec=matvec,
                          dtype=np_dtype)
