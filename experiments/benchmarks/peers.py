"""The top Hessian eigenvalue by peer libraries, each behind one adapter that counts its products.

Each adapter takes ``(model, loss_fn, chunks, *, tol, max_iter, seed)``, where
``loss_fn(outputs, targets)`` is the *mean* loss of a chunk and ``chunks`` is a
list of ``(inputs, targets)``; every adapter gives its peer the Hessian of
the same full-batch loss as :func:`eos_toolkit.hvp.hessian_operator`::

    L(theta) = sum_c (n_c / N) loss_fn(model(x_c), y_c),   N = sum_c n_c

and returns a :class:`PeerResult`, or ``None`` when the peer is not
importable (:func:`peer_availability` says why).  Products are counted inside
the peer's own operator, never inferred from an iteration count: a product is
one Hessian-vector product over *all* chunks.

========================  =====================================================
adapter                   the peer's solver, and what is counted
========================  =====================================================
``pyhessian_power``       PyHessian ``hessian(...).eigenvalues(top_n=1)``: power
                          iteration, stops when the estimate changes by less than
                          ``tol`` (relative) between two products.  One chunk goes
                          in as ``data=`` (its graph is built once and reused),
                          several as ``dataloader=``.  Counted: calls of its
                          ``hessian_vector_product`` (one chunk) or of
                          ``hessian.dataloader_hv_product`` (several).
``eigenthings_lanczos``   hessian-eigenthings ``lanczos(k=1, which="LA")``.  It
                          runs exactly ``max_iter`` steps and only *reports*
                          convergence (Ritz residual ``< tol |lambda|``); the
                          adapter starts at its default Krylov size (2 for k=1)
                          and doubles it, fresh each time, until it reports
                          convergence or reaches ``max_iter``.  Counted: calls of
                          ``HessianOperator.matvec``, over all those runs.
``eigenthings_power``     hessian-eigenthings ``power_iteration_one``: stops when
                          both the relative change and the relative residual are
                          below ``tol``; largest *magnitude*.  Counted as above.
``curvlinops_eigsh``      curvlinops ``HessianLinearOperator`` exported with
                          ``to_scipy()`` to ``scipy.sparse.linalg.eigsh(k=1,
                          which="LA", tol=tol)`` (ARPACK, implicitly restarted
                          Lanczos, float64 vectors, float32 products for a
                          float32 model).  Counted: columns multiplied by the
                          operator's ``_matmat``.
========================  =====================================================

Seconds are wall time from building the peer's operator to its answer (a
PyHessian ``data=`` build includes the forward pass and the graph of the
gradient); ``setup_seconds`` is the building part.  Each adapter leaves the
model as it found it: parameter gradients and module train/eval modes are
restored (PyHessian writes gradients carrying a graph and switches the model
to eval mode).

The peers are optional and are not dependencies of the toolkit::

    pip install "eos-toolkit[bench]"                 # pyhessian, hessian-eigenthings, curvlinops' own needs
    pip install --no-deps curvlinops-for-pytorch     # without its backpack-for-pytorch (pulls torchvision)

Example::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> chunks = [(torch.randn(20, 3), torch.randn(20, 2))]
    >>> sorted(peer_availability()) == sorted(PEERS)
    True
    >>> result = PEERS["pyhessian_power"].run(model, torch.nn.functional.mse_loss, chunks, tol=1e-3,
    ...                                       max_iter=50, seed=0)
    >>> result is None or result.products >= 1
    True
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from experiments.benchmarks.timing import Stopwatch


@dataclass
class PeerResult:
    """One peer's answer: the top eigenvalue, the products and wall seconds it took, and why it stopped.

    ``converged`` is the peer's own verdict (PyHessian and hessian-eigenthings'
    power iteration: its stopping rule fired before ``max_iter``;
    hessian-eigenthings' Lanczos: its reported ``converged`` flag; eigsh: ARPACK
    did not raise ``ArpackNoConvergence``).  ``stop_reason`` says the same in a
    few words.  ``seconds`` includes ``setup_seconds``.
    """

    name: str
    eigenvalue: float
    products: int
    seconds: float
    converged: bool
    stop_reason: str
    setup_seconds: float = 0.0


@dataclass(frozen=True)
class Peer:
    """A peer library's solver: its row label, the module it needs, how to install it, and its adapter."""

    name: str
    label: str
    module: str
    install: str
    run: Callable[..., PeerResult | None]
    takes_start: bool  # accepts ``v0`` (a warm start)


