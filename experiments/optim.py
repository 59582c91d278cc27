"""Optimizers and learning-rate schedules built from a :class:`RunConfig`.

Which optimizers exist, their classes, constructor arguments and display
names: the table in :mod:`experiments.optimizers`.  What the sharpness of
each is compared with (preconditioner, effective rate, threshold): its
class's adapter in :mod:`eos_toolkit.adapters`.

Schedules are stepped once per optimizer step. ``schedule`` is ``constant`` or
the name of any class in ``torch.optim.lr_scheduler`` (options from
``schedule_options``); ``CosineAnnealingLR``'s ``T_max`` and ``OneCycleLR``'s
``max_lr`` / ``total_steps`` default to the run's length and ``lr``. With
``warmup_steps`` > 0 a linear warmup from lr / warmup_steps comes first
(``SequentialLR``).
"""

from __future__ import annotations

import torch

from eos_toolkit.adapters import OptimizerAdapter, adapter_for_class
from experiments.config import ConfigError, RunConfig
from experiments.optimizers import optimizer_class, optimizer_entry


def optimizer_adapter(name: str) -> OptimizerAdapter:
    """The stability adapter of the optimizer called ``name`` (see :mod:`eos_toolkit.adapters`)."""
    return adapter_for_class(optimizer_class(name))


def parameter_groups(model: torch.nn.Module, cfg: RunConfig) -> list:
    """The trainable parameters, or with ``no_decay_groups`` three param groups.

    Groups (in this order): weight matrices and kernels (decayed with
    ``weight_decay``); biases and normalisation weights (every tensor of
    dimension < 2; no decay); embeddings (``nn.Embedding`` weights, a tied
    read-out included; no decay). VRAdam's global velocity norm spans all
    groups, so its gate is the same as with one group.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.no_decay_groups:
        return params
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups = {"decay": [], "no_decay": [], "embeddings": []}
    for p in params:
        key = "embeddings" if id(p) in embedding else "no_decay" if p.dim() < 2 else "decay"
        groups[key].append(p)
    built = [{"params": groups["decay"]},
             {"params": groups["no_decay"], "weight_decay": 0.0},
             {"params": groups["embeddings"], "weight_decay": 0.0}]
    return [g for g in built if g["params"]]  # a model without embeddings has two


def build_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``params`` (tensors or param groups)."""
    return optimizer_class(cfg.optimizer)(params, lr=cfg.lr, **optimizer_entry(cfg.optimizer).arguments(cfg))


def schedule_names() -> list[str]:
    """The torch.optim.lr_scheduler classes a run can name (those that wrap other schedulers excluded)."""
    lrs = torch.optim.lr_scheduler
    return sorted(n for n, c in vars(lrs).items()
                  if isinstance(c, type) and issubclass(c, lrs.LRScheduler) and not n.startswith("_")
                  and n not in ("LRScheduler", "SequentialLR", "ChainedScheduler"))


def check_schedule_name(name: str) -> None:
    if name != "constant" and name not in schedule_names():
        raise ConfigError(f"unknown schedule {name!r}; allowed: constant, {', '.join(schedule_names())}")


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The lr scheduler for ``cfg`` (or None for a constant rate without warmup)."""
    main = None
    if cfg.schedule != "constant":
        check_schedule_name(cfg.schedule)
        cls = getattr(torch.optim.lr_scheduler, cfg.schedule)
        options = dict(cfg.schedule_options)
        remaining = max(1, total_steps - cfg.warmup_steps)
        if cfg.schedule == "CosineAnnealingLR":
            options.setdefault("T_max", remaining)
        if cfg.schedule == "OneCycleLR":
            options.setdefault("max_lr", cfg.lr)
            options.setdefault("total_steps", remaining)
        try:
            main = cls(optimizer, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"schedule {cfg.schedule} rejected schedule_options {options}: {exc}") from None
    if cfg.warmup_steps == 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / cfg.warmup_steps, end_factor=1.0, total_iters=cfg.warmup_steps)
    if main is None:
        return warmup
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_steps])
