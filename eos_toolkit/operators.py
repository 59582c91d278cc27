"""The one operator interface, and the operators built on it.

Every solver in :mod:`eos_toolkit.solvers` and the tracker take a
:class:`LinearOperator`: a symmetric ``A`` on flat vectors, known only by its
products.  The interface is small (as curvlinops keeps operators apart from
eigensolvers):

* ``dim``, ``dtype``, ``device``: the vectors it takes and returns;
* ``matvec(v)`` for a ``(dim,)`` vector, ``matmat(V)`` for a ``(dim, b)``
  block (``A @ x`` picks one by the shape);
* ``n_matvecs``: products so far, a block of ``b`` columns counting ``b``;
* ``agree(flag)``: a stop decision made together by every process that
  shares the products (data-parallel ranks summing one Hessian); a single
  process decides alone.

Implementations: :class:`~eos_toolkit.hvp.HessianOperator` (the loss Hessian
of a model), :class:`PreconditionedOperator` (``P^-1/2 A P^-1/2`` for a
diagonal ``P``), :class:`MatrixOperator` (a dense matrix: tests, small
problems, cross-checks) and :class:`FunctionOperator` (any product function).  :func:`as_scipy_linear_operator` hands any of them
to scipy for cross-checks.

The preconditioned sharpness of an adaptive optimizer (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability") is the top eigenvalue
of ``P^-1 H`` for the optimizer's diagonal preconditioner ``P``, computed
symmetrically as ``P^-1/2 H P^-1/2`` (same spectrum). ``P`` is data here: a
positive vector over the operator's parameters. Which ``P`` (and which
threshold from :mod:`eos_toolkit.thresholds`) belongs to which optimizer is
decided where optimizers are known: one adapter per optimizer family in
:mod:`eos_toolkit.adapters`, each checked against the optimizer's own step.
This module never reads an optimizer, so it cannot silently apply Adam's
formula to another optimizer.

Example::

    >>> import torch
    >>> A = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0])))
    >>> (A @ torch.ones(2)).tolist(), A.n_matvecs
    ([3.0, 1.0], 1)
    >>> P = preconditioned_operator(A, torch.tensor([4.0, 4.0]))
    >>> (P @ torch.ones(2)).tolist()   # D^-1/2 A D^-1/2: the eigenvalues of D^-1 A
    [0.75, 0.25]
"""
from __future__ import annotations

import abc

import numpy as np
import torch


class LinearOperator(abc.ABC):
    """A symmetric linear operator on flat vectors of ``dim`` entries (module docstring).

    Subclasses set ``dim``, ``dtype``, ``device`` and keep ``n_matvecs``;
    they implement :meth:`matvec` and :meth:`matmat`, and :meth:`agree` when
    their products are shared by several processes.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    n_matvecs: int

    @abc.abstractmethod
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a ``(dim,)`` vector, in ``dtype`` on ``device``."""

    @abc.abstractmethod
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for a ``(dim, b)`` block, in ``dtype`` on ``device``."""

    def agree(self, flag: bool) -> bool:
        """``flag`` as every process sharing the products decides it; a single process decides alone."""
        return flag

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)


class MatrixOperator(LinearOperator):
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


class FunctionOperator(LinearOperator):
    """An operator from a product function ``v -> A v`` (a product of your own, another library's).

    ``matmat`` applies ``matvec`` column by column unless a block product is given.
    """

    def __init__(self, matvec, dim: int, *, dtype: torch.dtype = torch.float64, device="cpu", matmat=None):
        self._matvec, self._matmat = matvec, matmat
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self.n_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += 1
        return self._matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[1]
        if self._matmat is not None:
            return self._matmat(V)
        return torch.stack([self._matvec(v) for v in V.T], dim=1)


class PreconditionedOperator(LinearOperator):
    """``v -> D^-1/2 A D^-1/2 v`` for a symmetric operator ``A`` and a positive diagonal ``D``.

    Its eigenvalues are those of ``D^-1 A``; an eigenvector ``u`` of this operator
    maps to the eigenvector ``D^-1/2 u`` of ``D^-1 A`` (:meth:`to_original`).
    Products are counted, and stop decisions made, by ``A``.
    """

    def __init__(self, op: LinearOperator, diag: torch.Tensor):
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

    def agree(self, flag: bool) -> bool:
        return self.op.agree(flag)

    def to_original(self, u: torch.Tensor) -> torch.Tensor:
        """Eigenvector(s) of ``D^-1 A`` from those of this symmetric operator (columns normalised)."""
        w = u * (self.inv_sqrt_diag if u.dim() == 1 else self.inv_sqrt_diag.unsqueeze(1))
        return w / w.norm(dim=0)


def preconditioned_operator(op: LinearOperator, preconditioner) -> PreconditionedOperator:
    """``P^-1/2 A P^-1/2`` from an operator and the diagonal of ``P``.

    ``preconditioner``: a flat positive tensor of length ``op.dim``, or (for
    a :class:`~eos_toolkit.hvp.HessianOperator`) a list of parameter-shaped
    tensors in the operator's parameter order.
    """
    if isinstance(preconditioner, (list, tuple)):
        preconditioner = op.flatten(preconditioner)
    return PreconditionedOperator(op, preconditioner.detach().reshape(-1))


def as_scipy_linear_operator(op: LinearOperator):
    """A ``scipy.sparse.linalg.LinearOperator`` over an operator (host round trip per product: cross-checks only)."""
    from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

    np_dtype = torch.empty((), dtype=op.dtype).numpy().dtype

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x).reshape(-1)).to(device=op.device, dtype=op.dtype)
        return op.matvec(v).cpu().numpy()

    def matmat(X: np.ndarray) -> np.ndarray:
        V = torch.from_numpy(np.ascontiguousarray(X)).to(device=op.device, dtype=op.dtype)
        return op.matmat(V).cpu().numpy()

    return ScipyLinearOperator((op.dim, op.dim), matvec=matvec, matmat=matmat, rmatvec=matvec, dtype=np_dtype)
