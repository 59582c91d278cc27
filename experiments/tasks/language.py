"""``language-model``: a causal Transformer trained on real text, its sharpness tracked on fixed windows.

Data: a corpus from :mod:`experiments.data.text` (``--data brown | gutenberg |
shakespeare | wikitext-2 | text:PATH | auto``), tokenised at word or
character level; a window is ``context + 1`` consecutive tokens of a split
(inputs: the first ``context``, targets: the last ``context``).

- Training, minibatch (default): each step draws ``batch_size`` windows at
  uniformly random positions of the training split from a generator seeded by
  (seed, step), so a resumed run sees the same batches.
- Training, full batch (``full_batch: true``): ``n_train`` windows drawn once
  (seeded by the run's seed) are the whole training set, trained on in chunks
  of ``chunk_size`` windows, and also the tracking set: the tracked Hessian is
  the training objective's (Cohen et al. 2021 ran full-batch Transformers on
  WikiText-2 this way).
- Tracking: otherwise ``track_n`` training windows drawn once (seeded), so the
  tracked operator is a fixed function of the parameters.
- Loss: mean cross-entropy over every position of every window (an unweighted
  mean over tokens, so chunking by windows is exact).
- Evaluation: ``val`` / ``test`` on the split's non-overlapping windows
  (all of them by default; ``eval_n`` of them spread evenly over the split
  when set, for speed); metrics
  ``{split}_loss`` and ``{split}_ppl`` = exp(mean token loss), for ``track``
  too. ``val_ppl_unigram`` is the perplexity of an add-one-smoothed unigram
  model of the training tokens on the same validation targets: a model that
  learned nothing about context sits there. ``tokens_per_second`` measures
  training throughput between tracking steps.

The corpus's source, checksum, vocabulary and split are recorded in the run's
environment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from eos_toolkit import metrics as names
from eos_toolkit.modes import module_mode
from experiments.config import ConfigError, RunConfig
from experiments.data import load_corpus, resolve_corpus
from experiments.data.text import SPLITS
from experiments.models import build_transformer
from experiments.tasks.base import Task, chunks, seeded_generator, size_weighted


def windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``tokens[s : s + context]`` and targets ``tokens[s + 1 : s + context + 1]`` for each start."""
    index = starts.to(tokens.device).unsqueeze(1) + torch.arange(context + 1, device=tokens.device)
    block = tokens[index]
    return block[:, :-1], block[:, 1:]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: logits (..., vocab), integer targets (...)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def unigram_perplexity(train: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``targets`` of the add-one-smoothed unigram distribution of ``train``."""
    counts = torch.bincount(train.cpu(), minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return math.exp(-float(log_p[targets.reshape(-1).cpu()].mean()))


class LanguageModelTask(Task):
    """Causal Transformer language model (module docstring)."""

    options = ("dataset", "data_dir", "vocab_size", "context", "model_options", "batch_size", "full_batch",
               "n_train", "track_n", "eval_n", "chunk_size", "steps", "epochs")
    defaults = {"model": "transformer", "loss": "cross-entropy", "optimizer": "adamw", "lr": 3e-3, "steps": 600,
                "batch_size": 32, "track_n": 32, "full_batch": False, "n_train": 256,
                "chunk_size": 32, "track_every": 50}
    throughput_unit = "tokens"
    model_options = "n_layer (2), n_head (4), d_model (128), dropout (0), tie_weights (true)"

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype):
        if cfg.model != "transformer":
            raise ConfigError(f"language-model trains model 'transformer', got model {cfg.model!r}")
        if cfg.loss != "cross-entropy":
            raise ConfigError(f"language-model uses loss 'cross-entropy', got loss {cfg.loss!r}")
        self.cfg, context = cfg, cfg.context
        name = self.resolve_data(cfg)
        corpus = load_corpus(name, cfg.data_dir, cfg.vocab_size)
        for split in SPLITS:
            if len(corpus.tokens(split)) < context + 1:
                raise ConfigError(f"the {split} split of {name} has {len(corpus.tokens(split))} tokens, fewer than "
                                  f"context + 1 = {context + 1}; lower context")
        self.tokens = {split: corpus.tokens(split).to(device) for split in SPLITS}
        self.vocab_size = corpus.vocab_size
        fixed = seeded_generator(cfg.seed, stream=1)
        last_start = len(self.tokens["train"]) - context - 1
        n_fixed = cfg.n_train if cfg.full_batch else cfg.track_n
        self.fixed = windows(self.tokens["train"], torch.randint(0, last_start + 1, (n_fixed,), generator=fixed),
                             context)
        self.track_batches = chunks(*self.fixed, cfg.chunk_size)
        self.eval_windows = {}
        for split in ("val", "test"):
            ids = self.tokens["valid" if split == "val" else "test"]
            starts = torch.arange(0, len(ids) - context, context)  # non-overlapping windows
            if cfg.eval_n is not None and cfg.eval_n < len(starts):  # spread over the whole split
                starts = starts[torch.linspace(0, len(starts) - 1, cfg.eval_n).round().long()]
            self.eval_windows[split] = windows(ids, starts, context)
        self.splits = ("track", "val", "test")
        self.unigram_val_ppl = unigram_perplexity(self.tokens["train"], self.eval_windows["val"][1], self.vocab_size)
        model = build_transformer(self.vocab_size, context, seed=cfg.seed, **cfg.model_options)
        self.model = model.to(device=device, dtype=dtype)
        n_per_epoch = max(1, len(self.tokens["train"]) // (cfg.batch_size * context))
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * (1 if cfg.full_batch else n_per_epoch)
        self.items_per_step = (cfg.n_train if cfg.full_batch else cfg.batch_size) * context
        self.data_info = {**corpus.record, "dataset_requested": cfg.dataset, "context": context,
                          "n_track_windows": n_fixed, "eval_windows": {s: len(w[0]) for s, w in self.eval_windows.items()},
                          "unigram_val_ppl": self.unigram_val_ppl}

    @classmethod
    def resolve_data(cls, cfg) -> str:
        return resolve_corpus(cfg.dataset, cfg.data_dir)

    def loss_fn(self, logits, targets):
        return token_cross_entropy(logits, targets)

    def train_chunks(self, step: int):
        cfg = self.cfg
        if cfg.full_batch:
            return size_weighted(self.track_batches)
        g = seeded_generator(cfg.seed, stream=0, step=step)
        last_start = len(self.tokens["train"]) - cfg.context - 1
        x, y = windows(self.tokens["train"], torch.randint(0, last_start + 1, (cfg.batch_size,), generator=g),
                       cfg.context)
        return [(x, y, 1.0)]

    def evaluate(self, split: str) -> dict[str, torch.Tensor]:
        batches = self.track_batches if split == "track" else chunks(*self.eval_windows[split], self.cfg.chunk_size)
        loss = 0.0
        with torch.no_grad(), module_mode(self.model):  # dropout off
            for x, y, w in size_weighted(batches):
                loss = loss + self.loss_fn(self.model(x), y) * w
        metrics = {names.split_metric(split, "loss"): loss, names.split_metric(split, "ppl"): torch.exp(loss)}
        if split == "val":
            metrics["val_ppl_unigram"] = torch.tensor(self.unigram_val_ppl)
        return metrics
