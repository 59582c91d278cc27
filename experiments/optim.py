"""Optimizers and learning-rate schedules by name, from a :class:`RunConfig`.

Every optimizer gets the same ``lr`` meaning (the maximal rate) so that
schedules, warmup and the stability thresholds treat them alike:

============  ==========================================================
gd, sgd       torch.optim.SGD, no momentum (full-batch: gradient descent)
momentum      SGD with heavy-ball momentum ``momentum``
nesterov      SGD with Nesterov momentum ``momentum``
adam          torch.optim.Adam (coupled L2 if weight_decay > 0)
adamw         torch.optim.AdamW (decoupled weight decay)
rmsprop       torch.optim.RMSprop (alpha = beta2)
radam         torch.optim.RAdam
vradam        vradam.VRAdam (beta3, alpha1, gate, power, norm_scope)
============  ==========================================================

Schedules are stepped once per optimizer step. ``schedule`` is ``constant`` or
the name of any class in ``torch.optim.lr_scheduler`` (options from
``schedule_options``); ``CosineAnnealingLR``'s ``T_max`` and ``OneCycleLR``'s
``max_lr`` / ``total_steps`` default to the run's length and ``lr``. With
``warmup_steps`` > 0 a linear warmup from lr / warmup_steps comes first
(``SequentialLR``).
"""

from __future__ import annotations

import torch

from eos_toolkit.thresholds import adam_threshold, gd_threshold, heavy_ball_threshold, nesterov_threshold
from experiments.config import ConfigError, RunConfig
from vradam import VRAdam


def build_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``params``."""
    name, lr, wd = cfg.optimizer, cfg.lr, cfg.weight_decay
    betas = (cfg.beta1, cfg.beta2)
    if name in ("gd", "sgd"):
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=cfg.beta2, eps=cfg.eps, weight_decay=wd)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if name == "vradam":
        return VRAdam(params, lr=lr, betas=betas, beta3=cfg.beta3, alpha1=cfg.alpha1, eps=cfg.eps,
                      weight_decay=wd, gate=cfg.gate, power=cfg.power, norm_scope=cfg.norm_scope)
    raise ConfigError(f"unknown optimizer {name!r}")


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


def stability_threshold(cfg: RunConfig, rate: float) -> float:
    """The sharpness at which ``cfg``'s optimizer at step size ``rate`` stops being stable.

    On a quadratic with curvature lambda (Cohen et al. 2021, 2022):

    - gradient descent: lambda < 2 / eta;
    - heavy ball as torch.optim.SGD writes it (buf = beta buf + g; p -= eta buf):
      lambda < 2 (1 + beta) / eta;
    - Nesterov as torch.optim.SGD writes it: lambda < 2 (1 + beta) / ((1 + 2 beta) eta);
    - Adam-family (the *preconditioned* sharpness; EMA momentum with beta1):
      2 (1 + beta1) / ((1 - beta1) eta), 38 / eta at beta1 = 0.9; RMSprop has
      no momentum, so 2 / eta.
    """
    if cfg.optimizer in ("gd", "sgd", "rmsprop"):
        return gd_threshold(rate)
    if cfg.optimizer == "momentum":
        return heavy_ball_threshold(rate, cfg.momentum)
    if cfg.optimizer == "nesterov":
        return nesterov_threshold(rate, cfg.momentum)
    return adam_threshold(rate, cfg.beta1)
