"""What ``ssvi sweep`` is asked to run: a YAML sweep file (if any) with the grid flags on top, as a
:class:`~ssvi_cli.sweep.grid.SweepSpec`. Flags override the file's values; a key given twice (two
``--set``, or ``--criterion`` with ``--set sparse.criterion``) is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ssvi_cli import config as cfgmod
from ssvi_cli.fileio import looked_in
from ssvi_cli.machine import path_word
from ssvi_cli.sweep.grid import (SweepError, SweepSpec, check_key, list_valued, numbers, parse_axis, typed_number,
                                yaml_text)


def _csv(text: Optional[str], kind: type, flag: str) -> Optional[tuple[Any, ...]]:
    if text is None:
        return None
    if text.strip() and any(not v.strip() for v in text.split(",")):
        raise SweepError(f"{flag} {text!r} has an empty item; remove the extra comma")
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not values:
        raise SweepError(f"{flag} {text!r} holds no values")
    return values


def _missing_preset(file: Path, preset: Path) -> None:
    """Refuses a sweep file's preset path that is not a file, naming the sweep file, and the path that
    works where the preset lies beside the sweep file (paths are read from the folder ssvi runs in)."""
    if preset.suffix.lower() not in cfgmod.PRESET_SUFFIXES or preset.is_dir():
        return  # a shipped preset's name, or a folder: load_preset's own message
    beside = file.parent / preset
    hint = (f"; it is beside the sweep file: write preset: {beside}" if not preset.is_absolute() and beside.is_file()
            else "; give a YAML (or JSON) file's path")
    raise SweepError(f"--file {file}: preset file {preset} does not exist{looked_in(preset)}{hint}")


def spec_from_flags(file: Optional[Path], preset: Optional[str], method: Optional[str], sparsity: Optional[str],
                    seeds: Optional[int], criterion: Optional[str], sets: list[str], ood: list[str],
                    samples: Optional[int], notes: Optional[list[str]] = None) -> SweepSpec:
    """The sweep spec from the YAML file (if any) with the flags on top; ``notes`` receives a line for
    each value of the file a flag replaced (the flag wins, and says so)."""
    data: dict[str, Any] = {}
    replaced: list[str] = []
    spelled: dict[str, str] = {}  # a file's key as it spells it (sparsity: for sparsities), for the messages
    written: dict[str, Any] = {}  # a file's values as it writes them (seeds: 3), for the notes
    if file is not None:
        import yaml

        try:
            loaded = cfgmod.read_yaml(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SweepError(f"--file {file}: not UTF-8 text; save it as UTF-8") from None
        except (OSError, yaml.YAMLError) as exc:
            at, what = cfgmod.yaml_problem(exc)
            raise SweepError(f"--file {file}: not a readable YAML sweep{at}: {what}") from None
        if loaded is None or loaded == {}:  # would run the default grid: a 60-epoch run, not the sweep meant
            raise SweepError(f"--file {file} is empty; give at least one of its keys (preset, methods, sparsities, "
                             "seeds, set, ood, samples)")
        if not isinstance(loaded, dict):
            raise SweepError(f"--file {file}: a sweep file is a mapping (preset, methods, sparsities, seeds, set, ood, samples)")
        data = dict(loaded)
        file_keys = ("preset", "method", "methods", "sparsity", "sparsities", "seeds", "set", "ood", "samples")
        unknown = sorted(str(k) for k in data if k not in file_keys)
        if unknown:
            raise SweepError(f"--file {file}: unknown sweep key {unknown[0]!r}; valid keys are: {', '.join(file_keys)}")
        for one, many in (("method", "methods"), ("sparsity", "sparsities")):
            if one in data:  # the flag's own name (--method, --sparsity) reads as the plural key
                if many in data:
                    raise SweepError(f"--file {file}: give {many!r} or {one!r}, not both")
                data[many] = data.pop(one)
                spelled[many] = one
        written = dict(data)
        _check_file_values(data, f"--file {file}", spelled)
        if isinstance(data.get("seeds"), int):
            data["seeds"] = list(range(_seed_count(data["seeds"], f"--file {file}: seeds")))
        grid = data.pop("set", {}) or {}
        if not isinstance(grid, dict):
            raise SweepError(f"--file {file}: 'set' maps config keys to a value or a list of values")
        for key in grid:
            check_key(str(key), f"--file {file}")
        grid = {k: typed_number(k, numbers(v)) for k, v in grid.items()}
        # A list is an axis, except a list of scalars for a list-valued key (model.widths: [32, 32]),
        # which is one value as in 'ssvi train'; several lists of such a key are an axis.
        axis = {k: v for k, v in grid.items() if isinstance(v, list)
                and not (list_valued(str(k)) and not any(isinstance(x, list) for x in v))}
        data["axes"] = axis
        data["fixed"] = {k: v for k, v in grid.items() if k not in axis}
    flags = {"preset": preset, "methods": _csv(method, str, "--method"), "sparsities": _csv(sparsity, float, "--sparsity"),
             "seeds": tuple(range(_seed_count(seeds, "--seeds"))) if seeds is not None else None, "ood": tuple(ood) or None,
             "samples": samples}
    flag_names = {"methods": "--method", "sparsities": "--sparsity", "ood": "--ood"}
    replaced += [f"{flag_names.get(k, '--' + k)} replaces the file's {spelled.get(k, k)}: {yaml_text(written[k])}"
                 for k, v in flags.items() if v is not None and k in data and _items(v) != _items(data[k])]
    data.update({k: v for k, v in flags.items() if v is not None})
    axes, fixed = dict(data.get("axes", {})), dict(data.get("fixed", {}))
    file_set = {**axes, **fixed}
    if criterion is not None:  # the flag wins over a file's value, as every flag does
        criteria = list(_csv(criterion, str, "--criterion") or ())
        if "sparse.criterion" in file_set and _items(file_set["sparse.criterion"]) != criteria:
            replaced.append(f"--criterion replaces the file's sparse.criterion: {yaml_text(file_set['sparse.criterion'])}")
        axes["sparse.criterion"] = criteria
        fixed.pop("sparse.criterion", None)
    given: set[str] = set()
    for text in sets:
        key, values = parse_axis(text)
        if key in given or (key == "sparse.criterion" and criterion is not None):
            raise SweepError(f"{key} is given twice (" + ("--criterion and --set" if key not in given else "two --set")
                             + "); give its values once, comma-separated")
        given.add(key)
        if key in file_set and _items(file_set[key]) != values:
            replaced.append(f"--set {key} replaces the file's {key}: {yaml_text(file_set[key])}")
        axes.pop(key, None)
        fixed.pop(key, None)
        if len(values) > 1:
            axes[key] = values
        else:
            fixed[key] = values[0]
    data["axes"], data["fixed"] = axes, fixed
    preset_path = Path(str(data.get("preset", ""))).expanduser()
    found = preset_path.suffix.lower() in cfgmod.PRESET_SUFFIXES and preset_path.is_file()
    if found:
        data["preset"] = str(preset_path.resolve())  # cells may run from another directory
    # Paths, likewise, as absolute ones: a cell resumed, or run by a scheduler, from elsewhere finds them.
    data["ood"] = tuple(_absolute_ood(str(text)) for text in data.get("ood") or ())
    _check_labels(data["ood"])
    if not found and file is not None and preset is None and "preset" in written:  # the file's, not there: say whose
        _missing_preset(file, preset_path)
    for key in cfgmod.PATH_KEYS:
        if key in data["axes"]:
            data["axes"][key] = [cfgmod.absolute_path(key, v) for v in data["axes"][key]]
        if key in data["fixed"]:
            data["fixed"][key] = cfgmod.absolute_path(key, data["fixed"][key])
    if "methods" not in data or "sparsities" not in data:  # the preset's own, as 'ssvi train --preset' takes them
        base = cfgmod.load_preset(str(data.get("preset") or cfgmod.DEFAULT_PRESET)).sparse  # its methods: section's too
        data.setdefault("methods", (base.method,))
        data.setdefault("sparsities", (base.sparsity,))
    _check_once(data)
    if notes is not None:
        notes += replaced
    return SweepSpec.from_dict(data)


def grid_command(spec: SweepSpec, out_dir: Path) -> Optional[list[str]]:
    """The ``ssvi sweep`` command line whose flags give ``spec`` with ``--out out_dir`` (read back by
    :func:`spec_from_flags` to the same spec), or None where flags cannot say it: a seed list other
    than 0..N-1 (a sweep file's), or values a comma-separated ``--set`` does not carry."""
    if spec.seeds != tuple(range(len(spec.seeds))):
        return None
    methods, sparsities = ",".join(spec.methods), ",".join(yaml_text(v) for v in spec.sparsities)
    sets = [f"{k}={','.join(yaml_text(v) for v in values)}" for k, values in spec.axes.items()]
    sets += [f"{k}={yaml_text(v)}" for k, v in spec.fixed.items()]
    try:
        back = spec_from_flags(None, spec.preset, methods, sparsities, len(spec.seeds), None, sets, list(spec.ood),
                               spec.samples)
    except (SweepError, cfgmod.ConfigError):
        return None
    if back != spec:
        return None
    args = ["ssvi", "sweep"] + (["--preset", spec.preset] if spec.preset != cfgmod.DEFAULT_PRESET else [])
    args += ["--method", methods, "--sparsity", sparsities]
    args += ["--seeds", str(len(spec.seeds))] if len(spec.seeds) > 1 else []
    for text in sets:
        args += ["--set", text]
    for text in spec.ood:
        args += ["--ood", text]
    args += ["--samples", str(spec.samples)] if spec.samples != SweepSpec().samples else []
    return [*args, "--out", path_word(out_dir)]


def _check_labels(ood: tuple[str, ...]) -> None:
    """Two ``--ood`` values under one name in the reports (``mine=a/`` and ``mine=b.npy``): every
    cell's evaluation would refuse them after training."""
    from ssvi_cli.data.ood import label_of

    first: dict[str, str] = {}
    for text in ood:
        label = label_of(text)
        if label in first and first[label] != text:
            raise SweepError(f"--ood {label} is given twice, as {first[label]} and as {text}; give each set its own label")
        first.setdefault(label, text)


def _check_once(data: dict[str, Any]) -> None:
    """Refuse a value given twice (one cell for both, under a grid that says two): a method, sparsity,
    seed, OOD set (its path as resolved) or a value of a ``--set`` axis, named as it was first given."""
    named = {"sparse.criterion": "criterion"}
    for what, values in (("method", data.get("methods")), ("sparsity", data.get("sparsities")),
                         ("seed", data.get("seeds")), ("OOD set", data.get("ood")), *data["axes"].items()):
        values = list(values) if isinstance(values, (list, tuple)) else []  # one value (method: ssvi) is once
        # as given and as the config reads them (on and "on" are one value), true apart from 1 (Python's
        # True == 1: a boolean given to a number is the cell's error to name, not a value given twice)
        given, meant = [_tagged(v) for v in values], [_tagged(_as_read(what, v)) for v in values]
        later = next((i for i in range(len(values)) if given[i] in given[:i] or meant[i] in meant[:i]), None)
        if later is not None:
            first = values[given.index(given[later]) if given[later] in given[:later] else meant.index(meant[later])]
            also = values[later]
            same = "" if _tagged(first) == _tagged(also) and type(first) is type(also) else \
                f" (also as {repr(also) if isinstance(also, str) else yaml_text(also)})"
            raise SweepError(f"{named.get(what, what)} {yaml_text(first)} is given twice{same}; give each value once")


def _tagged(value: Any) -> tuple[bool, Any]:
    return isinstance(value, bool), value


def _as_read(key: str, value: Any) -> Any:
    """An axis value as ``ssvi train`` reads it for ``key`` (the value itself where it would be refused,
    or for the grid's own axes); lists as tuples, to compare."""
    try:
        return cfgmod.read_value(key, value) if "." in key else value
    except cfgmod.ConfigError:
        return value


MAX_SEEDS = 10_000  # seeds of one sweep, each a training run of every cell: 1e20 overflowed building the grid


def _seed_count(count: int, where: str) -> int:
    if count > MAX_SEEDS:
        raise SweepError(f"{where} {count}: at most {MAX_SEEDS:,} seeds in one sweep (each trains every cell once)")
    return count


def _check_file_values(data: dict[str, Any], where: str, spelled: dict[str, str]) -> None:
    """A sweep file's values that the spec would misread: seeds as a count (an integer >= 1) or a
    list of seeds (integers >= 0), no empty methods, sparsities, ood or set, method names and
    sparsities that are numbers (not YAML's booleans; read as floats), a preset name. ``where``: the
    flag and file the messages name; ``spelled``: the file's own spelling of a key."""
    seeds = data.get("seeds")
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731 - True is no seed
    if seeds is not None and not ((whole(seeds) and seeds >= 1) or (isinstance(seeds, list) and seeds
                                                                      and all(whole(v) and v >= 0 for v in seeds))):
        raise SweepError(f"{where}: seeds {seeds!r}: give a count (an integer, at least 1) or a list of "
                         "seeds (integers, 0 or more), e.g. seeds: 3 or seeds: [0, 1, 2]")
    for key in ("methods", "sparsities", "ood", "set"):
        if key in data and (data[key] is None or data[key] in ([], {})):
            raise SweepError(f"{where}: {spelled.get(key, key)} is empty; give at least one value or leave the key out")
    if "methods" in data and not all(isinstance(v, str) for v in _items(data["methods"])):
        raise SweepError(f"{where}: {spelled.get('methods', 'methods')} {yaml_text(data['methods'])}: give method names, e.g. "
                         "[ssvi, vi]" + _YES_NO)
    if "sparsities" in data:
        sparsities = _items(data["sparsities"])
        if any(isinstance(v, bool) for v in sparsities):
            raise SweepError(f"{where}: {spelled.get('sparsities', 'sparsities')} {yaml_text(data['sparsities'])}: "
                             "give numbers, e.g. [0.9, 0.95]" + _YES_NO)
        try:  # as numbers, so that 0.9 and "0.9" are one value given twice
            data["sparsities"] = [float(v) for v in sparsities]
        except (TypeError, ValueError):
            raise SweepError(f"{where}: {spelled.get('sparsities', 'sparsities')} {data['sparsities']!r}: "
                             "give numbers, e.g. [0.9, 0.95]") from None
    ood = data.get("ood")
    if isinstance(ood, str):  # one set, as `method: ssvi` is one method
        data["ood"] = [ood]
    elif ood is not None and not (isinstance(ood, list) and all(isinstance(v, str) for v in ood)):
        raise SweepError(f"{where}: ood {ood!r}: give a set's name or path, or a list of them, "
                         "e.g. ood: [noise, heldout]")
    if "preset" in data and not isinstance(data["preset"], str):
        raise SweepError(f"{where}: preset {data['preset']!r}: give a preset name or the path of a preset YAML")


_YES_NO = " (YAML reads yes, no, on and off unquoted as true and false)"


def _items(value: Any) -> list[Any]:
    """A value or a list of values, as a list (``ssvi`` and ``[ssvi]`` are one method)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _absolute_ood(text: str) -> str:
    """An ``--ood`` value with its folder or array path made absolute (a set's name, noise and
    heldout stay as typed)."""
    from ssvi_cli.data.ood import parse_ood
    from ssvi_cli.data.spec import DataError

    try:
        request = parse_ood(text)
    except DataError as exc:  # an unknown name or a missing path: the one-line error, now
        raise SweepError(str(exc)) from None
    if request.kind == "path" and request.path is not None:  # LABEL=PATH keeps its label
        return str(request.path.resolve()) if request.label == text else f"{request.label}={request.path.resolve()}"
    if request.data_dir is not None:
        return f"{request.name}={request.data_dir.resolve()}"
    return text


