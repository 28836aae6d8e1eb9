"""A sweep's grid: methods x sparsities x seeds x any config keys, expanded into cells.

Each cell is an ordinary run (its ``ssvi train`` arguments) evaluated by ``ssvi evaluate`` (its
arguments); dense methods (``vi``, ``dense``) ignore the sparsity and get one cell per seed. The
spec is written as ``sweep.json`` in the sweep directory; cells live in ``cells/<name>/``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, get_args, get_origin

from ssvi_cli import config as cfgmod
from ssvi_cli.methods import METHODS
from ssvi_cli.runs.rundir import EVALUATION_FILE

SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"
EVAL_FILE = EVALUATION_FILE  # a cell is a run directory with its evaluation beside it
# 2: a method runs once over a key it ignores (version 1 sweeps keep a cell per value); 3: a cell's name
# keeps a value's minus sign as "neg" (older sweeps' names drop it: -1 and 1 named the same cell).
SWEEP_VERSION = 3
# Keys the grid sets itself; a YAML sweep file or --set names any other config key.
OWN_KEYS = ("sparse.method", "sparse.sparsity", "train.seed")


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad grid, key, value or directory); one line."""


@dataclass(frozen=True)
class SweepSpec:
    """What to run: the preset, the grid axes and how every cell is evaluated."""

    preset: str = cfgmod.DEFAULT_PRESET
    methods: tuple[str, ...] = ("ssvi",)
    sparsities: tuple[float, ...] = (0.95,)
    seeds: tuple[int, ...] = (0,)
    axes: dict[str, list[Any]] = field(default_factory=dict)  # config key -> values (a product)
    fixed: dict[str, Any] = field(default_factory=dict)       # config key -> one value for every cell
    ood: tuple[str, ...] = ()
    samples: int = 10

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SweepError(f"unknown sweep key {unknown[0]!r}; valid keys are: {', '.join(sorted(known))}")
        tuples = {"methods": str, "sparsities": float, "seeds": int, "ood": str}
        args: dict[str, Any] = {}
        for key, value in d.items():
            if key in tuples:
                items = value if isinstance(value, (list, tuple)) else [value]
                try:
                    args[key] = tuple(tuples[key](v) for v in items)
                except (TypeError, ValueError):
                    raise SweepError(f"sweep key {key!r}: {value!r} is not a list of {tuples[key].__name__}") from None
            elif key in ("axes", "fixed"):
                if not isinstance(value, dict):
                    raise SweepError(f"sweep key {key!r} must map config keys to values")
                args[key] = {str(k): (list(v) if isinstance(v, (list, tuple)) and key == "axes" else v)
                             for k, v in value.items()}
            else:
                args[key] = value
        return cls(**args)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its name (its directory under ``cells/``) and its config overrides."""

    name: str
    method: str
    sparsity: Optional[float]  # None for a dense method
    seed: int
    settings: dict[str, Any]   # the swept config keys' values of this cell

    def overrides(self, spec: SweepSpec) -> dict[str, Any]:
        over = {**spec.fixed, **self.settings, "sparse.method": self.method, "train.seed": self.seed}
        if self.sparsity is not None:
            over["sparse.sparsity"] = self.sparsity
        return over

    def train_args(self, spec: SweepSpec, out: Path) -> list[str]:
        """``ssvi train`` arguments of this cell (into ``out``)."""
        args = ["--preset", spec.preset, "--method", self.method, "--seed", str(self.seed)]
        if self.sparsity is not None:
            args += ["--sparsity", repr(self.sparsity)]
        for key, value in {**spec.fixed, **self.settings}.items():
            args += ["--set", f"{key}={yaml_text(value)}"]
        return [*args, "--out", str(out)]

    def eval_args(self, spec: SweepSpec, out: Path) -> list[str]:
        """``ssvi evaluate`` arguments of this cell (its report written to ``evaluation.json``)."""
        args = [str(out), "--samples", str(spec.samples), "--output", str(out / EVAL_FILE)]
        for name in spec.ood:
            args += ["--ood", name]
        return args


def yaml_text(value: Any) -> str:
    """A value as ``--set`` reads it back (YAML flow style for lists)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def setting_text(group: dict[str, Any], key: str, text: Callable[[Any], str] = yaml_text) -> str:
    """A group's value of a swept key; "any" for a method that ignores the key and ran once."""
    return text(group["settings"][key]) if key in group["settings"] else "any"


def group_label(group: dict[str, Any]) -> str:
    """A group for a person: "ssvi, sparsity 0.95, bayes.beta=0.01"."""
    parts = [group["method"], "dense" if group["sparsity"] is None else f"sparsity {group['sparsity']:g}"]
    return ", ".join(parts + [f"{k}={yaml_text(v)}" for k, v in group["settings"].items()])


