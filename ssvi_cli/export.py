"""The model file: format ``ssvi`` version 1, one safetensors file, no pickle (spec: docs/FORMAT.md).

Per sparse layer the file holds the active positions (an 8-bit gap code, int32 flat indices, or
nothing when every entry is active), ``mu`` and ``sigma`` (sigma, not rho, so other tools can read
it) over those positions only, and the layer's dense shape in the metadata. Every other tensor of the
model (biases, BatchNorm) is stored dense under its ``state_dict`` name. The model is rebuilt from the
metadata through the model registry alone; the training engine is never imported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ssvi_cli.data import DataError, DataSpec
from ssvi_cli.fileio import atomic_path, json_default
from ssvi_cli.layers import SparseConv2d, SparseGaussian, rho_from_sigma, sparse_layers
from ssvi_cli.models import LayerFactory, SSVIModel, build_model
from ssvi_cli.registry import UnknownName

FORMAT_NAME = "ssvi"
FORMAT_VERSION = 1
LAYOUTS = ("compact", "dense")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_CODES = ("full", "gap8", "flat32")
GAP_MAX = 255  # the largest gap one uint8 code holds; code 0 is a filler meaning "advance 255"
MODEL_FILE = "model.safetensors"
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
_JSON_KEYS = ("architecture", "data_spec", "training", "metrics", "layers")


class ModelFileError(Exception):
    """A model file that is missing, truncated, corrupted, not ours or from a newer format version."""


@dataclass
class LoadedModel:
    """A model rebuilt from a file (or a run's checkpoint), its data description and metadata."""

    model: SSVIModel
    spec: DataSpec
    meta: dict[str, Any]


# ------------------------------------------------------------------ index codes

def gap8_encode(idx: Tensor) -> Tensor:
    """Sorted unique flat indices -> uint8 gap code (Deep Compression's relative indexing).

    The gap of entry i is ``d_i = idx_i - idx_{i-1}`` with ``idx_{-1} = -1``, so ``d_i >= 1``. A gap
    is written as ``q_i = (d_i - 1) // 255`` filler codes 0 (each advancing 255 positions) followed
    by the code ``d_i - 255 q_i`` in 1..255.
    """
    idx = idx.to(torch.int64)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = torch.diff(idx, prepend=idx.new_tensor([-1]))
    fillers = (gaps - 1) // GAP_MAX
    remainder = gaps - GAP_MAX * fillers
    positions = torch.arange(idx.numel()) + torch.cumsum(fillers, 0)
    codes = torch.zeros(int(positions[-1]) + 1, dtype=torch.uint8)
    codes[positions] = remainder.to(torch.uint8)
    return codes


def gap8_decode(codes: Tensor) -> Tensor:
    """Inverse of :func:`gap8_encode`: uint8 codes -> strictly increasing int64 flat indices."""
    codes = codes.to(torch.int64)
    steps = torch.where(codes == 0, torch.full_like(codes, GAP_MAX), codes)
    positions = torch.cumsum(steps, 0) - 1
    return positions[codes != 0]


def gap8_size(idx: Tensor) -> int:
    """Bytes of the gap code of ``idx`` without building it."""
    if idx.numel() == 0:
        return 0
    gaps = torch.diff(idx.to(torch.int64), prepend=idx.new_tensor([-1], dtype=torch.int64))
    return int(idx.numel() + ((gaps - 1) // GAP_MAX).sum())


def encode_index(idx: Tensor, numel: int) -> tuple[str, Optional[Tensor]]:
    """Pick the smallest code: none when the layer is full, else gap8 unless int32 is smaller."""
    if idx.numel() == numel:
        return "full", None
    if gap8_size(idx) <= 4 * idx.numel():
        return "gap8", gap8_encode(idx)
    if numel > torch.iinfo(torch.int32).max:
        raise ValueError(f"a layer of {numel} entries is too large for int32 flat indices")
    return "flat32", idx.to(torch.int32)


# ------------------------------------------------------------------ writing

def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=json_default)


def _layer_kind(layer: SparseGaussian) -> str:
    return "conv2d" if isinstance(layer, SparseConv2d) else "linear"


def _sparse_state_keys(model: SSVIModel) -> set[str]:
    """``state_dict`` keys that the file replaces with its own index/mu/sigma tensors."""
    return {f"{name}.{part}" for name, _ in sparse_layers(model) for part in ("idx", "mu", "rho")}


def model_tensors(model: SSVIModel, dtype: str = "float32", dense: bool = False
                  ) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """The file's tensors and per-layer records for ``model`` (compact unless ``dense``)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid values are: {', '.join(DTYPES)}")
    value_dtype = DTYPES[dtype]
    tensors: dict[str, Tensor] = {}
    records: list[dict[str, Any]] = []
    for name, layer in sparse_layers(model):
        mu = layer.mu.detach().float().cpu()
        sigma = layer.sigma().detach().float().cpu() if layer.bayesian else None
        idx = layer.idx.detach().cpu()
        if dense:
            mu = layer.to_dense(mu).contiguous() if layer.active < layer.numel else mu.view(layer.weight_shape)
            if sigma is not None:
                sigma = layer.to_dense(sigma).contiguous() if layer.active < layer.numel else sigma.view(layer.weight_shape)
            code, index = "full", None
            active = layer.numel
        else:
            code, index = encode_index(idx, layer.numel)
            if code == "full":
                mu = mu.view(layer.weight_shape)
                sigma = sigma.view(layer.weight_shape) if sigma is not None else None
            active = layer.active
        tensors[f"{name}.mu"] = mu.to(value_dtype).contiguous()
        if sigma is not None:
            tensors[f"{name}.sigma"] = sigma.to(value_dtype).contiguous()
        if index is not None:
            tensors[f"{name}.index"] = index.contiguous()
        records.append({"name": name, "kind": _layer_kind(layer), "shape": list(layer.weight_shape),
                        "active": active, "bayesian": layer.bayesian, "index": code})
    skip = _sparse_state_keys(model)
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        value = value.detach().cpu()
        tensors[key] = (value.to(value_dtype) if value.is_floating_point() else value).contiguous()
    return tensors, records


def write_model_file(model: SSVIModel, path: Path, *, architecture: dict, data_spec: dict,
                     training: dict, metrics: dict, dtype: str = "float32", dense: bool = False) -> int:
    """Write ``model`` as an ssvi file (atomically) and return its size in bytes."""
    tensors, records = model_tensors(model, dtype, dense)
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "layout": "dense" if dense else "compact",
        "dtype": dtype,
        "architecture": _json(architecture),
        "data_spec": _json(data_spec),
        "training": _json(training),
        "metrics": _json(metrics),
        "layers": _json(records),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path.stat().st_size


# ------------------------------------------------------------------ reading the header

def _prefix_looks_like_json(raw: bytes) -> bool:
    return raw[:2] in (b'{"', b"{}")


def read_header(path: Path) -> dict[str, Any]:
    """Metadata and tensor shapes/dtypes of an ssvi file, validated, without reading tensor data.

    Returns ``{"path", "file_bytes", "header_bytes", "meta", "tensors"}`` where ``meta`` has the
    JSON fields decoded and ``tensors`` maps names to ``{"dtype", "shape", "bytes"}``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path} is truncated or not a model file ({size} bytes, no safetensors header)")
        n = int.from_bytes(head, "little")
        raw = fh.read(min(n, max(size - 8, 0)))
    if n > size - 8:
        if _prefix_looks_like_json(raw):
            raise ModelFileError(f"{path} is truncated: its header declares {n} bytes but the file has {size}")
        raise ModelFileError(f"{path} is not an ssvi model file (not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError):
        if _prefix_looks_like_json(raw):
            raise ModelFileError(f"{path} has a corrupted header (invalid JSON)") from None
        raise ModelFileError(f"{path} is not an ssvi model file (not a safetensors file)") from None
    raw_meta = header.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or raw_meta.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path} is a safetensors file but not an ssvi model file (its metadata lacks format "
            f"'{FORMAT_NAME}'); write model files with 'ssvi export'"
        )
    meta = _decode_meta(path, raw_meta)
    tensors = _check_tensor_table(path, header, size - 8 - n)
    return {"path": str(path), "file_bytes": size, "header_bytes": 8 + n, "meta": meta, "tensors": tensors}


def _decode_meta(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    try:
        version = int(raw.get("version", ""))
    except ValueError:
        raise ModelFileError(f"{path} has a corrupted header (format version {raw.get('version')!r})") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses ssvi format version {version}, newer than this ssvi reads "
            f"(version {FORMAT_VERSION}); upgrade ssvi to read it"
        )
    if version < 1:
        raise ModelFileError(f"{path} has a corrupted header (format version {version})")
    meta: dict[str, Any] = {"format": FORMAT_NAME, "version": version}
    for key in ("layout", "dtype"):
        meta[key] = raw.get(key)
    if meta["layout"] not in LAYOUTS or meta["dtype"] not in DTYPES:
        raise ModelFileError(
            f"{path} has a corrupted header (layout {meta['layout']!r}, dtype {meta['dtype']!r})"
        )
    for key in _JSON_KEYS:
        if key not in raw:
            raise ModelFileError(f"{path} has a corrupted header (metadata lacks {key!r})")
        try:
            meta[key] = json.loads(raw[key])
        except ValueError:
            raise ModelFileError(f"{path} has a corrupted header (metadata {key!r} is not valid JSON)") from None
    if not isinstance(meta["layers"], list) or not isinstance(meta["architecture"], dict):
        raise ModelFileError(f"{path} has a corrupted header (layers or architecture malformed)")
    return meta


def _check_tensor_table(path: Path, header: dict[str, Any], data_bytes: int) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    end_max = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            item = _ST_DTYPES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path} has a corrupted header (tensor {name!r} is malformed)") from None
        if not 0 <= start <= end or end - start != math.prod(shape) * item:
            raise ModelFileError(f"{path} has a corrupted header (tensor {name!r} has inconsistent offsets)")
        end_max = max(end_max, end)
        tensors[name] = {"dtype": dtype, "shape": shape, "bytes": end - start}
    if end_max > data_bytes:
        raise ModelFileError(
            f"{path} is truncated: its tensors need {end_max} bytes of data but only {data_bytes} are present"
        )
    return tensors


