"""From pixels to model inputs: unit scaling, channel conversion, resizing, normalisation, the CIFAR
train augmentation, and the tensor-backed datasets that apply them per batch.

Items are normalised (and augmented) with tensor ops, never PIL: CPU training time is dominated by
the input pipeline otherwise.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssvi_cli.data.spec import DataError, DataSpec



def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [0, 1]; float images pass through as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def random_crop_flip(batch: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop back to H x W after zero padding, then random horizontal flip (p = 0.5).

    Draws from ``generator``, by default torch's global RNG (so a seeded DataLoader without workers
    reproduces the same augmentations).
    """
    n, _, h, w = batch.shape
    padded = F.pad(batch, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2).contiguous()
    flip = torch.rand(n, generator=generator) < 0.5
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
        self.augment_key: Optional[int] = None  # see seeded()
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def normalised_as(self, spec: DataSpec) -> "TensorImageDataset":
        """The same images and labels normalised with ``spec``'s mean and std instead (a model file
        that records its own normalisation for a registered dataset); itself when they are its own."""
        other = TensorImageDataset(self.images, self.labels, spec, augment=self.augment, indices=self.indices)
        same = torch.equal(other._mean, self._mean) and torch.equal(other._std, self._std)
        return self if same else other

    def seeded(self, key: int) -> "TensorImageDataset":
        """The same dataset whose augmentation of a batch draws from a generator seeded by ``key`` and
        the batch's indices alone, not from the RNG of the process that loads it: the same batch of
        an epoch (``key``) is augmented alike with any number of loader workers, and in a run resumed
        in the middle of the epoch, where the workers would otherwise take other batches."""
        other = copy.copy(self)  # the same tensors, shared
        other.augment_key = int(key)
        return other

    def _prepare(self, index: Sequence[int]) -> torch.Tensor:
        x = _to_unit(self.images[index])
        if self.augment is not None and self.augment_key is None:
            x = self.augment(x)
        elif self.augment is not None:
            digest = hashlib.blake2b(np.asarray(index, dtype=np.int64).tobytes(), digest_size=8,
                                     key=self.augment_key.to_bytes(16, "little", signed=True)).digest()
            x = self.augment(x, generator=torch.Generator().manual_seed(int.from_bytes(digest, "little")))
        return (x - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._prepare([index])[0], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by DataLoader: one vectorised normalise/augment per batch."""
        x = self._prepare(list(indices))
        return list(zip(x.unbind(0), self.labels[indices].tolist()))


def seeded_augmentation(dataset: Dataset, key: int) -> Dataset:
    """``dataset.seeded(key)`` for an augmented :class:`TensorImageDataset`; any other as it is."""
    if isinstance(dataset, TensorImageDataset) and dataset.augment is not None:
        return dataset.seeded(key)
    return dataset


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
            own = (f" (or, for this model's {spec.name} data, its raw 0..{spec.pixel_max:g})"
                   if spec.pixel_max != 255.0 else "")
            raise DataError(
                f"float images range over [{lo:.3g}, {hi:.3g}], not [0, 1]{own}; "
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
