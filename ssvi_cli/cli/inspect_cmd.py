"""``ssvi inspect``: what the posterior learned, how big the file is, how the support moved."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ssvi_cli.cli.common import (UsageError, check_output_dir, count, err, kv_table, out, print_json, scored_as,
                                 size_rows)
from ssvi_cli.cli.paths import try_making
from ssvi_cli.machine import given_path

HISTORY_ROWS = 12  # support-history steps shown in the table (all are in --json)


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_(
        source: Annotated[Path, typer.Argument(help="A model file (.safetensors), a training checkpoint (.pt) or a run directory.")],
        json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON only.")] = False,
        plots: Annotated[Optional[Path], typer.Option(help="Write SNR histograms (snr_LAYER.png, snr_all.png) to this folder, replacing those an earlier inspect drew there; needs matplotlib.")] = None,
        drop_fraction: Annotated[float, typer.Option(help="Drop fraction of the criteria-overlap analysis, in (0, 1].")] = 0.3,
    ) -> None:
        """Per-layer density, mu/sigma/SNR statistics, sizes, support history and criteria overlap."""
        from ssvi_cli.evaluation.inspection import inspect_model, posterior, write_snr_plots

        if not 0.0 < drop_fraction <= 1.0:
            raise UsageError(f"--drop-fraction must be in (0, 1], got {drop_fraction}")
        source = given_path(source)
        if not source.exists():
            raise UsageError(f"{source} does not exist")
        written: list[Path] = []
        if plots is not None:
            check_output_dir(plots, "--plots")
            try_making(plots, f"--plots {plots}")
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("--plots needs matplotlib; install it with: pip install 'matplotlib>=3.7'") from None
        read = posterior(source)  # the model is read once, for the report and the plots
        named = read[2]
        if plots is not None and not any(layer.bayesian and layer.active for _, layer in named):
            raise UsageError(f"--plots: {source} has no Bayesian layer with active weights, so no SNR "
                             "(|mu| / sigma) to plot; inspect it without --plots")
        report = inspect_model(source, drop_fraction, read)
        if plots is not None:
            written = write_snr_plots(named, plots)
            report["plots"] = [str(p) for p in written]
        if json_out:
            print_json(report)
            return
        _print_report(report)
        if written:
            err.print(f"wrote {len(written)} SNR histograms to {plots}")


def _g(value: Optional[float]) -> str:
    """Short numbers for narrow tables: 0.0312, 456, 15300, 1.6e6, 7.1e-4."""
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0 or 0.01 <= abs(value) < 1000:
        return f"{value:.3g}"
    if 1000 <= abs(value) < 1e5:
        return f"{value:.0f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _trained(tr: dict[str, Any]) -> str:
    if tr.get("method") is None and tr.get("epochs") is None:
        return "not recorded (written by ssvi_cli.save from a user's own loop)"
    from ssvi_cli.methods import METHODS

    start = tr.get("init_from")
    method = tr.get("method")
    kind = METHODS.get(method) if method in METHODS.names() else None
    # A criterion only matters to a method whose support moves by SNR-type scores (ssvi).
    criterion = f", criterion {tr.get('criterion')}" if kind is None or (kind.moves_support and kind.bayesian) else ""
    sparsity = f", sparsity {tr.get('sparsity')}" if kind is None or not kind.dense else ""
    epochs = count(tr["epochs"], "epoch") if isinstance(tr.get("epochs"), int) else f"{tr.get('epochs')} epochs"
    from ssvi_cli.modelfile.card import Training

    stopped = Training.from_dict(tr).unfinished_note()  # as export, infer and evaluate say it
    return (f"{method}{sparsity}{criterion}, {epochs}, seed {tr.get('seed')}"
            + (f", started from {start}" if start else "") + (f"; {stopped}" if stopped else ""))


def _test_accuracy(metrics: dict[str, Any], capped: Optional[int] = None) -> Any:
    """The run's own test accuracy, with how it was scored (as train's table says it): a run capped
    by data.max_test scored part of its test split."""
    acc = metrics.get("test_accuracy")
    if not isinstance(acc, (int, float)):
        return acc
    how = scored_as(metrics) + (", part of the test split: data.max_test" if capped else "")
    return f"{acc:.4f}" + (f" ({how}, at the end of training)" if how else "")


def _made_with(p: dict[str, Any]) -> str:
    """What trained the model (``runs.provenance``): ``ssvi 0.1.0, torch 2.14.1, AMD EPYC, 2 threads``."""
    threads = p.get("threads")
    return ", ".join(str(v) for v in (f"ssvi {p.get('ssvi') or '(not installed)'}", f"torch {p.get('torch')}",
                                      p.get("device"), None if threads is None else count(threads, "thread")) if v)


def _print_report(r: dict[str, Any]) -> None:
    arch, fmt, tr = r["architecture"], r["format"], r["training"]
    out.print(kv_table(f"ssvi inspect: {r['source']}", {
        "model": f"{arch.get('name')} (" + (f"Bayesian, sigma = {arch.get('sigma_param')}(rho))" if arch.get("bayesian")
                                            else "deterministic)"),
        "data": (f"{r['data']['name']} {tuple(r['data']['input_shape'])}" if r["data"]["input_shape"] else
                 "not recorded") + f", {r['data']['num_classes']} classes",
        "trained": _trained(tr),
        "format": f"{fmt['name']} v{fmt['version']}, {fmt['layout']}, {fmt['dtype']}",
        "test accuracy": _test_accuracy(r["metrics"], r.get("max_test")),
        **({"made with": _made_with(r["metrics"]["provenance"])} if isinstance(r["metrics"].get("provenance"), dict) else {}),
    }))
    out.print(_layers_table(r["layers"]))
    if r["architecture"].get("bayesian", True):
        out.print(_posterior_table(r["layers"]))
    else:  # its table would be dashes under an SNR title
        out.print("posterior: none (a deterministic model: its weights are means, with no sigma or SNR)")
    flops = r["flops"]["per_prediction"]
    out.print(f"FLOPs per prediction: {'-' if flops is None else format(flops, ',')} ({r['flops']['convention']})")
    t = r["totals"]
    out.print(kv_table("totals", {
        "active weights": f"{t['active_weights']:,} of {t['total_weights']:,} (density {t['density']:.4f})",
        **size_rows(t, "" if t["measured_from"] == "file" else f"measured from the {t['measured_from']}"),
    }))
    for note in r.get("notes", []):
        out.print(f"note: {note}", highlight=False)
    history = r.get("support_history")
    if history is not None:
        _print_history(history)
    overlap = r.get("criteria_overlap")
    if overlap is not None and overlap["dropped"] == 0:
        out.print(f"criteria overlap: at drop fraction {overlap['fraction']} no layer drops an entry "
                  "(too few active entries); pass a larger --drop-fraction")
    elif overlap is not None:
        table = Table(title=f"criteria overlap: IoU of the entries each criterion would drop now "
                            f"(drop fraction {overlap['fraction']}, lambda {overlap['lambda']})",
                      title_justify="left")
        table.add_column("")
        for name in overlap["criteria"]:
            table.add_column(name, justify="right")
        for name, row in zip(overlap["criteria"], overlap["iou"]):
            table.add_row(name, *(f"{v:.3f}" for v in row))
        out.print(table)


def _layers_table(layers: list[dict[str, Any]]) -> Table:
    table = Table(title="layers", title_justify="left")
    for col in ("layer", "shape", "active / total", "density", "index", "bytes", "FLOPs/prediction"):
        table.add_column(col, justify="left" if col in ("layer", "shape", "index") else "right", overflow="fold")
    for l in layers:
        table.add_row(l["name"], "x".join(map(str, l["shape"])), f"{l['active']:,} / {l['total']:,}",
                      f"{l['density']:.4f}", str(l["index"] or "-"), f"{l['bytes']:,}" if l["bytes"] else "-",
                      "-" if l["flops_per_prediction"] is None else f"{l['flops_per_prediction']:,}")
    return table


def _posterior_table(layers: list[dict[str, Any]]) -> Table:
    table = Table(title="posterior (SNR = |mu| / sigma over active weights)", title_justify="left")
    for col in ("layer", "mean |mu|", "sigma med", "SNR min", "q10", "med", "q90", "max", "SNR<1"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for l in layers:
        s = l["snr"] or {}
        table.add_row(l["name"], _g(l["mu"]["mean_abs"]), _g((l["sigma"] or {}).get("median")),
                      _g(s.get("min")), _g(s.get("q10")), _g(s.get("median")), _g(s.get("q90")),
                      _g(s.get("max")), "-" if l["snr_below_1"] is None else f"{l['snr_below_1']:.1%}")
    return table


def _print_history(h: dict[str, Any]) -> None:
    steps = h["steps"]
    title = (f"support history: {count(h['subspace_steps'], 'subspace step')}, {h['total_swapped']:,} entries swapped"
             + (f", final IoU {h['final_iou']:.4f}" if steps else ""))
    table = Table(title=title, title_justify="left")
    for col in ("step", "drop fraction", "swapped", "IoU old/new"):
        table.add_column(col, justify="right")
    shown = steps if len(steps) <= HISTORY_ROWS else steps[: HISTORY_ROWS // 2] + steps[-HISTORY_ROWS // 2:]
    for i, s in enumerate(shown):
        if len(steps) > HISTORY_ROWS and i == HISTORY_ROWS // 2:
            table.add_row("...", "", "", "")
        table.add_row(str(s["step"]), f"{s['fraction']:.4f}", f"{s['swapped']:,}", f"{s['iou']:.4f}")
    out.print(table)
