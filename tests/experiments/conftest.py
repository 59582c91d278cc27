"""Isolated data directories for the data, training and CLI tests, and a tiny learnable Fashion-MNIST in IDX."""

import gzip
import sys

import numpy as np
import pytest

from experiments.data import sources
from tests.experiments.idx import IDX_NAMES, idx_bytes


def _class_patterns(n: int, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class c lights up row c of the image, with noise: learnable, not trivially separable."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 120, size=(n, side, side))
    for i, c in enumerate(labels):
        images[i, c % side, :] += 120
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A data directory with nothing in it: no env var, empty cache, no system files, no scikit-learn."""
    monkeypatch.delenv("EOS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "DEBIAN_INSTALL_ROOT", tmp_path / "system")
    for module in ("sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def tiny_data_dir(isolated):
    """An isolated data dir holding a 10x10 'fashion-mnist' (200 train, 50 test) and nothing else."""
    rng = np.random.default_rng(0)
    directory = isolated / "fashion-mnist"
    directory.mkdir()
    for split, n in (("train", 200), ("test", 50)):
        images, labels = _class_patterns(n, 10, rng)
        for stem, array in zip(IDX_NAMES[split], (images, labels)):
            (directory / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return isolated
