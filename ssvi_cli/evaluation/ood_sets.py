"""The OOD sets of one evaluation, each shaped and normalised like the model's inputs and yielding
(x, -1): registered sets (from the data directory, or ``NAME=DIR`` from their own folder), the
held-out classes of the in-distribution dataset (``heldout``), and the user's own inputs (``PATH``).

A user's folder is read as ``ssvi infer`` reads one: image files of any size and mode and ``.npy``
files (each one image or a batch of them, by infer's shape rules), found recursively (hidden files
and folders skipped) and taken in sorted order. A user's ``.npy`` file on its own is a batch shaped
(N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4 (a 4-D array is channels-first when its
second axis is 1, 3 or 4). Pixels are uint8 0..255 (other integer types in that range too), float
in [0, 1], or, for a model whose data spec records another raw range ``[0, pixel_max]`` (the
digits' 0..16), values in that range with a maximum above 1. Every set holds at most ``max_items``
items, drawn with ``seed`` before any image file is decoded (arrays are read whole, to count them).
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ssvi_cli.config import image_folder
from ssvi_cli.data import DataError, DatasetUnavailable, DataSpec, PreparedDataset, preprocess
from ssvi_cli.data.decoding import read_ahead
from ssvi_cli.data.images import ARRAY_SUFFIX, IMAGE_SUFFIXES, find_files, read_array, unreadable
from ssvi_cli.data.ood import HELDOUT, OodRequest, build_ood, parse_ood
from ssvi_cli.evaluation.arrays import array_to_images, load_array, unflattened

logger = logging.getLogger(__name__)

ARRAY_SHAPES = "(N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4"


def _retrain_hint(spec: DataSpec) -> str:
    """Train on the first half of the classes: at least two (a classifier needs two), one fewer than
    all at most."""
    if spec.num_classes < 3:
        return f"{spec.name} has {spec.num_classes} classes, too few to train on two and hold one out"
    keep = ",".join(str(i) for i in range(max(2, spec.num_classes // 2)))
    return f"train with --set data.classes={keep} (indices or names of {spec.name}'s classes) and evaluate that model"


def check_heldout(spec: DataSpec) -> None:
    """``--ood heldout`` needs a model trained on part of its dataset's classes."""
    if not spec.dataset_classes:
        raise DataError(f"--ood {HELDOUT}: the model was trained on all {spec.num_classes} classes of {spec.name}, "
                        f"so none is held out; {_retrain_hint(spec)}")
    if not spec.held_out_classes:
        raise DataError(f"--ood {HELDOUT}: the model's data.classes list every class of {spec.name}, so none is "
                        "held out; train on fewer classes")


def image_files(folder: Path) -> list[Path]:
    """The image files and ``.npy`` arrays under ``folder``, recursively and sorted; none is an error."""
    files = find_files(folder, IMAGE_SUFFIXES + (ARRAY_SUFFIX,))
    if not files:
        raise DataError(f"--ood {folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}) and no "
                        f"{ARRAY_SUFFIX} arrays; pass a folder of images or arrays, or one {ARRAY_SUFFIX} array")
    return files


def source_digest(path: Path) -> str:
    """What identifies the user's OOD set at ``path`` in a report, so that a set changed since (a sweep's
    cells evaluated on two versions of it) is told apart: an array file by its bytes, a folder by the
    names, sizes and modification times of the files it reads (:func:`image_files`)."""
    if not path.is_dir():
        stat = path.stat()
        return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)
    digest = hashlib.sha256()
    for file in image_files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
                      .encode("utf-8", "surrogateescape"))
    return "sha256:" + digest.hexdigest()[:16]


@lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """A file's bytes' digest, read once while its size and modification time stay (a sweep looks
    at every cell's evaluation)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def source_digests(requests: dict[str, OodRequest]) -> dict[str, str]:
    """:func:`source_digest` of each of ``requests`` that is the user's own folder or array, by label."""
    return {label: source_digest(request.path) for label, request in requests.items()
            if request.kind == "path" and request.path is not None}


