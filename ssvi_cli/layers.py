"""Sparse Gaussian layers: a weight is an explicit index set plus ``mu``/``rho`` of that length.

Off the support a weight is exactly zero (a point mass); on it ``theta_i ~ N(mu_i, sigma_i^2)`` with
``sigma = softplus(rho)`` (or ``exp``). Parameters, their gradients and optimizer state therefore scale
with the number of active entries. One functional core serves ``Linear`` and ``Conv2d``; a dense
Bayesian layer is the same layer at density 1, and a deterministic layer has no ``rho``.
"""

from __future__ import annotations

import functools
import math
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# CSR support is stable for the operations used here (matmul, sampled_addmm); the warning is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

LRT_EPS = 1e-8
# Linear (and 1x1 conv) layers at or below this density use the sparse (CSR) kernel under
# ``kernel=auto``. Calibrated with a 1024x1024 LRT layer, forward + backward, batch 64 and 256, one
# thread (MKL CSR vs dense GEMM, interleaved medians): sparse/dense time = 0.41-0.47 at density 0.05,
# 0.70-0.78 at 0.1, 0.83-0.85 at 0.15, 1.0-1.05 at 0.2 and 0.95-1.41 at 0.3. The cut sits below the
# break-even point so that ``auto`` never loses to ``dense`` by more than noise.
AUTO_SPARSE_MAX_DENSITY = 0.12

# A CSR weight times a dense input has two CPU kernels: MKL's CSR product, and ``embedding_bag`` (FBGEMM
# on x86), which sums, for every output row, the input rows of its active columns weighted by the
# entries: the same sums. With the input transposed as the bag's table, embedding_bag was 1.1-1.5x
# faster while that table fitted in half of the L2 cache and the batch had 32 rows or more, and up to
# 2x slower with larger tables (AVX-512 Xeon, 2 MiB L2; 1024x784 to 2048x2048 and 256x4096 weights at
# density 0.05-0.1, batches 32-768, 1 and 2 threads). Outside those bounds the CSR kernel runs.
BAG_MIN_ROWS = 32


@functools.lru_cache(maxsize=None)
def bag_table_limit() -> int:
    """Bytes of transposed input up to which the ``embedding_bag`` kernel is used: half of CPU 0's L2
    cache on x86 with AVX2 or AVX-512, else 0 (never: elsewhere it was not measured)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return 0
    return l2_cache_bytes() // 2


def l2_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """CPU 0's level-2 data (or unified) cache in bytes from Linux sysfs; 0 where not readable."""
    for index in sorted(cache_dir.glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20}.get(size[-1:].upper(), 0)
        if level == "2" and kind in ("Unified", "Data") and size[:-1].isdigit():
            return int(size[:-1]) * scale
    return 0


def sigma_from_rho(rho: Tensor, param: str) -> Tensor:
    """sigma = softplus(rho) (default) or exp(rho)."""
    return F.softplus(rho) if param == "softplus" else torch.exp(rho)


def rho_from_sigma(sigma: Tensor, param: str) -> Tensor:
    """Inverse of :func:`sigma_from_rho`: rho = log(expm1(sigma)) or log(sigma)."""
    sigma = sigma.clamp_min(1e-30)
    if param == "softplus":
        # log(expm1(s)) = s + log(1 - exp(-s)) is stable for large s; expm1 is exact for small s.
        return torch.where(sigma > 20, sigma + torch.log1p(-torch.exp(-sigma)), torch.log(torch.expm1(sigma)))
    return torch.log(sigma)


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_sigma: float) -> Tensor:
    """sum_i KL(N(mu_i, sigma_i^2) || N(0, prior_sigma^2))
    = sum_i log(prior_sigma / sigma_i) + (sigma_i^2 + mu_i^2) / (2 prior_sigma^2) - 1/2."""
    var_p = prior_sigma**2
    return (math.log(prior_sigma) - torch.log(sigma) + (sigma**2 + mu**2) / (2 * var_p) - 0.5).sum()


def randn_like(t: Tensor) -> Tensor:
    """Standard normal noise of ``t``'s shape, always drawn contiguous (the vectorised path).

    ``torch.randn_like`` keeps a transposed layout (what the CSR kernel returns) and then fills it
    through a scalar loop, about ten times slower. A contiguous draw is also the same noise, element
    for element, whichever kernel produced ``t``, so the sparse and dense kernels follow one random
    stream.
    """
    if t.is_contiguous():
        return torch.randn_like(t)
    return torch.randn(t.shape, dtype=t.dtype, device=t.device)


