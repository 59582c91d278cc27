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

A unit of flow time (one optimizer step) is ``substeps`` intervals of length
``Delta`` (the authors use 4).  Each interval starts with a *refresh*:

1. ``L(w)`` and ``g`` (:meth:`HessianOperator.loss_and_gradient`), the rate
   ``rho`` and the diagonal ``D`` of the rule;
2. the top ``k`` eigenpairs ``(lambda_i, u_i)`` of ``D^-1 H`` (``U^T D U = I``)
   by block Lanczos on ``D^-1/2 H D^-1/2``, warm-started from the previous
   refresh's vectors.  While the top one is below :data:`FAR_FRACTION` of the
   threshold, the later refreshes of a unit check only its Rayleigh
   quotient (one product) and solve again when it has come within
   :data:`FAR_FRACTION`;
3. the edge set: the eigenvalues within ``edge`` (0.975) of the threshold
   ``tau / rho``; none: ``X = 0``, a plain (preconditioned) gradient flow;
4. for each pair ``p <= q`` of edge vectors the third derivative
   ``T_pq = D^3 L[u_p, u_q, .]`` (:meth:`HessianOperator.third_derivative`;
   ``T_pp`` is the gradient of ``lambda_p`` when ``D = 1``);
5. everything that changes is linear in ``X``: ``dw/dt``, ``dnu/dt``
   (through ``E[g^2] = g^2 + diag(H Sigma H)``, ``H u_i = lambda_i D u_i``) and
   so the time derivative of the margin ``M = U^T (tau/rho D - H) U =
   diag(tau/rho - lambda)``: ``dM_ij/dt = d(tau/rho)/dt delta_ij + tau/rho
   u_i^T dD/dt u_j - T_ij . dw/dt``.  ``X`` solves the complementarity problem
   ``X >= 0, M + Delta dM/dt >= 0, <X, M + Delta dM/dt> = 0``
   (:func:`~eos_toolkit.complementarity.solve_sdcp`).

Then ``w``, ``nu`` and ``t`` move across the interval by explicit Euler
*micro steps* with ``X``, ``T`` and ``H U`` held and the gradient evaluated
afresh at each: ``ceil(Delta rho lambda_1)`` of them, so that no mode of
``rho D^-1 H`` overshoots (Euler multiplies a mode of rate ``r`` by
``1 - r delta``).  For gradient descent and RMSProp at the edge
``rho lambda_1 = 2`` and one micro step per interval is the authors'
scheme; Adam's and VRAdam's ``38`` needs ten, and a single Euler step per
interval would settle at Euler's own edge instead of the optimizer's.
The weights are kept in ``dtype`` (float64 by default) and written into
the model's parameters after each micro step.

