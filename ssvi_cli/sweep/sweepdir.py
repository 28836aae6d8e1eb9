"""A sweep's folder: the files a sweep writes there, and how a new sweep claims the folder
(continuing the same grid, replacing another sweep's files with ``--force``, never emptying a
folder that is not a sweep's)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from ssvi_cli.fileio import not_ours, remove_entries, visible_entries
from ssvi_cli.sweep.figures import ACCURACY_VS_FLOPS, METRICS_VS_SPARSITY
from ssvi_cli.sweep.grid import CELLS_DIR, SWEEP_FILE, Cell, SweepError, SweepSpec, is_sweep_dir, read_spec
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