# ------------------------------------------------------------------ reading the model

def read_model_file(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model of an ssvi file, validating every shape and index; raises ModelFileError."""
    head = read_header(path)
    meta = head["meta"]
    spec, model = _build(path, meta, head["tensors"])
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path} could not be read ({first[:160]})") from None
    records = {r.get("name"): r for r in meta["layers"] if isinstance(r, dict)}
    used: set[str] = set()
    for name, layer in sparse_layers(model):
        if name not in records:
            raise ModelFileError(f"{path} lacks layer {name!r} of architecture {meta['architecture'].get('name')!r}")
        used |= _load_layer(path, name, layer, records[name], tensors)
    state = {}
    skip = _sparse_state_keys(model)
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        if key not in tensors:
            raise ModelFileError(f"{path} lacks tensor {key!r}")
        stored = tensors[key]
        if tuple(stored.shape) != tuple(value.shape):
            raise ModelFileError(f"{path}: tensor {key!r} has shape {tuple(stored.shape)}, expected {tuple(value.shape)}")
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            raise ModelFileError(f"{path}: tensor {key!r} holds non-finite values")
        state[key] = stored.to(value.dtype)
        used.add(key)
    extra = sorted(set(tensors) - used)
    if extra or len(records) != len(sparse_layers(model)):
        what = extra[:3] if extra else sorted(set(records) - {n for n, _ in sparse_layers(model)})[:3]
        raise ModelFileError(f"{path} holds entries the architecture does not have: {what}")
    model.load_state_dict(state, strict=False)
    model.to(device)
    model.eval()
    meta = dict(meta, path=str(path), file_bytes=head["file_bytes"], header_bytes=head["header_bytes"])
    return LoadedModel(model, spec, meta)


def _build(path: Path, meta: dict[str, Any], table: dict[str, dict[str, Any]]) -> tuple[DataSpec, SSVIModel]:
    """The model the metadata describes, allocated only once its sizes match the file: a corrupted
    width or input shape must not ask for terabytes (found by tests/test_fuzz.py)."""
    arch = meta["architecture"]
    try:
        spec = DataSpec.from_dict(meta["data_spec"])
    except (DataError, KeyError, TypeError, ValueError, AttributeError):
        raise ModelFileError(f"{path} has a corrupted header (data description malformed)") from None
    try:
        layers = LayerFactory(bayesian=bool(arch["bayesian"]), sigma_param=str(arch.get("sigma_param", "softplus")))
        args = (str(arch["name"]), spec.input_shape, spec.num_classes, layers, arch.get("widths") or (256, 256))
        with torch.device("meta"):  # shapes only, no memory
            _check_sizes(path, build_model(*args), meta, table)
        model = build_model(*args)
    except UnknownName as exc:
        raise ModelFileError(f"{path} needs an architecture this ssvi does not know ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path} has a corrupted header (architecture {arch!r}: {exc})") from None
    return spec, model


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
    skip = _sparse_state_keys(skeleton)
    for key, value in skeleton.state_dict().items():
        if key not in skip and (key not in table or table[key]["shape"] != list(value.shape)):
            raise ModelFileError(f"{path}: tensor {key!r} is missing or does not have shape {list(value.shape)}")


def _load_layer(path: Path, name: str, layer: SparseGaussian, record: dict[str, Any],
                tensors: dict[str, Tensor]) -> set[str]:
    """Validate one layer's record and tensors and install them; returns the tensor names used."""
    where = f"{path}: layer {name!r}"
    if [int(s) for s in record.get("shape", [])] != list(layer.weight_shape):
        raise ModelFileError(f"{where} has shape {record.get('shape')}, the architecture needs {list(layer.weight_shape)}")
    if bool(record.get("bayesian")) != layer.bayesian:
        raise ModelFileError(f"{where} is {'not ' if layer.bayesian else ''}Bayesian, unlike its architecture")
    code = record.get("index")
    if code not in INDEX_CODES:
        raise ModelFileError(f"{where} has an unknown index code {code!r}")
    names = {f"{name}.mu"} | ({f"{name}.sigma"} if layer.bayesian else set())
    names |= {f"{name}.index"} if code != "full" else set()
    missing = sorted(n for n in names if n not in tensors)
    if missing:
        raise ModelFileError(f"{path} lacks tensor {missing[0]!r}")
    if code == "full":
        idx = torch.arange(layer.numel)
    elif code == "gap8":
        codes = tensors[f"{name}.index"]
        if codes.dtype != torch.uint8 or codes.dim() != 1 or (codes.numel() and int(codes[-1]) == 0):
            raise ModelFileError(f"{where} has a corrupted gap8 index")
        idx = gap8_decode(codes)
    else:
        idx = tensors[f"{name}.index"].to(torch.int64)
        if idx.dim() != 1 or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            raise ModelFileError(f"{where} has flat indices that are not sorted and unique")
    if idx.numel() != int(record.get("active", -1)):
        raise ModelFileError(f"{where} has {idx.numel()} indices but records {record.get('active')} active entries")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= layer.numel):
        raise ModelFileError(f"{where} has indices outside its {layer.numel} entries")
    mu = tensors[f"{name}.mu"].reshape(-1)
    if mu.numel() != idx.numel() or not mu.is_floating_point() or not bool(torch.isfinite(mu).all()):
        raise ModelFileError(f"{where}: mu has {mu.numel()} values for {idx.numel()} indices or is not finite")
    rho = None
    if layer.bayesian:
        sigma = tensors[f"{name}.sigma"].reshape(-1)
        if sigma.numel() != idx.numel() or not sigma.is_floating_point():
            raise ModelFileError(f"{where}: sigma has {sigma.numel()} values for {idx.numel()} indices")
        if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
            raise ModelFileError(f"{where}: sigma holds negative or non-finite values")
        # In float64 so that sigma -> rho -> softplus(rho) returns sigma to float32 rounding.
        rho = rho_from_sigma(sigma.double(), layer.sigma_param).float()
    layer.set_support(idx, mu.float(), rho)
    return names


