"""The sparse Gaussian ``Conv2d``: ``nn.Conv2d``'s geometry over :class:`SparseGaussian`'s support.

A 3x3 convolution runs dense (a transient dense weight for cuDNN/oneDNN); a 1x1 convolution, a
matrix product over channels, may take the sparse kernel; any other kernel size can too, as unfold
plus a sparse product (im2col over the active entries only).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ssvi_cli.core.kernels import sparse_product
from ssvi_cli.core.layers import SparseGaussian


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SparseConv2d(SparseGaussian):
    """``nn.Conv2d``'s geometry (any kernel, stride, padding, dilation, groups; zero padding) with a
    sparse Gaussian weight of shape (out, in / groups, kh, kw)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, **kw) -> None:
        kh, kw_ = _pair(kernel_size)
        super().__init__((out_channels, in_channels // groups, kh, kw_), bias=bias, **kw)
        self.stride, self.dilation, self.groups = _pair(stride), _pair(dilation), groups
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding={padding!r}; valid values are an int, a pair, 'same' or 'valid'")
            padding = (0, 0) if padding == "valid" else padding
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        # nn.Conv2d's names, for code that reads them
        self.out_channels, self.in_channels, self.kernel_size = int(out_channels), int(in_channels), (kh, kw_)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) as ``nn.Conv2d`` takes it, and one unbatched image (C, H, W) as well."""
        if x.dim() == 3:
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def default_sparse(self) -> bool:
        # A transient dense weight with cuDNN/oneDNN convolution beats unfold + CSR for 3x3 kernels
        # at the densities we use; 1x1 convs are matrix products and can take the sparse kernel.
        return self.weight_shape[2:] == (1, 1) and self.groups == 1 and not isinstance(self.padding, str)

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.padding == "same":
            return h, w
        return tuple((n + 2 * p - (d * (k - 1) + 1)) // s + 1  # type: ignore[return-value]
                     for n, p, d, k, s in zip((h, w), self.padding, self.dilation, self.weight_shape[2:],
                                               self.stride))

    def positions(self, x: Tensor) -> int:
        oh, ow = self.output_size(x.shape[-2], x.shape[-1])
        return x.shape[:-3].numel() * oh * ow

    def apply_weight(self, x: Tensor, values: Tensor) -> Tensor:
        if self.groups == 1 and not isinstance(self.padding, str) and self.uses_sparse_kernel():
            return self._sparse_conv(x, values)
        return self.dense_op(x, self.to_dense(values))

    def _sparse_conv(self, x: Tensor, values: Tensor) -> Tensor:
        """Convolution as unfold + sparse matrix product (im2col over active entries only)."""
        b, _, h, w = x.shape
        if b == 0:  # an empty batch: nothing to unfold or reshape
            return x.new_zeros((0, self.weight_shape[0], *self.output_size(h, w)))
        if self.weight_shape[2:] == (1, 1) and self.padding == (0, 0):
            # A 1x1 convolution is a matrix product over channels: subsample and move channels last,
            # no im2col. The output keeps the kernel's (channels, positions) layout as a view.
            sh, sw = self.stride
            xs = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
            _, c, oh, ow = xs.shape
            out = sparse_product(xs.permute(0, 2, 3, 1).reshape(-1, c), values, self.pattern())
            return out.reshape(b, oh, ow, -1).permute(0, 3, 1, 2)
        oh, ow = self.output_size(h, w)
        cols = F.unfold(x, self.weight_shape[2:], dilation=self.dilation, padding=self.padding, stride=self.stride)
        cols = cols.transpose(1, 2).reshape(b * oh * ow, -1)
        out = sparse_product(cols, values, self.pattern())
        return out.reshape(b, oh * ow, -1).transpose(1, 2).reshape(b, -1, oh, ow)
