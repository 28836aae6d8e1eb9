"""A layer's buffers during one Monte Carlo prediction (see :func:`ssvi_cli.core.modes.drawing`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ssvi_cli.core.layers import SparseGaussian


class DrawState:
    """A layer's state during one Monte Carlo prediction without gradients (see :func:`ssvi_cli.core.modes.drawing`).

    sigma is computed once; every draw overwrites one weight tensor (``values``); the CSR matrix over
    that tensor is built once (it aliases it, so each draw's weights are already in it), and so are
    the off-support zeros of a dense weight; the layer's output tensor is overwritten by the next
    draw instead of allocated afresh (large fresh tensors page-fault on first touch, every draw).
    """

    def __init__(self, layer: "SparseGaussian") -> None:
        self.mu = layer.mu.detach()
        self.sigma = layer.sigma().detach()
        self.values = torch.empty_like(self.mu)
        self.matrix: Optional[Tensor] = None
        self.dense: Optional[Tensor] = None
        self.out: Optional[Tensor] = None

    def sample(self) -> Tensor:
        """One weight draw over the active entries, mu + sigma * eps, written into ``values``."""
        self.values.normal_()  # the same draw as randn_like(mu), then overwritten by the weights
        return torch.addcmul(self.mu, self.sigma, self.values, out=self.values)

    def dense_weight(self, layer: "SparseGaussian") -> Tensor:
        """The current draw as a dense weight of the layer's shape."""
        if self.dense is None and layer.active < layer.numel:
            self.dense = self.values.new_zeros(layer.numel)
        return layer.to_dense(self.values, out=self.dense)

    def output(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        if self.out is None or self.out.shape != shape or self.out.device != like.device:
            self.out = like.new_empty(shape)
        return self.out
