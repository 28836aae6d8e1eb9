"""A sweep's folder: the files a sweep writes there, and how a new sweep claims the folder
(continuing the same grid, replacing another sweep's files with ``--force``, never emptying a
folder that is not a sweep's)."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from ssvi_cli.fileio import not_ours, remove_entries, visible_entries
from ssvi_cli.sweep.figures import ACCURACY_VS_FLOPS, METRICS_VS_SPARSITY
from ssvi_cli.sweep.grid import (CELLS_DIR, SWEEP_FILE, Cell, SweepError, SweepSpec, is_sweep_dir, numbers,
                                read_spec)
from ssvi_cli.sweep.report import REPORT_JSON, REPORT_MD
from ssvi_cli.sweep.runner import LOGS_DIR

COMMANDS_FILE = "commands.txt"  # --dry-run: one cell command per line
SWEEP_ENTRIES = (SWEEP_FILE, CELLS_DIR, LOGS_DIR, COMMANDS_FILE, REPORT_JSON, REPORT_MD, METRICS_VS_SPARSITY,
                 ACCURACY_VS_FLOPS)


def claim_sweep_dir(out_dir: Path, spec: SweepSpec, cells: list[Cell], force: bool) -> tuple[str, list[Cell]]:
    """How a new sweep takes ``out_dir``, and the cells it runs there: ``new`` (a missing or empty
    folder; ``cells``), ``same`` (the same grid, continued: its cells, named as that sweep named
    them), ``grown`` (a grid that holds every cell of the one there under the same settings, more
    seeds or values, say: ``cells``, the finished ones kept), ``reevaluated`` (grown, or the same
    grid, evaluated otherwise: the trained cells kept and evaluated again), or ``replaced`` (``force``: another
    sweep's files, :data:`SWEEP_ENTRIES`, removed; anything else stays). A folder holding anything
    else is refused, ``force`` or not."""
    if not out_dir.exists():
        return "new", cells
    if out_dir.is_file():
        raise SweepError(f"--out {out_dir} is a file")
    if not is_sweep_dir(out_dir):
        entries = visible_entries(out_dir)
        if entries:
            raise SweepError(not_ours(out_dir, entries, "sweep"))
        return "new", cells
    try:
        old_spec, old_cells = read_spec(out_dir)
    except SweepError:  # a sweep this ssvi can no longer expand (a preset gone, say) is not the same sweep
        old_spec, old_cells = None, []
    if old_spec is not None:  # an older sweep may hold 1e-3 as text: the same value
        old_spec = replace(old_spec, axes=numbers(old_spec.axes), fixed=numbers(old_spec.fixed))
    if old_spec == spec:
        return "same", old_cells  # named as that sweep named them
    if old_spec is not None and _grows(old_spec, old_cells, spec, cells):
        same_evaluation = (old_spec.ood, old_spec.samples) == (spec.ood, spec.samples)
        return ("grown" if same_evaluation else "reevaluated"), cells
    if not force:
        raise SweepError(f"{out_dir} holds a different sweep (a grid that only adds seeds, methods, sparsities "
                         f"or values to it, or evaluates it otherwise, continues it; this one changes what it "
                         f"trains): continue it as it is with "
                         f"'ssvi sweep --resume {shlex.quote(str(out_dir))}', choose another --out, or replace "
                         "it and its cells with --force (in a run: a dry run deletes nothing)")
    remove_entries(out_dir, SWEEP_ENTRIES)  # its cells were made under other settings and must not be reused
    return "replaced", cells


def _grows(old: SweepSpec, old_cells: list[Cell], new: SweepSpec, cells: list[Cell]) -> bool:
    """Whether ``new`` trains what ``old`` trained and maybe more (seeds, methods, sparsities or axis
    values): the same preset, fixed keys and axis keys, and every old cell among the new ones (a
    cell's name spells its method, sparsity, settings and seed). Each finished cell's config is
    checked again before it is reused, as on every resume; a cell evaluated otherwise than ``new``
    evaluates (``--ood``, ``--samples``) is evaluated again (``runner.evaluated``)."""
    same = (old.preset, old.fixed, list(old.axes)) == (new.preset, new.fixed, list(new.axes))
    return same and {c.name for c in old_cells} <= {c.name for c in cells}
