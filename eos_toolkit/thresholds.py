"""Stability thresholds: the sharpness above which an optimizer's step diverges.

On a quadratic loss ``0.5 x^T A x`` gradient descent with rate ``eta`` multiplies
the component along an eigenvector of ``A`` with eigenvalue ``lam`` by
``1 - eta lam`` per step, so it is stable iff ``lam < 2 / eta``.  Heavy-ball
momentum ``v <- beta1 v + g; x <- x - eta v`` is stable iff
``lam < 2 (1 + beta1) / eta``; the exponential-moving-average form used by Adam
(``m <- beta1 m + (1 - beta1) g``) rescales ``eta`` by ``1 - beta1``, giving
``2 (1 + beta1) / ((1 - beta1) eta)``: ``38 / eta`` at ``beta1 = 0.9``.  For
Adam-family optimizers that threshold applies to the *preconditioned*
sharpness (the top eigenvalue of ``P^-1/2 H P^-1/2``, Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability"); for VRAdam pass its
effective rate ``eta_t`` (or ``lr`` for the maximal-rate line).  torch's
``SGD(momentum=beta)`` and ``RMSprop(momentum=beta)`` are heavy-ball form
(:func:`heavy_ball_threshold`, 10x below the EMA form at 0.9).

This module is the one home of these formulas.  Which one applies to which
optimizer, at which rate and with which preconditioner, is decided by one
adapter per optimizer family in :mod:`eos_toolkit.adapters`, each checked
against the optimizer's own step.

Rates may be Python floats or tensors (e.g. a 0-dim ``eta_t`` on the device);
tensors are returned as tensors and never read back to the host.

Example::

    >>> gd_threshold(0.05)
    40.0
    >>> round(adam_threshold(1e-3, 0.9), 6)
    38000.0
"""
from __future__ import annotations

import torch

Rate = float | torch.Tensor


def _check_lr(lr: Rate) -> None:
    # Reading a tensor rate to validate it would be a host sync; only Python
    # numbers are validated here.
    if not isinstance(lr, torch.Tensor) and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")


def _check_beta1(beta1: float) -> None:
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1 must lie in [0, 1), got {beta1!r}")


def gd_threshold(lr: Rate) -> Rate:
    """``2 / lr``: gradient descent is stable on a quadratic iff lambda_max < 2 / lr."""
    _check_lr(lr)
    return 2.0 / lr


def momentum_threshold(lr: Rate, beta1: float) -> Rate:
    """``2 (1 + beta1) / ((1 - beta1) lr)`` for EMA-form momentum (Adam's first moment).

    ``beta1 = 0`` gives ``gd_threshold(lr)``.
    """
    _check_lr(lr)
    _check_beta1(beta1)
    return 2.0 * (1.0 + beta1) / ((1.0 - beta1) * lr)


def adam_threshold(lr: Rate, beta1: float) -> Rate:
    """Threshold for the preconditioned sharpness of Adam / AdamW / VRAdam: ``38 / lr`` at beta1 = 0.9.

    Compare with the top eigenvalue of :func:`eos_toolkit.operators.preconditioned_operator`.
    """
    return momentum_threshold(lr, beta1)


def heavy_ball_threshold(lr: Rate, beta: float) -> Rate:
    """``2 (1 + beta) / lr``: heavy ball as ``torch.optim.SGD`` writes it.

    ``buf <- beta buf + g; x <- x - lr buf`` has no (1 - beta) damping of the
    gradient, so its threshold is (1 - beta) times the EMA form's
    (:func:`momentum_threshold`); Cohen et al. 2021, appendix on momentum.
    """
    _check_lr(lr)
    _check_beta1(beta)
    return 2.0 * (1.0 + beta) / lr


def nesterov_threshold(lr: Rate, beta: float) -> Rate:
    """``2 (1 + beta) / ((1 + 2 beta) lr)``: Nesterov momentum as ``torch.optim.SGD(nesterov=True)`` writes it."""
    _check_lr(lr)
    _check_beta1(beta)
    return 2.0 * (1.0 + beta) / ((1.0 + 2.0 * beta) * lr)
