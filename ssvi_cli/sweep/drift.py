"""Cells whose run was made under other settings than the grid gives them now: the preset was edited
after they ran, or their folders were copied in from another sweep. Such a cell, finished, would be
skipped, or, partial, resumed under the settings it started with, and reported under settings it
never ran with; so a sweep refuses to run on while it has one, and its report names them.

Compared: every config key that changes what a run trains. Not compared: keys that change nothing
for the cell's model, data and method (``training.unused.unused_settings``: those ``ssvi presets``
marks "not used", among them what the method never uses), and keys that change where or how fast it
runs but not what it learns (:data:`NOT_COMPARED`). Published weights are compared by
the version they resolve to, as the run's config records them (``torchvision:DEFAULT`` names one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ssvi_cli import config as cfgmod
from ssvi_cli.fileio import brief
from ssvi_cli.runs.rundir import CONFIG_FILE
from ssvi_cli.sweep.grid import CELLS_DIR, Cell, SweepSpec, cell_configs, yaml_text
from ssvi_cli.sweep.runner import cell_dir, cell_state
from ssvi_cli.sweep.sweepfile import read_entry, write_entry
from ssvi_cli.training.unused import unused_settings

NOT_COMPARED = frozenset({"train.device", "train.kernel", "train.num_workers", "train.checkpoint_every",
                          "train.keep_checkpoints", "train.eval_samples", "data.max_test", "data.data_dir",
                          "data.download"})
SHOWN_KEYS = 3  # differing keys named per cell


def changed_cells(sweep_dir: Path, spec: SweepSpec, cells: list[Cell]) -> dict[str, str]:
    """``{cell: what differs}`` (``"sparse.allocation uniform, the sweep's erk"``) for the cells that
    have started (a checkpoint, a finished run, an evaluation) under other settings than the grid's.
    A cell that wrote its config and no checkpoint starts again anyway, and is not compared; one whose
    config cannot be read is named with the reason."""
    return {name: what for name, (what, _) in changed_details(sweep_dir, spec, cells).items()}


def ran_with(details: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The values every changed cell (``details``, :func:`changed_details`) ran with where the grid now
    gives others, when they are the same keys and values for all of them (a preset changed under the
    sweep): ``--set`` of these, given with the grid again, goes on as they ran (:func:`trains_alike`);
    else ``{}``."""
    ran = [values for _, values in details.values()]
    return ran[0] if ran and ran[0] and all(values == ran[0] for values in ran) else {}


