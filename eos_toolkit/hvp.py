"""Hessian-vector products of a model's loss, as a linear operator on a flat vector.

The operator represents ``H = d^2 L / d theta^2`` at the model's *current*
parameters (read afresh at every product, so one operator follows training),
where ``L`` is the size-weighted mean loss over a fixed list of chunks::

    L(theta) = sum_c (n_c / N) loss_fn(model(x_c; theta), y_c),   N = sum_c n_c

``loss_fn`` returns the *mean* loss of a chunk and ``n_c`` is the leading
dimension of the chunk's targets, so ``L`` equals the full-batch mean loss no
matter how the data are split -- for a loss that is an unweighted mean over
that dimension.  A loss with another normaliser (class-weighted
cross-entropy, ``ignore_index`` or masked tokens, label smoothing with class
weights) divides by a chunk-dependent sum ``d_c``; pass
``chunk_weights = [d_c]`` (any positive numbers proportional to each chunk's
normaliser) and ``L = sum_c (d_c / D) loss_c`` is again the full-batch loss.
Without them, an operator over several chunks checks on construction that
the loss of a chunk equals the size-weighted mean of the losses of its halves
(two splits) and refuses a loss that is not, with a clear error.  ``theta`` is the selected parameters flattened
in ``model.named_parameters()`` order; :meth:`HessianOperator.flatten` and
:meth:`HessianOperator.unflatten` convert between that flat vector and
parameter-shaped tensors.

Four ways to compute ``H v``:

* ``"forward_over_reverse"`` (default): ``torch.func.jvp`` of
  ``torch.func.grad`` over ``torch.func.functional_call``; ``matmat`` vmaps it.
* ``"double_backward"``: ``torch.autograd.grad`` of the gradient with
  ``create_graph=True``; one forward/backward per chunk serves every column.
* ``"reuse_graph"``: the same products, but inside
  :meth:`HessianOperator.measurement` each chunk's gradient graph is built
  once and every product is one backward of ``<g, v>`` through it (about
  1.2 gradients a product instead of 2-3).  Memory: the graphs of *all*
  chunks are held together for the whole measurement, roughly twice the
  activation memory of one forward pass over the entire measurement set
  (the other methods hold one chunk's at a time).  When building them runs
  out of memory the operator frees them, warns, and uses
  ``"double_backward"`` from then on.  Outside a measurement each call
  builds and drops its own graphs (the cost of ``"double_backward"``);
  if a parameter or buffer changes in place inside one, the graphs are
  rebuilt (their version counters are compared at every product).
* ``"finite_difference"``: ``(g(theta + h v) - g(theta - h v)) / (2 h)``; needs
  first derivatives only.  The perturbation ``h v`` has norm
  ``eps^(1/3) max(1, rms(theta))`` for the model dtype's ``eps``: the step
  that balances the O(h^2) truncation error against the O(eps / h) rounding
  error of the gradient difference, with the scale of a *typical coordinate*
  (the root mean square of theta), not of the whole vector, whose norm grows
  with the parameter count.  Expected accuracy on lambda_1: about 1e-5
  relative in float32 (tanh MLPs, |theta| up to 16), about 1e-10 in float64;
  the two autodiff methods are exact to rounding, so prefer them for float32
  models.

Module modes are fixed during every product and restored afterwards: the whole
model is put in eval mode (dropout off) except BatchNorm layers, which use
either their running statistics (``bn_mode="eval"``) or the chunk's batch
statistics (``bn_mode="batch_stats"``) with ``track_running_stats`` switched
off, so running statistics are never updated (each chunk is then normalised
with its own statistics, as in training on those batches, so in that mode the
operator depends on how the data are chunked).  ``dropout="as_is"`` leaves
every non-BatchNorm module in the mode the caller set (for studying a
stochastic operator); :func:`hessian_operator` then runs
:meth:`HessianOperator.check_determinism` by default, which raises when
dropout (or any noise) is really on: a random operator must be asked for
explicitly with ``determinism_probe=False``.

Data sharded over processes (``torch.distributed``): pass ``process_group``
(e.g. ``torch.distributed.group.WORLD``) and give each rank only its own
chunks.  The weights become global (``n_c / N`` with ``N`` summed over every
rank's chunks, one all-reduce at construction) and every product ends with
one all-reduce of the rank's weighted sum, so each rank holds the product of
the full-data Hessian.  The solvers then run unchanged on every rank, on
identical vectors (identically seeded generators and identical products), so
no vector is ever gathered; every rank must therefore call the same products
in the same order (the solvers' stop decisions go through
:meth:`HessianOperator.agree`, so they do).  ``debug_replicated=True`` (or
``EOS_DEBUG_DISTRIBUTED=1`` in the environment of any rank) checks at every
product, with one more small
all-reduce, that all ranks passed the same vector, and raises where they
did not.

Fused kernels without second derivatives (flash / memory-efficient scaled
dot-product attention, cuDNN and oneDNN RNNs) are detected on the first
failing product; the operator then switches, with a warning, to the math
attention kernel and plain RNN kernels, and raises an error naming the
alternatives if that is not enough.

Example::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> op = hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)])
    >>> op.matvec(torch.randn(op.dim)).shape == (op.dim,)
    True
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

METHODS = ("forward_over_reverse", "double_backward", "reuse_graph", "finite_difference")
AUTO = "auto"  # a tracker's choice among METHODS by timing (MethodTrial, on its first measurement)
AUTO_RTOL = 1e-5  # a method is eligible for "auto" when its product agrees with forward-over-reverse to this
AUTO_PRODUCTS_PER_MEASUREMENT = 10  # what "auto" amortises reuse_graph's graph building over
BN_MODES = ("eval", "batch_stats")
DROPOUT_MODES = ("off", "as_is")

# Messages torch raises when an op lacks forward-mode AD or a double backward.
_MISSING_DERIVATIVE = re.compile(
    r"forward AD|derivative for .* is not implemented|double backward|cudnn RNN backward"
    r"|not implemented for .*backward",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class MethodTiming:
    """One method's timing on the real operator (:class:`MethodTrial`)."""

    first_seconds: float  # the first product: includes one-off work (reuse_graph builds its graphs here)
    product_seconds: float  # a later product: the steady cost (seconds per column of a block)
    relative_error: float  # |H v - H v (forward-over-reverse)| / |H v (forward-over-reverse)|


