"""Out-of-distribution sets, converted to an in-distribution spec; every item is (x, -1)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ssvi_cli.data.sources import DATASETS, UnknownDataset, load_raw
from ssvi_cli.data.spec import DataError, DataSpec
from ssvi_cli.data.transforms import PreparedDataset, preprocess
from ssvi_cli.registry import Registry

logger = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_ITEMS = 2000  # size of `noise` / `sklearn-photos` when max_items is None

# (spec, data_dir, download, seed, max_items) -> normalised images of spec.input_shape
OodBuilder = Callable[[DataSpec, Path | None, bool, int, int | None], torch.Tensor]


def _noise(spec: DataSpec, data_dir: Path | None, download: bool, seed: int, max_items: int | None) -> torch.Tensor:
    """Uniform random pixels in [0, 1] at the spec's shape."""
    n = DEFAULT_SYNTHETIC_ITEMS if max_items is None else max_items
    gen = torch.Generator().manual_seed(seed)
    return preprocess(torch.rand((n, *spec.input_shape), generator=gen), spec)


def _photo_crops(images: list[np.ndarray], n: int, side: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random square crops with sides in [side, 4 * side] from randomly chosen photos."""
    crops = []
    for _ in range(n):
        photo = images[rng.integers(len(images))]
        h, w = photo.shape[:2]
        s = int(rng.integers(side, min(4 * side, h, w) + 1))
        top, left = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
        crops.append(photo[top : top + s, left : left + s])
    return crops


def _sklearn_photos(
    spec: DataSpec, data_dir: Path | None, download: bool, seed: int, max_items: int | None
) -> torch.Tensor:
    """Seeded random patches of scikit-learn's bundled photographs (china.jpg, flower.jpg)."""
    from sklearn.datasets import load_sample_images

    n = DEFAULT_SYNTHETIC_ITEMS if max_items is None else max_items
    side = max(spec.input_shape[1:])
    crops = _photo_crops(load_sample_images().images, n, side, np.random.default_rng(seed))
    by_size: dict[int, list[int]] = {}
    for i, crop in enumerate(crops):
        by_size.setdefault(crop.shape[0], []).append(i)
    out = torch.empty((n, *spec.input_shape))
    for idx in by_size.values():  # one resize per crop size
        batch = torch.from_numpy(np.stack([crops[i] for i in idx])).permute(0, 3, 1, 2)
        out[idx] = preprocess(batch, spec)
    return out


def _torchvision_ood(name: str) -> OodBuilder:
    """The test split of a registered torchvision dataset, converted through ``preprocess``."""

    def build(spec: DataSpec, data_dir: Path | None, download: bool, seed: int, max_items: int | None) -> torch.Tensor:
        raw = load_raw(name, data_dir=data_dir, download=download, train=False)
        images = raw.images
        if max_items is not None and max_items < len(images):
            chosen = np.sort(np.random.default_rng(seed).choice(len(images), size=max_items, replace=False))
            images = images[torch.from_numpy(chosen)]
        return preprocess(images, spec)

    return build


OOD_SETS: Registry[OodBuilder] = Registry("OOD set", error=UnknownDataset)
OOD_SETS.add("noise", _noise)
OOD_SETS.add("sklearn-photos", _sklearn_photos)
for _name in DATASETS:
    if _name != "digits":
        OOD_SETS.add(_name, _torchvision_ood(_name))


def ood_names() -> list[str]:
    """Registered out-of-distribution set names."""
    return OOD_SETS.names()


def build_ood(
    name: str,
    spec: DataSpec,
    *,
    data_dir: Path | None = None,
    download: bool = False,
    seed: int = 0,
    max_items: int | None = 2000,
) -> PreparedDataset:
    """OOD dataset shaped and normalised like ``spec``'s inputs, yielding (x, -1)."""
    builder = OOD_SETS.get(name)
    if max_items is not None and max_items < 1:
        raise DataError(f"max_items must be positive or None, got {max_items}")
    images = builder(spec, data_dir, download, seed, max_items)
    logger.info("OOD set %s: %d items shaped %s", name, len(images), tuple(images.shape[1:]))
    return PreparedDataset(images, label=-1)