def changed_details(sweep_dir: Path, spec: SweepSpec, cells: list[Cell],
                    states: Optional[dict[str, Optional[str]]] = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{cell: (what differs, {key: the value it ran with})}`` (:func:`changed_cells`; no values for
    a config that cannot be read, nor for a cell whose image folder changed: ``states`` as
    :func:`folder_states` gives them, read here when needed and not given)."""
    changed = _changed_settings(sweep_dir, spec, cells)
    recorded = recorded_folders(sweep_dir)
    scans: dict[str, Any] = {}
    for cell, cfg in cell_configs(spec, [c for c in cells if c.name not in changed]):
        name = cfg.data.name
        if cfgmod.image_folder(name) is None or cell_state(cell_dir(sweep_dir, cell)) == "new":
            continue
        if name in recorded:
            states = states if states is not None else folder_states(spec, cells)
            if states.get(name) not in (None, recorded[name]):
                changed[cell.name] = (f"its image folder {name.partition(':')[2]} has changed since the sweep's cells "
                                      "trained on it (its images differ: added, removed, or of another size)", {})
        elif (what := _unrecorded_change(cell_dir(sweep_dir, cell), cfg, scans)) is not None:
            changed[cell.name] = (what, {})
    return changed


def _unrecorded_change(path: Path, cfg: Any, scans: dict[str, Any]) -> Optional[str]:
    """For a cell of a sweep from an ssvi that recorded no image folders (whose first run of this one
    records them as they are): what differs between the training images its summary counts and the
    folder's now (``scans``: the folders scanned so far), where it trained on all of them (no
    ``data.max_train``, no ``data.classes`` holding some back); else None."""
    from ssvi_cli.data.imagefolder import scan_folder
    from ssvi_cli.data.spec import DataError
    from ssvi_cli.runs.rundir import RunDir

    images, folder = RunDir(path).read_summary().get("images"), cfg.data.name.partition(":")[2]
    if not isinstance(images, dict) or cfg.data.max_train is not None or cfg.data.classes is not None:
        return None
    try:
        scan = scans[folder] = scans.get(folder) or scan_folder(Path(folder))
    except (DataError, OSError):  # moved or gone: the cell's own run names it
        return None
    parts = {part: len(files) for part, (files, _) in scan.parts.items()}
    if "all" in parts:  # the flat layout: ssvi draws the test split, which max_test may cap
        then, now = (sum(images.values()), parts["all"]) if cfg.data.max_test is None else (None, None)
    else:
        then, now = images.get("train", 0) + images.get("val", 0), parts.get("train", 0) + parts.get("val", 0)
    if then is None or then == now:
        return None
    what = "images" if "all" in parts else "training images"
    return (f"its image folder {folder} holds {now} {what} now, {then} when the cell trained on it "
            "(a sweep from an earlier ssvi, which recorded no image folders to compare)")


FOLDERS_KEY = "image_folders"  # sweep.json: each image folder's digest as its started cells trained on it


def folder_states(spec: SweepSpec, cells: list[Cell]) -> dict[str, Optional[str]]:
    """``{imagefolder:PATH: its digest now}`` (``data.imagefolder.folder_digest``; None where it cannot
    be read: a folder moved or gone, which its cells' own runs name) for the image folders of ``cells``."""
    from ssvi_cli.data.imagefolder import folder_digest, scan_folder
    from ssvi_cli.data.spec import DataError

    states: dict[str, Optional[str]] = {}
    for name in sorted({cfg.data.name for _, cfg in cell_configs(spec, cells) if cfgmod.image_folder(cfg.data.name) is not None}):
        try:
            states[name] = folder_digest(scan_folder(Path(name.partition(":")[2])))
        except (DataError, OSError):
            states[name] = None
    return states


def recorded_folders(sweep_dir: Path) -> dict[str, str]:
    """The digests :func:`record_folders` wrote (none for a sweep from before they were)."""
    return {str(k): str(v) for k, v in read_entry(sweep_dir, FOLDERS_KEY).items()}


def record_folders(sweep_dir: Path, spec: SweepSpec, cells: list[Cell],
                   states: Optional[dict[str, Optional[str]]] = None) -> None:
    """Write into ``sweep.json`` the digest of each image folder of ``cells`` as it is now (``states``,
    :func:`folder_states`), where no cell has begun on it yet (a checkpoint, or a run that another
    process holds: in its first epoch, reading the folder), or none was recorded: what later runs of the
    sweep compare. A cell stopped in its first epoch starts again, on the folder as it is then."""
    from ssvi_cli.locks import lock_holder
    from ssvi_cli.runs.rundir import LOCK_FILE

    states = states if states is not None else folder_states(spec, cells)
    recorded = recorded_folders(sweep_dir)
    started = {cfg.data.name for cell, cfg in cell_configs(spec, cells)
               if cell_state(path := cell_dir(sweep_dir, cell)) != "new" or lock_holder(path / LOCK_FILE) is not None}
    update = {k: v for k, v in states.items() if v is not None and (k not in started or k not in recorded)}
    if any(recorded.get(k) != v for k, v in update.items()):
        write_entry(sweep_dir, FOLDERS_KEY, update)


def _changed_settings(sweep_dir: Path, spec: SweepSpec, cells: list[Cell]) -> dict[str, tuple[str, dict[str, Any]]]:
    """:func:`changed_details` of the cells' configs."""
    import yaml

    ran: dict[str, dict[str, Any]] = {}
    changed: dict[str, tuple[str, dict[str, Any]]] = {}
    for cell in cells:
        path = cell_dir(sweep_dir, cell)
        if cell_state(path) == "new":
            continue
        try:
            ran[cell.name] = recorded_config(path)
        except (OSError, yaml.YAMLError, cfgmod.ConfigError, TypeError, ValueError) as exc:
            why = brief(getattr(exc, "problem", None) or exc)
            changed[cell.name] = (f"its {CONFIG_FILE} cannot be read ({why})", {})
    for cell, cfg in cell_configs(spec, [c for c in cells if c.name in ran]):
        old, new = ran[cell.name], cfgmod.flat_dict(cfg)
        new["model.init_from"] = _resolved(cfg)
        keys = differing(old, new, cfg)
        if keys:
            parts = [f"{k} {yaml_text(old.get(k))}, the sweep's {yaml_text(new[k])}" for k in keys[:SHOWN_KEYS]]
            more = f"; and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            changed[cell.name] = "; ".join(parts) + more, {k: old.get(k) for k in keys}
    return changed


def recorded_config(cell_path: Path) -> dict[str, Any]:
    """The flat config a cell ran with, as its ``config.yaml`` records it (raises what reading it
    raises)."""
    import yaml

    recorded = cfgmod.flat_dict(cfgmod.from_dict(yaml.safe_load((cell_path / CONFIG_FILE).read_text(encoding="utf-8"))))
    # A path recorded as typed (before runs recorded them absolute) is the one it names from here.
    return {k: cfgmod.absolute_path(k, v) for k, v in recorded.items()}


def differing(old: dict[str, Any], new: dict[str, Any], cfg: cfgmod.Config) -> list[str]:
    """The keys of two flat configs (``config.flat_dict``), ``new`` that of ``cfg``, whose values differ
    in a way that changes what a run of ``cfg`` trains (not :data:`NOT_COMPARED`, not a key that
    changes nothing for its model, data and method). A key that decides whether another is used
    (``bayes.mu_init`` for ``bayes.mu_init_std``, say) is compared itself."""
    unused = unused_settings(cfg)
    return [k for k in new if old.get(k) != new[k] and k not in NOT_COMPARED and k not in unused]


def trains_alike(sweep_dir: Path, old: SweepSpec, old_cells: list[Cell], new: SweepSpec, cells: list[Cell]) -> bool:
    """Whether every cell of ``old_cells`` is among ``cells`` by name and trains alike under ``new``
    (:func:`differing`): as under ``old``, both read through the preset as it is now (a cell an edit
    of it made stale is named by :func:`changed_cells` before it runs), or as it ran, a started cell
    as its recorded config says, a cell not started then differing from ``old`` only where the
    started cells ran with other values than the preset gives now, with theirs: those of its method,
    or for a method with no cell started, those of a method the preset gave the same value as it (a
    preset changed by an upgrade or an edit: the grid given again with ``--set KEY=VALUE`` as they ran
    goes on alike; a method's own value in the preset's ``methods:`` section is not moved with them).
    A value given that the preset already had, or a device, worker or data folder changed, leaves a
    finished cell as it is."""
    import yaml

    by_name = {c.name: c for c in cells}
    if not all(c.name in by_name for c in old_cells):
        return False

    def flat(cfg: cfgmod.Config) -> dict[str, Any]:  # published weights by the version they resolve to
        return {**cfgmod.flat_dict(cfg), "model.init_from": _resolved(cfg)}

    old_cfgs = {c.name: cfg for c, cfg in cell_configs(old, old_cells)}
    before = {name: flat(cfg) for name, cfg in old_cfgs.items()}
    after = [(c, flat(cfg), cfg) for c, cfg in cell_configs(new, [by_name[c.name] for c in old_cells])]
    if all(not differing(before[c.name], values, cfg) for c, values, cfg in after):
        return True
    moved: dict[tuple[str, str], Any] = {}  # (method, key): the value started cells ran with, the preset's now other
    moves: dict[str, list[tuple[Any, Any]]] = {}  # key: (the preset's value now, the value they ran with)
    started = set()
    for cell in old_cells:  # a preset edited since: what a started cell ran with is in its folder
        path = cell_dir(sweep_dir, cell)
        if cell_state(path) != "new":
            try:
                ran = recorded_config(path)
            except (OSError, yaml.YAMLError, cfgmod.ConfigError, TypeError, ValueError):
                continue  # named by changed_cells when the sweep goes on
            for k in differing(ran, before[cell.name], old_cfgs[cell.name]):
                moved[cell.method, k] = ran.get(k)
                moves.setdefault(k, []).append((before[cell.name][k], ran.get(k)))
            before[cell.name] = ran
            started.add(cell.name)

    def moves_alike(cell: Cell, k: str, value: Any) -> bool:  # as its method's started cells, or the preset's
        if (cell.method, k) in moved:
            return moved[cell.method, k] == value
        return (before[cell.name][k], value) in moves.get(k, [])

    def alike(cell: Cell, values: dict[str, Any], cfg: cfgmod.Config) -> bool:
        keys = differing(before[cell.name], values, cfg)
        return not keys or cell.name not in started and all(moves_alike(cell, k, values[k]) for k in keys)
    return all(alike(c, values, cfg) for c, values, cfg in after)


def _resolved(cfg: cfgmod.Config) -> Any:
    """``model.init_from`` as a run records it: published weights by the version they resolve to."""
    from ssvi_cli.models import TORCHVISION

    source = cfg.model.init_from
    if not (isinstance(source, str) and source.startswith(TORCHVISION) and cfg.model.name.startswith(TORCHVISION)):
        return source
    from ssvi_cli.training.init_weights import published_weights

    try:
        return published_weights(cfg)[1]
    except (cfgmod.ConfigError, ValueError):  # a name that no longer resolves: compared as written
        return source


def changed_lines(sweep_dir: Path, changed: dict[str, str]) -> list[str]:
    """One indented line per cell: its folder and what differs."""
    return [f"  {Path(sweep_dir) / CELLS_DIR / name}: {what}" for name, what in changed.items()]


def mixed_decoding(sweep_dir: Path, spec: SweepSpec, cells: list[Cell]) -> Optional[str]:
    """Where an image folder's started cells decoded its large JPEGs whole (trained by an ssvi from before
    reduced-scale decoding, whose files and checkpoints record no ``reduced_jpeg``: resumed, they go
    on so) and cells of the same folder are not begun, which would decode them at a reduced scale: a
    line naming both, since the report would pool them as one setting; else None."""
    from ssvi_cli.data.spec import jpegs_read_whole

    whole: dict[str, list[str]] = {}
    new: dict[str, list[str]] = {}
    started = []
    for cell, cfg in cell_configs(spec, cells):
        if cfgmod.image_folder(cfg.data.name) is not None:
            if cell_state(path := cell_dir(sweep_dir, cell)) == "new":
                new.setdefault(cfg.data.name, []).append(cell.name)
            else:
                started.append((cell.name, cfg.data.name, path))
    for name, folder, path in started:  # read only where a cell of the folder is still to begin
        if folder in new and jpegs_read_whole(folder, _recorded_spec(path).get("reduced_jpeg")):
            whole.setdefault(folder, []).append(name)
    both = next((name for name in whole if name in new), None)
    if both is None:
        return None
    return (f"{', '.join(whole[both])} decoded the large JPEGs of {both.partition(':')[2]} whole (trained by an ssvi "
            f"from before reduced-scale decoding), where {', '.join(new[both])}, not begun, would decode them at a "
            "reduced scale, and the report would pool the two")


def _recorded_spec(path: Path) -> dict[str, Any]:
    """The data description a started cell's run recorded: its model file's, else its newest readable
    checkpoint's ({} where there is none, as in a checkpoint from before it was recorded)."""
    from ssvi_cli.modelfile import ModelFileError, read_header
    from ssvi_cli.runs.checkpoint import CheckpointError
    from ssvi_cli.runs.rundir import RunDir

    run = RunDir(path)
    try:
        if run.model_file.is_file():
            spec = read_header(run.model_file)["meta"].get("data_spec")
        else:
            spec = run.load_latest("reading", warn=False)[1].get("data_spec")
    except (ModelFileError, CheckpointError, OSError):
        return {"reduced_jpeg": True}  # unreadable: its own run says so when it goes on
    return spec if isinstance(spec, dict) else {}