def choose_method(timings: dict[str, MethodTiming], *, products: int = AUTO_PRODUCTS_PER_MEASUREMENT,
                  rtol: float = AUTO_RTOL) -> str:
    """The cheapest method per measurement among those that agree with forward-over-reverse to ``rtol``.

    Cost of a measurement of ``products`` products: ``products x product_seconds``,
    plus, for ``"reuse_graph"``, its graph building (``first - product``
    seconds), which it repeats every measurement; the other methods' one-off
    costs (tracing, allocator warm-up) are paid once per run and ignored.
    Ties go to the earlier method in :data:`METHODS`.  Deterministic in its
    inputs (tests inject timings).
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


class NondeterministicOperatorError(RuntimeError):
    """Two products with the same vector disagree: the operator is random (dropout, noise layers)."""


class MissingSecondDerivativeError(RuntimeError):
    """An operation in the model has no second derivative for the chosen HVP method."""


def _chunk_size(targets: torch.Tensor) -> int:
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        raise ValueError("each chunk's targets must be a tensor with a leading batch dimension")
    return targets.shape[0]


def _as_args(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _first(inputs):
    """The first example of a chunk's inputs (a tensor or a tuple of them), keeping the batch dimension."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_first(i) for i in inputs)
    return inputs


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj


def select_parameters(model: nn.Module, params=None) -> list[str]:
    """Names of the parameters an operator differentiates, in ``named_parameters()`` order.

    ``params`` is None (every parameter with ``requires_grad``), a list of names,
    or a predicate ``f(name, parameter) -> bool`` (e.g. one layer's weights for
    per-layer sharpness).
    """
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif callable(params):
        names = [n for n, p in named.items() if params(n, p)]
    else:
        wanted = list(params)
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(named)}")
        names = [n for n in named if n in set(wanted)]
    if not names:
        raise ValueError("no parameters selected: params matched nothing")
    return names


@contextlib.contextmanager
def module_mode(model: nn.Module, bn_mode: str = "eval", dropout: str = "off"):
    """Fix module modes for a Hessian computation and restore them on exit.

    Everything goes to eval mode (``dropout="off"``) or keeps its mode
    (``dropout="as_is"``); BatchNorm layers use running statistics
    (``bn_mode="eval"``) or batch statistics without updating the running ones
    (``bn_mode="batch_stats"``).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.training = bn_mode == "batch_stats"
                if bn_mode == "batch_stats":
                    m.track_running_stats = False  # batch statistics, running buffers untouched
            elif dropout == "off":
                m.training = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


@contextlib.contextmanager
def _plain_kernels():
    """Math attention, cuDNN and oneDNN off: kernels whose derivatives are all implemented."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # oneDNN's TF32 notice on CPU builds
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
            yield