# -- shared checks and helpers -----------------------------------------------------------

def _check_inputs(model: nn.Module, chunks, tol: float, max_iter: int) -> list[tuple]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameter with requires_grad=True")
    chunks = list(chunks)
    if not chunks:
        raise ValueError("chunks is empty: pass a list of (inputs, targets)")
    for i, chunk in enumerate(chunks):
        if not (isinstance(chunk, (tuple, list)) and len(chunk) == 2):
            raise ValueError(f"chunk {i} must be an (inputs, targets) pair, got {type(chunk).__name__}")
        if not isinstance(chunk[1], torch.Tensor) or chunk[1].dim() == 0:
            raise ValueError(f"chunk {i}: targets must be a tensor with a leading batch dimension")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    return chunks


def _refuse_start(v0, solver: str) -> None:
    """Raise where a start vector is given to a solver that cannot take one."""
    if v0 is not None:
        raise ValueError(f"{solver} takes no start vector; pass v0=None")


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _forward(model: nn.Module, inputs):
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _start_vector(dim: int, seed: int, v0, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``v0`` flattened (a warm start), else a seeded Gaussian vector; drawn on the CPU so every peer gets the same one."""
    if v0 is not None:
        v = v0.reshape(-1) if v0.dim() == 1 else v0.reshape(dim, -1).sum(1)
        if v.shape[0] != dim:
            raise ValueError(f"v0 has {v.shape[0]} entries, the model has {dim} parameters")
        return v.to(dtype=dtype, device=device)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype=dtype,
                                                                                                      device=device)


@contextlib.contextmanager
def _model_left_as_found(model: nn.Module):
    """Restore parameter gradients and module train/eval flags on exit."""
    grads = [(p, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, g in grads:
            p.grad = g
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# -- PyHessian ---------------------------------------------------------------------------

def pyhessian_power(model: nn.Module, loss_fn: Callable, chunks: Sequence, *, tol: float = 1e-3,
                    max_iter: int = 100, seed: int = 0, v0=None) -> PeerResult | None:
    """PyHessian's power iteration (``hessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)``).

    Its rule: stop when ``|lambda_prev - lambda| / (|lambda_prev| + 1e-6) < tol``
    for two successive estimates; it then returns ``lambda_prev``, the
    estimate *before* the last product.  Its start vector comes from torch's
    global generator, seeded here inside ``torch.random.fork_rng`` (the
    caller's random state is untouched).  It draws vectors in torch's default
    dtype, so the default dtype is set to the model's for the call.  One chunk
    is passed as ``data`` (a mean loss as given); several as ``dataloader``,
    whose products it weights by chunk size (``sum_c n_c H_c / N``: the same
    full-batch mean).
    """
    module = _import("pyhessian.hessian")
    if module is None:
        return None
    chunks = _check_inputs(model, chunks, tol, max_iter)
    _refuse_start(v0, "PyHessian's eigenvalues()")
    params = _params(model)
    device = params[0].device
    last: collections.deque = collections.deque(maxlen=2)  # (Hv, v) of the last two products, kept by reference
    estimates: list[float | None] = []
    original_hvp = module.hessian_vector_product

    def counted_hvp(gradsH, params, v):
        hv = original_hvp(gradsH, params, v)
        estimates.append(None)
        last.append((hv, v))
        return hv

    class CountedHessian(module.hessian):
        def dataloader_hv_product(self, v):
            value, hv = super().dataloader_hv_product(v)
            estimates.append(value)
            return value, hv

    data = {"data": chunks[0]} if len(chunks) == 1 else {"dataloader": chunks}
    devices = [device] if device.type == "cuda" else []
    with _model_left_as_found(model), _default_dtype(params[0].dtype), \
            torch.random.fork_rng(devices=devices), \
            _patched(module, "hessian_vector_product", counted_hvp), warnings.catch_warnings():
        # Its graph of the gradient lives in .grad, which torch warns about; the grads are restored on exit.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seed)
        with Stopwatch(device) as clock:
            peer = CountedHessian(model, loss_fn, cuda=device.type == "cuda", **data)
            setup = clock.lap()
            values, _ = peer.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        del peer
    if estimates and estimates[-1] is None:  # one chunk: the last two estimates, computed after the timing
        for i, (hv, v) in zip(range(len(estimates) - len(last), len(estimates)), last):
            estimates[i] = float(sum((a * b).sum() for a, b in zip(hv, v)))
    fired = _pyhessian_rule_fired(estimates, tol)
    reason = f"change < tol at product {len(estimates)}" if fired else f"maxIter={max_iter} reached"
    return PeerResult("pyhessian power", float(values[0]), len(estimates), clock.seconds, fired, reason, setup)


def _pyhessian_rule_fired(estimates: list[float], tol: float) -> bool:
    """Whether PyHessian's relative-change test passed on its last two estimates (it stopped by its rule)."""
    if len(estimates) < 2:
        return False
    prev, last = estimates[-2], estimates[-1]
    return abs(prev - last) / (abs(prev) + 1e-6) < tol


@contextlib.contextmanager
def _patched(module, name: str, replacement):
    saved = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, saved)


# -- hessian-eigenthings -----------------------------------------------------------------

def _eigenthings_operator(he, model: nn.Module, loss_fn: Callable, chunks):
    """Its ``HessianOperator`` over the chunks, with ``matvec`` counted.

    Its full-dataset product averages the chunks' Hessians with *equal*
    weights (``sum_c H_c / C``); each chunk carries the scale ``C n_c / N`` of
    its loss (exactly 1 for equal chunks), so that the average is the
    size-weighted full-batch mean.
    """
    sizes = [chunk[1].shape[0] for chunk in chunks]
    batches = [(inputs, targets, len(chunks) * n / sum(sizes)) for (inputs, targets), n in zip(chunks, sizes)]

    def batch_loss(model, batch):
        inputs, targets, scale = batch
        loss = loss_fn(_forward(model, inputs), targets)
        return loss if scale == 1.0 else loss * scale

    class CountedHessianOperator(he.HessianOperator):
        products = 0

        def matvec(self, v):
            self.products += 1
            return super().matvec(v)

    return CountedHessianOperator(model, batches, batch_loss)


def eigenthings_lanczos(model: nn.Module, loss_fn: Callable, chunks: Sequence, *, tol: float = 1e-3,
                        max_iter: int = 100, seed: int = 0, v0=None,
                        first_size: int | None = None) -> PeerResult | None:
    """hessian-eigenthings' ``lanczos(k=1, which="LA", tol=tol)``, Krylov size doubled until it reports convergence.

    Its ``lanczos`` always takes ``max_iter`` steps (default ``min(2k, n-1)``)
    and reports ``converged`` when the Ritz residual ``|beta_m s_m| < tol
    |lambda|``; it has no early stop and no start vector (``seed`` picks its
    random one).  The adapter runs it with ``first_size`` steps (default its
    own default, 2), then 4, 8, ... (capped at ``max_iter``) until it reports
    convergence; every run starts afresh and every product is counted.
    ``first_size=max_iter`` is one fixed-size run.  Full
    reorthogonalisation is its default (on up to 50 steps, off above).
    """
    he = _import("hessian_eigenthings")
    if he is None:
        return None
    chunks = _check_inputs(model, chunks, tol, max_iter)
    _refuse_start(v0, "hessian-eigenthings' lanczos()")
    device = _params(model)[0].device
    with _model_left_as_found(model), Stopwatch(device) as clock:
        op = _eigenthings_operator(he, model, loss_fn, chunks)
        setup = clock.lap()
        n = op.size
        size = min(first_size or min(2, n - 1), max_iter, n) if n > 1 else 1
        if size < 1:
            raise ValueError(f"first_size must be >= 1, got {first_size!r}")
        sizes = []
        while True:
            result = he.lanczos(op, k=1, max_iter=size, tol=tol, which="LA", seed=seed)
            sizes.append(size)
            converged = bool(result.converged[0])
            if converged or size >= min(max_iter, n):
                break
            size = min(2 * size, max_iter, n)
    runs = "+".join(str(s) for s in sizes)
    reason = f"residual < tol, sizes {runs}" if converged else f"max_iter={max_iter} reached, sizes {runs}"
    return PeerResult("eigenthings lanczos", float(result.eigenvalues[0]), op.products, clock.seconds, converged,
                      reason, setup)


def eigenthings_power(model: nn.Module, loss_fn: Callable, chunks: Sequence, *, tol: float = 1e-3,
                      max_iter: int = 100, seed: int = 0, v0=None) -> PeerResult | None:
    """hessian-eigenthings' ``power_iteration_one(max_iter, tol)``, started from ``v0`` or a seeded vector.

    Its rule: stop when the relative change of the Rayleigh quotient *and* the
    relative residual ``|A v - lambda v| / |lambda|`` are both below ``tol``
    (not tested on the first product).  It finds the eigenvalue of largest
    *magnitude*, which on an indefinite Hessian can be a negative one.
    """
    he = _import("hessian_eigenthings")
    if he is None:
        return None
    chunks = _check_inputs(model, chunks, tol, max_iter)
    params = _params(model)
    device = params[0].device
    with _model_left_as_found(model), Stopwatch(device) as clock:
        op = _eigenthings_operator(he, model, loss_fn, chunks)
        setup = clock.lap()
        init = _start_vector(op.size, seed, v0, op.dtype, device)
        value, _, _, iterations, converged = he.power_iteration_one(op, max_iter=max_iter, tol=tol, init=init)
    if iterations != op.products:
        raise RuntimeError(f"hessian-eigenthings reported {iterations} iterations but its operator "
                           f"computed {op.products} products")
    reason = (f"change and residual < tol at product {op.products}" if converged
              else f"max_iter={max_iter} reached")
    return PeerResult("eigenthings power", float(value), op.products, clock.seconds, bool(converged), reason, setup)


# -- curvlinops + scipy eigsh -------------------------------------------------------------

class _MeanReducedLoss(nn.Module):
    """A loss callable as the module curvlinops wants: it reads ``reduction`` to weight chunks."""

    reduction = "mean"

    def __init__(self, loss_fn: Callable):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, outputs, targets):
        return self.loss_fn(outputs, targets)


