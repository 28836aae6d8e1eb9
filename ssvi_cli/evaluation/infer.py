"""Prediction from a model file on user inputs: image files, folders and ``.npy`` arrays.

Inputs are decoded to (N, C, H, W) uint8 or float-in-[0, 1] tensors, brought to the model's input by
``data.transforms.preprocess`` (channels, size, normalisation from the file's data description) and
predicted through ``prediction.predict_batch``, the same code path training and evaluation use, under
the ``prediction`` kernel policy: linear layers always multiply over the stored entries, convolutions
keep the automatic choice (dense for 3x3, sparse for 1x1; see ``core.kernels.KernelPolicy``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TextIO

import torch
from torch import Tensor

from ssvi_cli import fileio
from ssvi_cli.data.images import (ARRAY_SUFFIX, IMAGE_SUFFIXES, NOT_AN_IMAGE, STDIN, UnreadableImages, find_files,
                                  open_stream, read_image, shown, starts_as_npy, whole_jpegs)
from ssvi_cli.data.decoding import read_ahead
from ssvi_cli.data.spec import DataError, DataSpec
from ssvi_cli.data.transforms import preprocess
from ssvi_cli.evaluation.arrays import InputError, load_array
from ssvi_cli.core.modes import using_kernel
from ssvi_cli.metrics import has_spread, mutual_information, predictive_entropy
from ssvi_cli.models import SSVIModel
from ssvi_cli.prediction import NonFiniteOutput, model_device, predict_batch
from ssvi_cli.runs.rundir import RunDir

OUTPUT_SUFFIXES = (".jsonl", ".csv")
MODEL_FIRST = "the model comes first: ssvi infer MODEL INPUTS..."
_CHUNK = 1024  # images of one array preprocessed at a time


class UnreadableInputs(UnreadableImages, InputError):
    """The inputs among ``files`` that cannot be read (:class:`~ssvi_cli.data.images.UnreadableImages`)."""

    def __init__(self, bad: Sequence[tuple[str, Exception]], files: Sequence[Path]) -> None:
        super().__init__(bad, files, "input files")


# ------------------------------------------------------------------ finding inputs

def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files in the given order; folders contribute their image and ``.npy`` files, recursively,
    in sorted order, hidden ones skipped (``data.images.find_files``); ``-`` is standard input. A
    missing path or a folder without inputs is an error."""
    files: list[Path] = []
    for path in map(Path, paths):
        if str(path) == STDIN:
            files.append(path)  # standard input, read once, whole, when its turn comes
        elif path.is_dir():
            found = find_files(path, IMAGE_SUFFIXES + (ARRAY_SUFFIX,))
            if not found and RunDir(path).is_run():  # ssvi infer IMAGES RUN: the arguments swapped
                raise InputError(f"{path} is a run's folder, a model, not inputs; {MODEL_FIRST}")
            if not found:
                raise InputError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}) or .npy files")
            files.extend(found)
        elif path.suffix.lower() in (".safetensors", ".pt", ".pth") and path.is_file():
            raise InputError(f"{path} is a model file, not an input; {MODEL_FIRST}")
        elif path.suffix.lower() == ".npz" and path.is_file():
            raise InputError(f"{path}: a .npz archive of arrays; save each array as .npy (np.save) and pass those")
        elif path.exists():  # a file, or a pipe or device such as /dev/stdin (read once, whole)
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def known_count(files: Sequence[Path]) -> Optional[int]:
    """How many inputs ``files`` give when each is an image file (one each); None when an array or a
    stream is among them, whose count is known only once it is read."""
    return len(files) if all(f.suffix.lower() in IMAGE_SUFFIXES for f in files) else None


# ------------------------------------------------------------------ decoding

def _starts_as_npy(path: Path, stream: Optional[io.BytesIO]) -> bool:
    """An input named without a known suffix (``/dev/stdin`` redirected from a file is a regular
    file) is an array when it starts with numpy's header; anything else, unreadable files too, goes
    to the image reader, which reports it."""
    try:
        return starts_as_npy(path, stream)
    except OSError:
        return False


