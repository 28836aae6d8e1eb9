"""What every model is built from: the :class:`LayerFactory` that makes its weight layers (so one
architecture serves every method), the :class:`SSVIModel` base class, and the registry of
architectures by name, each with the config keys it reads (:class:`ModelEntry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor, nn

from ssvi_cli.core.conv import SparseConv2d
from ssvi_cli.core.layers import SparseGaussian, SparseLinear
from ssvi_cli.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, ``(in_shape, num_classes, layers, widths) -> SSVIModel``, and
    the config keys it reads (the ones :mod:`ssvi_cli.training.unused` marks as changing nothing)."""

    build: Callable[..., "SSVIModel"]
    widths: bool = False  # its hidden layers are model.widths
    first_conv: bool = True  # it has a first conv, which model.dense_stem keeps dense
    batchnorm: bool = True  # layers followed by BatchNorm, which start from bayes.mu_init_std whatever bayes.mu_init


MODELS: Registry[ModelEntry] = Registry("model")


def register(name: str, **reads: bool) -> Callable[[Callable[..., "SSVIModel"]], Callable[..., "SSVIModel"]]:
    """Register a builder as the model ``name`` (``--model name``), with the keys it reads
    (:class:`ModelEntry`'s fields: ``widths=True`` for one that takes ``model.widths``, ...)."""
    def add(build: Callable[..., "SSVIModel"]) -> Callable[..., "SSVIModel"]:
        MODELS.add(name, ModelEntry(build, **reads))
        return build
    return add


@dataclass(frozen=True)
class LayerFactory:
    """Creates the weight layers of a model; whether they are Bayesian is decided here, once."""

    bayesian: bool
    sigma_param: str = "softplus"
    kernel: str = "auto"  # the kernel policy of every layer (ssvi_cli.core.kernels.KERNELS)
    split_attention: bool = True  # a torchvision model's nn.MultiheadAttention as four layers (a file may keep it whole)

    def linear(self, fan_in: int, fan_out: int, *, bias: bool = True, stem: bool = False) -> SparseLinear:
        return SparseLinear(fan_in, fan_out, bias=bias, bayesian=self.bayesian,
                            sigma_param=self.sigma_param, stem=stem, kernel=self.kernel)

    def conv(self, cin: int, cout: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
             bias: bool = False, stem: bool = False, normed: bool = True) -> SparseConv2d:
        return SparseConv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias,
                            bayesian=self.bayesian, sigma_param=self.sigma_param, stem=stem,
                            normed=normed, kernel=self.kernel)


class SSVIModel(nn.Module):
    """Base class: ``forward(x) = forward_rest(first(prepare(x)))``."""

    first: SparseGaussian
    # Every sparse layer linear, applied once per example to a vector (an MLP): its shapes are known
    # without a probing forward (on the meta device the first one in a process costs 1.5-2 s).
    vector_layers: ClassVar[bool] = False

    def prepare(self, x: Tensor) -> Tensor:
        """Reshape the input for the first layer (identity for conv models)."""
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_rest(self.first(self.prepare(x)))

    def forward_rest(self, h: Tensor) -> Tensor:
        """The network after its first layer. Without gradients it may overwrite ``h``."""
        raise NotImplementedError
