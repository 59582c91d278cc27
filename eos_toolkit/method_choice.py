"""Which Hessian-vector product rule is cheapest on this model: ``"auto"``, decided once per run.

:func:`choose_method` times the rules of :data:`~eos_toolkit.settings.METHODS` on
one vector (or a block shaped like the solver's), before the first solve,
and picks with :func:`cheapest_method` the cheapest per measurement among
those whose product agrees with the reference to :data:`AUTO_RTOL`.  Its
products are its own (a tracker counts them in its first measurement); the
solve that follows runs with the chosen rule from its first product, so it
is the same solve a tracker with that rule named would make.

On a vector ``v``, in one :meth:`~eos_toolkit.hvp.HessianOperator.measurement`:

1. the reference, forward-over-reverse (or the first rule in :data:`ORDER`
   that works on the model), twice on ``v``, each time from its own forward
   pass: the first call pays one-off costs (tracing, a run pays them once),
   the second is its steady cost and the reference product.  The two must
   agree to :func:`~eos_toolkit.hvp.determinism_rtol`: that is the
   determinism probe's question, answered here, so a random operator (dropout
   left on) is named before anything is chosen;
2. reuse_graph twice: the first builds its graphs, the second is what every
   later product of a measurement costs;
3. double backward: its figure is reuse_graph's first product when the
   graphs fit (the same computation: build a chunk's graph, one backward
   through it), else one product of its own;
4. finite differences once, in float64 only (in float32 their best accuracy,
   ``eps^(2/3)``, is worse than :data:`AUTO_RTOL`).

Cost: four products in float32, five in float64 (each ``b`` products for a
``(dim, b)`` block; times are per column), once per run.  A rule that fails
on the model is left out with its reason (:attr:`MethodChoice.failed`); when
every rule fails, :class:`~eos_toolkit.modes.MissingSecondDerivativeError`
lists why.  Under a process group a failure is raised instead (the other
ranks may be inside the product's all-reduce: name a rule that works), and
the ranks take the slowest rank's times, the largest errors and any rank's
memory fallback, in one all-reduce, so all choose alike.

Example::

    >>> import torch
    >>> from eos_toolkit.hvp import hessian_operator
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> op = hessian_operator(model, torch.nn.functional.mse_loss, [(torch.randn(8, 3), torch.randn(8, 1))])
    >>> choice = choose_method(op, torch.randn(op.dim))
    >>> choice.method in METHODS, list(choice.timings)[0], choice.n_matvecs
    (True, 'forward_over_reverse', 4)
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.func import grad, jvp

from .hvp import HessianOperator, determinism_rtol, raise_if_random
from .modes import MissingSecondDerivativeError
from .settings import METHODS
AUTO_RTOL = 1e-5  # a method is eligible for "auto" when its product agrees with the reference to this
AUTO_PRODUCTS_PER_MEASUREMENT = 10  # what "auto" amortises reuse_graph's graph building over
ORDER = ("forward_over_reverse", "reuse_graph", "double_backward", "finite_difference")  # the reference: the first that works


@dataclass(frozen=True)
class MethodTiming:
    """One method's timing on the real operator."""

    first_seconds: float  # the first product: includes one-off work (reuse_graph builds its graphs here)
    product_seconds: float  # a later product: the steady cost (seconds per column of a block)
    relative_error: float  # |H v - H v (reference)| / |H v (reference)|


@dataclass
class MethodChoice:
    """What :func:`choose_method` found: the choice, every timing (the reference first), and the failures."""

    method: str
    timings: dict[str, MethodTiming]
    failed: dict[str, str] = field(default_factory=dict)  # method -> why it failed on this model
    n_matvecs: int = 0  # products the timing made

    def as_record(self) -> dict:
        """Plain data for a run record's ``hvp_method`` event and a tracker's state."""
        return {"method": self.method, "timings": {m: dict(vars(t)) for m, t in self.timings.items()},
                **({"failed": dict(self.failed)} if self.failed else {})}


def cheapest_method(timings: dict[str, MethodTiming], *, products: int = AUTO_PRODUCTS_PER_MEASUREMENT,
                    rtol: float = AUTO_RTOL) -> str:
    """The cheapest method per measurement among those that agree with the reference to ``rtol``.

    Cost of a measurement of ``products`` products: ``products x product_seconds``,
    plus, for ``"reuse_graph"``, its graph building (``first - product``
    seconds), which it repeats every measurement; the other methods' one-off
    costs (tracing, allocator warm-up) are paid once per run and ignored.
    Ties go to the earlier method in :data:`~eos_toolkit.settings.METHODS`.
    Deterministic in its inputs (tests inject timings).
    """
    def cost(name: str) -> float:
        t = timings[name]
        setup = max(t.first_seconds - t.product_seconds, 0.0) if name == "reuse_graph" else 0.0
        return products * t.product_seconds + setup

    eligible = [m for m in METHODS if m in timings and timings[m].relative_error <= rtol]
    if not eligible:
        errors = ", ".join(f"{m}: {t.relative_error:.2g}" for m, t in timings.items())
        raise ValueError(f"no Hessian-vector product method agrees with forward-over-reverse to {rtol:g}: "
                         f"{errors or 'none was timed'}")
    return min(eligible, key=lambda m: (cost(m), METHODS.index(m)))


