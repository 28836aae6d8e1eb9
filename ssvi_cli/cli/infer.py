"""``ssvi infer``: predict images or arrays with a model file (sparse Monte Carlo by default)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.table import Table

from ssvi_cli import fileio
from ssvi_cli.argcheck import printable
from ssvi_cli.config import MAX_SAMPLES, MAX_SEED
from ssvi_cli.cli import completion
from ssvi_cli.cli.common import (UsageError, check_device, check_output_file, count, err, json_text, out,
                                   kept_warnings, print_json, progress_bar)
from ssvi_cli.cli.console import reader_may_go
from ssvi_cli.cli.numbers import whole
from ssvi_cli.cli.paths import output_file
from ssvi_cli.cli.train_fit import KeyboardInterruptHandled
from ssvi_cli.machine import given_path

SHOWN_ROWS = 50  # the table shows this many inputs; --output holds all
DEFAULT_SAMPLES = 10  # Monte Carlo samples per input


def register(app: typer.Typer) -> None:
    @app.command()
    def infer(
        model_file: Annotated[Path, typer.Argument(help="A model file (.safetensors), a training checkpoint (.pt) or a run directory.")],
        inputs: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, BMP, GIF, WebP, TIFF, PPM/PGM/PBM/PNM), folders (recursive; hidden files skipped), .npy arrays, or - for standard input.")],
        samples: Annotated[Optional[int], typer.Option(help="Monte Carlo samples S (mode mc; default 10).", show_default=False)] = None,
        mode: Annotated[str, typer.Option(help="mc (Bayesian model average) or mean (theta = mu).", autocompletion=completion.of(completion.MODES))] = "mc",
        batch_size: Annotated[int, typer.Option(help="Inputs per forward pass.")] = 256,
        top_k: Annotated[int, typer.Option(help="Classes listed per input, most probable first (all of them "
                                                "when the model has fewer).")] = 3,
        seed: Annotated[int, typer.Option(parser=whole("--seed", 0, MAX_SEED), metavar="<int>", help="Seed of the Monte Carlo draws.")] = 0,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=output_file, metavar="<path>", help="Write all predictions to a .jsonl or .csv file (the suffix picks the format).")] = None,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto (CUDA when present); the default, cpu, gives the predictions a machine without a GPU gives.", autocompletion=completion.devices)] = "cpu",
        json_out: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
        skip_unreadable: Annotated[bool, typer.Option("--skip-unreadable", help="Predict the inputs that read and name the others (on stderr; under 'skipped' with --json) instead of refusing them all.")] = False,
    ) -> None:
        """Predict class, probability, top-k, predictive entropy and mutual information (nats) per input."""
        from ssvi_cli.data.images import shown
        from ssvi_cli.runs.load import load_model
        from ssvi_cli.evaluation.infer import (OUTPUT_SUFFIXES, InputError, UnreadableInputs, expand_inputs, known_count,
                                               predict_inputs)
        from ssvi_cli.prediction import MODES, is_bayesian

        model_file, inputs = given_path(model_file), [given_path(p) for p in inputs]
        if mode not in MODES:
            raise UsageError(f"--mode {mode!r} is not valid; valid values are: {', '.join(MODES)}")
        if samples is not None and mode == "mean":
            raise UsageError("--samples applies to --mode mc; the mean network takes no samples")
        samples_given = samples is not None
        samples = DEFAULT_SAMPLES if samples is None else samples
        for flag, value in (("--samples", samples), ("--batch-size", batch_size), ("--top-k", top_k)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if samples > MAX_SAMPLES:
            raise UsageError(f"--samples {samples} is more Monte Carlo draws per input than ssvi takes ({MAX_SAMPLES:,})")
        if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
            raise UsageError(f"--output {output} must end in {' or '.join(OUTPUT_SUFFIXES)}")
        target = check_output_file(output, "--output") if output is not None else None  # or a link's target
        device = check_device(device)
        with kept_warnings() as warned:  # in the document's notes too
            files = expand_inputs(inputs)
            loaded = load_model(model_file, kernel="prediction")
            if loaded.spec.num_classes == 1:  # its softmax is 1 for every input: "certain" whatever it is
                raise UsageError(f"{model_file} has one output: infer predicts classes, two or more (a regression "
                                 "model's draws are taken in Python, with ssvi.sampling)")
            loaded.model.to(device)
            notes: list[str] = []  # on stderr as they come, and under --json in the document too
            if note := loaded.card.training.unfinished_note():  # a checkpoint, or a file exported from one
                notes.append(f"the model of {model_file} was {note}")
            effective = mode if is_bayesian(loaded.model) else "mean"
            if effective != mode and samples_given:
                notes.append(f"{model_file} is deterministic: it runs as the mean network, and --samples is not used")
            for note in notes:
                err.print(f"note: {note}", highlight=False, markup=False)
            started = time.perf_counter()
            skipped: Optional[list[tuple[str, Exception]]] = [] if skip_unreadable else None
            spooled = _JsonRecords()
            with progress_bar(enabled=not json_out) as bar, _written(target, output, loaded.spec, top_k) as written:
                task = bar.add_task("infer", total=known_count(files), info="") if bar is not None else None
                kept: list[dict[str, Any]] = []  # the table shows the first SHOWN_ROWS; --json prints them all, spooled

                done = [0]  # inputs predicted so far, for an interruption's message

                def sink(batch: list[dict[str, Any]]) -> None:
                    written(batch)
                    done[0] += len(batch)
                    if json_out:
                        spooled.add(batch)
                    else:
                        kept.extend(batch[:SHOWN_ROWS - len(kept)])
                try:
                    predicted = predict_inputs(loaded.model, loaded.spec, files, sink, samples=samples, mode=effective,
                                               batch_size=batch_size, top_k=top_k, seed=seed, skipped=skipped,
                                               on_batch=(lambda n: bar.update(task, advance=n)) if bar is not None else None)
                except UnreadableInputs as exc:  # the flag is named where it would predict something
                    raise InputError(f"{exc}" + (" (or --skip-unreadable predicts the others)"
                                                 if len(exc.bad) < exc.total else "")) from None
                except KeyboardInterrupt:  # what became of the predictions made, which went unsaid
                    kept_file = "" if output is None else (
                        f"; {output} {'is left as it was' if output.exists() else 'was not written'} (it is written "
                        "whole, once every input is predicted)")
                    raise KeyboardInterruptHandled(f"interrupted after {count(done[0], 'prediction')}{kept_file}") from None
                passed = UnreadableInputs(skipped, files) if skipped else None
                if passed is not None and not predicted:  # before the file is written: the one there stays
                    raise InputError(f"no input could be read: {passed}")
            seconds = time.perf_counter() - started
            header = {"model": str(model_file), "mode": effective,
                      "samples": samples if effective == "mc" else None, "seed": seed,
                      "inputs": predicted, "seconds": round(seconds, 3)}
            # why each was skipped (the advice to replace or remove a file is for a run it stopped)
            reasons = [(shown(name), str(e).replace("; replace or remove the file", "")) for name, e in (passed.bad if passed else [])]
            if skip_unreadable:
                header["skipped"] = [{"input": name, "error": why} for name, why in reasons]
            if reasons:
                notes.append(f"skipped {len(reasons)} of {count(passed.total, 'input file')} that cannot be read: "
                             + ", ".join(name for name, _ in reasons[:10])
                             + (f" and {len(reasons) - 10} more" if len(reasons) > 10 else "")
                             + f" (the first: {reasons[0][1]})")
                err.print(f"note: {notes[-1]}", highlight=False, markup=False)
        header["notes"] = notes + warned
        if json_out:
            spooled.print(header)
            return
        out.print(_table(kept, header))
        if predicted > SHOWN_ROWS:
            err.print(f"showing {SHOWN_ROWS} of {predicted} inputs" + ("" if output else "; use --output for all"))
        if output is not None:
            err.print(f"wrote {count(predicted, 'prediction')} to {output}")


class _JsonRecords:
    """``--json``'s records as :func:`print_json` nests them under ``predictions``, written as they come
    to a temporary file that stays in memory up to 32 MB (200,000 records held as dicts took 260 MB);
    an unnamed one where the system allows (Linux, macOS), gone with the process however it ends."""

    def __init__(self) -> None:
        self.count = 0
        self.file: Any = None

    def add(self, batch: list[dict[str, Any]]) -> None:
        import tempfile
        import textwrap

        if self.file is None:
            self.file = tempfile.SpooledTemporaryFile(max_size=32 * 2**20, mode="w+", encoding="utf-8")
        for record in batch:
            self.file.write(("," if self.count else "") + "\n" + textwrap.indent(json_text(record), "    "))
            self.count += 1

    def print(self, header: dict[str, Any]) -> None:
        """One JSON document on stdout: ``header``'s keys, then the records under ``predictions``."""
        import shutil
        import sys

        if not self.count:
            print_json({**header, "predictions": []})
            return
        with reader_may_go():  # its reader gone (| head), the command ends as it would have
            sys.stdout.write(json_text({**header, "predictions": []}).removesuffix("[]\n}") + "[")
            self.file.seek(0)
            shutil.copyfileobj(self.file, sys.stdout)
            sys.stdout.write("\n  ]\n}\n")
            sys.stdout.flush()
        self.file.close()


