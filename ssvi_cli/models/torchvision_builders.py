"""torchvision's classifiers as ssvi models (``--model torchvision:NAME``): built without weights,
their first conv fitted to the data's channels, every Linear/Conv2d a sparse Gaussian layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ssvi_cli.registry import Registry, UnknownName

if TYPE_CHECKING:
    from ssvi_cli.models.base import LayerFactory

TORCHVISION = "torchvision:"
# Builders with auxiliary classifiers, which make the training-mode forward return a tuple: built
# without them (the model's output is its main classifier's logits), with torchvision's own init.
AUX_FREE = {"googlenet": {"aux_logits": False, "init_weights": True},
            "inception_v3": {"aux_logits": False, "init_weights": True}}
AUX_HEADS = ("aux1.", "aux2.", "AuxLogits.")  # their keys in the published state_dicts


def check_torchvision_name(name: str) -> None:
    """``name`` (after ``torchvision:``) is one of torchvision's classification builders; an unknown
    one lists them (closest first)."""
    import torchvision

    builders: Registry[None] = Registry("torchvision classification model")
    for builder in torchvision.models.list_models(module=torchvision.models):
        builders.add(builder, None)
    if name in builders:
        return
    for task, what in (("detection", "a detection"), ("segmentation", "a segmentation"), ("video", "a video"),
                       ("optical_flow", "an optical flow"), ("quantization", "a quantized (inference only)")):
        if name in torchvision.models.list_models(module=getattr(torchvision.models, task)):
            plain = name.removeprefix("quantized_")
            raise UnknownName(f"torchvision:{name} is {what} model; " + (
                f"train its float classifier, torchvision:{plain}" if plain in builders else
                "ssvi trains torchvision's image classifiers, resnet18, efficientnet_b0, ... (python -c \"import "
                "torchvision; print(torchvision.models.list_models(module=torchvision.models))\" lists them)"))
    close = builders.close_matches(name)  # first: the whole list is 80 names long
    raise UnknownName(f"unknown torchvision classification model {name!r}"
                      + (f" (did you mean {' or '.join(close)}?)" if close else "")
                      + f"; valid names are: {', '.join(builders.names())}")


def torchvision_base(name: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision's deterministic classifier ``name`` (no pretrained weights) with ``num_classes``
    outputs and its first convolution taking ``in_shape[0]`` channels (GoogLeNet and Inception v3
    without their auxiliary classifiers, :data:`AUX_FREE`)."""
    import torchvision

    check_torchvision_name(name)
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


def torchvision_model(name: str, in_shape: Sequence[int], num_classes: int, layers: LayerFactory) -> nn.Module:
    """:func:`torchvision_base` with every Linear/Conv2d a sparse Gaussian layer with an empty
    support (``core.convert.sparsify``), for the trainer or a file to fill."""
    from ssvi_cli.core.convert import sparsify

    model = torchvision_base(name, in_shape, num_classes)
    sparsify(model, structure_only=True, bayesian=layers.bayesian, sigma_param=layers.sigma_param,
             kernel=layers.kernel, _split_attention=layers.split_attention)
    return model
