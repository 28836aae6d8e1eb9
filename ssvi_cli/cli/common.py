"""Shared CLI plumbing: consoles, JSON output, progress display and error reporting."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from rich.table import Table

from ssvi_cli.argcheck import has_control
from ssvi_cli.fileio import check_writable, is_entry, json_default, json_ready

if TYPE_CHECKING:
    import typer
    from rich.progress import Progress

from ssvi_cli.cli.console import PIPE_WIDTH, err, no_reader, out, tell, write_out  # noqa: F401 - the commands import them from here


class UsageError(Exception):
    """A user mistake on the command line (exit code 2)."""


def count(n: int, noun: str) -> str:
    """``3 inputs``, ``1 input``: a count with its noun in the right number (plural: noun + "s")."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def check_output_file(path: Path, flag: str) -> Path:
    """Refuse an output file that is a folder or whose folder is missing, before any work is done
    (a mistyped folder is reported rather than silently created), and one of a run's own files: its
    records, lock and checkpoints, or the model file of a run that trained there (a folder holding
    only a copied ``config.yaml`` is free to receive one); and one of a sweep's. Names are compared
    as the disk compares them (:func:`~ssvi_cli.fileio.is_entry`: ignoring case on macOS's). Returns
    the file to write: ``path``, or the target of the symbolic link it is, which is what is checked
    and written (the link stays)."""
    check_home(path, flag)
    if path.is_dir():  # (an empty value, which Typer reads as ".", is refused before: cli.app)
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.suffix.lower() != path.suffix.lower():  # the kind a command checks by the name given
            raise UsageError(f"{flag} {path} is a link to {target}, a file of another kind; give a path that is not "
                             "a link, or one to a file of its own kind")
        path = target
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise UsageError(f"{flag} {path}: its folder {path.parent} {what}; create it first or pick another path")
    check_writable(path.parent, f"{flag} {path}")
    if path.is_file() and not path.stat().st_mode & 0o200:  # made read-only to keep it (a rename would not ask)
        raise UsageError(f"{flag} {path} is read-only; make it writable (chmod u+w) to replace it, or give another path")
    from ssvi_cli.runs.rundir import (CONFIG_FILE, LOCK_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, SUPPORT_FILE,
                                      RunDir)

    folder = path.parent.resolve()  # the folder as it is, however it was reached (.., a symlink)
    _refuse_a_cells_evaluation(path, folder, flag)  # before the cells folder's refusal: it says more
    _refuse_a_folder_ssvi_keeps(folder, f"{flag} {path}", flag, file=True)
    _refuse_a_sweeps_own(path, folder, flag)
    records = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, SUPPORT_FILE, LOCK_FILE)
    name = next((n for n in (*records, MODEL_FILE) if is_entry(folder / path.name, n)), None)
    if name is None:
        return path
    run = RunDir(folder)
    if not run.is_run():
        return path
    if name == LOCK_FILE:
        raise UsageError(f"{flag} {path} is the lock of the run in {folder}; give another path")
    if name != MODEL_FILE:
        raise UsageError(f"{flag} {path} is a record of the run in {folder}, which evaluate, --resume and "
                         "sweeps read; give another path")
    if run.trained_here():
        raise UsageError(f"{flag} {path} is the model file of the run in {folder}, which its summary "
                         "and evaluations describe; give another path")
    return path


def _refuse_a_folder_ssvi_keeps(folder: Path, shown: str, flag: str, file: bool) -> None:
    """Refuse output into a run's checkpoints folder (or below it), which ``--resume`` reads and
    ``--force`` removes, or into a sweep's ``cells`` or ``logs`` folder, which the sweep writes and
    ``--report`` reads: ``folder`` the output folder, or the folder of a ``file``, as it resolves;
    ``shown`` the flag and path as given."""
    from ssvi_cli.runs.rundir import checkpoints_owner

    owner = checkpoints_owner(folder)
    if owner is not None:
        where = "is" if not file and folder.parent == owner else "is in"  # the folder itself, or below it
        raise UsageError(f"{shown} {where} the checkpoints folder of the run in {owner}, which --resume reads and "
                         f"--force removes; give another {flag} path")
    _refuse_a_sweeps_folder(folder, shown, flag, file)