@contextmanager
def _written(target: Optional[Path], output: Optional[Path], spec: Any,
             top_k: int) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    """Where each batch's records go as they come: the ``--output`` file ``target`` (``output`` or the
    target of that link), in ``output``'s format, written to a temporary file that replaces it once
    every input is predicted (any error leaves the one there as it was); nowhere without ``--output``."""
    if target is None or output is None:
        yield lambda batch: None
        return
    from ssvi_cli.evaluation.infer import PredictionWriter, top_count

    with fileio.atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline="") as stream:
        yield PredictionWriter(stream, output.suffix.lower(), top_count(top_k, len(spec.class_names))).write


def _table(records: list[dict[str, Any]], header: dict[str, Any]) -> Table:
    how = f"mc, S={header['samples']}, seed {header['seed']}" if header["mode"] == "mc" else "mean network"
    inputs = count(header["inputs"], "input")
    table = Table(title=f"ssvi infer: {header['model']} ({how}; {inputs}, {header['seconds']:.2f}s)", title_justify="left")
    for col, justify in (("input", "left"), ("class", "left"), ("prob", "right"), ("top-k", "left"),
                         ("entropy (nats)", "right"), ("MI (nats)", "right")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in records[:SHOWN_ROWS]:
        mi = "-" if r["mutual_information"] is None else f"{r['mutual_information']:.2e}"  # one format a column
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
        table.add_row(printable(r["input"]), r["class"], f"{r['probability']:.4f}", top, f"{r['entropy']:.4f}", mi)
    return table
