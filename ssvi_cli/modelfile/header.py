"""The model file's header: format name and version, layouts and dtypes, and a validated read of the
metadata and tensor table without touching tensor data (what ``inspect`` and size reports use).

Spec: docs/FORMAT.md. Every failure is a one-line :class:`ModelFileError` naming the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

FORMAT_NAME = "ssvi"
FORMAT_VERSION = 2  # the newest this ssvi reads and writes; a file is written with the oldest that holds it
KINDS = {"linear": 1, "conv2d": 1, "conv1d": 2}  # each layer kind and the format version that brought it
# (version 2 also brought nn.MultiheadAttention split into four layers: writer.version_for)
LAYOUTS = ("compact", "dense")
DTYPES = ("float32", "float16", "bfloat16")
ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # safetensors' names of DTYPES
FLOAT_ST = frozenset({"F64", "F32", "F16", "BF16"})
# Bytes per element of every safetensors dtype name.
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
_JSON_KEYS = ("architecture", "data_spec", "training", "metrics", "layers")


class ModelFileError(Exception):
    """A model file that is missing, truncated, corrupted, not ours or from a newer format version."""


def _prefix_looks_like_json(raw: bytes) -> bool:
    return raw[:2] in (b'{"', b"{}")


def safetensors_header(path: Path) -> Optional[dict[str, Any]]:
    """The JSON header of a safetensors file, read, not validated; None for a file that is none (a
    header declared larger than the file or than 100 MB is not read)."""
    try:
        with open(path, "rb") as fh:
            n, size = int.from_bytes(fh.read(8), "little"), Path(path).stat().st_size
            if not 2 <= n <= min(size - 8, 100_000_000):
                return None
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def is_model_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose metadata names the ssvi format (a damaged ssvi file
    is still one, for :func:`read_header` to refuse in words)."""
    meta = (safetensors_header(path) or {}).get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first bytes, as torch.save writes them
_NOT_A_ZIP = ("{path} is a zip archive (what torch.save writes: a training checkpoint, say), not an ssvi model "
              "file; ssvi export writes one from an ssvi training checkpoint named *.pt")
# What a zip archive that holds no ssvi checkpoint is, by zip_kind (a torch.save one is said where it is met).
ZIP_WORDS = {"numpy": "a NumPy .npz archive (what np.savez writes)",
             "damaged": "a damaged or cut-off zip archive (a torch.save file, say)",
             "other": "a zip archive that neither torch.save nor np.savez wrote"}


