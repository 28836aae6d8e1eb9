"""Running a sweep's cells: each one a separate ``ssvi sweep --run-cell DIR`` process, ``jobs`` at
a time, with its output in ``logs/<cell>.log``.

A cell's state is read from its run directory (``done``: evaluated; ``trained``; ``partial``: a
checkpoint to resume from; ``new``), so a rerun skips finished cells and resumes interrupted ones.
Cells run in sessions of their own: on Ctrl-C (or SIGTERM, or SIGHUP) the sweep sends each running
cell one SIGINT, and each one finishes its step, checkpoints and exits, resumable. A cell holds a lock
(``cells/.<cell>.lock``) while it runs, so a second process asked to run it (a ``--resume`` while a
killed sweep's cells still run, a scheduler's retry) stops with one line instead of writing into the
same run directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ssvi_cli.fileio import UnwritablePath
from ssvi_cli.locks import Locked, acquire_lock, lock_holder
from ssvi_cli.runs.rundir import RunDir
from ssvi_cli.sweep.failures import failure, halted, record_failure
from ssvi_cli.sweep.grid import CELLS_DIR, EVAL_FILE, Cell, SweepSpec
from ssvi_cli.training.launcher import PARENT_ENV
from ssvi_cli.training.stops import requests_to_stop

LOGS_DIR = "logs"
BUSY_EXIT = 75  # a cell's exit code when another process runs it (EX_TEMPFAIL: try again later)
STOP_GRACE_S = 300.0  # how long a stopped cell may take to checkpoint before it is killed


def cell_dir(sweep_dir: Path, cell: Cell) -> Path:
    return Path(sweep_dir) / CELLS_DIR / cell.name


def evaluated(path: Path, spec: Optional[SweepSpec] = None) -> bool:
    """Whether the cell's evaluation report is there and reads as one (a damaged one, from a disk
    that filled up or an edit, is evaluated again rather than read into the report) and, given the
    sweep's ``spec``, was made as the sweep evaluates now: its Monte Carlo samples (a deterministic
    model's mean network has none) and its OOD sets, the user's own folders and arrays as they are now."""
    try:
        report = json.loads((path / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not (isinstance(report, dict) and isinstance(report.get("metrics"), dict)):
        return False
    if spec is None:
        return True
    from ssvi_cli.data.ood import label_of  # by label, also for a folder moved since

    samples_ok = report.get("mode") == "mean" or report.get("samples") == spec.samples
    sources = report.get("ood_sources") or {}
    return (samples_ok and set(report.get("ood") or {}) == {label_of(text) for text in spec.ood}
            and all(sources.get(label) == digest for label, digest in own_ood_sets(spec.ood).items()))


def own_ood_sets(ood: tuple[str, ...]) -> dict[str, Optional[str]]:
    """The digest of each of the sweep's ``--ood`` values that is the user's own folder or array, by
    label (None for one not there now, which no evaluation matches)."""
    from ssvi_cli.data.ood import label_of, parse_ood
    from ssvi_cli.data.spec import DataError
    from ssvi_cli.evaluation.ood_sets import source_digest

    digests: dict[str, Optional[str]] = {}
    for text in ood:
        try:
            request = parse_ood(text)
        except DataError:  # gone: the cell's own check says so before it trains
            digests[label_of(text)] = None
            continue
        if request.kind == "path" and request.path is not None:
            try:
                digests[request.label] = source_digest(request.path)
            except (OSError, DataError):
                digests[request.label] = None
    return digests


def cell_state(path: Path, spec: Optional[SweepSpec] = None) -> str:
    """``done``, ``trained``, ``partial`` (has a checkpoint) or ``new``; given the sweep's ``spec``, a
    cell evaluated otherwise than the sweep evaluates now is ``trained``."""
    run = RunDir(path)
    if evaluated(path, spec):
        return "done"
    if run.finished():
        return "trained"
    return "partial" if path.is_dir() and run.checkpoints() else "new"


class CellBusy(RuntimeError):
    """The cell is being run by another process."""


def lock_file(path: Path) -> Path:
    """The cell's lock (:func:`cell_lock`): ``cells/.<cell>.lock``."""
    return Path(path).parent / f".{Path(path).name}.lock"


