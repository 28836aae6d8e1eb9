"""Index codes of the model file (docs/FORMAT.md): how a layer's sorted active flat positions are
stored. ``gap8`` is Deep Compression's relative indexing in one byte per entry (fillers for gaps over
255), ``flat32`` plain int32 positions, ``full`` no index at all (every entry active)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

INDEX_CODES = ("full", "gap8", "flat32")
GAP_MAX = 255  # the largest gap one uint8 code holds; code 0 is a filler meaning "advance 255"


def gap8_encode(idx: Tensor) -> Tensor:
    """Sorted unique flat indices -> uint8 gap code (Deep Compression's relative indexing).

    The gap of entry i is ``d_i = idx_i - idx_{i-1}`` with ``idx_{-1} = -1``, so ``d_i >= 1``. A gap
    is written as ``q_i = (d_i - 1) // 255`` filler codes 0 (each advancing 255 positions) followed
    by the code ``d_i - 255 q_i`` in 1..255.
    """
    idx = idx.to(torch.int64)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = torch.diff(idx, prepend=idx.new_tensor([-1]))
    fillers = (gaps - 1) // GAP_MAX
    remainder = gaps - GAP_MAX * fillers
    positions = torch.arange(idx.numel()) + torch.cumsum(fillers, 0)
    codes = torch.zeros(int(positions[-1]) + 1, dtype=torch.uint8)
    codes[positions] = remainder.to(torch.uint8)
    return codes


def gap8_decode(codes: Tensor) -> Tensor:
    """Inverse of :func:`gap8_encode`: uint8 codes -> strictly increasing int64 flat indices."""
    codes = codes.to(torch.int64)
    steps = torch.where(codes == 0, torch.full_like(codes, GAP_MAX), codes)
    positions = torch.cumsum(steps, 0) - 1
    return positions[codes != 0]


def gap8_size(idx: Tensor) -> int:
    """Bytes of the gap code of ``idx`` without building it."""
    if idx.numel() == 0:
        return 0
    gaps = torch.diff(idx.to(torch.int64), prepend=idx.new_tensor([-1], dtype=torch.int64))
    return int(idx.numel() + ((gaps - 1) // GAP_MAX).sum())


def encode_index(idx: Tensor, numel: int) -> tuple[str, Optional[Tensor]]:
    """Pick the smallest code: none when the layer is full, else gap8 unless int32 is smaller."""
    if idx.numel() == numel:
        return "full", None
    if gap8_size(idx) <= 4 * idx.numel():
        return "gap8", gap8_encode(idx)
    if numel > torch.iinfo(torch.int32).max:
        raise ValueError(f"a layer of {numel} entries is too large for int32 flat indices")
    return "flat32", idx.to(torch.int32)
