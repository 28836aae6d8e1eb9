"""``ssvi presets``: list the shipped presets and the command that runs each."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ssvi_cli import config as cfgmod
from ssvi_cli.commands.common import out, print_json


def register(app: typer.Typer) -> None:
    @app.command()
    def presets(json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
        """List the presets in presets/ with model, data, method and the command that runs them."""
        rows = []
        for name, path in cfgmod.list_presets().items():
            cfg = cfgmod.load_preset(name)
            rows.append({"name": name, "model": cfg.model.name, "dataset": cfg.data.name,
                         "method": cfg.sparse.method, "sparsity": cfg.sparse.sparsity,
                         "epochs": cfg.train.epochs, "command": cfgmod.preset_command(path)})
        if json_out:
            print_json(rows)
            return
        table = Table(title="presets")
        for col in ("name", "model", "dataset", "method", "sparsity", "epochs", "command"):
            table.add_column(col)
        for r in rows:
            table.add_row(*(str(r[c]) for c in ("name", "model", "dataset", "method", "sparsity", "epochs", "command")))
        out.print(table)
