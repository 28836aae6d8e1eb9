"""``model.init_from`` naming a trained ssvi model (a model file or a run directory): a new run whose
posterior starts where that model's ended, to train it longer, on other data of the same shape and
classes, or with another schedule.

Each sparse layer starts with the model's support, means and sigma; every other tensor (biases,
batch norm) with the model's values. The model must be the run's architecture for the run's input
shape and classes, and keep as many weights in each layer as the run plans (its sparsity and
allocation). A deterministic model (RigL) starts a Bayesian run's sigma from the configured init; a
Bayesian model's sigma is left out of a deterministic run. The optimizer and the schedule start
afresh. ``ssvi train`` takes the model's recorded config as the run's unless ``--preset`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ssvi_cli.config import Config, ConfigError
from ssvi_cli.core.allocation import active_count
from ssvi_cli.core.gaussian import rho_from_sigma
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.core.state import load_tensors
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.modelfile import LoadedModel, ModelCard, build_model, read_header
from ssvi_cli.modelfile.header import FORMAT_NAME, ModelFileError
from ssvi_cli.modelfile.writer import dense_state

TORCHVISION = "torchvision:"


def names_trained_model(source: Optional[str]) -> bool:
    """Whether ``model.init_from`` names a trained ssvi model: a directory (a run's), or a file whose
    safetensors metadata says it is an ssvi model file. Reads only the file's header."""
    if not source or source.startswith(TORCHVISION):
        return False
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return False
            import json

            header = json.loads(fh.read(size).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def recorded_config(source: str) -> Config:
    """The config the trained model at ``source`` was trained with: a run directory's ``config.yaml``,
    or the config a model file's card records."""
    path = Path(source).expanduser()
    if path.is_dir():
        from ssvi_cli.runs.rundir import RunDir

        run = RunDir(path)
        if not run.config_file.is_file():
            raise ConfigError(f"--init-from {source} is a folder but not a run (no {run.config_file.name})")
        cfg = run.read_config()
    else:
        try:
            cfg = ModelCard.from_metadata(read_header(path)["meta"]).training.run_config()
        except ModelFileError as exc:
            raise ConfigError(f"--init-from: {exc}") from None
        except ValueError as exc:  # a card that does not read
            raise ConfigError(f"--init-from {source} has a corrupted header ({exc})") from None
    if cfg is None:
        raise ConfigError(f"--init-from {source} records no config this ssvi reads; give the run's --preset "
                          "and flags as they were")
    return cfg


@dataclass(frozen=True)
class Posterior:
    """A trained model checked against a run's plan, ready to start the run's model."""

    loaded: LoadedModel
    source: str
    note: str

    def start(self, model: nn.Module) -> None:
        """Give ``model`` (built and initialised as a fresh run's) the trained supports, values and
        dense tensors; sigma stays the fresh one where the trained model has none."""
        trained = dict(sparse_layers(self.loaded.model))
        with torch.no_grad():
            for name, layer in sparse_layers(model):
                old = trained[name]
                rho = None
                if layer.bayesian:
                    rho = (rho_from_sigma(old.sigma().detach().double(), layer.sigma_param).float()
                           if old.bayesian else layer.rho.detach().clone())
                layer.set_support(old.idx.detach().clone(), old.mu.detach().clone(), rho)
            load_tensors(model, {k: v.clone() for k, v in dense_state(self.loaded.model).items()})


def read_posterior(cfg: Config, spec: DataSpec, card: ModelCard, densities: dict[str, float]) -> Posterior:
    """The trained model ``cfg.model.init_from`` names, checked against the run ``card`` and
    ``densities`` plan: a one-line :class:`ConfigError` for the first difference."""
    from ssvi_cli.runs.load import load_model

    source = str(cfg.model.init_from)
    try:
        loaded = load_model(Path(source).expanduser())
    except ModelFileError as exc:
        raise ConfigError(f"--init-from: {exc}") from None
    had = loaded.card
    _check_architecture(source, had, card, spec)
    with torch.device("meta"):
        skeleton = build_model(card)
    _check_layers(source, loaded.model, skeleton, densities, had, cfg)
    t = had.training
    what = f"{t.method}" + (f" at sparsity {t.sparsity:g}" if t.sparsity else "") + \
        (f", {_epochs(t.epochs)}" if isinstance(t.epochs, int) else "")
    sigma = ("its sigma left out (a deterministic run)" if had.architecture.bayesian and not cfg.method.bayesian
             else "sigma from the configured init (the model is deterministic)"
             if cfg.method.bayesian and not had.architecture.bayesian else "")
    unfinished = t.unfinished_note()
    note = (f"note: starting from the trained model {source} ({what}"
            + (f"; {unfinished}" if unfinished else "") + "): its supports and values"
            + (f", {sigma}" if sigma else "") + f"; a new schedule of {_epochs(cfg.train.epochs)} and a fresh optimizer")
    return Posterior(loaded, source, note)


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _check_architecture(source: str, had: ModelCard, card: ModelCard, spec: DataSpec) -> None:
    a, b = had.architecture, card.architecture
    if a.name != b.name:
        raise ConfigError(f"--init-from {source} holds a {a.name} model; this run builds {b.name} "
                          f"(--model {a.name}, or leave --preset out to train with the model's own config)")
    if a.widths != b.widths:
        raise ConfigError(f"--init-from {source} holds a {a.name} of widths {list(a.widths)}; this run's are "
                          f"{list(b.widths)} (--set model.widths={','.join(map(str, a.widths))})")
    if tuple(had.data.input_shape) != tuple(spec.input_shape):
        raise ConfigError(f"--init-from {source} takes inputs of shape {list(had.data.input_shape)}; this run's "
                          f"data ({spec.name}) are {list(spec.input_shape)}")
    if had.data.num_classes != spec.num_classes:
        raise ConfigError(f"--init-from {source} has {had.data.num_classes} classes; this run's data "
                          f"({spec.name}) have {spec.num_classes}")


def _check_layers(source: str, trained: nn.Module, skeleton: nn.Module, densities: dict[str, float],
                  had: ModelCard, cfg: Config) -> None:
    """Same sparse layers with the planned number of weights, same other tensors."""
    old, new = dict(sparse_layers(trained)), dict(sparse_layers(skeleton))
    if set(old) != set(new):
        odd = sorted(set(old) ^ set(new))[:3]
        raise ConfigError(f"--init-from {source}: its sparse layers are not this run's (differing: {', '.join(odd)}); "
                          "a setting that makes a layer dense or sparse (model.dense_stem) differs")
    for name, layer in new.items():
        if tuple(old[name].weight_shape) != tuple(layer.weight_shape):
            raise ConfigError(f"--init-from {source}: layer {name!r} has shape {list(old[name].weight_shape)}, "
                              f"this run's {list(layer.weight_shape)}")
        planned = active_count(layer.numel, densities[name])
        if old[name].active != planned:
            raise ConfigError(f"--init-from {source} keeps {old[name].active:,} weights of layer {name!r}, this run "
                              f"plans {planned:,}: {_settings(had, cfg)}")
    mine, theirs = dense_state(skeleton), dense_state(trained)
    for key, value in mine.items():
        if key not in theirs or tuple(theirs[key].shape) != tuple(value.shape):
            raise ConfigError(f"--init-from {source} lacks tensor {key!r} of shape {list(value.shape)} of this run's model")


def _settings(had: ModelCard, cfg: Config) -> str:
    """The sparsity settings of the trained model and of the run, for a count that differs."""
    theirs: Any = had.training.run_config()

    def of(c: Optional[Config], method: Optional[str], sparsity: Optional[float]) -> str:
        if c is None:
            return f"{method} at sparsity {sparsity:g}" if sparsity is not None else f"{method}"
        if c.method.dense:
            return f"{c.sparse.method} (dense)"
        return f"{c.sparse.method} at sparsity {c.sparse.sparsity:g} (allocation {c.sparse.allocation})"
    return (f"the model was trained with {of(theirs, had.training.method, had.training.sparsity)}, this run is "
            f"{of(cfg, cfg.sparse.method, cfg.sparse.sparsity)}; a run from a trained model keeps the number of "
            "weights of each layer")