def iter_raw(files: Iterable[Path], channels: int = 3, pixel_max: float = 255.0,
             input_shape: Optional[Sequence[int]] = None,
             bad: Optional[list[tuple[str, Exception]]] = None) -> Iterator[tuple[Path, list[str], Tensor]]:
    """(source, names, pixels (n, C, H, W)) per image file, and per chunk of each array's images. A file
    that cannot be read raises its ``InputError``, or with ``bad`` is put there and passed by. Image
    files are read a few at once (``decoding.read_ahead``), in order."""
    files = list(files)
    side = max(input_shape[1:]) if input_shape else None  # what a JPEG may be decoded down to (read_image)
    plain = [p.suffix.lower() in IMAGE_SUFFIXES and str(p) != STDIN and p.is_file() for p in files]
    ahead = read_ahead(tuple(p for p, is_plain in zip(files, plain) if is_plain), side)
    for path, is_plain in zip(files, plain):
        try:
            if is_plain:
                images = next(ahead)[1]
                if isinstance(images, DataError):  # read_image's words, as the error this reader raises
                    raise InputError(str(images))
                yield path, [str(path)], images
                continue
            stream = None if path.is_file() and str(path) != STDIN else open_stream(path, InputError)  # read once
            if path.suffix.lower() == ARRAY_SUFFIX or (path.suffix.lower() not in IMAGE_SUFFIXES
                                                       and _starts_as_npy(path, stream)):
                images = load_array(path, channels, pixel_max, stream, input_shape)
            else:
                try:
                    images = read_image(path, InputError, stream, size=side)
                except InputError as exc:  # a file Pillow cannot identify, named as no image: what infer reads
                    if path.suffix.lower() in IMAGE_SUFFIXES or not path.suffix or NOT_AN_IMAGE not in str(exc):
                        raise
                    raise InputError(f"{path} is neither an image Pillow reads nor a .npy array, the inputs ssvi infer "
                                     "reads; replace or remove the file") from None
                yield path, [str(path)], images
                continue
        except InputError as exc:
            if bad is None:
                raise
            bad.append((str(path), exc))
            continue
        for start in range(0, len(images), _CHUNK):
            part = images[start:start + _CHUNK]
            yield path, [f"{path}[{start + i}]" for i in range(len(part))], part


def iter_batches(files: Sequence[Path], spec: DataSpec, batch_size: int,
                 skipped: Optional[list[tuple[str, Exception]]] = None) -> Iterator[tuple[list[str], Tensor]]:
    """Preprocessed model inputs in batches of ``batch_size`` (the last may be smaller). Past an input
    that cannot be read no batch comes: the rest are read to name every such input in one
    :class:`UnreadableInputs`. With ``skipped``, such inputs are put there and the others go on."""
    names: list[str] = []
    parts: list[Tensor] = []
    held = 0
    bad: list[tuple[str, Exception]] = [] if skipped is None else skipped
    raw = iter_raw(files, spec.input_shape[0], spec.pixel_max, spec.input_shape, bad)
    for source, chunks in itertools.groupby(raw, key=lambda item: item[0]):  # an input file's chunks
        before = bool(bad)  # reading this file to its end reads ahead into the next, which may add to bad
        prepared = ((chunk_names, preprocess(pixels, spec)) for _, chunk_names, pixels in chunks)
        try:  # skipping, a file is predicted whole or not at all: each of its chunks is prepared first
            for chunk_names, x in list(prepared) if skipped is not None else prepared:
                if before and skipped is None:
                    continue  # past an input that cannot be read: read on, to name every such input
                names.extend(chunk_names)
                parts.append(x)
                held += len(x)
                while held >= batch_size:
                    batch = torch.cat(parts)
                    yield names[:batch_size], batch[:batch_size]
                    names, parts = names[batch_size:], [batch[batch_size:]]
                    held -= batch_size
        except DataError as exc:
            bad.append((str(source), InputError(f"{source}: {exc}")))
    if bad and skipped is None:
        raise UnreadableInputs(bad, files)
    if held:
        yield names, torch.cat(parts)


# ------------------------------------------------------------------ prediction