class HessianOperator:
    """``v -> H v`` for the Hessian of a model's mean loss over fixed data chunks.

    Build it with :func:`hessian_operator`.  Attributes: ``dim`` (number of
    selected scalars), ``dtype`` (the arithmetic dtype of vectors in and out;
    products are computed in the model's dtype and accumulated in this one),
    ``device``, ``names`` (selected parameter names), ``n_matvecs`` (products
    computed so far; a ``matmat`` with ``b`` columns counts ``b``).
    """

    def __init__(self, model, loss_fn, batches, names, *, method, bn_mode, dropout, dtype,
                 matmat_chunk_size, chunk_weights=None, process_group=None, debug_replicated=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
        if matmat_chunk_size is not None and matmat_chunk_size < 1:
            raise ValueError(f"matmat_chunk_size must be >= 1 or None, got {matmat_chunk_size}")
        batches = list(batches)
        if not batches:
            raise ValueError("batches is empty: pass a list of (inputs, targets) chunks")
        self.model, self.loss_fn = model, loss_fn
        self.method, self.bn_mode, self.dropout = method, bn_mode, dropout
        self.matmat_chunk_size = matmat_chunk_size
        self.names = list(names)
        named = dict(model.named_parameters())
        self._params = [named[n] for n in self.names]
        selected = set(self.names)
        self._frozen = {n: p for n, p in named.items() if n not in selected}  # live, held fixed
        self.shapes = [p.shape for p in self._params]
        self.numels = [p.numel() for p in self._params]
        self.dim = sum(self.numels)
        self.device = self._params[0].device
        self.model_dtype = self._params[0].dtype
        self.dtype = dtype or self.model_dtype
        self.batches = [(_to_device(x, self.device), _to_device(y, self.device)) for x, y in batches]
        if chunk_weights is None:
            sizes = [_chunk_size(y) for _, y in self.batches]
        else:
            sizes = [float(w) for w in chunk_weights]
            if len(sizes) != len(self.batches) or not all(math.isfinite(w) and w >= 0 for w in sizes) \
                    or sum(sizes) <= 0:
                raise ValueError(f"chunk_weights must be {len(self.batches)} finite numbers >= 0 with a "
                                 f"positive sum (one per chunk), got {list(chunk_weights)!r}")
        self.process_group = process_group
        debug = (os.environ.get("EOS_DEBUG_DISTRIBUTED", "") not in ("", "0")
                 if debug_replicated is None else debug_replicated)
        total, n_chunks = sum(sizes), len(self.batches)
        if process_group is not None:
            # One all-reduce: the global normaliser, the global chunk count, and whether any rank asked
            # for the debug check (every rank must run the same collectives).
            agreed = self._all_reduce(torch.tensor([float(total), float(n_chunks), float(debug)], dtype=torch.float64))
            total, n_chunks, debug = agreed.tolist()  # sync: once, at construction
        self.debug_replicated = bool(debug)
        self.chunk_weights = [s / total for s in sizes]
        self.n_matvecs = 0
        self.failed_methods: dict[str, str] = {}  # MethodTrial: the methods that failed on this model, and why
        self.derived_methods: dict[str, str] = {}  # MethodTrial: a method timed by another's product (no run)
        self._plain_kernels = False
        self._measuring = 0  # depth of nested measurement() blocks
        self._graphs = None  # reuse_graph: (versions, [(leaves, grads, live, weight) per chunk])
        self._reuse_fits = True  # False once building the graphs ran out of memory
        if chunk_weights is None and n_chunks > 1:
            self._check_mean_reduction_everywhere()

    def _check_mean_reduction_everywhere(self) -> None:
        """:meth:`_check_mean_reduction` on this rank; with a process group, every rank raises if any fails."""
        try:
            self._check_mean_reduction()
            failure = None
        except ValueError as err:
            failure = err
        if self.process_group is None:
            if failure is not None:
                raise failure
            return
        failed = self._all_reduce(torch.tensor([float(failure is not None)], dtype=torch.float64))
        if failure is not None:
            raise failure
        if float(failed) > 0:  # sync: once, at construction
            raise ValueError(f"another rank's chunks show that loss_fn is not an unweighted mean over the targets' "
                             "leading dimension (its error names the chunk); pass chunk_weights")

    def _check_mean_reduction(self) -> None:
        """Refuse a loss that is not an unweighted mean over the targets' leading dimension.

        Checked on random outputs (shaped like the model's output for one
        example; one forward pass of one example), so the answer does not
        depend on the current parameters (at a zero read-out every example's
        loss is equal and any weighting would pass): in every chunk the loss
        must equal the mean of its examples' losses, and one example from each
        chunk, taken together, must give the mean of their losses (a normaliser
        that differs between chunks). Raises when the outputs are not indexed
        by example, since then nothing can be checked: pass ``chunk_weights``.
        """
        x0, y0 = self.batches[0]
        with torch.no_grad(), module_mode(self.model, self.bn_mode, "off"):
            out = self.model(*_as_args(_first(x0)))
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 1:
            raise ValueError("cannot check that loss_fn is a mean over examples: the model's output is not a tensor "
                             "indexed by example; pass chunk_weights (each chunk's share of the loss's normaliser)")
        g = torch.Generator(device="cpu").manual_seed(0)
        eps = torch.finfo(out.dtype).eps

        def random_outputs(n: int) -> torch.Tensor:
            return (3 * torch.randn((n, *out.shape[1:]), generator=g, dtype=torch.float64)).to(out)

        def losses(o, y) -> tuple[torch.Tensor, torch.Tensor]:
            each = torch.stack([self.loss_fn(o[i:i + 1], y[i:i + 1]).double() for i in range(len(y))])
            return self.loss_fn(o, y).double(), each

        picked_out, picked_y, picked_losses = [], [], []
        for c, (_, y) in enumerate(self.batches):
            o = random_outputs(_chunk_size(y))
            whole, each = losses(o, y)
            checks = [(whole, each.mean(), f"chunk {c}")]
            picked_out.append(o[:1])
            picked_y.append(y[:1])
            picked_losses.append(each[0])
            if c == len(self.batches) - 1:
                together = self.loss_fn(torch.cat(picked_out), torch.cat(picked_y)).double()
                checks.append((together, torch.stack(picked_losses).mean(), "one example of each chunk"))
            for got, mean, where in checks:
                gap, scale = float((got - mean).abs()), float(mean.abs()) + 1e-30  # sync: once, at construction
                if not gap <= 1e3 * eps * scale:
                    raise ValueError(
                        f"loss_fn is not an unweighted mean over the targets' leading dimension ({where}: the loss "
                        f"is {float(got):.6g} but its examples' losses average to {float(mean):.6g}): a "
                        "class-weighted loss, ignore_index or masked targets divide by a chunk-dependent "
                        "normaliser, so weighting chunks by their size gives a wrong Hessian. Pass chunk_weights "
                        "(each chunk's normaliser, e.g. its sum of class weights or its count of non-ignored "
                        "targets), or one chunk.")

    # -- flat <-> parameter-shaped -------------------------------------------------
    @property
    def parameters(self) -> list[torch.Tensor]:
        """The selected live parameters, in flattening order."""
        return list(self._params)

    def flatten(self, tensors) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (list in order, or dict by name) into one vector of ``dtype``."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        tensors = list(tensors)
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, vec: torch.Tensor, dtype=None) -> list[torch.Tensor]:
        """Split a flat vector (or a ``(b, dim)`` block) into parameter-shaped views."""
        lead = vec.shape[:-1]
        if vec.shape[-1] != self.dim:
            raise ValueError(f"vector has {vec.shape[-1]} entries, the operator has dim {self.dim}")
        parts = torch.split(vec if dtype is None else vec.to(dtype), self.numels, dim=-1)
        return [p.reshape((*lead, *s)) for p, s in zip(parts, self.shapes)]  # () for a scalar parameter

    def flat_parameters(self) -> torch.Tensor:
        """Current values of the selected parameters as one vector of ``dtype``."""
        return self.flatten([p.detach() for p in self._params])

    # -- loss as a function of the selected parameters ---------------------------
    def _chunk_loss(self, selected: dict, inputs, targets) -> torch.Tensor:
        values = {n: p.detach() for n, p in self._frozen.items()}
        values.update(selected)
        outputs = functional_call(self.model, values, _as_args(inputs))
        return self.loss_fn(outputs, targets)

    def _primals(self) -> dict:
        return {n: p.detach() for n, p in zip(self.names, self._params)}

    # -- the three product rules, each on a (b, dim) block ------------------------
    def _forward_over_reverse(self, block: torch.Tensor) -> torch.Tensor:
        primals = self._primals()
        out = torch.zeros(block.shape, dtype=self.dtype, device=self.device)
        tangents = dict(zip(self.names, self.unflatten(block, self.model_dtype)))
        for (x, y), w in zip(self.batches, self.chunk_weights):
            if y.is_floating_point():
                # Floating targets enter the jvp as primals with a materialised zero tangent:
                # torch's forward-mode rule for mse_loss_backward fails on a target without one.
                grad_fn = grad(lambda p, t, x=x: self._chunk_loss(p, x, t))
                zero = torch.zeros_like(y)

                def hvp(v, grad_fn=grad_fn, y=y, zero=zero):
                    return jvp(grad_fn, (primals, y), (v, zero))[1]
            else:
                grad_fn = grad(lambda p, x=x, y=y: self._chunk_loss(p, x, y))

                def hvp(v, grad_fn=grad_fn):
                    return jvp(grad_fn, (primals,), (v,))[1]

            if block.shape[0] == 1:
                hv = hvp({n: t[0] for n, t in tangents.items()})
                flat = self.flatten(hv).unsqueeze(0)
            else:
                # randomness="different": a random model stays random; the probe reports it.
                hv = vmap(hvp, chunk_size=self.matmat_chunk_size, randomness="different")(tangents)
                flat = torch.cat([hv[n].reshape(block.shape[0], -1).to(self.dtype) for n in self.names], 1)
            out.add_(flat, alpha=w)
        return out

    def _chunk_graph(self, x, y, w) -> tuple:
        """One chunk's first-order graph: ``(leaves, live gradients, their indices, weight)``.

        Gradients that do not depend on the parameters (constant rows of H)
        are left out; a product backpropagates ``<g, v>`` through the rest.
        """
        leaves = [p.detach().requires_grad_(True) for p in self._params]
        with torch.enable_grad():
            loss = self._chunk_loss(dict(zip(self.names, leaves)), x, y)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        return leaves, [grads[i] for i in live], live, w

    def _through_graph(self, graph: tuple, tangents: list, out: torch.Tensor, *, keep: bool) -> None:
        """Add ``w H_c v`` for every column of the block to ``out``, one backward through ``graph`` each."""
        leaves, grads, live, w = graph
        for j in range(out.shape[0]):
            if not live:
                return
            hv = torch.autograd.grad(grads, leaves, grad_outputs=[tangents[i][j] for i in live],
                                     retain_graph=keep or j + 1 < out.shape[0], allow_unused=True,
                                     materialize_grads=True)
            out[j].add_(self.flatten(hv), alpha=w)

    def _double_backward(self, block: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(block.shape, dtype=self.dtype, device=self.device)
        tangents = self.unflatten(block, self.model_dtype)
        for (x, y), w in zip(self.batches, self.chunk_weights):
            self._through_graph(self._chunk_graph(x, y, w), tangents, out, keep=False)  # one chunk's graph at a time
        return out

    def _versions(self) -> tuple[int, ...]:
        """In-place version counters of every parameter and buffer: any optimizer step changes one.

        (Assigning ``p.data`` bypasses them: parameters must not change that way inside a measurement.)
        """
        return tuple(t._version for t in (*self.model.parameters(), *self.model.buffers()))

    def _build_graphs(self) -> list | None:
        """Every chunk's graph, or None (and the partial graphs freed) when they do not fit in memory."""
        graphs = []
        try:
            for (x, y), w in zip(self.batches, self.chunk_weights):
                graphs.append(self._chunk_graph(x, y, w))
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not isinstance(err, torch.OutOfMemoryError) and "can't allocate memory" not in str(err):
                raise
            reason = str(err).splitlines()[0]
        else:
            return graphs
        graphs.clear()  # outside the handler: the traceback no longer holds the partial graphs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._reuse_fits = False
        warnings.warn(f"reuse_graph: the gradient graphs of all {len(self.batches)} chunks do not fit in memory "
                      f"({reason}); using double_backward (one chunk's graph at a time) for this operator",
                      RuntimeWarning, stacklevel=5)
        return None

    def _reuse_graph(self, block: torch.Tensor) -> torch.Tensor:
        if not self._reuse_fits:
            return self._double_backward(block)
        versions = self._versions()
        if self._graphs is not None and self._graphs[0] == versions:
            graphs = self._graphs[1]
        else:
            self._graphs = None
            graphs = self._build_graphs()
            if graphs is None:
                return self._double_backward(block)
            if self._measuring:
                self._graphs = (versions, graphs)
        out = torch.zeros(block.shape, dtype=self.dtype, device=self.device)
        tangents = self.unflatten(block, self.model_dtype)
        for graph in graphs:
            self._through_graph(graph, tangents, out, keep=True)
        return out

    def drop_graphs(self) -> None:
        """Free reuse_graph's kept graphs now; the next product builds them again (inside a measurement too)."""
        self._graphs = None

    @contextlib.contextmanager
    def measurement(self):
        """A block of products at fixed parameters: ``"reuse_graph"`` keeps its graphs until the block ends.

        Other methods ignore it.  Nested blocks share the outer one's graphs;
        leaving the outermost frees them.
        """
        self._measuring += 1
        try:
            yield self
        finally:
            self._measuring -= 1
            if not self._measuring:
                self._graphs = None

    def _gradient(self, flat_theta: torch.Tensor) -> torch.Tensor:
        leaves = {n: t.detach().requires_grad_(True)
                  for n, t in zip(self.names, self.unflatten(flat_theta, self.model_dtype))}
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for (x, y), w in zip(self.batches, self.chunk_weights):
            with torch.enable_grad():
                loss = self._chunk_loss(leaves, x, y)
                g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                        materialize_grads=True)
            total.add_(self.flatten(g), alpha=w)
        return total

    def _finite_difference(self, block: torch.Tensor) -> torch.Tensor:
        theta = self.flat_parameters().to(self.model_dtype)
        eps = torch.finfo(self.model_dtype).eps
        rms = float(theta.norm()) / math.sqrt(self.dim)  # sync: the step size is a Python number
        out = torch.empty(block.shape, dtype=self.dtype, device=self.device)
        for j in range(block.shape[0]):
            v = block[j].to(self.model_dtype)
            vnorm = float(v.norm())  # sync: one per product
            if vnorm == 0.0:
                out[j].zero_()
                continue
            h = eps ** (1 / 3) * max(1.0, rms) / vnorm  # |h v| = eps^(1/3) max(1, rms(theta))
            g_plus = self._gradient(theta + h * v)
            g_minus = self._gradient(theta - h * v)
            out[j] = (g_plus - g_minus) / (2 * h)
        return out

    def _collective_device(self) -> torch.device:
        """Where this rank's collectives run: the CPU for gloo, else the operator's device.

        A group with a backend per device type (``"cpu:gloo,cuda:nccl"``, what
        ``experiments.distributed.setup`` makes where CUDA exists) takes
        tensors on either; an nccl-only group needs the operator on the GPU.
        """
        backend = torch.distributed.get_backend(self.process_group)
        return torch.device("cpu") if backend == "gloo" else self.device

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or ``op``) over the process group, in place when the tensor already lives where collectives run."""
        where = self._collective_device()
        buffer = tensor if tensor.device == where else tensor.to(where)
        torch.distributed.all_reduce(buffer, op=op or torch.distributed.ReduceOp.SUM, group=self.process_group)
        return buffer if buffer is tensor else buffer.to(tensor.device)

    def _check_replicated(self, block: torch.Tensor) -> None:
        """Raise unless every rank passed the same vectors (debug mode: one small all-reduce per product)."""
        b = block.to(torch.float64)
        stride = max(1, b.shape[-1] // 101)
        fingerprint = torch.stack([b.sum(), b.square().sum(), b[..., ::stride].sum()])
        both = self._all_reduce(torch.cat([fingerprint, -fingerprint]), torch.distributed.ReduceOp.MAX)
        high, low = both[:3], -both[3:]
        if not torch.equal(high, low):  # sync: debug mode only
            raise RuntimeError(
                f"rank {torch.distributed.get_rank()}: the ranks passed different vectors to a distributed "
                f"Hessian product (fingerprints from {low.tolist()} to {high.tolist()}). Every rank must run "
                "the solver on identical vectors: seed each rank's generator identically.")

    def agree(self, flag: bool) -> bool:
        """``flag`` on every rank if it holds on every rank (a solver's stop decision); as is without a group.

        Ranks compute identical decisions from identical all-reduced products
        on identical hardware; this makes them agree even where arithmetic
        differs (mixed CPUs), so no rank stops while another asks for a product.
        """
        if self.process_group is None:
            return flag
        agreed = self._all_reduce(torch.tensor([float(not flag)], dtype=torch.float64))
        return float(agreed) == 0.0  # sync: the solver syncs for its decision anyway

    def _apply(self, block: torch.Tensor) -> torch.Tensor:
        if self.process_group is None:
            return self._apply_local(block)
        if self.debug_replicated:
            self._check_replicated(block)
        return self._all_reduce(self._apply_local(block))

    def _apply_local(self, block: torch.Tensor) -> torch.Tensor:
        rule = {"forward_over_reverse": self._forward_over_reverse,
                "double_backward": self._double_backward,
                "reuse_graph": self._reuse_graph,
                "finite_difference": self._finite_difference}[self.method]
        with module_mode(self.model, self.bn_mode, self.dropout):
            if self._plain_kernels:
                with _plain_kernels():
                    return rule(block)
            try:
                return rule(block)
            except (RuntimeError, NotImplementedError) as err:
                if not _MISSING_DERIVATIVE.search(str(err)):
                    raise
                first_error = err
            warnings.warn(
                f"{self.method} Hessian-vector product failed in a fused kernel ({first_error}); "
                "switching to math attention with cuDNN and oneDNN off for this operator",
                RuntimeWarning, stacklevel=3)
            self._plain_kernels = True
            self.drop_graphs()  # reuse_graph's graphs were built with the fused kernel
            try:
                with _plain_kernels():
                    return rule(block)
            except (RuntimeError, NotImplementedError) as err:
                if not _MISSING_DERIVATIVE.search(str(err)):
                    raise
                raise MissingSecondDerivativeError(
                    f"an operation in the model has no second derivative for method={self.method!r} "
                    f"even with plain kernels ({err}). Use method='double_backward' (if only "
                    "forward-mode AD is missing) or method='finite_difference' (first derivatives "
                    "only), or replace the operation.") from err

    # -- public products -----------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a 1-D vector of length ``dim``; returned in ``dtype`` on ``device``."""
        if v.dim() != 1 or v.shape[0] != self.dim:
            raise ValueError(f"matvec expects a vector of shape ({self.dim},), got {tuple(v.shape)}")
        self.n_matvecs += 1
        return self._apply(v.to(self.device).unsqueeze(0))[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for a ``(dim, b)`` block (vmapped for forward-over-reverse, ``matmat_chunk_size`` columns at a time)."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"matmat expects a block of shape ({self.dim}, b), got {tuple(V.shape)}")
        self.n_matvecs += V.shape[1]
        return self._apply(V.to(self.device).T).T

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v)

    def time_methods(self, v: torch.Tensor, methods: Sequence[str] = METHODS) -> dict[str, MethodTiming]:
        """Time each method on the real operator and compare its product with forward-over-reverse's.

        A :class:`MethodTrial` fed the one vector ``v`` until it is done:
        two products for forward-over-reverse (the first is the reference's
        first call, with its one-off costs; the second is timed, and is the
        reference product), two for ``"reuse_graph"`` (its first builds the
        graphs; its second is what every later product of a measurement
        costs), one for finite differences, none for double backward when
        reuse_graph's graphs fit; all counted in ``n_matvecs``.  The first
        entry of the result is the reference.  The operator's ``method`` is
        restored.
        """
        trial = MethodTrial(self, methods)
        with self.measurement():
            while not trial.done:
                trial(v)
        return trial.timings

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync: timing only

    def check_determinism(self, v: torch.Tensor | None = None, rtol: float | None = None,
                          generator: torch.Generator | None = None) -> None:
        """Raise :class:`NondeterministicOperatorError` unless two products with one vector agree.

        Tolerance: ``rtol`` (default ``sqrt(eps)`` of the model dtype, far above
        the reordering noise of parallel reductions) times ``max |H v|``.
        One deliberate host sync to compare.
        """
        if v is None:
            v = torch.randn(self.dim, dtype=self.dtype, device=self.device, generator=generator)
        rtol = torch.finfo(self.model_dtype).eps ** 0.5 if rtol is None else rtol
        first = self.matvec(v)
        self.drop_graphs()  # reuse_graph: the second product runs the model again, as every other method does
        second = self.matvec(v)
        gap = float((first - second).abs().max())
        scale = float(first.abs().max())
        if gap > rtol * scale:
            raise NondeterministicOperatorError(
                f"two Hessian-vector products with the same vector differ by {gap:.3g} "
                f"(max |Hv| = {scale:.3g}): the model is random during the product (dropout or a "
                "noise layer in train mode). Use dropout='off' (the default), put the noisy "
                "modules in eval mode, or fix their random seed inside forward().")


class MethodTrial:
    """The first products of a solve, made by each method in turn and timed: what ``"auto"`` chooses from.

    Call it where the operator's product would be called (``trial(x)`` is
    ``H x`` for a vector or a ``(dim, b)`` block), e.g. as a solver's
    ``matvec``.  Its first calls run the methods of ``methods`` in turn, on
    the vectors the solver passes, ``x1, x2, x3``:

    1. the reference (forward-over-reverse, or the first method that works
       on this model) on ``x1``: its first call, with one-off costs (tracing)
       a run pays once;
    2. the reference again on ``x2`` (its steady cost, and the reference
       product), then every other method once on ``x2``, each compared with
       the reference: reuse_graph's product builds its graphs; double
       backward's figure is that product when the graphs fit (the same
       computation: build a chunk's graph, one backward through it);
    3. reuse_graph on ``x3`` (its steady cost), when it agreed with the
       reference to :data:`AUTO_RTOL`.

    Every call returns a product that agrees with the reference to
    :data:`AUTO_RTOL` (the reference's own, or reuse_graph's on ``x3``), so
    a solve fed by the trial is the reference's solve to that accuracy, and
    the only products beyond the solve's own are the comparisons of step 2:
    one (reuse_graph), two with finite differences (float64 only: in float32
    their best accuracy, ``eps^(2/3)``, is worse than :data:`AUTO_RTOL`, so
    they are not tried), one more when reuse_graph's graphs do not fit (it
    is then left out, and double backward runs its own product); each of
    ``b`` products when the calls are ``(dim, b)`` blocks.  Times are per
    column, so calls of different widths compare.  Timing on a vector of
    its own before the solve would cost four or five.  A solve that stops
    within three calls leaves the trial to :meth:`complete`, whose products
    are extra too.

    Use it inside :meth:`HessianOperator.measurement`, as a tracker does:
    outside one, reuse_graph's second product builds its graphs again and
    its steady cost is not measured.  When the last step is done,
    :attr:`timings` is complete (the reference first) and :attr:`done` set;
    with ``products`` given, the operator's method becomes
    :func:`choose_method`'s choice for a measurement of that many calls
    (:attr:`choice`), and answers every later call; without, the operator's
    method is restored.  Then ``on_done(trial)`` is called, if given (a
    tracker settles its determinism probe there, before the solve goes on).
    A method that fails on this model is left out (its error in the
    operator's ``failed_methods``); if every method fails,
    :class:`MissingSecondDerivativeError` lists why.  Under a process group
    a failure is raised instead (the other ranks may be inside the
    product's all-reduce): name a method that works.  Under a process group
    the ranks take the slowest rank's times and the largest errors, and
    decide together whether reuse_graph is timed again, so all choose alike.
    Torch's one-off costs of second-order autodiff (lazy imports, the first
    transform) are paid first, on a two-element problem.
    """

    ORDER = ("forward_over_reverse", "reuse_graph", "double_backward", "finite_difference")

    def __init__(self, op: HessianOperator, methods: Sequence[str] = METHODS, *, products: int | None = None,
                 on_done: Callable[[MethodTrial], None] | None = None):
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; allowed: {METHODS}")
        if torch.finfo(op.model_dtype).eps ** (2 / 3) > AUTO_RTOL:
            methods = [m for m in methods if m != "finite_difference"]
        _warm_up_autodiff()
        self.op, self.products, self.on_done = op, products, on_done
        self.methods = sorted(methods, key=self.ORDER.index)
        self.timings: dict[str, MethodTiming] = {}
        self.choice: str | None = None
        self.done = False
        self._restore = op.method  # the operator's method between the trial's own products
        self._reference: str | None = None
        self._reference_first = 0.0  # the reference's first call, with its one-off costs
        self._calls, self._shape, self._steady_wanted = 0, None, False
        op.failed_methods, op.derived_methods = {}, {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.done:
            return self.op @ x
        self._calls, self._shape = self._calls + 1, tuple(x.shape)
        if self._calls == 1:
            return self._first(x)
        if self._calls == 2:
            product = self._compare(x)
        else:
            product = self._steady(x)
        if self._calls == 3 or not self._steady_wanted:
            self._finish()
        return product

    def _run(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """``name``'s product of ``x`` and its seconds per column; None (and the error kept) when it fails."""
        self.op._synchronize()  # the caller's queued work (and any error of it) is not this product's
        self.op.method = name
        try:
            start = time.perf_counter()
            product = self.op @ x
            self.op._synchronize()
            return product, (time.perf_counter() - start) / (1 if x.dim() == 1 else x.shape[1])
        except (RuntimeError, NotImplementedError) as err:  # incl. MissingSecondDerivativeError
            if self.op.process_group is not None:
                raise  # the other ranks are inside this product's all-reduce: stop them all
            self.op.failed_methods[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return None
        finally:
            self.op.method = self._restore

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.methods:
            ran = self._run(name, x)
            if ran is not None:
                self._reference, self._reference_first = name, ran[1]
                return ran[0]
        raise MissingSecondDerivativeError("no Hessian-vector product method works on this model: "
                                           + "; ".join(f"{m}: {e}" for m, e in self.op.failed_methods.items()))

    def _compare(self, x: torch.Tensor) -> torch.Tensor:
        ran = self._run(self._reference, x)
        if ran is None:  # it worked on x1: a failure now is not the model's missing derivative
            raise RuntimeError(f"{self._reference} failed on its second product: "
                               f"{self.op.failed_methods[self._reference]}")
        reference, seconds = ran
        self.timings[self._reference] = MethodTiming(self._reference_first, seconds, 0.0)
        scale = reference.norm().clamp_min(torch.finfo(self.op.dtype).tiny)
        for name in self.methods:
            if name == self._reference or name in self.op.failed_methods:
                continue
            if name == "double_backward" and "reuse_graph" in self.timings:
                first = self.timings["reuse_graph"]
                self.timings[name] = MethodTiming(first.first_seconds, first.first_seconds, first.relative_error)
                self.op.derived_methods[name] = "reuse_graph"
                continue
            fits = self.op._reuse_fits
            ran = self._run(name, x)
            if ran is None:
                continue
            if name == "reuse_graph" and self._fell_back(fits):
                self.op.failed_methods[name] = "its graphs do not fit in memory"  # double_backward times its own
                continue
            error = float((ran[0] - reference).norm() / scale)  # sync: one number per method, once per run
            self.timings[name] = MethodTiming(ran[1], ran[1], error)
        timing = self.timings.get("reuse_graph")
        # Made together: ranks whose arithmetic differs must not split over a product.
        self._steady_wanted = self._reference != "reuse_graph" and timing is not None \
            and self.op.agree(timing.relative_error <= AUTO_RTOL)
        return reference

    def _fell_back(self, fitted: bool) -> bool:
        """Whether reuse_graph's graphs just turned out not to fit (on any rank: then every rank drops it)."""
        fell_back = fitted and not self.op._reuse_fits
        if self.op.process_group is not None:
            flag = torch.tensor([float(fell_back)], dtype=torch.float64)
            fell_back = bool(self.op._all_reduce(flag, torch.distributed.ReduceOp.MAX) > 0)
        return fell_back

    def _steady(self, x: torch.Tensor) -> torch.Tensor:
        ran = self._run("reuse_graph", x)
        if ran is None:
            raise RuntimeError(f"reuse_graph failed on its second product: {self.op.failed_methods['reuse_graph']}")
        first = self.timings["reuse_graph"]
        self.timings["reuse_graph"] = MethodTiming(first.first_seconds, ran[1], first.relative_error)
        return ran[0]

    def _finish(self) -> None:
        timings = {m: self.timings[m] for m in sorted(self.timings, key=self.ORDER.index)}
        timings = {self._reference: timings.pop(self._reference), **timings}  # the reference first
        if self.op.process_group is not None:
            # The slowest rank's times and the largest errors, so every rank chooses the same method.
            figures = torch.tensor([[t.first_seconds, t.product_seconds, t.relative_error] for t in timings.values()],
                                   dtype=torch.float64)
            figures = self.op._all_reduce(figures, torch.distributed.ReduceOp.MAX).tolist()
            timings = {m: MethodTiming(*row) for m, row in zip(timings, figures)}
        self.timings, self.done = timings, True
        if self.products is not None:
            self.choice = choose_method(timings, products=self.products)
            self.op.method = self.choice
            if self.choice != "reuse_graph":
                self.op.drop_graphs()  # the trial's graphs: not to be held through the measurement
        if self.on_done is not None:
            self.on_done(self)

    def complete(self, generator: torch.Generator | None = None) -> None:
        """Finish on random inputs shaped like the last call's: for a solve that stopped within three calls."""
        shape = self._shape or (self.op.dim,)
        while not self.done:
            self(torch.randn(shape, dtype=self.op.dtype, device=self.op.device, generator=generator))


def hessian_operator(model: nn.Module, loss_fn: Callable, batches: Sequence, *, params=None,
                     method: str = "forward_over_reverse", bn_mode: str = "eval",
                     dropout: str = "off", dtype: torch.dtype | None = None,
                     determinism_probe: bool | None = None, matmat_chunk_size: int | None = 16,
                     chunk_weights: Sequence[float] | None = None, process_group=None,
                     debug_replicated: bool | None = None) -> HessianOperator:
    """Hessian of ``sum_c (n_c / N) loss_fn(model(x_c), y_c)`` in the selected parameters.

    ``batches``: list of ``(inputs, targets)``; ``inputs`` a tensor or a tuple of
    positional model arguments; chunks may have unequal sizes.  ``params``: see
    :func:`select_parameters`.  ``dtype``: arithmetic dtype of the vectors
    (e.g. ``torch.float64`` for solvers on a float32 model).
    ``determinism_probe``: run :meth:`HessianOperator.check_determinism` now
    (default: whenever ``dropout="as_is"`` leaves dropout on, so a random
    operator is an error unless asked for with ``False``).
    ``chunk_weights``: each chunk's share of the loss's normaliser, for
    losses that are not unweighted means (module docstring).
    ``process_group``: this rank's chunks are its shard of the data, and
    products are all-reduced over the group (module docstring);
    ``debug_replicated`` checks that every rank passes the same vectors.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # the products never go through DDP's hooks; names without "module."
    op = HessianOperator(model, loss_fn, batches, select_parameters(model, params), method=method,
                         bn_mode=bn_mode, dropout=dropout, dtype=dtype,
                         matmat_chunk_size=matmat_chunk_size, chunk_weights=chunk_weights,
                         process_group=process_group, debug_replicated=debug_replicated)
    if determinism_probe is None:
        determinism_probe = dropout == "as_is"
    if determinism_probe:
        op.check_determinism()
    return op
