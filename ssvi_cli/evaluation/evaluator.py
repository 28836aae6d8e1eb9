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

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ssvi_cli import fileio
from ssvi_cli import metrics as M
from ssvi_cli.config import MAX_SAMPLES
from ssvi_cli.evaluation.inputs import SPLITS, EvalData
from ssvi_cli.modelfile import ModelCard
from ssvi_cli.prediction import MODES, PASS_BATCH, PASS_SEED, is_bayesian, model_device, predict_pass
from ssvi_cli.runs.provenance import provenance

FORMAT = "ssvi-evaluation"
VERSION = 1
DEFAULT_SAMPLES = 30
DEFAULT_BATCH_SIZE = PASS_BATCH
ECE_BINS = 15


@dataclass(frozen=True)
class EvalOptions:
    """How to predict: split, Monte Carlo sample counts (ascending), mode, seed and batch size."""

    split: str = "test"
    samples: tuple[int, ...] = (DEFAULT_SAMPLES,)
    mode: str = "mc"
    seed: int = PASS_SEED
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
        if int(part) > MAX_SAMPLES:
            raise ValueError(f"--samples {part} is more Monte Carlo draws per input than ssvi takes ({MAX_SAMPLES:,})")
        counts.append(int(part))
    return tuple(sorted(set(counts)))


# --------------------------------------------------------------------------- prediction


def _pass_seed(seed: int, name: str) -> int:
    """A seed per prediction pass: ``seed`` itself for the in-distribution split."""
    return seed if name == "" else (seed + zlib.crc32(name.encode())) % (2**63)


def _predict(model: torch.nn.Module, dataset: Dataset, opts: EvalOptions, mode: str, seed: int,
             on_batch: Optional[Callable[[int], None]]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(probs (N, C), labels (N,), sample_probs (S, N, C) or None) in float64, with the RNG forked."""
    out = predict_pass(model, dataset, model_device(model), opts.max_samples, mode, seed=seed, batch_size=opts.batch_size,
                       on_batch=on_batch)
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
    """Every uncertainty score available (mutual information needs two Monte Carlo draws or more)."""
    return {name: M.uncertainty_score(name, probs, sample_probs) for name in M.UNCERTAINTY_SCORES
            if M.has_spread(sample_probs) or name != "mutual_information"}


def _ood_block(scores_in: dict[str, np.ndarray], scores_out: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {name: M.ood_metrics(scores_in[name], scores_out[name]) for name in scores_in}


# Bytes at the peak per class probability of one draw of one input an evaluation keeps: float32 as
# drawn and as gathered over batches, float64 for the metrics, and their temporaries (measured on the
# digits MLP: 49 bytes from S = 1,000 to S = 10,000).
DRAW_BYTES = 48


def draws_memory(data: EvalData, opts: EvalOptions, num_classes: int, mode: str) -> int:
    """About the memory, in bytes, that the Monte Carlo draws of an evaluation take at their peak: every
    draw's class probabilities of every input are kept, for the mutual information and for the
    numbers at each smaller S (0 for the mean network)."""
    return DRAW_BYTES * opts.max_samples * num_classes * data.total_items() if mode == "mc" else 0


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
    ``scores`` -> score name -> auroc, aupr_in, aupr_out, fpr_at_95_tpr at S), ``ood_sources``
    (set -> digest, for the user's own folders and arrays: ``ood_sets.source_digest``), ``per_samples``
    (one entry per S with ``samples, metrics, ood``, its ``ood`` shaped as the top one but at S = 1 without
    mutual information), ``reliability`` (15-bin diagram at S),
    ``notes``, ``provenance`` (``runs.provenance``) and ``seconds``. A model that is not Bayesian is evaluated as the mean network.
    """
    start = time.perf_counter()
    info = dict(model_info or {})
    notes = list(data.notes)
    mode = effective_mode(model, opts.mode)
    if mode != opts.mode:
        notes.append("the model is deterministic, so it was evaluated as the mean network (S does not apply)")
    counts: list[Optional[int]] = list(opts.samples) if mode == "mc" else [None]

    probs, labels, draws = _predict(model, data.inputs, opts, mode, _pass_seed(opts.seed, ""), on_batch)
    ood_pred = {name: _predict(model, ds, opts, mode, _pass_seed(opts.seed, data.ood_seed_keys.get(name, name)),
                               on_batch)
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
                            "ood": {name: {"n": int(len(ood_pred[name][0])), "scores": _ood_block(scores_in, scores_ood[name])}
                                    for name in scores_ood}})
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
        "ood": head["ood"],  # the same block as each per_samples entry's
        "ood_sources": data.ood_sources,
        "per_samples": per_samples,
        "reliability": M.reliability_bins(p, labels, opts.n_bins),
        "notes": notes,
        "provenance": provenance(model_device(model)),  # what produced these numbers: versions, processor, threads
        "seconds": round(time.perf_counter() - start, 3),
    }
    return EvaluationResult(report=fileio.json_ready(report), scores_in=scores_in, scores_ood=scores_ood)


def describe_model(path: Path, card: ModelCard) -> dict[str, Any]:
    """The ``model_info`` of a report (plus ``path``): what was trained, how, on what."""
    return {"path": str(path), **card.describe()}