def cell_busy(path: Path) -> bool:
    """Whether another process holds the cell's lock now (a shared lock tried and let go at once: no
    lock file is made, and a cell that starts in that instant may be told it is already running)."""
    return lock_holder(lock_file(path)) is not None


@contextmanager
def cell_lock(path: Path) -> Iterator[None]:
    """Hold the cell's lock while the block runs; :class:`CellBusy` if another process holds it: an
    advisory lock (:func:`locks.acquire_lock`) on ``cells/.<cell>.lock``, outside the run directory,
    which ``ssvi train --force`` may replace."""
    try:
        lock = acquire_lock(lock_file(path), "the cell's lock")
    except Locked as exc:
        raise CellBusy(f"cell {Path(path).name} is already running (process {exc.holder}); "
                       "wait for it or stop it, then run it again") from None
    except UnwritablePath as exc:  # a read-only sweep folder, say
        raise UnwritablePath(exc.errno, f"{exc}; a sweep's folder must be writable to run its cells") from None
    with lock:
        yield


STOPPED_EXITS = frozenset({129, 130, 143})  # 128 + SIGHUP, SIGINT, SIGTERM: stopped at a checkpoint, not failed


def was_stopped(code: int) -> bool:
    """Whether a cell's exit code (or Popen's -signal) is a stop on request, resumable, not a failure."""
    return code in STOPPED_EXITS or (code < 0 and 128 - code in STOPPED_EXITS)


def cell_command(cell_path: Path) -> list[str]:
    """The command line that runs one cell (what ``--dry-run`` lists, with ``ssvi`` in front)."""
    return ["sweep", "--run-cell", str(cell_path)]


@dataclass
class Outcome:
    """How the cells of one ``run_cells`` call ended."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)  # cell -> exit code
    stopped: list[str] = field(default_factory=list)      # interrupted, resumable
    busy: list[str] = field(default_factory=list)         # run by another process: left to it
    interrupted: bool = False
    signum: int = int(signal.SIGINT)                      # what interrupted it
    halted: list[str] = field(default_factory=list)       # not started: cells of their data met the same
    repeated: str = ""                                    # data error twice, this one, which they would meet


# (event, cell name, detail): event is "start", "finish", "fail", "skip", "busy" or "stop"
Listener = Callable[[str, str, str], None]


def run_cells(sweep_dir: Path, cells: list[Cell], jobs: int, threads: Optional[int] = None,
              listener: Optional[Listener] = None, spec: Optional[SweepSpec] = None) -> Outcome:
    """Run every unfinished cell (given ``spec``, also every cell evaluated otherwise than it says),
    ``jobs`` processes at a time, each with ``threads`` torch threads."""
    note = listener or (lambda *_: None)
    outcome = Outcome()
    logs = Path(sweep_dir) / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    queue: list[Cell] = []
    for cell in cells:
        if cell_state(cell_dir(sweep_dir, cell), spec) == "done":
            outcome.skipped.append(cell.name)
            note("skip", cell.name, "already evaluated")
        else:
            queue.append(cell)
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"  # a cell's output goes to its log file, whatever the terminal's encoding
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env[PARENT_ENV] = str(os.getpid())  # a cell stops at a checkpoint once the sweep is gone (kill -9, OOM)
    running: dict[str, subprocess.Popen] = {}
    previous = {sig: signal.getsignal(sig) for sig in requests_to_stop()}
    stops: list[int] = []

    def stop(signum: int, frame: object) -> None:
        # Only noted here and acted on between starts and polls: raising from the handler could
        # leave a cell started but not yet in `running`, and blocking signals around Popen would
        # hand the block on to the cell itself.
        stops.append(signum)

    for sig in previous:
        signal.signal(sig, stop)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A sweep a script ran in the background ignores Ctrl-C, but the SIGINT it sends is its cells'
        # only stop (they run in sessions of their own): a no-op handler stands in for the ignoring, so
        # that the cells, which would inherit an ignored SIGINT, start with the default one.
        previous[signal.SIGINT] = signal.SIG_IGN
        signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        while (queue or running) and not stops:
            while queue and len(running) < jobs and not stops:
                cell = queue.pop(0)
                path = cell_dir(sweep_dir, cell)
                # Checked before the log is opened: that log is the other process's. (A cell taken in the
                # moment between the check and the start adds its one-line refusal to it.)
                if cell_busy(path):
                    outcome.busy.append(cell.name)
                    note("busy", cell.name, "running in another process")
                    continue
                with open(logs / f"{cell.name}.log", "ab", opener=_not_through_a_link) as log:
                    running[cell.name] = subprocess.Popen(
                        [sys.executable, "-m", "ssvi_cli", *cell_command(path)], stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
                note("start", cell.name, cell_state(path, spec))
            time.sleep(0.2)
            for name, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                if code == 0:
                    outcome.finished.append(name)
                    note("finish", name, _finished_elsewhere(logs / f"{name}.log"))
                elif code == BUSY_EXIT:  # taken by another process between the check and the start
                    outcome.busy.append(name)
                    note("busy", name, "running in another process")
                else:
                    outcome.failed[name] = code
                    if failure(Path(sweep_dir) / CELLS_DIR / name) is None and not was_stopped(code):
                        # killed before it could say why (by the system, say: out of memory)
                        record_failure(Path(sweep_dir) / CELLS_DIR / name, exit_text(code))
                    note("fail", name, f"{exit_text(code)}, see {logs / (name + '.log')}")
                    if code == 2 and (halt := halted(Path(sweep_dir) / CELLS_DIR, cells, outcome.failed, queue,
                                                     _method_values(spec))):
                        outcome.halted += [c.name for c in halt[0]]
                        outcome.repeated = halt[1]
                        queue[:] = [c for c in queue if c not in halt[0]]
        if stops:
            outcome.interrupted, outcome.signum = True, stops[0]
            # Further signals are only noted: the cells checkpoint.
            _stop_all(running, outcome, note, lambda name: evaluated(Path(sweep_dir) / CELLS_DIR / name, spec))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome


def _method_values(spec: Optional[SweepSpec]) -> dict[str, dict[str, Any]]:
    """What the sweep's preset's ``methods:`` section gives each method; {} without a spec."""
    from ssvi_cli import config as cfgmod

    try:
        return cfgmod.preset_methods(spec.preset)[1] if spec is not None else {}
    except cfgmod.ConfigError:  # a preset file edited or moved since the sweep began: its cells say so
        return {}


def _to_cell(proc: subprocess.Popen, kill: bool = False) -> None:
    """SIGINT, or SIGKILL (``kill``), to a cell's process group: the cell and whatever it started.
    Windows has neither process groups nor SIGKILL: a console's Ctrl-C reaches every cell by itself,
    and ``kill`` ends the cell alone."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGINT)
        elif kill:
            proc.kill()
    except ProcessLookupError:
        pass