def curvlinops_eigsh(model: nn.Module, loss_fn: Callable, chunks: Sequence, *, tol: float = 1e-3,
                     max_iter: int = 100, seed: int = 0, v0=None, ncv: int | None = None,
                     check_deterministic: bool = False) -> PeerResult | None:
    """``scipy.sparse.linalg.eigsh(k=1, which="LA", tol=tol)`` on curvlinops' ``HessianLinearOperator``.

    curvlinops weights each chunk by ``n_c / N`` when the loss module's
    ``reduction`` is ``"mean"`` and by 1 for ``"sum"``; ``loss_fn`` is wrapped
    as a module with ``reduction = "mean"`` (an ``nn.Module`` loss that has a
    ``reduction`` is used as it is).  ARPACK's ``tol`` is the relative
    accuracy of the Ritz value (``0``: machine precision); its ``maxiter``
    counts restarts, so ``max_iter`` products become ``ceil(max_iter / (ncv -
    1))`` restarts: a cap on products up to one restart.  ``ncv`` (the
    Lanczos basis size, at least ``ncv`` products) is scipy's default for k=1,
    ``min(n, 20)``, lowered to ``max_iter`` when that is smaller.  ``check_deterministic`` is curvlinops'
    construction-time probe (two passes over the data for loss and gradient,
    two products, counted), off by default here; ``num_data`` is given, so
    building the operator does not traverse the data.
    """
    curvlinops = _import("curvlinops")
    if curvlinops is None:
        return None
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    chunks = _check_inputs(model, chunks, tol, max_iter)
    params = _params(model)
    device = params[0].device
    loss_module = loss_fn if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction") \
        else _MeanReducedLoss(loss_fn)

    class CountedHessianLinearOperator(curvlinops.HessianLinearOperator):
        products = 0

        def _matmat(self, M):
            self.products += M[0].shape[-1]
            return super()._matmat(M)

    n = sum(p.numel() for p in params)
    ncv = ncv or max(2, min(n, 20, max_iter))
    if not 2 <= ncv <= n:
        raise ValueError(f"ncv must lie in [2, n={n}], got {ncv}")
    with _model_left_as_found(model), Stopwatch(device) as clock:
        op = CountedHessianLinearOperator(model, loss_module, params, chunks, check_deterministic=check_deterministic,
                                          num_data=sum(chunk[1].shape[0] for chunk in chunks))
        setup = clock.lap()
        start_vector = _start_vector(n, seed, v0, torch.float64, torch.device("cpu")).numpy()
        restarts = max(1, math.ceil(max_iter / (ncv - 1)))
        try:
            values = eigsh(op.to_scipy(dtype=np.float64), k=1, which="LA", tol=tol, v0=start_vector, ncv=ncv,
                           maxiter=restarts, return_eigenvectors=False)
            converged, reason = True, f"ARPACK converged after {op.products} products"
        except ArpackNoConvergence as err:
            values = err.eigenvalues
            converged, reason = False, f"ARPACK maxiter={restarts} restarts reached"
    value = float(values[0]) if len(values) else float("nan")
    return PeerResult("curvlinops eigsh", value, op.products, clock.seconds, converged, reason, setup)


