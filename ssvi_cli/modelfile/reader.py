"""Reading a model file back into a model: the header is validated first, the architecture is built
from the model card only once its sizes match the file, then every layer's index, mu and sigma and
every dense tensor are checked and installed. The training code is never imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import math
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load
from torch import Tensor, nn

from ssvi_cli.core.gaussian import rho_from_sigma
from ssvi_cli.core.conv import SparseConv1d, SparseConv2d
from ssvi_cli.core.layers import SparseGaussian, SparseLinear, sparse_layers
from ssvi_cli.core.state import load_tensors
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.fileio import brief
from ssvi_cli.modelfile.card import CardError, ModelCard, build_model
from ssvi_cli.modelfile.codec import INDEX_CODES, gap8_decode
from ssvi_cli.modelfile.header import ModelFileError, read_header
from ssvi_cli.modelfile.writer import dense_state, layer_kind
from ssvi_cli.models import SSVIModel

CUSTOM = "custom:"  # the architecture name of a file saved from a user's own module, + module.class
from ssvi_cli.registry import UnknownName


@dataclass(frozen=True)
class FileInfo:
    """Where a loaded model came from: its path, format, layout, value dtype, sizes, layer records."""

    path: str
    format: str = "ssvi"
    version: int = 1
    layout: str = "compact"        # compact, dense, or checkpoint
    dtype: str = "float32"
    file_bytes: int | None = None
    header_bytes: int | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_model_file(self) -> bool:
        return self.layout in ("compact", "dense")


@dataclass
class LoadedModel:
    """A model rebuilt from a file (or a run's checkpoint), its card and where it came from."""

    model: SSVIModel
    card: ModelCard
    file: FileInfo

    @property
    def spec(self) -> DataSpec:
        return self.card.data


def read_model_file(path: Path, device: str | torch.device = "cpu", kernel: str = "auto") -> LoadedModel:
    """Rebuild the model of an ssvi file, validating every shape and index; raises ModelFileError.

    ``kernel``: the kernel policy of the rebuilt layers (``prediction`` never builds a dense linear
    weight; see ``core.kernels.KernelPolicy``).
    """
    head = read_header(path)
    meta = head["meta"]
    card, model = _build(path, meta, head["tensors"], kernel)
    install(model, path, meta, read_tensors(path))
    model.to(device)
    model.eval()
    return LoadedModel(model, card, _file_info(path, head))


def _file_info(path: Path, head: dict[str, Any]) -> FileInfo:
    meta = head["meta"]
    return FileInfo(str(path), meta["format"], meta["version"], meta["layout"], meta["dtype"],
                    head["file_bytes"], head["header_bytes"], meta["layers"])


def holds_custom_module(head: dict[str, Any]) -> bool:
    """Whether a file's model is a user's own module (``ssvi_cli.save``), which only its code builds."""
    name = head["meta"]["architecture"].get("name")
    return isinstance(name, str) and name.startswith(CUSTOM)


def read_layers(path: Path) -> tuple[ModelCard, FileInfo, list[tuple[str, SparseGaussian]]]:
    """The card and the sparse layers of a model file, each layer built alone from its record and
    checked as :func:`read_model_file` checks it: the posterior of any file, a user's own module's
    included, without the module's code (no forward, no dense tensors)."""
    head = read_header(path)
    meta, table = head["meta"], head["tensors"]
    try:
        card = ModelCard.from_metadata(meta)
    except CardError as exc:
        raise ModelFileError(f"{path} has a corrupted header ({exc})") from None
    sigma_param = card.architecture.sigma_param
    tensors = read_tensors(path)
    layers = []
    for raw in meta["layers"]:
        record = raw if isinstance(raw, dict) else {}
        name, shape = record.get("name"), record.get("shape")
        kind = {2: "linear", 3: "conv1d", 4: "conv2d"}.get(len(shape)) if isinstance(shape, list) else None
        if (not isinstance(name, str) or kind is None or record.get("kind", kind) != kind
                or not all(isinstance(s, int) and s >= 1 for s in shape)):
            raise ModelFileError(f"{path} has a corrupted header (layer record {raw!r})")
        stored = table.get(f"{name}.mu", {}).get("shape")
        if record.get("index") == "full" and (stored is None or math.prod(stored) != math.prod(shape)):
            raise ModelFileError(f"{path}: layer {name!r} records a full index, but mu does not have {shape} values")
        options = dict(bias=False, bayesian=bool(record.get("bayesian")), sigma_param=sigma_param)
        layer = (SparseLinear(shape[1], shape[0], **options) if kind == "linear"
                 else SparseConv1d(shape[1], shape[0], shape[2], **options) if kind == "conv1d"
                 else SparseConv2d(shape[1], shape[0], (shape[2], shape[3]), **options))
        layer.set_support(*_load_layer(path, name, layer, record, tensors, "its record")[1])
        layers.append((name, layer.eval()))
    return card, _file_info(path, head), layers


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the file at ``path`` (its header already validated)."""
    try:
        return load_safetensors(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} could not be read ({brief(exc)})") from None


def load_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors, each copied out of safetensors' memory map as it is read: a tensor
    it gives keeps the map open for as long as it lives (a float32 one is installed as it is), and
    Windows refuses to replace a mapped file (a model could not be saved back over the file it came
    from). A path that is not UTF-8 text, which safetensors cannot open, is read from its bytes."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return load(Path(path).read_bytes())
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key).clone() for key in file.keys()}


def install(model: nn.Module, path: Path, meta: dict[str, Any], tensors: dict[str, Tensor],
            target: str = "") -> None:
    """Check the file's layers and tensors against ``model``'s and install them; the first
    difference is a :class:`ModelFileError` naming the layer or tensor. ``model`` must have the
    file's sparse layers (same names, shapes, Bayesian or not) and every other state tensor.
    ``target`` names the model in messages (default: the file's architecture)."""
    target = target or f"architecture {meta['architecture'].get('name')!r}"
    records = {r.get("name"): r for r in meta["layers"] if isinstance(r, dict)}
    layers = sparse_layers(model)
    used: set[str] = set()
    supports = []  # everything is checked before anything is installed: an error changes nothing
    for name, layer in layers:
        if name not in records:
            owner, _, part = name.rpartition(".")  # an attention split in the model, whole in the file
            whole = part in ("q_proj", "k_proj", "v_proj", "out_proj") and f"{owner}.in_proj_weight" in tensors
            raise ModelFileError(f"{path} lacks layer {name!r} of {target}" + (
                ": the file keeps that attention whole, as ssvi did before it split nn.MultiheadAttention; load it into the "
                "model before converting it (ssvi_cli.load(path, model=Model()))" * whole))
        if meta.get("layout") == "dense" and records[name].get("index") != "full":
            raise ModelFileError(f"{path}: layer {name!r} is stored {records[name].get('index')}, but the file's layout "
                                 "is dense (every layer full)")
        names, support = _load_layer(path, name, layer, records[name], tensors, target)
        used |= names
        supports.append((layer, support))
    state = {}
    for key, value in dense_state(model).items():
        if key not in tensors:
            raise ModelFileError(f"{path} lacks tensor {key!r} of {target}")
        stored = tensors[key]
        if tuple(stored.shape) != tuple(value.shape):
            raise ModelFileError(f"{path}: tensor {key!r} has shape {tuple(stored.shape)}, {target} needs {tuple(value.shape)}")
        if stored.is_floating_point() != value.is_floating_point():  # one byte of the header ("F32" -> "I32")
            raise ModelFileError(f"{path}: tensor {key!r} is stored as {str(stored.dtype).removeprefix('torch.')}, "
                                 f"{target} needs {'floating-point' if value.is_floating_point() else 'integer'} values")
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            raise ModelFileError(f"{path}: tensor {key!r} holds non-finite values")
        state[key] = stored.to(value.dtype)
        used.add(key)
    extra = sorted(set(tensors) - used)
    if extra or len(records) != len(layers):
        what = extra[:3] if extra else sorted(set(records) - {n for n, _ in layers})[:3]
        raise ModelFileError(f"{path} holds entries {target} does not have: {what}")
    for layer, support in supports:
        layer.set_support(*support)
    load_tensors(model, state)


def _build(path: Path, meta: dict[str, Any], table: dict[str, dict[str, Any]], kernel: str
           ) -> tuple[ModelCard, SSVIModel]:
    """The model the metadata describes, allocated only once its sizes match the file: a corrupted
    width or input shape must not ask for terabytes (found by tests/test_fuzz.py)."""
    try:
        card = ModelCard.from_metadata(meta)
    except CardError as exc:
        raise ModelFileError(f"{path} has a corrupted header ({exc})") from None
    name = card.architecture.name
    if name.startswith(CUSTOM):
        module, _, cls = name[len(CUSTOM):].rpartition(".")
        how = f"ssvi_cli.load(path, model={cls}(...))"
        if module.startswith("torchvision.models"):  # saved without architecture="torchvision:NAME"
            how = (f"ssvi_cli.load(path, model=m), m = torchvision.models.NAME(num_classes={card.data.num_classes}) "
                   "with any change made to it before saving (a new stem, say) made again (a file saved with "
                   "architecture='torchvision:NAME' and input_shape= rebuilds without code, when the model is "
                   "still the builder's: a layer replaced after ssvi_cli.sparsify must be sparsified too)")
        raise ModelFileError(f"{path} holds a custom module ({name[len(CUSTOM):]}) that only its own code can "
                             f"build; load it in Python with that module built as it was saved: {how}; ssvi "
                             "inspect reads its layers without it")
    shape = list(card.data.input_shape)
    if len(shape) != 3:  # every architecture a file rebuilds takes images; () is a custom module's "unknown"
        raise ModelFileError(f"{path} has a corrupted header (input shape {shape}; a {name} model takes "
                             "(channels, height, width))")
    try:
        with torch.device("meta"):  # shapes only, no memory
            _check_sizes(path, build_model(card), meta, table)
        model = build_model(card, kernel=kernel)
    except UnknownName as exc:
        raise ModelFileError(f"{path} needs an architecture this ssvi does not know ({exc})") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise ModelFileError(f"{path} has a corrupted header (architecture {meta['architecture']!r}: {exc})") from None
    return card, model


def _check_sizes(path: Path, skeleton: SSVIModel, meta: dict[str, Any], table: dict[str, dict[str, Any]]) -> None:
    """Every sparse layer's shape matches its record and every dense tensor is in the file with its
    shape, so building the model allocates no more than the file holds."""
    records = {r.get("name"): r for r in meta["layers"] if isinstance(r, dict)}
    for name, layer in sparse_layers(skeleton):
        if name not in records:
            raise ModelFileError(f"{path} lacks layer {name!r} of architecture {meta['architecture'].get('name')!r}")
        shape = records[name].get("shape")
        if not isinstance(shape, list) or shape != list(layer.weight_shape):
            raise ModelFileError(f"{path}: layer {name!r} has shape {shape}, the architecture needs "
                                 f"{list(layer.weight_shape)}")
    for key, value in dense_state(skeleton).items():
        if key not in table or table[key]["shape"] != list(value.shape):
            raise ModelFileError(f"{path}: tensor {key!r} is missing or does not have shape {list(value.shape)}")


def _load_layer(path: Path, name: str, layer: SparseGaussian, record: dict[str, Any],
                tensors: dict[str, Tensor], target: str) -> tuple[set[str], tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Validate one layer's record and tensors; returns the tensor names used and the support
    ``(idx, mu, rho)`` to install."""
    where = f"{path}: layer {name!r}"
    if record.get("kind", layer_kind(layer)) != layer_kind(layer):
        raise ModelFileError(f"{where} is recorded as {record.get('kind')!r}, but that layer of {target} is "
                             f"{layer_kind(layer)!r}")
    if [int(s) for s in record.get("shape", [])] != list(layer.weight_shape):
        raise ModelFileError(f"{where} has shape {record.get('shape')}, {target} needs {list(layer.weight_shape)}")
    if bool(record.get("bayesian")) != layer.bayesian:
        raise ModelFileError(f"{where} is {'not ' if layer.bayesian else ''}Bayesian, unlike that layer of {target}")
    code = record.get("index")
    if code not in INDEX_CODES:
        raise ModelFileError(f"{where} has an unknown index code {code!r}")
    names = {f"{name}.mu"} | ({f"{name}.sigma"} if layer.bayesian else set())
    names |= {f"{name}.index"} if code != "full" else set()
    missing = sorted(n for n in names if n not in tensors)
    if missing:
        raise ModelFileError(f"{path} lacks tensor {missing[0]!r}")
    if code == "full":
        if tensors[f"{name}.mu"].numel() != layer.numel:  # before the index is made: the header's numel may be huge
            raise ModelFileError(f"{where} is recorded whole ({layer.numel} entries) but stores "
                                 f"{tensors[f'{name}.mu'].numel()} values of mu")
        idx = torch.arange(layer.numel)
    elif code == "gap8":
        codes = tensors[f"{name}.index"]
        if codes.dtype != torch.uint8 or codes.dim() != 1 or (codes.numel() and int(codes[-1]) == 0):
            raise ModelFileError(f"{where} has a corrupted gap8 index")
        idx = gap8_decode(codes)
    else:
        if tensors[f"{name}.index"].dtype != torch.int32:  # floats would be truncated into other entries
            raise ModelFileError(f"{where} stores its flat32 index as {str(tensors[f'{name}.index'].dtype)[6:]}, "
                                 "not int32")
        idx = tensors[f"{name}.index"].to(torch.int64)
        if idx.dim() != 1 or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            raise ModelFileError(f"{where} has flat indices that are not sorted and unique")
    if idx.numel() != int(record.get("active", -1)):
        raise ModelFileError(f"{where} has {idx.numel()} indices but records {record.get('active')} active entries")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= layer.numel):
        raise ModelFileError(f"{where} has indices outside its {layer.numel} entries")
    shape = list(layer.weight_shape) if code == "full" else [idx.numel()]
    mu = _values(tensors[f"{name}.mu"], where, "mu", shape)
    if not bool(torch.isfinite(mu).all()):
        raise ModelFileError(f"{where}: mu holds non-finite values")
    rho = None
    if layer.bayesian:
        sigma = _values(tensors[f"{name}.sigma"], where, "sigma", shape)
        if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
            raise ModelFileError(f"{where}: sigma holds negative or non-finite values")
        # In float64 so that sigma -> rho -> softplus(rho) returns sigma to float32 rounding.
        rho = rho_from_sigma(sigma.double(), layer.sigma_param).float()
    return names, (idx, mu.float(), rho)


def _values(stored: Tensor, where: str, what: str, shape: list[int]) -> Tensor:
    """A layer's stored ``mu`` or ``sigma``, of ``shape`` (``[active]``, or the weight shape for a
    ``full`` layer), as a flat float tensor, or the error that says which of the two it is not."""
    if not stored.is_floating_point():
        raise ModelFileError(f"{where}: {what} is stored as {str(stored.dtype).replace('torch.', '')}, not as floats")
    if list(stored.shape) != shape:
        count = f"{shape[0]} indices" if len(shape) == 1 else f"the weight shape {shape}"
        raise ModelFileError(f"{where}: {what} has shape {list(stored.shape)} for {count}")
    return stored.reshape(-1)