def predict_records(model: SSVIModel, x: Tensor, class_names: Sequence[str], *, samples: int,
                    mode: str, top_k: int) -> list[dict[str, Any]]:
    """One record per input row: predicted class, its probability, top-k, entropy and MI."""
    probs, sample_probs = predict_batch(model, x, samples, mode)
    probs = probs.cpu()
    entropy = predictive_entropy(probs.numpy())
    mi = mutual_information(sample_probs.cpu().numpy()) if has_spread(sample_probs) else None
    k = top_count(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    records = []
    for row in range(len(probs)):
        best = int(top_i[row, 0])
        records.append({
            "class": class_names[best],
            "class_index": best,
            "probability": float(top_p[row, 0]),
            "top_k": [{"class": class_names[int(i)], "probability": float(p)}
                      for p, i in zip(top_p[row], top_i[row])],
            "entropy": float(entropy[row]),
            "mutual_information": float(mi[row]) if mi is not None else None,
        })
    return records


def predict_inputs(model: SSVIModel, spec: DataSpec, files: Sequence[Path], sink: Callable[[list[dict[str, Any]]], None],
                   *, samples: int = 10, mode: str = "mc", batch_size: int = 256, top_k: int = 3, seed: int = 0,
                   on_batch: Optional[Callable[[int], None]] = None,
                   skipped: Optional[list[tuple[str, Exception]]] = None) -> int:
    """Predict every input on ``model``'s device with the ``prediction`` kernel policy (linear layers
    multiply over their stored entries, never a densified weight), handing each batch's records to
    ``sink`` as they come: nothing is kept, so any number of inputs takes the memory of one batch.
    Returns how many inputs were predicted. The draws are seeded with ``seed`` on a forked RNG, so a
    run is reproducible and the caller's RNG and model are untouched. Inputs that cannot be read are
    one :class:`UnreadableInputs`, or with ``skipped`` are put there (``(name, error)``) and passed
    by; ``on_batch(n)``: n more inputs predicted or skipped."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    device = model_device(model)
    predicted = 0
    told = len(skipped or ())  # inputs predicted or skipped that on_batch has been told of (or skipped before)

    def advance() -> None:
        nonlocal told
        if on_batch is not None and (n := predicted + len(skipped or ()) - told):
            on_batch(n)
            told += n

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            using_kernel(model, "prediction"), whole_jpegs(spec.reads_jpegs_whole):  # JPEGs read as in its training
        torch.manual_seed(seed)
        for names, x in iter_batches(files, spec, batch_size, skipped):
            try:
                batch = predict_records(model, x.to(device), spec.class_names, samples=samples, mode=mode, top_k=top_k)
            except NonFiniteOutput as exc:
                raise exc.naming(name=names[exc.first]) from None
            sink([{"input": shown(name), **rec} for name, rec in zip(names, batch)])
            predicted += len(batch)
            advance()
        advance()
    return predicted


def run_inference(model: SSVIModel, spec: DataSpec, files: Sequence[Path], **options: Any) -> list[dict[str, Any]]:
    """Every input's record, in order (:func:`predict_inputs`, its keyword options, kept in a list)."""
    records: list[dict[str, Any]] = []
    predict_inputs(model, spec, files, records.extend, **options)
    return records


# ------------------------------------------------------------------ writing predictions

class PredictionWriter:
    """Records written as they come, as JSON lines (``.jsonl``) or CSV (``.csv``; the top-k as columns
    ``top1_class``, ``top1_probability``, ``top2_class``, ...: a class name may hold any character)."""

    def __init__(self, stream: TextIO, suffix: str, top_k: int) -> None:
        if suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"unknown output type {suffix!r}; use one of {', '.join(OUTPUT_SUFFIXES)}")
        self.stream, self.suffix = stream, suffix
        if suffix == ".csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["input", "class", "class_index", "probability", "entropy", "mutual_information",
                               *(f"top{i}_{part}" for i in range(1, top_k + 1) for part in ("class", "probability"))])

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        if self.suffix == ".jsonl":
            self.stream.write("".join(json.dumps(fileio.json_ready(r), allow_nan=False) + "\n" for r in records))
            return
        for r in records:
            mi = "" if r["mutual_information"] is None else f"{r['mutual_information']:.6g}"
            top = [v for t in r["top_k"] for v in (t["class"], f"{t['probability']:.6g}")]
            self.csv.writerow([r["input"], r["class"], r["class_index"], f"{r['probability']:.6g}",
                               f"{r['entropy']:.6g}", mi, *top])


def top_count(top_k: int, classes: int) -> int:
    """How many classes each record's top-k lists, of a model of ``classes`` outputs."""
    return max(1, min(top_k, classes))
