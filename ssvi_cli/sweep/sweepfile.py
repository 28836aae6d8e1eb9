"""Entries a sweep keeps in its ``sweep.json`` beside the grid (``grid.write_spec``): how its cells
last ran (``sweepdir``), the image folders they trained on (``drift``). Each is read as a mapping, empty
for a sweep from before it was recorded, and written back into the file with the rest kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssvi_cli.fileio import write_json
from ssvi_cli.sweep.grid import SWEEP_FILE


def read_entry(sweep_dir: Path, key: str) -> dict[str, Any]:
    """The mapping under ``key`` in the sweep's ``sweep.json`` (empty: absent, not a mapping, or the
    file unreadable)."""
    try:
        found = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text(encoding="utf-8")).get(key) or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}


def write_entry(sweep_dir: Path, key: str, value: dict[str, Any]) -> None:
    """Put ``value`` under ``key`` in the sweep's ``sweep.json``, its other entries kept."""
    path = Path(sweep_dir) / SWEEP_FILE
    write_json(path, {**json.loads(path.read_text(encoding="utf-8")), key: value})
