"""``ssvi evaluate``: accuracy, calibration and OOD detection of a model file or run directory."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from ssvi_cli.config import MAX_BATCH, MAX_ITEMS, MAX_SEED
from ssvi_cli.cli import completion
from ssvi_cli.cli.common import (UsageError, check_device, check_output_dir, check_output_file, err,
                                   fmt, kept_warnings, out, print_json, progress_bar)
from ssvi_cli.cli.numbers import whole
from ssvi_cli.cli.paths import output_file, try_making
from ssvi_cli.machine import given_path, quote_path

METRIC_LABELS = {
    "accuracy": "accuracy",
    "nll": "NLL",
    "brier": "Brier score",
    "ece": "ECE (top-label, 15 bins)",
    "debiased_marginal_l2_ce": "debiased class-marginal L2 CE",
    "entropy_mean": "mean predictive entropy",
    "mi_mean": "mean mutual information",
    "misclassification_auroc_entropy": "misclassification AUROC (entropy)",
    "misclassification_auroc_max_prob": "misclassification AUROC (1 - max p)",
}
SCORE_LABELS = {"entropy": "entropy", "mutual_information": "MI", "one_minus_max_prob": "1 - max p"}
OOD_COLUMNS = (("auroc", "AUROC"), ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"), ("fpr_at_95_tpr", "FPR@95%TPR"))


def _setting(report: dict[str, Any], samples: Optional[int] = None) -> str:
    s = report["samples"] if samples is None else samples
    return f"mode {report['mode']}" + (f", S={s}" if s else "")


def metrics_table(report: dict[str, Any]) -> Table:
    from ssvi_cli.modelfile.card import NO_DATASET

    info = report["model_info"]
    table = Table(title=f"{report['dataset']} {report['split']} (n={report['n']}), {_setting(report)}, "
                        f"seed {report['seed']}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, label in METRIC_LABELS.items():
        table.add_row(label, fmt(report["metrics"][key]))
    parts = [info.get("architecture"), info.get("method"),
             None if info.get("sparsity") is None else f"sparsity {info['sparsity']}",
             None if info.get("trained_on") in (None, NO_DATASET) else
             f"{'trained on' if info.get('method') or info.get('epochs') else 'saved for'} {info['trained_on']}"
             + (f" ({len(part)} of its {len(info['dataset_classes'])} classes: {', '.join(part[:6])}"
                f"{', ...' if len(part) > 6 else ''})" if (part := info.get("trained_classes")) else "")]
    known = ", ".join(str(p) for p in parts if p is not None)  # a file of ssvi.save records no method
    table.caption = f"model {report['model']}" + (f" ({known})" if known else "")
    table.caption_justify = "left"
    return table


def ood_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"OOD detection vs {report['dataset']} {report['split']} (OOD = positive), "
                        f"{_setting(report)}", title_justify="left", box=box.SIMPLE_HEAD)
    for header in ("OOD set", "n", "score"):
        table.add_column(header, style="bold" if header == "OOD set" else None)
    for _, header in OOD_COLUMNS:
        table.add_column(header, justify="right")
    for name, block in report["ood"].items():
        for i, (score, values) in enumerate(block["scores"].items()):
            table.add_row(name if i == 0 else "", str(block["n"]) if i == 0 else "", SCORE_LABELS.get(score, score),
                          *(fmt(values[key]) for key, _ in OOD_COLUMNS))
    return table


def samples_table(report: dict[str, Any]) -> Table:
    """Each metric, and each OOD AUROC, against the number of Monte Carlo samples S (one column per S)."""
    rows = report["per_samples"]
    table = Table(title=f"Metrics vs Monte Carlo samples S ({report['dataset']} {report['split']}, mode mc; "
                        "S draws = prefix of one pass)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric", style="bold")
    for row in rows:
        table.add_column(f"S={row['samples']}", justify="right")
    for key, label in METRIC_LABELS.items():
        table.add_row(label, *(fmt(row["metrics"][key]) for row in rows))
    for name, block in rows[-1]["ood"].items():  # the largest S has every score (one draw has no MI)
        for score in block["scores"]:
            table.add_row(f"{name} AUROC ({SCORE_LABELS.get(score, score)})",
                          *(fmt(row["ood"][name]["scores"].get(score, {}).get("auroc")) for row in rows))
    return table


def print_report(report: dict[str, Any], said: tuple[str, ...] = ()) -> None:
    """The report's tables and notes (those in ``said``, warnings stderr gave already, not again)."""
    out.print(metrics_table(report))
    if report["ood"]:
        out.print(ood_table(report))
    if len(report["per_samples"]) > 1:
        out.print(samples_table(report))
    for note in report["notes"]:
        if note not in said:
            out.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        model: Annotated[Path, typer.Argument(help="A model file (.safetensors), a training checkpoint (.pt) or a run directory.",
                                              show_default=False)],
        dataset: Annotated[Optional[str], typer.Option("--data", "--dataset", help="In-distribution data, as train --data names it: digits, mnist, ... or imagefolder:PATH (default: the model's own).", autocompletion=completion.of(completion.DATASETS))] = None,
        split: Annotated[str, typer.Option(help="test, val (the training-time validation split), or all: every image of an image folder, labelled by class folder name (a labelled folder the model never saw; it may hold fewer classes).", autocompletion=completion.of(completion.SPLITS))] = "test",
        ood: Annotated[Optional[list[str]], typer.Option("--ood", help="OOD set, repeatable: a name (noise and sklearn-photos, made or shipped with ssvi; svhn, cifar10, cifar100, mnist, fashion-mnist, kmnist, read from --data-dir); heldout (the test images of the classes the model was not trained on, see data.classes); NAME=DIR (that torchvision set read from DIR); or PATH, a folder of images and .npy files (read as ssvi infer reads it), or one .npy array shaped (N,H,W), (N,C,H,W), (N,H,W,C) or (N,C*H*W), a row per flattened input; LABEL=PATH names it LABEL in the report. A value with a /, ending in .npy or naming an existing file or folder is a path (write ./noise for a folder called noise).", autocompletion=completion.of(completion.OOD))] = None,
        samples: Annotated[Optional[str], typer.Option(help="Monte Carlo samples S, or a list such as 1,5,10,30 for a table over S (default 30).")] = None,
        mode: Annotated[str, typer.Option(help="mc (Bayesian model average of S samples) or mean (the mean network).", autocompletion=completion.of(completion.MODES))] = "mc",
        batch_size: Annotated[int, typer.Option(help="Images per prediction batch.")] = 500,
        seed: Annotated[int, typer.Option(parser=whole("--seed", 0, MAX_SEED), metavar="<int>", help="Seed of the Monte Carlo draws and of the OOD subsets.")] = 0,
        ood_max_items: Annotated[int, typer.Option("--ood-max-items", parser=whole("--ood-max-items", 1), metavar="<int>", help="Items of each OOD set at most, drawn with --seed (fewer: faster for a large model, a noisier AUROC).")] = 2000,
        data_dir: Annotated[Optional[Path], typer.Option(help="Folder of torchvision datasets, for the in-distribution data and --ood NAME (default: the training config's, else the data folder in ~/.cache/ssvi).")] = None,
        download: Annotated[bool, typer.Option(help="Download missing torchvision datasets.")] = False,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto (CUDA when present); the default, cpu, gives the numbers a machine without a GPU gives.", autocompletion=completion.devices)] = "cpu",
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document (and nothing else) on stdout.")] = False,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=output_file, metavar="<path>", help="Also write the JSON report to this *.json file (atomically).")] = None,
        plots: Annotated[Optional[Path], typer.Option(help="Write reliability.png, ood_scores.png with --ood and samples.png with several --samples into this folder; needs matplotlib.")] = None,
    ) -> None:
        """Accuracy, calibration (ECE, debiased class-marginal L2 CE), uncertainty and OOD detection."""
        from ssvi_cli.data.ood import label_of
        from ssvi_cli.evaluation import evaluator as ev
        from ssvi_cli.evaluation.inputs import load_eval_data
        from ssvi_cli.runs.rundir import RunDir
        from ssvi_cli.runs.load import load_model
        from ssvi_cli.fileio import write_json

        model = given_path(model)
        opts = _options(split, samples, mode, batch_size, seed)
        if ood_max_items > MAX_ITEMS:
            raise UsageError(f"--ood-max-items must be at most {MAX_ITEMS:,}, got {ood_max_items}")
        if plots is not None:
            from ssvi_cli.evaluation.plots import PlotsUnavailable, require_pyplot

            try:
                require_pyplot()
            except PlotsUnavailable as exc:
                raise UsageError(str(exc)) from None
        if not model.exists():
            raise UsageError(f"model {model} does not exist; pass a model file, a training checkpoint or a run directory")
        target = None  # the file --output names, or the target of the link it is
        if output is not None:
            scored = RunDir(model).model_file if model.is_dir() else model
            if output.exists() and scored.exists() and os.path.samefile(output, scored):
                raise UsageError(f"--output {output} is the model file being evaluated; name the report *.json")
            target = check_output_file(output, "--output")
            if output.suffix.lower() != ".json":  # never an image, array or model file of the user's by a slip
                raise UsageError(f"--output {output}: name the report *.json")
        if plots is not None:
            check_output_dir(plots, "--plots")
            try_making(plots, f"--plots {plots}")
        device = check_device(device)
        with kept_warnings() as warned:  # in the report's notes too
            loaded = load_model(model)
            if loaded.spec.num_classes == 1:  # its softmax is 1 for every input: "certain" whatever it is
                raise UsageError(f"{model} has one output: evaluate scores classifiers, of two or more classes (a "
                                 "regression model's draws are taken in Python, with ssvi.sampling)")
            loaded.model.to(device)
            reading = time.perf_counter()
            sets = f" + OOD {', '.join(label_of(text) for text in ood)}" if ood else ""
            # on a terminal, a line while the data are read (a folder of photos takes a while), gone after
            status = f"reading {dataset or loaded.spec.name} {split}{sets}"
            with err.status(status) if err.is_terminal and not err.is_dumb_terminal and not json_out else nullcontext():
                data = load_eval_data(loaded.spec, loaded.card.training, dataset=dataset, split=split,
                                      ood=tuple(ood or ()), data_dir=data_dir, download=download, seed=seed,
                                      ood_max_items=ood_max_items)
            reading = time.perf_counter() - reading
            runs = ev.effective_mode(loaded.model, mode)
            _check_memory(ev.draws_memory(data, opts, len(loaded.spec.class_names), runs), opts.max_samples, data)
            if not json_out:
                sets = f" + OOD {', '.join(data.ood)}" if data.ood else ""
                how = (f"mc, S={opts.max_samples}" if runs == "mc" else "mean network"
                       + (": the model is deterministic" if runs != mode else ""))
                err.print(f"evaluating {model} on {data.dataset} {split}{sets} ({how})")
            with progress_bar(enabled=not json_out) as bar:
                task = bar.add_task("predicting", total=data.total_items(), info="") if bar is not None else None
                advance = (lambda n: bar.update(task, advance=n)) if bar is not None else None
                result = ev.evaluate(loaded.model, data, opts, model_info=ev.describe_model(model, loaded.card),
                                     on_batch=advance)
        report = result.report
        report["notes"] += warned
        if loaded.file.layout == "checkpoint":  # a run stopped before its end, or a checkpoint named
            report["notes"].append(f"scored the training checkpoint {loaded.file.path}"
                                   + _why_checkpoint(model, loaded.card.training))
        elif note := loaded.card.training.unfinished_note():  # a file exported from such a checkpoint
            report["notes"].append(f"the model was {note}")
        if target is not None:
            write_json(target, report)
        written = []
        if plots is not None:
            from ssvi_cli.evaluation.plots import write_plots

            written = write_plots(result, plots)
        if json_out:
            print_json(report)
            return
        print_report(report, said=tuple(warned))
        err.print(f"evaluated in {report['seconds']:.1f}s, after {reading:.1f}s reading the data"
                  + (f"; report written to {output}" if output else "")
                  + (f"; plots: {', '.join(str(p) for p in written)}" if written else ""))