def _warm_up_autodiff() -> None:
    """Pay torch's one-off costs of second-order autodiff (lazy imports, first transforms) on a tiny problem."""
    x = torch.ones(2, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad((x ** 3).sum(), x, create_graph=True)
        torch.autograd.grad(g, x, grad_outputs=torch.ones(2))
    jvp(grad(lambda t: (t ** 3).sum()), (torch.ones(2),), (torch.ones(2),))


def _timed(op: HessianOperator, name: str, x: torch.Tensor, failed: dict[str, str]):
    """``name``'s product of ``x`` and its seconds per column; None (the reason kept in ``failed``) when it fails."""
    op.synchronize()  # the caller's queued work (and any error of it) is not this product's
    restore, op.method = op.method, name
    try:
        start = time.perf_counter()
        product = op @ x
        op.synchronize()
        return product, (time.perf_counter() - start) / (1 if x.dim() == 1 else x.shape[1])
    except (RuntimeError, NotImplementedError) as err:  # incl. MissingSecondDerivativeError
        if op.collective.active:
            raise  # the other ranks are inside this product's all-reduce: stop them all
        failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return None
    finally:
        op.method = restore


def _relative_error(product: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.norm().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((product - reference).norm() / scale)  # sync: one number per method, once per run


def choose_method(op: HessianOperator, x: torch.Tensor, *, methods: Sequence[str] = METHODS,
                  products: int = AUTO_PRODUCTS_PER_MEASUREMENT) -> MethodChoice:
    """Time the product rules on ``x`` (a vector or a ``(dim, b)`` block) and choose one (module docstring).

    The operator's ``method`` is set to the choice.  ``products``: the
    products per measurement that reuse_graph's graph building is amortised
    over (:func:`cheapest_method`).  Raises
    :class:`~eos_toolkit.hvp.NondeterministicOperatorError` when the
    reference's two products of ``x`` differ (a random operator cannot be
    timed by agreement: name a method).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {METHODS}")
    if torch.finfo(op.model_dtype).eps ** (2 / 3) > AUTO_RTOL:
        methods = [m for m in methods if m != "finite_difference"]
    methods = sorted(methods, key=ORDER.index)
    _warm_up_autodiff()
    before = op.n_matvecs
    failed: dict[str, str] = {}
    figures: dict[str, tuple[float, float, float]] = {}  # method -> (first, steady, relative error)
    with op.measurement():
        reference_name, reference = None, None
        for name in methods:
            first = _timed(op, name, x, failed)
            if first is None:
                continue
            op.drop_graphs()  # reuse_graph as the reference: its second product runs the model again
            second = _timed(op, name, x, failed)
            if second is None:  # it worked once: a failure now is not the model's missing derivative
                raise RuntimeError(f"{name} failed on its second product: {failed[name]}")
            raise_if_random(first[0], second[0], determinism_rtol(op.model_dtype))
            reference_name, reference = name, second[0]
            figures[name] = (first[1], second[1], 0.0)
            break
        if reference_name is None:
            raise MissingSecondDerivativeError("no Hessian-vector product method works on this model: "
                                               + "; ".join(f"{m}: {e}" for m, e in failed.items()))
        for name in methods:
            if name in figures or name in failed:
                continue
            if name == "double_backward" and "reuse_graph" in figures:
                first, _, error = figures["reuse_graph"]
                figures[name] = (first, first, error)  # the same computation as reuse_graph's first product
                continue
            fits = op.reuse_graph_fits
            ran = _timed(op, name, x, failed)
            if ran is None:
                continue
            if name == "reuse_graph":
                # Decided together: a rank whose graphs did not fit makes double backward run its own product.
                if op.collective.any(fits and not op.reuse_graph_fits):
                    failed[name] = "its graphs do not fit in memory"
                    continue
                steady = _timed(op, name, x, failed)
                figures[name] = (ran[1], steady[1] if steady else ran[1], _relative_error(ran[0], reference))
            else:
                figures[name] = (ran[1], ran[1], _relative_error(ran[0], reference))
    names = [reference_name, *(m for m in ORDER if m in figures and m != reference_name)]
    # The slowest rank's times and the largest errors (every rank timed the same methods), so all choose alike.
    table = op.collective.maximum(torch.tensor([figures[m] for m in names], dtype=torch.float64)).tolist()
    timings = {m: MethodTiming(*row) for m, row in zip(names, table)}
    method = cheapest_method(timings, products=products)
    op.method = method
    return MethodChoice(method, timings, failed, op.n_matvecs - before)
