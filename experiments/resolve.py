"""A run's configuration completed: the task's defaults, the names other tables own, the derived values.

:func:`resolve` turns a :class:`~experiments.config.RunConfig` as a user wrote
it into the one a run records: each unset key gets its task's default
(:attr:`experiments.tasks.base.Task.defaults`), ``checkpoint_every`` follows
``track_every``, the label comes from the optimizer table
(:mod:`experiments.optimizers`), ``track_precond`` from whether the
optimizer's adapter has a preconditioner; every name is checked against its
home (:data:`CHOICES`), and every value's type and range by
:meth:`~experiments.config.RunConfig.check`.  Bad values raise
:class:`~experiments.config.ConfigError` naming the value and what is allowed.

:data:`CHOICES` is read without importing torch (the CLI's help lists it);
:func:`resolve` imports the task's module and the optimizer's class.

Example:
    >>> cfg = resolve(RunConfig(task="eos-fullbatch", optimizer="gd", lr=0.05, steps=10))
    >>> cfg.label, cfg.track_every, cfg.checkpoint_every, cfg.track_precond
    ('GD lr=0.05', 10, 10, False)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from eos_toolkit.settings import AUTO, BN_MODES, METHODS
from experiments.config import DEVICES, DTYPES, ConfigError, RunConfig, load_config_file
from experiments.optimizers import OPTIMIZERS
from experiments.tasks import TASKS
from vradam.settings import GATES, NORM_SCOPES

# The keys whose values come from a fixed list, each list from its home: resolve() checks them, the CLI's
# help lists them. Task-specific choices (a data set, an objective) are checked by the task.
CHOICES: dict[str, tuple[str, ...]] = {
    "task": tuple(TASKS),
    "optimizer": tuple(OPTIMIZERS),
    "device": DEVICES,
    "dtype": DTYPES,
    "hessian_bn_mode": BN_MODES,
    "hvp_method": (AUTO, *METHODS),
    "gate": GATES,
    "norm_scope": NORM_SCOPES,
}


def _choice(name: str, value: Any) -> None:
    allowed = CHOICES[name]
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the task-dependent defaults and check every value; returns ``cfg`` (completed in place)."""
    cfg.check_types()
    _choice("task", cfg.task)
    from experiments.optim import check_schedule_name, optimizer_adapter
    from experiments.tasks import task_class  # imports torch: the table above does not

    for key, value in task_class(cfg.task).defaults.items():
        if key == "steps" and cfg.epochs is not None:
            continue  # the run's length was given in epochs
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.steps is None and cfg.epochs is None:
        cfg.epochs = 10
    for name in CHOICES:
        _choice(name, getattr(cfg, name))
    if cfg.checkpoint_every is None:
        cfg.checkpoint_every = cfg.track_every
    if cfg.label is None and isinstance(cfg.lr, (int, float)):
        cfg.label = f"{OPTIMIZERS[cfg.optimizer].display} lr={cfg.lr:g}"
    cfg.check()
    check_schedule_name(cfg.schedule)
    preconditioned = optimizer_adapter(cfg.optimizer).preconditioned
    if cfg.track_precond is None:
        cfg.track_precond = preconditioned
    if cfg.track_precond and not preconditioned:
        raise ConfigError(f"track_precond needs an optimizer with a preconditioner; {cfg.optimizer!r} has none "
                          "(its stability is read on the raw sharpness)")
    for name in ("schedule_options", "model_options"):
        if not isinstance(getattr(cfg, name), dict):
            raise ConfigError(f"{name} must be a mapping, got {getattr(cfg, name)!r}")
    return cfg


def resolved(cfg: RunConfig) -> RunConfig:
    """A resolved copy of ``cfg`` (the caller's config keeps what it asked for)."""
    return resolve(dataclasses.replace(cfg))


def resolve_config(config_file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Defaults < config file < overrides (``None`` overrides are ignored); resolved."""
    values = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return resolve(RunConfig.from_dict(values))