PEERS: dict[str, Peer] = {
    "pyhessian_power": Peer("pyhessian_power", "pyhessian power", "pyhessian",
                            "pip install pyhessian", pyhessian_power, takes_start=False),
    "eigenthings_lanczos": Peer("eigenthings_lanczos", "eigenthings lanczos", "hessian_eigenthings",
                                "pip install hessian-eigenthings", eigenthings_lanczos, takes_start=False),
    "eigenthings_power": Peer("eigenthings_power", "eigenthings power", "hessian_eigenthings",
                              "pip install hessian-eigenthings", eigenthings_power, takes_start=True),
    "curvlinops_eigsh": Peer("curvlinops_eigsh", "curvlinops eigsh", "curvlinops",
                             "pip install einops einconv linear_operator tqdm && "
                             "pip install --no-deps curvlinops-for-pytorch", curvlinops_eigsh, takes_start=True),
}


def peer_availability() -> dict[str, str | None]:
    """Each peer's name -> ``None`` when it imports, else why not and how to install it."""
    found: dict[str, str | None] = {}
    for name, peer in PEERS.items():
        try:
            importlib.import_module(peer.module)
        except ImportError as err:  # also an installed peer whose own imports fail (a dependency left out)
            found[name] = f"{peer.module} is not importable ({type(err).__name__}: {err}); {peer.install}"
        else:
            found[name] = None
    return found


