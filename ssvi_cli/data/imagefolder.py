"""Your own images as a dataset: ``imagefolder:PATH`` names a folder of class folders.

Two layouts are read:

* ``PATH/train/<class>/``, ``PATH/test/<class>/`` and optionally ``PATH/val/<class>/``: the splits as
  given (every split with the same class folders). Without ``val/`` the validation split is carved
  from ``train/`` as for every dataset (``data.val_fraction``).
* ``PATH/<class>/``: split here into train and test by ``data.test_fraction``, stratified, with a
  fixed seed so that every run (whatever its ``train.seed``) and every evaluation share one test set;
  validation is then carved from the train part.

A folder holding ``train/`` is read as the first layout. Class names are the class folder names,
sorted; image files are found recursively (hidden files and folders are skipped). Images of any
size and mode (PNG, JPEG, BMP, GIF, WebP, TIFF, PPM/PGM; gray, RGB, RGBA, palette, 16-bit gray) are decoded
once with PIL (a large JPEG at a reduced scale, ``images.read_image``) and brought to ``data.channels``
x ``data.image_size`` x ``data.image_size`` exactly as ``ssvi infer`` brings an image file to a model
(``transforms.preprocess``: alpha dropped, gray <-> RGB, antialiased bilinear resize), then kept as uint8: rounded to 8 bits, which ``infer`` does not do, so
a resized image reaches a model through ``infer`` up to half a level (0.5/255) from the value it was
trained or evaluated with (NLL 0.0221 against 0.0222 on one folder's test split). The normalisation is measured per channel on the
training split (before validation is carved out, as the published CIFAR statistics are) unless
``data.mean``/``data.std`` are given. Training augmentation is the CIFAR random crop + flip, used
only with ``data.augment`` and an ``image_size`` of at least 16 pixels (at smaller sizes a 4-pixel
shift crops away too much of the image).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ssvi_cli.config import DataConfig
from ssvi_cli.data.sources import DATASET_FAMILIES, DatasetSource
from ssvi_cli.data.decoding import decode_images
from ssvi_cli.data.images import IMAGE_SUFFIXES, find_files, reducing_jpegs, shown
from ssvi_cli.warned import warn_once
from ssvi_cli.argcheck import has_control
from ssvi_cli.data.spec import DataError, DataSpec, RawImages, decoded
from ssvi_cli.data.splits import stratified_split
from ssvi_cli.data.transforms import TensorImageDataset, random_crop_flip

logger = logging.getLogger(__name__)

FAMILY = "imagefolder"
SPLIT_FOLDERS = ("train", "val", "test")
TEST_SEED = 20_240_602  # the flat layout's test split does not move with the training seed
MIN_AUGMENT_SIZE = 16
_LAYOUTS = "PATH/<class>/*.png, or PATH/train/<class>/ and PATH/test/<class>/"


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, found without decoding: class names and, per split, files and labels.

    ``parts`` has ``train``, ``test`` and maybe ``val`` (the split layout) or only ``all`` (class
    folders directly under ``root``).
    """

    root: Path
    class_names: tuple[str, ...]
    parts: dict[str, tuple[tuple[Path, ...], torch.Tensor]]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_folders(folder: Path, where: str) -> dict[str, tuple[Path, ...]]:
    """Class name -> its image files (recursive, sorted); at least two classes, none empty."""
    # by name as text, as torchvision's ImageFolder sorts them (a Windows path sorts ignoring case)
    classes = sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p.name)), key=lambda p: p.name)
    if not classes:
        raise DataError(f"{where} {folder} holds no class folders; put each class's images in its own "
                        f"folder ({_LAYOUTS})")
    if len(classes) == 1:
        raise DataError(f"{where} {folder} holds one class folder ({classes[0].name}); a classifier needs "
                        "at least two, add a folder per class")
    _say_loose(folder, "class")
    found = {}
    for cls in classes:
        if shown(cls.name) != cls.name:
            raise DataError(f"class folder {shown(cls)}: its name is not UTF-8 text, and the class names are "
                            "written into the model file; rename the folder")
        if has_control(cls.name):  # a model no command could read after the whole run (data spec refuses it)
            raise DataError(f"class folder {str(cls)!r}: its name holds a control character, and the class names are "
                            "written into the model file and printed; rename the folder")
        files = tuple(find_files(cls, apart=(folder, *classes)))  # a link into another class: not this one's
        if not files:
            raise DataError(f"class folder {cls} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images "
                            "or remove the folder")
        found[cls.name] = files
    return found


