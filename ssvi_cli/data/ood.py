"""Out-of-distribution sets, converted to an in-distribution spec; every item is (x, -1).

What an ``--ood`` value names (:func:`parse_ood`), checked in this order:

* ``heldout``: the test images of the classes a model was not trained on (``data.classes``);
* a registered name (:data:`OOD_SETS`): ``noise``, ``sklearn-photos`` or a torchvision set read
  from the evaluation's data directory;
* ``NAME=DIR``: the registered torchvision set ``NAME`` read from its own folder ``DIR``;
* ``LABEL=PATH``: the user's own folder or ``.npy`` array (below), named ``LABEL`` in reports rather
  than by its whole path; ``LABEL`` is no registered name, in any case;
* a path: a value holding a path separator, ending in ``.npy`` or naming an existing file or
  folder: a folder of images and ``.npy`` arrays (recursive) or one ``.npy`` array of the user's
  own inputs. A path that looks like a name is written ``./noise``.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ssvi_cli.fileio import looked_in
from ssvi_cli.data.images import ARRAY_SUFFIX
from ssvi_cli.data.sources import DATASETS, UnknownDataset, load_raw
from ssvi_cli.data.spec import DataError, DataSpec
from ssvi_cli.data.transforms import PreparedDataset, preprocess
from ssvi_cli.registry import Registry
from ssvi_cli.warned import warn_once

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


class _OodSets(Registry[OodBuilder]):
    """The OOD sets: the ones added here, and the test split of every dataset in ``DATASETS`` but the
    embedded digits, as registered at the lookup (a dataset registered after this module's import too)."""

    def _entries(self) -> dict[str, OodBuilder]:
        return {**{name: _torchvision_ood(name) for name in DATASETS if name != "digits"}, **self._items}

    def register(self, name: str) -> Callable[[OodBuilder], OodBuilder]:
        # A dataset registered later under this name would be listed among the sets NAME=DIR reads
        # while --ood NAME went on reading this one: the name is the dataset registry's no more, once
        # this one holds it (a refused registration reserves nothing).
        def decorator(builder: OodBuilder) -> OodBuilder:
            super(_OodSets, self).register(name)(builder)
            DATASETS.reserve(name, "an OOD set")
            return builder

        return decorator


OOD_SETS: Registry[OodBuilder] = _OodSets("OOD set", error=UnknownDataset)
OOD_SETS.add("noise", _noise)
OOD_SETS.add("sklearn-photos", _sklearn_photos)


def ood_names() -> list[str]:
    """Registered out-of-distribution set names."""
    return OOD_SETS.names()


HELDOUT = "heldout"
DATASETS.reserve(HELDOUT, "--ood heldout, the classes a model was not trained on")


def folder_sets() -> tuple[str, ...]:
    """The OOD sets ``NAME=DIR`` can read: the datasets'."""
    return tuple(name for name in OOD_SETS if name in DATASETS)


def _forms() -> str:
    return (f"{HELDOUT}, NAME=DIR (NAME one of {', '.join(folder_sets())}) or a PATH (a folder of images and arrays, "
            f"or a {ARRAY_SUFFIX} array; write ./NAME for a path that looks like a name; LABEL=PATH names it in reports)")


@dataclass(frozen=True)
class OodRequest:
    """One ``--ood`` value, resolved: ``kind`` is ``set`` (the registered ``name``, read from
    ``data_dir`` when given: ``NAME=DIR``), ``heldout`` or ``path``. ``label`` names the set in
    reports: the value as given, or ``NAME`` for ``NAME=DIR``, ``LABEL`` for ``LABEL=PATH``
    (``labelled``)."""

    label: str
    kind: str
    name: Optional[str] = None
    data_dir: Optional[Path] = None
    path: Optional[Path] = None
    labelled: bool = False

    def mistyped(self) -> str:
        """For a folder labelled like a set ``NAME=DIR`` reads (``svnh=/data/svhn``), a hint to add to
        an error about its images; else ""."""
        close = difflib.get_close_matches(self.label.lower(), folder_sets(), n=1, cutoff=0.75) if self.labelled else []
        return (f" (read as your own images, labelled {self.label}; torchvision's {close[0]} in that folder is "
                f"--ood {close[0]}={self.path})") if close else ""

    @property
    def seed_key(self) -> str:
        """What seeds the set's Monte Carlo draws: the label, or for a path the path itself, made
        absolute, so ``odd``, ``./odd`` and ``$PWD/odd`` (as a sweep records it) draw alike."""
        return str(self.path.resolve()) if self.kind == "path" and self.path is not None else self.label


def _named(text: str) -> Optional[tuple[str, str]]:
    """``(NAME, DIR)`` of a ``NAME=DIR`` or ``LABEL=PATH`` value, else None (a path holding ``=``;
    ``NAME=DIR`` even where a file or folder ``NAME`` is in the current folder, a data folder ./mnist)."""
    name, sep, folder = text.partition("=")
    return (name, folder) if sep and not _written_as_path(name) and not Path(text).expanduser().exists() else None


def label_of(text: str) -> str:
    """The name the ``--ood`` value ``text`` has in reports, read as :func:`parse_ood` reads it, also
    when it no longer parses (a sweep's folder moved since): ``NAME`` or ``LABEL`` before a ``=``."""
    text = _as_given(str(text))
    named = _named(text) if text not in OOD_SETS else None
    return named[0].strip() if named else text


def _as_given(text: str) -> str:
    """``text`` without the spaces around it, unless it names a file or folder with them (``"sp "``
    beside ``sp``: the one typed)."""
    return text if text != text.strip() and Path(text).expanduser().exists() else text.strip()


def _written_as_path(text: str) -> bool:
    """A folder separator in it, or an array's suffix: a path however the folder around it looks."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in text for sep in separators) or text.lower().endswith(ARRAY_SUFFIX)


def _looks_like_path(text: str) -> bool:
    return _written_as_path(text) or Path(text).expanduser().exists()


def parse_ood(text: str) -> OodRequest:
    """What the ``--ood`` value ``text`` names (module docstring); a path must exist and be a folder
    or a ``.npy`` file. Anything else raises a one-line :class:`DataError` naming the valid forms."""
    text = _as_given(str(text))
    if not text:  # not the current folder, which Path("") would name
        raise DataError(f"--ood takes a value: one of {', '.join(OOD_SETS.names())}, or {_forms()}")
    if text in (HELDOUT, *OOD_SETS.names()) and Path(text).exists():  # a name first: the folder is ./NAME
        warn_once(logger, (text, "named"), "--ood %s is the %s set, not the folder %s here; for that folder give "
                  "--ood ./%s", text, "held-out classes'" if text == HELDOUT else "built-in", text, text)
    if text == HELDOUT:
        return OodRequest(text, HELDOUT)
    if text in OOD_SETS:
        return OodRequest(text, "set", name=text)
    named = _named(text)
    if named is not None:
        name, folder = named
        if name not in folder_sets():
            if name in OOD_SETS or name == HELDOUT:
                raise DataError(f"--ood {text}: {name} is not read from a folder; NAME=DIR takes one of "
                                f"{', '.join(folder_sets())}")
            label, own = name.strip(), Path(folder.strip()).expanduser()
            if label.lower() in (*OOD_SETS.names(), HELDOUT):  # SVHN=DIR
                raise DataError(f"--ood {text}: set names are lower case ({label.lower()}); a label of your own "
                                "(LABEL=PATH) is no set's name")
            if not label or not folder.strip() or not own.exists():
                raise UnknownDataset(
                    f"--ood {text}: unknown OOD set {name!r}; NAME=DIR takes one of {', '.join(folder_sets())}; "
                    f"LABEL=PATH names a folder or {ARRAY_SUFFIX} array of your own, and "
                    f"{folder.strip() or 'PATH'} is none{looked_in(own) if folder.strip() else ''}")
            return OodRequest(label, "path", path=_own(text, own), labelled=True)  # the user's own, by its label
        if not folder.strip():
            raise DataError(f"--ood {text}: give the folder after '=', e.g. --ood {name}=/data/{name}")
        return OodRequest(name, "set", name=name, data_dir=Path(folder.strip()).expanduser())
    if _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"--ood {text}: no such file or folder{looked_in(path)}; a path must be a folder of "
                            f"images and arrays, or a {ARRAY_SUFFIX} array")
        return OodRequest(text, "path", path=_own(text, path))
    if "," in text and all(n.strip() in (*OOD_SETS.names(), HELDOUT) for n in text.split(",")):  # as --method takes them
        raise UnknownDataset(f"--ood {text}: give --ood once per set: " + " ".join(f"--ood {n.strip()}" for n in text.split(",")))
    unknown = OOD_SETS.unknown_message(text)
    nearby = bool(OOD_SETS.close_matches(text))  # a misspelt name: no word of paths
    raise UnknownDataset(f"{unknown}; or {_forms()}" + ("" if nearby else f"; nor is {text} a file or folder{looked_in(Path(text))}"))


def _own(text: str, path: Path) -> Path:
    """``path``, an existing folder or ``.npy`` array of the user's own inputs; any other file refused."""
    if not path.is_dir() and path.suffix.lower() != ARRAY_SUFFIX:
        raise DataError(f"--ood {text}: a file must be a {ARRAY_SUFFIX} array; pass the folder that holds the images")
    return path


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
