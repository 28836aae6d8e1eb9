"""A sweep's ``sweep.json``: its grid (``write_spec``) and the entries kept beside it: how its cells
last ran (``sweepdir``), the image folders they trained on (``drift``). Each entry is read as a mapping,
empty for a sweep from before it was recorded. Every write reads the file, changes its own part and
writes the rest back under a lock (``.sweep.json.lock``), so that processes running one sweep's cells
at once (``--run-cell``s, a ``--resume``) lose none of each other's entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ssvi_cli.fileio import write_json
from ssvi_cli.locks import acquire_lock
from ssvi_cli.sweep.grid import SWEEP_FILE, SWEEP_VERSION, Cell, SweepSpec

SWEEP_FILE_LOCK = ".sweep.json.lock"  # held a moment by each write of sweep.json
GRID_KEYS = ("format", "version", "spec", "cells")  # what write_spec writes; the rest are entries


def _read(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def read_entry(sweep_dir: Path, key: str) -> dict[str, Any]:
    """The mapping under ``key`` in the sweep's ``sweep.json`` (empty: absent, not a mapping, or the
    file unreadable)."""
    found = _read(Path(sweep_dir) / SWEEP_FILE).get(key)
    return found if isinstance(found, dict) else {}


def write_entry(sweep_dir: Path, key: str, value: dict[str, Any]) -> None:
    """Write the keys of ``value`` into the mapping under ``key`` in the sweep's ``sweep.json``, its
    other keys and the file's other entries kept."""
    path = Path(sweep_dir) / SWEEP_FILE
    with acquire_lock(Path(sweep_dir) / SWEEP_FILE_LOCK, "the lock of sweep.json", wait=True):
        data = json.loads(path.read_text(encoding="utf-8"))
        held = data.get(key)
        write_json(path, {**data, key: {**(held if isinstance(held, dict) else {}), **value}})


def write_spec(sweep_dir: Path, spec: SweepSpec, cells: list[Cell], entries: Optional[dict[str, Any]] = None) -> None:
    """Write the sweep's grid into its ``sweep.json`` with ``entries`` (written with it, so that a stop
    right after it loses none); the other entries of a grid it grows are kept."""
    path = Path(sweep_dir) / SWEEP_FILE
    with acquire_lock(Path(sweep_dir) / SWEEP_FILE_LOCK, "the lock of sweep.json", wait=True):
        kept = {k: v for k, v in _read(path).items() if k not in GRID_KEYS}
        write_json(path, {"format": "ssvi-sweep", "version": SWEEP_VERSION, "spec": spec.to_dict(),
                          "cells": [c.name for c in cells], **kept, **(entries or {})})
