"""One ``ssvi bench`` run: build every variant's trainer, time their steps interleaved, measure their
trainable state and FLOPs, then write the SSVI models as compact and dense BNN files and time Monte
Carlo prediction from both (see ``ssvi_cli.bench`` and ``docs/BENCH.md``)."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ssvi_cli.bench.models import (KERNELS, SYNTHETIC_NOTE, BenchModel, BenchOptions, bench_config, check_input,
                                   synthetic_splits)
from ssvi_cli.bench.timing import Variant, summarise, time_interleaved
from ssvi_cli.machine import cpu_model
from ssvi_cli.config import PAPER_DELTA_T, Config, load_preset
from ssvi_cli.core import flops as flopsmod
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.core.subspace import largest_moving
from ssvi_cli.data.spec import DataSplits


def _trainer(cfg: Config, splits: DataSplits, root: Path, key: str):
    from ssvi_cli.training.trainer import Trainer

    run_dir = root / key.replace(" ", "_")
    run_dir.mkdir(parents=True)
    return Trainer.create(cfg, run_dir, splits=splits)


def _train_step(trainer, x: torch.Tensor, y: torch.Tensor, at: Optional[int]) -> None:
    """One training step; ``at`` (from :func:`_subspace_at`) forces a subspace step by putting the step
    counter on that update step (capture of the dense gradient, then remove-and-add instead of the
    optimizer step); None: a parameter step."""
    if at is not None:
        trainer.state.step = at
    trainer.train_step(x, y)


def _subspace_at(trainer) -> int:
    """The update step a subspace row times: the first of the run's that records no criteria overlap,
    as all but ten of a long run's do. Found once, outside the timed step (a remove-and-add step keeps
    every layer's active count, so the most active entries of a moving layer stay as they are)."""
    return _plain_update(trainer.schedule, largest_moving(trainer.model))


def _plain_update(schedule, largest: int) -> int:
    """The first update step of ``schedule`` that records no criteria overlap (``largest``: the most
    active entries of a moving layer; the first update step when every one records it: a short
    schedule)."""
    for k in range(1, schedule.updates + 1):
        if not schedule.records_overlap(k * schedule.delta_t, largest):
            return k * schedule.delta_t
    return schedule.delta_t


