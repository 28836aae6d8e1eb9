"""What a sweep's cells would refuse, refused before any cell trains: a grid that fails in its last
step (every cell's evaluation) would otherwise cost the whole grid's training first.

:func:`check_runnable` and :func:`check_ood_sets` run when a sweep is made (they read the file
system: an image folder, the OOD sets); :func:`check_ood_paths` runs again before a cell trains
(``--resume``, or ``--run-cell`` from a scheduler), as an OOD folder may have gone since.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ssvi_cli.sweep.grid import Cell, SweepError, SweepSpec, cell_configs


def check_runnable(spec: SweepSpec, cells: list[Cell], device: bool = True) -> None:
    """Names (model, dataset, criterion), the ``--ood`` values, ``--ood heldout`` with a class list that
    holds none out (no ``data.classes``, or one listing every class) and (``device``) the device."""
    from ssvi_cli.data.ood import HELDOUT, parse_ood
    from ssvi_cli.data.spec import DataError
    from ssvi_cli.config import ConfigError
    from ssvi_cli.registry import UnknownName
    from ssvi_cli.training.plan import check_names, resolve_device

    try:
        requests = [parse_ood(text) for text in spec.ood]
    except DataError as exc:
        raise SweepError(str(exc)) from None
    heldout = any(r.kind == HELDOUT for r in requests)
    checked: set[str] = set()
    for cell, cfg in cell_configs(spec, cells):
        try:  # CUDA asked of a machine without it: said once, not by every cell after it started
            resolve_device(cfg.train.device) if device else None
        except ConfigError:
            raise SweepError(f"train.device={cfg.train.device} was requested but no CUDA device is available; "
                             "use --set train.device=cpu (or auto)") from None
        # An image folder key set for another dataset is refused; the data keys alone, so that an image
        # folder is still scanned once, not once per seed
        given = sorted(k for k in cell.overrides(spec) if k.startswith("data."))
        what = json.dumps([cfg.model.name, cfg.sparse.criterion, asdict(cfg.data), given], sort_keys=True, default=str)
        if what in checked:  # an image folder is scanned once, not once per cell
            continue
        checked.add(what)
        try:
            data_spec = check_names(cfg, given)
        except (UnknownName, DataError) as exc:
            raise SweepError(f"cell {cell.name}: {exc}") from None
        if heldout and cfg.data.classes is None:
            raise SweepError(f"--ood {HELDOUT} needs classes held out of training: train on a subset, "
                             "e.g. --set data.classes=0,1,2,3,4")
        if heldout and not data_spec.held_out_classes:
            raise SweepError(f"--ood {HELDOUT}: cell {cell.name} trains on data.classes listing every class of "
                             f"{cfg.data.name}, so none is held out; list fewer classes")
    _check_starts(spec, cells)


def _check_starts(spec: SweepSpec, cells: list[Cell]) -> None:
    """A trained ssvi model that ``model.init_from`` names fits every cell (its method, sparsity and
    allocation keep the model's supports' sizes): a grid over methods or sparsities would otherwise
    train the cells that fit and fail the others one by one."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.training.init_posterior import names_trained_model
    from ssvi_cli.training.plan import check_names, trained_start

    checked: set[str] = set()
    for cell, cfg in cell_configs(spec, cells):
        if not names_trained_model(cfg.model.init_from):
            continue
        what = json.dumps([asdict(cfg.model), asdict(cfg.data), cfg.sparse.method, cfg.sparse.sparsity,
                           cfg.sparse.allocation], sort_keys=True, default=str)
        if what in checked:  # the seeds of a setting: the model is read once
            continue
        checked.add(what)
        data_spec = check_names(cfg)
        try:
            trained_start(cfg, data_spec)
        except ConfigError as exc:
            raise SweepError(f"cell {cell.name}: {exc}") from None


def check_ood_sets(spec: SweepSpec, cells: list[Cell]) -> None:
    """Every ``--ood`` set read as the cells' evaluation reads it (at most 2,000 images, against the
    first cell's data), before any cell trains: a folder without readable images, an array of the
    wrong shape or a set that is not on disk is refused now, not after every cell has trained. Data
    whose description needs more than its name (``get_spec`` refuses it) leaves the check to the
    cells' own evaluation."""
    from ssvi_cli.data import get_spec
    from ssvi_cli.data.ood import HELDOUT, parse_ood
    from ssvi_cli.data.spec import DataError
    from ssvi_cli.evaluation.ood_sets import check_outside, load_ood
    from ssvi_cli.registry import UnknownName

    if not spec.ood or not cells:
        return
    _, cfg = next(cell_configs(spec, cells[:1]))
    try:
        data_spec = get_spec(cfg.data.name, cfg.data)
    except (UnknownName, DataError, ValueError):
        return
    root = Path(cfg.data.data_dir).expanduser() if cfg.data.data_dir else None
    for text in spec.ood:
        request = parse_ood(text)
        if request.kind == HELDOUT:
            continue  # check_runnable: it needs classes held out of training
        try:
            check_outside(request, text, cfg.data.name)
            load_ood(request, data_spec, root, bool(cfg.data.download), 0, 2000)  # fetched now if allowed
        except DataError as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SweepError(message if message.startswith("--ood") else f"--ood {text}: {message}") from None


def check_ood_paths(spec: SweepSpec) -> None:
    """Every ``--ood`` folder or array still there (a look, nothing read): checked before a cell
    trains, whose evaluation would otherwise fail after its training."""
    from ssvi_cli.data.ood import parse_ood
    from ssvi_cli.data.spec import DataError

    for text in spec.ood:
        try:
            parse_ood(text)
        except DataError as exc:
            raise SweepError(f"{exc} (the sweep's --ood sets are read when each cell is evaluated)") from None


def idle_axes(spec: SweepSpec) -> list[str]:
    """Notes on the grid's axes that no method of it uses (``--method vi --criterion mean,snr``, or a
    dense method alone over several sparsities): their values make no cells of their own."""
    from ssvi_cli.methods import METHODS

    kinds = [METHODS.get(m) for m in spec.methods]
    axes = {**({"the sparsity": spec.sparsities} if len(spec.sparsities or ()) > 1 else {}), **spec.axes}
    return [f"no method of this grid ({', '.join(spec.methods)}) uses {key}: its {len(values)} values would train "
            "alike and make no cells of their own" for key, values in axes.items() if len(values) > 1
            and all(k.never_uses("sparse.sparsity" if key == "the sparsity" else key) for k in kinds)]
