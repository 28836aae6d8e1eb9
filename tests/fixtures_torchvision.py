"""Tiny datasets written in torchvision's exact on-disk formats, for offline tests.

Each ``write_*`` takes the ``root`` that torchvision (and ``ssvi --data-dir``) is given and
writes random uint8 images with balanced labels (``i % num_classes``). Images are random, so
every example is distinct and tests can tell which examples landed in which split.

Checksums: torchvision reads MNIST-family raw files without an md5 (``_check_exists`` only asks
``check_integrity(path)`` with no checksum), but CIFAR-10/100 (``_check_integrity``,
``_load_meta``) and SVHN (``_check_integrity``) compare every file with the md5 of the official
release, which a fixture cannot reproduce. ``accept_fixture_checksums(monkeypatch, root)``
therefore swaps the md5s in torchvision's class-level file tables for the md5s of the files the
fixture wrote. The patch lives in the test only (pytest undoes it after the test), library code
is untouched, and torchvision's own check still runs, so a missing or altered file still fails.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets as tvd

from ssvi_cli.data import CIFAR100_NAMES

CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_COARSE_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, num_classes: int) -> np.ndarray:
    return np.arange(n) % num_classes


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX ("Pascal Vincent") file: big-endian magic 0x0000 08 <ndim>, big-endian dims, bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, name: str = "MNIST", n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Uncompressed IDX files in ``<root>/<name>/raw`` (name: MNIST, FashionMNIST or KMNIST)."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _images(rng, n, (28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", _labels(n, 10))
    return raw


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(rng: np.random.Generator, labels: np.ndarray, label_key: str, tag: str) -> dict:
    """One CIFAR pickle: rows of 3072 bytes (R plane, G plane, B plane, each 32x32 row-major)."""
    return {
        "batch_label": tag,
        label_key: labels.tolist(),
        "data": _images(rng, len(labels), (3 * 32 * 32,)),
        "filenames": [f"{tag}_{i}.png" for i in range(len(labels))],
    }


def write_cifar10(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for b, part in enumerate(np.array_split(_labels(n_train, 10), 5), start=1):
        _pickle(folder / f"data_batch_{b}", _cifar_batch(rng, part, "labels", f"training batch {b} of 5"))
    _pickle(folder / "test_batch", _cifar_batch(rng, _labels(n_test, 10), "labels", "testing batch 1 of 1"))
    meta = {"label_names": list(CIFAR10_NAMES), "num_cases_per_batch": -(-n_train // 5), "num_vis": 3072}
    _pickle(folder / "batches.meta", meta)
    return folder


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """``<root>/cifar-100-python/{train, test, meta}`` with fine and coarse labels.

    Coarse labels are ``fine // 5``, not CIFAR-100's real grouping: torchvision ignores them.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = _labels(n, 100)
        batch = _cifar_batch(rng, fine, "fine_labels", split)
        batch["coarse_labels"] = (fine // 5).tolist()
        _pickle(folder / split, batch)
    meta = {"fine_label_names": list(CIFAR100_NAMES), "coarse_label_names": list(CIFAR100_COARSE_NAMES)}
    _pickle(folder / "meta", meta)
    return folder


def write_svhn(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """``<root>/{train,test}_32x32.mat``: 'X' is (32, 32, 3, N) uint8, 'y' is (N, 1), 10 = digit 0."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        digits = _labels(n, 10)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        x = np.ascontiguousarray(_images(rng, n, (32, 32, 3)).transpose(1, 2, 3, 0))
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return root


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _with_md5s(table: list[list[str]], folder: Path) -> list[list[str]]:
    return [[name, _md5(folder / name) if (folder / name).is_file() else md5] for name, md5 in table]


def accept_fixture_checksums(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's md5 tables expect the fixture files under ``root`` (see module doc)."""
    root = Path(root)
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        folder = root / cls.base_folder
        monkeypatch.setattr(cls, "train_list", _with_md5s(cls.train_list, folder))
        monkeypatch.setattr(cls, "test_list", _with_md5s(cls.test_list, folder))
        meta_file = folder / cls.meta["filename"]
        if meta_file.is_file():
            monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(meta_file)})
    split_list = dict(tvd.SVHN.split_list)
    for split, (url, filename, md5) in tvd.SVHN.split_list.items():
        if (root / filename).is_file():
            split_list[split] = [url, filename, _md5(root / filename)]
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)


def write_all(root: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    """Every torchvision set ssvi knows, small, under ``root``; checksums accepted if given."""
    for name in ("MNIST", "FashionMNIST", "KMNIST"):
        write_mnist(root, name)
    write_cifar10(root)
    write_cifar100(root)
    write_svhn(root)
    if monkeypatch is not None:
        accept_fixture_checksums(monkeypatch, root)
    return Path(root)
