"""``ssvi bench``: training steps, Monte Carlo prediction and memory, measured side by side.

Everything runs in one process on the same synthetic minibatch and seed. Within every repeat each
variant is timed once, in an order rotated from repeat to repeat, so that the load of a shared machine
hits every variant alike; medians over the repeats (warm-up excluded) and ratios against dense VI
(training) or the dense BNN file (prediction) are reported. The inputs are random tensors of the
model's input shape: timing and memory do not depend on the data, accuracy is not measured here.

Training variants: ``dense`` (deterministic), ``vi`` (dense VI) and ``ssvi`` at every sparsity with
each kernel (``sparse``, ``dense``, ``auto``); their parameter steps are timed (the common case), and
separately an SSVI subspace step (dense-gradient capture plus remove-and-add), from which the
amortised cost per step at the recipe's ``delta_t`` is reported. Prediction: the SSVI model is written
as a compact file and as a dense BNN file (``--dense``), both are read back with ``read_model_file``
and timed with the same Monte Carlo prediction.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import TensorDataset

from ssvi_cli.core import flops as flopsmod
from ssvi_cli.config import Config, apply_overrides, load_preset
from ssvi_cli.data.spec import DataSpec, DataSplits
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.registry import Registry

log = logging.getLogger(__name__)

KERNELS = ("sparse", "dense", "auto")
SYNTHETIC_NOTE = "synthetic random inputs and labels of the model's input shape (timing and memory only)"


@dataclass(frozen=True)
class BenchModel:
    """A benchmarked architecture: the preset its recipe comes from and the defaults that fit 2 CPUs."""

    preset: str
    input_shape: tuple[int, int, int]
    widths: tuple[int, ...] = ()
    batch_size: int = 256
    repeats: int = 10
    samples: int = 16
    sparsities: tuple[float, ...] = (0.9, 0.95, 0.98)
    note: str = ""


BENCH_MODELS: Registry[BenchModel] = Registry("bench model")
BENCH_MODELS.register("mlp")(BenchModel("mnist_mlp", (1, 28, 28), widths=(1024, 1024)))
BENCH_MODELS.register("lenet5")(BenchModel("mnist_lenet5", (1, 28, 28)))
BENCH_MODELS.register("resnet18")(BenchModel(
    "cifar10_resnet18", (3, 32, 32), batch_size=16, repeats=3, samples=4, sparsities=(0.95,),
    note="resnet18 defaults to batch 16, 3 repeats, S=4 and sparsity 0.95 only: a dense VI step takes "
         "seconds on 2 CPU cores"))


@dataclass(frozen=True)
class BenchOptions:
    model: str = "mlp"
    sparsities: Optional[tuple[float, ...]] = None
    batch_size: Optional[int] = None
    samples: Optional[int] = None
    repeats: Optional[int] = None
    threads: Optional[int] = None
    device: str = "cpu"
    warmup: int = 2
    seed: int = 0

    def resolved(self) -> "BenchOptions":
        """Fill every unset option from the model's defaults."""
        bm = BENCH_MODELS.get(self.model)
        return replace(self, sparsities=tuple(self.sparsities or bm.sparsities),
                       batch_size=self.batch_size or bm.batch_size, samples=self.samples or bm.samples,
                       repeats=self.repeats or bm.repeats, threads=self.threads or torch.get_num_threads())