def _a_split(root: Path, name: str, present: list[str]) -> bool:
    """Whether the folder ``name`` of ``root`` is one of its split folders ``present`` (``Train/`` is
    ``train/`` where names ignore case, as on macOS and Windows)."""
    return name in SPLIT_FOLDERS or (name.lower() in present and (root / name).samefile(root / name.lower()))


def _say_loose(folder: Path, kind: str) -> None:
    """Warn, once per folder (it is scanned more than once), of images lying beside its ``kind``
    folders ("class", or "split" at a split layout's root): passed over, they were left out unsaid."""
    loose = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p.name) and p.is_file())
    if loose:
        warn_once(logger, (str(folder), "loose"), "%s: %s passed over (an image's class is its folder's name)",
                  shown(folder), f"1 image outside the {kind} folders is" if loose == 1 else
                  f"{loose} images outside the {kind} folders are")


def _labelled(classes: dict[str, tuple[Path, ...]], names: tuple[str, ...]) -> tuple[tuple[Path, ...], torch.Tensor]:
    files = tuple(f for name in names for f in classes[name])
    labels = torch.tensor([i for i, name in enumerate(names) for _ in classes[name]], dtype=torch.long)
    return files, labels


def scan_folder(path: Path) -> FolderScan:
    """Find the layout, the class names and the image files of ``path`` (no image is opened)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; check the path after imagefolder: ({_LAYOUTS})")
    if not root.is_dir():
        raise DataError(f"image folder {root} is a file, not a folder; pass the folder that holds the "
                        f"class folders ({_LAYOUTS})")
    root = root.resolve()
    present = [s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    folders = [p.name for p in root.iterdir() if p.is_dir() and _visible(p.name) and not _a_split(root, p.name, present)]
    cased = [n for n in folders if n.lower() in SPLIT_FOLDERS]
    if cased and (present or {"train", "test"} <= {n.lower() for n in cased}):  # Train/ and Test/ read as classes
        raise DataError(f"image folder {root} has {'/, '.join(sorted(cased))}/: the split layout's folders are named "
                        f"{', '.join(SPLIT_FOLDERS)} in lower case; rename "
                        f"{'it' if len(cased) == 1 else 'them'}, or, for class folders directly in {root}, "
                        "give the classes other names")
    if not present:
        classes = _class_folders(root, "image folder")
        names = tuple(classes)
        return FolderScan(root, names, {"all": _labelled(classes, names)})
    for needed in ("train", "test"):
        if needed not in present:
            raise DataError(f"image folder {root} has {'/, '.join(present)}/ but no {needed}/; add "
                            f"{root / needed}/<class>/, or, for class folders directly in {root}, name none of "
                            f"them {', '.join(SPLIT_FOLDERS)} (the split layout's folders)")
    _say_loose(root, "split")
    if folders:  # beside train/ and test/ only the split folders are read
        warn_once(logger, (str(root), "beside"), "%s: %s passed over (the split layout reads %s)", shown(root),
                  ", ".join(f"{shown(n)}/" for n in sorted(folders)) + (" is" if len(folders) == 1 else " are"),
                  ", ".join(f"{n}/" for n in SPLIT_FOLDERS))
    by_split = {s: _class_folders(root / s, f"{s} folder") for s in present}
    names = tuple(by_split["train"])
    for split, classes in by_split.items():
        if tuple(classes) != names:
            missing, extra = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
            differ = "; ".join(f"{what}: {', '.join(names_)}" for what, names_ in (("missing", missing), ("extra", extra))
                               if names_)  # only what differs: "extra: -" read as a class named '-'
            raise DataError(f"{root / split} has other classes than {root / 'train'} ({differ}); use the same "
                            "class folder names in every split")
    return FolderScan(root, names, {s: _labelled(c, names) for s, c in by_split.items()})


def split_scan(scan: FolderScan, test_fraction: float) -> FolderScan:
    """The flat layout split into train and test (stratified, :data:`TEST_SEED`); others unchanged."""
    if "all" not in scan.parts:
        return scan
    files, labels = scan.parts["all"]
    train_idx, test_idx = stratified_split(labels, test_fraction, TEST_SEED)  # every class keeps an image
    if len(test_idx) == 0:
        fix = ("add images: each class keeps one for training, so a class needs two to give one for testing"
               if int(torch.bincount(labels).max()) < 2 else "add images or raise --set data.test_fraction")
        raise DataError(f"{scan.root} holds {len(files)} images, too few to hold any out for testing at "
                        f"test_fraction={test_fraction}; {fix}")
    pick = lambda idx: (tuple(files[i] for i in idx.tolist()), labels[idx])  # noqa: E731
    return replace(scan, parts={"train": pick(train_idx), "test": pick(test_idx)})


class FolderImages:
    """An image folder's files, decoded only when a split needs them (:meth:`decode`): indexing (a
    tensor of positions, a boolean mask) gives the images of those files, still undecoded, so that
    ``evaluate`` decodes the split it scores and not the training images too."""

    def __init__(self, files: tuple[Path, ...], image_size: int, channels: int, what: str, where: str = "") -> None:
        self.files, self.image_size, self.channels, self.what, self.where = files, image_size, channels, what, where

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: torch.Tensor) -> "FolderImages":
        positions = torch.arange(len(self.files))[index].tolist()
        return FolderImages(tuple(self.files[i] for i in positions), self.image_size, self.channels, self.what,
                            self.where)

    def decode(self) -> torch.Tensor:
        return decode_images(self.files, self.image_size, self.channels, self.what, self.where)


def whole_folder(argument: str, options: DataConfig, class_names: tuple[str, ...]) -> TensorImageDataset:
    """Every image of ``imagefolder:<argument>`` (all its splits), labelled by name with a model's
    ``class_names``: a labelled folder the model has not seen, scored whole (``evaluate --split all``).
    Its classes must be among the model's (names compared as text, as macOS and others write them
    alike); a folder of fewer classes, even one, is scored on those it has, its splits need not hold the
    same classes, and an empty class folder holds none. ``options`` size and normalise it."""
    root = Path(argument).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder; pass the folder that holds the class folders ({_LAYOUTS})")
    root = root.resolve()
    tops = [root / s for s in SPLIT_FOLDERS if (root / s).is_dir()] or [root]
    folders = {top: sorted((p for p in top.iterdir() if p.is_dir() and _visible(p.name)), key=lambda p: p.name)
               for top in tops}
    found = [(f, c.name) for top, classes in folders.items() for c in classes
             for f in find_files(c, IMAGE_SUFFIXES, apart=(top, *classes))]
    if not found:
        raise DataError(f"image folder {root} holds no images in class folders ({_LAYOUTS})")
    ours = [unicodedata.normalize("NFC", n) for n in class_names]
    theirs = {c: unicodedata.normalize("NFC", c) for _, c in found}
    if extra := sorted({shown(c) for c, t in theirs.items() if t not in ours}):
        raise DataError(f"image folder {root} has classes the model does not predict ({', '.join(extra)}); "
                        f"its classes are {', '.join(class_names)}: score the others as out-of-distribution with "
                        "--ood PATH")
    labels = torch.tensor([ours.index(theirs[c]) for _, c in found], dtype=torch.long)
    c, size = options.channels, options.image_size
    spec = DataSpec(f"{FAMILY}:{root}", (c, size, size), len(class_names), tuple(class_names),
                    options.mean or (0.0,) * c, options.std or (1.0,) * c)
    images = decode_images(tuple(f for f, _ in found), size, c, f"images of {root}", str(root))
    return TensorImageDataset(images, labels, spec, indices=torch.arange(len(found)))


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images in [0, 1] units, in chunks (no float copy
    of the whole set); a constant channel gets std 1/255 rather than 0."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0.0).sqrt().clamp_min(1.0 / 255.0)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def folder_digest(scan: FolderScan) -> str:
    """A digest of every image file a folder's scan holds, in every part: its relative path, label and
    size; another image added, removed, relabelled or saved again at another size gives another."""
    return _digest(f"{part}\t{f.relative_to(scan.root).as_posix()}\t{y}\t{f.stat().st_size}"
                   for part, (files, labels) in sorted(scan.parts.items()) for f, y in zip(files, labels.tolist()))


def _files_digest(scan: FolderScan) -> str:
    """For the flat layout (ssvi draws the test split), a digest of the image list the split is drawn
    from (relative paths and labels, in order); empty for the split layout."""
    if "all" not in scan.parts:
        return ""
    files, labels = scan.parts["all"]
    return _digest(f"{f.relative_to(scan.root).as_posix()}\t{y}" for f, y in zip(files, labels.tolist()))


def _digest(lines: Iterable[str]) -> str:
    """``sha256:`` and the first 16 hex digits of the hash of ``lines``, one per line."""
    import hashlib

    return "sha256:" + hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def folder_source(argument: str, options: Optional[DataConfig] = None) -> DatasetSource:
    """The dataset source of ``imagefolder:<argument>``: its spec from a scan (the normalisation is
    ``data.mean``/``data.std``, else identity until :attr:`DatasetSource.complete_spec` measures it
    on the training images), loaders that decode each split when asked."""
    if not argument:
        raise DataError(f"{FAMILY}: needs the folder after the colon, e.g. --data {FAMILY}:~/pictures")
    opts = options or DataConfig()
    found = scan_folder(Path(argument))
    scan = split_scan(found, opts.test_fraction)
    c, size = opts.channels, opts.image_size
    spec = DataSpec(f"{FAMILY}:{scan.root}", (c, size, size), len(scan.class_names), scan.class_names,
                    opts.mean or (0.0,) * c, opts.std or (1.0,) * c, files_digest=_files_digest(found),
                    reduced_jpeg=reducing_jpegs())  # decoded whole for a run made before (whole_jpegs)

    def load_part(part: str) -> RawImages:
        files, labels = scan.parts[part]
        what = ("images for training and validation" if part == "train" and "val" not in scan.parts
                else f"{part} images")  # the validation split is drawn from the training images
        return RawImages(FolderImages(files, size, c, f"{what} of {scan.root}", str(scan.root)), labels,
                         scan.class_names)

    def complete_spec(current: DataSpec, train: RawImages) -> DataSpec:
        mean, std = channel_stats(decoded(train.images))
        return replace(current, mean=opts.mean or mean, std=opts.std or std)

    return DatasetSource(
        spec=spec,
        load=lambda data_dir, train, download: load_part("train" if train else "test"),
        augment=random_crop_flip if size >= MIN_AUGMENT_SIZE else None,
        location=lambda data_dir: scan.root,
        load_val=(lambda: load_part("val")) if "val" in scan.parts else None,
        complete_spec=None if opts.mean and opts.std else complete_spec,
    )


def data_config_for(spec: DataSpec, recorded: Optional[dict[str, Any]] = None) -> DataConfig:
    """Data options that rebuild a trained model's inputs: size, channels, normalisation and the kept
    classes (by name, in label order) from its ``spec``, the test share from the ``recorded``
    training data config (for ``ssvi evaluate``)."""
    recorded = recorded or {}
    c, h, _ = spec.input_shape
    return replace(DataConfig(), image_size=h, channels=c, mean=tuple(spec.mean), std=tuple(spec.std),
                   test_fraction=float(recorded.get("test_fraction", DataConfig.test_fraction)),
                   classes=tuple(spec.class_names) if spec.dataset_classes else None)


DATASET_FAMILIES.add(FAMILY, folder_source)
