"""Train/validation/test datasets of a named source: the seeded stratified validation split (or the
source's own, as an image folder's ``val/``), the ``max_train`` cap, and the tensor datasets training
and evaluation read."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ssvi_cli.config import DataConfig
from ssvi_cli.data.classes import resolve_classes, restrict_spec, split_classes
from ssvi_cli.data.images import UnreadableImages
from ssvi_cli.data.sources import DatasetSource, read_split, source
from ssvi_cli.data.spec import DataError, DataSpec, DataSplits, RawImages, decoded
from ssvi_cli.data.transforms import TensorImageDataset
from ssvi_cli.warned import warnings_scope

logger = logging.getLogger(__name__)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into (keep, held_out) indices, holding out ``round(fraction * N)`` examples.

    Each class gives ``floor(fraction * n_c)`` examples; the remainder goes to the classes with
    the largest fractional parts (ties broken at random), so tiny classes still contribute, but never
    a class's last kept example: every class keeps at least one. An example rounding would take from
    such a class comes from the next class that can give one; only when none can is the held-out
    count below ``round(fraction * N)``.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes, counts = np.unique(y, return_counts=True)
    quota = fraction * counts
    n_held = np.floor(quota).astype(int)
    extra = int(round(fraction * len(y))) - int(n_held.sum())
    order = np.lexsort((rng.random(len(classes)), -(quota - n_held)))
    order = order[n_held[order] + 1 < counts[order]]  # a class left with nothing would never be learnt
    n_held[order[:extra]] += 1
    keep, held = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for c, k in zip(classes, n_held):
        idx = rng.permutation(np.flatnonzero(y == c))
        held.append(idx[:k])
        keep.append(idx[k:])
    as_tensor = lambda parts: torch.from_numpy(np.sort(np.concatenate(parts))).long()  # noqa: E731
    return as_tensor(keep), as_tensor(held)


TEST_DRAW_SEED = 0  # data.max_test's draw: one subset for every seed, so that runs are scored alike


def _cap(indices: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """A seeded subset of at most ``limit`` indices (order kept)."""
    if limit is None or len(indices) <= limit:
        return indices
    chosen = np.random.default_rng(seed).choice(len(indices), size=limit, replace=False)
    return indices[torch.from_numpy(np.sort(chosen))]


def train_size(name: str, *, data_dir: Path | None = None, download: bool = False, val_fraction: float = 0.1,
               seed: int = 0, max_train: int | None = None, options: Optional[DataConfig] = None) -> int:
    """The number of training examples :func:`build_dataset` gives for the same arguments, found from
    the labels alone: an image folder's images are not decoded."""
    entry = source(name, options)
    train_raw = read_split(entry, name, data_dir=data_dir, download=download, train=True)
    if options is not None and options.classes is not None:
        train_raw = split_classes(train_raw, resolve_classes(options.classes, train_raw.class_names, name))[0]
    own_val = 0 if entry.load_val is not None else None  # its size does not change the training split
    return len(_indices(train_raw.labels, own_val, val_fraction, seed, max_train)[0])


