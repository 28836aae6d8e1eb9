"""A sweep's folder: the files a sweep writes there, and how a new sweep claims the folder
(continuing the same grid, replacing another sweep's files with ``--force``, never emptying a
folder that is not a sweep's)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from ssvi_cli import config as cfgmod
from ssvi_cli.fileio import not_ours, remove_entries, visible_entries
from ssvi_cli.locks import Locked, acquire_lock
from ssvi_cli.machine import quote_path
from ssvi_cli.sweep.figures import ACCURACY_VS_FLOPS, METRICS_VS_SPARSITY
from ssvi_cli.sweep.grid import (CELLS_DIR, SWEEP_FILE, Cell, SweepError, SweepSpec, expand, is_sweep_dir,
                                numbers, read_spec, yaml_text)
from ssvi_cli.sweep.report import REPORT_JSON, REPORT_MD
from ssvi_cli.sweep.runner import LOGS_DIR
from ssvi_cli.sweep.sweepfile import read_entry, write_entry

COMMANDS_FILE = "commands.txt"  # --dry-run: one cell command per line
SWEEP_ENTRIES = (SWEEP_FILE, CELLS_DIR, LOGS_DIR, COMMANDS_FILE, REPORT_JSON, REPORT_MD, METRICS_VS_SPARSITY,
                 ACCURACY_VS_FLOPS)


RAN_WITH = "ran_with"  # sweep.json: the --jobs and --threads the sweep last ran its cells with


def record_processes(sweep_dir: Path, jobs: int, threads: Optional[int], figures: bool = True) -> None:
    """Write into ``sweep.json`` the ``--jobs``/``--threads`` the cells run with now, which a
    ``--resume`` without them takes again (a CPU cell's numbers move in their last digits with its
    thread count), and whether the report has figures (``--no-figures``), which it keeps too."""
    write_entry(sweep_dir, RAN_WITH, processes_entry(jobs, threads, figures)[RAN_WITH])


def processes_entry(jobs: int, threads: Optional[int], figures: bool) -> dict[str, Any]:
    """``record_processes``'s entry, for a new grid to write with it (``threads`` None: the cores
    shared among the jobs, as a ``--resume`` then works them out again)."""
    return {RAN_WITH: {"jobs": jobs, "threads": threads, "figures": figures}}


def record_figures(sweep_dir: Path, figures: bool) -> None:
    """Write into ``sweep.json`` whether the report has figures, as a dry run is given (the jobs and
    threads that cells ran with, if any did, kept): ``--run-cell`` runs the cells, ``--report`` reads it."""
    write_entry(sweep_dir, RAN_WITH, {"figures": figures})


def _ran_with(sweep_dir: Path) -> dict[str, Any]:
    """What ``record_processes`` wrote (empty for a sweep from before it was recorded, or unreadable)."""
    return read_entry(sweep_dir, RAN_WITH)


def recorded_figures(sweep_dir: Path) -> bool:
    """Whether the sweep last ran with figures (``record_processes``; yes for one from before that
    was recorded)."""
    return _ran_with(sweep_dir).get("figures") is not False


def recorded_processes(sweep_dir: Path) -> tuple[Optional[int], Optional[int]]:
    """The ``--jobs`` and ``--threads`` of ``record_processes`` (None, None for a sweep from before
    they were recorded)."""
    ran = _ran_with(sweep_dir)
    jobs, threads = (ran.get(k) for k in ("jobs", "threads"))
    return tuple(v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None  # type: ignore[return-value]
                 for v in (jobs, threads))


def claim_sweep_dir(out_dir: Path, spec: SweepSpec, cells: list[Cell], force: bool
                    ) -> tuple[str, SweepSpec, list[Cell], list[str]]:
    """How a new sweep takes ``out_dir``, the grid and cells it runs there, and what to tell the user:
    ``new`` (a missing or empty folder), ``same`` (the same grid, continued: its cells, named as that
    sweep named them), ``grown`` (a grid that trains every cell of the one there under the same
    settings and maybe more, seeds or values, say, or evaluates it otherwise: the finished cells
    kept, each one evaluated otherwise than the grid asks evaluated again), or ``replaced``
    (``force``: another sweep's files, :data:`SWEEP_ENTRIES`, removed; anything else stays). A folder
    holding anything else is refused, ``force`` or not."""
    if not out_dir.exists():
        return "new", spec, cells, []
    if out_dir.is_file():
        raise SweepError(f"--out {out_dir} is a file")
    if not is_sweep_dir(out_dir):
        entries = visible_entries(out_dir)
        if entries:
            raise SweepError(not_ours(out_dir, entries, "sweep"))
        return "new", spec, cells, []
    try:
        old_spec, old_cells = read_spec(out_dir)
    except SweepError:  # a sweep this ssvi can no longer expand (a preset gone, say) is not the same sweep
        old_spec, old_cells = None, []
    if old_spec is not None:  # an older sweep may hold 1e-3 as text, or 1 for 1.0: the same values
        old_spec = replace(old_spec, axes=numbers(old_spec.axes), fixed=numbers(old_spec.fixed))
        spec, cells = _in_its_terms(old_spec, spec, cells)
    if old_spec == spec:
        return "same", spec, old_cells, []  # named as that sweep named them
    if old_spec is not None and _grows(out_dir, old_spec, old_cells, spec, cells):
        notes = []
        if len(cells) > len(old_cells):
            notes.append(f"the grid adds to the sweep in {out_dir}: {len(cells)} cells now, its cells so far kept")
        if (set(old_spec.ood), old_spec.samples) != (set(spec.ood), spec.samples):
            notes.append(f"the sweep in {out_dir} is evaluated otherwise now (--ood or --samples): each finished "
                         "cell evaluated otherwise is evaluated again, its training kept")
        if old_spec.fixed != spec.fixed:
            notes.append(f"the sweep in {out_dir} goes on with the fixed values given now (they train its cells "
                         "alike: a device, a data folder, or a value its preset had) for the cells not started; "
                         "its finished cells are kept, and a started one resumes as it began (on the device "
                         "given, if one is)")
        return "grown", spec, cells, notes
    if old_spec is not None and not force and _part_of(out_dir, old_spec, old_cells, spec, cells):
        quoted = quote_path(out_dir)
        part = "this grid's one cell is" if len(cells) == 1 else f"this grid's {len(cells)} cells are"
        raise SweepError(f"{out_dir} holds a larger sweep of {len(old_cells)} cells, of which {part} a part: run it "
                         f"all, as it was made, with 'ssvi sweep --resume {quoted}', one cell with "
                         f"'ssvi sweep --run-cell {quoted}/cells/NAME', or choose another --out")
    if not force:
        names = {c.name for c in cells}
        left = [c.name for c in old_cells if c.name not in names]
        # Said only where listing them would do: the grid's fixed values and preset are the sweep's.
        alike = old_spec is not None and (old_spec.preset, old_spec.fixed) == (spec.preset, spec.fixed)
        which = (f"its one cell, {left[0]}" if len(old_cells) == 1 else
                 f"{'all ' * (len(left) == len(old_cells))}{len(left)} of its {len(old_cells)} cells, {left[0]}"
                 + " and others" * (len(left) > 1)) if left else ""
        leaves = (f"; this grid leaves out {which}: a grid that adds to it lists {'it' if len(left) == 1 else 'them'} "
                  "too, a sweep file's seeds: [0, 1, 2, 3] rather than [3], say") if left and alike else ""
        said = "".join(f", {change}" for change in (_grid_changes(old_spec, spec) if old_spec is not None else []))
        raise SweepError(f"{out_dir} holds a different sweep (a grid that only adds seeds, methods, sparsities "
                         f"or values to it, or evaluates it otherwise, continues it; this one changes what it "
                         f"trains{said}{leaves}): continue it as it is with "
                         f"'ssvi sweep --resume {quote_path(out_dir)}', choose another --out, or replace "
                         "it and its cells with --force (in a run: a dry run deletes nothing)")
    with _sweep_held(out_dir):  # no sweep runs it, and none of its cells starts, meanwhile
        remove_entries(out_dir, SWEEP_ENTRIES)  # its cells were made under other settings and must not be reused
    return "replaced", spec, cells, []


SWEEP_LOCK = ".sweep.lock"  # shared by every `ssvi sweep` running the folder's cells; --force takes it alone


def sweep_lock(out_dir: Path) -> Any:
    """The lock an ``ssvi sweep`` that runs the cells of ``out_dir`` holds while it runs (shared: two
    sweeps may share the cells); a :class:`SweepError` while ``--force`` is replacing the sweep."""
    try:
        return acquire_lock(out_dir / SWEEP_LOCK, "the sweep's lock", shared=True)
    except Locked:
        raise SweepError(f"the sweep in {out_dir} is being replaced (--force) by another process") from None


def _sweep_held(out_dir: Path) -> ExitStack:
    """The sweep's lock, alone, and the lock of every cell it has started, held; a :class:`SweepError`
    if another process is running the sweep (an ``ssvi sweep``) or one of its cells (a scheduler's
    ``--run-cell``)."""
    held = ExitStack()
    cells_dir = out_dir / CELLS_DIR
    locks = [out_dir / SWEEP_LOCK, *(sorted(cells_dir.glob(".*.lock")) if cells_dir.is_dir() else [])]
    try:
        for lock in locks:
            try:
                held.enter_context(acquire_lock(lock, "the sweep's lock" if lock.name == SWEEP_LOCK else "a cell's lock"))
            except Locked as exc:
                what = ("an ssvi sweep" if lock.name == SWEEP_LOCK else
                        f"its cell {lock.name[1:-len('.lock')]}, in process {exc.holder}")
                raise SweepError(f"{out_dir} holds a sweep that is running ({what}): stop it (Ctrl-C) or let it "
                                 "end before replacing it with --force") from None
    except BaseException:
        held.close()
        raise
    return held


def _in_its_terms(old: SweepSpec, new: SweepSpec, cells: list[Cell]) -> tuple[SweepSpec, list[Cell]]:
    """``new`` with each value that equals one of ``old``'s written as ``old`` wrote it (a sweep made
    before ``1`` and ``1.0`` were one value named its cells ``beta-1``; one made before its data paths
    were recorded absolute holds them as typed), so its cells keep their names; and the cells of that
    grid."""
    def same(key: str, value: Any, known: list[Any]) -> Any:
        return next((k for k in known if type(k) is not bool and type(value) is not bool
                     and (k == value or cfgmod.absolute_path(key, k) == value)), value)

    order = [k for k in old.axes if k in new.axes] + [k for k in new.axes if k not in old.axes]  # names keep theirs
    axes = {k: [same(k, v, list(old.axes.get(k, []))) for v in new.axes[k]] for k in order}
    fixed = {k: same(k, v, [old.fixed[k]] if k in old.fixed else []) for k, v in new.fixed.items()}
    if json.dumps([axes, fixed]) == json.dumps([new.axes, new.fixed]):  # JSON tells 1 from 1.0, and the order
        return new, cells
    adjusted = replace(new, axes=axes, fixed=fixed)
    return adjusted, expand(adjusted)


def _grid_changes(old: SweepSpec, new: SweepSpec) -> list[str]:
    """What the grid given sets otherwise than the sweep there, as flags: its preset, and each key of
    its ``--set`` (a value, or an axis's values), ``leaving out the sweep's --set optim.lr=0.005``."""
    said = [f"giving --preset {new.preset} for the sweep's {old.preset}"] if old.preset != new.preset else []

    def given(spec: SweepSpec, key: str) -> Optional[str]:
        values = spec.axes.get(key, spec.fixed.get(key, _UNSET))
        return None if values is _UNSET else ",".join(map(yaml_text, values)) if key in spec.axes else yaml_text(values)

    for key in dict.fromkeys([*old.axes, *old.fixed, *new.axes, *new.fixed]):
        here, there = given(new, key), given(old, key)
        if here != there:
            said.append(f"leaving out the sweep's --set {key}={there}" if here is None else
                        f"adding --set {key}={here}" if there is None else f"giving --set {key}={here} for the sweep's {there}")
    return said


_UNSET = object()


def _part_of(out_dir: Path, old: SweepSpec, old_cells: list[Cell], new: SweepSpec, cells: list[Cell]) -> bool:
    """Whether ``new`` is a part of the sweep ``old`` (fewer seeds, methods or values): each of its
    cells is one of ``old``'s, trained alike."""
    from ssvi_cli.sweep.drift import trains_alike

    names = {c.name for c in cells}
    mine = [c for c in old_cells if c.name in names]
    if len(mine) != len(cells) or (old.preset, list(old.axes)) != (new.preset, list(new.axes)):
        return False
    try:
        return trains_alike(out_dir, old, mine, new, cells)
    except SweepError:
        return False


def _grows(out_dir: Path, old: SweepSpec, old_cells: list[Cell], new: SweepSpec, cells: list[Cell]) -> bool:
    """Whether ``new`` trains what ``old`` trained and maybe more (seeds, methods, sparsities or axis
    values): the same preset and axis keys, and every old cell among the new ones (a cell's name
    spells its method, sparsity, settings and seed) with a config that trains alike
    (``drift.trains_alike``: a fixed value the preset had, or another device, changes nothing). Each finished cell's config is
    checked again before it is reused, as on every resume; a cell evaluated otherwise than ``new``
    evaluates (``--ood``, ``--samples``) is evaluated again (``runner.evaluated``)."""
    from ssvi_cli.sweep.drift import trains_alike

    if (old.preset, list(old.axes)) != (new.preset, list(new.axes)):  # new's axes in old's order (_in_its_terms)
        return False
    try:
        return trains_alike(out_dir, old, old_cells, new, cells)
    except SweepError:  # the old grid no longer expands (a preset gone): not the same sweep
        return False
