"""``ssvi_cli.load``: a model file into the model it describes, or into the user's own module
(converted to the file's layer structure first when it is still deterministic; built on the ``meta``
device, given real tensors to fill)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ssvi_cli.core.attention import split_attention
from ssvi_cli.core.convert import sparsify
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.core.replaced import unmark
from ssvi_cli.core.state import wrapper_chain
from ssvi_cli.core.targets import TIED
from ssvi_cli.modelfile.card import CardError, ModelCard
from ssvi_cli.modelfile.header import ModelFileError, read_header
from ssvi_cli.modelfile.reader import CUSTOM, install, read_model_file, read_tensors

log = logging.getLogger(__name__)


def home_path(path: str | Path) -> Path:
    """``path`` with a leading ``~`` (``~user``) read as the home folder, as a shell reads it: save
    made a folder named ``~`` in the working directory."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # ~nosuchuser: Path's own error says only "Could not determine home directory"
        raise ValueError(f"{path}: there is no home folder for {Path(path).parts[0]}") from None


def load(path: str | Path, model: Optional[nn.Module] = None, *, device: Optional[str | torch.device] = None,
         kernel: str = "auto") -> nn.Module:
    """The model of the file at ``path``, in eval mode on ``device`` (default: the CPU for a model
    built from the file, the given model's own device otherwise).

    Without ``model`` the file must describe a buildable architecture (ssvi's own or
    ``torchvision:NAME``). With ``model`` (an instance of the saved module's class, deterministic
    or already converted; or such a model wrapped by torch.compile or DataParallel, which is
    returned as passed; under DistributedDataParallel load before wrapping) its layers are
    converted to the file's structure if needed and filled from the file; a layer or tensor that
    does not match raises :class:`ModelFileError` naming it.
    """
    if model is not None and not isinstance(model, nn.Module):
        what = f"the class {model.__name__}; pass an instance, model={model.__name__}()" if isinstance(model, type) else \
            f"a {type(model).__name__}; pass the nn.Module to fill"
        raise TypeError(f"model= is {what}")
    path = home_path(path)
    _check_load_args(device, kernel)
    if model is None:
        loaded = read_model_file(path, device=device or "cpu", kernel=kernel)
        loaded.model.ssvi_card = loaded.card  # what ssvi_cli.save writes again (_loaded_card)
        return loaded.model
    chain = wrapper_chain(model)
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in chain):
        raise ValueError("load into the model before wrapping it in DistributedDataParallel: loading may convert "
                         "its layers or resize their supports, which DDP has already registered")
    wrapper, model = model, chain[-1]
    head = read_header(path)  # the file checked before the model changes
    own = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    device = device if device is not None else (torch.device("cpu") if own.type == "meta" else own)
    undo = materialise(model, device)  # a model built on the meta device gets real tensors to fill
    try:
        return _fill(wrapper, model, path, head, device, kernel)
    except BaseException:
        undo()
        raise


def _fill(wrapper: nn.Module, model: nn.Module, path: Path, head: dict[str, Any], device: Any, kernel: str) -> nn.Module:
    """:func:`load` into ``model`` (``wrapper``'s innermost module), converting it first if needed;
    ``head``: the file's header (:func:`read_header`)."""
    meta, keys = head["meta"], head["tensors"]
    recorded = str(meta["architecture"].get("name", ""))
    mine = f"{CUSTOM}{type(model).__module__}.{type(model).__qualname__}"
    if recorded.startswith(CUSTOM) and recorded != mine:
        log.warning("%s was saved from %s; loading it into %s", path, recorded[len(CUSTOM):], mine[len(CUSTOM):])
    target = f"the {type(model).__name__} passed to load"
    if sparse_layers(model):
        install(model, path, meta, read_tensors(path), target=target)  # validates before it changes anything
        _remember_card(model, meta)
        return wrapper.to(device).eval()
    # Each nn.MultiheadAttention split as the file stores it (one from before the split keeps it whole).
    # A file that does not fit puts the user's layers back, not a model converted with empty supports.
    undo_split = split_attention(model, lambda name: any(key.startswith(f"{name}.q_proj.") for key in keys))
    children = [(module, dict(module._modules)) for module in model.modules()]
    try:
        records = [r for r in meta["layers"] if isinstance(r, dict)]
        stored = {str(r.get("name")) for r in records}
        report = sparsify(model, structure_only=True, sigma_param=str(meta["architecture"].get("sigma_param", "softplus")),
                          deterministic=[str(r.get("name")) for r in records if not r.get("bayesian")], kernel=kernel,
                          _stored=stored, _split_attention=False)  # _stored: a subclass the file stores sparse
        _keep_dense_as_stored(model, children, stored)  # a plain head the file stores with the dense tensors
        tied = next(((name, why) for name, why in report.kept if name in stored and why.startswith(TIED)), None)
        if tied is not None:  # a file written when ssvi still converted tied layers (untying them)
            raise ModelFileError(f"{path} stores layer {tied[0]!r} as sparse, but in {target} it stays dense "
                                 f"({tied[1]}); untie it before loading (model.{tied[0]}.weight = nn.Parameter(model.{tied[0]}.weight"
                                 ".detach().clone())), as it was when the file was written")
        install(model, path, meta, read_tensors(path), target=target)
    except BaseException:
        for module, kept in children:
            module._modules.clear()
            module._modules.update(kept)
            unmark(m for m in kept.values() if m is not None)  # the user's layers, trainable by their optimizer
        undo_split()
        raise
    _remember_card(model, meta)
    return wrapper.to(device).eval()


