"""The parser of the commands' ``--output`` files: a path as given, refused where it ends in a folder
separator (``preds.csv/``), which ``pathlib`` drops, so that a file would be written where the user
named a folder."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def output_file(text: str) -> Path:
    if text.endswith(("/", os.sep)) and text.rstrip("/" + os.sep):
        raise typer.BadParameter(f"{text} names a folder (it ends in {text[-1]}); give a file name")
    return Path(text)
