"""What a model knows about its data (:class:`DataSpec`), the splits handed to training, and the
errors every data module raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from ssvi_cli.argcheck import has_control
from ssvi_cli.config import image_folder


class DataError(Exception):
    """User-facing error: one line naming the problem and the fix."""


class DatasetUnavailable(DataError):
    """A torchvision dataset whose files are not on disk (and may not be downloaded), do not read, or
    could not be downloaded."""


OPTIONAL_KEYS = ("dataset_classes", "files_digest", "reduced_jpeg")  # left out of a spec's dict when empty


def jpegs_read_whole(name: Any, reduced_jpeg: Any) -> bool:
    """Whether the JPEGs of the data described as ``name`` with ``reduced_jpeg`` (a spec's fields, or a
    checkpoint's record of them) are decoded whole: a model trained on an image folder before
    ``reduced_jpeg`` was recorded. Other data were never JPEG files: the reduced decode."""
    return image_folder(name) is not None and not reduced_jpeg


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data: shapes, classes, normalisation and the raw pixel
    range of the dataset's own arrays (``[0, pixel_max]``: 255 for 8-bit images, 16 for the digits).

    A model trained on part of a dataset's classes (``data.classes``) has ``class_names`` = the kept
    classes in label order and ``dataset_classes`` = all the dataset's classes, so the held-out ones
    are known from the spec alone; ``dataset_classes`` is empty when every class was kept.

    ``files_digest``: for an image folder whose test split ssvi draws (the flat layout), a digest of
    its image list, so that a test split redrawn after the folder changed (and overlapping the
    training images) is refused; empty otherwise.

    ``reduced_jpeg``: for an image folder, its large JPEGs were decoded at a reduced scale before they
    were resized (``images.read_image``), as since this was recorded; a folder's spec read from an older
    file or checkpoint, without it, reads its JPEGs whole, as its training did (``reads_jpegs_whole``).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max: float = 255.0
    dataset_classes: tuple[str, ...] = ()
    files_digest: str = ""
    reduced_jpeg: bool = False

    @property
    def reads_jpegs_whole(self) -> bool:
        """Whether its JPEGs are decoded whole (``images.whole_jpegs``): :func:`jpegs_read_whole`."""
        return jpegs_read_whole(self.name, self.reduced_jpeg)

    def to_dict(self) -> dict:
        """JSON-serialisable form (tuples become lists); an empty ``dataset_classes`` or ``files_digest``
        and a false ``reduced_jpeg`` are left out, so such a spec is described as before the field existed."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for optional in OPTIONAL_KEYS:
            if not d[optional]:
                del d[optional]
        return d

    @property
    def held_out_classes(self) -> tuple[str, ...]:
        """The dataset's classes the model was not trained on (empty for a model of all of them)."""
        kept = set(self.class_names)
        return tuple(c for c in self.dataset_classes if c not in kept)

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise DataError (``pixel_max``,
        ``dataset_classes`` and ``files_digest`` may be absent, as in files written before they were
        recorded: 255, a model of all the classes, no digest)."""
        expected, optional = {"name", "input_shape", "num_classes", "class_names", "mean", "std"}, {"pixel_max", *OPTIONAL_KEYS}
        if set(d) - optional != expected:
            unknown, missing = sorted(set(d) - expected - optional), sorted(expected - set(d))
            raise DataError(
                "; ".join(([f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"] if unknown else [])
                          + ([f"missing {', '.join(missing)}"] if missing else []))
                + f" (this ssvi reads {', '.join(sorted(expected))} and, if present, {', '.join(sorted(optional))}): "
                + ("written by a newer ssvi (upgrade) or edited; none is ignored, since each bears on how inputs are read"
                   if unknown else "edited, or written by another program")
            )
        spec = cls(
            name=str(d["name"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
            num_classes=int(d["num_classes"]),
            class_names=tuple(str(v) for v in d["class_names"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            pixel_max=float(d.get("pixel_max", 255.0)),
            dataset_classes=tuple(str(v) for v in d.get("dataset_classes", ())),
            files_digest=str(d.get("files_digest", "")),
            reduced_jpeg=d.get("reduced_jpeg", False) is True,
        )
        spec.check()
        return spec

    def check_same_files(self, current: "DataSpec") -> None:
        """Refuse ``current`` (the same image folder read again) when its image list is not the one
        this spec was made from: the test split redrawn from it would hold training images."""
        if self.files_digest and current.name == self.name and current.files_digest != self.files_digest:
            raise DataError(f"{self.name.partition(':')[2] or self.name} has changed since the model was trained "
                            "(its list of images differs), so its test split drawn again would hold training "
                            "images; restore the folder, or train again (PATH/train and PATH/test folders keep "
                            "test images apart whatever is added)")

    def check_same_normalisation(self, recorded: Any) -> None:
        """Refuse this spec, measured again on a resumed run's training images, when the normalisation
        ``recorded`` (its checkpoint's spec as a dict) differs: the images changed under the same
        names, and the run would go on with other inputs than it started with."""
        if not isinstance(recorded, dict) or image_folder(self.name) is None:
            return
        then = recorded.get("mean"), recorded.get("std")
        if not all(isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v) for v in then):
            return  # a checkpoint without a readable record: nothing to compare
        # 1e-3 apart, far above another Pillow's decoding of the same JPEG (a resume after an upgrade)
        if len(then[0]) != len(self.mean) or len(then[1]) != len(self.std) or any(
                abs(a - b) > 1e-3 for a, b in zip((*then[0], *then[1]), (*self.mean, *self.std))):
            raise DataError(f"the images of {self.name.partition(':')[2]} have changed since the run started: their "
                            f"normalisation measured now, mean {list(self.mean)} and std {list(self.std)}, is not "
                            f"the run's, mean {list(then[0])} and std {list(then[1])}; put the images back, or "
                            "start a new run from this one (ssvi train --init-from with the run's folder)")

    def check(self) -> None:
        """A spec a model can be used with: an input and classes, one name per class, one finite
        mean and one positive finite std per channel of a (C, H, W) input (or one of each for all
        channels); else a one-line DataError."""
        import math

        if any(s < 1 for s in self.input_shape) or self.num_classes < 1:  # () is a custom model's "unknown"
            raise DataError(f"data spec input shape {list(self.input_shape)} / {self.num_classes} classes "
                            "describe no input or no class")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"data spec names {len(self.class_names)} classes for a model of {self.num_classes}")
        seen: set[str] = set()  # one pass: scanning the names before each took minutes for 100,000 of them
        if (twice := next((n for n in self.class_names if n in seen or seen.add(n)), None)) is not None:
            raise DataError(f"data spec names class {twice!r} twice; each output needs its own name")
        if (odd := next((n for n in self.class_names if has_control(n)), None)) is not None:
            raise DataError(f"data spec class name {odd!r} holds a control character (a newline, a terminal escape); "
                            "class names are printed and written as they are")
        if not (math.isfinite(self.pixel_max) and self.pixel_max > 0):
            raise DataError(f"data spec raw pixel range [0, {self.pixel_max}] is empty; pixel_max must be positive")
        if len(self.mean) != len(self.std) or not self.std:
            raise DataError(f"data spec has {len(self.mean)} means and {len(self.std)} stds; give one of each per channel")
        if len(self.input_shape) == 3 and len(self.mean) not in (1, self.input_shape[0]):
            raise DataError(f"data spec has {len(self.mean)} means and stds for inputs of {self.input_shape[0]} "
                            f"channels; give one of each per channel (or one for all)")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise DataError(f"data spec normalisation mean={list(self.mean)} std={list(self.std)}: every mean must be "
                            "finite and every std positive")


@dataclass
class DataSplits:
    """Train (maybe augmented), validation (carved from train) and official test datasets; with
    ``data.classes``, ``heldout`` holds the official test images of the classes left out (label -1)."""

    train: Dataset
    val: Dataset
    test: Dataset
    spec: DataSpec
    heldout: Optional[Dataset] = None

    def sizes(self) -> dict[str, int]:
        """The number of images in each split (``heldout`` where there is one)."""
        parts = {"train": self.train, "val": self.val, "test": self.test, "heldout": self.heldout}
        return {name: len(part) for name, part in parts.items() if part is not None}


@dataclass(frozen=True)
class RawImages:
    """Images before normalisation: uint8 (N, C, H, W) or float in [0, 1], or an image folder's files
    not decoded yet (``imagefolder.FolderImages``: indexable, :func:`decoded` when a split needs them)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]


def decoded(images: Any) -> torch.Tensor:
    """``images`` as a tensor: an image folder's files (with a ``decode`` method) decoded now."""
    return images.decode() if hasattr(images, "decode") else images


def absent_classes(inputs: Any, spec: DataSpec, where: str) -> list[str]:
    """A note naming the classes of ``spec`` that no item of ``inputs`` (a dataset with ``labels``)
    holds, ``where`` naming it (a flat image folder keeps a class's only image for training): its
    accuracy and calibration then speak for the other classes only."""
    labels = getattr(inputs, "labels", None)
    if labels is None or len(labels) == 0:
        return []
    counts = torch.bincount(labels[labels >= 0], minlength=spec.num_classes)
    absent = [spec.class_names[i] for i in range(spec.num_classes) if counts[i] == 0]
    if not absent:
        return []
    names = ", ".join(repr(n) for n in absent[:5]) + (", ..." if len(absent) > 5 else "")
    have = "has" if len(absent) == 1 else "have"
    return [f"{len(absent)} of the model's {spec.num_classes} classes ({names}) {have} no image in {where}: "
            "its scores speak for the others only"]
