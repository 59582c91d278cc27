"""The optimizers a run can name: one table, name -> class, constructor arguments, display name.

Every other place that needs an optimizer fact reads it here: the config's
allowed values and default label, the CLI's help, building the optimizer
(:func:`experiments.optim.build_optimizer`), and its stability adapter
(preconditioner, rate, threshold), which :mod:`eos_toolkit.adapters` keys by
the class.  Every optimizer gets the same ``lr`` meaning (the maximal rate),
so schedules, warmup and the stability thresholds treat them alike.

The table is read without importing torch (the CLI lists it in its help);
:func:`optimizer_class` imports the class.

Example:
    >>> OPTIMIZERS["vradam"].display, OPTIMIZERS["vradam"].class_path
    ('VRAdam', 'vradam:VRAdam')
    >>> from experiments.config import RunConfig
    >>> OPTIMIZERS["nesterov"].arguments(RunConfig(momentum=0.8))
    {'momentum': 0.8, 'nesterov': True, 'weight_decay': 0.0}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from experiments.config import ConfigError


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer a run can name."""

    display: str  # how legends and labels write it
    class_path: str  # "module:Class"
    arguments: Callable  # RunConfig -> the constructor's keyword arguments besides params and lr
    about: str  # one line: what it is


def _adam(cfg) -> dict:
    return {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "gd": OptimizerEntry("GD", "torch.optim:SGD", lambda c: {"weight_decay": c.weight_decay},
                         "torch.optim.SGD without momentum (with a full batch: gradient descent)"),
    "sgd": OptimizerEntry("SGD", "torch.optim:SGD", lambda c: {"weight_decay": c.weight_decay},
                          "torch.optim.SGD without momentum"),
    "momentum": OptimizerEntry("Momentum", "torch.optim:SGD",
                               lambda c: {"momentum": c.momentum, "weight_decay": c.weight_decay},
                               "SGD with heavy-ball momentum (momentum)"),
    "nesterov": OptimizerEntry("Nesterov", "torch.optim:SGD",
                               lambda c: {"momentum": c.momentum, "nesterov": True, "weight_decay": c.weight_decay},
                               "SGD with Nesterov momentum (momentum)"),
    "adam": OptimizerEntry("Adam", "torch.optim:Adam", _adam, "torch.optim.Adam (coupled L2 when weight_decay > 0)"),
    "adamw": OptimizerEntry("AdamW", "torch.optim:AdamW", _adam, "torch.optim.AdamW (decoupled weight decay)"),
    "rmsprop": OptimizerEntry("RMSprop", "torch.optim:RMSprop",
                              lambda c: {"alpha": c.beta2, "eps": c.eps, "weight_decay": c.weight_decay},
                              "torch.optim.RMSprop (alpha = beta2)"),
    "radam": OptimizerEntry("RAdam", "torch.optim:RAdam", _adam, "torch.optim.RAdam"),
    "vradam": OptimizerEntry("VRAdam", "vradam:VRAdam",
                             lambda c: {**_adam(c), "beta3": c.beta3, "alpha1": c.alpha1, "gate": c.gate,
                                        "power": c.power, "norm_scope": c.norm_scope},
                             "vradam.VRAdam (beta3, alpha1, gate, power, norm_scope)"),
}


def optimizer_entry(name: str) -> OptimizerEntry:
    """The entry of ``name``; ConfigError naming the allowed names otherwise."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def optimizer_class(name: str) -> type:
    """The class behind ``name`` (imported now)."""
    module, cls = optimizer_entry(name).class_path.split(":")
    return getattr(importlib.import_module(module), cls)
