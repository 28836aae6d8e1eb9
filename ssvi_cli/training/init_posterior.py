"""``model.init_from`` naming a trained ssvi model (a model file, a run directory or a training
checkpoint): a new run whose posterior starts where that model's ended, to train it longer, on other
data of the same shape and classes, or with another schedule.

Each sparse layer starts with the model's support, means and sigma; every other tensor (biases,
batch norm) with the model's values. The model must be the run's architecture for the run's input
shape and classes (by name, in order), and keep as many weights in each layer as the run plans (its
sparsity and allocation). A deterministic model (RigL) starts a Bayesian run's sigma from the
configured init; a Bayesian model's sigma is left out of a deterministic run. The optimizer and the
schedules start afresh. ``ssvi train`` takes the model's recorded config as the run's unless
``--preset`` is given; the run records the file it read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ssvi_cli.config import Config, ConfigError, image_folder
from ssvi_cli.core.allocation import active_count
from ssvi_cli.core.gaussian import rho_from_sigma
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.core.state import load_tensors
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.modelfile import LoadedModel, ModelCard, build_model, read_header
from ssvi_cli.modelfile.header import ModelFileError, is_model_file
from ssvi_cli.modelfile.writer import dense_state
from ssvi_cli.models import TORCHVISION, model_entry
from ssvi_cli.runs.checkpoint import is_checkpoint


def names_trained_model(source: Optional[str]) -> bool:
    """Whether ``model.init_from`` names a trained ssvi model: a directory (a run's), a file whose
    safetensors metadata says it is an ssvi model file, or an ssvi training checkpoint. Reads only
    the file's header (a checkpoint: its archive's record of names, never unpickled)."""
    if not source or source.startswith(TORCHVISION):
        return False
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    return is_checkpoint(path) or is_model_file(path)


def what_else(source: str) -> str:
    """What the file at ``source`` is, when :func:`names_trained_model` says it is no trained ssvi
    model: plain weights (a safetensors file), a torch.save file of either format, a damaged or
    cut-off one, another zip archive, or none of these. Reads the header and the archive's index only."""
    from ssvi_cli.modelfile.header import ZIP_MAGIC, ZIP_WORDS, safetensors_header, zip_kind

    path = Path(source).expanduser()
    try:
        with open(path, "rb") as fh:
            head, after = fh.read(8), fh.read(1)
            size = path.stat().st_size
    except OSError:
        return "a file that cannot be read"
    if size == 0:
        return "an empty file"
    if safetensors_header(path) is not None:
        return "a safetensors file without ssvi metadata (plain weights)"
    if head[:4] == ZIP_MAGIC:
        kind = zip_kind(path)
        return ("a torch.save file without an ssvi checkpoint's record" if kind == "torch"
                else ZIP_WORDS[kind])
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return "a pickle file (torch.save's legacy format: plain weights, say)"
    if len(head) == 8 and int.from_bytes(head, "little") > size - 8 and after == b"{":
        return "a cut-off safetensors file (its header runs past the end of the file)"
    return "neither a safetensors file nor a torch.save file"


def recorded_config(source: str) -> Config:
    """The config the trained model at ``source`` was trained with: a run directory's ``config.yaml``,
    a training checkpoint's config, or the config a model file's card records."""
    path = Path(source).expanduser().absolute()
    source = str(path)
    if path.is_dir():
        from ssvi_cli.runs.rundir import RunDir

        run = RunDir(path)
        if not run.config_file.is_file():
            from ssvi_cli.runs.checkpoint import run_below

            inner = run_below(path, lambda p: RunDir(p).is_run())
            raise ConfigError(f"--init-from {source} is a folder but not a run (no {run.config_file.name})"
                              + (f"; it holds runs, such as {inner}" if inner is not None else ""))
        cfg = run.read_config()
    elif is_checkpoint(path):
        from ssvi_cli.config import from_dict
        from ssvi_cli.runs.checkpoint import CheckpointError, load_checkpoint

        try:
            cfg = from_dict(load_checkpoint(path)["config"])
        except CheckpointError as exc:
            raise ConfigError(f"--init-from: {exc}") from None
        except (KeyError, TypeError, ValueError):
            cfg = None
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
    source: str  # the file read: a run directory's model file or newest checkpoint
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


