"""Model registry. Builders receive a :class:`LayerFactory`, so one architecture serves every method.

Every model exposes ``first`` (its first weight layer) and ``forward_rest(h)`` so that Monte Carlo
prediction can compute the first layer's LRT moments once and reuse them across draws (when that is
the cheaper scheme, see ``ssvi_cli.prediction.first_layer_scheme``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ssvi_cli.config import ConfigError
from ssvi_cli.core.conv import SparseConv2d
from ssvi_cli.core.flops import vector_model
from ssvi_cli.core.layers import SparseGaussian, SparseLinear
from ssvi_cli.fileio import brief
from ssvi_cli.registry import Registry

MODELS: Registry[Callable[..., "SSVIModel"]] = Registry("model")


@dataclass(frozen=True)
class LayerFactory:
    """Creates the weight layers of a model; whether they are Bayesian is decided here, once."""

    bayesian: bool
    sigma_param: str = "softplus"
    kernel: str = "auto"  # the kernel policy of every layer (ssvi_cli.core.kernels.KERNELS)

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


class MLP(SSVIModel):
    vector_layers = True

    def __init__(self, in_shape: Sequence[int], num_classes: int, layers: LayerFactory,
                 widths: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        dims = [math.prod(in_shape), *widths, num_classes]
        # The first layer of an MLP holds a large share of its weights (43% of 784-1024-1024-10), so it is
        # sparse like the rest (a conv model's first conv, a few hundred weights, is what stays dense).
        self.first = layers.linear(dims[0], dims[1])
        self.hidden = nn.ModuleList(layers.linear(a, b) for a, b in zip(dims[1:-1], dims[2:]))

    def prepare(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def forward_rest(self, h: Tensor) -> Tensor:
        # Without gradients the activation overwrites the previous layer's output instead of filling
        # a fresh tensor: large fresh tensors page-fault on first touch, which costs more than the ReLU.
        inplace = not torch.is_grad_enabled()
        for layer in self.hidden:
            h = layer(torch.relu_(h) if inplace else torch.relu(h))
        return h


class LeNet5(SSVIModel):
    def __init__(self, in_shape: Sequence[int], num_classes: int, layers: LayerFactory) -> None:
        super().__init__()
        c, h, w = in_shape
        self.first = layers.conv(c, 6, 5, padding=2, bias=True, stem=True, normed=False)
        self.conv2 = layers.conv(6, 16, 5, bias=True, normed=False)
        self.pool = nn.MaxPool2d(2)
        fh, fw = ((h // 2) - 4) // 2, ((w // 2) - 4) // 2
        if fh < 1 or fw < 1:
            raise ConfigError(f"lenet5 needs inputs of at least 12x12, got {h}x{w}{SMALL_INPUT_HINT}")
        self.fc1 = layers.linear(16 * fh * fw, 120)
        self.fc2 = layers.linear(120, 84)
        self.fc3 = layers.linear(84, num_classes)

    def forward_rest(self, h: Tensor) -> Tensor:
        h = self.pool(torch.relu(h))
        h = self.pool(torch.relu(self.conv2(h)))
        h = torch.relu(self.fc1(h.flatten(1)))
        h = torch.relu(self.fc2(h))
        return self.fc3(h)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, layers: LayerFactory) -> None:
        super().__init__()
        self.conv1 = layers.conv(cin, cout, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = layers.conv(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(layers.conv(cin, cout, 1, stride=stride), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(SSVIModel):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, four stages of two basic blocks."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, layers: LayerFactory) -> None:
        super().__init__()
        self.first = layers.conv(in_shape[0], 64, 3, padding=1, stem=True)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride, layers), BasicBlock(cout, cout, 1, layers)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = layers.linear(512, num_classes)

    def forward_rest(self, h: Tensor) -> Tensor:
        h = self.blocks(torch.relu(self.bn1(h)))
        h = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
        return self.fc(h)


# A model too small for the data is a user's choice to change (exit code 2), not a failure.
SMALL_INPUT_HINT = "; pick a model for small inputs (mlp), or larger images (imagefolder: data.image_size)"

VGG_CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(SSVIModel):
    """CIFAR VGG with BatchNorm and a single linear classifier."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, layers: LayerFactory, depth: str) -> None:
        super().__init__()
        spec = VGG_CFG[depth]
        cin = in_shape[0]
        self.first = layers.conv(cin, spec[0], 3, padding=1, stem=True)
        mods: list[nn.Module] = [nn.BatchNorm2d(spec[0]), nn.ReLU()]
        cin = spec[0]
        pools = 0
        for item in spec[1:]:
            if item == "M":
                mods.append(nn.MaxPool2d(2))
                pools += 1
            else:
                mods += [layers.conv(cin, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU()]
                cin = int(item)
        if min(in_shape[1:]) < 2**pools:
            raise ConfigError(f"{depth} needs inputs of at least {2**pools}x{2**pools}, got "
                              f"{in_shape[1]}x{in_shape[2]}{SMALL_INPUT_HINT}")
        self.features = nn.Sequential(*mods)
        self.fc = layers.linear(cin, num_classes)

    def forward_rest(self, h: Tensor) -> Tensor:
        h = self.features(h)
        h = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
        return self.fc(h)


@MODELS.register("mlp")
def _mlp(in_shape, num_classes, layers, widths=(256, 256)) -> SSVIModel:
    return MLP(in_shape, num_classes, layers, widths)


@MODELS.register("lenet5")
def _lenet5(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return LeNet5(in_shape, num_classes, layers)


@MODELS.register("resnet18")
def _resnet18(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return ResNet18(in_shape, num_classes, layers)


@MODELS.register("vgg16")
def _vgg16(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return VGG(in_shape, num_classes, layers, "vgg16")


@MODELS.register("vgg19")
def _vgg19(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return VGG(in_shape, num_classes, layers, "vgg19")


TORCHVISION = "torchvision:"
# Builders with auxiliary classifiers, which make the training-mode forward return a tuple: built
# without them (the model's output is its main classifier's logits), with torchvision's own init.
AUX_FREE = {"googlenet": {"aux_logits": False, "init_weights": True},
            "inception_v3": {"aux_logits": False, "init_weights": True}}
AUX_HEADS = ("aux1.", "aux2.", "AuxLogits.")  # their keys in the published state_dicts


def check_model_name(name: str) -> None:
    """A registered architecture or ``torchvision:NAME`` of one of torchvision's classification
    builders; an unknown name lists the valid ones (closest first)."""
    if not name.startswith(TORCHVISION):
        MODELS.get(name)
        return
    import torchvision

    builders: Registry[None] = Registry("torchvision classification model")
    for builder in torchvision.models.list_models(module=torchvision.models):
        builders.add(builder, None)
    builders.get(name[len(TORCHVISION):])


def torchvision_base(name: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision's deterministic classifier ``name`` (no pretrained weights) with ``num_classes``
    outputs and its first convolution taking ``in_shape[0]`` channels (GoogLeNet and Inception v3
    without their auxiliary classifiers, :data:`AUX_FREE`)."""
    import torchvision

    check_model_name(TORCHVISION + name)
    kwargs = {"num_classes": num_classes, **AUX_FREE.get(name, {})}
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except NotImplementedError:
        if not torch.empty(0).is_meta:
            raise
        # Asked for a shapes-only model: RegNet computes its widths with tensors and reads them back,
        # which meta tensors cannot do, so it is built on the CPU and moved.
        with torch.device("cpu"):
            model = torchvision.models.get_model(name, **kwargs)
        model = model.to("meta")
    stem_name, stem = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if stem is not None and stem.in_channels != in_shape[0]:
        new = nn.Conv2d(in_shape[0], stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                        stem.dilation, stem.groups, stem.bias is not None)
        parent, _, child = stem_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def input_error(model: nn.Module, shape: Sequence[int], batch_size: int = 2) -> str | None:
    """Why a shapes-only (meta) ``model`` cannot take a batch of ``shape`` inputs in its current
    train/eval mode (the first line of what it raised: pooling below one pixel, ViT's fixed size, ...),
    or None when it can; also when its output is not one tensor of logits."""
    if vector_model(model, shape):
        return None  # an MLP built for inputs of this size
    try:
        with torch.no_grad():
            out = model(torch.zeros((batch_size, *shape), device="meta"))
    except Exception as exc:  # noqa: BLE001 - whatever an architecture raises for a size it cannot take
        return brief(exc, 200)
    return None if isinstance(out, Tensor) else f"it returns {type(out).__name__}, not a tensor of logits"


def check_trains_on(model: nn.Module, name: str, shape: Sequence[int], examples: int, why: str) -> None:
    """Refuse a shapes-only ``model`` (called ``name``) whose training forward cannot take ``examples``
    inputs of ``shape`` (BatchNorm on a 1x1 feature map takes no single example), where it would fail
    at its first step; ``why``: what gives a process that few, and what to do instead."""
    if examples < 2 and (reason := input_error(model.train(), shape, batch_size=examples)) is not None:
        raise ConfigError(f"{name} cannot train on {why} ({reason})")


def torchvision_model(name: str, in_shape: Sequence[int], num_classes: int, layers: LayerFactory) -> nn.Module:
    """:func:`torchvision_base` with every Linear/Conv2d a sparse Gaussian layer with an empty
    support (``core.convert.sparsify``), for the trainer or a file to fill."""
    from ssvi_cli.core.convert import sparsify

    model = torchvision_base(name, in_shape, num_classes)
    sparsify(model, structure_only=True, bayesian=layers.bayesian, sigma_param=layers.sigma_param,
             kernel=layers.kernel)
    return model


def build_architecture(name: str, in_shape: Sequence[int], num_classes: int, layers: LayerFactory,
                       widths: Sequence[int] = (256, 256)) -> nn.Module:
    """An architecture by name (or ``torchvision:NAME``), its layers from ``layers``, without a
    support yet (see ``core.allocation.initialise``). To rebuild a described model use
    ``modelfile.build_model``."""
    if name.startswith(TORCHVISION):
        return torchvision_model(name[len(TORCHVISION):], in_shape, num_classes, layers)
    return MODELS.get(name)(tuple(in_shape), num_classes, layers, widths=tuple(widths))
