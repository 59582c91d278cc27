"""The model as a Hessian sees it: module modes fixed, and kernels that have second derivatives.

Two things must not change silently while a Hessian is measured:

* **Module modes.**  :func:`module_mode` puts the whole model in eval mode
  (dropout off) except BatchNorm layers, which use either their running
  statistics (``bn_mode="eval"``) or the chunk's batch statistics
  (``bn_mode="batch_stats"``) with ``track_running_stats`` switched off, so
  running statistics are never updated; ``dropout="as_is"`` leaves every
  other module in the mode the caller set.  Modes are restored on exit.
* **Kernels.**  Fused kernels without second derivatives (flash and
  memory-efficient scaled dot-product attention, cuDNN and oneDNN RNNs)
  fail inside a Hessian-vector product.  :class:`PlainKernelFallback` runs
  a product, and on such a failure switches once to math attention with
  cuDNN and oneDNN off (:func:`plain_kernels`), says so in one plain line
  (a :class:`KernelFallbackWarning`, its text also kept in
  :attr:`PlainKernelFallback.note` for run records), and raises
  :class:`MissingSecondDerivativeError` naming the alternatives when that
  is not enough.

Example::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    >>> with module_mode(model):
    ...     model[1].training
    False
    >>> model[1].training
    True
"""
from __future__ import annotations

import contextlib
import inspect
import re
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .settings import BN_MODES, DROPOUT_MODES


# Messages torch raises when an op lacks forward-mode AD or a double backward.
_MISSING_DERIVATIVE = re.compile(
    r"forward AD|derivative for .* is not implemented|double backward|cudnn RNN backward"
    r"|not implemented for .*backward",
    re.IGNORECASE,
)
# The operator torch names in such a message ("forward AD with _scaled_dot_product_flash_attention_for_cpu ...").
_OPERATOR_NAME = re.compile(r"\b(_?[a-z][a-z0-9_]*_(?:attention|rnn|lstm|gru)[a-z0-9_]*)", re.IGNORECASE)


class MissingSecondDerivativeError(RuntimeError):
    """An operation in the model has no second derivative for the chosen HVP method."""


class KernelFallbackWarning(RuntimeWarning):
    """Hessian-vector products switched to plain kernels (math attention, cuDNN and oneDNN off)."""


def check_modes(bn_mode: str, dropout: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")


@contextlib.contextmanager
def module_mode(model: nn.Module, bn_mode: str = "eval", dropout: str = "off"):
    """Fix module modes for a Hessian computation and restore them on exit (module docstring)."""
    check_modes(bn_mode, dropout)
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
def plain_kernels():
    """Math attention, cuDNN and oneDNN off: kernels whose derivatives are all implemented."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # oneDNN's TF32 notice on CPU builds
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
            yield


def is_missing_derivative(err: BaseException) -> bool:
    """Whether ``err`` is torch saying that an operation has no forward-mode or second derivative."""
    return isinstance(err, (RuntimeError, NotImplementedError)) and bool(_MISSING_DERIVATIVE.search(str(err)))


def fallback_note(err: BaseException) -> str:
    """One plain line for the switch to plain kernels, naming the kernel but not quoting torch's message."""
    found = _OPERATOR_NAME.search(str(err))
    kernel = f"the fused kernel {found.group(1)}" if found else "a fused kernel"
    return (f"{kernel} has no second derivative here; Hessian-vector products use math attention with "
            "cuDNN and oneDNN off (the same values, computed with plain kernels)")


class PlainKernelFallback:
    """Runs product rules, switching once to :func:`plain_kernels` when a fused kernel lacks a derivative.

    ``note`` is None until the switch, then the one-line explanation that was
    warned (a :class:`KernelFallbackWarning`).  ``on_switch`` is called at the
    switch, before the product runs again (an operator frees graphs built
    with the fused kernel there).
    """

    def __init__(self, on_switch: Callable[[], None] | None = None):
        self.note: str | None = None
        # A bound method is held weakly: an operator holding this object would otherwise sit in a
        # reference cycle and outlive its process group (gloo ranks then abort at exit).
        self._on_switch = weakref.WeakMethod(on_switch) if inspect.ismethod(on_switch) else (lambda: on_switch)

    @property
    def on_switch(self) -> Callable[[], None] | None:
        return self._on_switch()

    @property
    def active(self) -> bool:
        return self.note is not None

    def run(self, rule: Callable[[], torch.Tensor], method: str) -> torch.Tensor:
        if self.active:
            with plain_kernels():
                return rule()
        try:
            return rule()
        except (RuntimeError, NotImplementedError) as err:
            if not is_missing_derivative(err):
                raise
            note = fallback_note(err)
        self.note = note
        warnings.warn(note, KernelFallbackWarning, stacklevel=4)
        callback = self.on_switch
        if callback is not None:
            callback()
        try:
            with plain_kernels():
                return rule()
        except (RuntimeError, NotImplementedError) as err:
            if not is_missing_derivative(err):
                raise
            raise MissingSecondDerivativeError(
                f"an operation in the model has no second derivative for method={method!r} even with plain "
                f"kernels ({str(err).splitlines()[0][:200]}). Use method='double_backward' (if only forward-mode "
                "AD is missing) or method='finite_difference' (first derivatives only), or replace the "
                "operation.") from err