def seeds_text(group: dict[str, Any], keys: Optional[Iterable[str]] = None) -> str:
    """A group's number of seeds, or "k of n finite" when some metric (of ``keys``, the columns shown;
    all by default) was averaged over fewer (a seed whose value was not finite, a diverged run; each
    metric's own count is its ``n``)."""
    n = len(group["seeds"])
    shown = group.keys() if keys is None else [k for k in keys if k in group]
    finite = min((v["n"] for v in (group[k] for k in shown) if isinstance(v, dict) and "n" in v
                  and v.get("mean") is not None), default=n)
    return str(n) if finite == n else f"{finite} of {n} finite"


def group_key(item: dict[str, Any]) -> tuple[Any, ...]:
    """The group a cell row (or a group, or a cell's fields) belongs to: method, sparsity, settings."""
    return (item["method"], item["sparsity"], json.dumps(item["settings"], sort_keys=True))


def _slug(value: Any, signed: bool = True) -> str:
    text = re.sub(r"(?<![A-Za-z0-9.])-(?=[0-9.])", "neg", yaml_text(value)) if signed else yaml_text(value)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def cell_name(method: str, sparsity: Optional[float], seed: int, settings: dict[str, Any], signed: bool = True) -> str:
    parts = [method] + ([f"s{sparsity:g}"] if sparsity is not None else [])
    parts += [f"{key.rpartition('.')[2]}-{_slug(v, signed)}" for key, v in settings.items()]
    return "_".join(parts + [f"seed{seed}"])


def expand(spec: SweepSpec, version: int = SWEEP_VERSION) -> list[Cell]:
    """Every cell of the grid, in a stable order; every cell's config is validated first.

    ``version``, of the ``sweep.json`` the grid comes from, so an older sweep's cells keep their names:
    from 2 a method runs once over a key it ignores (:meth:`Method.ignores`), from 3 names keep signs.
    """
    if not spec.methods or not spec.seeds:
        raise SweepError("a sweep needs at least one method and one seed")
    for name in spec.methods:
        METHODS.get(name)
    clash = sorted(set(spec.axes) & set(OWN_KEYS)) or sorted(set(spec.fixed) & set(OWN_KEYS))
    if clash:
        raise SweepError(f"{clash[0]} is a grid axis of its own: use --method, --sparsity or --seeds")
    for key, values in spec.axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"sweep axis {key!r} needs a non-empty list of values")
    if isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or not 1 <= spec.samples <= cfgmod.MAX_SAMPLES:
        raise SweepError(f"samples={spec.samples!r}: evaluation needs a positive number of Monte Carlo samples, "
                         f"at most {cfgmod.MAX_SAMPLES:,}")
    keys = list(spec.axes)
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    for method, sparsity, combo, seed in product(spec.methods, spec.sparsities or (None,),
                                                 product(*(spec.axes[k] for k in keys)), spec.seeds):
        kind = METHODS.get(method)
        # A dense method at several sparsities, or any method over a key it ignores, is one run.
        s = None if kind.dense else sparsity
        settings = {k: v for k, v in zip(keys, combo) if not (version >= 2 and kind.ignores(k))}
        cell = Cell(cell_name(method, s, seed, settings, version >= 3), method, s, seed, settings)
        if cell.name in seen and seen[cell.name] != cell:
            raise SweepError(f"two cells of the grid would share the folder {cell.name!r}, a name that keeps a value's letters, digits "
                             f"and dots (a sparsity's 6 digits), alike for {dict(sparsity=seen[cell.name].sparsity, **seen[cell.name].settings)} "
                             f"and {dict(sparsity=cell.sparsity, **cell.settings)}; give values that differ there")
        if cell.name not in seen:
            seen[cell.name] = cell
            cells.append(cell)
    list(cell_configs(spec, cells))  # every cell's config is built, and so checked
    return cells


def cell_configs(spec: SweepSpec, cells: list[Cell]) -> Iterator[tuple[Cell, cfgmod.Config]]:
    """Each cell with the config its ``ssvi train`` arguments make (the preset as it reads now)."""
    try:
        bases = {m: cfgmod.load_preset(spec.preset, m) for m in {cell.method for cell in cells}}
    except cfgmod.ConfigError as exc:
        raise SweepError(str(exc)) from None
    for cell in cells:
        try:
            yield cell, cfgmod.with_absolute_paths(cfgmod.apply_overrides(bases[cell.method], cell.overrides(spec)))
        except cfgmod.ConfigError as exc:
            raise SweepError(f"cell {cell.name}: {exc}") from None