def _refuse_a_sweeps_folder(folder: Path, shown: str, flag: str, file: bool) -> None:
    """Refuse output at or below a sweep's ``cells`` or ``logs`` folder (all of which ``--force``
    removes) but the sweep's own run of a cell (:func:`running_cell`)."""
    from ssvi_cli.sweep.grid import CELLS_DIR, is_sweep_dir
    from ssvi_cli.sweep.runner import LOGS_DIR

    running = _RUNNING_CELL.get()
    for below in (folder, *folder.parents):  # the cells or logs folder itself, or anything below it
        if any(is_entry(below, n) for n in (CELLS_DIR, LOGS_DIR)) and is_sweep_dir(below.parent):
            if running is not None and folder == running:
                return  # the sweep's own run of that cell: its training, and its evaluation (checked apart)
            where = "is" if below == folder and not file else "is in"
            raise UsageError(f"{shown} {where} the {below.name} folder of the sweep in {below.parent}, which the "
                             f"sweep writes, --report reads and --force removes; give another {flag} path")


def _refuse_a_sweeps_own(path: Path, folder: Path, flag: str) -> None:
    """Refuse one of a sweep's own files (its grid, report, figures, command list or lock), which the
    sweep and ``--report`` read and write."""
    from ssvi_cli.sweep.grid import is_sweep_dir
    from ssvi_cli.sweep.sweepdir import SWEEP_ENTRIES, SWEEP_LOCK

    if any(is_entry(folder / path.name, n) for n in (*SWEEP_ENTRIES, SWEEP_LOCK)) and is_sweep_dir(folder):
        raise UsageError(f"{flag} {path} is one of the files of the sweep in {folder}, which the sweep writes and "
                         "--report reads; give another path")


# The cell ``ssvi sweep --run-cell`` is running: the one run that may write in a sweep's cells folder.
_RUNNING_CELL: ContextVar[Optional[Path]] = ContextVar("running_cell", default=None)


@contextmanager
def running_cell(cell: Path) -> Iterator[None]:
    """Within the block, ``ssvi train --out CELL`` and ``ssvi evaluate --output CELL/evaluation.json``
    are the sweep's own run of ``cell``, which :func:`check_output_file` and :func:`check_run_out`
    refuse to any other command."""
    token = _RUNNING_CELL.set(Path(cell).resolve())
    try:
        yield
    finally:
        _RUNNING_CELL.reset(token)


def running_a_cell() -> bool:
    """Whether this command runs as part of a sweep's cell (:func:`running_cell`)."""
    return _RUNNING_CELL.get() is not None


def _refuse_a_cells_evaluation(path: Path, folder: Path, flag: str) -> None:
    """Refuse a sweep cell's ``evaluation.json`` (the sweep's evaluation of the cell, which ``--report``
    reads: another one replacing it drops the cell from the report) but to the sweep itself."""
    from ssvi_cli.runs.rundir import EVALUATION_FILE
    from ssvi_cli.sweep.grid import CELLS_DIR, is_sweep_dir

    if not is_entry(folder / path.name, EVALUATION_FILE) or _RUNNING_CELL.get() == folder:
        return
    if is_entry(folder.parent, CELLS_DIR) and is_sweep_dir(folder.parent.parent):
        raise UsageError(f"{flag} {path} is the evaluation of cell {folder.name} of the sweep in {folder.parent.parent}, "
                         "which --report reads (another evaluation there would drop the cell from the report); give "
                         "another path")


def check_run_out(path: Path) -> None:
    """Refuse ``ssvi train --out`` in a sweep's cells or logs folder (a cell is trained there by the
    sweep alone; a run's checkpoints folder is refused by ``RunDir.check_claim``)."""
    from ssvi_cli.runs.rundir import LOCK_HELD_ENV

    check_home(path, "--out")
    if os.environ.get(LOCK_HELD_ENV) == str(path.resolve()):
        return  # a process of ssvi train --nproc, whose launcher checked it
    _refuse_a_sweeps_folder(path.resolve(), f"--out {path}", "--out", file=False)


def check_home(path: Path, flag: str) -> None:
    """Refuse an output path beginning with a ``~`` or ``~user`` the shell left as it is (quoted, or
    after ``=``): an entry of that name would be made in the current folder, which ``rm -rf ~`` then
    removes the wrong way."""
    first = path.parts[0] if path.parts else ""
    if first.startswith("~") and Path(first).expanduser() != Path(first):
        raise UsageError(f"{flag} {path}: the shell did not expand {first} (it was quoted, or came after '='), and "
                         f"an entry named {first} would be made here; write {path.expanduser()} (or, for a folder "
                         f"really named {first} here, {Path.cwd() / path})")


def check_output_dir(path: Path, flag: str) -> None:
    """Refuse an output folder that exists as a file (it is created, with parents, when missing), or
    whose name holds a control character (the commands ssvi writes and prints name it on one line)."""
    if has_control(str(path)):
        raise UsageError(f"{flag} {str(path)!r}: a folder name with a control character (a newline, say) is refused")
    check_home(path, flag)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a directory; give a folder path")
    _refuse_a_folder_ssvi_keeps(path.resolve(), f"{flag} {path}", flag, file=False)  # or will be, once made
    check_writable(path, f"{flag} {path}")  # or, while missing, the folder it would be made in