def _keep_dense_as_stored(model: nn.Module, children: list[tuple[nn.Module, dict[str, Any]]], stored: set[str]) -> None:
    """Put back the model's own layers that the file does not store as sparse layers (sparsify
    converted every layer it could), under every name each is registered under: ``children``, each
    module's child layers before converting."""
    undo = {id(layer) for name, layer in sparse_layers(model) if name not in stored}
    for module, kept in children:
        for child, now in list(module._modules.items()):
            if id(now) in undo:
                module._modules[child] = kept[child]
                unmark([kept[child]])


def _check_load_args(device: Optional[str | torch.device], kernel: str) -> None:
    """The arguments of :func:`load` that are wrong whatever the file (before it is read)."""
    from ssvi_cli.core.kernels import KERNELS

    if kernel not in KERNELS.names():
        raise ValueError(f"kernel={kernel!r}; valid values are: {', '.join(KERNELS.names())}")
    if device is not None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r} is not a torch device; give 'cpu' or 'cuda'") from None
        if kind == "meta":  # it holds no values: the file's would be dropped as they are read
            raise ValueError("device='meta' holds no values, so the file's would be lost; give 'cpu' or 'cuda'")
        backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)  # torch.cuda, torch.xpu, ...
        # A backend torch has a module for says whether it is here; any other (xla, hpu) is left to torch.
        if kind != "cpu" and callable(getattr(backend, "is_available", None)) and not backend.is_available():
            raise ValueError(f"device={device!r} was asked for but no {kind.upper()} device is available; use "
                             "device='cpu'")


def _remember_card(model: nn.Module, meta: dict[str, Any]) -> None:
    """Keep the file's description on the model it filled, for :func:`save` (not a card that no longer reads)."""
    try:
        model.ssvi_card = ModelCard.from_metadata(meta)
    except CardError:
        return
    model._ssvi_layers = layer_signature(model)  # what a custom module's layers were, for _loaded_card


def layer_signature(model: nn.Module) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    return tuple((name, tuple(layer.weight_shape), layer.bayesian) for name, layer in sparse_layers(model))


def materialise(model: nn.Module, device: Any) -> Callable[[], None]:
    """Empty tensors on ``device`` in place of the model's ``meta`` ones (a model built under
    ``torch.device("meta")``), for a file to fill; a tensor several modules share (a tied weight)
    stays one tensor, and tensors already real stay as they are. Returns what puts the meta tensors
    back. A non-persistent buffer on ``meta``, which no file fills, is refused before any change."""
    slots = [(f"{name}.{key}".lstrip("."), module, store, key) for name, module in model.named_modules()
             for store in (module._parameters, module._buffers) for key, t in store.items()
             if isinstance(t, Tensor) and t.is_meta]
    loose = next((n for n, module, store, key in slots if store is module._buffers
                  and key in module._non_persistent_buffers_set), None)
    if loose is not None:
        raise ValueError(f"the model is on the meta device, and its buffer {loose} is not in a state dict "
                         "(persistent=False), so no file fills it; build the model on a real device to load into it")
    made: dict[int, Tensor] = {}
    swapped = []
    for _, module, store, key in slots:
        old = store[key]
        if id(old) not in made:
            data = torch.empty_like(old, device=device)
            made[id(old)] = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data
        store[key] = made[id(old)]
        swapped.append((store, key, old))

    def undo() -> None:
        for store, key, old in reversed(swapped):
            store[key] = old

    return undo
