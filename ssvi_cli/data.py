"""Datasets by name: the embedded digits set and torchvision image sets, served from tensors.

Every image handed out is a float32 tensor of exactly ``spec.input_shape``, normalised with the
spec's per-channel mean and std. Torchvision files are decoded once into uint8 tensors; items are
normalised (and, for CIFAR training data, augmented) with tensor ops, never PIL, because CPU
training time is dominated by the input pipeline otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)


class DataError(Exception):
    """User-facing error: one line naming the problem and the fix."""


class DatasetUnavailable(DataError):
    """A torchvision dataset whose files are not on disk and may not be downloaded."""


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data: shapes, classes and normalisation."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-serialisable form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise DataError."""
        expected = {"name", "input_shape", "num_classes", "class_names", "mean", "std"}
        if set(d) != expected:
            raise DataError(
                f"data spec keys {sorted(d)} do not match the expected {sorted(expected)}; "
                "the file was written by an incompatible version"
            )
        return cls(
            name=str(d["name"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
            num_classes=int(d["num_classes"]),
            class_names=tuple(str(v) for v in d["class_names"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


@dataclass
class DataSplits:
    """Train (maybe augmented), validation (carved from train) and official test datasets."""

    train: Dataset
    val: Dataset
    test: Dataset
    spec: DataSpec


@dataclass(frozen=True)
class RawImages:
    """Decoded images before normalisation: uint8 (N, C, H, W) or float in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------- tensor datasets


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [0, 1]; float images pass through as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def random_crop_flip(batch: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random crop back to H x W after zero padding, then random horizontal flip (p = 0.5).

    Uses torch's global RNG so a seeded DataLoader reproduces the same augmentations.
    """
    n, _, h, w = batch.shape
    padded = F.pad(batch, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,))
    left = torch.randint(0, 2 * padding + 1, (n,))
    rows = (top[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2).contiguous()
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class TensorImageDataset(Dataset):
    """Images kept as uint8 (or unit-float) tensors, normalised per item; yields (x, int label)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: DataSpec,
        *,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.labels = labels.long()
        self.augment = augment
        self.indices = indices  # positions in the source split, for provenance and tests
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _prepare(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        x = _to_unit(self.images[index])
        if self.augment is not None:
            x = self.augment(x)
        return (x - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._prepare([index])[0], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by DataLoader: one vectorised normalise/augment per batch."""
        x = self._prepare(list(indices))
        return list(zip(x.unbind(0), self.labels[indices].tolist()))


class PreparedDataset(Dataset):
    """Already-normalised images with one fixed label (``-1`` for out-of-distribution data)."""

    def __init__(self, images: torch.Tensor, label: int = -1) -> None:
        self.images = images.float().contiguous()
        self.label = label

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.label


# --------------------------------------------------------------------------- preprocessing

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's "L" conversion


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Drop alpha, then convert RGB <-> gray to reach ``channels``."""
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == channels:
        return x
    if channels == 1:
        weights = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.expand(-1, 3, -1, -1)


def preprocess(images: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Bring arbitrary (N, C, H, W) images (uint8, or float in [0, 1]) to ``spec``'s input.

    Channels are converted (RGB -> gray by luminance, gray -> RGB by repeat, alpha dropped),
    the size is resized bilinearly with antialiasing, and the spec's mean/std are applied.
    """
    if images.ndim != 4:
        raise DataError(
            f"expected images shaped (N, C, H, W), got {images.ndim} dims {tuple(images.shape)}; "
            "add a batch dimension or reshape"
        )
    c_in, c_out = images.shape[1], spec.input_shape[0]
    if c_in not in (1, 3, 4) or c_out not in (1, 3):
        raise DataError(
            f"cannot convert {c_in}-channel images to {c_out} channels; "
            "inputs must have 1, 3 or 4 channels and models 1 or 3"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise DataError(f"images have dtype {images.dtype}; pass uint8 or float in [0, 1]")
    x = _to_unit(images)
    if x.is_floating_point() and images.dtype != torch.uint8 and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(
                f"float images range over [{lo:.3g}, {hi:.3g}], not [0, 1]; "
                "divide 0..255 pixels by 255 or pass uint8"
            )
    x = _match_channels(x, c_out)
    size = spec.input_shape[1:]
    if tuple(x.shape[2:]) != size and x.shape[0] > 0:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


# --------------------------------------------------------------------------- sources

# Pixel mean/std of load_digits()/16 over all 1797 images (checked by tests/test_data.py).
DIGITS_MEAN = 0.30526
DIGITS_STD = 0.37605
# The digits test split is fixed so that runs with different seeds share one test set.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 20_240_601

_DIGIT_NAMES = tuple(str(i) for i in range(10))
_MNIST_NAMES = tuple(
    f"{i} - {w}"
    for i, w in enumerate("zero one two three four five six seven eight nine".split())
)
_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_KMNIST_NAMES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
_CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_NAMES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)

Loader = Callable[[Path, bool, bool], RawImages]  # (data_dir, train, download) -> images


@dataclass(frozen=True)
class DatasetSource:
    """A registry entry: spec (known without loading), loader, train augmentation, file location.

    ``location(data_dir)`` is the folder torchvision reads, used in messages about missing files.
    """

    spec: DataSpec
    load: Loader
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    location: Callable[[Path], Path] = field(default=lambda root: root)


def default_data_dir() -> Path:
    """Where torchvision datasets live unless ``data_dir`` is given."""
    return Path.home() / ".cache" / "ssvi" / "data"


def _load_digits(data_dir: Path, train: bool, download: bool) -> RawImages:
    """scikit-learn's bundled 8x8 digits with the fixed stratified test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_TEST_SEED,
        stratify=bunch.target,
    )
    idx = torch.from_numpy(np.sort(train_idx if train else test_idx))
    return RawImages(images[idx], labels[idx], _DIGIT_NAMES)


def _call_torchvision(name: str, factory: Callable[[], object], where: Path, download: bool):
    """Run a torchvision constructor, turning its missing-file errors into DataErrors."""
    try:
        return factory()
    except RuntimeError as err:
        if download:
            raise DataError(f"downloading {name} into {where} failed ({err}); check the network") from err
        raise DatasetUnavailable(
            f"{name} not found or corrupted at {where} (torchvision: {err}); "
            f"pass --download to fetch it, or place the original files there"
        ) from err
    except OSError as err:  # download without network
        raise DataError(f"cannot read or download {name} at {where} ({err}); check the path/network") from err


def _torchvision_loader(name: str, cls_name: str, location: Callable[[Path], Path]) -> Loader:
    """Loader for a torchvision dataset class, decoded once into uint8 (N, C, H, W) tensors."""

    def load(data_dir: Path, train: bool, download: bool) -> RawImages:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        if cls_name == "SVHN":
            make = lambda: cls(root=str(data_dir), split="train" if train else "test", download=download)  # noqa: E731
        else:
            make = lambda: cls(root=str(data_dir), train=train, download=download)  # noqa: E731
        ds = _call_torchvision(name, make, location(data_dir), download)
        return _decode(ds, cls_name)

    return load


def _decode(ds: object, cls_name: str) -> RawImages:
    """Pull the raw arrays out of a torchvision dataset without touching PIL."""
    if cls_name == "SVHN":  # .data is (N, C, H, W) numpy, .labels already maps 10 -> 0
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        return RawImages(images, labels, _DIGIT_NAMES)
    if cls_name.startswith("CIFAR"):  # .data is (N, H, W, C) numpy, .targets a list
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    else:  # MNIST family: .data is a (N, H, W) uint8 tensor
        images = ds.data.unsqueeze(1).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return RawImages(images, labels, tuple(str(c) for c in ds.classes))


def _torchvision_source(
    name: str,
    cls_name: str,
    shape: tuple[int, int, int],
    names: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    location: Callable[[Path], Path],
    augment: bool = False,
) -> DatasetSource:
    spec = DataSpec(name, shape, len(names), names, mean, std)
    return DatasetSource(
        spec=spec,
        load=_torchvision_loader(name, cls_name, location),
        augment=random_crop_flip if augment else None,
        location=location,
    )


def _mnist_like(name: str, cls_name: str, names: tuple[str, ...], mean: float, std: float) -> DatasetSource:
    return _torchvision_source(
        name, cls_name, (1, 28, 28), names, (mean,), (std,), lambda root: root / cls_name / "raw"
    )


DATASETS: dict[str, DatasetSource] = {
    "digits": DatasetSource(
        spec=DataSpec("digits", (1, 8, 8), 10, _DIGIT_NAMES, (DIGITS_MEAN,), (DIGITS_STD,)),
        load=_load_digits,
    ),
    "mnist": _mnist_like("mnist", "MNIST", _MNIST_NAMES, 0.1307, 0.3081),
    "fashion-mnist": _mnist_like("fashion-mnist", "FashionMNIST", _FASHION_NAMES, 0.2860, 0.3530),
    "kmnist": _mnist_like("kmnist", "KMNIST", _KMNIST_NAMES, 0.1918, 0.3483),
    "cifar10": _torchvision_source(
        "cifar10", "CIFAR10", (3, 32, 32), _CIFAR10_NAMES,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        lambda root: root / "cifar-10-batches-py", augment=True,
    ),
    "cifar100": _torchvision_source(
        "cifar100", "CIFAR100", (3, 32, 32), CIFAR100_NAMES,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        lambda root: root / "cifar-100-python", augment=True,
    ),
    # No flip/crop for SVHN: mirrored digits are different symbols.
    "svhn": _torchvision_source(
        "svhn", "SVHN", (3, 32, 32), _DIGIT_NAMES,
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
        lambda root: root,
    ),
}  # fmt: skip


def dataset_names() -> list[str]:
    """Registered in-distribution dataset names."""
    return sorted(DATASETS)


def _source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; valid names are: {', '.join(dataset_names())}"
        ) from None


def get_spec(name: str) -> DataSpec:
    """The dataset's spec (shapes, classes, normalisation) without loading any data."""
    return _source(name).spec


def load_raw(name: str, *, data_dir: Path | None = None, download: bool = False, train: bool = True) -> RawImages:
    """Decoded images of one official split (digits: the fixed 80/20 split)."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    source = _source(name)
    logger.info("loading %s (%s split) from %s", name, "train" if train else "test", root)
    return source.load(root, train, download)


# --------------------------------------------------------------------------- splitting


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into (keep, held_out) indices, holding out ``round(fraction * N)`` examples.

    Each class gives ``floor(fraction * n_c)`` examples; the remainder goes to the classes with
    the largest fractional parts (ties broken at random), so tiny classes still contribute.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes, counts = np.unique(y, return_counts=True)
    quota = fraction * counts
    n_held = np.floor(quota).astype(int)
    extra = int(round(fraction * len(y))) - int(n_held.sum())
    order = np.lexsort((rng.random(len(classes)), -(quota - n_held)))
    n_held[order[:extra]] += 1
    keep, held = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for c, k in zip(classes, n_held):
        idx = rng.permutation(np.flatnonzero(y == c))
        held.append(idx[:k])
        keep.append(idx[k:])
    as_tensor = lambda parts: torch.from_numpy(np.sort(np.concatenate(parts))).long()  # noqa: E731
    return as_tensor(keep), as_tensor(held)


def _cap(indices: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """A seeded subset of at most ``limit`` indices (order kept)."""
    if limit is None or len(indices) <= limit:
        return indices
    chosen = np.random.default_rng(seed).choice(len(indices), size=limit, replace=False)
    return indices[torch.from_numpy(np.sort(chosen))]


def build_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    max_train: int | None = None,
) -> DataSplits:
    """Train/val/test datasets for ``name``; val is a stratified, seeded part of the train split.

    ``max_train`` caps the train split (seeded); val is then capped in the same proportion
    ``val_fraction / (1 - val_fraction)`` so quick runs stay quick.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train must be a positive number of examples, got {max_train}")
    source = _source(name)
    train_raw = load_raw(name, data_dir=data_dir, download=download, train=True)
    test_raw = load_raw(name, data_dir=data_dir, download=download, train=False)
    spec = replace(source.spec, class_names=train_raw.class_names)
    if spec.num_classes != len(spec.class_names):
        raise DataError(
            f"{name} files list {len(spec.class_names)} classes, expected {spec.num_classes}; "
            "the files under the data directory are not the original dataset"
        )
    train_idx, val_idx = stratified_split(train_raw.labels, val_fraction, seed)
    if max_train is not None:
        max_val = math.ceil(max_train * val_fraction / (1.0 - val_fraction))
        train_idx, val_idx = _cap(train_idx, max_train, seed), _cap(val_idx, max_val, seed + 1)

    def subset(idx: torch.Tensor, aug: Callable | None) -> TensorImageDataset:
        return TensorImageDataset(train_raw.images[idx], train_raw.labels[idx], spec, augment=aug, indices=idx)

    test_all = torch.arange(len(test_raw.labels))
    splits = DataSplits(
        train=subset(train_idx, source.augment if augment else None),
        val=subset(val_idx, None),
        test=TensorImageDataset(test_raw.images, test_raw.labels, spec, indices=test_all),
        spec=spec,
    )
    logger.info(
        "%s: %d train, %d val, %d test", name, len(splits.train), len(splits.val), len(splits.test)
    )
    return splits


_OOD_EXPORTS = ("OOD_SETS", "ood_names", "build_ood")


def __getattr__(name: str) -> object:
    """Re-export the OOD API from ``ssvi_cli.ood`` lazily (it imports this module)."""
    if name in _OOD_EXPORTS:
        from ssvi_cli import ood

        return getattr(ood, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
