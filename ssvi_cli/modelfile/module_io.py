"""Saving and loading any converted ``nn.Module`` as a model file (the public ``ssvi_cli.save``, and
``ssvi_cli.load`` from :mod:`ssvi_cli.modelfile.loading`).

A file records how to rebuild its model: a ``torchvision:NAME`` architecture rebuilds from the file
alone (so ``ssvi infer``, ``evaluate`` and ``inspect`` work on it); any other module is recorded as
``custom:<module>.<class>`` and loads into a model the user builds, ``load(path, model=MyNet())``,
which is converted to the file's layer structure first when it is still deterministic. Every layer
and tensor is checked against the model; the first difference is named.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ssvi_cli.argcheck import real
from ssvi_cli.config import image_folder
from ssvi_cli.core.convert import unfilled
from ssvi_cli.core.layers import SparseGaussian, SparseLinear, sparse_layers
from ssvi_cli.core.modes import evaluating, sampling
from ssvi_cli.core.state import wrapper_chain
from ssvi_cli.core.targets import CONVOLUTIONS
from ssvi_cli.data.sources import DATASETS, get_spec
from ssvi_cli.data.spec import DataError, DataSpec
from ssvi_cli.fileio import brief
from ssvi_cli.modelfile.card import NO_DATASET, Architecture, ModelCard, build_model
from ssvi_cli.modelfile.header import ModelFileError
from ssvi_cli.modelfile.loading import home_path, layer_signature, load
from ssvi_cli.modelfile.reader import CUSTOM
from ssvi_cli.modelfile.structure import check_same_structure
from ssvi_cli.modelfile.writer import write_model_file
from ssvi_cli.models import AUX_FREE, AUX_HEADS, TORCHVISION, LayerFactory, check_model_name, torchvision_model

log = logging.getLogger(__name__)


def save(model: nn.Module, path: str | Path, *, architecture: Optional[str] = None,
         input_shape: Optional[Sequence[int]] = None, class_names: Optional[Sequence[str]] = None,
         mean: Optional[float | Sequence[float]] = None, std: Optional[float | Sequence[float]] = None,
         dataset: str = NO_DATASET, dtype: str = "float32") -> int:
    """Write ``model`` (converted by :func:`ssvi_cli.sparsify`; a torch.compile or
    (Distributed)DataParallel wrapper is looked through) as a compact model file, atomically;
    returns its size in bytes.

    ``architecture``: ``"torchvision:NAME"`` when ``model`` is that torchvision builder's network
    (checked layer by layer against a fresh build; ``input_shape`` ``(C, H, W)`` is then required),
    so the file rebuilds without code; ``None`` for any other module, which
    :func:`load` fills given a model of the same structure. ``class_names`` (one distinct name per
    output; default ``"0"``, ``"1"``, ...; their number is the model's output size), ``mean``/``std``
    (given together: the input normalisation ``ssvi infer`` and ``ssvi evaluate`` apply to images in [0, 1], one of
    each per channel or one for all, a number or a sequence; default: when ``dataset`` names a
    registered dataset such as ``"digits"``, the normalisation its loaders apply, else none),
    ``dataset`` and ``input_shape`` describe the data in the file's model card. ``dtype``: float32,
    float16 or bfloat16 values (the name or the torch dtype). With ``input_shape`` one forward of zeros (mean network, eval mode,
    every module's train/eval state restored) measures the output size, which ``class_names`` must
    match (without it, ``class_names`` of another count than the last layer's outputs is warned of);
    a shape the model cannot take is refused. ``path`` must end in ``.safetensors``.
    """
    layers = sparse_layers(model := wrapper_chain(model)[-1])  # a file names its layers as the plain model does
    if isinstance(dtype, torch.dtype):  # torch.float16 as "float16"
        dtype = str(dtype).removeprefix("torch.")
    if not layers:
        raise ValueError("the model has no sparse Gaussian layers; convert it with ssvi_cli.sparsify first")
    unfilled(model, "save it")
    if not isinstance(path, (str, Path)) or not str(path):
        raise (ValueError if path == "" else TypeError)(f"path={path!r}: give the model file's path (a str or Path) ending in .safetensors")
    path = home_path(path)
    if path.is_dir() or path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path} is a folder; give the model file's path, ending in .safetensors" if path.is_dir()
                         else f"{path}: name the model file *.safetensors (ssvi reads a .pt as a training checkpoint)")
    if input_shape is not None and hasattr(input_shape, "tolist") and not isinstance(input_shape, torch.Size):
        input_shape = input_shape.tolist()  # a numpy array or a tensor of sizes
    for arg, value in (("input_shape", input_shape), ("class_names", class_names)):
        if value is not None and (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)):
            raise TypeError(f"{arg}={value!r}: give a sequence " + ("(C, H, W), or (features,)" if arg == "input_shape"
                                                                     else "of names, one per output"))
    for odd in (n for n in class_names or () if not isinstance(n, str)):
        raise TypeError(f"class_names holds {odd!r} ({type(odd).__name__}): give each output's name as a str")
    mean, std = _per_channel("mean", mean), _per_channel("std", std)
    kept, given = _loaded_card(model, architecture), class_names
    if kept is None and (mean is None) != (std is None):
        raise ValueError("give mean= and std= together, or neither: ssvi infer and evaluate feed it (x - mean) / std")
    if kept is not None:  # a model from ssvi_cli.load: what its file said, unless said otherwise here
        if kept.architecture.name.startswith(TORCHVISION):
            architecture = kept.architecture.name
        input_shape = kept.data.input_shape if input_shape is None else input_shape
        class_names = class_names or kept.data.class_names
        mean, std = (kept.data.mean if mean is None else mean), (kept.data.std if std is None else std)
        dataset = kept.data.name if dataset == NO_DATASET else dataset
    bayesian = {layer.bayesian for _, layer in layers}
    sigma_param = layers[0][1].sigma_param
    split = not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())  # whole: read from an older file
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else ()
    measured = _output_size(model, shape)
    last, outputs = _last_layer(model)
    outputs = measured if measured is not None else outputs
    how = " (the output measured is no tensor)" if shape else " (input_shape= measures the output, for a model of one input)"
    if class_names and len(class_names) != outputs and (measured is not None or given):
        if measured is not None:
            raise ValueError(f"class_names holds {len(class_names)} names for a model with {outputs} outputs")
        log.warning("class_names holds %d names, and %s, the last layer registered, has %d outputs%s: the file records "
                    "%d classes", len(class_names), last, outputs, how, len(class_names))
    elif not class_names and measured is None and isinstance(model.get_submodule(last), CONVOLUTIONS) \
            and any(isinstance(m, (nn.Linear, SparseLinear)) for m in model.modules()):  # a head registered before
        log.warning("the file records %d classes, the channels of %s, the last layer registered, a convolution; if the "
                    "model's output is another layer's, give class_names= (one per output)%s", outputs, last, how)
    if class_names and len(set(class_names)) != len(class_names):
        twice = next(n for i, n in enumerate(class_names) if n in class_names[:i])
        raise ValueError(f"class_names names {twice!r} twice; give each output its own name")
    num_classes = len(class_names) if class_names else outputs
    widths: tuple[int, ...] = ()
    if architecture is None and kept is not None:  # ssvi's own architecture, checked above
        name, widths = kept.architecture.name, kept.architecture.widths
    elif architecture is None:
        name = f"{CUSTOM}{type(model).__module__}.{type(model).__qualname__}"
    elif architecture.startswith(TORCHVISION):
        if len(shape) != 3:
            raise ValueError(f"architecture={architecture!r} needs input_shape=(C, H, W) to be rebuilt from the file")
        if len(bayesian) != 1:
            raise ValueError(f"architecture={architecture!r} rebuilds with every layer Bayesian or none; save a model "
                             "with deterministic layers without architecture= and load it with model=")
        check_model_name(architecture)
        factory = LayerFactory(bayesian=bayesian.pop(), sigma_param=sigma_param, split_attention=split)
        try:
            check_same_structure(_skeleton(architecture, shape, num_classes, factory), model, architecture)
        except ValueError as exc:
            aux = any(name.startswith(AUX_HEADS) for name, _ in model.named_modules())
            if architecture[len(TORCHVISION):] not in AUX_FREE or not aux:
                raise
            raise ValueError(f"{exc} (ssvi builds {architecture} with aux_logits=False)") from None
        name = architecture
    else:
        raise ValueError(f"architecture={architecture!r}: give 'torchvision:NAME', or None for any other module")
    known = _registered(dataset, shape, near_miss=mean is None)
    channels = shape[0] if shape and len(shape) == 3 else 1  # an image's channels; one for all of another input
    if shape and len(shape) != 3 and (odd := next((len(v) for v in (mean, std) if v and len(v) not in (1, shape[0])), 0)):
        raise ValueError(f"mean= and std= hold {odd} values for inputs of shape {tuple(shape)}: give one for all, or "
                         f"one per feature ({shape[0]})")
    spec = DataSpec(dataset, shape, num_classes,  # type: ignore[arg-type]
                    tuple(class_names) if class_names else tuple(str(i) for i in range(num_classes)),
                    tuple(float(v) for v in mean) if mean is not None else known.mean if known else (0.0,) * channels,
                    tuple(float(v) for v in std) if std is not None else known.std if known else (1.0,) * channels,
                    pixel_max=known.pixel_max if known else kept.data.pixel_max if kept else 255.0,
                    # how the model's folder was decoded: a loaded file's, whatever its classes are named now
                    reduced_jpeg=kept.data.reduced_jpeg if kept is not None and dataset == kept.data.name
                    else image_folder(dataset) is not None)  # else a folder read by this ssvi
    if kept is not None and spec.class_names == kept.data.class_names:
        spec = replace(spec, dataset_classes=kept.data.dataset_classes, files_digest=kept.data.files_digest)
    try:
        spec.check()  # a file others cannot use is refused here, not when it is read
    except DataError as exc:
        raise ValueError(str(exc)) from None
    card = ModelCard(Architecture(name, widths, any(l.bayesian for _, l in layers), sigma_param, split), spec)
    return write_model_file(model, path, card, dtype=dtype)  # type: ignore[arg-type]


def _per_channel(arg: str, value: Any) -> Optional[tuple[float, ...]]:
    """``mean=``/``std=`` as floats, one per channel: a number (:func:`~ssvi_cli.argcheck.real`'s), a
    sequence of them, or a numpy array or tensor of any shape holding them (a (C, 1, 1) one broadcasts)."""
    if value is None:
        return None
    if hasattr(value, "tolist") and hasattr(value, "reshape"):
        value = value.reshape(-1).tolist()
    items = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    if items:
        try:
            return tuple(real(arg, v, finite=False) for v in items)  # (a non-finite one: the data description's check)
        except TypeError:
            pass
    raise TypeError(f"{arg}={value!r:.60}: give a number, or a sequence of numbers, one per channel")


def _loaded_card(model: nn.Module, architecture: Optional[str]) -> Optional[ModelCard]:
    """The card of the file ``model`` was loaded from (``load`` keeps it as ``model.ssvi_card``),
    when the model still has that architecture: its data description (input shape, classes,
    normalisation) is then written again, and ssvi's own or a torchvision architecture with it, so
    a loaded, fine-tuned and saved model still runs in ``ssvi infer``. A model changed since (a new
    head, say) is saved as any other, with a warning."""
    card = getattr(model, "ssvi_card", None)
    if not isinstance(card, ModelCard) or (architecture is not None and architecture != card.architecture.name):
        return None
    name = card.architecture.name
    try:
        if name.startswith(CUSTOM):  # no builder to compare with: the sparse layers it was loaded with
            if name != f"{CUSTOM}{type(model).__module__}.{type(model).__qualname__}":
                return None
            if getattr(model, "_ssvi_layers", None) != layer_signature(model):
                raise ValueError("its sparse layers differ from those it was loaded with")
        else:
            with torch.device("meta"):
                check_same_structure(build_model(card), model, name)
    except ValueError as exc:
        log.warning("the model no longer has the architecture of the file it was loaded from (%s); it is saved "
                    "without that file's %sdata description (input shape, class names, normalisation): give "
                    "input_shape=, class_names=, mean= and std= as they are now", exc,
                    "" if architecture is not None else "architecture and ")
        return None
    return card


def _registered(dataset: str, shape: tuple[int, ...], near_miss: bool = True) -> Optional[DataSpec]:
    """The spec of a registered ``dataset`` (its loaders' normalisation and raw pixel range); None for no
    dataset, an image folder, any other name (a near miss of a registered one warned of, ``near_miss``:
    with no normalisation given), or an ``input_shape`` of other channels (warned of)."""
    if dataset == NO_DATASET or ":" in dataset:
        return None
    try:
        spec = get_spec(dataset)
    except DataError:  # a name of the user's own data is theirs to give; a near miss is likely a typo
        if near_miss and (near := DATASETS.close_matches(dataset)):
            log.warning("dataset=%r is not a registered dataset (did you mean %s?): the file records no input "
                        "normalisation; give the registered name, or mean= and std=", dataset, " or ".join(near))
        return None
    if len(shape) == 3 and shape[0] != spec.input_shape[0]:
        log.warning("dataset=%r has %d-channel images but input_shape %s has %d channels: its normalisation is "
                    "not recorded; give mean= and std=", dataset, spec.input_shape[0], shape, shape[0])
        return None
    return spec


def _skeleton(architecture: str, shape: tuple[int, ...], num_classes: int, factory: LayerFactory) -> nn.Module:
    """The builder's network with empty supports, on the meta device (shapes only)."""
    with torch.device("meta"):
        return torchvision_model(architecture[len(TORCHVISION):], shape, num_classes, factory)


def _last_layer(model: nn.Module) -> tuple[str, int]:
    """The name and outputs of the last ``Linear`` or convolution registered, sparse or not (the head, if registered last)."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseGaussian, nn.Linear, *CONVOLUTIONS))][-1]
    return name, int(last.weight_shape[0] if isinstance(last, SparseGaussian) else last.weight.shape[0])


def _output_size(model: nn.Module, shape: tuple[int, ...]) -> Optional[int]:
    """The size of the model's output for one input of ``shape`` (zeros; token ids for a model with an
    embedding; mean network, no gradients); None without a shape. A shape it cannot take is refused."""
    if not shape:
        return None
    param = next(model.parameters())
    kinds = [param.dtype] + ([torch.long] if any(isinstance(m, nn.Embedding) for m in model.modules()) else [])
    for dtype in kinds:
        try:
            with torch.no_grad(), evaluating(model), sampling(model, "mean"):
                out = model(torch.zeros((1, *shape), dtype=dtype, device=param.device))
        except Exception as exc:  # noqa: BLE001 - whatever the model raises for an input it cannot take
            error = exc
            continue
        return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() >= 1 else None
    raise ValueError(f"input_shape={shape}: the model cannot take an input of that shape "
                     f"({type(error).__name__}: {brief(error, 200)})")


__all__ = ["CUSTOM", "ModelFileError", "load", "save"]