@dataclass
class Variant:
    """One timed thing: a zero-argument callable and the row it reports into."""

    key: str
    run: Callable[[], Any]
    row: dict[str, Any]
    times: list[float] = field(default_factory=list)


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synthetic_splits(bm: BenchModel, batch_size: int, seed: int) -> tuple[DataSplits, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *bm.input_shape, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    c = bm.input_shape[0]
    spec = DataSpec("synthetic", bm.input_shape, 10, tuple(str(i) for i in range(10)), (0.0,) * c, (1.0,) * c)
    ds = TensorDataset(x, y)
    return DataSplits(ds, TensorDataset(x[:0], y[:0]), ds, spec), x, y


def bench_config(bm: BenchModel, opts: BenchOptions, method: str, sparsity: float, kernel: str,
                 delta_t: int) -> Config:
    overrides: dict[str, Any] = {
        "sparse.method": method, "sparse.sparsity": sparsity, "train.kernel": kernel,
        "train.device": opts.device, "train.batch_size": opts.batch_size, "train.seed": opts.seed,
        # Many epochs so that the step-0 cosine schedules stay flat over the timed steps.
        "train.epochs": 100_000, "sparse.delta_t": delta_t, "sparse.addition": "sample",
    }
    if bm.widths:
        overrides["model.widths"] = list(bm.widths)
    return apply_overrides(load_preset(bm.preset), overrides)


def _trainer(cfg: Config, splits: DataSplits, root: Path, key: str):
    from ssvi_cli.training.trainer import Trainer

    run_dir = root / key.replace(" ", "_")
    run_dir.mkdir(parents=True)
    return Trainer.create(cfg, run_dir, splits=splits)


def _train_step(trainer, x: torch.Tensor, y: torch.Tensor, step: str) -> None:
    """One training step; a ``subspace`` step is forced by putting the step counter on ``delta_t``
    (capture of the dense gradient, then remove-and-add instead of the optimizer step)."""
    if step == "subspace":
        trainer.state.step = trainer.cfg.sparse.delta_t
    trainer.train_step(x, y)


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timing measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(variants: list[Variant], repeats: int, warmup: int,
                      on_progress: Optional[Callable[[str], None]] = None,
                      device: torch.device = torch.device("cpu")) -> None:
    """Warm every variant up, then time each once per repeat in a rotated order."""
    for v in variants:
        for _ in range(warmup):
            v.run()
    n = len(variants)
    for r in range(repeats):
        if on_progress:
            on_progress(f"repeat {r + 1}/{repeats}")
        for j in range(n):
            v = variants[(j + r) % n]
            _sync(device)
            t0 = time.perf_counter()
            v.run()
            _sync(device)
            v.times.append(time.perf_counter() - t0)


def _summarise(v: Variant) -> dict[str, Any]:
    row = dict(v.row)
    row["median_ms"] = 1e3 * statistics.median(v.times) if v.times else None
    row["min_ms"] = 1e3 * min(v.times) if v.times else None
    row["times_ms"] = [round(1e3 * t, 3) for t in v.times]
    return row


def run_bench(options: BenchOptions, on_progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the whole benchmark and return its JSON-ready result (see ``docs/BENCH.md``)."""
    opts = options.resolved()
    bm = BENCH_MODELS.get(opts.model)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="ssvi-bench-") as tmp:
            return _run(bm, opts, Path(tmp), on_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(bm: BenchModel, opts: BenchOptions, root: Path,
         on_progress: Optional[Callable[[str], None]]) -> dict[str, Any]:
    from ssvi_cli.training.records import trainable_bytes

    say = on_progress or (lambda _msg: None)
    from ssvi_cli.training.plan import resolve_device

    device = resolve_device(opts.device)
    splits, x, y = synthetic_splits(bm, opts.batch_size, opts.seed)
    x, y = x.to(device), y.to(device)
    recipe_dt = load_preset(bm.preset).sparse.delta_t
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
        train.append(Variant(key, (lambda tr=tr, step=step: _train_step(tr, x, y, step)),
                             {"variant": key, "method": method, "sparsity": s, "kernel": kernel, "step": step}))

    say("timing training steps")
    _time_interleaved(train, opts.repeats, opts.warmup, say, device)

    geometry = flopsmod.model_geometry(trainers["vi"].model, bm.input_shape)
    train_rows = []
    for v in train:
        row = _summarise(v)
        tr = trainers[v.key]
        row["trainable_bytes"] = trainable_bytes(tr.model, tr.optimizer)["total"]
        dens = {n: l.density for n, l in sparse_layers(tr.model)}
        layers = flopsmod.method_layers(geometry, row["method"], dens)
        per_step = sum(l.train for l in layers) * opts.batch_size
        if row["step"] == "subspace":
            per_step += opts.batch_size * sum(l.dense_grad for l in layers)
        row["flops_per_step"] = per_step
        train_rows.append(row)
    vi = next(r for r in train_rows if r["method"] == "vi")
    for row in train_rows:
        row["time_vs_vi"] = row["median_ms"] / vi["median_ms"]
        row["bytes_vs_vi"] = row["trainable_bytes"] / vi["trainable_bytes"]
        row["flops_vs_vi"] = row["flops_per_step"] / vi["flops_per_step"]
    amortised = _amortised(train_rows, opts.sparsities, recipe_dt, vi)

    say("writing model files and timing prediction")
    predict_rows = _bench_prediction(trainers, opts, x, root, say)

    return {
        "model": opts.model,
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
            model = read_model_file(path).model.to(x.device)
            key = f"{layout} {s:g}"
            files[layout] = key
            variants.append(Variant(key, (lambda m=model: predict_batch(m, x, opts.samples, "mc")),
                                    {"file": "dense BNN" if layout == "dense" else "compact", "sparsity": s,
                                     "file_bytes": size, "samples": opts.samples}))
        pairs.append(files)
    _time_interleaved(variants, opts.repeats, opts.warmup, say, x.device)
    rows = {v.key: _summarise(v) for v in variants}
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

