"""Tasks: one interface the training loop calls, one module per family.

A task is a :class:`~experiments.tasks.base.Task`: it builds the model, gives
the chunks of each step's training batch as a pure function of (seed, step),
the loss on a batch, the fixed tracking batches the Hessian is measured on,
and its evaluation metrics per split. The loop (:mod:`experiments.train`)
knows no task by name; this table is where names meet classes.

==========================  ======================================================
``eos-fullbatch``           full-batch images: the classic edge-of-stability study
``image-classification``    minibatch images with train / val / test splits
``language-model``          causal Transformer on real text (word or character level)
``gflownet``                GFlowNet on the hypergrid, against its exact target distribution
==========================  ======================================================

The names and one-line summaries below are read without importing torch (the
CLI's help); :func:`task_class` imports the family's module.

Example:
    >>> sorted(TASKS)
    ['eos-fullbatch', 'gflownet', 'image-classification', 'language-model']
    >>> task_class("language-model").__name__
    'LanguageModelTask'
"""

from __future__ import annotations

import importlib

# name -> (module, class, one-line summary)
TASKS: dict[str, tuple[str, str, str]] = {
    "eos-fullbatch": ("experiments.tasks.images", "EosFullBatchTask",
                      "full-batch images (n_train balanced examples, MSE): sharpness vs 2/eta, Cohen et al. 2021"),
    "image-classification": ("experiments.tasks.images", "ImageClassificationTask",
                             "minibatch CNN image classification with augmentation, val and test splits"),
    "language-model": ("experiments.tasks.language", "LanguageModelTask",
                       "causal Transformer language model on Brown, Gutenberg, WikiText-2 or any text file"),
    "gflownet": ("experiments.tasks.gflownet", "GFlowNetTask",
                 "GFlowNet on the hypergrid (trajectory balance, detailed balance or flow matching), exact metrics"),
}


def task_class(name: str):
    """The class of task ``name``; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    module, cls, _ = TASKS[name]
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, device, dtype):
    """Build ``cfg.task`` for a validated config on ``device`` in ``dtype``."""
    return task_class(cfg.task)(cfg, device, dtype)
