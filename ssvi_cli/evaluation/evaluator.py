"""Evaluate a trained model: accuracy, calibration, uncertainty and out-of-distribution detection.

One prediction pass per dataset with the largest requested number of Monte Carlo samples S keeps
every per-sample softmax; the numbers for a smaller S are computed from the first S draws of that
same pass (a prefix of the draws is itself an S-sample Monte Carlo estimate), so a table over
``S = 1, 5, 10, 30`` costs one pass at S = 30. Every pass is seeded on its own (the in-distribution
split with ``seed``, each OOD set with ``seed`` and its name), so a number does not depend on which
other sets were requested, and the caller's global RNG is left untouched.

The result is a plain dict with stable keys (see :func:`evaluate`); nothing here prints.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssvi_cli import metrics as M
from ssvi_cli.data import DataError, DataSpec, build_dataset, check_dataset_name, data_config_for, get_spec
from ssvi_cli.data.ood import ood_names
from ssvi_cli.evaluation.ood_sets import load_requests, resolve_requests
from ssvi_cli.modelfile import NO_DATASET, ModelCard, Training
from ssvi_cli.prediction import MODES, is_bayesian, predict_loader

FORMAT = "ssvi-evaluation"
VERSION = 1
DEFAULT_SAMPLES = 30
DEFAULT_BATCH_SIZE = 500
SPLITS = ("test", "val")
ECE_BINS = 15
OOD_MAX_ITEMS = 2000  # items drawn (seeded) from each OOD set


@dataclass(frozen=True)
class EvalOptions:
    """How to predict: split, Monte Carlo sample counts (ascending), mode, seed and batch size."""

    split: str = "test"
    samples: tuple[int, ...] = (DEFAULT_SAMPLES,)
    mode: str = "mc"
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    n_bins: int = ECE_BINS

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; valid splits are: {', '.join(SPLITS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes are: {', '.join(MODES)}")
        if not self.samples or list(self.samples) != sorted(set(self.samples)) or self.samples[0] < 1:
            raise ValueError(f"samples must be distinct positive counts in ascending order, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")

    @property
    def max_samples(self) -> int:
        return self.samples[-1]


@dataclass
class EvalData:
    """The in-distribution split and the OOD sets, already shaped like the model's inputs."""

    dataset: str
    split: str
    inputs: Dataset
    ood: dict[str, Dataset] = field(default_factory=dict)

    def total_items(self) -> int:
        """Images to predict in all (for a progress bar)."""
        return len(self.inputs) + sum(len(d) for d in self.ood.values())


@dataclass
class EvaluationResult:
    """``report``: the JSON-ready dict. The arrays feed the plots (all at the largest S).

    ``scores_in[score]`` and ``scores_ood[set][score]`` are per-example uncertainty scores.
    """

    report: dict[str, Any]
    scores_in: dict[str, np.ndarray]
    scores_ood: dict[str, dict[str, np.ndarray]]


