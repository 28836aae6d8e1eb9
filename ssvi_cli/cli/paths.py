"""The parser of the commands' ``--output`` files: a path as given, refused where its last part is
empty or ``.`` (``preds.csv/``, ``preds.csv/.``), which ``pathlib`` drops, so that a file would be
written where the user named a folder."""

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
