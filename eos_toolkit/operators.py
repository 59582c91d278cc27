"""Linear operators built on a Hessian operator: Adam-preconditioned Hessian, dense matrices, scipy.

The preconditioned sharpness of an Adam-family optimizer (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability") is the top eigenvalue
of ``P^-1 H``, computed symmetrically as ``P^-1/2 H P^-1/2`` (same spectrum),
with the diagonal preconditioner read from the optimizer's live state::

    P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)        Adam, AdamW, VRAdam
    P = sqrt(v_t) + eps   (centered: sqrt(v_t - g_avg^2) + eps)    RMSprop

Adam's step is ``lr m_t / ((1 - beta1^t) (sqrt(vhat_t) + eps))``, i.e. EMA
momentum with rate ``lr`` on the preconditioned problem; the ``1 - beta1^t``
factor moves the first-moment bias correction into ``P`` so the stability
threshold is exactly ``adam_threshold(lr, beta1) = 2 (1 + beta1) / ((1 - beta1) lr)``
(``momentum_threshold(lr, momentum)`` for RMSprop with momentum,
``gd_threshold(lr)`` without).  For VRAdam compare with the threshold at its
effective rate ``eta_t`` and at ``lr``.

Only the optimizer's ``state`` and ``param_groups`` are read, by torch's key
names (``exp_avg_sq``, ``max_exp_avg_sq`` with ``amsgrad``, ``step``,
``betas``, ``eps``; RMSprop's ``square_avg``, ``grad_avg``, ``alpha``,
``centered``), so any optimizer storing its state under those names works.

Example::

    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> loss = torch.nn.functional.mse_loss(model(x), y); loss.backward(); opt.step()
    >>> from eos_toolkit.hvp import hessian_operator
    >>> op = preconditioned_operator(hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)]), opt)
    >>> op.matvec(torch.randn(op.dim)).shape
    torch.Size([4])
"""
from __future__ import annotations

import numpy as np
import torch


def has_adam_state(optimizer: torch.optim.Optimizer, params) -> bool:
    """Whether every parameter in ``params`` has a second-moment estimate in ``optimizer.state``."""
    return all(("exp_avg_sq" in optimizer.state.get(p, {}) and "step" in optimizer.state[p])
               or "square_avg" in optimizer.state.get(p, {}) for p in params)


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("a selected parameter is not managed by the optimizer")


def adam_preconditioner(optimizer: torch.optim.Optimizer, params, *,
                        first_moment_correction: bool = True) -> torch.Tensor:
    """The diagonal of ``P`` (see the module docstring), flattened over ``params`` in order.

    ``params``: the live parameter tensors (e.g. ``HessianOperator.parameters``).
    ``first_moment_correction=False`` drops the ``1 - beta1^t`` factor (then the
    threshold is off by that factor early in training).  Computed on the
    parameters' device, without host syncs.  Raises ValueError for a parameter
    without second-moment state (take an optimizer step first).
    """
    diags = []
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        group = _group_of(optimizer, p)
        if "exp_avg_sq" in state and "step" in state:
            beta1, beta2 = group["betas"]
            step = state["step"]
            if isinstance(step, torch.Tensor) and step.device.type == "cpu":
                step = float(step)  # as torch.optim.Adam does: bias corrections in double precision
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            diag = (v / (1 - beta2 ** step)).sqrt() + group["eps"]
            if first_moment_correction:
                diag = diag * (1 - beta1 ** step)
        elif "square_avg" in state:
            v = state["square_avg"]
            if group.get("centered"):
                v = v - state["grad_avg"] ** 2
            diag = v.sqrt() + group["eps"]
        else:
            raise ValueError(
                f"parameter #{i} (shape {tuple(p.shape)}) has no 'exp_avg_sq'/'step' or 'square_avg' "
                "in the optimizer state: take at least one optimizer step first, or use an Adam-family "
                "or RMSprop optimizer")
        diags.append(diag.detach().reshape(-1))
    return torch.cat(diags)


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


def preconditioned_operator(hess_op, optimizer: torch.optim.Optimizer, *,
                            first_moment_correction: bool = True) -> PreconditionedOperator:
    """``P^-1/2 H P^-1/2`` from a Hessian operator and an Adam-family optimizer's live state.

    Compare its top eigenvalue with ``adam_threshold(lr, beta1)``.
    """
    diag = adam_preconditioner(optimizer, hess_op.parameters,
                               first_moment_correction=first_moment_correction)
    return PreconditionedOperator(hess_op, diag)


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
