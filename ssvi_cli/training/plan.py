"""The pre-flight of a run, done once: names checked, device resolved, data loaded, the model card
written down and every layer's support size planned (which also proves the architecture fits the
data and the sparsity leaves every layer an active weight). The trainer trusts a :class:`RunPlan`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ssvi_cli.config import DEVICES, Config, ConfigError, apply_overrides, check_imagefolder_keys, from_dict, image_folder
from ssvi_cli.core.allocation import InitSpec, initialise, layer_densities
from ssvi_cli.core.criteria import REMOVAL_CRITERIA
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.data import DataSplits, build_dataset, check_dataset_name, get_spec
from ssvi_cli.data.images import whole_jpegs
from ssvi_cli.data.spec import DataError, DataSpec, absent_classes, jpegs_read_whole
from ssvi_cli.modelfile import ModelCard, build_model, with_attention_of
from ssvi_cli.models import SSVIModel, check_model_name, check_trains_on, input_error
from ssvi_cli.runs.rundir import RunBusy, RunDir
from ssvi_cli.training.init_posterior import Posterior, check_apart, names_trained_model, read_posterior


def resolve_device(name: str, sweep_advice: bool = True) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a config error (exit code 2),
    saying how a sweep's cells take the CPU (``sweep_advice``: for a training run, which may be one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available; use --device cpu"
                          + (" (in a sweep: --set train.device=cpu)" if sweep_advice else ""))
    if name not in DEVICES:
        gpu = name.partition(":")[2] if name.startswith("cuda:") else ""
        raise ConfigError(f"unknown device {name!r}; valid values are: {', '.join(DEVICES)}"
                          + (f" (pick the GPU with CUDA_VISIBLE_DEVICES={gpu} and --device cuda)" if gpu else ""))
    return torch.device(name)


def check_names(cfg: Config, given: Any = ()) -> DataSpec:
    """Resolve every registry name of ``cfg`` (errors list the valid names); reads no file. Then the
    image folder keys (``config.IMAGEFOLDER_KEYS``) set for another dataset are refused: it has its own
    shape and normalisation and would ignore them (a new run's config; a recorded one is not checked):
    each one off its default, and each one in ``given`` (the keys the command line set) at any value.
    Returns the data's spec, as read to check its name (an image folder is scanned once)."""
    check_model_name(cfg.model.name)
    spec = check_dataset_name(cfg.data.name, cfg.data)
    REMOVAL_CRITERIA.get(cfg.sparse.criterion)
    check_imagefolder_keys(cfg, given)
    return spec


def load_data(cfg: Config) -> DataSplits:
    return build_dataset(cfg.data.name, augment=cfg.data.augment, max_test=cfg.data.max_test, **_data_args(cfg))


def _data_args(cfg: Config) -> dict[str, Any]:
    """The arguments the run's splits are drawn with (``build_dataset``, ``train_size``)."""
    d = cfg.data
    return dict(data_dir=Path(d.data_dir).expanduser() if d.data_dir else None, download=d.download,
                val_fraction=d.val_fraction, seed=cfg.train.seed, max_train=d.max_train, options=d)


def plan_densities(model: SSVIModel, cfg: Config) -> dict[str, float]:
    """Density per sparse layer (stem dense when asked, the rest uniform or ERK)."""
    return layer_densities(sparse_layers(model), cfg.density, cfg.sparse.allocation, cfg.model.dense_stem)


SIZES_TRIED = (32, 48, 64, 75, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384, 448, 512)


def check_input_fits(skeleton: SSVIModel, cfg: Config, shape: tuple[int, ...]) -> None:
    """One eval-mode forward of the shapes-only (meta) model on the data's input shape: a model that
    cannot take inputs this small (VGG's pooling, Inception's 75 pixels, ViT's 224) is refused before
    a run folder is written."""
    reason = input_error(skeleton.eval(), shape)
    if reason is not None:
        size = "x".join(str(s) for s in shape)
        # The first of the usual image sizes that the model takes (shapes only, so quick), for the hint.
        fits = next((n for n in SIZES_TRIED if len(shape) == 3 and n > shape[-1]
                     and input_error(skeleton, (shape[0], n, n)) is None), None)
        takes = f"data.image_size={fits}, the first of the usual sizes it takes" if fits else "data.image_size"
        hint = (f" (set {takes})" if image_folder(cfg.data.name) is not None else
                " (pick a model that takes images this small, or train on larger ones: an image folder with "
                f"{takes}, say)")
        raise ConfigError(f"{cfg.model.name} cannot take the data's {size} inputs{hint}: {reason}")


def make_model(cfg: Config, spec: Any) -> SSVIModel:
    """The configured architecture for data ``spec``, with empty supports. It keeps its description
    (``model.ssvi_card``, as :func:`ssvi_cli.load` does), so that ``ssvi_cli.save`` writes ssvi's own
    architecture and the data's description: a file ``ssvi infer`` and ``ssvi evaluate`` can run."""
    card = ModelCard.from_config(cfg, spec)
    model = build_model(card, kernel=cfg.train.kernel)
    model.ssvi_card = card
    return model


def init_spec(cfg: Config) -> InitSpec:
    b = cfg.bayes
    return InitSpec(mu_std=b.mu_init_std, mu_init=b.mu_init, sigma_mean=b.sigma_init_mean,
                    sigma_std=b.sigma_init_std, sigma_param=b.sigma_param)


def init_model(model: SSVIModel, cfg: Config, generator: torch.Generator,
               densities: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Draw the initial supports and values of ``model``; returns the densities used."""
    densities = densities if densities is not None else plan_densities(model, cfg)
    initialise(model, densities, init_spec(cfg), generator)
    return densities


@dataclass
class RunPlan:
    """Everything a run needs before its first step; ``checkpoint`` is set for a resumed run."""

    cfg: Config
    device: torch.device
    splits: DataSplits
    card: ModelCard
    densities: dict[str, float]
    run_dir: Optional[RunDir] = None
    checkpoint: Optional[dict[str, Any]] = None
    init_weights: Optional[dict[str, Any]] = None  # model.init_from's state_dict, checked
    init_note: Optional[str] = None  # what model.init_from loaded, adapted and re-initialised
    init_posterior: Optional[Posterior] = None  # model.init_from's trained ssvi model, checked
    checkpoints_seen: Optional[list[Path]] = None  # a resumed run's checkpoint files when it was read
    resumed_from: Optional[Path] = None  # the checkpoint a resumed run was read from
    origin: Optional[str] = None  # where a new run's config came from, in words (config.yaml's first comment)

    @property
    def data_note(self) -> str:
        """A note when the test split holds none of some classes, which the final scores then leave out."""
        return "\n".join(f"note: {n}" for n in absent_classes(self.splits.test, self.splits.spec, "the test split"))

    @classmethod
    def new(cls, cfg: Config, run_dir: Optional[RunDir | Path] = None,
            splits: Optional[DataSplits] = None, device: Optional[str] = None,
            progress: bool = False, given: Any = (), world_size: int = 1) -> "RunPlan":
        """A new run of ``cfg``; nothing is written (the run directory is claimed by the caller) but
        torch.hub's cache, when ``model.init_from`` names torchvision weights not yet there
        (``progress``: show that download's progress bar). ``given``: the keys the command line set
        (:func:`check_names`); ``world_size``: the processes that will train it, each of which needs
        a training example."""
        spec = check_names(cfg, given)
        dev = resolve_device(device or cfg.train.device)
        init = None
        # before the data: a model the run cannot take is refused first
        posterior = trained_start(cfg, spec, world_size, run_dir.path if isinstance(run_dir, RunDir) else run_dir)
        if posterior is not None:
            cfg = apply_overrides(cfg, {"model.init_from": posterior.source})  # the file read, as the run records it
        splits = splits or load_data(cfg)
        check_feeds(len(splits.train), world_size)
        card = ModelCard.from_config(cfg, splits.spec)
        densities = planned_densities(card, cfg, splits.spec)
        if cfg.model.init_from and posterior is None:  # after the cheap checks: this may download
            from ssvi_cli.training.init_weights import load_init_weights

            init = load_init_weights(cfg, splits.spec, progress)
            # The card records the weights resolved (torchvision:DEFAULT names a version).
            cfg = apply_overrides(cfg, {"model.init_from": init.source})
            card = ModelCard.from_config(cfg, splits.spec)
        return cls(cfg, dev, splits, card, densities, _run_dir(run_dir), init_weights=init.state if init else None,
                   init_note=posterior.note if posterior else init.describe() if init else None,
                   init_posterior=posterior)

    @classmethod
    def resume(cls, run_dir: RunDir | Path, device: Optional[str] = None,
               splits: Optional[DataSplits] = None) -> "RunPlan":
        """Continue the run in ``run_dir`` from its latest checkpoint (read once, here)."""
        run = _run_dir(run_dir)
        seen, (cfg, dev, data, path) = run.checkpoints(), _resumable(run, device)
        was = data["data_spec"] if isinstance(data.get("data_spec"), dict) else {"name": cfg.data.name}  # begun before:
        with whole_jpegs(jpegs_read_whole(was.get("name"), was.get("reduced_jpeg"))):  # as it began
            splits = splits or load_data(cfg)
        splits.spec.check_same_normalisation(data.get("data_spec"))  # measured again: the images unchanged
        card = with_attention_of(ModelCard.from_config(cfg, splits.spec), data.get("model"))  # as it began
        return cls(cfg, dev, splits, card, {}, run, data, checkpoints_seen=seen, resumed_from=path)

    def check_unchanged(self) -> None:
        """For a resumed run, once its lock is held: no other process finished it or wrote a newer
        checkpoint while this one read it (:class:`RunBusy` otherwise)."""
        run = self.run_dir
        if run is not None and self.checkpoints_seen is not None and (
                run.finished() or run.checkpoints() != self.checkpoints_seen):
            raise RunBusy(f"--resume {run.path}: another process wrote the run while this one read it; "
                          "run this again once it has ended")

    def set_aside_unreadable(self) -> list[Path]:
        """For a resumed run, once its lock is held: the checkpoints newer than the one it resumes
        from (unreadable, passed over) renamed ``NAME.unreadable``, beside the others, so that
        ``train.keep_checkpoints`` counts only readable ones and never prunes the one it resumed from."""
        if self.run_dir is None or self.resumed_from is None:
            return []
        listed = self.run_dir.checkpoints()
        moved = []
        for path in listed[listed.index(self.resumed_from) + 1:] if self.resumed_from in listed else []:
            target = path.with_name(path.name + ".unreadable")
            if target.exists():  # one set aside before, at the same step: keep both
                target = path.with_name(f"{path.name}.{int(time.time())}.unreadable")
            path.replace(target)
            moved.append(target)
        return moved

    def build_model(self) -> SSVIModel:
        return build_model(self.card, kernel=self.cfg.train.kernel)


def planned_densities(card: ModelCard, cfg: Config, spec: DataSpec) -> dict[str, float]:
    """Every layer's density, planned on a shapes-only model (the supports of any size without their
    memory: a RegNet is built on the CPU), and the model's forward checked on the data's input shape."""
    with torch.device("meta"):
        skeleton = build_model(card)
        densities = plan_densities(skeleton, cfg)
    check_input_fits(skeleton, cfg, spec.input_shape)
    check_trains_on(skeleton, cfg.model.name, spec.input_shape, cfg.train.batch_size,
                    "one example per step (train.batch_size=1); give each process a batch of 2 or more")
    return densities


def trained_start(cfg: Config, spec: DataSpec, world_size: int = 1, out: Optional[Path] = None) -> Optional[Posterior]:
    """The trained ssvi model ``model.init_from`` names, checked against the run ``cfg`` plans on data
    ``spec`` for ``world_size`` processes and its folder ``out`` (which must not hold the model); None
    when it names no such model."""
    if not names_trained_model(cfg.model.init_from):
        return None
    check_apart(cfg.model.init_from, out)
    card = ModelCard.from_config(cfg, spec)
    return read_posterior(cfg, spec, card, planned_densities(card, cfg, spec), world_size)


def check_data_present(cfg: Config) -> None:
    """A torchvision dataset's files are there (fetched now where ``data.download`` allows): both of
    its splits are read, as a run would read them. The embedded digits and an image folder (whose
    scan :func:`check_names` did) have nothing more to check."""
    from ssvi_cli.data import load_raw, reads_data_dir

    d = cfg.data
    if reads_data_dir(d.name):
        for train in (True, False):  # SVHN fetches each split's file apart
            load_raw(d.name, data_dir=Path(d.data_dir).expanduser() if d.data_dir else None, download=d.download,
                     train=train, options=d)


def check_feeds(n_train: int, world_size: int) -> None:
    """Refuse a training split too small to give each of ``world_size`` processes an example (an
    epoch of no step)."""
    if n_train == 0:
        raise ConfigError("the training split is empty")
    if n_train < world_size:
        raise ConfigError(f"the training split has {n_train} example{'s' if n_train > 1 else ''}, too few to give "
                          f"each of {world_size} processes one; train on at most {n_train} process{'es' if n_train > 1 else ''}")


def preflight(cfg: Config, device: Optional[str] = None, given: Any = (), world_size: int = 1,
              out: Optional[Path] = None) -> Optional[str]:
    """What :meth:`RunPlan.new` checks, short of decoding the training images: for a launcher that
    checks a run once, where its errors read well, before its processes start and before ``--force``
    removes an old run (the training split's size from its labels); ``out``: the new run's folder,
    which must not hold the trained model ``--init-from`` names. Returns the file that model was read
    from, for the processes to read (a run still training writes newer checkpoints), else None."""
    spec = check_names(cfg, given)
    resolve_device(device or cfg.train.device)
    posterior = trained_start(cfg, spec, world_size, out)  # before the data, as RunPlan.new
    if posterior is None:  # (trained_start planned the densities itself)
        planned_densities(ModelCard.from_config(cfg, spec), cfg, spec)
    check_data_present(cfg)
    if world_size > 1:
        from ssvi_cli.data.splits import train_size

        check_feeds(train_size(cfg.data.name, **_data_args(cfg)), world_size)
    if cfg.model.init_from and posterior is None:  # read (or fetched) once here
        from ssvi_cli.training.init_weights import load_init_weights

        load_init_weights(cfg, spec, progress=True)
    return posterior.source if posterior is not None else None


def preflight_resume(run_dir: RunDir | Path, device: Optional[str] = None, world_size: int = 1) -> None:
    """What :meth:`RunPlan.resume` checks, short of decoding the training images (see :func:`preflight`):
    a checkpoint to resume, the device, the data, and a recorded global batch that feeds ``world_size``
    processes."""
    run = _run_dir(run_dir)
    cfg, _, data, _ = _resumable(run, device, warn=False)  # an unreadable newest one: rank 0 says so
    check_data_present(cfg)
    batch = int((data.get("state") or {}).get("global_batch") or 0)
    if batch and batch < world_size:
        raise ConfigError(f"{run.path} was trained with a global batch of {batch}, which cannot feed {world_size} "
                          f"processes; resume it on at most {batch} (--nproc {batch})")
    if batch and world_size > 1 and batch // world_size < 2 <= batch:  # a share of one where there were more
        spec = get_spec(cfg.data.name, cfg.data)
        with torch.device("meta"):
            skeleton = build_model(ModelCard.from_config(cfg, spec))
        check_trains_on(skeleton, cfg.model.name, spec.input_shape, 1, f"one example per process, which a global batch "
                        f"of {batch} over {world_size} processes gives; resume it on at most {batch // 2} (--nproc {batch // 2})")


def _resumable(run: RunDir, device: Optional[str],
               warn: bool = True) -> tuple[Config, torch.device, dict[str, Any], Path]:
    """The run's config, device, newest readable checkpoint and its path, its image folder (in the flat
    layout) checked unchanged before any image is decoded (``warn``: of an unreadable newer one)."""
    path, data = run.load_latest(warn=warn)
    cfg = run.checked_config(from_dict(data["config"]), path)
    dev = resolve_device(device or cfg.train.device)
    try:
        recorded = DataSpec.from_dict(data["data_spec"])
    except (KeyError, TypeError, DataError):  # a checkpoint without a readable data description
        recorded = None
    if recorded is not None and recorded.files_digest:
        recorded.check_same_files(get_spec(cfg.data.name, cfg.data))
    return cfg, dev, data, path


def _run_dir(path: Optional[RunDir | Path]) -> Optional[RunDir]:
    if path is None or isinstance(path, RunDir):
        return path
    return RunDir(path)
