"""Image tasks: what data, which model, which loss, and which fixed subset the tracker measures on.

``eos-fullbatch``
    The classic edge-of-stability study (Cohen et al. 2021): a fixed,
    class-balanced subset of ``n_train`` training images, every step on the
    whole subset (computed in chunks of ``chunk_size``), MSE on one-hot targets
    (0.5 * squared error summed over classes, averaged over examples) or
    cross-entropy. Sharpness is measured on the same subset: it is the
    training objective's Hessian.

``image-classification``
    Minibatch training with train / validation / test splits and the usual
    augmentation (random crop with padding; horizontal flips where the data
    allow them). Sharpness is measured on a fixed subset of ``track_n``
    un-augmented training images.

Inputs are scaled to [0, 1] and standardised per channel with the training
split's mean and standard deviation (recorded in the run's environment).
Metrics per split: ``{split}_loss`` and ``{split}_acc`` (``track``: the
training objective on the tracking subset, BatchNorm with batch statistics;
``val`` / ``test``: eval mode).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from eos_toolkit import metrics as names
from eos_toolkit.modes import module_mode
from experiments import data as datasets
from experiments.config import ConfigError, RunConfig
from experiments.data import augment_batch
from experiments.models import build_model
from experiments.tasks.base import Batch, Task, chunks, size_weighted


def mse_one_hot(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0.5 * |outputs - onehot(labels)|^2 summed over classes, averaged over examples."""
    targets = F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - targets).pow(2).sum(dim=-1).mean()


def cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``outputs`` against integer ``labels``."""
    return F.cross_entropy(outputs, labels)


LOSS_FUNCTIONS: dict[str, Callable] = {"mse": mse_one_hot, "cross-entropy": cross_entropy}


def evaluate(model: torch.nn.Module, loss_fn, batches: list, *, train_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean loss and accuracy over ``batches`` (0-dim device tensors, no sync).

    ``train_mode`` evaluates the training objective (BatchNorm with batch
    statistics, running statistics untouched); otherwise in eval mode. Dropout
    is off either way (:func:`eos_toolkit.modes.module_mode`, as the tracker uses).
    """
    n = sum(len(x) for x, _ in batches)
    loss = acc = 0.0
    with torch.no_grad(), module_mode(model, bn_mode="batch_stats" if train_mode else "eval"):
        for x, y in batches:
            out = model(x)
            loss = loss + loss_fn(out, y) * (len(x) / n)
            acc = acc + (out.argmax(-1) == y).sum() / n
    return loss, acc