def _stop_all(running: dict[str, subprocess.Popen], outcome: Outcome, note: Listener,
              done: Callable[[str], bool]) -> None:
    """One SIGINT to each running cell, then wait for their checkpoints (kill after the grace time).
    A cell whose evaluation is written finished, whatever its exit: the signal may reach it as it exits."""
    for proc in running.values():
        _to_cell(proc)
    deadline = time.monotonic() + STOP_GRACE_S
    for name, proc in running.items():
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _to_cell(proc, kill=True)
            code = proc.wait()
        if code == 0 or done(name):
            outcome.finished.append(name)
            note("finish", name, "")
        else:
            outcome.stopped.append(name)  # by the SIGINT sent above, whatever signal stopped the sweep
            note("stop", name, "stopped by the sweep" if code in (-signal.SIGINT, 128 + signal.SIGINT) else exit_text(code))


ALREADY_DONE = "is already trained and evaluated; nothing to do"  # a cell's run on finding it so (sweep_cell)


def _not_through_a_link(path: str, flags: int) -> int:
    """A cell's log opened as itself, never a link's target (one planted there would be appended to)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)  # as open() makes it, under the umask


def _finished_elsewhere(log: Path) -> str:
    """The detail of a cell that exited 0 having found itself trained and evaluated (by another process,
    between this sweep's check and its start), as its log's last line says; "" for one it ran."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 400))
            tail = fh.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return "trained and evaluated by another process" if tail and ALREADY_DONE in tail[-1] else ""


def exit_text(code: int) -> str:
    """A cell process's end for a person: ``exit code 130``, or ``stopped by SIGINT`` where the
    process ended by a signal (Popen's negative return code)."""
    if code < 0:
        try:
            return f"stopped by {signal.Signals(-code).name}"
        except ValueError:
            return f"stopped by signal {-code}"
    return f"exit code {code}"