# ------------------------------------------------------------------ run directories and checkpoints

def checkpoint_metadata(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The file metadata of a run, from its saved config (what ``Trainer.file_metadata`` writes)."""
    from ssvi_cli.config import from_dict

    cfg = from_dict(config)
    return {
        "architecture": {"name": cfg.model.name, "widths": list(cfg.model.widths),
                         "bayesian": cfg.bayesian, "sigma_param": cfg.bayes.sigma_param},
        "training": {"method": cfg.sparse.method, "sparsity": cfg.sparse.sparsity,
                     "criterion": cfg.sparse.criterion, "epochs": cfg.train.epochs,
                     "seed": cfg.train.seed, "config": cfg.to_dict()},
        "metrics": metrics,
    }


def model_from_checkpoint(path: Path, metrics: Optional[dict[str, Any]] = None) -> LoadedModel:
    """Rebuild a model from a training checkpoint (``torch.load`` with ``weights_only=True``)."""
    from ssvi_cli.checkpoint import CheckpointError, load_checkpoint, load_model_state

    data = load_checkpoint(Path(path))
    try:
        meta = checkpoint_metadata(data["config"], metrics or {})
        spec = DataSpec.from_dict(data["data_spec"])
    except (KeyError, TypeError, ValueError, DataError) as exc:
        raise CheckpointError(f"checkpoint {path} lacks a usable config or data description ({exc})") from None
    arch = meta["architecture"]
    model = build_model(arch["name"], spec.input_shape, spec.num_classes,
                        LayerFactory(arch["bayesian"], arch["sigma_param"]), arch["widths"])
    load_model_state(model, data["model"])
    model.eval()
    meta.update(format="ssvi-checkpoint", version=int(data.get("version", 1)), layout="checkpoint",
                dtype="float32", data_spec=spec.to_dict(), path=str(path))
    return LoadedModel(model, spec, meta)


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        return {}
    try:
        return json.loads(summary.read_text(encoding="utf-8"))
    except ValueError:
        return {}


def load_model(path: Path) -> LoadedModel:
    """A model from an ssvi file, a checkpoint (``.pt``), or a run directory (its model file, else
    its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return read_model_file(path / MODEL_FILE)
        from ssvi_cli.checkpoint import latest_checkpoint

        return model_from_checkpoint(latest_checkpoint(path), _run_metrics(path))
    if path.suffix == ".pt":
        return model_from_checkpoint(path, _run_metrics(path.parent.parent))
    return read_model_file(path)


def export_model(source: Path, out: Path, dtype: str = "float32", dense: bool = False) -> dict[str, Any]:
    """Write the model at ``source`` (file, checkpoint or run dir) to ``out``; returns a size report."""
    loaded = load_model(source)
    meta = loaded.meta
    written = write_model_file(loaded.model, out, architecture=meta["architecture"],
                               data_spec=loaded.spec.to_dict(), training=meta["training"],
                               metrics=meta["metrics"], dtype=dtype, dense=dense)
    head = read_header(out)
    return {"source": str(source), "output": str(out), "layout": "dense" if dense else "compact",
            "dtype": dtype, "file_bytes": written, **size_totals(head)}


def dense_equivalent_bytes(head: dict[str, Any]) -> int:
    """Tensor bytes of a dense float32 BNN file of the same model, by arithmetic (no header):
    8 bytes per weight (mu and sigma; 4 for a deterministic layer) plus the dense tensors in float32."""
    total = 0
    layer_names = set()
    for rec in head["meta"]["layers"]:
        total += math.prod(rec["shape"]) * (8 if rec["bayesian"] else 4)
        layer_names.add(rec["name"])
    for name, info in head["tensors"].items():
        owner, _, part = name.rpartition(".")
        if owner in layer_names and part in ("mu", "sigma", "index"):
            continue
        item = 4 if info["dtype"] in ("F16", "BF16", "F32") else _ST_DTYPES[info["dtype"]]
        total += math.prod(info["shape"]) * item
    return total


def size_totals(head: dict[str, Any]) -> dict[str, Any]:
    """Active and total weights, bytes on disk, dense-equivalent bytes and the ratio, from a header."""
    layers = head["meta"]["layers"]
    active = sum(int(r["active"]) for r in layers)
    total = sum(math.prod(r["shape"]) for r in layers)
    dense = dense_equivalent_bytes(head)
    return {"active_weights": active, "total_weights": total, "density": active / total if total else 1.0,
            "file_bytes": head["file_bytes"], "header_bytes": head["header_bytes"],
            "dense_bnn_bytes": dense, "compression_ratio": dense / head["file_bytes"]}