def resolve_requests(texts: Iterable[str], spec: DataSpec, dataset: str) -> dict[str, OodRequest]:
    """Every ``--ood`` value parsed and checked before any data is read, by label (repeats once)."""
    requests: dict[str, OodRequest] = {}
    given: dict[str, str] = {}  # each label's first value, as the user wrote it
    paths: dict[str, str] = {}  # each file or folder read, by its real path -> its label
    for text in texts:
        request = OodRequest(text, "set", name=text) if text == dataset else parse_ood(text)
        if request.name == dataset:
            raise DataError(f"--ood {text} is the in-distribution dataset itself; pick another OOD set"
                            + (f", or --ood {HELDOUT} for the classes the model was not trained on"
                               if spec.held_out_classes else ""))
        check_outside(request, text, dataset)
        if request.kind == HELDOUT:
            check_heldout(spec)
        elif request.kind == "path" and request.path is not None and request.path.is_dir():
            try:
                image_files(request.path)
            except DataError as exc:  # svnh=/data/svhn: SVHN's folder, its name mistyped, read as images
                raise DataError(f"{exc}{request.mistyped()}") from None
        if requests.get(request.label, request) != request:  # mnist=DIR beside mnist (read from --data-dir), say
            raise DataError(f"--ood {request.label} is given twice, as {given[request.label]} and as {text}; "
                            "give it once")
        if request.kind == "path" and request.path is not None:  # one file under two labels: scored twice
            real = os.path.realpath(request.path)
            if paths.setdefault(real, request.label) != request.label:
                raise DataError(f"--ood {text} reads the same {'folder' if request.path.is_dir() else 'file'} as "
                                f"--ood {given[paths[real]]}; give it once")
        requests[request.label] = request
        given.setdefault(request.label, text)
    return requests


def check_outside(request: OodRequest, text: str, dataset: str) -> None:
    """Refuses an OOD path that holds images of the image folder ``dataset`` names (``imagefolder:DIR``):
    the folder itself, a class folder of it or a folder around it. Their AUROC would measure nothing. A
    folder beside its class folders, which it does not read, is an OOD set like any other."""
    from ssvi_cli.data.imagefolder import scan_folder

    folder = image_folder(dataset) or ""
    if request.kind != "path" or request.path is None or not folder:
        return
    own, given = Path(os.path.realpath(Path(folder).expanduser())), Path(os.path.realpath(request.path.expanduser()))
    if not (given == own or own in given.parents or given in own.parents):
        return  # apart: nothing to list
    try:
        ours = {os.path.realpath(f) for files, _ in scan_folder(own).parts.values() for f in files}
        theirs = image_files(given) if given.is_dir() else [given]
    except DataError:  # the dataset's own error comes when it is read; an empty OOD folder's from resolve_requests
        return
    if shared := sum(os.path.realpath(f) in ours for f in theirs):
        raise DataError(f"--ood {text} holds {shared} of the images of the in-distribution dataset itself "
                        f"({dataset}), which the model is trained and evaluated on; pick another OOD set")


def _choose(n: int, seed: int, max_items: Optional[int]) -> np.ndarray:
    """Sorted positions of at most ``max_items`` of ``n`` items, drawn with ``seed``."""
    if max_items is None or n <= max_items:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False))


def folder_images(folder: Path, spec: DataSpec, seed: int, max_items: Optional[int]) -> torch.Tensor:
    """The images of ``folder`` (at most ``max_items`` of them all), each brought to ``spec``'s input,
    in the files' sorted order: each image file, and each ``.npy`` file's images as ``ssvi infer``
    reads them (one image, or a batch; arrays are checked whole and counted, image files are decoded
    only when drawn)."""
    files = image_files(folder)
    side = max(spec.input_shape[1:])  # what a JPEG may be decoded down to (read_image)
    # Each array's length; its file is mapped again for the rows drawn (a mapping holds its file open, and a
    # folder of thousands of arrays held at once ran out of open files).
    arrays, bad = {}, []
    for path in (p for p in files if p.suffix.lower() == ARRAY_SUFFIX):
        try:
            arrays[path] = len(_folder_array(path, spec))
        except DataError as exc:
            bad.append((str(path), exc))
    if bad:  # no draw without every array's length: the image files are checked, to name them all at once
        images = tuple(p for p in files if p.suffix.lower() != ARRAY_SUFFIX)
        bad += [(str(path), read) for path, read in read_ahead(images, side) if isinstance(read, DataError)]
        order = {str(path): i for i, path in enumerate(files)}
        raise unreadable(sorted(bad, key=lambda b: order[b[0]]), len(files), f"files of {folder}")
    items = [(path, row) for path in files for row in (range(arrays[path]) if path in arrays else (0,))]
    rows: dict[Path, list[int]] = {}
    for i in _choose(len(items), seed, max_items):
        path, row = items[i]
        rows.setdefault(path, []).append(row)
    logger.info("decoding %d images of %s", sum(map(len, rows.values())), folder)
    parts = []
    read = read_ahead(tuple(p for p in rows if p not in arrays), side)  # a few at once, in this order
    for path, taken in rows.items():
        try:
            pixels = _folder_array(path, spec)[taken] if path in arrays else next(read)[1]
            if isinstance(pixels, DataError):
                raise pixels
            parts.append(_prepared(pixels, spec, str(path)))
        except DataError as exc:  # every such file named in one error, not one per run
            bad.append((str(path), exc))
    if bad:
        raise unreadable(bad, len(rows), f"files drawn from {folder}")
    return torch.cat(parts)


