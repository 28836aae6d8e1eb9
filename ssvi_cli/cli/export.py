"""``ssvi export``: write a run, checkpoint or model file as a compact (or dense) model file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ssvi_cli.cli import completion
from ssvi_cli.cli.common import (UsageError, check_output_file, size_rows, err, kept_warnings, kv_table, out,
                                 print_json)
from ssvi_cli.cli.paths import output_file
from ssvi_cli.machine import given_path


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        source: Annotated[Path, typer.Argument(help="A run directory, a checkpoint (.pt) or a model file.")],
        output: Annotated[Path, typer.Option("--output", "-o", parser=output_file, metavar="<path>", help="The model file to write (.safetensors; an existing file is replaced).")],
        dtype: Annotated[str, typer.Option(help="Value precision of mu, sigma and dense tensors: float32, float16 or bfloat16.", autocompletion=completion.of(completion.DTYPES))] = "float32",
        dense: Annotated[bool, typer.Option("--dense", help="Write a plain dense BNN file (mu and sigma for every weight), for comparison.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the size report as JSON only.")] = False,
    ) -> None:
        """Write a model file: active indices, mu and sigma per sparse layer, plus the dense tensors."""
        from ssvi_cli.modelfile import DTYPES
        from ssvi_cli.runs.load import export_model

        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype!r} is not valid; valid values are: {', '.join(DTYPES)}")
        source = given_path(source)
        if not source.exists():
            raise UsageError(f"{source} does not exist")
        if str(output) == "-":
            raise UsageError("--output -: a model file is written to a file, not standard output; name it "
                             "*.safetensors")
        if output.is_file() and os.path.samefile(output, source):  # by the file: a second name (a link, or another case) too
            raise UsageError(f"--output {output} is the file being exported; give another path")
        target = check_output_file(output, "--output")  # a link's target
        if output.suffix.lower() != ".safetensors":
            raise UsageError(f"--output {output}: name the model file *.safetensors (a .pt is read as a checkpoint)")
        with kept_warnings() as warned:  # in --json's notes too
            report = export_model(source, target, dtype=dtype, dense=dense)
        report["notes"] = list(warned)
        if report["unfinished"]:  # the file records it too (ssvi inspect and evaluate say it)
            report["notes"].append(f"the model of {source} was {report['unfinished']} (ssvi train --resume finishes "
                                   "a run)")
            err.print(f"note: {report['notes'][-1]}", highlight=False)
        if json_out:
            print_json(report)
            return
        out.print(kv_table(f"ssvi export: {output}", {
            "source": report["source"],
            "layout / dtype": f"{report['layout']} / {report['dtype']}",
            "active weights": f"{report['active_weights']:,} of {report['total_weights']:,} ({report['density']:.4f})"
                              + (f"; the file stores all {report['stored_weights']:,}" if report["layout"] == "dense" else ""),
            **size_rows(report),
        }))
