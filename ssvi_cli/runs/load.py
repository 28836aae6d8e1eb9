"""A model from wherever it is: a model file, a training checkpoint, or a run directory (its model
file, else its newest readable checkpoint), always as a :class:`~ssvi_cli.modelfile.LoadedModel` with its
card; and ``export``, which writes any of them as a model file.

Checkpoints are read with ``torch.load(..., weights_only=True)``; the training code is not imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ssvi_cli.config import ConfigError, from_dict
from ssvi_cli.data.spec import DataError, DataSpec
from ssvi_cli.modelfile import (FileInfo, LoadedModel, ModelCard, build_model, read_header, read_model_file,
                                size_totals, write_model_file)
from ssvi_cli.runs import checkpoint as ckpt
from ssvi_cli.runs.rundir import RunDir

__all__ = ["LoadedModel", "export_model", "load_model", "model_from_checkpoint"]


def model_from_checkpoint(path: Path, metrics: Optional[dict[str, Any]] = None, kernel: str = "auto",
                          data: Optional[dict[str, Any]] = None) -> LoadedModel:
    """Rebuild a model from a training checkpoint (``data``: its contents, when already read)."""
    if data is None:
        data = ckpt.load_checkpoint(Path(path))
    try:
        card = ModelCard.from_config(from_dict(data["config"]), DataSpec.from_dict(data["data_spec"]), metrics)
    except (KeyError, TypeError, ValueError, DataError, ConfigError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path} lacks a usable config or data description ({exc})") from None
    model = build_model(card, kernel=kernel)
    ckpt.load_model_state(model, data["model"])
    model.eval()
    info = FileInfo(str(path), format=ckpt.FORMAT, version=int(data.get("version", 1)), layout="checkpoint")
    return LoadedModel(model, card, info)


def load_model(path: Path, kernel: str = "auto") -> LoadedModel:
    """A model from an ssvi file, a checkpoint (``.pt``), or a run directory (its model file, else
    its newest readable checkpoint), on the CPU in eval mode."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if run.model_file.is_file():
            return read_model_file(run.model_file, kernel=kernel)
        path, data = run.load_latest("reading")  # an unreadable newest one is passed over, with a warning
        return model_from_checkpoint(path, run.read_summary(), kernel, data)
    if path.suffix == ".pt":
        return model_from_checkpoint(path, RunDir(path.parent.parent).read_summary(), kernel)
    return read_model_file(path, kernel=kernel)


def export_model(source: Path, out: Path, dtype: str = "float32", dense: bool = False) -> dict[str, Any]:
    """Write the model at ``source`` (file, checkpoint or run dir) to ``out``; returns a size report."""
    loaded = load_model(source)
    written = write_model_file(loaded.model, out, loaded.card, dtype=dtype, dense=dense)
    return {"source": str(source), "output": str(out), "layout": "dense" if dense else "compact",
            "dtype": dtype, "file_bytes": written, **size_totals(read_header(out))}
