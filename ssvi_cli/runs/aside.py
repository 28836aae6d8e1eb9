"""The run ``train --force`` replaces, kept aside until the new run has a checkpoint.

The checks before ``--force`` (names, data, the layer budget) cannot see everything that fails a new
run before its first checkpoint: a model too large to allocate, weights (``--init-from``) that give a
non-finite loss at the first step. So the old run's files move into the hidden folder
:data:`ASIDE` of the run's folder rather than being removed; once the new run has a checkpoint
(after its first epoch, or a stop signal's checkpoint) they are removed, and should it end before
one they come back, the new run's files removed. A folder left with both (the machine lost mid-way)
is settled the same way the next time a command claims it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Iterable, Optional

from ssvi_cli import fileio

ASIDE = ".replaced-run"  # hidden: listings, sweeps and `inspect` pass it by
MOVED = ".moved"  # in ASIDE once every entry is in it
REMOVING = ".removed-run"  # ASIDE renamed before its removal, which a kill may cut short


def set_aside(folder: Path, entries: Iterable[str]) -> None:
    """Move the run's ``entries`` directly under ``folder`` into ``folder/ASIDE`` (a run set aside
    before is settled first: ``RunDir.check_claim``)."""
    aside = Path(folder) / ASIDE
    aside.mkdir()
    moved = []
    try:
        for name in entries:
            path = Path(folder) / name
            if path.exists() or path.is_symlink():
                path.rename(aside / name)
                moved.append(name)
    except BaseException:  # an entry that cannot move (a mount point, immutable): the run as it was
        for name in reversed(moved):
            (aside / name).rename(Path(folder) / name)
        aside.rmdir()
        raise
    (aside / MOVED).touch()  # the whole run is aside: without it, a move cut short (kill -9) is undone


def settle(folder: Path, entries: Iterable[str], new_run_kept: bool) -> Optional[str]:
    """Remove the run set aside in ``folder`` when the new one is kept (it has a checkpoint), else
    put it back in place of the new run's ``entries``; a note for the user when it came back."""
    aside = Path(folder) / ASIDE
    if not aside.is_dir():
        return None
    if not (aside / MOVED).exists():  # the move itself was cut short: the old run is still the one here
        for entry in aside.iterdir():
            if not (Path(folder) / entry.name).exists():
                entry.rename(Path(folder) / entry.name)
        _remove(aside)
        return None
    if new_run_kept:
        _remove(aside)
        return None
    entries = list(entries)
    fileio.remove_entries(folder, entries)
    for name in entries:
        if (aside / name).exists() or (aside / name).is_symlink():
            (aside / name).rename(Path(folder) / name)
    _remove(aside)
    return put_back_note(folder)


def put_back_note(folder: Path) -> str:
    return f"note: the run that --force was replacing in {folder} is put back: the new one ended before its first checkpoint"


def _remove(aside: Path) -> None:
    """Remove ``aside`` under another name first: removal takes its entries in any order, and one cut
    short after taking :data:`MOVED` would leave what reads as a move cut short, whose files the next
    command would put back beside the new run's."""
    removing = aside.parent / REMOVING  # one cut short before is gone already (settle_run)
    try:
        aside.rename(removing)
    except OSError:  # such a one still there (a file it could not remove): removed where it is
        removing = aside
    shutil.rmtree(removing, ignore_errors=True)


def settle_run(run, entries: Iterable[str]) -> Optional[str]:
    """:func:`settle` for a :class:`~ssvi_cli.runs.rundir.RunDir` and its ``entries`` (``RUN_ENTRIES``):
    the new run is kept once it has a checkpoint or has finished. Neither hidden folder is followed
    as a link: one planted in a shared runs folder would have its target's files moved in, or removed."""
    for planted in (Path(run.path) / name for name in (ASIDE, REMOVING) if (Path(run.path) / name).is_symlink()):
        raise fileio.UnwritablePath(errno.ELOOP, f"{planted} is a symbolic link, which ssvi does not follow as a run "
                                                 "set aside; remove it")
    if (Path(run.path) / REMOVING).exists():  # a removal cut short (kill -9): only the old run's files
        shutil.rmtree(Path(run.path) / REMOVING, ignore_errors=True)
    if not (Path(run.path) / ASIDE).is_dir():
        return None
    return settle(run.path, entries, bool(run.checkpoints()) or run.finished())


def kept_note(folder: Path, command: str) -> str:
    """What a reader of ``folder`` is told while a run it replaced waits in :data:`ASIDE` (a ``--force``
    run killed before its first checkpoint): ``command`` (any ``ssvi train --out folder``) puts it back."""
    if not (Path(folder) / ASIDE).is_dir():
        return ""
    return (f"the run it was replacing is kept in {Path(folder) / ASIDE}, and {command} puts it back first "
            "(then replaces it only with --force)")

