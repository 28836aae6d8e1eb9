"""The registered architectures: an MLP, LeNet-5, ResNet-18 and VGG-16/19 (CIFAR variants). A new
one is a :class:`~ssvi_cli.models.base.SSVIModel` built from a
:class:`~ssvi_cli.models.base.LayerFactory`, registered with :func:`~ssvi_cli.models.base.register`."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ssvi_cli.config import ConfigError
from ssvi_cli.models.base import LayerFactory, SSVIModel, register


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


@register("mlp", widths=True, first_conv=False, batchnorm=False)
def _mlp(in_shape, num_classes, layers, widths=(256, 256)) -> SSVIModel:
    return MLP(in_shape, num_classes, layers, widths)


@register("lenet5", batchnorm=False)
def _lenet5(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return LeNet5(in_shape, num_classes, layers)


@register("resnet18")
def _resnet18(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return ResNet18(in_shape, num_classes, layers)


@register("vgg16")
def _vgg16(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return VGG(in_shape, num_classes, layers, "vgg16")


@register("vgg19")
def _vgg19(in_shape, num_classes, layers, widths=None) -> SSVIModel:
    return VGG(in_shape, num_classes, layers, "vgg19")