def read_posterior(cfg: Config, spec: DataSpec, card: ModelCard, densities: dict[str, float],
                   world_size: int = 1) -> Posterior:
    """The trained model ``cfg.model.init_from`` names, checked against the run ``card`` and
    ``densities`` plan of ``world_size`` processes: a one-line :class:`ConfigError` for the first
    difference."""
    from ssvi_cli.runs.checkpoint import CheckpointError
    from ssvi_cli.runs.load import load_with_support
    from ssvi_cli.runs.rundir import RunDirError

    source = str(cfg.model.init_from)
    try:
        loaded = load_with_support(Path(source).expanduser())
    except (ModelFileError, CheckpointError, RunDirError) as exc:
        raise ConfigError(f"--init-from: {exc}") from None
    had = loaded.card
    _check_architecture(source, had, card, spec)
    if tuple(had.data.class_names) != tuple(spec.class_names):
        at = next(i for i, (a, b) in enumerate(zip(had.data.class_names, spec.class_names)) if a != b)
        raise ConfigError(f"--init-from {source} predicts the classes {_listed(had.data.class_names)}; this run's data "
                          f"({spec.name}) have {_listed(spec.class_names)}: class {at} is {had.data.class_names[at]!r} "
                          f"there and {spec.class_names[at]!r} here")
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
    read = str(Path(loaded.file.path).resolve())
    note = (f"note: starting from the trained model {read} ({what}"
            + (f"; {unfinished}" if unfinished else "") + "): its supports and values"
            + (f", {sigma}" if sigma else "") + f"; a new schedule of {_epochs(cfg.train.epochs)} and a fresh optimizer")
    again = [f"the learning rates ({cfg.optim.schedule} from lr {cfg.optim.lr:g})"] + \
        (["the KL warm-up"] if cfg.bayes.kl_warmup and cfg.method.bayesian else []) + \
        (["the subspace schedule"] if cfg.method.moves_support else [])
    note += (f"\nnote: {', '.join(again[:-1]) + ' and ' + again[-1] if len(again) > 1 else again[0]} start again: "
             "a short run may end below the model it starts from (--lr sets a lower peak)")
    theirs = t.run_config()
    if (theirs is not None and theirs.data.name == cfg.data.name and cfg.data.val_fraction > 0
            and (theirs.train.seed, theirs.data.val_fraction) != (cfg.train.seed, cfg.data.val_fraction)
            and not _own_validation(cfg)):
        note += (f"\nnote: the validation split is carved otherwise than the model's (seed {cfg.train.seed}, "
                 f"val_fraction {cfg.data.val_fraction:g}; the model's: {theirs.train.seed}, "
                 f"{theirs.data.val_fraction:g}): images it trained on are among this run's validation images, "
                 "whose numbers read high")
    batch, processes = had.metrics.get("global_batch"), had.metrics.get("world_size")
    if isinstance(batch, int) and batch != cfg.train.batch_size * world_size:
        on = f" on {processes} processes" if isinstance(processes, int) and processes > 1 else ""
        note += (f"\nnote: the model trained with a global batch of {batch}{on}, this run with "
                 f"{cfg.train.batch_size * world_size} (--batch-size, per process)")
    return Posterior(loaded, read, note)


def _own_validation(cfg: Config) -> bool:
    """Whether the run's data have their own validation split (an image folder's ``val/``), which no
    seed carves."""
    from ssvi_cli.data.sources import source

    try:
        return source(cfg.data.name, cfg.data).load_val is not None
    except Exception:  # noqa: BLE001 - the data's own errors come where the run reads them
        return False


def _listed(names: Any) -> str:
    shown = ", ".join(map(str, list(names)[:6]))
    return f"[{shown}{', ...' if len(names) > 6 else ''}]"


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _check_architecture(source: str, had: ModelCard, card: ModelCard, spec: DataSpec) -> None:
    a, b = had.architecture, card.architecture
    if a.name != b.name:
        raise ConfigError(f"--init-from {source} holds architecture {a.name}; this run builds {b.name} (--model {a.name}; "
                          "without --preset a run takes the trained model's own config)")
    if model_entry(a.name).widths and a.widths != b.widths:  # the others ignore model.widths
        raise ConfigError(f"--init-from {source} holds an MLP of widths {list(a.widths)}; this run's are "
                          f"{list(b.widths)} (--set model.widths={','.join(map(str, a.widths))})")
    if tuple(had.data.input_shape) != tuple(spec.input_shape):
        c, h, w = (list(had.data.input_shape) + [0, 0, 0])[:3]
        fits = c in (1, 3) and h == w and image_folder(spec.name) is not None  # the folder read at the model's size
        raise ConfigError(f"--init-from {source} takes inputs of shape {list(had.data.input_shape)}; this run's "
                          f"data ({spec.name}) are {list(spec.input_shape)}"
                          + (f" (--set data.channels={c} --set data.image_size={h} reads the folder so)" if fits else ""))
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


SUPPORT_KEYS = ("sparse.method", "sparse.sparsity", "sparse.allocation", "model.dense_stem")  # plan_densities' settings


def _settings(had: ModelCard, cfg: Config) -> str:
    """The settings that size the layers' supports, where the trained model's and the run's differ."""
    from ssvi_cli.config import flat_dict

    theirs = had.training.run_config()
    if theirs is None:
        return (f"the model was trained with {had.training.method} at sparsity {had.training.sparsity}; a run from a "
                "trained model keeps the number of weights of each layer")
    old, new = flat_dict(theirs), flat_dict(cfg)
    sparse = not theirs.method.dense and not cfg.method.dense  # a dense method has no use for the others
    keys = [k for k in SUPPORT_KEYS if old[k] != new[k] and (sparse or k == "sparse.method")]

    def shown(values: dict[str, Any]) -> str:
        return ", ".join(f"{k}={str(values[k]).lower() if isinstance(values[k], bool) else values[k]}" for k in keys)
    if not keys:
        return "a run from a trained model keeps the number of weights of each layer"
    return (f"the model was trained with {shown(old)}, this run has {shown(new)}; a run from a trained model keeps "
            "the number of weights of each layer")


def check_apart(source: Optional[str], out: Optional[Path]) -> None:
    """Refuse a new run's folder ``out`` that is, or holds, the trained model it starts from: a
    ``--force`` would remove the model before a process that reads it later (``--nproc``) has."""
    if not names_trained_model(source) or out is None:
        return
    src, folder = Path(str(source)).expanduser().resolve(), Path(out).expanduser().resolve()
    if src == folder or folder in src.parents:
        raise ConfigError(f"--out {out} holds the trained model --init-from starts from; give the new run a "
                          "folder of its own")