def _check_memory(need: int, samples: int, data: Any) -> None:
    """Refuse Monte Carlo draws that would not fit in the memory the system has available (Linux; where
    it cannot be read, nothing is checked): the process would swap or be killed, others with it."""
    from ssvi_cli import machine

    if (available := machine.short_of_memory(need)) is None:
        return
    fits = samples * available // need
    raise UsageError(f"--samples {samples:,} keeps every draw's class probabilities of the {data.total_items():,} "
                     f"inputs, about {need / 2**30:.1f} GiB; this machine has {available / 2**30:.1f} GiB available: "
                     f"give {f'--samples {fits:,} or fewer' if fits else '--mode mean'}"
                     + (", or fewer OOD inputs (--ood-max-items)" if data.ood else ""))


def _options(split: str, samples: Optional[str], mode: str, batch_size: int, seed: int) -> Any:
    from ssvi_cli.evaluation import evaluator as ev
    from ssvi_cli.prediction import MODES

    if mode not in MODES:
        raise UsageError(f"--mode {mode!r} is not valid; valid values are: {', '.join(MODES)}")
    if split not in ev.SPLITS:
        raise UsageError(f"--split {split!r} is not valid; valid values are: {', '.join(ev.SPLITS)}")
    if samples is not None and mode == "mean":
        raise UsageError("--samples applies to --mode mc; the mean network takes no samples")
    if not 1 <= batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size must be in [1, {MAX_BATCH:,}], got {batch_size}")
    try:
        counts = ev.parse_samples(samples) if samples is not None else (ev.DEFAULT_SAMPLES,)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return ev.EvalOptions(split=split, samples=counts, mode=mode, seed=seed, batch_size=batch_size)


def _why_checkpoint(model: Path, training: Any) -> str:
    """Why ``evaluate`` scored a training checkpoint: the path named one, the run has not finished, or
    the run finished and its model file has since gone; and, for a checkpoint taken before the run's
    last epoch (``training.unfinished``: its epoch and step), how far it had trained."""
    from ssvi_cli.runs.rundir import RunDir

    unfinished = training.unfinished
    when = (f", taken after {unfinished.get('epoch')} of {training.epochs} epochs (step {unfinished.get('step')})"
            if unfinished is not None else "")
    if not model.is_dir():
        return f"{when}, not a finished run's model file"
    run = RunDir(model)
    if run.summary_file.is_file():
        return (f"{when}: the run finished but its model file {run.model_file} is missing"
                + (" and its last checkpoint is missing or unreadable" if unfinished is not None else "")
                + f" (ssvi train --resume {quote_path(model)} writes it again)")
    return f"{when}: the run has no model file, so its training had not finished"