def zip_kind(path: Path) -> str:
    """What wrote the zip archive at ``path``, from its index: ``"torch"`` (torch.save: a ``data.pkl``
    entry), ``"numpy"`` (np.savez: ``.npy`` entries only), ``"other"``, or ``"damaged"`` (no readable
    index: a cut-off file, say)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "damaged"
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return "torch"
    return "numpy" if names and all(name.endswith(".npy") for name in names) else "other"


def _not_a_model_zip(path: Path) -> ModelFileError:
    kind = zip_kind(path)
    if kind == "torch":
        return ModelFileError(_NOT_A_ZIP.format(path=path))
    what = ZIP_WORDS[kind]
    return ModelFileError(f"{path} is {what}, not an ssvi model file")


def read_header(path: Path) -> dict[str, Any]:
    """Metadata and tensor shapes/dtypes of an ssvi file, validated, without reading tensor data.

    Returns ``{"path", "file_bytes", "header_bytes", "meta", "tensors"}`` where ``meta`` has the
    JSON fields decoded and ``tensors`` maps names to ``{"dtype", "shape", "bytes"}``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist")
    if path.is_dir():  # a run's folder, say
        inner = path / "model.safetensors"
        raise ModelFileError(f"{path} is a folder, not a model file" + (f"; its run's model file is {inner}"
                                                                         if inner.is_file() else ""))
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
        if head[:4] == ZIP_MAGIC:
            raise _not_a_model_zip(path)
        raise ModelFileError(f"{path} is not an ssvi model file (not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: arrays nested 100,000 deep
        if _prefix_looks_like_json(raw):
            raise ModelFileError(f"{path} has a corrupted header (invalid JSON)") from None
        if head[:4] == ZIP_MAGIC:
            raise _not_a_model_zip(path) from None
        raise ModelFileError(f"{path} is not an ssvi model file (not a safetensors file)") from None
    raw_meta = header.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or raw_meta.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path} is a safetensors file but not an ssvi model file (its metadata lacks format "
            f"'{FORMAT_NAME}'); write model files with 'ssvi export' or ssvi_cli.save"
        )
    try:
        meta = _decode_meta(path, raw_meta)
        tensors = _check_tensor_table(path, header, size - 8 - n)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # a field of another JSON type
        raise ModelFileError(f"{path} has a corrupted header ({type(exc).__name__}: {exc})") from None
    stored = ST_NAMES[meta["dtype"]]
    other = next((name for name, t in tensors.items() if t["dtype"] in FLOAT_ST and t["dtype"] != stored), None)
    if other is not None:  # every value of a file has the precision its header gives (FORMAT.md)
        raise ModelFileError(f"{path} has a corrupted header (dtype {meta['dtype']!r}, but tensor {other!r} is "
                             f"{tensors[other]['dtype']})")
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
        except (ValueError, RecursionError):
            raise ModelFileError(f"{path} has a corrupted header (metadata {key!r} is not valid JSON)") from None
    if not isinstance(meta["layers"], list) or not isinstance(meta["architecture"], dict):
        raise ModelFileError(f"{path} has a corrupted header (layers or architecture malformed)")
    for record in meta["layers"]:
        _check_layer_record(path, record)
    return meta


def _check_layer_record(path: Path, record: Any) -> None:
    """A layer's record as the writer makes it: a name, a shape of positive sizes, a count of active
    entries, a bool ``bayesian`` and a string index code (which the reader then checks)."""
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    name = record.get("name") if isinstance(record, dict) else None
    shape = record.get("shape") if isinstance(record, dict) else None
    if (not isinstance(name, str) or not isinstance(shape, list) or not shape
            or not all(count(s) and s > 0 for s in shape)):
        raise ModelFileError(f"{path} has a corrupted header (a layer record without a name and shape: {record!r:.80})")
    active = record.get("active")
    if not count(active) or active < 0:  # one above the shape's size: the reader names the shape
        raise ModelFileError(f"{path} has a corrupted header (layer {name!r} records {active!r} active entries)")
    if not isinstance(record.get("bayesian"), bool) or not isinstance(record.get("index"), str):
        raise ModelFileError(f"{path} has a corrupted header (layer {name!r}: 'bayesian' or 'index' malformed)")


def _check_tensor_table(path: Path, header: dict[str, Any], data_bytes: int) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    end_max = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            item = ST_DTYPES[dtype]
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


# ------------------------------------------------------------------ sizes

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
        item = 4 if info["dtype"] in ("F16", "BF16", "F32") else ST_DTYPES[info["dtype"]]
        total += math.prod(info["shape"]) * item
    return total


def size_totals(head: dict[str, Any]) -> dict[str, Any]:
    """Active and total weights, bytes on disk (of them, tensor bytes), dense-equivalent tensor bytes
    and their ratio to the file's tensor bytes, from a header;
    ``bayesian``: whether a layer holds σ (else the dense equivalent is a network of means alone)."""
    layers = head["meta"]["layers"]
    active = sum(int(r["active"]) for r in layers)
    total = sum(math.prod(r["shape"]) for r in layers)
    dense = dense_equivalent_bytes(head)
    return {"active_weights": active, "total_weights": total, "density": active / total if total else 1.0,
            "file_bytes": head["file_bytes"], "header_bytes": head["header_bytes"],
            "tensor_bytes": head["file_bytes"] - head["header_bytes"], "dense_bnn_bytes": dense,
            # Tensors to tensors: a header (names, the model card) is not what sparsity saves.
            "compression_ratio": dense / max(head["file_bytes"] - head["header_bytes"], 1),
            "bayesian": any(bool(r.get("bayesian")) for r in layers)}
