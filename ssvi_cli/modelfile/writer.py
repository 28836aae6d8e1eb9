"""Writing a model file: per sparse layer its index code, mu and sigma over the active entries only;
every other ``state_dict`` tensor dense; the model card and layer records as metadata.

Written atomically (a temporary file renamed into place), with safetensors: no pickle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ssvi_cli.core.attention import SplitMultiheadAttention
from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.core.state import support_problem
from ssvi_cli.fileio import atomic_path, compact_json
from ssvi_cli.modelfile.card import ModelCard
from ssvi_cli.modelfile.codec import encode_index
from ssvi_cli.modelfile.header import DTYPES, FORMAT_NAME, KINDS
from ssvi_cli.models import SSVIModel

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
log = logging.getLogger(__name__)


def version_for(model: nn.Module, records: list[dict]) -> int:
    """The oldest format version that holds the file: 2 for a conv1d layer or a split
    nn.MultiheadAttention (an older reader refuses it as newer, not as unknown tensors), else 1."""
    split = any(isinstance(m, SplitMultiheadAttention) for m in model.modules())
    return max([1, 2 * split, *(KINDS[r["kind"]] for r in records)])


def layer_kind(layer: SparseGaussian) -> str:
    return layer.KIND


def dense_state(model: nn.Module) -> dict[str, Tensor]:
    """The ``state_dict`` tensors a file stores as they are: all but the sparse layers' idx/mu/rho
    (the file's own index/mu/sigma replace them), each tensor once. A module or parameter registered
    under several names (a shared block, a tied weight) is stored under its first name, which
    ``load_state_dict`` fills for every name."""
    seen = {id(t) for _, layer in sparse_layers(model) for t in (layer.idx, layer.mu, layer.rho) if t is not None}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[key] = value.detach()
    return out


def _layer_tensors(layer: SparseGaussian, dense: bool) -> tuple[str, int, dict[str, Tensor]]:
    """(index code, active count, {"mu", "sigma", "index"} tensors) of one layer, values in its dtype.

    Values are flat over the active entries, or of the weight shape when every entry is stored
    (``full``: a dense layer, or any layer with ``dense``, zeros off the support).
    """
    values = {"mu": layer.mu.detach()}  # in the layer's dtype: model_tensors converts (and checks the range)
    if layer.bayesian:
        values["sigma"] = layer.sigma().detach()
    if dense:
        code, index, active = "full", None, layer.numel
    else:
        code, index = encode_index(layer.idx.detach().cpu(), layer.numel)
        active = layer.active
    if code == "full":  # scattered on the layer's own device, where its support index lives
        values = {k: layer.to_dense(v) for k, v in values.items()}
    values = {k: v.cpu().contiguous() for k, v in values.items()}
    if index is not None:
        values["index"] = index
    return code, active, values


def model_tensors(model: SSVIModel, dtype: str = "float32", dense: bool = False
                  ) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """The file's tensors and per-layer records for ``model`` (compact unless ``dense``)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid values are: {', '.join(DTYPES)}")
    tensors: dict[str, Tensor] = {}
    records: list[dict[str, Any]] = []
    flushed: dict[str, int] = {}  # per layer, the sigmas the dtype stores as 0
    for name, layer in sparse_layers(model):
        if problem := support_problem(layer.numel, layer.idx):  # no reader would take the file
            raise ValueError(f"the support (idx) of layer {name!r} is {problem} (an index averaged as a number, by torch's "
                             "AveragedModel with use_buffers=True, say): nothing was written")
        code, active, parts = _layer_tensors(layer, dense)
        for part, value in parts.items():
            key = f"{name}.{part}"
            tensors[key] = value.contiguous() if part == "index" else _converted(key, value, dtype)
            if part == "sigma" and (lost := int(((value != 0) & (tensors[key] == 0)).sum())):
                flushed[name] = lost
        records.append({"name": name, "kind": layer_kind(layer), "shape": list(layer.weight_shape),
                        "active": active, "bayesian": layer.bayesian, "index": code})
    for key, value in dense_state(model).items():
        value = value.cpu()
        tensors[key] = _converted(key, value, dtype) if value.is_floating_point() else value.contiguous()
    if flushed:  # a point mass in the file, whose SNR inspect shows as its reader's floor of sigma gives it
        zero = torch.zeros((), dtype=TORCH_DTYPES[dtype])
        lost, where = sum(flushed.values()), ", ".join(f"{n}: {k}" for n, k in list(flushed.items())[:3])
        log.warning("%d sigma value%s too small for %s (its smallest is %.3g) stored as 0, point masses (%s%s); save as %s "
                    "to keep them", lost, "s" * (lost != 1), dtype, float(torch.nextafter(zero, zero + 1)),
                    where, ", ..." if len(flushed) > 3 else "", _others(dtype))
    return tensors, records


def _others(dtype: str) -> str:
    """The types with float32's range other than ``dtype``, as advice to save in one of them."""
    return " or ".join(d for d in ("float32", "bfloat16") if d != dtype)


def _converted(key: str, value: Tensor, dtype: str) -> Tensor:
    """``value`` in the file's ``dtype``; NaN or inf is refused before anything is written: no reader
    takes such a file, and a loop saving to one path each epoch would lose its last good model."""
    out = value.to(TORCH_DTYPES[dtype]).contiguous()
    if not bool(torch.isfinite(out).all()):
        if bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {key!r} holds values beyond {dtype}'s range (largest "
                             f"{torch.finfo(TORCH_DTYPES[dtype]).max:.6g}); save as {_others(dtype)}")
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"tensor {key!r} holds {bad} non-finite value{'s' * (bad != 1)} (NaN or inf; a diverged "
                         "model?), which no reader of the file takes: nothing was written")
    return out


def write_model_file(model: SSVIModel, path: Path, card: ModelCard, *, dtype: str = "float32",
                     dense: bool = False) -> int:
    """Write ``model`` with its ``card`` as an ssvi file (atomically); returns its size in bytes."""
    tensors, records = model_tensors(model, dtype, dense)
    metadata = {
        "format": FORMAT_NAME,
        "version": str(version_for(model, records)),
        "layout": "dense" if dense else "compact",
        "dtype": dtype,
        **card.to_metadata(),
        "layers": compact_json(records),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_header(tmp)
    return path.stat().st_size


def _sort_header(path: Path) -> None:
    """Rewrite the safetensors header of ``path`` with its keys sorted, in the length it had (padded
    with spaces, as safetensors pads it): safetensors writes them in an order of its own that changes
    from one process to the next, and one model should give one file, byte for byte."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        ordered = {key: dict(sorted(value.items())) if key == "__metadata__" else value
                   for key, value in sorted(header.items())}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:  # as serde writes JSON, the same length; else left as it was
            fh.seek(8)
            fh.write(text + b" " * (size - len(text)))
