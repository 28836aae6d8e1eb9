"""``.npy`` arrays as images for ``ssvi infer`` and ``ssvi evaluate --ood``: which axes are images,
channels and flattened model inputs, and which pixel ranges are read (``array_to_images``); and
``ssvi.preprocess``, the same reading for pixels in Python."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ssvi_cli.data.images import ALPHA_KEY, TRANSPARENT, read_array
from ssvi_cli.data.spec import DataError
from ssvi_cli.data.transforms import preprocess as _to_input
from ssvi_cli.warned import warn_once, warned, warnings_scope

logger = logging.getLogger(__name__)


class InputError(DataError):
    """An input that is missing or cannot be read as an image or array; the message names it."""


def array_to_images(arr: np.ndarray, name: str, channels: int = 3, pixel_max: float = 255.0,
                    input_shape: Optional[Sequence[int]] = None) -> Tensor:
    """A numeric array as (N, C, H, W) pixels, all of them (:func:`array_images`)."""
    images = array_images(arr, name, channels, pixel_max, input_shape)
    return images[:len(images)]


class ArrayImages:
    """An array's images as (N, C, H, W) pixels, converted a slice at a time (``images[a:b]``, or a
    list of positions, gives a tensor): an array mapped from its file is read as it is sliced."""

    def __init__(self, arr: np.ndarray, scale: Optional[float], name: str = "") -> None:
        # scale: what the pixels are divided by into floats; None: as uint8, or floats as they are
        self.arr, self.scale, self.name = arr, scale, name

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, index: object) -> Tensor:
        _whole(self.arr, self.name)
        part = self.arr[index]  # type: ignore[index]
        if self.scale is not None:
            return torch.from_numpy(np.array(part, dtype=np.float32, order="C") / np.float32(self.scale))
        kind = np.uint8 if np.issubdtype(self.arr.dtype, np.integer) else np.float32
        return torch.from_numpy(np.array(part, dtype=kind, order="C"))  # a copy: a mapped file is never written


_BLOCK_BYTES = 1 << 24  # an array's range and finiteness are checked this many bytes at a time


def _whole(arr: np.ndarray, name: str) -> None:
    """Refuse to read a mapped array whose file has been cut short since it was mapped (saved again in
    place): reading past its end would kill the process (SIGBUS) without a word."""
    mapped = getattr(arr, "_mmap", None)  # numpy's memmap (and its views) hold the mapping here
    if mapped is not None and mapped.size() < len(mapped):
        raise InputError(f"{name}: the file was cut short while it was read (saved again?); run again once it is "
                         "complete")


def _range(arr: np.ndarray, name: str) -> tuple[float, float, Optional[int]]:
    """The lowest and highest value of ``arr`` (NaN when one is) and the first position along its first
    axis that holds a value that is not finite (None: none), read in blocks."""
    rows = max(1, _BLOCK_BYTES // max(1, arr[:1].nbytes))
    lo, hi, first = np.inf, -np.inf, None
    for start in range(0, len(arr), rows):
        _whole(arr, name)
        block = np.asarray(arr[start:start + rows])
        lo, hi = np.minimum(lo, block.min()), np.maximum(hi, block.max())
        if first is None and block.dtype.kind == "f" and not np.isfinite(block).all():
            first = start + int(np.nonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0][0])
    return float(lo), float(hi), first


def array_images(arr: np.ndarray, name: str, channels: int = 3, pixel_max: float = 255.0,
                 input_shape: Optional[Sequence[int]] = None) -> ArrayImages:
    """A numeric array as (N, C, H, W) pixels; ``channels`` is the model's input channel count.

    Shapes: with the model's ``input_shape`` (C, H, W) given, a 1-D array of C*H*W values is one
    flattened image and an (N, C*H*W) array, unless it is shaped (H, W), N of them (row-major, as
    ``load_digits().data`` or ``x.reshape(len(x), -1)``); (H, W) one gray image; (C, H, W) one
    image when C is 1, or 3 or 4 for a colour model; (H, W, C) when the last axis is 1, 3 or 4; else
    (N, H, W) gray images (so a stack of 3 or 4 gray images for a gray model is a stack, not one
    colour image; for a colour model a (4, H, W) array is one RGBA image, with a warning); (N, C, H, W), or (N, H, W, C) when only the last axis is 1, 3 or 4. Pixels: uint8
    0..255 (other integer types in that range too), float in [0, 1], or, for a model whose data spec
    records another raw range ``[0, pixel_max]`` (the digits' 0..16), an array of any other dtype
    whose values exceed 1 and lie in that range (divided by ``pixel_max``): ``load_digits().images``
    predicts as it is.
    """
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name}: array dtype {arr.dtype} is not pixels; use uint8 0..255 or float in [0, 1]")
    if arr.size == 0:
        raise InputError(f"{name}: array of shape {arr.shape} holds no pixels")
    channel_sizes = (1, 3, 4)
    arr = unflattened(arr, input_shape, name)
    if arr.ndim == 2:
        features = int(np.prod(input_shape)) if input_shape is not None and len(input_shape) == 3 else None
        if features and abs(arr.shape[1] - features) <= max(2, features // 10):
            # rows a few values off the model's flattened input: more likely a batch than a picture. Said.
            logger.warning("%s: an array of shape %s is read as one %dx%d gray image, resized to %dx%d (a batch of "
                           "flattened inputs has %d values per row)", name, tuple(arr.shape), arr.shape[0],
                           arr.shape[1], input_shape[1], input_shape[2], features)
        arr = arr[None, None]
    elif arr.ndim == 3:
        if arr.shape[0] == 1 or (channels != 1 and arr.shape[0] in (3, 4)):
            if arr.shape[0] == 4:  # RGBA, whose alpha is dropped: a stack of four gray images loses one. Said.
                logger.warning("%s: an array of shape %s is read as one RGBA image (C, H, W), its alpha dropped; "
                               "four gray images read as (4, 1, H, W)", name, tuple(arr.shape))
            arr = arr[None]
        elif arr.shape[-1] in (1, 3, 4):  # (H, W, 1): one gray picture (np.asarray(img)[..., None]), not H rows
            arr = arr.transpose(2, 0, 1)[None]
        else:
            arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[1] not in channel_sizes:
            if arr.shape[-1] not in channel_sizes:
                raise InputError(f"{name}: array of shape {arr.shape} has no 1, 3 or 4 channel axis")
            arr = arr.transpose(0, 3, 1, 2)
    else:
        flat = f", ({int(np.prod(input_shape))},), (N, {int(np.prod(input_shape))})" if input_shape else ""
        raise InputError(f"{name}: array of shape {arr.shape}; expected one of (H, W), (C, H, W), (H, W, C), "
                         f"(N, H, W), (N, C, H, W), (N, H, W, C){flat}")
    lo, hi, first = _range(arr, name)
    if arr.shape[1] == 4 and not warned(ALPHA_KEY):  # (a mapped file checked whole again first)
        _whole(arr, name)
        if arr[:, 3].min() < (1.0 if arr.dtype.kind == "f" else 255):
            warn_once(logger, ALPHA_KEY, TRANSPARENT, name)  # as an RGBA image file's
    if pixel_max != 255.0 and arr.dtype != np.uint8 and 0.0 <= lo and 1.0 < hi <= pixel_max:
        # The dataset's own raw range (the digits: 0..16): values above 1 up to pixel_max are raw pixels.
        return ArrayImages(arr, pixel_max, name)
    if pixel_max != 255.0 and arr.dtype == np.uint8 and 1 < hi <= pixel_max:  # the digits' 0..16 cast to uint8, say
        logger.warning("%s: uint8 pixels, up to %d, are read as 0..255 (nearly black); this model's raw range "
                       "0..%g is read as such from integers of another dtype or floats", name, int(hi), pixel_max)
    if np.issubdtype(arr.dtype, np.integer):
        if lo < 0 or hi > 255:
            scale = " (16-bit pixels: x / 65535)" if lo >= 0 and hi <= 65535 else ""
            raise InputError(f"{name}: integer pixels range over [{int(lo)}, {int(hi)}], not 0..255; pass uint8 "
                             f"0..255, or floats in [0, 1]{scale}")
        return ArrayImages(arr, None, name)
    if first is not None:
        where = f" (the first at index {first} of its first axis)" if arr.ndim > 1 else ""
        raise InputError(f"{name}: array holds NaN or infinite values{where}")
    lo, hi = float(np.float32(lo)), float(np.float32(hi))  # as the float32 pixels hold them
    if lo < -1e-6 or hi > 1 + 1e-6:  # the whole array's, as above
        own = f" (or, for this model's data, its raw 0..{pixel_max:g})" if pixel_max != 255.0 else ""
        raise InputError(f"{name}: float images range over [{lo:.3g}, {hi:.3g}], not "
                         f"[0, 1]{own}; divide 0..255 pixels by 255 or pass uint8")
    return ArrayImages(arr, None, name)


def unflattened(arr: np.ndarray, input_shape: Optional[Sequence[int]], name: str, batch: bool = False) -> np.ndarray:
    """``arr`` as (N, C, H, W) when it holds flattened model inputs (``array_to_images``), else as it is;
    ``batch``: an array that must be a batch (an OOD set), so never one (H, W) picture."""
    if input_shape is None or len(input_shape) != 3:
        return arr
    features = int(np.prod(input_shape))
    if arr.ndim == 1 and arr.size == features:
        return arr.reshape(1, *input_shape)
    if arr.ndim == 2 and arr.shape[1] == features and (batch or tuple(arr.shape) != tuple(input_shape[1:])):
        if arr.shape[0] == features:  # as square as a gray picture: the other reading is said
            logger.warning("%s: an array of shape %s is read as %d flattened inputs of %d values each; a %dx%d gray "
                           "picture reads as one image saved as (1, %d, %d) or as a PNG", name, tuple(arr.shape),
                           features, features, features, features, features, features)
        return arr.reshape(len(arr), *input_shape)
    return arr


def load_array(path: Path, channels: int = 3, pixel_max: float = 255.0,
               stream: Optional[io.BytesIO] = None, input_shape: Optional[Sequence[int]] = None) -> ArrayImages:
    """A ``.npy`` file's images (``array_images``), read from the file as they are sliced; ``stream``:
    its bytes already read, ``path`` then only names it."""
    return array_images(read_array(path, InputError, stream), str(path), channels, pixel_max, input_shape)


@warnings_scope()  # each call says its warnings (a notebook's second call too), as the data readers do
def preprocess(model: torch.nn.Module, pixels: object) -> Tensor:
    """Pixels as ``ssvi infer`` reads a ``.npy`` array (any shape and range it takes: uint8 0..255,
    floats in [0, 1], the data's raw range), brought to ``model``'s input as its description says
    (``model.ssvi_card``, kept by ``ssvi.load`` and ``make_model``: channels, size, normalisation):
    the float32 (N, C, H, W) batch on the CPU that ``ssvi.predict(model, x)`` takes, as ``ssvi infer``
    would feed it."""
    card = getattr(model, "ssvi_card", None)
    if card is None:
        raise ValueError("the model carries no description of its inputs (model.ssvi_card, which ssvi.load gives): "
                         "normalise its inputs as it was trained")
    spec = card.data
    if len(spec.input_shape) != 3:
        raise ValueError(f"the model's inputs are described as {tuple(spec.input_shape) or 'unknown'}, not images "
                         "(channels, height, width): preprocess makes image inputs; save the model with input_shape=(C, H, W)")
    if isinstance(pixels, Tensor):
        pixels = pixels.detach().cpu()
        pixels = (pixels.float() if pixels.dtype == torch.bfloat16 else pixels).numpy()  # numpy has no bfloat16
    try:
        images = array_to_images(np.asarray(pixels), "pixels", spec.input_shape[0], spec.pixel_max, spec.input_shape)
        return _to_input(images, spec)
    except DataError as exc:
        raise ValueError(str(exc)) from None
