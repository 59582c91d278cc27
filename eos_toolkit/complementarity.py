"""The small semidefinite complementarity problem a central flow solves at every substep.

With ``k`` Hessian eigenvalues at the stability threshold, a central flow
(:mod:`eos_toolkit.central_flow`) chooses the covariance ``X`` (``k x k``,
in the basis of their eigenvectors) of the oscillation along them so that
the stability margin ``A(X)``, linear in ``X``, stays positive
semidefinite, and ``X`` is nonzero only along directions where the margin
is exhausted::

    X >= 0,   A + B[X] >= 0,   <X, A + B[X]> = 0          (">=": PSD)

``A`` is a symmetric ``k x k`` matrix and ``B`` a linear map on symmetric
matrices, given as a ``(k, k, k, k)`` tensor with
``B[X]_ij = sum_pq B_ijpq X_pq``.  When ``B`` is symmetric and positive
semidefinite (as a ``k^2 x k^2`` matrix) these are the optimality
conditions of the convex problem::

    minimise  1/2 <X, B[X]> + <A, X>   over   X >= 0

which :func:`solve_sdcp` solves by accelerated projected gradient (FISTA,
the projection being an eigenvalue clip).  A ``B`` that is not symmetric
PSD (an adaptive preconditioner's drift makes it slightly so) is replaced
by the PSD part of its symmetric part first, as the central-flows authors
do.  ``k`` is a handful, so each iteration is a few microseconds; the
result is checked against the three conditions (:func:`sdcp_violation`).

With ``k = 1`` the answer is closed form: ``x = max(0, -a / b)``.

Example:
    >>> import numpy as np
    >>> A = np.array([[-1.0, 0.0], [0.0, 0.5]])
    >>> B = np.zeros((2, 2, 2, 2)); B[0, 0, 0, 0] = B[1, 1, 1, 1] = 2.0
    >>> X = solve_sdcp(A, B)
    >>> np.round(X, 6).tolist()
    [[0.5, 0.0], [0.0, 0.0]]
    >>> sdcp_violation(A, B, X) < 1e-9
    True
"""

from __future__ import annotations

import numpy as np


class ComplementarityError(ValueError):
    """The problem has no solution the solver could find (the margin cannot be restored)."""


def _apply(B: np.ndarray, X: np.ndarray) -> np.ndarray:
    return np.einsum("ijpq,pq->ij", B, X)


def _psd_part(M: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh((M + M.T) / 2)
    return (V * np.maximum(w, 0.0)) @ V.T


def sdcp_violation(A: np.ndarray, B: np.ndarray, X: np.ndarray) -> float:
    """How far ``X`` is from solving the problem, relative to its scale.

    The largest of: the most negative eigenvalue of ``X`` and of ``A + B[X]``,
    and ``|<X, A + B[X]>|``, each divided by the natural scale
    (``|A| + |B| |X|``, and its product with ``|X|`` for the inner product).
    """
    A, B, X = (np.asarray(a, dtype=np.float64) for a in (A, B, X))
    R = A + _apply(B, X)
    scale = np.abs(A).max() + np.abs(B).max() * np.abs(X).max() + 1e-300
    x_scale = np.abs(X).max() + 1e-300
    neg_x = max(0.0, -np.linalg.eigvalsh((X + X.T) / 2).min()) / x_scale
    neg_r = max(0.0, -np.linalg.eigvalsh((R + R.T) / 2).min()) / scale
    gap = abs(float(np.sum(X * R))) / (scale * x_scale)
    return float(max(neg_x, neg_r, gap if np.abs(X).max() > 0 else 0.0))


def solve_sdcp(A, B, *, tol: float = 1e-9, max_iter: int = 20000) -> np.ndarray:
    """``X >= 0`` with ``A + B[X] >= 0`` and ``<X, A + B[X]> = 0`` (module docstring).

    A: ``(k, k)`` symmetric; B: ``(k, k, k, k)``.  Returns ``X`` (``(k, k)``,
    float64, symmetric PSD): zero when ``A`` is already PSD.  Raises
    :class:`ComplementarityError` when the iterates grow without bound (a
    direction where ``A`` is negative and ``B`` has no curvature: nothing
    can restore that margin) or do not converge in ``max_iter`` iterations.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    k = A.shape[0]
    if A.shape != (k, k) or B.shape != (k, k, k, k):
        raise ValueError(f"A must be (k, k) and B (k, k, k, k); got {A.shape} and {B.shape}")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise ValueError("A and B must be finite")
    A = (A + A.T) / 2
    if k == 0 or np.linalg.eigvalsh(A).min() >= 0:
        return np.zeros((k, k))
    M = _psd_part(B.reshape(k * k, k * k))
    # Keep B[X] symmetric for symmetric X: average over the output and the input transposes.
    M4 = M.reshape(k, k, k, k)
    M4 = (M4 + M4.transpose(1, 0, 2, 3) + M4.transpose(0, 1, 3, 2) + M4.transpose(1, 0, 3, 2)) / 4
    if k == 1:
        a, b = A[0, 0], M4[0, 0, 0, 0]
        if b <= 0:
            raise ComplementarityError(f"the margin {a:.4g} is negative and has no curvature (b = {b:.3g})")
        return np.array([[max(0.0, -a / b)]])
    lipschitz = np.linalg.eigvalsh(M4.reshape(k * k, k * k)).max()
    if lipschitz <= 0:
        raise ComplementarityError("the margin is negative and B is zero: nothing can restore it")
    step = 1.0 / lipschitz
    bound = 1e6 * (np.abs(A).max() / lipschitz + 1.0)

    def project(Y):
        w, V = np.linalg.eigh((Y + Y.T) / 2)
        return (V * np.maximum(w, 0.0)) @ V.T

    X = project(-A * step)
    Y, t = X.copy(), 1.0
    for i in range(1, max_iter + 1):
        X_next = project(Y - step * (A + _apply(M4, Y)))
        if np.sum((Y - X_next) * (X_next - X)) > 0:  # momentum points uphill: restart it
            t = 1.0
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        Y = X_next + ((t - 1) / t_next) * (X_next - X)
        X, t = X_next, t_next
        if np.abs(X).max() > bound:
            raise ComplementarityError(
                "the oscillation covariance grows without bound: the sharpness cannot be held at the "
                "threshold along some direction (its gradient vanishes there)")
        if i % 10 == 0 and sdcp_violation(A, M4, X) <= tol:
            return X
    if sdcp_violation(A, M4, X) <= 1e3 * tol:
        return X
    raise ComplementarityError(f"no solution within {max_iter} iterations (violation "
                               f"{sdcp_violation(A, M4, X):.3g})")
