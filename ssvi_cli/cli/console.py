"""The CLI's two consoles: ``out`` (standard output: tables and results) and ``err`` (standard error:
progress, notes and errors, so that ``--json`` output stays parseable), and how a line that finds no
reader, a full disk or an odd terminal leaves the command's outcome alone."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

# Tables printed into a pipe or a file (`ssvi inspect m | less`, `> report.txt`) keep one row per line:
# rich's 80 columns for a non-terminal would fold their cells. A terminal keeps its own width, and
# COLUMNS, when set, wins as rich documents.
PIPE_WIDTH = 200
# A COLUMNS that is no positive number (0 in some containers and CI sessions) made rich print nothing
# at all, errors included: it is dropped, and the terminal's width or PIPE_WIDTH applies.
try:
    _columns_ok = int(os.environ.get("COLUMNS", "1")) >= 1
except ValueError:
    _columns_ok = False
if not _columns_ok:
    os.environ.pop("COLUMNS")


class _Console(Console):
    """A console whose lines may find no reader (``| head``, ``| true``, a closed terminal), or, on
    standard error, a full disk (``2> log`` on a full file system), without ending the command or
    touching the other stream: the work goes on, and the command ends as it would have (rich exited 1
    for standard output, "a runtime failure": a table or report cut short by its reader failed a
    finished command)."""

    def print(self, *objects: Any, **options: Any) -> None:
        # A table whose words do not fit the terminal is printed at its own width, its lines wrapped by
        # the terminal: rich would cut its numbers ("0.99…") or break them ("4," over "072"). The width
        # is touched for that print alone (a progress bar redraws from another thread meanwhile).
        narrow = self.width
        wide = max([narrow, *(_own_width(self, o, narrow) for o in objects if isinstance(o, Table))])
        set_width = self._width  # None: the terminal's, read at each print (a resized window's)
        try:
            if wide > narrow:
                self.width = wide
            super().print(*objects, **options)
        except OSError as exc:  # standard output's full disk (> report.txt) is the command's failure
            if not self.stderr and not isinstance(exc, BrokenPipeError):
                raise
            no_reader(stdout=not self.stderr)
        finally:
            if wide > narrow:
                self._width = set_width

    def on_broken_pipe(self) -> None:
        # rich points standard *output* at /dev/null and exits, for either console: a report on stdout
        # was lost, with exit code 0, when only stderr's reader had gone.
        self.quiet = True
        no_reader(stdout=not self.stderr)


def _own_width(console: Console, table: Table, width: int) -> int:
    """``table``'s natural width where ``width`` cannot hold its longest word of each column side by
    side (rich's minimum measure, taken without the console's width as its bound); else ``width``."""
    measured = Measurement.get(console, console.options.update_width(1 << 16), table)
    return width if measured.minimum <= width else measured.maximum


@contextmanager
def reader_may_go() -> Iterator[None]:
    """Writes to standard output in the block whose reader goes (``| head``) end it quietly, as
    :class:`_Console` takes them; a full disk (> report.json) is not that: the command fails, saying so."""
    try:
        yield
    except BrokenPipeError:
        no_reader(stdout=True)


def write_out(text: str) -> None:
    """``text`` on standard output as it is (JSON, command lines), flushed (:func:`reader_may_go`)."""
    with reader_may_go():
        sys.stdout.write(text)
        sys.stdout.flush()


def _console(stderr: bool = False) -> Console:
    # markup=False: paths, class names and messages print as written ("IMG [copy].png" keeps its
    # brackets); the few styled lines ask for markup themselves and escape what they insert.
    console = _Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


# Human-facing progress and messages go to stderr so that ``--json`` stdout stays parseable.
out = _console()
err = _console(stderr=True)


def tell(text: Any, console: Optional[Console] = None, **options: Any) -> None:
    """A line (or a table) on stderr, or on ``console``, that may find no reader (``| head``, ``| tee``
    ended by the same Ctrl-C, a closed terminal) without changing how the command ends: rich answers
    a broken pipe with SystemExit(1). The stream that lost its reader is pointed at /dev/null, so that
    later lines and Python's flush at exit (exit code 120) find nothing broken either."""
    console = console or err
    try:
        console.print(text, **options)
    except (OSError, SystemExit):
        no_reader(stdout=not console.stderr)


def no_reader(stdout: bool = False) -> None:
    """Point stderr (``stdout``: standard output), whose reader is gone, at /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, (sys.stdout if stdout else sys.stderr).fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's captured stream): nothing to redirect
        pass
