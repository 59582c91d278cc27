"""The central flow: the time-averaged trajectory of an optimizer at the edge of stability.

At the edge of stability an optimizer's iterates ``w + delta`` oscillate
along the top eigenvectors of ``D^-1 H`` while their average ``w`` moves
slowly.  Cohen, Damian, Talwalkar, Kolter and Lee (ICLR 2025, "Understanding
Optimization in Deep Learning with Central Flows") show that ``w`` follows
an ODE, the central flow: the optimizer's own flow with the gradient
averaged over the oscillation, ``g + 1/2 grad <H, Sigma>``, where the
covariance ``Sigma = U X U^T`` of the oscillation is whatever keeps the
sharpness at the threshold once it got there.  :mod:`eos_toolkit.flow_rules`
writes gradient descent, RMSProp, Adam and VRAdam in that form (the last two
are this toolkit's extension; their assumptions are stated there).

One substep of length ``dt`` (Euler, as the authors integrate):

1. ``L(w)`` and ``g`` (:meth:`HessianOperator.loss_and_gradient`), the rate
   ``rho`` and the diagonal ``D`` of the rule;
2. the top ``k`` eigenpairs ``(lambda_i, u_i)`` of ``D^-1 H`` (``U^T D U = I``)
   by block Lanczos on ``D^-1/2 H D^-1/2``, warm-started from the previous
   substep's vectors (while the top one is below :data:`FAR_FRACTION` of the
   threshold, the first substep's pairs serve the whole unit of time);
3. the edge set: the eigenvalues within ``edge`` (0.975) of the threshold
   ``tau / rho``; none: a plain (preconditioned) gradient-flow substep;
4. for each pair ``p <= q`` of edge vectors the third derivative
   ``T_pq = D^3 L[u_p, u_q, .]`` (:meth:`HessianOperator.third_derivative`;
   ``T_pp`` is the gradient of ``lambda_p`` when ``D = 1``);
5. everything the substep changes is linear in ``X``: ``dw/dt``, ``dnu/dt``
   (through ``E[g^2] = g^2 + diag(H Sigma H)``, ``H u_i = lambda_i D u_i``) and
   so the time derivative of the margin ``M = U^T (tau/rho D - H) U =
   diag(tau/rho - lambda)``: ``dM_ij/dt = d(tau/rho)/dt delta_ij + tau/rho
   u_i^T dD/dt u_j - T_ij . dw/dt``.  ``X`` solves the complementarity problem
   ``X >= 0, M + dt dM/dt >= 0, <X, M + dt dM/dt> = 0``
   (:func:`~eos_toolkit.complementarity.solve_sdcp`);
6. ``w``, ``nu`` and ``t`` advance by ``dt`` times their velocities.

What a unit of flow time (one optimizer step) reports, at its first substep
(:class:`FlowStep`): the loss at ``w``, the predicted time-averaged loss
``L + 1/2 tr(H Sigma) = L + 1/2 sum_i lambda_i X_ii``, the eigenvalues, the
threshold, the rate, the predicted variance ``Sigma`` (its eigenvalues and
eigenvectors, in parameter space), and the products, third derivatives and
seconds it took.

Example::

    >>> import torch
    >>> from eos_toolkit.hvp import hessian_operator
    >>> from eos_toolkit.flow_rules import GradientDescentFlow
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> op = hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)], dtype=torch.float64)
    >>> flow = CentralFlow(op, GradientDescentFlow(lr=0.1), k=1)
    >>> first = flow.step()
    >>> first.t, first.edge_count, round(first.threshold, 6)
    (0.0, 0, 20.0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .complementarity import solve_sdcp
from .flow_rules import FlowRule, FlowState
from .operators import PreconditionedOperator
from .solvers import KrylovWorkspace, block_lanczos


def _divide(v: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """``D^-1 v`` (``D`` None: the identity)."""
    return v if D is None else v / D


#: an eigenvalue within this fraction of the threshold is at the edge (the authors use 1.95 / 2)
EDGE_FRACTION = 0.975
#: below this fraction of the threshold the eigenpairs are computed once per unit of time, not per substep
FAR_FRACTION = 0.9


@dataclass
class FlowStep:
    """One unit of flow time, measured at its first substep."""

    t: float
    loss: float  # L(w) at the flow's point
    predicted_loss: float  # L(w) + 1/2 tr(H Sigma): the time-averaged loss of the iterates
    eigenvalues: list[float]  # top k of D^-1 H (of H for gradient descent)
    threshold: float  # tau / rho
    rate: float  # rho (VRAdam: the gated eta_t)
    edge_count: int  # eigenvalues at the edge
    variances: list[float]  # eigenvalues of Sigma, largest first (zeros off the edge)
    directions: torch.Tensor | None = field(default=None, repr=False)  # (dim, edge_count) unit eigenvectors of Sigma
    hessian_matvecs: int = 0  # over the whole unit of time
    third_derivatives: int = 0
    gradients: int = 0
    seconds: float = 0.0

    @property
    def sharpness(self) -> float:
        return self.eigenvalues[0]

    @property
    def variance(self) -> float:
        """``tr Sigma``: the total predicted squared oscillation."""
        return float(sum(self.variances))


@dataclass
class _Substep:
    loss: float
    eigenvalues: torch.Tensor
    threshold: float
    rate: float
    X: np.ndarray  # (edge, edge) covariance in the basis of the edge vectors
    U: torch.Tensor  # (dim, edge): D-normalised edge vectors
    HU: torch.Tensor | None  # (dim, edge): H u_i
    velocity: torch.Tensor
    dnu: torch.Tensor | None


class CentralFlow:
    """Integrates the central flow of ``rule`` on the parameters of ``operator`` (moved in place).

    operator: a :class:`~eos_toolkit.hvp.HessianOperator` whose parameters
    are the flow's weights (give it a copy of the model: the flow moves
    them); chunks, modes, method and process group are the operator's.
    rule: :func:`~eos_toolkit.flow_rules.flow_rule_for` of the optimizer.
    k: eigenpairs tracked (the edge may hold at most ``k``; more is
    reported by :attr:`saturated`).  substeps: Euler substeps per unit of
    time (the authors use 4).  edge: the fraction of the threshold at which
    an eigenvalue joins the edge.  tol, max_iter: the warm-started block
    Lanczos's residual tolerance and product budget per substep.
    """

    def __init__(self, operator, rule: FlowRule, *, k: int = 2, substeps: int = 4, edge: float = EDGE_FRACTION,
                 tol: float = 1e-3, max_iter: int = 60, generator: torch.Generator | None = None):
        if not (isinstance(k, int) and 1 <= k <= operator.dim):
            raise ValueError(f"k must be an integer in [1, dim={operator.dim}], got {k!r}")
        if not (isinstance(substeps, int) and substeps >= 1):
            raise ValueError(f"substeps must be an integer >= 1, got {substeps!r}")
        if not 0 < edge <= 1:
            raise ValueError(f"edge must lie in (0, 1], got {edge!r}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
        self.op, self.rule, self.k, self.substeps, self.edge = operator, rule, k, substeps, edge
        self.tol, self.max_iter, self.generator = tol, max_iter, generator
        self.dt = 1.0 / substeps
        self._warm: torch.Tensor | None = None
        self._workspace = KrylovWorkspace()
        self._previous: _Substep | None = None
        self._previous_threshold: float | None = None
        self._gbar: torch.Tensor | None = None  # the mean gradient g + 1/2 D^3L[Sigma] of the last substep
        self.saturated = False  # every tracked eigenvalue was at the edge at some substep
        _, g = operator.loss_and_gradient()
        self.state: FlowState = rule.start(g)

    # -- the pieces of a substep -----------------------------------------------------
    def _eigenpairs(self, D: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` eigenvalues of ``D^-1 H`` and their eigenvectors with ``U^T D U = I``."""
        op = self.op if D is None else PreconditionedOperator(self.op, D)
        result = block_lanczos(op, k=self.k, block_size=self.k, v0=self._warm, tol=self.tol,
                               max_iter=max(self.max_iter, 2 * self.k), generator=self.generator,
                               workspace=self._workspace)
        Y = result.eigenvectors[:, :self.k]
        self._warm = Y
        U = Y if D is None else Y * D.rsqrt().unsqueeze(1)
        return result.eigenvalues[:self.k], U

    def _oscillation_sq(self) -> float:
        """``tr(H Sigma H)`` of the previous substep (the gate's input, A4)."""
        prev = self._previous
        if prev is None or prev.HU is None or not prev.X.size:
            return 0.0
        gram = (prev.HU.T @ prev.HU).cpu().numpy()
        return float(np.sum(prev.X * gram))

    def _substep(self, far: bool = False) -> _Substep:
        """One Euler substep; ``far``: the sharpness is well below the edge, keep the last eigenpairs."""
        op, rule, state, dt = self.op, self.rule, self.state, self.dt
        loss, g = op.loss_and_gradient()
        D = rule.denominator(state)
        lam, U = (self._previous.eigenvalues, self._previous.U) if far else self._eigenpairs(D)
        # VRAdam's gate reads the mean gradient and the oscillation of the previous substep (A4)
        gbar_sq = float((g if self._gbar is None else self._gbar).square().sum()) if rule.gated else 0.0
        rho = rule.rate(state, gbar_sq, self._oscillation_sq())
        threshold = rule.threshold(rho)
        drift = 0.0 if self._previous_threshold is None or not rule.gated else \
            (threshold - self._previous_threshold) / dt
        self._previous_threshold = threshold
        velocity = -rho * _divide(g, D)
        dnu = rule.moment_velocity(state, g.square(), homogeneous=False) if rule.has_moment else None
        edge = 0 if far else int((lam >= self.edge * threshold).sum())  # sync: the edge decides the work
        self.saturated |= edge == self.k
        X, HU, self._gbar = np.zeros((edge, edge)), None, g
        if edge:
            X, velocity, dnu, HU, self._gbar = self._at_the_edge(g, D, lam[:edge], U[:, :edge], rho, threshold,
                                                               drift, velocity, dnu)
        step = _Substep(float(loss), lam, threshold, rho, X, U[:, :edge] if edge else U, HU, velocity, dnu)
        with torch.no_grad():
            for p, d in zip(op.parameters, op.unflatten(dt * velocity, op.model_dtype)):
                p.add_(d)
        self.state = rule.advance(state, dnu, dt)
        self._previous = step
        return step

    def _at_the_edge(self, g, D, lam, U, rho, threshold, drift, velocity, dnu):
        """Steps 4-5 of the module docstring: ``X``, and the velocities, ``H U`` and mean gradient it gives."""
        op, rule, state, edge = self.op, self.rule, self.state, U.shape[1]
        pairs = [(p, q) for p in range(edge) for q in range(p, edge)]
        count = {(p, q): 1.0 if p == q else 2.0 for p, q in pairs}  # X = E_pq has both entries set
        T = {pq: op.third_derivative(U[:, pq[0]], U[:, pq[1]]) for pq in pairs}
        HU = U * lam if D is None else (D.unsqueeze(1) * U) * lam  # H u_i = lambda_i D u_i
        # What X = E_pq adds to dw/dt, and to dnu/dt and dD/dt (linear in X)
        vel_X = {pq: -0.5 * rho * count[pq] * _divide(T[pq], D) for pq in pairs}
        dD, dnu_X, dD_X = None, {}, {}
        if rule.has_moment:
            dD = rule.denominator_velocity(state, dnu, homogeneous=False)
            for p, q in pairs:
                dnu_X[(p, q)] = rule.moment_velocity(state, count[(p, q)] * HU[:, p] * HU[:, q], homogeneous=True)
                dD_X[(p, q)] = rule.denominator_velocity(state, dnu_X[(p, q)], homogeneous=True)

        def margin_rate(vel, dDv):
            """``dM/dt`` for a weight velocity and a velocity of ``D``: ``tau/rho u_i^T dD u_j - T_ij . vel``."""
            M = torch.empty(edge, edge, dtype=g.dtype, device=g.device)
            for i, j in pairs:
                value = -(T[(i, j)] @ vel)
                if dDv is not None:
                    value = value + threshold * (U[:, i] * U[:, j] * dDv).sum()
                M[i, j] = M[j, i] = value
            return M.cpu().numpy()  # sync: the small problem is solved on the host

        stable = margin_rate(velocity, dD) + drift * np.eye(edge)
        B = np.zeros((edge, edge, edge, edge))  # B[X]_ij = sum_pq B_ijpq X_pq
        for p, q in pairs:
            R = margin_rate(vel_X[(p, q)], dD_X.get((p, q)))
            if p == q:
                B[:, :, p, p] = R
            else:
                B[:, :, p, q] = B[:, :, q, p] = R / 2
        margin = np.diag(threshold - lam.cpu().numpy())
        X = solve_sdcp(margin + self.dt * stable, self.dt * B)
        gbar = g
        for pq in pairs:
            x = float(X[pq])
            if x != 0.0:
                velocity = velocity + x * vel_X[pq]
                gbar = gbar + 0.5 * x * count[pq] * T[pq]
                if rule.has_moment:
                    dnu = dnu + x * dnu_X[pq]
        return X, velocity, dnu, HU, gbar

    # -- one unit of time --------------------------------------------------------------
    def step(self) -> FlowStep:
        """Integrate one unit of flow time (one optimizer step); returns what its first substep measured."""
        start = time.perf_counter()
        matvecs, thirds = self.op.n_matvecs, getattr(self.op, "n_third_derivatives", 0)
        t = self.state.t
        first = self._substep()
        # Far below the edge the eigenvalues cannot reach it within one step: the first substep's serve.
        far = float(first.eigenvalues[0]) < FAR_FRACTION * first.threshold
        for _ in range(self.substeps - 1):
            self._substep(far=far)
        lam = first.eigenvalues.tolist()
        edge = first.X.shape[0]
        variances, directions = [0.0] * self.k, None
        if edge:
            Q, R = torch.linalg.qr(first.U)
            S = R.cpu().numpy() @ first.X @ R.cpu().numpy().T
            w, V = np.linalg.eigh((S + S.T) / 2)
            order = np.argsort(w)[::-1]
            variances = [max(float(v), 0.0) for v in w[order]] + [0.0] * (self.k - edge)
            directions = Q @ torch.as_tensor(V[:, order].copy(), dtype=Q.dtype, device=Q.device)
        predicted = first.loss + 0.5 * float(np.sum(np.diag(first.X) * np.asarray(lam[:edge])))
        self.op.synchronize()
        return FlowStep(t=t, loss=first.loss, predicted_loss=predicted, eigenvalues=lam,
                        threshold=first.threshold, rate=first.rate, edge_count=edge, variances=variances,
                        directions=directions, hessian_matvecs=self.op.n_matvecs - matvecs,
                        third_derivatives=getattr(self.op, "n_third_derivatives", 0) - thirds,
                        gradients=self.substeps, seconds=time.perf_counter() - start)
