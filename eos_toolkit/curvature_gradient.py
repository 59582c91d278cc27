"""The gradient of the sharpness, from third derivatives of the loss.

For the loss Hessian ``H(w)`` with a simple top eigenvalue
``S(w) = lambda_max(H(w))`` and unit eigenvector ``u``, first-order
perturbation theory (``dS = u^T dH u``, the change of ``u`` contributes
nothing because ``|u| = 1`` is kept) gives::

    grad S(w) = grad_w (u^T H(w) u) |_(u fixed) = D^3 L(w)[u, u, .]

and for the preconditioned sharpness ``S_P(w) = lambda_max(P^-1/2 H(w) P^-1/2)``
of a diagonal preconditioner ``P`` held fixed, with unit eigenvector ``u~`` of
``P^-1/2 H P^-1/2`` (what Lanczos on
:func:`~eos_toolkit.operators.preconditioned_operator` returns)::

    grad S_P(w) = D^3 L(w)[P^-1/2 u~, P^-1/2 u~, .]

Central flows (Cohen et al. 2025, "Understanding Optimization in Deep Learning
with Central Flows") need exactly these.  Both are one call of
:meth:`~eos_toolkit.hvp.HessianOperator.third_derivative` (about five
gradients, two Hessian-vector products).  Where the top eigenvalue is repeated, ``S`` is not
differentiable and these are the gradients of one branch.

torch 2.13 computes some third derivatives wrongly while their first and
second derivatives are right: the fused layer norm (``nn.LayerNorm``,
``F.layer_norm``) and batch or instance normalisation with batch statistics
treat their saved mean and 1/std as constants in their double backward.
:func:`wrong_third_derivative_modules` names such modules in a model (the
third derivative refuses them); a LayerNorm written in plain tensor
operations, or BatchNorm on running statistics (``bn_mode="eval"``), is right.

Example (one parameter, ``L(w) = x w^3 / 6``: ``H = x w``, so ``grad S = x``)::

    >>> import torch
    >>> from eos_toolkit.hvp import hessian_operator
    >>> class Cube(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    ...     def forward(self, x):
    ...         return x * self.w ** 3 / 6
    >>> x = torch.tensor([3.0], dtype=torch.float64)
    >>> op = hessian_operator(Cube(), lambda out, y: out.mean(), [(x, torch.zeros(1))])
    >>> op.matvec(torch.ones(1)), sharpness_gradient(op, torch.ones(1))
    (tensor([6.], dtype=torch.float64), tensor([3.], dtype=torch.float64))
"""
from __future__ import annotations

import torch
from torch import nn


def sharpness_gradient(op, u: torch.Tensor) -> torch.Tensor:
    """``grad S(w) = D^3 L(w)[u, u, .]`` for the top eigenvector ``u`` of the Hessian operator ``op``.

    ``u`` is normalised here (any nonzero multiple of the eigenvector gives
    the same answer); ``S = lambda_max(H)`` must be a simple eigenvalue.
    Returns a flat vector in ``op.dtype`` (one
    :meth:`~eos_toolkit.hvp.HessianOperator.third_derivative`).
    """
    u = u.to(device=op.device, dtype=op.dtype)
    return op.third_derivative(u / u.norm())


def preconditioned_sharpness_gradient(op, u: torch.Tensor, preconditioner: torch.Tensor) -> torch.Tensor:
    """``grad S_P(w) = D^3 L(w)[P^-1/2 u, P^-1/2 u, .]``, ``S_P = lambda_max(P^-1/2 H P^-1/2)``, ``P`` fixed.

    ``u``: the top eigenvector of ``P^-1/2 H P^-1/2`` (normalised here);
    ``preconditioner``: the positive diagonal of ``P``, a flat tensor of
    length ``op.dim`` (as :func:`~eos_toolkit.operators.preconditioned_operator`
    takes it).  The eigenvector of ``P^-1 H`` is ``P^-1/2 u`` up to scale,
    but the scale matters here: ``u`` is unit, ``P^-1/2 u`` in general is not.
    """
    if preconditioner.shape != (op.dim,):
        raise ValueError(f"preconditioner must be the flat diagonal of P, shape ({op.dim},), "
                         f"got {tuple(preconditioner.shape)}")
    u = u.to(device=op.device, dtype=op.dtype)
    scaled = preconditioner.to(device=op.device, dtype=op.dtype).rsqrt() * (u / u.norm())
    return op.third_derivative(scaled)


def wrong_third_derivative_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` whose third derivatives torch 2.13 computes wrongly, as ``"name (why)"``.

    Read in the modes the modules are in now (inside
    :func:`~eos_toolkit.modes.module_mode` for an operator's modes):
    ``nn.LayerNorm`` with torch's own ``forward`` (a subclass whose forward
    is written in plain tensor operations is right), and BatchNorm or
    InstanceNorm layers that normalise by the batch's (or instance's)
    statistics.  Measured against central differences of Hessian-vector
    products in float64: errors from about 1% to several times the value.
    A functional ``F.layer_norm`` inside a custom module cannot be seen here.
    """
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward:
            found.append(f"{name or 'the model'} (torch's fused layer norm)")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            found.append(f"{name or 'the model'} (batch normalisation with batch statistics)")
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and (m.training or not m.track_running_stats):
            found.append(f"{name or 'the model'} (instance normalisation with instance statistics)")
    return found
