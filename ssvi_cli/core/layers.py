"""Sparse Gaussian layers: a weight is an explicit index set plus ``mu``/``rho`` of that length.

Off the support a weight is exactly zero (a point mass); on it ``theta_i ~ N(mu_i, sigma_i^2)`` with ``sigma =
softplus(rho)`` (or ``exp``). Parameters, their gradients and optimizer state therefore scale with the number of
active entries. One functional core serves ``Linear`` and ``Conv2d`` (``core.conv``); a dense Bayesian layer is the
same layer at density 1, and a deterministic layer has no ``rho``.

A layer's kernel policy is fixed when it is built. Its kernel, how it samples (LRT, mean, weight
draws) and whether it captures a dense gradient are switched only inside the context managers of
:mod:`ssvi_cli.core.modes`, which restore the previous state on exit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssvi_cli.core.capture import CapturedGrad
from ssvi_cli.core.gaussian import HALF_SIGMA, LRT_EPS, gaussian_kl, input_under_autocast, randn_like, sigma_from_rho
from ssvi_cli.core.interop import TorchInterop
from ssvi_cli.core.replaced import support_set
from ssvi_cli.core.state import support_problem
from ssvi_cli.core.kernels import KERNELS, CsrPattern, KernelPolicy, csr_product, sparse_product

if TYPE_CHECKING:
    from ssvi_cli.core.draws import DrawState

MODES = ("lrt", "mean", "sample")


class SparseGaussian(TorchInterop, nn.Module):
    """A weight tensor of ``weight_shape`` whose active entries ``idx`` carry mu (and rho).

    ``mode``: ``lrt`` (local reparameterisation, training), ``mean`` (theta = mu) or ``sample``
    (one weight draw over the active entries, used by Monte Carlo prediction)."""
    KIND = ""  # each layer type's name in model files and reports: "linear", "conv2d", "conv1d"

    def __init__(self, weight_shape: tuple[int, ...], *, bias: bool, bayesian: bool,
                 sigma_param: str = "softplus", stem: bool = False, normed: bool = False,
                 kernel: KernelPolicy | str = "auto") -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        if not self.weight_shape or min(self.weight_shape) < 1:
            raise ValueError(f"a weight of shape {self.weight_shape} has no entries")
        self.numel = math.prod(self.weight_shape)
        self.fan_in = self.numel // self.weight_shape[0]
        self.bayesian, self.sigma_param, self.stem = bayesian, sigma_param, stem
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
        self.kernel = KERNELS.get(kernel) if isinstance(kernel, str) else kernel
        # Switched only inside the context managers of ssvi_cli.core.modes, which restore them.
        self.mode = "lrt"
        self.capture_dense_grad = False
        self.draws: Optional["DrawState"] = None
        self.forward_draw: Optional[list[Optional[Tensor]]] = None  # [this forward's weight draw], see modes
        self.dense_grad: Optional[Tensor] = None
        self._captured = CapturedGrad()
        self._pattern: Optional[tuple[Tensor, int, CsrPattern]] = None  # idx, its version, its CSR pattern

    @property  # -- support ------------------------------------------------------------
    def active(self) -> int:
        return int(self.idx.numel())

    @property
    def density(self) -> float:
        return self.active / self.numel

    def set_support(self, idx: Tensor, mu: Tensor, rho: Optional[Tensor] = None) -> None:
        """Replace the support and its values; ``idx`` must be sorted and unique."""
        if self.bayesian and rho is None:
            raise ValueError("a Bayesian layer needs rho with its support")
        self.idx = idx.to(device=self.mu.device, dtype=torch.long)
        support_set(self.weight_shape, (self.mu, mu), (self.rho, rho) if self.bayesian else None)
        self._pattern = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state dict whose support has another size (read into a ``structure_only`` model, or one
        sparsified at another density) sets that size first; its values are then copied as usual."""
        idx, mu = state_dict.get(prefix + "idx"), state_dict.get(prefix + "mu")
        rho = state_dict.get(prefix + "rho") if self.bayesian else None
        sized = idx is not None and mu is not None and idx.dim() == 1 and mu.shape == idx.shape
        if isinstance(idx, Tensor) and (problem := support_problem(self.numel, idx)):
            raise ValueError(f"{prefix}idx: {problem}")
        if sized and idx.shape != self.idx.shape and (rho is None or rho.shape == idx.shape):
            if not self.bayesian or rho is not None:  # without rho the loader reports the missing key
                self.set_support(idx, mu, rho)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sigma(self) -> Tensor:
        if not self.bayesian:
            raise RuntimeError("a deterministic layer has no sigma")
        if self.rho.dtype == torch.float16:  # a model.half() after sparsify: its KL would be inf
            raise ValueError(f"a sparse Bayesian layer in float16 (a model.half() after sparsify?) {HALF_SIGMA}")
        return sigma_from_rho(self.rho, self.sigma_param)

    def kl(self, prior_sigma: float) -> Tensor:
        if not self.bayesian:
            return self.mu.new_zeros(())
        return gaussian_kl(self.mu, self.sigma(), prior_sigma)

    def to_dense(self, values: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Scatter values over the support into a dense tensor of ``weight_shape``. ``out`` (no autograd):
        a flat tensor of ``numel`` entries, zero off the support, that receives the values in place."""
        if self.active == self.numel:
            return values.view(self.weight_shape)
        if out is not None:
            out[self.idx] = values
            return out.view(self.weight_shape)
        dense = values.new_zeros(self.numel).scatter(0, self.idx, values)
        return dense.view(self.weight_shape)

    def uses_sparse_kernel(self) -> bool:
        return self.kernel.use_sparse(self)

    def default_sparse(self) -> bool:
        """Whether ``kernel=auto`` may use the sparse kernel for this layer type."""
        return True

    def is_linear(self) -> bool:
        return self.KIND == "linear"

    def pattern(self) -> CsrPattern:
        """The CSR pattern of ``idx``, rebuilt when ``idx`` is replaced (``set_support``, ``.to()``)
        or changed in place (``load_state_dict``: its version counter moves)."""
        version = -1 if self.idx.is_inference() else self.idx._version  # inference tensors have no counter
        if self._pattern is None or self._pattern[0] is not self.idx or self._pattern[1] != version:
            self._pattern = (self.idx, version, CsrPattern.from_flat(self.idx, self.weight_shape[0], self.fan_in))
        return self._pattern[2]

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
        """op(x^2, sigma^2) in float32 at least (sigma^2 ~ 1e-7 underflows in half precision), float64 in a float64 layer."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            return self.apply_weight(x * x, self.sigma().to(x.dtype) ** 2)

    @staticmethod
    def sample_from_moments(mean: Tensor, var: Tensor) -> Tensor:
        return torch.addcmul(mean, torch.sqrt(var + LRT_EPS), randn_like(mean))

    def forward(self, x: Tensor) -> Tensor:
        """Outside autocast the output has the input's dtype (a float64 or bfloat16 model), though the
        variance (and for half types the CSR kernels) compute in float32."""
        if x.is_meta:  # shapes only (a run plan's probe): the dense op on an empty weight of the layer's shape
            return self._with_bias(self.dense_op(x, x.new_empty(self.weight_shape)))
        autocast = input_under_autocast(x, self.mu.dtype)
        out = self._forward(x)
        return out if out.dtype == x.dtype or not x.is_floating_point() or autocast else out.to(x.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        if self.capture_dense_grad:
            return self._forward_capture(x)
        if not self.bayesian or self.mode == "mean":
            return self.apply_affine(x, self.mu)
        if self.mode == "sample":
            if self.draws is not None and not torch.is_grad_enabled():
                return self.apply_draw(x, self.draws)
            return self.apply_affine(x, self._weight_draw())
        return self.sample_from_moments(*self.moments(x))

    def _weight_draw(self) -> Tensor:
        """mu + sigma * eps over the active entries; inside :func:`ssvi_cli.core.modes.one_draw_per_forward`
        the first call of a forward draws and later calls in it (a layer used twice) reuse the draw."""
        box = self.forward_draw
        if box is not None and box[0] is not None:
            return box[0]
        values = torch.addcmul(self.mu, self.sigma(), torch.randn_like(self.mu))
        if box is not None:
            box[0] = values
        return values

    def apply_draw(self, x: Tensor, draws: "DrawState") -> Tensor:
        """The layer with one weight draw, using the prediction's :class:`DrawState` (no gradients)."""
        values = draws.sample()
        if self.uses_sparse_kernel():
            return self.apply_affine(x, values)
        return self._with_bias(self.dense_op(x, draws.dense_weight(self)))

    def _with_bias(self, out: Tensor) -> Tensor:
        return out if self.bias is None else out + self.bias.view((1, -1) + (1,) * (out.dim() - 2))

    def _forward_capture(self, x: Tensor) -> Tensor:
        """Forward through a dense leaf holding mu so backward yields dL/dmu (the data term's:
        the KL, computed from mu and sigma, does not reach the leaf) at every position.

        mu joins the graph too, at its positions (adding mu - mu, exactly zero), so backward gives
        mu its gradient as any forward does: an optimizer step taken after a capture forward (by a
        loop that left the schedule, or between accumulated micro-batches) trains mu as usual."""
        leaf = self._captured.new_leaf(self.mu.detach().new_zeros(self.numel).scatter(0, self.idx, self.mu.detach()))
        weight = leaf.index_add(0, self.idx, self.mu - self.mu.detach())
        mean = self._with_bias(self.dense_op(x, weight.view(self.weight_shape)))
        if not self.bayesian or self.mode == "mean":
            return mean
        return self.sample_from_moments(mean, self._variance(x))

    def collect_dense_grad(self) -> Optional[Tensor]:
        """After backward in capture mode: store the dense gradient (summed over the capture
        forwards since the last call); ``mu.grad`` already holds its part, from autograd."""
        dense = self._captured.take()
        if dense is None:
            return None
        self.dense_grad = dense
        return dense

    def drop_captured(self) -> None:
        """Forget the capture forwards not yet collected: their dense gradient will not be used."""
        self._captured = CapturedGrad()

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        kind = "bayesian" if self.bayesian else "deterministic"
        return f"shape={self.weight_shape}, active={self.active}/{self.numel}, {kind}, kernel={self.kernel.name}"


class SparseLinear(SparseGaussian):
    KIND = "linear"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, **kw) -> None:
        super().__init__((out_features, in_features), bias=bias, **kw)
        self.in_features, self.out_features = self.weight_shape[1], self.weight_shape[0]  # nn.Linear's names

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() >= 1 and x.shape[-1] != self.weight_shape[1]:  # nn.Linear's message, not the kernels' transposed one
            raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({x.shape[:-1].numel()}x{x.shape[-1]} and "
                               f"{self.weight_shape[1]}x{self.weight_shape[0]})")
        return super().forward(x)

    def dense_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def _with_bias(self, out: Tensor) -> Tensor:
        return out if self.bias is None else out + self.bias  # features are the last dimension

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

    def apply_draw(self, x: Tensor, draws: "DrawState") -> Tensor:
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


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseGaussian]]:
    """All sparse Gaussian layers of a model, in registration order."""
    if not isinstance(model, nn.Module):  # predict(None, x), say: named_modules' AttributeError said nothing of it
        raise TypeError(f"give the model, an nn.Module converted by ssvi_cli.sparsify; not a {type(model).__name__}"
                        + getattr(type(model), "TAKEN_FOR_THE_MODEL", ""))  # a ConversionReport's own advice
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseGaussian)]
