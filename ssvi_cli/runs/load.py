"""A model from wherever it is: a model file, a training checkpoint, or a run directory (its model
file, else its newest readable checkpoint), always as a :class:`~ssvi_cli.modelfile.LoadedModel` with its
card; and ``export``, which writes any of them as a model file.

Checkpoints are read with ``torch.load(..., weights_only=True)``; the training code is not imported.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from ssvi_cli.config import ConfigError, from_dict
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.data.spec import DataError, DataSpec
from ssvi_cli.modelfile import (FileInfo, LoadedModel, ModelCard, build_model, read_header, read_model_file,
                                size_totals, with_attention_of, write_model_file)
from ssvi_cli.modelfile.reader import read_tensors
from ssvi_cli.runs import checkpoint as ckpt
from ssvi_cli.runs.rundir import RunDir

__all__ = ["LoadedModel", "export_model", "load_model", "load_with_support", "model_from_checkpoint"]


def model_from_checkpoint(path: Path, metrics: Optional[dict[str, Any]] = None, kernel: str = "auto",
                          data: Optional[dict[str, Any]] = None) -> LoadedModel:
    """Rebuild a model from a training checkpoint (``data``: its contents, when already read)."""
    if data is None:
        data = ckpt.load_checkpoint(Path(path))
    try:
        card = ModelCard.from_config(from_dict(data["config"]), DataSpec.from_dict(data["data_spec"]), metrics)
    except (KeyError, TypeError, ValueError, DataError, ConfigError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path} lacks a usable config or data description ({exc})") from None
    state, epochs = data.get("state") or {}, card.training.epochs
    if isinstance(state, dict) and isinstance(state.get("epoch"), int) and isinstance(epochs, int) \
            and state["epoch"] < epochs:  # before its last epoch: said wherever the model goes (a file it is saved to)
        unfinished = {"epoch": state["epoch"], "step": int(state.get("step") or 0)}
        card = replace(card, training=replace(card.training, unfinished=unfinished))
    card = with_attention_of(card, data.get("model"))  # a run from before the attention split: whole
    model = build_model(card, kernel=kernel)
    ckpt.load_model_state(model, data.get("model"), where=f"checkpoint {path}")
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
        return model_from_checkpoint(path, _own_summary(run, data), kernel, data)
    if path.suffix.lower() == ".pt":
        data = ckpt.load_checkpoint(path)
        folder = path.resolve().parent
        run = RunDir(folder.parent) if folder.name == ckpt.CHECKPOINT_DIR else None
        return model_from_checkpoint(path, _own_summary(run, data) if run else {}, kernel, data)
    return read_model_file(path, kernel=kernel)


def _own_summary(run: RunDir, data: dict[str, Any]) -> dict[str, Any]:
    """The run's final summary if the checkpoint is the one it was measured on (the run's last step,
    under the run's own config), else nothing: an earlier checkpoint, or one copied in from another
    run (another seed of a sweep, say), has no test numbers of its own."""
    summary = run.read_summary()
    state = data.get("state")
    if (not isinstance(summary, dict) or not isinstance(state, dict) or state.get("step") is None
            or summary.get("steps") != state["step"]):
        return {}
    try:
        checkpoint_cfg = from_dict(data["config"])
    except (KeyError, TypeError, ValueError, ConfigError):
        return {}
    return summary if run.read_config() == checkpoint_cfg else {}


def load_with_support(source: Path) -> LoadedModel:
    """:func:`load_model`, with a dense-layout file's point masses taken off its layers' supports: the
    model the file was written from, on its own support (what ``export`` writes and ``--init-from``
    starts from)."""
    loaded = load_model(source)
    if loaded.file.layout == "dense":  # a dense file written again stores the same zeros
        _drop_empty_entries(loaded.model, Path(loaded.file.path))
    return loaded


def export_model(source: Path, out: Path, dtype: str = "float32", dense: bool = False) -> dict[str, Any]:
    """Write the model at ``source`` (file, checkpoint or run dir) to ``out``; returns a size report."""
    loaded = load_with_support(source)
    written = write_model_file(loaded.model, out, loaded.card, dtype=dtype, dense=dense)
    totals = size_totals(read_header(out))  # a dense file stores every weight: its header counts them all
    active = sum(layer.active for _, layer in sparse_layers(loaded.model))  # the model's own support
    return {"source": str(source), "output": str(out), "layout": "dense" if dense else "compact",
            "dtype": dtype, **totals, "file_bytes": written, "stored_weights": totals["active_weights"],
            "active_weights": active, "density": active / totals["total_weights"] if totals["total_weights"] else 1.0,
            "unfinished": loaded.card.training.unfinished_note()}


def point_masses(path: Path, layers: list[tuple[str, Any]]) -> dict[str, Tensor]:
    """Per sparse layer (``layers``: named, as read from the dense file at ``path``), which stored entries are
    point masses at zero, mu = sigma = 0 (mu = 0 in a deterministic layer): the weights off the support
    of the model the file was written from. Zeros are read from the file: a sigma of 0 loads as rho's
    floor."""
    tensors = read_tensors(path)
    empty = {}
    for name, layer in layers:
        zero = tensors[f"{name}.mu"].reshape(-1) == 0
        empty[name] = zero & (tensors[f"{name}.sigma"].reshape(-1) == 0) if layer.bayesian else zero
    return empty


def _drop_empty_entries(model: nn.Module, path: Path) -> None:
    """A dense file (at ``path``, already read into ``model``) holds every weight, those off the
    support as point masses at zero; a compact file written from it keeps only the entries that hold
    a value, so the sparse support comes back instead of a density-1 model. The mean predictions do
    not change."""
    layers = list(sparse_layers(model))
    drop_point_masses(layers, point_masses(path, layers))


def drop_point_masses(layers: list[tuple[str, Any]], empty: dict[str, Tensor]) -> None:
    """Take each layer's point masses (``empty``, from :func:`point_masses`; a layer it leaves out has
    none) off its support, in place."""
    for name, layer in layers:
        keep = ~empty[name] if name in empty else None
        if keep is not None and not bool(keep.all()):
            rho = layer.rho.detach()[keep] if layer.bayesian else None
            layer.set_support(layer.idx[keep], layer.mu.detach()[keep], rho)
