"""``ssvi presets``: list the shipped presets and the command that runs each; ``ssvi presets NAME``:
every config key of one, as ``ssvi train --preset NAME`` runs it; and ``ssvi train --print-config``,
which shows and checks a command's config as these do."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer
from rich.table import Table

from ssvi_cli import config as cfgmod
from ssvi_cli.cli import completion
from ssvi_cli.cli.common import UsageError, err, out, print_json


def register(app: typer.Typer) -> None:
    @app.command()
    def presets(
        name: Annotated[Optional[str], typer.Argument(help="A preset's name or YAML file: print every config key it runs with.", autocompletion=completion.presets)] = None,
        method: Annotated[Optional[str], typer.Option(help="With NAME: the values for this method (its methods: section applied).", autocompletion=completion.methods)] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    ) -> None:
        """List the presets in presets/ with model, data, method and the command that runs them.

        With NAME, every config key (--set section.key=value) and the value that preset trains with."""
        if name is not None:
            _show_one(name, method, json_out)
            return
        if method is not None:
            raise UsageError("--method chooses a preset's values for a method: give the preset's NAME too")
        rows = []
        for name, path in cfgmod.list_presets().items():
            try:
                cfg, per_method = cfgmod.preset_methods(name)
            except cfgmod.ConfigError as exc:  # one broken file does not hide the others
                err.print(f"note: preset {name} is left out: {exc}", highlight=False)
                continue
            rows.append({"name": name, "model": cfg.model.name, "dataset": cfg.data.name,
                         "method": cfg.sparse.method, "sparsity": cfg.sparse.sparsity,
                         "epochs": cfg.train.epochs, "command": cfgmod.preset_command(path),
                         "methods": per_method, "default": name == cfgmod.DEFAULT_PRESET})
        if json_out:  # each preset's methods: section as a preset file and `ssvi presets NAME --json` give it
            print_json([{**r, "methods": {m: _nested(v) for m, v in r["methods"].items()}} for r in rows])
            return
        # Names never fold; commands go below the table, one whole line each, so that a narrow
        # terminal or a pipe still shows what to copy (a table cell would cut or fold it).
        table = Table(title="presets", title_justify="left")
        for col in ("name", "model", "dataset", "method", "sparsity", "epochs"):
            table.add_column(col, no_wrap=col == "name")
        for r in rows:
            table.add_row(r["name"] + (" (default)" if r["default"] else ""),
                          *(str(r[c]) for c in ("model", "dataset", "method", "sparsity", "epochs")))
        out.print(table)
        out.print("commands:")
        for r in rows:
            out.print(f"  {r['command']}", highlight=False)
        own = [(r["name"], m, values) for r in rows for m, values in r["methods"].items()]
        if own:
            out.print("values a preset gives one method (its methods: section):")
        for name, m, values in own:
            shown = " ".join(f"{k}={v}" for k, v in values.items())
            out.print(f"  {name} --method {m}: {shown}", highlight=False)


def _show_one(name: str, method: Optional[str], json_out: bool) -> None:
    """Every key of preset ``name`` as ``ssvi train --preset`` runs it before flags and ``--set``: for
    ``method`` alone, resolved; else its shared values and its ``methods:`` section, so that the YAML,
    saved and read back with ``--preset FILE``, trains every method as the preset does."""
    if method is not None:
        try:
            base = cfgmod.load_preset(name, method)
        except cfgmod.ConfigError as exc:  # named by the flag that gave it
            raise cfgmod.ConfigError(f"--method: {exc}" if str(exc).startswith("sparse.method=") else str(exc)) from None
        data = base.to_dict()
    else:
        base, per_method = cfgmod.preset_methods(name)
        data = base.to_dict()
        if per_method:
            data["methods"] = {m: _nested(values) for m, values in per_method.items()}
    if name not in cfgmod.list_presets():  # a shipped preset trains: its tests show it
        methods = [method] if method is not None else [None, *data.get("methods", {})]  # its own, then its section's
        _check_trains(name, methods, by_flag=method is not None)
        from ssvi_cli.cli.train_config import recipe_note

        if note := recipe_note(cfgmod.from_preset(name, {} if method is None else {"sparse.method": method}), name):
            err.print(note, highlight=False)  # as train says it
    from ssvi_cli.cli.train_config import show_config
    from ssvi_cli.training.unused import unused_settings

    command = f"ssvi train --preset {name}" + (f" --method {method}" if method else "")
    show_config(data, unused_settings(base), f"{command} trains with these values"
                + (f", the preset's methods: section for {method} applied" if method else "")
                + " (change one with --set section.key=value)", json_out)


def _check_trains(name: str, methods: list[Optional[str]], by_flag: bool = False) -> None:
    """:func:`check_trains` of preset ``name`` for each of ``methods``
    (None: the preset's own; ``by_flag``: the one ``--method`` chose), an error named by the method."""
    for method in methods:
        try:
            check_trains(cfgmod.from_preset(name, {} if method is None else {"sparse.method": method}))
        except Exception as exc:
            if method is None or not isinstance(exc, cfgmod.ConfigError):
                raise
            where = f"--method {method}" if by_flag else f"its methods: section's {method}"
            raise cfgmod.ConfigError(f"with {where}: {exc}") from None


def check_trains(cfg: cfgmod.Config, given: Sequence[str] = ()) -> None:
    """What ``ssvi train`` checks of ``cfg`` before it reads any data: the model's and the dataset's
    names, the image-folder keys, ``model.init_from`` (read, and checked against the run's model, as
    train reads it; torchvision's published weights named, not fetched) and the model's forward on the
    data's input shape; so that a config shown by ``ssvi presets FILE`` or ``train --print-config``
    without an error trains (its data present). An image folder that is not on this machine (a file
    written for another) is not read: its model's name alone is checked. ``given``: the keys the
    command line set (an image-folder key set for other data is refused at any value, as train does)."""
    from ssvi_cli.modelfile import ModelCard
    from ssvi_cli.models import TORCHVISION, check_model_name
    from ssvi_cli.training.init_weights import check_init_source, load_init_weights, published_weights
    from ssvi_cli.training.plan import check_names, planned_densities, trained_start

    kind, _, folder = cfg.data.name.partition(":")
    if kind == "imagefolder" and not Path(folder).expanduser().exists():
        check_model_name(cfg.model.name)
        return
    spec = check_names(cfg, given)
    if cfg.model.init_from:  # read as train reads it before its data (torchvision's weights not fetched)
        check_init_source(cfg)
        if str(cfg.model.init_from).startswith(TORCHVISION):
            published_weights(cfg)  # the name resolved, nothing fetched
        elif trained_start(cfg, spec, 1, None) is None:
            load_init_weights(cfg, spec)
    planned_densities(ModelCard.from_config(cfg, spec), cfg, spec)


def print_train_config(resume: Optional[Path], preset: Optional[str], overrides: dict[str, Any], sets: list[str],
                       json_out: bool) -> None:
    """``ssvi train --print-config``: the config the command would train with (with ``resume``: the
    run's saved one), refused and noted as train refuses and notes it before it reads data."""
    from ssvi_cli.cli.train_config import build_config, recipe_note, set_keys, show_config
    from ssvi_cli.runs.rundir import RunDir
    from ssvi_cli.training.unused import unused_settings

    cfg = RunDir(resume).read_config() if resume else build_config(preset, overrides, sets)
    if cfg is None:
        raise UsageError(f"--resume {resume}: no run config to print there (its config.yaml is missing or unreadable)")
    if resume is None:
        given = [*set_keys(sets), *(k for k, v in overrides.items() if v is not None)]
        check_trains(cfg, given)
        if note := recipe_note(cfg, preset, given):
            err.print(note, highlight=False)
    show_config(cfg.to_dict(), unused_settings(cfg), f"the run {resume} goes on with these values (its saved config)"
                if resume else "this command trains with these values (change one with --set section.key=value)", json_out)


def _nested(values: dict[str, object]) -> dict[str, dict[str, object]]:
    """``{"optim.lr": 0.005}`` as ``{"optim": {"lr": 0.005}}``, a preset file's sections."""
    sections: dict[str, dict[str, object]] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    return sections