class Debug:
    """Whether ssvi runs with ``--debug`` (which :func:`ssvi_cli.cli.app.run` takes before the command
    sees its options): set there, forwarded to the processes a command starts."""

    on = False


def forwarded_args(ctx: "typer.Context", drop: tuple[str, ...] = ()) -> list[str]:
    """The command line that reproduces this command's given options (those not left at None/False,
    and a tri-state flag's explicit ``--no-...``), and ``--debug`` when ssvi runs with it."""
    args: list[str] = ["--debug"] if Debug.on else []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        # A tri-state flag (default None, e.g. --download/--no-download) forwards an explicit "no".
        explicit_no = value is False and param.default is None and bool(getattr(param, "secondary_opts", ()))
        if param.name in drop or param.param_type_name != "option" or (value in (None, False, [], ()) and not explicit_no):
            continue
        flag = param.secondary_opts[0] if explicit_no else param.opts[0]
        if value is True or explicit_no:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def check_device(device: str) -> str:
    """``--device cpu|cuda|auto`` of the commands that run a saved model, as the device to use
    (``training.plan.resolve_device``: ``auto`` is CUDA when present; ``cuda`` must be present)."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.training.plan import resolve_device

    try:
        return str(resolve_device(device, sweep_advice=False))  # a training run's advice is not these commands'
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def json_text(obj: Any) -> str:
    """``obj`` as every ``--json`` of ssvi prints it (indented by 2; NaN and infinities as null)."""
    return json.dumps(json_ready(obj), indent=2, default=json_default, allow_nan=False)


def print_json(obj: Any) -> None:
    write_out(json_text(obj) + "\n")


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value and abs(value) < 10 ** -digits:  # a mutual information of 3e-5 would print as 0.0000
            return f"{value:.2e}"
        text = f"{value:.{digits}f}"
        # a fraction of 0.99999 would read as 1.0000, a value it is not (a sparsity ssvi refuses, a perfect
        # score): with the digits that tell it from 1 (0.99996, not 0.9999624784172702 beside 4-place columns)
        while abs(value) < 1 and abs(float(text)) == 1 and digits < 17:
            digits += 1
            text = f"{value:.{digits}f}"
        return text
    return str(value)


def scored_as(m: dict[str, Any]) -> str:
    """``mc, S=10 on 360 test images``: how a run scored its own test numbers, from its summary (as
    much of it as a model file's record holds; "" for none)."""
    how = (str(m["test_mode"]) + (f", S={m['test_samples']}" if m.get("test_samples") else "")) if m.get("test_mode") else ""
    images = m["images"].get("test") if isinstance(m.get("images"), dict) else None
    return f"{how} on {images:,} test images".strip() if isinstance(images, int) else how


def size_rows(t: dict[str, Any], measured: str = "") -> dict[str, str]:
    """A file's sizes as export and inspect print them (``size_totals``): its bytes, the dense float32
    tensors of the same model (a dense BNN's μ and σ, or a deterministic model's means alone) and
    the ratio of tensor bytes to tensor bytes."""
    dense = "dense float32 BNN bytes" if t.get("bayesian", True) else "dense float32 bytes (means: deterministic)"
    return {"file bytes": f"{t['file_bytes']:,} ({t['tensor_bytes']:,} of tensors, {t['header_bytes']:,} of header"
                          + (f"; {measured}" if measured else "") + ")",
            dense: f"{t['dense_bnn_bytes']:,} (tensors)",
            "compression ratio": f"{t['compression_ratio']:.2f}x (tensor bytes to tensor bytes)"}


def kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold", no_wrap=True)
    # Fold rather than cut: a value (a path, a command) must stay whole on a narrow terminal.
    table.add_column("value", justify="right", overflow="fold")
    for key, value in rows.items():
        table.add_row(key, fmt(value))
    return table


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Optional["Progress"]]:
    """A rich progress bar on a terminal; ``None`` (plain line output) otherwise, and on a dumb one
    (TERM=dumb: an editor's shell), which cannot redraw a bar: it left copies of it among the lines."""
    if not enabled or not err.is_terminal or err.is_dumb_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), console=err, transient=False)
    with bar:
        yield bar


@contextmanager
def kept_warnings() -> Iterator[list[str]]:
    """The warnings ssvi's modules log while the block runs (an array read as one image, a named pipe
    passed over), kept for a ``--json`` document's ``notes``; they print on stderr as ever."""
    import logging

    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger("ssvi_cli")
    logger.addHandler(handler)
    try:
        yield kept
    finally:
        logger.removeHandler(handler)
