"""Models by name: the registered architectures (:mod:`~ssvi_cli.models.builtin`; a new one is
registered there with :func:`~ssvi_cli.models.base.register`) and ``torchvision:NAME``
(:mod:`~ssvi_cli.models.torchvision_builders`).

Every model exposes ``first`` (its first weight layer) and ``forward_rest(h)`` so that Monte Carlo
prediction can compute the first layer's LRT moments once and reuse them across draws (when that is
the cheaper scheme, see ``ssvi_cli.prediction.first_layer_scheme``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ssvi_cli.config import ConfigError
from ssvi_cli.core.flops import vector_model
from ssvi_cli.fileio import brief
from ssvi_cli.models.base import MODELS, LayerFactory, ModelEntry, SSVIModel, register
from ssvi_cli.models.builtin import SMALL_INPUT_HINT, VGG, VGG_CFG, BasicBlock, LeNet5, MLP, ResNet18
from ssvi_cli.models.torchvision_builders import (AUX_FREE, AUX_HEADS, TORCHVISION, check_torchvision_name,
                                                  torchvision_base, torchvision_model)

__all__ = ["AUX_FREE", "AUX_HEADS", "MODELS", "MLP", "SMALL_INPUT_HINT", "TORCHVISION", "VGG", "VGG_CFG", "BasicBlock",
           "LayerFactory", "LeNet5", "ModelEntry", "ResNet18", "SSVIModel", "build_architecture", "check_model_name",
           "check_trains_on", "input_error", "model_entry", "register", "torchvision_base", "torchvision_model"]


# Their public path, as before the package was split: a model pickled whole, and the class a file
# written by ssvi_cli.save records (custom:ssvi_cli.models.MLP), name them so.
for _cls in (BasicBlock, LeNet5, MLP, ResNet18, SSVIModel, VGG, LayerFactory):
    _cls.__module__ = __name__


def model_entry(name: str) -> ModelEntry:
    """The registered model ``name``; for ``torchvision:NAME``, what such a model reads (as a ResNet's:
    a first conv, BatchNorm, no ``model.widths``), building it with :func:`torchvision_model`."""
    if not name.startswith(TORCHVISION):
        return MODELS.get(name)
    tv_name = name[len(TORCHVISION):]
    return ModelEntry(lambda in_shape, num_classes, layers, widths=(): torchvision_model(tv_name, in_shape,
                                                                                         num_classes, layers))


def check_model_name(name: str) -> None:
    """A registered architecture or ``torchvision:NAME`` of one of torchvision's classification
    builders; an unknown name lists the valid ones (closest first)."""
    if name.startswith(TORCHVISION):
        check_torchvision_name(name[len(TORCHVISION):])
    else:
        MODELS.get(name)


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


def build_architecture(name: str, in_shape: Sequence[int], num_classes: int, layers: LayerFactory,
                       widths: Sequence[int] = (256, 256)) -> nn.Module:
    """An architecture by name (or ``torchvision:NAME``), its layers from ``layers``, without a
    support yet (see ``core.allocation.initialise``). To rebuild a described model use
    ``modelfile.build_model``."""
    return model_entry(name).build(tuple(in_shape), num_classes, layers, widths=tuple(widths))