def parse_values(text: str, where: str = "") -> list[Any]:
    """``a,b,c`` as YAML scalars read as ``ssvi train --set`` reads one (``010`` is ten), ``[..]``
    groups staying one value: ``[64,64],[128]``. An empty item (``2,``) is refused, not dropped;
    ``where``: the flag and text an error names."""
    where = where or repr(text)
    # An empty item at any depth, as typed (YAML drops a trailing comma's): "2,", ",2", "[8,],[4]", "[,8]"
    if text.strip() and re.search(r"(^|[\[,])\s*(,|$)|,\s*\]", text.strip()):
        raise SweepError(f"{where} has an empty item; remove the extra comma")
    try:
        parsed = cfgmod.read_typed(f"[{text}]")
    except ValueError:
        raise SweepError(f"{where}: cannot read the values {text!r}; give them comma-separated, e.g. 0.1,0.2") from None
    if not isinstance(parsed, list) or not parsed:
        raise SweepError(f"{where} holds no values; give them comma-separated, e.g. 0.1,0.2")
    if any(isinstance(v, dict) for v in parsed) and "[" not in text:
        # `accumulate:` reads as a mapping, which no key takes: the text typed is meant, as in `ssvi train`
        parsed = [v.strip() for v in text.split(",") if v.strip()]
    return parsed


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def numbers(value: Any) -> Any:
    """``1e-3`` as the number it is: YAML 1.1 reads an exponent without a dot as a string, which
    would name cells ``lr-1e-3`` beside ``lr-0.001`` for the same run (lists and mappings: each item)."""
    if isinstance(value, list):
        return [numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items()}
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()) else value


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``--set key=a,b`` -> (key, [a, b]); the key must be a config key.

    A list-valued key reads as ``ssvi train --set`` reads it: ``data.classes=0,1,2`` is one value;
    several lists are bracketed, ``model.widths=[64,64],[128]``.
    """
    if "=" not in text:
        raise SweepError(f"--set expects key.sub=a,b,..., got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    check_key(key, f"--set {text!r}")
    if key in cfgmod.PATH_KEYS and not any(c in raw for c in "'\"[") and all(v.strip() for v in raw.split(",")):
        values = [cfgmod.as_typed_path(key, v) for v in raw.split(",")]  # as train reads a path: as typed
    else:
        values = [typed_number(key, v) for v in parse_values(raw, f"--set {text!r}")]
    if list_valued(key) and not any(isinstance(v, list) for v in values):
        return key, [values]
    return key, values


def check_key(key: str, where: str) -> None:
    """``key`` is a config key; else a one-line error naming ``where`` it came from and the closest
    valid keys."""
    import difflib

    valid = cfgmod.valid_keys()
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid keys are: {', '.join(valid)}"
        raise SweepError(f"unknown config key {key!r} in {where}; {hint}")


def list_valued(key: str) -> bool:
    """Whether the config key holds a list (its type is a tuple, maybe optional)."""
    tp = cfgmod.key_type(key)
    return tuple in (get_origin(tp), *(get_origin(a) for a in get_args(tp)))


def typed_number(key: str, value: Any) -> Any:
    """A whole number given to a key that holds floats, as the float (``1`` -> ``1.0``), so ``1`` and
    ``1.0`` name one cell, one group and one ``--baseline``; anything else as it is."""
    tp = cfgmod.key_type(key)
    kinds = {tp, *get_args(tp)} | {inner for a in get_args(tp) for inner in get_args(a)}
    if isinstance(value, list):
        return [typed_number(key, v) for v in value]
    whole = isinstance(value, int) and not isinstance(value, bool)
    return float(value) if whole and float in kinds and int not in kinds else value


def is_sweep_dir(path: Path) -> bool:
    """Whether ``path`` holds an ssvi sweep's ``sweep.json`` (read, not expanded)."""
    try:
        return json.loads((Path(path) / SWEEP_FILE).read_text(encoding="utf-8")).get("format") == "ssvi-sweep"
    except (OSError, ValueError, AttributeError):
        return False


def read_spec(sweep_dir: Path) -> tuple[SweepSpec, list[Cell]]:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir}: no such folder" if not Path(sweep_dir).exists()
                         else f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != "ssvi-sweep":
            raise ValueError(f"format {data.get('format')!r} is not ssvi-sweep")
        version = int(data.get("version", 1))
        spec = SweepSpec.from_dict(data["spec"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SweepError(f"{path} is corrupted ({exc})") from None
    if version > SWEEP_VERSION:
        raise SweepError(f"{path} is version {version}, newer than this ssvi reads ({SWEEP_VERSION}); upgrade ssvi")
    return spec, expand(spec, version)
