"""Sharpness measured repeatedly during training, warm-started from the last measurement.

A :class:`SharpnessTracker` owns one :class:`~eos_toolkit.hvp.HessianOperator`
over a fixed measurement set (it reads the live parameters at each product),
and each :meth:`SharpnessTracker.measure` runs an eigensolver on it, started
from the previous eigenvectors: after one training step the top eigenvector
has barely moved, so a few products suffice.  With ``precondition=True`` it
also measures ``P^-1/2 H P^-1/2`` for the diagonal preconditioner ``P`` the
caller passes to :meth:`SharpnessTracker.measure` (:mod:`eos_toolkit.operators`;
:mod:`eos_toolkit.adapters` reads ``P`` from an optimizer's state).  Thresholds
are the caller's business (:mod:`eos_toolkit.thresholds`): the tracker does
not know which optimizer trains the model.

Example::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> tracker = SharpnessTracker(model, torch.nn.functional.mse_loss, [(x, y)], k=2)
    >>> metrics = tracker.measure()
    >>> sorted(k for k in metrics if k.startswith("hessian_eig"))
    ['hessian_eig_1', 'hessian_eig_2']
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import metrics as names
from .hvp import hessian_operator
from .method_choice import choose_method
from .operators import LinearOperator, preconditioned_operator
from .settings import AUTO, METHODS, SOLVERS
from .solvers import EigResult, KrylovWorkspace, block_lanczos, lanczos, power_iteration


def align_signs(vectors: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """Flip eigenvector columns to point along ``reference`` (or, without one, so their largest entry is positive).

    Keeps "the projection of an update on the top eigenvector" comparable across
    measurements.  Device-side, no sync.
    """
    if reference is None:
        pick = vectors.abs().argmax(dim=0)
        signs = torch.sign(vectors.gather(0, pick.unsqueeze(0)).squeeze(0))
    else:
        signs = torch.sign((vectors * reference).sum(dim=0))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


class SharpnessTracker:
    """Top-k eigenvalues of the loss Hessian (and optionally of Adam's preconditioned Hessian).

    Arguments as in :func:`eos_toolkit.hvp.hessian_operator` (``params`` for
    per-layer sharpness, ``method``, ``bn_mode``, ``dropout``, ``dtype`` for the
    solver arithmetic, ``chunk_weights`` for losses that are not unweighted
    means), plus ``k`` eigenpairs; ``solver`` one of ``"lanczos"``,
    ``"block_lanczos"`` (block size ``k``: for clusters at the edge of
    stability), ``"power"`` (k = 1; shifted when the dominant eigenvalue is
    negative, so it too reports lambda_max, see
    :func:`~eos_toolkit.solvers.power_iteration`); ``tol`` on the relative
    residual; ``max_iter`` products per solve; ``determinism_probe`` checks on
    the first measurement that two products with one vector agree (its two
    products are counted in that measurement's ``hessian_matvecs``).

    ``method="auto"`` (the default) picks the product rule at the start of
    the first measurement, before its solve:
    :func:`~eos_toolkit.method_choice.choose_method` times the methods in
    :data:`~eos_toolkit.settings.METHODS` on a vector of its own (a block of the
    solve's width for ``"block_lanczos"``) and keeps the cheapest per
    measurement that agrees with forward-over-reverse to
    :data:`~eos_toolkit.method_choice.AUTO_RTOL`: four products in float32,
    five in float64 (per column of a block), once per run, counted in that
    measurement's ``hessian_matvecs``.  The reference's two products of one
    vector answer the determinism probe too.  The solve then runs with the
    chosen rule from its first product, and its random stream is the one a
    tracker with that method named would use.  The choice and the timings
    are in :attr:`method_choice`, and in :meth:`state_dict`, so a resumed
    run keeps it.  Each measurement runs inside one
    :meth:`~eos_toolkit.hvp.HessianOperator.measurement`, so
    ``"reuse_graph"`` builds its graphs once per measurement (for the
    Hessian and the preconditioned solve together) and frees them after.
    Both solves keep their Krylov basis in a
    :class:`~eos_toolkit.solvers.KrylovWorkspace` owned by the tracker.

    Inside a data-parallel run, give each rank its shard of the measurement
    set as ``batches`` and the ``process_group``: products are all-reduced
    (:mod:`eos_toolkit.hvp`), every rank's generator has the same ``seed``,
    so every rank runs the same solve and reports the full-data eigenvalues.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Sequence, *, k: int = 1,
                 method: str = AUTO, bn_mode: str = "eval", solver: str = "lanczos",
                 tol: float = 1e-3, max_iter: int = 100, precondition: bool = False, params=None,
                 dropout: str = "off", dtype: torch.dtype | None = None,
                 determinism_probe: bool = True, seed: int = 0, chunk_weights=None, process_group=None):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "power" and k != 1:
            raise ValueError(f"solver='power' finds one eigenpair; got k={k}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if method != AUTO and method not in METHODS:
            raise ValueError(f"method must be {AUTO!r} or one of {METHODS}, got {method!r}")
        self.auto = method == AUTO
        self.method_choice: dict | None = None  # with auto: {"method": ..., "timings": {...}} once chosen
        self.hessian = hessian_operator(model, loss_fn, batches, params=params,
                                        method="forward_over_reverse" if self.auto else method,
                                        bn_mode=bn_mode, dropout=dropout, dtype=dtype,
                                        determinism_probe=False,  # probed on the first measurement instead
                                        chunk_weights=chunk_weights, process_group=process_group)
        if k > self.hessian.dim:
            raise ValueError(f"k={k} exceeds the number of selected parameters {self.hessian.dim}")
        self.k, self.solver, self.tol, self.max_iter = k, solver, tol, max_iter
        self.precondition = precondition
        self.generator = torch.Generator(device=self.hessian.device).manual_seed(seed)
        self._probe_pending = determinism_probe
        self._workspace = KrylovWorkspace()  # the Hessian's basis, kept between measurements
        self._precond_workspace = KrylovWorkspace()
        self.eigenvectors: torch.Tensor | None = None          # (dim, k), Hessian
        self.precond_eigenvectors: torch.Tensor | None = None  # (dim, k), symmetric preconditioned

    @property
    def top_eigenvector(self) -> list[torch.Tensor] | None:
        """The last top Hessian eigenvector, shaped like the selected parameters (None before measuring)."""
        return None if self.eigenvectors is None else self.hessian.unflatten(self.eigenvectors[:, 0])

    @property
    def top_eigenvector_flat(self) -> torch.Tensor | None:
        return None if self.eigenvectors is None else self.eigenvectors[:, 0]

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: warm-start vectors, probe flag, RNG state."""
        return {"eigenvectors": self.eigenvectors, "precond_eigenvectors": self.precond_eigenvectors,
                "probe_pending": self._probe_pending, "generator": self.generator.get_state(),
                "method_choice": self.method_choice}

    def load_state_dict(self, state: dict) -> None:
        device = self.hessian.device
        self.eigenvectors = None if state["eigenvectors"] is None else state["eigenvectors"].to(device)
        self.precond_eigenvectors = (None if state["precond_eigenvectors"] is None
                                     else state["precond_eigenvectors"].to(device))
        self._probe_pending = bool(state["probe_pending"])
        self.generator.set_state(state["generator"].cpu())
        if self.auto and state.get("method_choice"):
            self.method_choice = state["method_choice"]
            self.hessian.method = self.method_choice["method"]

    def _probe_generator(self) -> torch.Generator:
        """The stream of the determinism probe and of the method choice's vector.

        Its own, so whether they run leaves the solves' random stream alone.
        """
        return torch.Generator(device=self.hessian.device).manual_seed(54321)

    def _choose_method(self) -> None:
        """``"auto"``: time the product rules and choose, before the first solve (the probe answered too)."""
        shape = (self.hessian.dim, self.k) if self.solver == "block_lanczos" else (self.hessian.dim,)
        x = torch.randn(shape, dtype=self.hessian.dtype, device=self.hessian.device,
                        generator=self._probe_generator())
        # What a warm measurement costs: about five products, twice that with the preconditioned solve.
        choice = choose_method(self.hessian, x, products=5 * (2 if self.precondition else 1))
        self.method_choice = choice.as_record()
        self._probe_pending = False

    def _solve(self, op: LinearOperator, warm: torch.Tensor | None,
               workspace: KrylovWorkspace) -> tuple[EigResult, float]:
        """One solve on ``op``, started from ``warm``, and its wall time."""
        kwargs = dict(max_iter=self.max_iter, tol=self.tol, v0=warm, generator=self.generator)
        start = time.perf_counter()
        if self.solver == "lanczos":
            result = lanczos(op, self.k, workspace=workspace, **kwargs)
        elif self.solver == "block_lanczos":
            result = block_lanczos(op, self.k, block_size=self.k, workspace=workspace, **kwargs)
        else:
            result = power_iteration(op, which="LA", **kwargs)
        if op.device.type == "cuda":
            torch.cuda.synchronize(op.device)  # sync: wall time of the solve
        return result, time.perf_counter() - start

    def _metrics(self, solve: str, result: EigResult, seconds: float) -> dict[str, float]:
        # sync: one transfer of the eigenvalues and residuals per solve.
        values = torch.cat([result.eigenvalues, result.residuals]).tolist()
        k = result.eigenvalues.shape[0]
        metrics = {names.eigenvalue(solve, i + 1): values[i] for i in range(k)}
        metrics.update({names.residual(solve, i + 1): values[k + i] for i in range(k)})
        metrics[names.matvecs(solve)] = float(result.n_matvecs)
        metrics[names.seconds(solve)] = seconds
        metrics[names.converged(solve)] = float(result.converged)
        return metrics

    def measure(self, preconditioner=None) -> dict[str, float]:
        """Solve at the model's current parameters; returns plain floats (a deliberate sync point).

        Keys: ``sharpness``, ``hessian_eig_{i}``, ``hessian_residual_{i}``,
        ``hessian_matvecs`` and ``hessian_seconds`` (every product this
        measurement used and the time it took, the method choice's and the
        determinism probe's included),
        ``hessian_converged``; with ``precondition=True`` also
        ``precond_sharpness``, ``precond_eig_{i}``, ``precond_residual_{i}``,
        ``precond_matvecs``, ``precond_seconds``, ``precond_converged`` for
        ``P^-1/2 H P^-1/2``, where ``preconditioner`` is the diagonal of ``P``
        (a flat tensor over the tracked parameters or a list of
        parameter-shaped tensors). Without one (an optimizer before its first
        step) those values are NaN, so the gap is visible in the record.
        """
        with self.hessian.measurement():
            return self._measure(preconditioner)

    def _measure(self, preconditioner) -> dict[str, float]:
        before, start = self.hessian.n_matvecs, time.perf_counter()
        if self.auto and self.method_choice is None:
            self._choose_method()
        elif self._probe_pending:
            self.hessian.check_determinism(generator=self._probe_generator())
            self._probe_pending = False
        result, seconds = self._solve(self.hessian, self.eigenvectors, self._workspace)
        self.eigenvectors = align_signs(result.eigenvectors, self.eigenvectors)
        metrics = self._metrics(names.HESSIAN, result, seconds)
        # Every product of the measurement, and its time: the method choice and the probe included.
        metrics[names.matvecs(names.HESSIAN)] = float(self.hessian.n_matvecs - before)
        metrics[names.seconds(names.HESSIAN)] = time.perf_counter() - start
        metrics[names.SHARPNESS] = metrics[names.eigenvalue(names.HESSIAN, 1)]
        if not self.precondition:
            return metrics
        if preconditioner is None:
            nan = float("nan")
            metrics.update({name(names.PRECOND, i + 1): nan for name in (names.eigenvalue, names.residual)
                            for i in range(self.k)})
            metrics.update({names.PRECOND_SHARPNESS: nan, names.matvecs(names.PRECOND): 0.0,
                            names.seconds(names.PRECOND): 0.0, names.converged(names.PRECOND): nan})
            return metrics
        op = preconditioned_operator(self.hessian, preconditioner)
        result, seconds = self._solve(op, self.precond_eigenvectors, self._precond_workspace)
        self.precond_eigenvectors = align_signs(result.eigenvectors, self.precond_eigenvectors)
        metrics.update(self._metrics(names.PRECOND, result, seconds))
        metrics[names.PRECOND_SHARPNESS] = metrics[names.eigenvalue(names.PRECOND, 1)]
        return metrics
