"""The parser of the commands' ``--output`` files: a path as given, refused where its last part is
empty or ``.`` (``preds.csv/``, ``preds.csv/.``), which ``pathlib`` drops, so that a file would be
written where the user named a folder; and the trial of an output folder that is still missing."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ssvi_cli.cli.common import UsageError


def output_file(text: str) -> Path:
    separators = r"[/\\]" if os.sep == "\\" else "/"
    if re.split(separators, text)[-1] in ("", ".") and text.strip("/" + os.sep + "."):
        # one line, as ssvi's checks of a value say it (not Click's usage box)
        raise UsageError(f"--output {text} names a folder (it ends in {text[len(text.rstrip('/' + os.sep + '.')):]}); "
                         "give a file name")
    return Path(text)


def try_making(folder: Path, what: str) -> None:
    """Make ``folder``'s missing folders and remove them again, so that a folder the system refuses
    only when it is made (under /proc, say) is refused before the work whose output goes there, and
    a failed command leaves no empty folder behind."""
    made: list[Path] = []
    try:
        for step in [*reversed(folder.parents), folder]:
            if not step.exists():
                step.mkdir()
                made.append(step)
    except OSError as exc:
        raise UsageError(f"{what} cannot be made: {exc.strerror or exc}") from None
    finally:
        for step in reversed(made):
            try:
                step.rmdir()
            except OSError:  # filled meanwhile by another process: it stays
                break
