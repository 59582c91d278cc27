"""Hessian-vector products of a model's loss, as a :class:`~eos_toolkit.operators.LinearOperator`.

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
the loss is such a mean (:mod:`eos_toolkit.loss_reduction`) and refuses one
that is not.  ``theta`` is the selected parameters flattened in
``model.named_parameters()`` order; :meth:`HessianOperator.flatten` and
:meth:`HessianOperator.unflatten` convert between that flat vector and
parameter-shaped tensors.

Four product rules (:data:`METHODS`; :mod:`eos_toolkit.method_choice` picks
the cheapest accurate one for a tracker's ``"auto"``):

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
  ``"double_backward"`` from then on (:attr:`HessianOperator.reuse_graph_fits`).
  Outside a measurement each call builds and drops its own graphs (the cost
  of ``"double_backward"``); if a parameter or buffer changes in place
  inside one, the graphs are rebuilt (their version counters are compared
  at every product).
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

Module modes are fixed during every product and restored afterwards
(:func:`~eos_toolkit.modes.module_mode`: dropout off, BatchNorm on running
statistics with ``bn_mode="eval"`` or on each chunk's batch statistics with
``bn_mode="batch_stats"``, so in that mode the operator depends on how the
data are chunked).  ``dropout="as_is"`` leaves every non-BatchNorm module in
the mode the caller set (for studying a stochastic operator);
:func:`hessian_operator` then runs :meth:`HessianOperator.check_determinism`
by default, which raises when dropout (or any noise) is really on: a random
operator must be asked for explicitly with ``determinism_probe=False``.
Fused kernels without second derivatives are replaced by plain ones on the
first failing product (:class:`~eos_toolkit.modes.PlainKernelFallback`;
the one-line note is :attr:`HessianOperator.kernel_fallback`).

Data sharded over processes (``torch.distributed``): pass ``process_group``
(e.g. ``torch.distributed.group.WORLD``) and give each rank only its own
chunks.  The weights become global (``n_c / N`` with ``N`` summed over every
rank's chunks, one all-reduce at construction) and every product ends with
one all-reduce of the rank's weighted sum (:mod:`eos_toolkit.collectives`),
so each rank holds the product of the full-data Hessian.  The solvers then
run unchanged on every rank, on identical vectors (identically seeded
generators and identical products), so no vector is ever gathered; every
rank must therefore call the same products in the same order (the solvers'
stop decisions go through :meth:`HessianOperator.agree`, so they do).
``debug_replicated=True`` (or ``EOS_DEBUG_DISTRIBUTED=1`` in the environment
of any rank) checks at every product, with one more small all-reduce, that
all ranks passed the same vector, and raises where they did not.

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
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .batches import as_args, chunk_size
from .collectives import Collective, synchronize
from .curvature_gradient import wrong_third_derivative_modules
from .loss_reduction import check_mean_reduction
from .modes import PlainKernelFallback, check_modes, module_mode
from .operators import LinearOperator
from .settings import METHODS


class NondeterministicOperatorError(RuntimeError):
    """Two products with the same vector disagree: the operator is random (dropout, noise layers)."""


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


class HessianOperator(LinearOperator):
    """``v -> H v`` for the Hessian of a model's mean loss over fixed data chunks.

    Build it with :func:`hessian_operator`.  Attributes: ``dim`` (number of
    selected scalars), ``dtype`` (the arithmetic dtype of vectors in and out;
    products are computed in the model's dtype and accumulated in this one),
    ``device``, ``names`` (selected parameter names), ``n_matvecs`` (products
    computed so far; a ``matmat`` with ``b`` columns counts ``b``),
    ``method`` (the product rule; assignable), ``kernel_fallback`` (None, or
    the note said when products switched to plain kernels).
    """

    def __init__(self, model, loss_fn, batches, names, *, method, bn_mode, dropout, dtype,
                 matmat_chunk_size, chunk_weights=None, process_group=None, debug_replicated=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_modes(bn_mode, dropout)
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
            sizes = [chunk_size(y) for _, y in self.batches]
        else:
            sizes = [float(w) for w in chunk_weights]
            if len(sizes) != len(self.batches) or not all(math.isfinite(w) and w >= 0 for w in sizes) \
                    or sum(sizes) <= 0:
                raise ValueError(f"chunk_weights must be {len(self.batches)} finite numbers >= 0 with a "
                                 f"positive sum (one per chunk), got {list(chunk_weights)!r}")
        self.collective = Collective(process_group, self.device)
        debug = (os.environ.get("EOS_DEBUG_DISTRIBUTED", "") not in ("", "0")
                 if debug_replicated is None else debug_replicated)
        total, n_chunks = sum(sizes), len(self.batches)
        if self.collective.active:
            # One all-reduce: the global normaliser, the global chunk count, and whether any rank asked
            # for the debug check (every rank must run the same collectives).
            agreed = self.collective.all_reduce(torch.tensor([float(total), float(n_chunks), float(debug)],
                                                             dtype=torch.float64))
            total, n_chunks, debug = agreed.tolist()  # sync: once, at construction
        self.debug_replicated = bool(debug)
        self.chunk_weights = [s / total for s in sizes]
        self.n_matvecs = 0
        self._kernels = PlainKernelFallback(on_switch=self.drop_graphs)  # reuse_graph's graphs used the fused kernel
        self._measuring = 0  # depth of nested measurement() blocks
        self._graphs = None  # reuse_graph: (versions, [(leaves, grads, live, weight) per chunk])
        self._reuse_fits = True  # False once building the graphs ran out of memory
        if chunk_weights is None and n_chunks > 1:
            self._check_mean_reduction_everywhere()

    @property
    def process_group(self):
        return self.collective.process_group

    @property
    def kernel_fallback(self) -> str | None:
        """None, or the one-line note said when products switched to plain kernels."""
        return self._kernels.note

    @property
    def reuse_graph_fits(self) -> bool:
        """False once building reuse_graph's graphs ran out of memory (it then uses double backward)."""
        return self._reuse_fits

    def _check_mean_reduction_everywhere(self) -> None:
        """:func:`~eos_toolkit.loss_reduction.check_mean_reduction` on this rank; every rank raises if any fails."""
        try:
            check_mean_reduction(self.model, self.loss_fn, self.batches, bn_mode=self.bn_mode)
            failure = None
        except ValueError as err:
            failure = err
        if not self.collective.active:
            if failure is not None:
                raise failure
            return
        failed = self.collective.all_reduce(torch.tensor([float(failure is not None)], dtype=torch.float64))
        if failure is not None:
            raise failure
        if float(failed) > 0:  # sync: once, at construction
            raise ValueError("another rank's chunks show that loss_fn is not an unweighted mean over the targets' "
                             "leading dimension (its error names the chunk); pass chunk_weights")

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
        outputs = functional_call(self.model, values, as_args(inputs))
        return self.loss_fn(outputs, targets)

    def _primals(self) -> dict:
        return {n: p.detach() for n, p in zip(self.names, self._params)}

    # -- the product rules, each on a (b, dim) block ------------------------------
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

    def loss_and_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, grad L)`` at the current parameters: the same chunks, weights, modes and group as the products.

        ``L`` a 0-dim tensor and the gradient a flat vector, both in ``dtype``
        on ``device``, summed over the process group (one all-reduce for both).
        """
        leaves = {n: p.detach().requires_grad_(True) for n, p in zip(self.names, self._params)}
        out = torch.zeros(self.dim + 1, dtype=self.dtype, device=self.device)
        with module_mode(self.model, self.bn_mode, self.dropout):
            for (x, y), w in zip(self.batches, self.chunk_weights):
                with torch.enable_grad():
                    loss = self._chunk_loss(leaves, x, y)
                    g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
                out[:-1].add_(self.flatten(g), alpha=w)
                out[-1] += w * loss.detach().to(self.dtype)
        out = self.collective.all_reduce(out)
        return out[-1], out[:-1]

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

    # -- public products -----------------------------------------------------------
    def _apply(self, block: torch.Tensor) -> torch.Tensor:
        """``H`` applied to the rows of a ``(b, dim)`` block: this rank's part, summed over the group."""
        if self.debug_replicated and self.collective.active:
            self.collective.check_replicated(block)
        rule = {"forward_over_reverse": self._forward_over_reverse,
                "double_backward": self._double_backward,
                "reuse_graph": self._reuse_graph,
                "finite_difference": self._finite_difference}[self.method]
        with module_mode(self.model, self.bn_mode, self.dropout):
            local = self._kernels.run(lambda: rule(block), self.method)
        return self.collective.all_reduce(local)

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

    # -- third derivatives ------------------------------------------------------------
    n_third_derivatives = 0  # third_derivative() calls so far; never counted in n_matvecs

    def third_derivative(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``D^3 L(theta)[a, b, .] = grad_theta (a^T H(theta) b)``, with ``a`` and ``b`` held fixed.

        The third derivative of the same ``L`` as the products (the same
        chunks, weights, module modes, plain-kernel fallback and all-reduce
        over the process group), contracted with two flat vectors ``a`` and
        ``b`` (``b`` defaults to ``a``) of length ``dim``::

            D^3 L[a, b, .]_k = sum_ij  d^3 L / (d theta_i d theta_j d theta_k)  a_i b_j

        symmetric in ``a`` and ``b``; returned in ``dtype`` on ``device``.
        For the top eigenpair ``(lambda, u)`` of ``H`` with ``|u| = 1`` and
        ``lambda`` simple, ``D^3 L[u, u, .]`` is the gradient of the sharpness
        (:mod:`eos_toolkit.curvature_gradient`).

        Computed exactly (to rounding) by reverse mode three times over, per
        chunk: the gradient ``g`` with its graph, ``H b`` as the backward of
        ``<g, b>`` with its graph, then the backward of ``<a, H b>``; memory:
        one chunk's second-order graph at a time.  Cost: 4.3 to 4.9
        gradients (a gradient: one forward and backward pass of the loss),
        about two ``"double_backward"`` products, whether or not ``b`` is
        given (784-200-200-10 tanh MLP, 1,000 examples, float32, 2 CPU
        threads).  The compositions with forward mode inside cost more
        there: reverse over reverse over forward 5.7-6.2 gradients, reverse
        over forward over forward 7.2, reverse over forward over reverse
        8.1, forward over forward over reverse 10.3 (the last two fail
        inside ``F.mse_loss``'s derivative in torch 2.13, where ``jvp`` is
        nested).  Reverse mode needs each operation's double backward to be
        differentiable, and right: torch 2.13's fused layer norm and batch
        or instance normalisation with batch statistics are not (right
        Hessians, third derivatives off by 1% to several times the value),
        so a model with such a module is refused with a ``ValueError``
        (:func:`~eos_toolkit.curvature_gradient.wrong_third_derivative_modules`;
        a LayerNorm written in plain tensor operations is right).  A
        functional ``F.layer_norm`` cannot be seen and is not refused.

        One call per rank, with the same ``a`` and ``b`` on every rank (checked
        with ``debug_replicated``).  Counted in ``n_third_derivatives``, not
        in ``n_matvecs``.
        """
        vectors = [a] if b is None else [a, b]
        for v in vectors:
            if v.dim() != 1 or v.shape[0] != self.dim:
                raise ValueError(f"third_derivative expects vectors of shape ({self.dim},), got {tuple(v.shape)}")
        block = torch.stack([v.to(device=self.device, dtype=self.dtype) for v in vectors])
        if self.debug_replicated and self.collective.active:
            self.collective.check_replicated(block)
        with module_mode(self.model, self.bn_mode, self.dropout):
            wrong = wrong_third_derivative_modules(self.model)
            if wrong:
                raise ValueError(
                    f"torch computes third derivatives through {', '.join(wrong)} wrongly (their Hessians are "
                    "right): use a LayerNorm written in plain tensor operations and BatchNorm on running "
                    "statistics (bn_mode='eval') for third derivatives")
            self.n_third_derivatives += 1
            local = self._kernels.run(lambda: self._third_derivative(block[0], block[-1]), "third_derivative")
        return self.collective.all_reduce(local)

    def _third_derivative(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """This rank's ``sum_c w_c D^3 L_c[a, b, .]``: three reverse passes per chunk, one chunk at a time."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        a_parts, b_parts = self.unflatten(a, self.model_dtype), self.unflatten(b, self.model_dtype)
        for (x, y), w in zip(self.batches, self.chunk_weights):
            leaves, grads, live, _ = self._chunk_graph(x, y, w)
            if not live:
                continue  # L_c is affine in theta
            with torch.enable_grad():
                hb = torch.autograd.grad(grads, leaves, grad_outputs=[b_parts[i] for i in live], create_graph=True,
                                         allow_unused=True, materialize_grads=True)
            curved = [i for i, h in enumerate(hb) if h.requires_grad]  # rows of H b that depend on theta
            if not curved:
                continue  # L_c is quadratic in theta
            d3 = torch.autograd.grad([hb[i] for i in curved], leaves, grad_outputs=[a_parts[i] for i in curved],
                                     allow_unused=True, materialize_grads=True)
            out.add_(self.flatten(d3), alpha=w)
        return out

    def agree(self, flag: bool) -> bool:
        """``flag`` on every rank if it holds on every rank (a solver's stop decision); as is without a group."""
        return self.collective.agree(flag)

    def synchronize(self) -> None:
        """Wait for the device's queued work (for timing products)."""
        synchronize(self.device)

    def check_determinism(self, v: torch.Tensor | None = None, rtol: float | None = None,
                          generator: torch.Generator | None = None) -> None:
        """Raise :class:`NondeterministicOperatorError` unless two products with one vector agree.

        Tolerance: ``rtol`` (default :func:`determinism_rtol` of the model
        dtype, far above the reordering noise of parallel reductions) times
        ``max |H v|``.  One deliberate host sync to compare.
        """
        if v is None:
            v = torch.randn(self.dim, dtype=self.dtype, device=self.device, generator=generator)
        first = self.matvec(v)
        self.drop_graphs()  # reuse_graph: the second product runs the model again, as every other method does
        second = self.matvec(v)
        raise_if_random(first, second, determinism_rtol(self.model_dtype) if rtol is None else rtol)


def determinism_rtol(model_dtype: torch.dtype) -> float:
    """How far two products of one vector may differ (relative to ``max |H v|``): ``sqrt(eps)`` of the model dtype."""
    return torch.finfo(model_dtype).eps ** 0.5


def raise_if_random(first: torch.Tensor, second: torch.Tensor, rtol: float) -> None:
    """Raise :class:`NondeterministicOperatorError` when two products of one vector differ by over ``rtol``."""
    gap = float((first - second).abs().max())  # sync: once per probe
    scale = float(first.abs().max())
    if gap > rtol * scale:
        raise NondeterministicOperatorError(
            f"two Hessian-vector products with the same vector differ by {gap:.3g} "
            f"(max |Hv| = {scale:.3g}): the model is random during the product (dropout or a "
            "noise layer in train mode). Use dropout='off' (the default), put the noisy "
            "modules in eval mode, or fix their random seed inside forward().")


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
