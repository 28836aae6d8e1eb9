"""A sweep's folder: the files a sweep writes there, how a new sweep claims the folder
(continuing the same grid, replacing another sweep's files with ``--force``, never emptying a
folder that is not a sweep's), and which of its cells hold runs made under other settings than
the grid's."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

from ssvi_cli import config as cfgmod
from ssvi_cli.fileio import not_ours, remove_entries, visible_entries
from ssvi_cli.methods import METHODS
from ssvi_cli.runs.rundir import CONFIG_FILE
from ssvi_cli.sweep.figures import ACCURACY_VS_FLOPS, METRICS_VS_SPARSITY
from ssvi_cli.sweep.grid import (CELLS_DIR, SWEEP_FILE, Cell, SweepError, SweepSpec, cell_configs, is_sweep_dir,
                                 read_spec, yaml_text)
from ssvi_cli.sweep.report import REPORT_JSON, REPORT_MD
from ssvi_cli.sweep.runner import LOGS_DIR

COMMANDS_FILE = "commands.txt"  # --dry-run: one cell command per line
SWEEP_ENTRIES = (SWEEP_FILE, CELLS_DIR, LOGS_DIR, COMMANDS_FILE, REPORT_JSON, REPORT_MD, METRICS_VS_SPARSITY,
                 ACCURACY_VS_FLOPS)


def claim_sweep_dir(out_dir: Path, spec: SweepSpec, force: bool) -> Optional[list[Cell]]:
    """A new sweep may write into a missing or empty folder, continue the same grid (its cells are
    returned, named as that sweep named them), or (``force``) replace another sweep's files
    (:data:`SWEEP_ENTRIES`; anything else stays). A folder holding anything else is refused,
    ``force`` or not."""
    if not out_dir.exists():
        return None
    if out_dir.is_file():
        raise SweepError(f"--out {out_dir} is a file")
    if not is_sweep_dir(out_dir):
        entries = visible_entries(out_dir)
        if entries:
            raise SweepError(not_ours(out_dir, entries, "sweep"))
        return None
    try:
        old_spec, old_cells = read_spec(out_dir)
    except SweepError:  # a sweep this ssvi can no longer expand (a preset gone, say) is not the same sweep
        old_spec, old_cells = None, []
    if old_spec == spec:
        return old_cells
    if not force:
        raise SweepError(f"{out_dir} holds a different sweep; continue it with 'ssvi sweep --resume "
                         f"{shlex.quote(str(out_dir))}', choose another --out, or replace it with --force")
    remove_entries(out_dir, SWEEP_ENTRIES)  # its cells were made under other settings and must not be reused
    return None



def changed_cells(sweep_dir: Path, spec: SweepSpec, cells: list[Cell]) -> dict[str, str]:
    """The cells whose folder holds a run made under other settings than the grid gives that cell
    now, each with what differs (``"sparse.allocation uniform, the sweep's erk"``): the preset was
    edited after the cell ran, or the folder was copied in from another sweep. Such a cell, finished,
    would be skipped, or, partial, resumed under the settings it started with, and reported under
    settings it never ran with. Keys the cell's method ignores are not compared; cells without a
    readable run config are left out."""
    import yaml

    ran: dict[str, dict[str, Any]] = {}
    for cell in cells:
        path = Path(sweep_dir) / CELLS_DIR / cell.name / CONFIG_FILE
        try:
            ran[cell.name] = cfgmod.flat_dict(cfgmod.from_dict(yaml.safe_load(path.read_text(encoding="utf-8"))))
        except (OSError, yaml.YAMLError, cfgmod.ConfigError, TypeError, ValueError):
            continue
    changed: dict[str, str] = {}
    for cell, cfg in cell_configs(spec, [c for c in cells if c.name in ran]):
        old, new, method = ran[cell.name], cfgmod.flat_dict(cfg), METHODS.get(cell.method)
        keys = [k for k in new if old.get(k) != new[k] and not method.ignores(k)]
        if keys:
            parts = [f"{k} {yaml_text(old.get(k))}, the sweep's {yaml_text(new[k])}" for k in keys[:3]]
            changed[cell.name] = "; ".join(parts) + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")
    return changed


def changed_lines(changed: dict[str, str], shown: int = 5) -> list[str]:
    """:func:`changed_cells`'s findings as indented lines, the first ``shown`` of them."""
    lines = [f"  {name}: {what}" for name, what in list(changed.items())[:shown]]
    return lines + ([f"  and {len(changed) - shown} more"] if len(changed) > shown else [])
