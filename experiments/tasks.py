"""Tasks: what data, which model, which loss, and which fixed subset the tracker measures on.

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from experiments import data as datasets
from experiments.config import RunConfig
from experiments.models import build_model

Batch = tuple[torch.Tensor, torch.Tensor]


def mse_one_hot(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0.5 * |outputs - onehot(labels)|^2 summed over classes, averaged over examples."""
    targets = F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - targets).pow(2).sum(dim=-1).mean()


def cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``outputs`` against integer ``labels``."""
    return F.cross_entropy(outputs, labels)


LOSS_FUNCTIONS: dict[str, Callable] = {"mse": mse_one_hot, "cross-entropy": cross_entropy}


def chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> list[Batch]:
    """Split (x, y) into consecutive chunks of at most ``size`` examples (views, no copies)."""
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@dataclass
class PreparedTask:
    """Everything the training loop needs, already on the run's device and dtype."""

    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: Batch  # the full-batch subset, or the whole training split
    track_batches: list[Batch]  # fixed chunks the sharpness and tracking metrics use
    val: Batch | None
    test: Batch | None
    augmentation: dict  # crop_padding and flip for this data set (minibatch training)
    data_info: dict  # what was read, from where; recorded in environment.json


def prepare_task(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> PreparedTask:
    """Load data, build the model (seeded by ``cfg.seed``) and pick the loss for ``cfg.task``."""
    name = datasets.resolve_dataset(cfg.dataset, data_dir=cfg.data_dir)
    full = datasets.load_dataset(name, split="train", data_dir=cfg.data_dir)
    info = {"dataset": name, "dataset_requested": cfg.dataset, "source": full.source,
            "checksum": full.checksum, "num_classes": full.num_classes}

    val = test = None
    if cfg.task == "eos-fullbatch":
        train = datasets.balanced_subset(full, cfg.n_train, seed=cfg.seed)
    else:
        train, val = datasets.train_val_split(full, cfg.val_fraction, seed=cfg.seed)
        if cfg.n_train is not None:
            train = datasets.balanced_subset(train, cfg.n_train, seed=cfg.seed)
        try:
            test = datasets.load_dataset(name, split="test", data_dir=cfg.data_dir)
            info.update(test_source=test.source, test_checksum=test.checksum)
        except ValueError as exc:  # missing test files, or a data set with a train split only
            info["test_split"] = f"unavailable: {exc}"
    normalise = datasets.fit_normalization(train)
    info.update(n_train=len(train.labels), normalisation=dataclasses.asdict(normalise))

    def to_device(ds) -> Batch:
        return normalise(ds.images).to(device=device, dtype=dtype), ds.labels.to(device)

    train_xy = to_device(train)
    val_xy = to_device(val) if val is not None else None
    test_xy = to_device(test) if test is not None else None
    if cfg.task == "eos-fullbatch":
        track = chunks(*train_xy, cfg.chunk_size)
    else:
        n = min(cfg.track_n, len(train_xy[0]))
        track = chunks(train_xy[0][:n], train_xy[1][:n], cfg.chunk_size)
        info["n_track"] = n

    model = build_model(cfg.model, train.input_shape, full.num_classes, seed=cfg.seed, **cfg.model_options)
    model = model.to(device=device, dtype=dtype)
    return PreparedTask(model=model, loss_fn=LOSS_FUNCTIONS[cfg.loss], train=train_xy, track_batches=track,
                        val=val_xy, test=test_xy, augmentation=datasets.default_augmentation(name), data_info=info)
