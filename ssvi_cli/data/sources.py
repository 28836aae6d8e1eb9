"""Datasets by name: the embedded digits set and torchvision image sets, decoded once into tensors,
and parameterised names such as ``imagefolder:PATH`` (a family in :data:`DATASET_FAMILIES`, whose
source is built from the name and the data config; see ``data/imagefolder.py``).

Torchvision files are read from ``data_dir`` (default ``~/.cache/ssvi/data``) and decoded into uint8
(N, C, H, W) tensors without PIL (``data/torchvision_files.py``); a missing file is a
:class:`DatasetUnavailable` naming the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ssvi_cli.config import DataConfig
from ssvi_cli.data import digits
from ssvi_cli.data.classes import resolve_classes, restrict_spec
from ssvi_cli.data.spec import DataError, DataSpec, RawImages
from ssvi_cli.data.torchvision_files import torchvision_loader
from ssvi_cli.data.transforms import random_crop_flip
from ssvi_cli.warned import warnings_scope
from ssvi_cli.registry import Registry, UnknownName

logger = logging.getLogger(__name__)


class UnknownDataset(UnknownName, DataError):
    """A dataset (or OOD set) name that is not registered."""


# Pixel mean/std of load_digits()/16 over all 1797 images, the 360 of the fixed test split included
# (pixel statistics, no labels: over the 1437 others they are 0.30589/0.37661); kept so that every
# digits run and sweep recorded reproduces (checked by tests/test_data.py).
DIGITS_MEAN = 0.30526
DIGITS_STD = 0.37605

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
    ``load_val`` gives a source's own validation split (else it is carved from the train split);
    ``complete_spec`` finishes the spec from the decoded train split (an image folder's normalisation).
    """

    spec: DataSpec
    load: Loader
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    location: Callable[[Path], Path] = field(default=lambda root: root)
    load_val: Callable[[], RawImages] | None = None
    complete_spec: Callable[[DataSpec, RawImages], DataSpec] | None = None
    files: bool = True  # read from data_dir (and fetched with download); False: embedded in the package


def default_data_dir() -> Path:
    """Where torchvision datasets live unless ``data_dir`` is given."""
    return Path.home() / ".cache" / "ssvi" / "data"


def _load_digits(data_dir: Path, train: bool, download: bool) -> RawImages:
    """scikit-learn's bundled 8x8 digits with the fixed stratified test split (``data/digits.py``)."""
    images, labels = digits.load()
    idx = torch.from_numpy(digits.split_indices(train))
    return RawImages(torch.from_numpy(images / 16.0).float().unsqueeze(1)[idx], torch.from_numpy(labels)[idx],
                     _DIGIT_NAMES)


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
        load=torchvision_loader(name, cls_name, location),
        augment=random_crop_flip if augment else None,
        location=location,
    )


def _mnist_like(name: str, cls_name: str, names: tuple[str, ...], mean: float, std: float) -> DatasetSource:
    return _torchvision_source(
        name, cls_name, (1, 28, 28), names, (mean,), (std,), lambda root: root / cls_name / "raw"
    )


DATASETS: Registry[DatasetSource] = Registry("dataset", error=UnknownDataset)
for _name, _source in {
    "digits": DatasetSource(
        spec=DataSpec("digits", (1, 8, 8), 10, _DIGIT_NAMES, (DIGITS_MEAN,), (DIGITS_STD,), pixel_max=16.0),
        load=_load_digits,
        files=False,
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
}.items():  # fmt: skip
    DATASETS.add(_name, _source)


# Parameterised names ``family:ARGUMENT``: (argument, data config or None) -> the source it names.
FamilyBuilder = Callable[[str, Optional[DataConfig]], DatasetSource]
DATASET_FAMILIES: Registry[FamilyBuilder] = Registry("dataset family", error=UnknownDataset)


def dataset_names() -> list[str]:
    """Registered in-distribution dataset names (the fixed ones; families take an argument)."""
    return DATASETS.names()


def reads_data_dir(name: str) -> bool:
    """Whether dataset ``name`` is read from ``data.data_dir`` (and fetched with ``data.download``): a
    torchvision set is; the embedded digits and an image folder (which names its own path) are not."""
    return name in DATASETS and DATASETS.get(name).files


def source(name: str, options: Optional[DataConfig] = None) -> DatasetSource:
    """The source of dataset ``name``; a family name (``imagefolder:PATH``) is resolved here, with
    ``options`` (the data config: image size, channels, ...). An unknown name lists the valid ones."""
    family, sep, argument = name.partition(":") if isinstance(name, str) else ("", "", "")
    if sep and family in DATASET_FAMILIES:
        return DATASET_FAMILIES.get(family)(argument, options)
    if name not in DATASETS:
        if isinstance(name, str) and name and Path(name).expanduser().is_dir():
            raise UnknownDataset(f"unknown dataset {name!r}; {name} is a folder: for the class folders in it, "
                                 f"pass imagefolder:{name}")
        forms = ", ".join(f"{f}:PATH" for f in DATASET_FAMILIES)
        raise UnknownDataset(DATASETS.unknown_message(name) + (f"; or {forms}" if forms else ""))
    return DATASETS.get(name)


def check_dataset_name(name: str, options: Optional[DataConfig] = None) -> DataSpec:
    """Fail now, with the valid names, on a name that cannot be resolved or on ``data.classes`` that
    are not the dataset's; an image folder is scanned (its folders listed, no image opened) so a
    wrong path fails before any work. Returns the spec it read (:func:`get_spec`)."""
    return get_spec(name, options)


@warnings_scope()
def get_spec(name: str, options: Optional[DataConfig] = None) -> DataSpec:
    """The dataset's spec (shapes, classes, normalisation) without loading any data, restricted to
    ``options.classes`` when given (an image folder's measured normalisation comes with
    ``build_dataset``)."""
    spec = source(name, options).spec
    if options is not None and options.classes is not None:
        spec = restrict_spec(spec, resolve_classes(options.classes, spec.class_names, name))
    return spec


def read_split(entry: DatasetSource, name: str, *, data_dir: Path | None = None, download: bool = False,
               train: bool = True) -> RawImages:
    """Decoded images of one official split of the source ``entry`` (named ``name``)."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    logger.info("loading %s (%s split) from %s", name, "train" if train else "test", entry.location(root))
    return entry.load(root, train, download)


def load_raw(name: str, *, data_dir: Path | None = None, download: bool = False, train: bool = True,
             options: Optional[DataConfig] = None) -> RawImages:
    """Decoded images of one official split (digits: the fixed 80/20 split)."""
    return read_split(source(name, options), name, data_dir=data_dir, download=download, train=train)
