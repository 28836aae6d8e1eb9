"""The sparse Gaussian ``Conv2d`` and ``Conv1d``: torch's geometry over :class:`SparseGaussian`'s support.

A 3x3 convolution runs dense (a transient dense weight for cuDNN/oneDNN); a 1x1 convolution, a
matrix product over channels, may take the sparse kernel; any other kernel size can too, as unfold
plus a sparse product (im2col over the active entries only). A ``Conv1d`` computes as a ``Conv2d``
over inputs of height 1 with a (1, k) kernel: its weight (out, in / groups, k) holds its entries in
the same flat order.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from ssvi_cli.core.kernels import sparse_product
from ssvi_cli.core.layers import SparseGaussian


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _one(v: int | tuple[int, ...]) -> tuple[int]:
    return (int(v),) if isinstance(v, int) else (int(v[0]),)


def _padding(padding: int | tuple[int, ...] | str, size: type) -> tuple[int, ...] | str:
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding={padding!r}; valid values are an int, a pair, 'same' or 'valid'")
        padding = 0 if padding == "valid" else padding
    return padding if isinstance(padding, str) else size(padding)


class SparseConv2d(SparseGaussian):
    """``nn.Conv2d``'s geometry (any kernel, stride, padding, dilation, groups; zero padding) with a
    sparse Gaussian weight of shape (out, in / groups, kh, kw)."""

    KIND = "conv2d"
    SPATIAL = 2  # spatial dimensions: an input is (N, C, H, W), or one unbatched (C, H, W)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...], *,
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] | str = 0,
                 dilation: int | tuple[int, ...] = 1, groups: int = 1, bias: bool = False, **kw) -> None:
        size = _pair if self.SPATIAL == 2 else _one
        kernel = size(kernel_size)
        super().__init__((out_channels, in_channels // groups, *kernel), bias=bias, **kw)
        self.stride, self.dilation, self.groups = size(stride), size(dilation), groups
        self.padding = _padding(padding, size)
        # torch's names (nn.Conv2d's, nn.Conv1d's), for code that reads them
        self.out_channels, self.in_channels, self.kernel_size = int(out_channels), int(in_channels), kernel

    def forward(self, x: Tensor) -> Tensor:
        """A batch as ``nn.Conv2d`` (``nn.Conv1d``) takes it, and one unbatched input as well."""
        self.check_input(x)
        if x.dim() == self.SPATIAL + 1:
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def check_input(self, x: Tensor) -> None:
        """torch's own refusals of an input of another rank or channel count (the sparse kernel's
        product took a wrong count in silence, or failed in words of its own)."""
        spatial = self.SPATIAL
        if x.dim() not in (spatial + 1, spatial + 2):
            raise RuntimeError(f"Expected {spatial + 1}D (unbatched) or {spatial + 2}D (batched) input to conv{spatial}d, "
                               f"but got input of size: {list(x.shape)}")
        if x.shape[-spatial - 1] != self.in_channels:
            batched = [1] * (x.dim() == spatial + 1) + list(x.shape)  # torch names an unbatched input as batched
            raise RuntimeError(f"Given groups={self.groups}, weight of size {list(self.weight_shape)}, expected input"
                               f"{batched} to have {self.in_channels} channels, but got {x.shape[-spatial - 1]} "
                               "channels instead")

    def default_sparse(self) -> bool:
        # A transient dense weight with cuDNN/oneDNN convolution beats unfold + CSR for 3x3 kernels
        # at the densities we use; 1x1 convs are matrix products and can take the sparse kernel.
        return all(k == 1 for k in self.weight_shape[2:]) and self.groups == 1 and not isinstance(self.padding, str)

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def output_size(self, *sizes: int) -> tuple[int, ...]:
        """The output's spatial size for an input of spatial size ``sizes`` (h, w; a Conv1d's length)."""
        if self.padding == "same":
            return sizes
        return tuple((n + 2 * p - (d * (k - 1) + 1)) // s + 1
                     for n, p, d, k, s in zip(sizes, self.padding, self.dilation, self.weight_shape[2:], self.stride))

    def positions(self, x: Tensor) -> int:
        spatial = self.SPATIAL
        return x.shape[:-spatial - 1].numel() * math.prod(self.output_size(*x.shape[-spatial:]))

    def geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Kernel, stride, padding and dilation as a 2-D convolution computes them."""
        return self.weight_shape[2:], self.stride, self.padding, self.dilation  # type: ignore[return-value]

    def apply_weight(self, x: Tensor, values: Tensor) -> Tensor:
        spatial = self.SPATIAL  # an input too short for the kernel: torch's message, from the dense op
        if self.groups == 1 and not isinstance(self.padding, str) and self.uses_sparse_kernel() \
                and min(self.output_size(*x.shape[-spatial:])) >= 1:
            return self._sparse_conv(x, values)
        return self.dense_op(x, self.to_dense(values))

    def _sparse_conv(self, x: Tensor, values: Tensor) -> Tensor:
        """Convolution as unfold + sparse matrix product (im2col over active entries only), on
        (N, C, H, W) inputs."""
        b, _, h, w = x.shape
        kernel, stride, padding, dilation = self.geometry()
        oh, ow = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1
                  for n, p, d, k, s in zip((h, w), padding, dilation, kernel, stride)]
        if b == 0:  # an empty batch: nothing to unfold or reshape
            return x.new_zeros((0, self.weight_shape[0], oh, ow))
        if kernel == (1, 1) and padding == (0, 0):
            # A 1x1 convolution is a matrix product over channels: subsample and move channels last,
            # no im2col. The output keeps the kernel's (channels, positions) layout as a view.
            sh, sw = stride
            xs = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
            _, c, oh, ow = xs.shape
            out = sparse_product(xs.permute(0, 2, 3, 1).reshape(-1, c), values, self.pattern())
            return out.reshape(b, oh, ow, -1).permute(0, 3, 1, 2)
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        cols = cols.transpose(1, 2).reshape(b * oh * ow, -1)
        out = sparse_product(cols, values, self.pattern())
        return out.reshape(b, oh * ow, -1).transpose(1, 2).reshape(b, -1, oh, ow)


class SparseConv1d(SparseConv2d):
    """``nn.Conv1d``'s geometry (any kernel, stride, padding, dilation, groups; zero padding) with a
    sparse Gaussian weight of shape (out, in / groups, k): a sequence (N, C, L), or one (C, L)."""

    KIND = "conv1d"
    SPATIAL = 1

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv1d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
        return (1, self.weight_shape[2]), (1, self.stride[0]), (0, self.padding[0]), (1, self.dilation[0])

    def _sparse_conv(self, x: Tensor, values: Tensor) -> Tensor:
        return super()._sparse_conv(x.unsqueeze(2), values).squeeze(2)