def parse_samples(text: str) -> tuple[int, ...]:
    """``"1,5,10,30"`` -> (1, 5, 10, 30): positive integers, sorted, duplicates dropped."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError(f"--samples expects positive integers such as 30 or 1,5,10,30, got {text!r}")
    counts = []
    for part in parts:
        if not part.isdigit() or int(part) < 1:
            raise ValueError(
                f"--samples expects positive integers separated by commas (e.g. 1,5,10,30); {part!r} is not one"
            )
        counts.append(int(part))
    return tuple(sorted(set(counts)))


# --------------------------------------------------------------------------- data


def _training_data_settings(training: Training) -> tuple[dict[str, Any], Optional[int]]:
    """The data section of the recorded training config and the training seed (empty/None if the
    model does not record them)."""
    config = training.config or {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    seed = training.seed if training.seed is not None else (config.get("train") or {}).get("seed")
    return dict(data), seed


def _check_compatible(name: str, spec: DataSpec, model_spec: DataSpec) -> None:
    if spec.input_shape != model_spec.input_shape or spec.num_classes != model_spec.num_classes:
        raise DataError(
            f"dataset {name} has inputs {spec.input_shape} and {spec.num_classes} classes, but the model "
            f"takes {model_spec.input_shape} and predicts {model_spec.num_classes} classes"
            + (f"; score it as out-of-distribution with --ood {name} instead" if name in ood_names() else "")
        )
    placeholders = tuple(str(i) for i in range(model_spec.num_classes))  # ssvi.save without class_names
    named = tuple(model_spec.class_names) != placeholders
    if named and spec.class_names and tuple(spec.class_names) != tuple(model_spec.class_names):
        differ = next(i for i, (a, b) in enumerate(zip(spec.class_names, model_spec.class_names)) if a != b)
        fix = ("name the class folders as the model's classes" if name.startswith("imagefolder:")
               else f"score it as out-of-distribution with --ood {name}" if name in ood_names()
               else "evaluate on the model's own dataset")
        raise DataError(
            f"dataset {name}'s classes are not the model's: class {differ} is {spec.class_names[differ]!r} there and "
            f"{model_spec.class_names[differ]!r} in the model; labels are matched by position, so the scores would "
            f"be wrong ({fix})")


def load_eval_data(
    model_spec: DataSpec,
    training: Training,
    *,
    dataset: Optional[str] = None,
    split: str = "test",
    ood: tuple[str, ...] = (),
    data_dir: Optional[Path] = None,
    download: bool = False,
    seed: int = 0,
    ood_max_items: Optional[int] = OOD_MAX_ITEMS,
) -> EvalData:
    """Load the split to evaluate (default: the model's own dataset) and every OOD set.

    ``val`` is the training-time validation split: the same ``val_fraction``, ``max_train`` and
    seed as the training config recorded in ``training``. A model trained on part of the classes
    is evaluated on those classes, and ``ood`` may ask for the others (``heldout``); its values may
    also be ``NAME=DIR`` or a path (``data.ood.parse_ood``). Every name and path is checked before
    any file is read, so a typo fails at once with the list of valid names.
    """
    name = dataset or model_spec.name
    if name == NO_DATASET:
        raise DataError("the model file records no dataset (ssvi.save without dataset=); name the one to evaluate "
                        "on with --dataset")
    check_dataset_name(name, data_config_for(model_spec))
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
    requests = resolve_requests(ood, model_spec, name)
    current = get_spec(name, data_config_for(model_spec))
    _check_compatible(name, current, model_spec)
    model_spec.check_same_files(current)  # a changed flat image folder would redraw its test split

    settings, train_seed = _training_data_settings(training)
    if split == "val" and train_seed is None:
        raise DataError("the model file does not record its training config, so its validation split "
                        "cannot be rebuilt; use --split test")
    recorded_dir = settings.get("data_dir")
    root = data_dir if data_dir is not None else (Path(recorded_dir).expanduser() if recorded_dir else None)
    splits = build_dataset(
        name, data_dir=root, download=download, val_fraction=float(settings.get("val_fraction", 0.1)),
        seed=int(train_seed or 0), augment=False, max_train=settings.get("max_train"),
        options=data_config_for(model_spec, settings),
    )
    if split == "val" and len(splits.val) == 0:
        raise DataError("the model was trained on its whole training set (data.val_fraction 0), so it has "
                        "no validation split; use --split test")
    ood_sets = load_requests(requests, model_spec, root, download, seed, ood_max_items, splits.heldout)
    inputs = getattr(splits, split).normalised_as(model_spec)  # as the file records (ssvi.save mean=), as infer does
    return EvalData(dataset=name, split=split, inputs=inputs, ood=ood_sets)


# --------------------------------------------------------------------------- prediction


def _pass_seed(seed: int, name: str) -> int:
    """A seed per prediction pass: ``seed`` itself for the in-distribution split."""
    return seed if name == "" else (seed + zlib.crc32(name.encode())) % (2**63)


def _predict(model: torch.nn.Module, dataset: Dataset, opts: EvalOptions, mode: str, seed: int,
             on_batch: Optional[Callable[[int], None]]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(probs (N, C), labels (N,), sample_probs (S, N, C) or None) in float64, with the RNG forked."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=False, num_workers=0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batches = iter(loader)  # a DataLoader iterator draws its own base seed: seed after it
        torch.manual_seed(seed)
        out = predict_loader(model, batches, device, opts.max_samples, mode, keep_samples=True, on_batch=on_batch)
    sample_probs = out["sample_probs"]
    return (out["probs"].double().numpy(), out["labels"].numpy(),
            None if sample_probs is None else sample_probs.double().numpy())


def _at(sample_probs: Optional[np.ndarray], probs: np.ndarray, s: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The model average and draws of the first ``s`` Monte Carlo samples (mean mode: unchanged)."""
    if sample_probs is None:
        return probs, None
    draws = sample_probs[:s]
    return draws.mean(axis=0), draws


def _scores(probs: np.ndarray, sample_probs: Optional[np.ndarray]) -> dict[str, np.ndarray]:
    """Every uncertainty score available (mutual information needs Monte Carlo draws)."""
    return {name: M.uncertainty_score(name, probs, sample_probs) for name in M.UNCERTAINTY_SCORES
            if sample_probs is not None or name != "mutual_information"}


def _ood_block(scores_in: dict[str, np.ndarray], scores_out: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {name: M.ood_metrics(scores_in[name], scores_out[name]) for name in scores_in}


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, nan/inf to None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def effective_mode(model: torch.nn.Module, mode: str) -> str:
    """The mode an evaluation runs in: ``mc`` becomes ``mean`` for a model with nothing to sample."""
    return "mean" if mode == "mc" and not is_bayesian(model) else mode


def evaluate(
    model: torch.nn.Module,
    data: EvalData,
    opts: EvalOptions,
    *,
    model_info: Optional[dict[str, Any]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> EvaluationResult:
    """Predict the split and every OOD set once and compute all metrics.

    Report keys: ``format, version, model (path), model_info, dataset, split, n, mode, samples``
    (S of the headline numbers; None for the mean network), ``sample_counts, seed, batch_size,
    n_bins, metrics`` (``metrics.classification_metrics`` at S), ``ood`` (set -> ``n`` and
    ``scores`` -> score name -> auroc, aupr_in, aupr_out, fpr_at_95_tpr at S), ``per_samples``
    (one entry per S with ``samples, metrics, ood``), ``reliability`` (15-bin diagram at S),
    ``notes`` and ``seconds``. A model that is not Bayesian is evaluated as the mean network.
    """
    start = time.perf_counter()
    info = dict(model_info or {})
    notes: list[str] = []
    mode = effective_mode(model, opts.mode)
    if mode != opts.mode:
        notes.append("the model is deterministic, so it was evaluated as the mean network (S does not apply)")
    counts: list[Optional[int]] = list(opts.samples) if mode == "mc" else [None]

    probs, labels, draws = _predict(model, data.inputs, opts, mode, _pass_seed(opts.seed, ""), on_batch)
    ood_pred = {name: _predict(model, ds, opts, mode, _pass_seed(opts.seed, name), on_batch)
                for name, ds in data.ood.items()}

    # Every number at a given S, the headline ones included, comes from the same S-draw average,
    # so the reliability diagram, the plotted scores and the metrics agree to the last bit
    # (p, scores_in and scores_ood keep the values of the last pass: the largest S).
    per_samples = []
    for s in counts:
        p, d = _at(draws, probs, s or 1)
        scores_in = _scores(p, d)
        scores_ood = {name: _scores(*_at(o_draws, o_probs, s or 1)) for name, (o_probs, _, o_draws) in ood_pred.items()}
        per_samples.append({"samples": s, "metrics": M.classification_metrics(p, labels, d, opts.n_bins),
                            "ood": {name: _ood_block(scores_in, scores_ood[name]) for name in scores_ood}})
    head = per_samples[-1]
    report = {
        "format": FORMAT,
        "version": VERSION,
        "model": info.pop("path", None),
        "model_info": info,
        "dataset": data.dataset,
        "split": data.split,
        "n": int(len(labels)),
        "mode": mode,
        "samples": head["samples"],
        "sample_counts": counts if mode == "mc" else [],
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "n_bins": opts.n_bins,
        "metrics": head["metrics"],
        "ood": {name: {"n": int(len(o_probs)), "scores": head["ood"][name]}
                for name, (o_probs, _, _) in ood_pred.items()},
        "per_samples": per_samples,
        "reliability": M.reliability_bins(p, labels, opts.n_bins),
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return EvaluationResult(report=_clean(report), scores_in=scores_in, scores_ood=scores_ood)


def describe_model(path: Path, card: ModelCard) -> dict[str, Any]:
    """The ``model_info`` of a report (plus ``path``): what was trained, how, on what."""
    return {"path": str(path), **card.describe()}