def run_bench(options: BenchOptions, on_progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the whole benchmark and return its JSON-ready result (see ``docs/BENCH.md``)."""
    opts = options.resolved()
    bm = opts.model_spec()
    check_input(bm, opts.batch_size)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="ssvi-bench-") as tmp:
            return _run(bm, opts, Path(tmp), on_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(bm: BenchModel, opts: BenchOptions, root: Path,
         on_progress: Optional[Callable[[str], None]]) -> dict[str, Any]:
    from ssvi_cli.training.plan import resolve_device
    from ssvi_cli.training.records import trainable_bytes

    say = on_progress or (lambda _msg: None)
    device = resolve_device(opts.device)
    splits, x, y = synthetic_splits(bm, opts.batch_size, opts.seed)
    x, y = x.to(device), y.to(device)
    recipe_dt = recipe_delta_t(bm.preset)
    no_update = 10**9  # parameter steps only

    say("building training variants")
    train: list[Variant] = []
    trainers: dict[str, Any] = {}
    plans = [("dense", "dense", 0.0, "auto", no_update), ("vi", "vi", 0.0, "auto", no_update)]
    for s in opts.sparsities:
        plans += [(f"ssvi {s:g} {k}", "ssvi", s, k, no_update) for k in KERNELS]
        plans.append((f"ssvi {s:g} subspace", "ssvi", s, "auto", recipe_dt))
    for key, method, s, kernel, dt in plans:
        cfg = bench_config(bm, opts, method, s, kernel, dt)
        tr = _trainer(cfg, splits, root, key)
        trainers[key] = tr
        step = "parameter" if dt == no_update else "subspace"
        at = _subspace_at(tr) if step == "subspace" else None
        train.append(Variant(key, (lambda tr=tr, at=at: _train_step(tr, x, y, at)),
                             {"variant": key, "method": method, "sparsity": s, "kernel": kernel, "step": step}))

    say("timing training steps")
    time_interleaved(train, opts.repeats, opts.warmup, lambda step: say(f"training steps, {step}"), device)

    geometry = flopsmod.model_geometry(trainers["vi"].model, bm.input_shape)
    train_rows = []
    for v in train:
        row = summarise(v)
        tr = trainers[v.key]
        parts = trainable_bytes(tr.model, tr.optimizer)
        row["trainable_bytes"] = parts.pop("total")
        row["trainable_parts"] = parts  # params, grads, optimizer, index
        row["compared_bytes"] = _compared_bytes(row)
        dens = {n: l.density for n, l in sparse_layers(tr.model)}
        layers = flopsmod.method_layers(geometry, row["method"], dens)
        per_step = sum(l.train for l in layers) * opts.batch_size
        if row["step"] == "subspace":
            per_step += opts.batch_size * sum(l.dense_grad for l in layers)
            row["dense_grad_bytes"] = sum(l.numel * l.mu.element_size() for _, l in sparse_layers(tr.model))
        row["flops_per_step"] = per_step
        train_rows.append(row)
    vi = next(r for r in train_rows if r["method"] == "vi")
    for row in train_rows:
        row["time_vs_vi"] = row["median_ms"] / vi["median_ms"]
        row["bytes_vs_vi"] = (None if row["compared_bytes"] is None
                              else row["compared_bytes"] / vi["compared_bytes"])
        row["flops_vs_vi"] = row["flops_per_step"] / vi["flops_per_step"]
    amortised = _amortised(train_rows, opts.sparsities, recipe_dt, vi)

    say("writing model files and timing prediction")
    predict_rows = _bench_prediction(trainers, opts, x, root, say)

    return {
        "model": opts.model,
        "architecture": bm.name,
        "recipe": bm.preset,
        "input_shape": list(bm.input_shape),
        "data": SYNTHETIC_NOTE,
        "note": bm.note,
        "batch_size": opts.batch_size,
        "samples": opts.samples,
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "threads": torch.get_num_threads(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "sparsities": list(opts.sparsities),
        "recipe_delta_t": recipe_dt,
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "flops_convention": flopsmod.CONVENTION,
        "train": train_rows,
        "train_amortised": amortised,
        "predict": predict_rows,
    }


def _compared_bytes(row: dict[str, Any]) -> Optional[int]:
    """The trainable state a row is compared by: all of it for SSVI's parameter steps (its support
    index included: it cannot do without one); without the index for the dense variants, whose layers
    keep one at density 1 that a dense layer does not need; none for a subspace step, whose trainer
    has taken no optimizer step (the step's own cost is its dense gradient, ``dense_grad_bytes``)."""
    if row["step"] == "subspace":
        return None
    parts = row["trainable_parts"]
    return row["trainable_bytes"] - (parts["index"] if row["method"] in ("dense", "vi") else 0)


def recipe_delta_t(preset: str) -> int:
    """The preset's subspace-step spacing; ``auto`` follows a run's length, which a bench does not
    have, so it counts as its cap, the paper's 100."""
    dt = load_preset(preset).sparse.delta_t
    return dt if isinstance(dt, int) else PAPER_DELTA_T


def _amortised(rows: list[dict[str, Any]], sparsities: Sequence[float], delta_t: int,
               vi: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean time per step over one ``delta_t`` cycle: (delta_t - 1) parameter steps + 1 subspace step."""
    out = []
    for s in sparsities:
        param = next(r for r in rows if r["sparsity"] == s and r["kernel"] == "auto" and r["step"] == "parameter")
        sub = next(r for r in rows if r["sparsity"] == s and r["step"] == "subspace")
        ms = ((delta_t - 1) * param["median_ms"] + sub["median_ms"]) / delta_t
        out.append({"sparsity": s, "delta_t": delta_t, "parameter_ms": param["median_ms"],
                    "subspace_ms": sub["median_ms"], "amortised_ms": ms, "time_vs_vi": ms / vi["median_ms"]})
    return out


def _bench_prediction(trainers: dict[str, Any], opts: BenchOptions, x: torch.Tensor, root: Path,
                      say: Callable[[str], None]) -> list[dict[str, Any]]:
    from ssvi_cli.modelfile import read_model_file, write_model_file
    from ssvi_cli.prediction import predict_batch

    variants: list[Variant] = []
    pairs = []
    for s in opts.sparsities:
        tr = trainers[f"ssvi {s:g} auto"]
        card = tr.plan.card
        files = {}
        for layout in ("dense", "compact"):
            path = root / f"model-{s:g}-{layout}.safetensors"
            size = write_model_file(tr.model, path, card, dense=layout == "dense")
            model = read_model_file(path, kernel="prediction").model.to(x.device)  # as `ssvi infer` loads it
            key = f"{layout} {s:g}"
            files[layout] = key
            variants.append(Variant(key, (lambda m=model: predict_batch(m, x, opts.samples, "mc")),
                                    {"file": "dense BNN" if layout == "dense" else "compact", "sparsity": s,
                                     "file_bytes": size, "samples": opts.samples}))
        pairs.append(files)
    time_interleaved(variants, opts.repeats, opts.warmup, lambda step: say(f"prediction, {step}"), x.device)
    rows = {v.key: summarise(v) for v in variants}
    for files in pairs:
        dense, compact = rows[files["dense"]], rows[files["compact"]]
        for r in (dense, compact):
            r["speedup_vs_dense_file"] = dense["median_ms"] / r["median_ms"]
            r["time_vs_dense_file"] = r["median_ms"] / dense["median_ms"]
            r["bytes_vs_dense_file"] = r["file_bytes"] / dense["file_bytes"]
    return list(rows.values())


def result_options(result: dict[str, Any]) -> dict[str, Any]:
    """The settings a result was measured with (for the header of the tables)."""
    keys = ("model", "batch_size", "samples", "repeats", "warmup", "threads", "device", "sparsities")
    return {k: result[k] for k in keys}