# ------------------------------------------------------------------ sparse kernel

@dataclass
class CsrPattern:
    """CSR structure of a support viewed as a (rows, cols) matrix, and of its transpose."""

    rows: int
    cols: int
    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm_t: Tensor  # values[perm_t] lists the entries in the transpose's CSR order

    @classmethod
    def from_flat(cls, idx: Tensor, rows: int, cols: int) -> "CsrPattern":
        r, c = idx // cols, idx % cols  # idx is sorted, so (r, c) is already in CSR order
        perm_t = torch.argsort(c * rows + r)
        # MKL's CSR kernels take 32-bit indices and would convert 64-bit ones on every product.
        small = max(rows, cols, idx.numel()) < 2**31
        index = (lambda t: t.to(torch.int32)) if small else (lambda t: t)
        crow = torch.ops.aten._convert_indices_from_coo_to_csr(r, rows, out_int32=small)
        crow_t = torch.ops.aten._convert_indices_from_coo_to_csr(c[perm_t], cols, out_int32=small)
        return cls(rows, cols, crow, index(c), crow_t, index(r[perm_t]), perm_t)

    def matrix(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, (self.rows, self.cols),
                                       check_invariants=False)

    def matrix_t(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm_t],
                                       (self.cols, self.rows), check_invariants=False)


class SparseMatmul(torch.autograd.Function):
    """``x @ W.T (+ bias)`` for a CSR weight given by its values; gradients only for the stored entries.

    forward: out = (W x^T + bias)^T; backward: dx = (W^T g^T)^T, dvalues = (g^T x) sampled on the
    support, dbias = sum of g over rows. ``bias`` is optional (``apply(x, values, pattern)``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, pattern: CsrPattern,  # type: ignore[override]
                bias: Optional[Tensor] = None) -> Tensor:
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        return csr_product(x, pattern.matrix(values), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, values = ctx.saved_tensors
        p: CsrPattern = ctx.pattern
        needs = ctx.needs_input_grad
        grad_x = grad_values = grad_bias = None
        if needs[0]:
            grad_x = csr_product(grad, p.matrix_t(values))
        if needs[1]:
            sampled = torch.sparse.sampled_addmm(
                p.matrix(torch.zeros_like(values)), grad.t().contiguous(), x.contiguous(), beta=0.0
            )
            grad_values = sampled.values()
        if len(needs) > 3 and needs[3]:
            grad_bias = grad.sum(0)
        return (grad_x, grad_values, None, grad_bias)[:len(needs)]


def csr_product(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None
                ) -> Tensor:
    """``x @ weight.T (+ bias)`` for a CSR ``weight``: the forward computation of :class:`SparseMatmul`.

    Two kernels compute the same sums over the stored entries: ``embedding_bag`` where it is faster
    (see :data:`BAG_MIN_ROWS`), else MKL's CSR product. The result is the kernel's (out, rows) matrix
    viewed transposed, so feeding it to the next product needs no copy. The CSR kernel writes into
    ``out`` when given (no autograd) and fuses the bias into the product (``addmm`` with it as the
    initial output, faster than a zero-filled product and a separate addition); ``embedding_bag``
    allocates its result and adds the bias after.
    """
    xt = x.t().contiguous()
    if (xt.device.type == "cpu" and xt.shape[1] >= BAG_MIN_ROWS
            and xt.numel() * xt.element_size() <= bag_table_limit()):
        sums = F.embedding_bag(weight.col_indices(), xt, weight.crow_indices(), mode="sum",
                               per_sample_weights=weight.values(), include_last_offset=True)
        return (sums if bias is None else sums.add_(bias[:, None])).t()
    if bias is None:
        return torch.mm(weight, xt, out=out).t()
    return torch.addmm(bias[:, None].expand(weight.shape[0], xt.shape[1]), weight, xt, out=out).t()


def sparse_product(x: Tensor, values: Tensor, pattern: CsrPattern, bias: Optional[Tensor] = None) -> Tensor:
    """:class:`SparseMatmul` in float32 even under autocast: the CSR kernels have no half types.

    Without gradients (prediction) the kernel is called directly, skipping autograd's bookkeeping.
    """
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _sparse_product(x, values, pattern, bias)
    return _sparse_product(x, values, pattern, bias)  # entering the context costs ~10 us a call


def _sparse_product(x: Tensor, values: Tensor, pattern: CsrPattern, bias: Optional[Tensor]) -> Tensor:
    x, values = x.float(), values.float()
    bias = None if bias is None else bias.float()
    tracked = (x, values) if bias is None else (x, values, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return SparseMatmul.apply(*tracked[:2], pattern, *tracked[2:])
    return csr_product(x, pattern.matrix(values), bias)


class DrawState:
    """A layer's state during one Monte Carlo prediction without gradients (see :func:`start_draws`).

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


