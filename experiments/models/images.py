"""Image classifiers for edge-of-stability experiments.

``build_model(name, input_shape, num_classes, **options)`` with ``name`` one of
:data:`MODEL_NAMES`:

- ``mlp-tanh``, ``mlp-relu``: flatten, then ``Linear -> activation`` per hidden
  width, then a linear read-out. Option ``hidden`` (default ``(200, 200)``:
  784-200-200-10 on 28 x 28 images, 199,210 parameters, the network of Cohen et
  al. 2021's full-batch studies).
- ``cnn-small``: two ``3 x 3`` convolutions (padding 1) of ``width`` channels,
  each followed by [BatchNorm], the activation and ``2 x 2`` max pooling, then a
  linear read-out (Cohen et al. 2021's CNN). Options ``width=32``,
  ``batchnorm=False``, ``activation="relu"``; needs H, W >= 4.
- ``cnn-deep``: the VRAdam paper's "deeper CNN": three blocks of two ``3 x 3``
  convolutions (``widths=(32, 64, 128)`` channels) each followed by [BatchNorm]
  and ReLU, a ``2 x 2`` max pooling after each block, then linear layers through
  ``hidden`` (default none) to the classes. The flattened size follows the input
  (``128 x 4 x 4`` on 32 x 32, ``128 x 3 x 3`` on 28 x 28); needs H, W >= 8.
  Options ``widths``, ``hidden=()``, ``batchnorm=True``, ``activation="relu"``.
  The public VRAdam code's variant is ``widths=(64, 128, 256), hidden=(512,)``.

All models are plain ``nn.Sequential`` stacks without dropout or in-place
operations, so ``torch.func`` transforms (grad, jvp of grad for Hessian-vector
products) work on them; BatchNorm is the only layer whose output depends on
the mode (train: batch statistics; eval: running statistics). In train mode
BatchNorm also updates its running statistics in place, which a ``torch.func``
transform refuses on captured buffers: pass fresh copies of the buffers to
``torch.func.functional_call`` inside the transformed function (or use eval
mode). With ``seed``
the initial weights come from a private generator seeded with it (the global
torch RNG is left untouched); without, from the global RNG.

Example:
    >>> model = build_model("mlp-tanh", (1, 28, 28), 10, seed=0)
    >>> sum(p.numel() for p in model.parameters())
    199210
    >>> import torch
    >>> model(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

MODEL_NAMES = ("mlp-tanh", "mlp-relu", "cnn-small", "cnn-deep")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name]()


def _positive_ints(name: str, values: Sequence[int], allow_empty: bool) -> tuple[int, ...]:
    values = tuple(values)
    if (not values and not allow_empty) or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a sequence of positive integers; got {values!r}")
    return values


def _linear_stack(in_features: int, hidden: tuple[int, ...], num_classes: int, activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), _activation(activation)]
        in_features = width
    return [*layers, nn.Linear(in_features, num_classes)]


def mlp(
    input_shape: tuple[int, int, int], num_classes: int, activation: str, hidden: Sequence[int] = (200, 200)
) -> nn.Sequential:
    """Fully connected network: flatten, ``Linear -> activation`` per width in ``hidden``, linear read-out."""
    hidden = _positive_ints("hidden", hidden, allow_empty=True)
    return nn.Sequential(nn.Flatten(), *_linear_stack(math.prod(input_shape), hidden, num_classes, activation))


def _conv_unit(in_channels: int, out_channels: int, batchnorm: bool, activation: str) -> list[nn.Module]:
    norm = [nn.BatchNorm2d(out_channels)] if batchnorm else []
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), *norm, _activation(activation)]


def _check_spatial(name: str, input_shape: tuple[int, int, int], pools: int) -> tuple[int, int]:
    _, height, width = input_shape
    smallest = 2**pools
    if height < smallest or width < smallest:
        raise ValueError(
            f"{name} pools {pools} times and needs images of at least {smallest} x {smallest}; got {height} x {width}"
        )
    return height // smallest, width // smallest


def small_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    width: int = 32,
    batchnorm: bool = False,
    activation: str = "relu",
) -> nn.Sequential:
    """Two ``conv3x3 -> [BN] -> activation -> maxpool2`` units and a linear read-out."""
    (width,) = _positive_ints("width", (width,), allow_empty=False)
    out_h, out_w = _check_spatial("cnn-small", input_shape, pools=2)
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for _ in range(2):
        layers += [*_conv_unit(channels, width, batchnorm, activation), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * out_h * out_w, num_classes))


def deep_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    widths: Sequence[int] = (32, 64, 128),
    hidden: Sequence[int] = (),
    batchnorm: bool = True,
    activation: str = "relu",
) -> nn.Sequential:
    """Per width: ``(conv3x3 -> [BN] -> activation) x 2 -> maxpool2``; then linear layers via ``hidden``."""
    widths = _positive_ints("widths", widths, allow_empty=False)
    hidden = _positive_ints("hidden", hidden, allow_empty=True)
    out_h, out_w = _check_spatial("cnn-deep", input_shape, pools=len(widths))
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for width in widths:
        layers += _conv_unit(channels, width, batchnorm, activation)
        layers += [*_conv_unit(width, width, batchnorm, activation), nn.MaxPool2d(2)]
        channels = width
    head = _linear_stack(channels * out_h * out_w, hidden, num_classes, activation)
    return nn.Sequential(*layers, nn.Flatten(), *head)


def _build_mlp_tanh(input_shape, num_classes, **options):
    return mlp(input_shape, num_classes, "tanh", **options)


def _build_mlp_relu(input_shape, num_classes, **options):
    return mlp(input_shape, num_classes, "relu", **options)


BUILDERS = {
    "mlp-tanh": (_build_mlp_tanh, ("hidden",)),
    "mlp-relu": (_build_mlp_relu, ("hidden",)),
    "cnn-small": (small_cnn, ("width", "batchnorm", "activation")),
    "cnn-deep": (deep_cnn, ("widths", "hidden", "batchnorm", "activation")),
}


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, seed: int | None = None, **options
) -> nn.Module:
    """Model ``name`` for images of shape ``input_shape = (C, H, W)`` and ``num_classes`` outputs.

    ``options`` are the model's keyword options (module docstring). With
    ``seed``, initialisation draws from ``torch.manual_seed(seed)`` inside a
    forked RNG, so equal seeds give equal weights and the global RNG is not
    advanced. Raises ValueError for an unknown name or option, or a bad shape.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    builder, allowed = BUILDERS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name} has no option(s) {unknown}; allowed: {', '.join(allowed)}")
    shape = tuple(input_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be three positive integers (C, H, W); got {shape!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if seed is None:
        return builder(shape, num_classes, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(shape, num_classes, **options)