class ImageTask(Task):
    """Shared by the image tasks: data, normalisation, model, loss, evaluation."""

    options = ("dataset", "data_dir", "model", "model_options", "loss", "n_train", "chunk_size", "full_batch")

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype):
        if cfg.loss not in LOSS_FUNCTIONS:
            raise ConfigError(f"unknown loss {cfg.loss!r}; allowed: {', '.join(LOSS_FUNCTIONS)}")
        self.cfg = cfg
        name = self.resolve_data(cfg)
        full = datasets.load_dataset(name, split="train", data_dir=cfg.data_dir)
        info = {"dataset": name, "dataset_requested": cfg.dataset, "source": full.source,
                "checksum": full.checksum, "num_classes": full.num_classes}
        val = test = None
        if self.held_out:
            train, val = datasets.train_val_split(full, cfg.val_fraction, seed=cfg.seed)
            if cfg.n_train is not None:
                train = datasets.balanced_subset(train, cfg.n_train, seed=cfg.seed)
            try:
                test = datasets.load_dataset(name, split="test", data_dir=cfg.data_dir)
                info.update(test_source=test.source, test_checksum=test.checksum)
            except ValueError as exc:  # missing test files, or a data set with a train split only
                info["test_split"] = f"unavailable: {exc}"
        else:
            train = datasets.balanced_subset(full, cfg.n_train, seed=cfg.seed)
        normalise = datasets.fit_normalization(train)
        info.update(n_train=len(train.labels), normalisation=dataclasses.asdict(normalise))

        def to_device(ds) -> Batch:
            return normalise(ds.images).to(device=device, dtype=dtype), ds.labels.to(device)

        self.train = to_device(train)
        self.val = to_device(val) if val is not None else None
        self.test = to_device(test) if test is not None else None
        if self.held_out:
            n = min(cfg.track_n, len(self.train[0]))
            self.track_batches = chunks(self.train[0][:n], self.train[1][:n], cfg.chunk_size)
            info["n_track"] = n
        else:
            self.track_batches = chunks(*self.train, cfg.chunk_size)
        self.splits = ("track",) + tuple(s for s, d in (("val", self.val), ("test", self.test)) if d is not None)
        self.augmentation = datasets.default_augmentation(name)
        self.data_info = info
        self._loss = LOSS_FUNCTIONS[cfg.loss]
        model = build_model(cfg.model, train.input_shape, full.num_classes, seed=cfg.seed, **cfg.model_options)
        self.model = model.to(device=device, dtype=dtype)
        n_train = len(self.train[0])
        if cfg.full_batch:
            self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs
            self.items_per_step = n_train
        else:
            self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * max(1, n_train // cfg.batch_size)
            self.items_per_step = cfg.batch_size

    @classmethod
    def resolve_data(cls, cfg) -> str:
        return datasets.resolve_dataset(cfg.dataset, data_dir=cfg.data_dir)

    held_out = True  # train / val / test splits (image-classification); eos-fullbatch trains on a subset only

    def loss_fn(self, outputs, labels):
        return self._loss(outputs, labels)

    def train_chunks(self, step: int):
        if self.cfg.full_batch:
            return size_weighted(chunks(*self.train, self.cfg.chunk_size))
        x, y = self._minibatch(step)
        return [(x, y, 1.0)]

    def _minibatch(self, step: int) -> Batch:
        """The minibatch of ``step``: a seeded permutation per epoch, seeded augmentation per step.

        Both depend only on (seed, step), so a resumed run sees the same batches.
        """
        cfg = self.cfg
        x, y = self.train
        per_epoch = max(1, len(x) // cfg.batch_size)
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(x.device)
        xb, yb = x[idx], y[idx]
        if cfg.augment:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            xb = augment_batch(xb, g, **self.augmentation)
        return xb, yb

    def evaluate(self, split: str) -> dict[str, torch.Tensor]:
        if split == "track":
            loss, acc = evaluate(self.model, self.loss_fn, self.track_batches, train_mode=True)
        else:
            data = {"val": self.val, "test": self.test}[split]
            loss, acc = evaluate(self.model, self.loss_fn, chunks(*data, self.cfg.chunk_size), train_mode=False)
        return {names.split_metric(split, "loss"): loss, names.split_metric(split, "acc"): acc}


class EosFullBatchTask(ImageTask):
    """Full-batch gradient steps on a fixed class-balanced subset; its Hessian is the one tracked."""

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype):
        if not cfg.full_batch:
            raise ConfigError("eos-fullbatch trains full batch (full_batch must be true); use "
                              "image-classification for minibatches")
        super().__init__(cfg, device, dtype)

    held_out = False
    options = ("dataset", "data_dir", "model", "model_options", "loss", "n_train", "chunk_size")
    defaults = {"model": "mlp-tanh", "loss": "mse", "n_train": 5000, "steps": 1000, "full_batch": True,
                "optimizer": "gd", "lr": 0.05, "chunk_size": 1000, "batch_size": 128,
                "track_every": 10}


class ImageClassificationTask(ImageTask):
    """Minibatch training with augmentation; sharpness on a fixed un-augmented subset of ``track_n`` images."""

    options = ImageTask.options + ("batch_size", "epochs", "augment", "val_fraction", "track_n")
    defaults = {"model": "cnn-small", "loss": "cross-entropy", "full_batch": False, "optimizer": "gd", "lr": 0.05,
                "track_n": 1000, "chunk_size": 1000, "batch_size": 128,
                "track_every": 10}