# ------------------------------------------------------------------ the layer

class SparseGaussian(nn.Module):
    """A weight tensor of ``weight_shape`` whose active entries ``idx`` carry mu (and rho).

    ``mode``: ``lrt`` (local reparameterisation, training), ``mean`` (theta = mu) or ``sample``
    (one weight draw over the active entries, used by Monte Carlo prediction).
    """

    def __init__(self, weight_shape: tuple[int, ...], *, bias: bool, bayesian: bool,
                 sigma_param: str = "softplus", stem: bool = False, normed: bool = False) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.numel = math.prod(self.weight_shape)
        self.fan_in = self.numel // self.weight_shape[0]
        self.bayesian = bayesian
        self.sigma_param = sigma_param
        self.stem = stem
        self.normed = normed  # followed by BatchNorm: small mu init is fine
        self.register_buffer("idx", torch.zeros(0, dtype=torch.long))
        self.mu = nn.Parameter(torch.zeros(0))
        if bayesian:
            self.rho = nn.Parameter(torch.zeros(0))
        else:
            self.register_parameter("rho", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.weight_shape[0]))
        else:
            self.register_parameter("bias", None)
        self.mode = "lrt"
        self.kernel = "auto"
        self.capture_dense_grad = False
        # Set by Monte Carlo prediction for the duration of its draws (``start_draws``).
        self.draws: Optional[DrawState] = None
        self.dense_grad: Optional[Tensor] = None
        self._leaf: Optional[Tensor] = None
        self._pattern: Optional[tuple[Tensor, CsrPattern]] = None

    # -- support ---------------------------------------------------------------
    @property
    def active(self) -> int:
        return int(self.idx.numel())

    @property
    def density(self) -> float:
        return self.active / self.numel

    def set_support(self, idx: Tensor, mu: Tensor, rho: Optional[Tensor] = None) -> None:
        """Replace the support and its values; ``idx`` must be sorted and unique."""
        self.idx = idx.to(device=self.mu.device, dtype=torch.long)
        self.mu.data = mu.to(self.mu.device, self.mu.dtype).contiguous()
        if self.bayesian:
            if rho is None:
                raise ValueError("a Bayesian layer needs rho with its support")
            self.rho.data = rho.to(self.rho.device, self.rho.dtype).contiguous()
        self._pattern = None

    def sigma(self) -> Tensor:
        if not self.bayesian:
            raise RuntimeError("a deterministic layer has no sigma")
        return sigma_from_rho(self.rho, self.sigma_param)

    def kl(self, prior_sigma: float) -> Tensor:
        if not self.bayesian:
            return self.mu.new_zeros(())
        return gaussian_kl(self.mu, self.sigma(), prior_sigma)

    def to_dense(self, values: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Scatter values over the support into a dense tensor of ``weight_shape``.

        ``out`` (no autograd): a flat tensor of ``numel`` entries, zero off the support, that receives
        the values in place (the support's positions are overwritten, the zeros stay).
        """
        if self.active == self.numel:
            return values.view(self.weight_shape)
        if out is not None:
            out[self.idx] = values
            return out.view(self.weight_shape)
        dense = values.new_zeros(self.numel).scatter(0, self.idx, values)
        return dense.view(self.weight_shape)

    def uses_sparse_kernel(self) -> bool:
        if self.kernel == "sparse":
            return self.active < self.numel
        if self.kernel == "dense":
            return False
        return self.default_sparse() and self.density <= AUTO_SPARSE_MAX_DENSITY

    def default_sparse(self) -> bool:
        """Whether ``kernel=auto`` may use the sparse kernel for this layer type."""
        return True

    def pattern(self) -> CsrPattern:
        cached = self._pattern
        if cached is None or cached[0] is not self.idx:
            cached = (self.idx, CsrPattern.from_flat(self.idx, self.weight_shape[0], self.fan_in))
            self._pattern = cached
        return cached[1]

    # -- forward ---------------------------------------------------------------
    def positions(self, x: Tensor) -> int:
        """Output positions for input ``x``: each uses every weight once (rows, or batch x pixels)."""
        raise NotImplementedError

    def apply_weight(self, x: Tensor, values: Tensor) -> Tensor:
        """The layer's linear operation with weight entries ``values`` on the support (no bias)."""
        raise NotImplementedError

    def apply_affine(self, x: Tensor, values: Tensor) -> Tensor:
        """:meth:`apply_weight` plus the bias (layers that can fuse the two override this)."""
        return self._with_bias(self.apply_weight(x, values))

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """LRT output mean (with bias) and variance for input ``x``."""
        mean = self.apply_affine(x, self.mu)
        return mean, self._variance(x)

    def _variance(self, x: Tensor) -> Tensor:
        """op(x^2, sigma^2), always in float32: sigma^2 ~ 1e-7 underflows in half precision."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return self.apply_weight(x * x, self.sigma().float() ** 2)

    @staticmethod
    def sample_from_moments(mean: Tensor, var: Tensor) -> Tensor:
        return torch.addcmul(mean, torch.sqrt(var + LRT_EPS), randn_like(mean))

    def forward(self, x: Tensor) -> Tensor:
        if self.capture_dense_grad:
            return self._forward_capture(x)
        if not self.bayesian or self.mode == "mean":
            return self.apply_affine(x, self.mu)
        if self.mode == "sample":
            if self.draws is not None and not torch.is_grad_enabled():
                return self.apply_draw(x, self.draws)
            return self.apply_affine(x, torch.addcmul(self.mu, self.sigma(), torch.randn_like(self.mu)))
        return self.sample_from_moments(*self.moments(x))

    def apply_draw(self, x: Tensor, draws: DrawState) -> Tensor:
        """The layer with one weight draw, using the prediction's :class:`DrawState` (no gradients)."""
        values = draws.sample()
        if self.uses_sparse_kernel():
            return self.apply_affine(x, values)
        return self._with_bias(self.dense_op(x, draws.dense_weight(self)))

    def _with_bias(self, out: Tensor) -> Tensor:
        if self.bias is None:
            return out
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return out + self.bias.view(shape)

    def _forward_capture(self, x: Tensor) -> Tensor:
        """Forward through a dense leaf holding mu so backward yields dL/dmu at every position."""
        leaf = self.mu.detach().new_zeros(self.numel).scatter(0, self.idx, self.mu.detach())
        leaf.requires_grad_(True)
        self._leaf = leaf
        mean = self._with_bias(self.dense_op(x, leaf.view(self.weight_shape)))
        if not self.bayesian or self.mode == "mean":
            return mean
        return self.sample_from_moments(mean, self._variance(x))

    def collect_dense_grad(self) -> Optional[Tensor]:
        """After backward in capture mode: store the dense gradient and route it to ``mu.grad``."""
        leaf, self._leaf = self._leaf, None
        if leaf is None or leaf.grad is None:
            return None
        dense = leaf.grad.detach()
        self.dense_grad = dense
        part = dense[self.idx]
        self.mu.grad = part if self.mu.grad is None else self.mu.grad + part
        return dense

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        kind = "bayesian" if self.bayesian else "deterministic"
        return f"shape={self.weight_shape}, active={self.active}/{self.numel}, {kind}"


class SparseLinear(SparseGaussian):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, **kw) -> None:
        super().__init__((out_features, in_features), bias=bias, **kw)

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def positions(self, x: Tensor) -> int:
        return x.shape[:-1].numel()

    def apply_weight(self, x: Tensor, values: Tensor) -> Tensor:
        return self._linear(x, values, None)

    def apply_affine(self, x: Tensor, values: Tensor) -> Tensor:
        return self._linear(x, values, self.bias)

    def _linear(self, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        """x @ W.T (+ bias), the bias fused into the product by either kernel."""
        if self.uses_sparse_kernel():
            out = sparse_product(x.reshape(-1, x.shape[-1]), values, self.pattern(), bias)
            return out.reshape(*x.shape[:-1], self.weight_shape[0])
        return F.linear(x, self.to_dense(values), bias)

    def apply_draw(self, x: Tensor, draws: DrawState) -> Tensor:
        # float32 matrices without autocast, the common case: straight to the kernels, writing the
        # output into the tensor of the previous draw; anything else takes the general path.
        if x.dim() != 2 or x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return super().apply_draw(x, draws)
        values = draws.sample()
        out_features = self.weight_shape[0]
        if self.uses_sparse_kernel():
            if draws.matrix is None:
                draws.matrix = self.pattern().matrix(values)
            return csr_product(x, draws.matrix, self.bias, draws.output((out_features, x.shape[0]), x))
        weight = draws.dense_weight(self).t()
        out = draws.output((x.shape[0], out_features), x)
        if self.bias is None:
            return torch.mm(x, weight, out=out)
        return torch.addmm(self.bias, x, weight, out=out)


class SparseConv2d(SparseGaussian):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = False, **kw) -> None:
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        super().__init__(shape, bias=bias, **kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def default_sparse(self) -> bool:
        # A transient dense weight with cuDNN/oneDNN convolution beats unfold + CSR for 3x3 kernels
        # at the densities we use; 1x1 convs are matrix products and can take the sparse kernel.
        return self.weight_shape[2:] == (1, 1) and self.groups == 1

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        k = self.weight_shape[2]
        span = self.dilation * (k - 1) + 1
        return ((h + 2 * self.padding - span) // self.stride + 1,
                (w + 2 * self.padding - span) // self.stride + 1)

    def positions(self, x: Tensor) -> int:
        oh, ow = self.output_size(x.shape[-2], x.shape[-1])
        return x.shape[:-3].numel() * oh * ow

    def apply_weight(self, x: Tensor, values: Tensor) -> Tensor:
        if self.groups == 1 and self.uses_sparse_kernel():
            return self._sparse_conv(x, values)
        return self.dense_op(x, self.to_dense(values))

    def _sparse_conv(self, x: Tensor, values: Tensor) -> Tensor:
        """Convolution as unfold + sparse matrix product (im2col over active entries only)."""
        b, _, h, w = x.shape
        k = self.weight_shape[2]
        if k == 1 and self.padding == 0:
            # A 1x1 convolution is a matrix product over channels: subsample and move channels last,
            # no im2col. The output keeps the kernel's (channels, positions) layout as a view.
            xs = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            _, c, oh, ow = xs.shape
            out = sparse_product(xs.permute(0, 2, 3, 1).reshape(-1, c), values, self.pattern())
            return out.reshape(b, oh, ow, -1).permute(0, 3, 1, 2)
        oh, ow = self.output_size(h, w)
        cols = F.unfold(x, k, dilation=self.dilation, padding=self.padding, stride=self.stride)
        cols = cols.transpose(1, 2).reshape(b * oh * ow, -1)
        out = sparse_product(cols, values, self.pattern())
        return out.reshape(b, oh * ow, -1).transpose(1, 2).reshape(b, -1, oh, ow)


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseGaussian]]:
    """All sparse Gaussian layers of a model, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseGaussian)]


def set_mode(model: nn.Module, mode: str) -> None:
    for _, layer in sparse_layers(model):
        layer.mode = mode


def start_draws(layers: Iterable[SparseGaussian]) -> None:
    """Give each Bayesian layer a :class:`DrawState` for the sample-mode calls that follow.

    Only for loops without gradients that consume each forward's result before the next one and call
    each layer once per forward, as Monte Carlo prediction does: a layer's output is overwritten by
    its next call. :func:`stop_draws` frees the state.
    """
    for layer in layers:
        if layer.bayesian:
            layer.draws = DrawState(layer)


def stop_draws(model: nn.Module) -> None:
    for _, layer in sparse_layers(model):
        layer.draws = None


def set_kernel(model: nn.Module, kernel: str) -> None:
    for _, layer in sparse_layers(model):
        layer.kernel = kernel
