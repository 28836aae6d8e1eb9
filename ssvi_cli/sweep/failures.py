"""Why a sweep's cells failed: a note beside each failed cell (``cells/.<cell>.failed``: its error
and the error's kind) for the report, and the rule that stops a sweep starting cells that would fail
alike: two cells of the same data settings that failed with the same data error (a damaged image in
the folder, a dataset not on disk) leave the cells of those data settings unstarted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ssvi_cli.sweep.grid import Cell

DATA_ERROR = "DataError"  # the kind of error that depends on the data settings alone


def _failure_file(path: Path) -> Path:
    return Path(path).parent / f".{Path(path).name}.failed"  # beside the lock, outside the run directory


def record_failure(path: Path, message: str, kind: str = "") -> None:
    """Note that the cell's last run failed, and why (``kind``: the error's class name), for the
    report (cleared when it runs again). Only a note: a note that cannot be written is passed over,
    never in the way of the sweep."""
    from ssvi_cli.fileio import write_json

    try:
        write_json(_failure_file(path), {"error": message[:500], **({"kind": kind} if kind else {})})
    except OSError:
        pass


def clear_failure(path: Path) -> None:
    try:
        _failure_file(path).unlink(missing_ok=True)
    except OSError:  # not a file, or a read-only folder: the cell's own run says what is wrong
        pass


def _record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_failure_file(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and isinstance(data.get("error"), str) else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}


def failure(path: Path) -> Optional[str]:
    """Why the cell's last run failed (its error, ``stopped by SIGKILL``), or None."""
    return _record(path).get("error")


def _data(cell: Cell, per_method: dict[str, dict[str, Any]]) -> str:
    """The cell's data settings as it runs them: its method's (a preset's ``methods:`` section), then
    its own axes' (the fixed ones are every cell's)."""
    own = {**per_method.get(cell.method, {}), **cell.settings}
    return json.dumps({k: v for k, v in own.items() if k.startswith("data.")}, sort_keys=True, default=str)


def halted(cells_dir: Path, cells: list[Cell], failed: dict[str, int], queue: list[Cell],
           per_method: Optional[dict[str, dict[str, Any]]] = None) -> Optional[tuple[list[Cell], str]]:
    """The queued cells not to start, and the error they would meet: those of the data settings of two
    failed cells (exit code 2) whose data error was the same; None when there are none. ``per_method``:
    the values a preset's ``methods:`` section gives each method."""
    seen: dict[tuple[str, str], int] = {}
    by_name, per_method = {c.name: c for c in cells}, per_method or {}
    for name, code in failed.items():
        record = _record(cells_dir / name)
        if code != 2 or record.get("kind") != DATA_ERROR or name not in by_name:
            continue
        key = (_data(by_name[name], per_method), record["error"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= 2 and (halt := [c for c in queue if _data(c, per_method) == key[0]]):
            return halt, record["error"]
    return None