def _indices(train_labels: torch.Tensor, own_val: Optional[int], val_fraction: float, seed: int,
             max_train: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and validation positions: all of the training split and the source's own
    validation split of ``own_val`` examples, or a seeded stratified carve of the training split;
    ``max_train`` caps the training part (seeded), and the validation part in proportion: the
    carve's ``val_fraction / (1 - val_fraction)``, or the share of the training split kept of the
    source's own (which ``val_fraction`` does not size)."""
    if own_val is not None:
        train_idx, val_idx = torch.arange(len(train_labels)), torch.arange(own_val)
    else:
        train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    if max_train is not None:
        max_val = (math.ceil(own_val * min(1.0, max_train / max(1, len(train_idx)))) if own_val is not None
                   else math.ceil(max_train * val_fraction / (1.0 - val_fraction)))
        train_idx, val_idx = _cap(train_idx, max_train, seed), _cap(val_idx, max_val, seed + 1)
    return train_idx, val_idx


@warnings_scope()  # a notebook's second call says a folder's warnings again (a command's: once)
def build_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    max_train: int | None = None,
    options: Optional[DataConfig] = None,
    needed: tuple[str, ...] = ("train", "val", "test"),
    max_test: int | None = None,
) -> DataSplits:
    """Train/val/test datasets for ``name``; val is a stratified, seeded part of the train split
    unless the source has its own (an image folder's ``val/``; ``val_fraction`` is then unused).

    ``max_train`` caps the train split (seeded); val is then capped in the same proportion
    ``val_fraction / (1 - val_fraction)`` (a source's own val split: as much of it as of the train
    split is kept) so quick runs stay quick; ``max_test`` caps the test split, with one draw whatever
    the seed (runs of several seeds score the same images). ``options`` (the data config)
    sizes and normalises a parameterised source such as ``imagefolder:PATH``, and its ``classes``
    keep part of the classes in every split (``data/classes.py``), the rest of the test split
    becoming ``heldout``. ``needed``: the splits to read; the others are left empty (an image folder
    then decodes only the images of those asked for).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for what, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and cap < 1:
            raise DataError(f"{what} must be a positive number of examples, got {cap}")
    entry = source(name, options)
    train_raw = read_split(entry, name, data_dir=data_dir, download=download, train=True)
    test_raw = read_split(entry, name, data_dir=data_dir, download=download, train=False)
    spec = replace(entry.spec, class_names=train_raw.class_names)
    if spec.num_classes != len(spec.class_names):
        raise DataError(
            f"{name} files list {len(spec.class_names)} classes, expected {spec.num_classes}; "
            "the files under the data directory are not the original dataset"
        )
    return _splits(name, entry, spec, train_raw, test_raw, options, val_fraction, seed, augment, (max_train, max_test),
                   needed)


def _splits(name: str, entry: DatasetSource, spec: DataSpec, train_raw: RawImages, test_raw: RawImages,
            options: Optional[DataConfig], val_fraction: float, seed: int, augment: bool,
            caps: tuple[int | None, int | None], needed: tuple[str, ...]) -> DataSplits:
    """build_dataset's splits, from its two parts read."""
    wanted = options.classes if options is not None else None
    kept = None if wanted is None else resolve_classes(wanted, spec.class_names, name)
    heldout = None
    if kept is not None:  # every split keeps the listed classes, relabelled 0..k-1
        spec = restrict_spec(spec, kept)
        train_raw, _ = split_classes(train_raw, kept)
        test_raw, heldout = split_classes(test_raw, kept)
    failed: list[UnreadableImages] = []  # an image folder's files that do not decode, in every split read

    def decode(images: Any) -> Optional[torch.Tensor]:
        try:
            return decoded(images)
        except UnreadableImages as exc:
            failed.append(exc)
            return None

    if entry.complete_spec is not None and (train_images := decode(train_raw.images)) is not None:
        train_raw = replace(train_raw, images=train_images)  # measured on all of it
        spec = entry.complete_spec(spec, train_raw)
    if entry.load_val is not None:
        val_raw = entry.load_val() if kept is None else split_classes(entry.load_val(), kept)[0]
    else:
        val_raw = train_raw
    own_val = len(val_raw.labels) if entry.load_val is not None else None
    max_train, max_test = caps
    train_idx, val_idx = _indices(train_raw.labels, own_val, val_fraction, seed, max_train)
    parts = {"train": (train_raw, train_idx), "val": (val_raw, val_idx),
             "test": (test_raw, _cap(torch.arange(len(test_raw.labels)), max_test, TEST_DRAW_SEED))}
    known_bad = bool(failed)  # the training images, all of them tried: their parts are not decoded again
    images = {part: decode(raw.images[idx if part in needed else idx[:0]])
              if not (known_bad and raw is train_raw) else None for part, (raw, idx) in parts.items()}
    held = None if heldout is None else decode(heldout)
    if failed:  # every split read, so that one error names every file that does not decode
        raise failed[0] if len(failed) == 1 else UnreadableImages.merged(failed)

    def subset(part: str, aug: Callable | None = None) -> TensorImageDataset:
        raw, idx = parts[part]
        idx = idx if part in needed else idx[:0]
        return TensorImageDataset(images[part], raw.labels[idx], spec, augment=aug, indices=idx)

    splits = DataSplits(train=subset("train", entry.augment if augment else None), val=subset("val"),
                        test=subset("test"), spec=spec, heldout=None if held is None else
                        TensorImageDataset(held, torch.full((len(held),), -1, dtype=torch.long), spec))
    logger.info(
        "%s: %d train, %d val, %d test", name, len(splits.train), len(splits.val), len(splits.test)
    )
    return splits
