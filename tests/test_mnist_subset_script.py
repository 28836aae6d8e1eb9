"""scripts/mnist-subset: a CSV of 784 pixels + label in, torchvision's MNIST files out."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import MNIST

from ssvi_cli.data import build_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mnist-subset"


def _csv(path: Path, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    with gzip.open(path, "wt") as f:
        np.savetxt(f, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    return pixels.reshape(-1, 28, 28), labels


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def _rows(images: np.ndarray) -> set[bytes]:
    return {row.astype(np.uint8).tobytes() for row in images}


def test_writes_a_stratified_split_that_torchvision_and_ssvi_read(tmp_path: Path) -> None:
    pixels, labels = _csv(tmp_path / "m.csv.gz", per_class=7)
    done = _run(tmp_path / "out", "--csv", tmp_path / "m.csv.gz", "--test-per-class", 2)
    assert done.returncode == 0, done.stderr
    assert "50 training and 20 test images" in done.stdout
    train, test = MNIST(tmp_path / "out", train=True), MNIST(tmp_path / "out", train=False)
    assert torch.bincount(test.targets, minlength=10).tolist() == [2] * 10
    assert torch.bincount(train.targets, minlength=10).tolist() == [5] * 10
    # every image lands in exactly one split, with its own label
    assert _rows(train.data.numpy()) | _rows(test.data.numpy()) == _rows(pixels)
    assert not _rows(train.data.numpy()) & _rows(test.data.numpy())
    by_pixels = {row.astype(np.uint8).tobytes(): int(y) for row, y in zip(pixels, labels)}
    for ds in (train, test):
        assert all(by_pixels[x.numpy().tobytes()] == int(y) for x, y in zip(ds.data, ds.targets))
    splits = build_dataset("mnist", data_dir=tmp_path / "out", val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    # the same seed picks the same test images
    assert _run(tmp_path / "again", "--csv", tmp_path / "m.csv.gz", "--test-per-class", 2).returncode == 0
    assert torch.equal(MNIST(tmp_path / "again", train=False).data, test.data)


def _one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    _csv(tmp_path / "m.csv.gz", per_class=3)
    (tmp_path / "narrow.csv").write_text("1,2,3\n")
    (tmp_path / "words.csv").write_text("a,b\n")
    for args, needle in (
        (["--csv", tmp_path / "m.csv.gz", "--test-per-class", 3], "class 0 has 3 images"),
        (["--csv", tmp_path / "narrow.csv"], "784 pixels and a label, got 3 columns"),
        (["--csv", tmp_path / "words.csv"], "cannot be read as a CSV of numbers"),
        (["--csv", tmp_path / "missing.csv"], "cannot be read as a CSV of numbers"),
    ):
        _one_line_error(_run(tmp_path / "out", *args), needle)
    assert not (tmp_path / "out").exists()


def test_existing_mnist_files_are_kept_unless_forced(tmp_path: Path) -> None:
    _csv(tmp_path / "a.csv.gz", per_class=4, seed=1)
    _csv(tmp_path / "b.csv.gz", per_class=4, seed=2)
    assert _run(tmp_path / "out", "--csv", tmp_path / "a.csv.gz", "--test-per-class", 1).returncode == 0
    raw = tmp_path / "out" / "MNIST" / "raw"
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    _one_line_error(_run(tmp_path / "out", "--csv", tmp_path / "b.csv.gz", "--test-per-class", 1), "add --force")
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
    assert _run(tmp_path / "out", "--csv", tmp_path / "b.csv.gz", "--test-per-class", 1, "--force").returncode == 0
    after = {p.name: p.read_bytes() for p in raw.iterdir()}
    assert sorted(after) == sorted(before) and after != before  # replaced, no temporary file left
    # torchvision reads a legacy processed/ file before raw/: the subset would go unseen
    (tmp_path / "old" / "MNIST" / "processed").mkdir(parents=True)
    (tmp_path / "old" / "MNIST" / "processed" / "training.pt").write_bytes(b"x")
    _one_line_error(_run(tmp_path / "old", "--csv", tmp_path / "a.csv.gz", "--force"), "reads it instead of raw/")
