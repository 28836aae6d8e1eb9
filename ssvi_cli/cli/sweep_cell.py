"""``ssvi sweep --run-cell``: one cell of a sweep, trained (or resumed) by ``ssvi train`` and evaluated
by ``ssvi evaluate``, as the sweep runs it in a process of its own and as ``--dry-run`` lists it for a
cluster scheduler."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from ssvi_cli.cli.common import UsageError, count, err, print_json, running_cell
from ssvi_cli.machine import path_word, quote_path, shell_join

if TYPE_CHECKING:
    from ssvi_cli.sweep.grid import Cell, SweepSpec


def run_cell(path: Path, run: Callable[[list[str]], int], json_out: bool = False) -> int:
    """Train (or resume) and evaluate one cell with the ``ssvi train`` and ``ssvi evaluate`` commands
    (``run`` invokes one); what ``--dry-run`` hands a scheduler. Their output is theirs, for a person
    or a log; ``json_out``: it goes to stderr, and standard output gets one JSON document, the cell's
    training summary and evaluation (:func:`cell_document`)."""
    from ssvi_cli.cli.train_fit import KeyboardInterruptHandled
    from ssvi_cli.sweep.grid import CELLS_DIR, is_sweep_dir, read_spec
    from ssvi_cli.data.spec import DataError
    from ssvi_cli.sweep.drift import record_folders
    from ssvi_cli.sweep.failures import DATA_ERROR, clear_failure, record_failure
    from ssvi_cli.sweep.runner import BUSY_EXIT, CellBusy, cell_lock, was_stopped
    from ssvi_cli.training.launcher import PARENT_ENV, stop_with_parent

    if os.environ.get(PARENT_ENV):  # started by a sweep: SIGTERM (a checkpoint) once it is gone, not run on unowned
        stop_with_parent()
    path = Path(path)
    sweep_dir = next((p for p in (path, path.parent) if is_sweep_dir(p)), None)
    if sweep_dir is not None:  # the sweep, or its cells folder: not one cell
        raise UsageError(f"--run-cell takes one cell's folder, {sweep_dir / CELLS_DIR / 'NAME'} (the lines of "
                         f"--dry-run); to run the whole sweep: ssvi sweep --resume {quote_path(sweep_dir)}")
    if path.parent.name != CELLS_DIR or not is_sweep_dir(path.parent.parent):
        raise UsageError(f"--run-cell {path}: not a cell of a sweep (a folder OUT/{CELLS_DIR}/NAME of a sweep in OUT, "
                         "as listed by --dry-run)")
    spec, cells = read_spec(path.parent.parent)
    cell = next((c for c in cells if c.name == path.name), None)
    if cell is None:
        raise UsageError(f"{path} is not a cell of the sweep in {path.parent.parent}")
    try:
        with cell_lock(path):
            clear_failure(path)
            # Every cell: one that ran under a preset edited since would share a group with this one.
            # Not this cell's failure (the report names changed cells apart), so not recorded as one.
            record_folders(path.parent.parent, spec, cells, check_changed(path.parent.parent, spec, cells))
            try:
                with redirect_stdout(sys.stderr) if json_out else nullcontext(), running_cell(path):
                    code = _train_and_evaluate(path, cell, spec, run)
            except (KeyboardInterruptHandled, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - recorded for the report, then reported as any error
                record_failure(path, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                               DATA_ERROR if isinstance(exc, DataError) else type(exc).__name__)
                raise
            if code and not was_stopped(code):  # a stop (Ctrl-C, SIGTERM) resumes; it did not fail
                record_failure(path, f"exit code {code}")
            if json_out and not code:
                print_json(cell_document(path))
            return code
    except KeyboardInterruptHandled as stop:  # the cell goes on as --run-cell (a scheduler's job) or with the sweep
        cell_only = shell_join(["ssvi", "sweep", "--run-cell", str(path.resolve())])
        every = shell_join(["ssvi", "sweep", "--resume", path_word(path.parent.parent)])
        raise KeyboardInterruptHandled(stop.message, stop.exit_code,
                                       resume=f"{every} (every cell left), or this cell alone: {cell_only}") from None
    except CellBusy as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(BUSY_EXIT) from None


def _train_and_evaluate(path: Path, cell: Cell, spec: SweepSpec, run: Callable[[list[str]], int]) -> int:
    from ssvi_cli.sweep.checks import check_ood_paths
    from ssvi_cli.sweep.runner import ALREADY_DONE, cell_state, was_stopped

    state = cell_state(path, spec)
    if state == "done":
        err.print(f"cell {path.name} {ALREADY_DONE} (delete its folder to run it again)")
        return 0
    check_ood_paths(spec)  # before training: its evaluation needs them
    if state == "partial":  # as it began, but on the sweep's device now (a sweep grown onto a GPU, say)
        device = spec.fixed.get("train.device")
        code = run(["train", "--resume", str(path), *(["--device", str(device)] if device is not None else [])])
    elif state == "new":
        code = run(["train", *cell.train_args(spec, path), *(["--force"] if path.exists() else [])])
    else:
        code = 0
    if code:
        return code
    code = run(["evaluate", *cell.eval_args(spec, path)])
    if was_stopped(code):  # a stop in training says where to resume itself; this one was silent
        from ssvi_cli.cli.train_fit import KeyboardInterruptHandled

        raise KeyboardInterruptHandled("interrupted in the evaluation; the training is kept and the cell is "
                                       "evaluated again", code)
    return code


def check_changed(sweep_dir: Path, spec: "SweepSpec", cells: list["Cell"]) -> dict[str, Optional[str]]:
    """Refuse to go on while a cell ran under other settings than the grid gives it now, or on an image
    folder changed since: it would be skipped as done, or resumed under its old settings, and reported
    under the new ones. Returns the image folders' states (``drift.folder_states``), read once."""
    from dataclasses import replace

    from ssvi_cli.sweep.drift import (changed_details, changed_lines, folder_states, mixed_decoding, ran_with,
                                      trains_alike)
    from ssvi_cli.sweep.grid import SweepError, expand, yaml_text
    from ssvi_cli.sweep.request import grid_command

    states = folder_states(spec, cells)
    details = changed_details(sweep_dir, spec, cells, states)
    changed = {name: what for name, (what, _) in details.items()}
    if changed:
        values = ran_with(details)  # a preset changed under the sweep: set as they ran, it goes on
        again = " ".join(shell_join(["--set", f"{k}={yaml_text(v)}"]) for k, v in values.items())
        try:
            grown = replace(spec, fixed={**spec.fixed, **values})
            if values and (set(values) & set(spec.axes) or not trains_alike(sweep_dir, spec, cells, grown, expand(grown))):
                values = {}  # that grid would move a cell not started otherwise than its method's started ones
        except SweepError:  # a grid that no longer expands: no advice
            values = {}
        command = grid_command(grown, sweep_dir) if values else None  # the whole grid: flags given before too
        advice = (f"; or go on as they ran: {shell_join(command)}" if command else
                  f"; or go on as they ran: give the sweep's grid again (its flags or --file, and --out) with {again}")
        err.print("\n".join(changed_lines(sweep_dir, changed)))
        one = len(changed) == 1
        raise SweepError(f"{count(len(changed), 'cell')} (listed above) ran under other settings than the sweep "
                         f"gives {'it' if one else 'them'} now (a preset edited since, a folder copied in, or an image "
                         "folder changed since, which restoring it undoes); "
                         f"delete {'its folder' if one else 'their folders'} to run {'it' if one else 'them'} "
                         "again, or report the sweep as it is: "
                         f"{shell_join(['ssvi', 'sweep', '--report', path_word(sweep_dir)])}"
                         + (advice if values else ""))
    if (mixed := mixed_decoding(sweep_dir, spec, cells)) is not None:
        raise SweepError(f"{mixed}; report the sweep as it is, {shell_join(['ssvi', 'sweep', '--report', path_word(sweep_dir)])}, "
                         "or delete the older cells' folders to train every cell alike")
    return states


def cell_document(path: Path) -> dict[str, Any]:
    """``--run-cell --json``'s output: the cell's name and folder, its training summary (``summary.json``,
    what ``ssvi train --json`` prints but its notes) and its evaluation (``ssvi evaluate --json``'s), as the cell's files hold them."""
    from ssvi_cli.runs.rundir import EVALUATION_FILE, RunDir

    return {"format": "ssvi-sweep-cell", "version": 1, "cell": path.name, "folder": str(path.resolve()),
            "summary": RunDir(path).read_summary(),
            "evaluation": json.loads((path / EVALUATION_FILE).read_text(encoding="utf-8"))}