A flow must start at or below its threshold (:data:`START_TOLERANCE`):
above it the complementarity problem would restore the margin in one
interval, far outside where the linearisation holds (RMSProp and Adam
start with ``nu = (1 - beta2) g^2``, far above it; start them later, from
the optimizer's state: :func:`~eos_toolkit.flow_rules.FlowRule.state_from`).

What a unit reports, at its first refresh (:class:`FlowStep`): the loss at
``w``, the predicted time-averaged loss ``L + 1/2 tr(H Sigma) = L + 1/2
sum_i lambda_i X_ii``, the eigenvalues, the threshold, the rate, the
predicted variance ``Sigma`` (its eigenvalues and eigenvectors, in
parameter space), whether every eigensolve converged, and the products,
third derivatives, gradients and seconds it took.

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

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .complementarity import solve_sdcp
from .flow_rules import FlowRule, FlowState
from .operators import PreconditionedOperator
from .solvers import KrylovWorkspace, block_lanczos

#: an eigenvalue within this fraction of the threshold is at the edge (the authors use 1.95 / 2)
EDGE_FRACTION = 0.975
#: below this fraction of the threshold, the later refreshes of a unit check a Rayleigh quotient only
FAR_FRACTION = 0.9
#: a flow may start at most this factor above its threshold
START_TOLERANCE = 1.2
#: the most Euler micro steps in one interval (a stiffer flow is an error, not a slow crawl)
MAX_MICRO_STEPS = 256


class FlowStartError(ValueError):
    """The flow starts above its threshold, where no central flow is defined."""


def _divide(v: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """``D^-1 v`` (``D`` None: the identity)."""
    return v if D is None else v / D


@dataclass
class FlowStep:
    """One unit of flow time, measured at its first refresh."""

    t: float
    loss: float  # L(w) at the flow's point
    predicted_loss: float  # L(w) + 1/2 tr(H Sigma): the time-averaged loss of the iterates
    eigenvalues: list[float]  # top k of D^-1 H (of H for gradient descent)
    threshold: float  # tau / rho
    rate: float  # rho (VRAdam: the gated eta_t)
    edge_count: int  # eigenvalues at the edge
    variances: list[float]  # eigenvalues of Sigma, largest first (zeros off the edge)
    directions: torch.Tensor | None = field(default=None, repr=False)  # (dim, edge_count) unit eigenvectors of Sigma
    converged: bool = True  # every eigensolve of the unit met its tolerance
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
class _Refresh:
    """What a refresh fixed for its interval."""

    loss: float
    gradient: torch.Tensor
    eigenvalues: torch.Tensor  # top k of D^-1 H
    threshold: float
    rate: float
    X: np.ndarray  # (edge, edge) covariance in the basis of the edge vectors
    U: torch.Tensor  # (dim, edge) D-normalised edge vectors; (dim, k) all of them off the edge
    T: dict  # (p, q) -> D^3 L[u_p, u_q, .] of the edge pairs
    HU: torch.Tensor | None  # (dim, edge): H u_i


class CentralFlow:
    """Integrates the central flow of ``rule`` on the parameters of ``operator`` (moved in place).

    operator: a :class:`~eos_toolkit.hvp.HessianOperator` whose parameters
    are the flow's weights (give it a copy of the model: the flow moves
    them); chunks, modes, method and process group are the operator's.
    rule: :func:`~eos_toolkit.flow_rules.flow_rule_for` of the optimizer.
    state: where the rule starts (default ``rule.start`` at the current
    weights; :meth:`FlowRule.state_from` reads a running optimizer's).
    k: eigenpairs tracked (the edge may hold at most ``k``;
    :attr:`saturated` says when all ``k`` were at it).  substeps:
    refreshes per unit of time.  edge: the fraction of the threshold at
    which an eigenvalue joins the edge.  tol, max_iter: the warm-started
    block Lanczos's residual tolerance and product budget per refresh.
    """

    def __init__(self, operator, rule: FlowRule, *, state: FlowState | None = None, k: int = 3, substeps: int = 4,
                 edge: float = EDGE_FRACTION, tol: float = 1e-4, max_iter: int = 60,
                 generator: torch.Generator | None = None):
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
        self.interval = 1.0 / substeps
        self.w = operator.flat_parameters()  # the weights, in the operator's dtype
        self._warm: torch.Tensor | None = None
        self._workspace = KrylovWorkspace()
        self._last: _Refresh | None = None
        self._previous_threshold: float | None = None
        self._gbar: torch.Tensor | None = None  # the mean gradient g + 1/2 D^3L[Sigma] of the last refresh
        self.saturated = False  # every tracked eigenvalue was at the edge (with the margin kept) at some refresh
        self.unconverged = 0  # eigensolves that missed their tolerance
        self.micro_steps = 0
        if state is None:
            _, g = operator.loss_and_gradient()
            state = rule.start(g)
        self.state: FlowState = state
        self.next_lr: float | None = None  # the rate at the end of the unit (a schedule), set by step()

    # -- a refresh ------------------------------------------------------------------------
    def _eigenpairs(self, D: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` eigenvalues of ``D^-1 H`` and their eigenvectors with ``U^T D U = I``."""
        op = self.op if D is None else PreconditionedOperator(self.op, D)
        with self.op.measurement():
            result = block_lanczos(op, k=self.k, block_size=self.k, v0=self._warm, tol=self.tol,
                                   max_iter=max(self.max_iter, 2 * self.k), generator=self.generator,
                                   workspace=self._workspace)
        self.unconverged += not result.converged
        Y = result.eigenvectors[:, :self.k]
        self._warm = Y
        U = Y if D is None else Y * D.rsqrt().unsqueeze(1)
        return result.eigenvalues[:self.k].clone(), U

    def _rayleigh(self, D: torch.Tensor | None) -> float:
        """The Rayleigh quotient of the last top eigenvector on ``D^-1/2 H D^-1/2`` now (one product)."""
        op = self.op if D is None else PreconditionedOperator(self.op, D)
        y = self._warm[:, 0]
        return float(y @ op.matvec(y)) / float(y @ y)

    def _oscillation_sq(self) -> float:
        """``tr(H Sigma H)`` of the last refresh (the gate's input, A4)."""
        last = self._last
        if last is None or last.HU is None:
            return 0.0
        return float(np.sum(last.X * (last.HU.T @ last.HU).cpu().numpy()))

    def _lr_at(self, t: float) -> float:
        """The rule's rate at time ``t`` of the current unit: linear from ``lr`` to ``next_lr``."""
        if self.next_lr is None:
            return self.rule.lr
        return self._lr0 + (t - self._t0) * (self.next_lr - self._lr0)

    def _refresh(self, first: bool) -> _Refresh:
        op, rule, state = self.op, self.rule, self.state
        loss, g = op.loss_and_gradient()
        rule.lr = self._lr_at(state.t)
        D = rule.denominator(state)
        # VRAdam's gate reads the mean gradient and the oscillation of the last refresh (A4)
        gbar_sq = float((g if self._gbar is None else self._gbar).square().sum()) if rule.gated else 0.0
        rho = rule.rate(state, gbar_sq, self._oscillation_sq())
        threshold = rule.threshold(rho)
        last = self._last
        far = not first and last is not None and not last.X.size \
            and float(last.eigenvalues[0]) < FAR_FRACTION * last.threshold
        if far:
            quotient = self._rayleigh(D)
            far = quotient < FAR_FRACTION * threshold
        if far:
            lam, U = last.eigenvalues.clone(), last.U
            lam[0] = quotient
        else:
            lam, U = self._eigenpairs(D)
        if self._last is None and float(lam[0]) > START_TOLERANCE * threshold:
            self.check_start()  # raises
        if rule.gated:
            drift = 0.0 if self._previous_threshold is None else \
                (threshold - self._previous_threshold) / self.interval
        else:  # a schedule moves the threshold: its slope over this interval
            drift = (rule.threshold(self._lr_at(state.t + self.interval)) - threshold) / self.interval
        self._previous_threshold = threshold
        edge = 0 if far else int((lam >= self.edge * threshold).sum())  # sync: the edge decides the work
        self.saturated |= edge == self.k and float(lam[0]) <= 1.01 * threshold
        refresh = _Refresh(float(loss), g, lam, threshold, rho, np.zeros((0, 0)), U, {}, None)
        self._gbar = g
        if edge:
            self._solve_edge(refresh, D, edge, drift)
        self._last = refresh
        return refresh

    def _solve_edge(self, r: _Refresh, D, edge: int, drift: float) -> None:
        """Steps 4-5 of the module docstring: ``X``, ``T`` and ``H U`` of the refresh ``r``."""
        op, rule, state = self.op, self.rule, self.state
        U, lam, g, rho, threshold = r.U[:, :edge], r.eigenvalues[:edge], r.gradient, r.rate, r.threshold
        pairs = [(p, q) for p in range(edge) for q in range(p, edge)]
        count = {(p, q): 1.0 if p == q else 2.0 for p, q in pairs}  # X = E_pq has both entries set
        T = {pq: op.third_derivative(U[:, pq[0]], U[:, pq[1]]) for pq in pairs}
        HU = U * lam if D is None else (D.unsqueeze(1) * U) * lam  # H u_i = lambda_i D u_i
        velocity = -rho * _divide(g, D)
        # What X = E_pq adds to dw/dt, and to dnu/dt and dD/dt (linear in X)
        vel_X = {pq: -0.5 * rho * count[pq] * _divide(T[pq], D) for pq in pairs}
        dD, dD_X = None, {}
        if rule.has_moment:
            dnu = rule.moment_velocity(state, g.square(), homogeneous=False)
            dD = rule.denominator_velocity(state, dnu, homogeneous=False)
            for p, q in pairs:
                dnu_X = rule.moment_velocity(state, count[(p, q)] * HU[:, p] * HU[:, q], homogeneous=True)
                dD_X[(p, q)] = rule.denominator_velocity(state, dnu_X, homogeneous=True)

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
        r.X = solve_sdcp(margin + self.interval * stable, self.interval * B)
        r.U, r.T, r.HU = U, T, HU
        self._gbar = g + self._oscillation_gradient(r)

    @staticmethod
    def _oscillation_gradient(r: _Refresh) -> torch.Tensor | float:
        """``1/2 D^3 L[Sigma] = 1/2 sum_ij X_ij T_ij``."""
        out = 0.0
        for (p, q), t in r.T.items():
            x = float(r.X[p, q])
            if x:
                out = out + (0.5 if p == q else 1.0) * x * t
        return out

    def _oscillation_second_moment(self, r: _Refresh) -> torch.Tensor | float:
        """``diag(H Sigma H) = sum_ij X_ij (H u_i) (H u_j)``, elementwise."""
        out = 0.0
        for (p, q) in r.T:
            x = float(r.X[p, q])
            if x:
                out = out + (1.0 if p == q else 2.0) * x * r.HU[:, p] * r.HU[:, q]
        return out

    # -- the interval ---------------------------------------------------------------------
    def _advance(self, r: _Refresh) -> None:
        """Cross the refresh's interval by Euler micro steps with ``X``, ``T``, ``H U`` and ``rho`` held."""
        op, rule = self.op, self.rule
        stiffness = r.rate * max(float(r.eigenvalues[0]), 0.0)  # the fastest mode of rho D^-1 H
        micro = max(1, math.ceil(self.interval * stiffness))
        if micro > MAX_MICRO_STEPS:
            raise ValueError(f"the flow is too stiff here: rho lambda_max = {stiffness:.4g} needs {micro} Euler steps "
                             f"per interval (at most {MAX_MICRO_STEPS}); raise substeps")
        delta = self.interval / micro
        shift = self._oscillation_gradient(r)
        spread = self._oscillation_second_moment(r) if rule.has_moment else 0.0
        g = r.gradient
        for j in range(micro):
            if j:
                _, g = op.loss_and_gradient()
            D = rule.denominator(self.state)
            velocity = -r.rate * _divide(g + shift, D)
            dnu = rule.moment_velocity(self.state, g.square() + spread, homogeneous=False) if rule.has_moment \
                else None
            self.w = self.w + delta * velocity
            with torch.no_grad():
                for p, value in zip(op.parameters, op.unflatten(self.w, op.model_dtype)):
                    p.copy_(value)
            self.state = rule.advance(self.state, dnu, delta)
        self.micro_steps += micro

    def check_start(self) -> None:
        """Raise :class:`FlowStartError` unless the flow starts at most :data:`START_TOLERANCE` above its threshold.

        Computes the first refresh's eigenpairs (which the first step then reuses).
        """
        if self._last is not None:
            return
        D = self.rule.denominator(self.state)
        gbar_sq = float(self.op.loss_and_gradient()[1].square().sum()) if self.rule.gated else 0.0
        threshold = self.rule.threshold(self.rule.rate(self.state, gbar_sq, 0.0))
        lam, _ = self._eigenpairs(D)
        if float(lam[0]) > START_TOLERANCE * threshold:
            raise FlowStartError(
                f"the flow starts above its threshold: lambda_max(D^-1 H) = {float(lam[0]):.4g} is "
                f"{float(lam[0]) / threshold:.2f} x tau/rho = {threshold:.4g}; start it where the optimizer is "
                "at or below its threshold")

    # -- one unit of time --------------------------------------------------------------
    def step(self, next_lr: float | None = None) -> FlowStep:
        """Integrate one unit of flow time (one optimizer step); returns what its first refresh measured.

        ``next_lr``: the rule's rate at the end of the unit, when a schedule
        moves it (the rate is linear in between); None: ``rule.lr`` throughout.
        """
        start = time.perf_counter()
        matvecs, thirds = self.op.n_matvecs, getattr(self.op, "n_third_derivatives", 0)
        micro_before, unconverged = self.micro_steps, self.unconverged
        t = self._t0 = self.state.t
        self._lr0, self.next_lr = self.rule.lr, next_lr
        refreshes = []
        for i in range(self.substeps):
            refreshes.append(self._refresh(first=i == 0))
            self._advance(refreshes[-1])
        self.rule.lr = self._lr_at(self.state.t)
        self.next_lr = None
        self.state = dataclasses.replace(self.state, t=t + 1)  # whole steps, free of rounding
        first = refreshes[0]
        lam = first.eigenvalues.tolist()
        edge = first.X.shape[0]
        variances, directions = [0.0] * self.k, None
        if edge:
            Q, R = torch.linalg.qr(first.U)
            R = R.cpu().numpy()
            w, V = np.linalg.eigh(R @ first.X @ R.T)
            order = np.argsort(w)[::-1]
            variances = [max(float(v), 0.0) for v in w[order]] + [0.0] * (self.k - edge)
            directions = Q @ torch.as_tensor(V[:, order].copy(), dtype=Q.dtype, device=Q.device)
        predicted = first.loss + 0.5 * float(np.sum(np.diag(first.X) * np.asarray(lam[:edge])))
        self.op.synchronize()
        return FlowStep(t=t, loss=first.loss, predicted_loss=predicted, eigenvalues=lam,
                        threshold=first.threshold, rate=first.rate, edge_count=edge, variances=variances,
                        directions=directions, converged=self.unconverged == unconverged,
                        hessian_matvecs=self.op.n_matvecs - matvecs,
                        third_derivatives=getattr(self.op, "n_third_derivatives", 0) - thirds,
                        gradients=self.micro_steps - micro_before,
                        seconds=time.perf_counter() - start)