def peer_versions() -> dict[str, str]:
    """Installed distribution version of each importable peer (for the benchmark header)."""
    from importlib.metadata import PackageNotFoundError, version

    dists = {"pyhessian": "pyhessian", "hessian_eigenthings": "hessian-eigenthings",
             "curvlinops": "curvlinops-for-pytorch"}
    out = {}
    for name, reason in peer_availability().items():
        if reason is None:
            module = PEERS[name].module
            try:
                out[name] = version(dists[module])
            except PackageNotFoundError:
                out[name] = "unknown version"
    return out


def best_accurate(rows: dict[str, tuple[float, float, float]], target: float = 1e-3) -> str | None:
    """The name of the fastest row among those within ``target`` relative error (``None`` if none is).

    ``rows``: name -> ``(products, seconds, relative error)``.  Ties in
    seconds go to fewer products, then to the name.  A NaN error never counts
    as accurate.
    """
    accurate = [(seconds, products, name) for name, (products, seconds, error) in rows.items()
                if error <= target]
    return min(accurate)[2] if accurate else None


def ratios(rows: dict[str, tuple[float, float, float]], best: str | None) -> dict[str, tuple[float, float]]:
    """name -> ``(products / best's products, seconds / best's seconds)``; NaN without a best row."""
    if best is None:
        return {name: (float("nan"), float("nan")) for name in rows}
    best_products, best_seconds, _ = rows[best]
    return {name: (products / best_products if best_products else float("nan"),
                   seconds / best_seconds if best_seconds else float("nan"))
            for name, (products, seconds, _) in rows.items()}