def _folder_array(path: Path, spec: DataSpec) -> torch.Tensor:
    """A folder's ``.npy`` file as ``ssvi infer`` reads it, (n, C, H, W) pixels."""
    try:
        return load_array(path, spec.input_shape[0], spec.pixel_max, input_shape=spec.input_shape)
    except DataError as exc:  # infer's words for the array, named as the --ood value it came from
        raise DataError(f"--ood {exc}" if str(exc).startswith(str(path)) else f"--ood {path}: {exc}") from None


def array_images(path: Path, spec: DataSpec, seed: int, max_items: Optional[int]) -> torch.Tensor:
    """The images of the ``.npy`` array at ``path`` (at most ``max_items``), brought to ``spec``'s input."""
    arr = _array(path, spec)
    return _array_prepared(arr[_choose(len(arr), seed, max_items)], path, spec)


def _array(path: Path, spec: DataSpec) -> np.ndarray:
    """The ``.npy`` array at ``path`` as (N, C, H, W) pixels, or the error naming its shape."""
    arr = read_array(path, DataError, name=f"--ood {path}")
    shape = tuple(arr.shape)
    if arr.size == 0:
        raise DataError(f"--ood {path}: array of shape {shape} holds no images; an OOD set needs at least one")
    features = int(np.prod(spec.input_shape))
    if arr.ndim == 2 and arr.shape[1] == features:  # flattened inputs, as load_digits().data (a square one: said)
        arr = unflattened(arr, spec.input_shape, f"--ood {path}", batch=True)
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):  # not N images 1, 3 or 4 pixels wide: one picture
        raise DataError(f"--ood {path}: array of shape {shape} is one (H, W, C) image, as ssvi infer reads it; an OOD "
                        "set is a batch, (N, H, W), (N, H, W, C) or (N, C, H, W)")
    elif arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3, 4) and arr.shape[-1] in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3, 4) or 0 in arr.shape:
        raise DataError(f"--ood {path}: array of shape {shape}; expected {ARRAY_SHAPES}, or (N, {features}) flattened")
    return arr


def _array_prepared(arr: np.ndarray, path: Path, spec: DataSpec) -> torch.Tensor:
    return _prepared(array_to_images(arr, f"--ood {path}", spec.input_shape[0], spec.pixel_max), spec, f"--ood {path}")


def _prepared(pixels: torch.Tensor, spec: DataSpec, name: str) -> torch.Tensor:
    try:
        return preprocess(pixels, spec)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None


def heldout_images(heldout: Optional[Dataset], spec: DataSpec, seed: int, max_items: Optional[int]) -> torch.Tensor:
    """The held-out classes' test images (at most ``max_items``), normalised like the test split."""
    check_heldout(spec)
    images = getattr(heldout, "images", None)
    if images is None or len(images) == 0:
        raise DataError(f"--ood {HELDOUT}: the test split of {spec.name} holds no images of the held-out classes "
                        f"({', '.join(spec.held_out_classes)})")
    return preprocess(images[torch.from_numpy(_choose(len(images), seed, max_items))], spec)


def load_ood(request: OodRequest | str, spec: DataSpec, root: Optional[Path], download: bool, seed: int,
             max_items: Optional[int], heldout: Optional[Dataset] = None) -> PreparedDataset:
    """One OOD set shaped like ``spec``'s inputs (``root``: the data directory of registered sets,
    ``heldout``: the in-distribution data's held-out test images); says so when its images cannot be
    converted."""
    request = parse_ood(request) if isinstance(request, str) else request
    if request.kind == HELDOUT:
        return PreparedDataset(heldout_images(heldout, spec, seed, max_items))
    if request.kind == "path" and request.path is not None:
        read = folder_images if request.path.is_dir() else array_images
        try:
            return PreparedDataset(read(request.path, spec, seed, max_items))
        except DataError as exc:
            raise DataError(f"{exc}{request.mistyped()}") from None
    name = str(request.name)
    try:
        ds = build_ood(name, spec, data_dir=request.data_dir or root, download=download, seed=seed,
                       max_items=max_items)
    except DatasetUnavailable:
        raise
    except DataError as exc:
        raise DataError(f"OOD set {name} cannot be converted to the model's input {spec.input_shape}: {exc}") from exc
    shape = tuple(ds.images.shape[1:])
    if shape != tuple(spec.input_shape):
        raise DataError(f"OOD set {name} yields images shaped {shape}, the model takes {spec.input_shape}; "
                        "the shapes cannot be reconciled")
    return ds


def load_requests(requests: dict[str, OodRequest], spec: DataSpec, root: Optional[Path], download: bool,
                  seed: int, max_items: Optional[int], heldout: Optional[Dataset] = None) -> dict[str, Dataset]:
    """Every requested OOD set by label."""
    return {label: load_ood(request, spec, root, download, seed, max_items, heldout)
            for label, request in requests.items()}

