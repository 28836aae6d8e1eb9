"""A sweep's report: every cell's training summary and evaluation, mean ± std over seeds per group
(method, sparsity, swept keys), as ``report.json`` and ``report.md``, plus the figures when
matplotlib is installed (``sweep.figures``).

The std is the sample standard deviation over seeds (ddof = 1; none for a single seed, whose table
cells show the mean alone).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from ssvi_cli.fileio import read_jsonl, write_json, write_text
from ssvi_cli.methods import METHODS
from ssvi_cli.runs.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, SUPPORT_FILE
from ssvi_cli.sweep.drift import changed_cells
from ssvi_cli.sweep.grid import (EVAL_FILE, OWN_KEYS, Cell, SweepError, SweepSpec, group_key, group_label,
                                 read_spec, seeds_text, setting_text, yaml_text)
from ssvi_cli.sweep.paired import auroc_title, md_row, paired_differences, paired_markdown
from ssvi_cli.sweep.failures import failure
from ssvi_cli.sweep.runner import cell_busy, cell_dir, cell_state, evaluated

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
STAGES = ("early", "middle", "late")
# (column, label, digits): the metrics every cell reports
METRICS = (("accuracy", "accuracy", 4), ("nll", "NLL", 4), ("ece", "ECE", 4), ("brier", "Brier", 4),
           ("mi_mean", "mean MI", -1))  # digits -1: scientific notation
UNMOVED_HINT = "A longer run, a smaller sparse.delta_t or sparse.delta_t=auto gives them subspace steps."
COSTS = (("training_flops", "training FLOPs"), ("model_file_bytes", "file bytes"), ("density", "density"),
         ("subspace_steps", "subspace steps"))


def cell_row(path: Path, cell: Cell) -> dict[str, Any]:
    """One evaluated cell's numbers (its state ``done``)."""
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # its checkpoints rebuild it: the cell resumes after its last epoch (final evaluation, model file)
        raise SweepError(f"cell {cell.name}: {SUMMARY_FILE} cannot be read ({type(exc).__name__}); delete "
                         f"{path / SUMMARY_FILE} and {path / EVAL_FILE} and resume the sweep: the cell's last "
                         "checkpoint writes them again") from None
    evaluation = json.loads((path / EVAL_FILE).read_text(encoding="utf-8"))  # read by cell_state already
    row: dict[str, Any] = {"cell": cell.name, "method": cell.method, "sparsity": cell.sparsity, "seed": cell.seed,
                           "settings": cell.settings, "samples": evaluation.get("samples")}
    row.update({key: evaluation["metrics"].get(key) for key, _, _ in METRICS})
    for name, block in (evaluation.get("ood") or {}).items():
        for score in ("entropy", "mutual_information"):  # a deterministic model has no MI
            if score in block["scores"]:
                row[f"auroc:{name}:{score}"] = block["scores"][score]["auroc"]
    row.update({key: summary.get(key) for key, _ in COSTS})
    row["threads"] = sorted(_threads(path, summary))
    row["criteria_iou"] = stage_iou(path / SUPPORT_FILE)
    return row


def _threads(path: Path, summary: dict[str, Any]) -> set[int]:
    """The CPU thread counts a cell trained with (more than one when it was resumed under another
    ``--jobs``/``--threads``); none for a run made before they were recorded."""
    seen = {r["threads"] for r in read_jsonl(path / METRICS_FILE) if isinstance(r.get("threads"), int)}
    return seen | ({summary["threads"]} if isinstance(summary.get("threads"), int) else set())


def stage_iou(support_file: Path) -> Optional[dict[str, Any]]:
    """The criteria-overlap matrices recorded at the first, middle and last subspace steps that drop
    any entry (a run records up to ten, ``Schedule.records_overlap``): late in a long run the drop
    fraction rounds to no entry at all, where every IoU would read 1 (two empty sets)."""
    if not support_file.is_file():
        return None
    records = [r for r in read_jsonl(support_file) if r.get("criteria_iou")
               and sum(int(layer.get("dropped", 1)) for layer in r.get("layers", {}).values()) > 0]
    if not records:
        return None
    picks = {"early": records[0], "middle": records[len(records) // 2], "late": records[-1]}
    return {stage: {"step": rec["step"], **rec["criteria_iou"]} for stage, rec in picks.items()}


def _stats(values: list[float]) -> dict[str, Any]:
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not clean:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(clean), "std": statistics.stdev(clean) if len(clean) > 1 else None,
            "n": len(clean)}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every metric, per (method, sparsity, settings) in grid order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    out = []
    for members in groups.values():
        first = members[0]
        own = {k for k, _, _ in METRICS} | {k for k, _ in COSTS}
        metric_keys = [k for k in first if k in own or k.startswith("auroc:")]
        out.append({"method": first["method"], "sparsity": first["sparsity"], "settings": first["settings"],
                    "seeds": sorted(m["seed"] for m in members), "samples": first["samples"],
                    **{k: _stats([m.get(k) for m in members]) for k in metric_keys},
                    "criteria_iou": _mean_iou([m["criteria_iou"] for m in members if m.get("criteria_iou")])})
    return out


def _mean_iou(per_seed: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not per_seed:
        return None
    out = {}
    for stage in STAGES:
        mats = [s[stage]["iou"] for s in per_seed]
        n = len(mats[0])
        out[stage] = {"criteria": per_seed[0][stage]["criteria"], "steps": [s[stage]["step"] for s in per_seed],
                      "iou": [[statistics.fmean(m[i][j] for m in mats) for j in range(n)] for i in range(n)]}
    return out


def method_values(sweep_dir: Path, spec: SweepSpec, done: list[Cell]) -> dict[str, dict[str, Any]]:
    """``{key: {method: value}}`` for the config keys, neither swept nor the cells' own, whose value
    differs between methods (a preset's ``methods:`` section), read from the ``done`` cells' configs."""
    import yaml

    seen: dict[str, dict[str, set]] = {}
    for cell in done:
        try:
            config = yaml.safe_load((cell_dir(sweep_dir, cell) / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):  # named in the report's changed_cells
            continue
        for section, values in (config.items() if isinstance(config, dict) else ()):
            for key, value in (values.items() if isinstance(values, dict) else ()):
                name = f"{section}.{key}"
                if name not in OWN_KEYS and name not in spec.axes:
                    seen.setdefault(name, {}).setdefault(cell.method, set()).add(json.dumps(value))
    return {name: {m: json.loads(next(iter(v))) for m, v in by_method.items()}
            for name, by_method in seen.items()
            if all(len(v) == 1 for v in by_method.values()) and len({next(iter(v)) for v in by_method.values()}) > 1}


def _under_way(path: Path) -> Optional[str]:
    """How a cell not evaluated stands, told from one not begun (which jobs of a scheduler to submit
    again): ``running`` (another process holds its lock), ``stopped`` (a checkpoint to go on from) or
    ``trained``; None for one not begun, or evaluated otherwise than the sweep asks now (said apart)."""
    if cell_busy(path):
        return "running"
    state = cell_state(path)
    return {"partial": "stopped", "trained": "trained"}.get(state)


def build_report(sweep_dir: Path, baseline: Optional[list[str]] = None) -> dict[str, Any]:
    """The report; with ``baseline`` (``KEY=VALUE`` strings naming one group) also every other
    group's paired differences from it (``sweep.paired``)."""
    spec, cells = read_spec(sweep_dir)
    done = [c for c in cells if cell_state(cell_dir(sweep_dir, c), spec) == "done"]  # each cell's files looked at once
    rows = [cell_row(cell_dir(sweep_dir, c), c) for c in done]
    failed = {c.name: why for c in cells if c not in done and (why := failure(cell_dir(sweep_dir, c)))}
    under_way = {c.name: state for c in cells if c not in done and c.name not in failed
                 and (state := _under_way(cell_dir(sweep_dir, c)))}
    groups = aggregate(rows)
    report = {"format": "ssvi-sweep-report", "version": 1, "sweep": str(sweep_dir), "spec": spec.to_dict(),
              "cells_total": len(cells), "cells_done": len(rows),
              "missing": [c.name for c in cells if c not in done and c.name not in failed],
              "failed": failed, "under_way": under_way,
              "method_values": method_values(sweep_dir, spec, done), "groups": groups, "cells": rows}
    threads = sorted({n for r in rows for n in r["threads"]})
    if threads:  # what a rerun needs to give the same numbers to the last digit
        report["threads"] = threads
    unmoved = {group_label(r): None for r in rows if METHODS.get(r["method"]).moves_support and r["subspace_steps"] == 0}
    if unmoved:  # a schedule too short for its delta_t: a fixed support
        report["support_unmoved"] = list(unmoved)
    changed = changed_cells(sweep_dir, spec, cells)
    if changed:  # reported as they are, under the sweep's settings: said in both files
        report["changed_cells"] = changed
    rescore = [c.name for c in cells if c.name in report["missing"] and c.name not in changed
               and evaluated(cell_dir(sweep_dir, c))]
    if rescore:  # scored before on an --ood set changed or added since, or other --samples: not counted, nor lost
        report["evaluated_otherwise"] = rescore
    if baseline:
        report["paired"] = paired_differences(spec, cells, groups, rows, baseline)
    return report


def mean_std(stat: Optional[dict[str, Any]], digits: int = 4) -> str:
    """``mean ± std`` of a group's statistic (the mean alone for one seed, ``-`` when there is none)."""
    if not stat or stat.get("mean") is None:
        return "-"
    if digits == 0:  # costs: their spread over seeds is a few header bytes, not worth a column
        return f"{stat['mean']:.3g}"
    mean_fmt, std_fmt = (".2e", ".1e") if digits < 0 else (f".{digits}f", f".{digits}f")
    spread = "" if stat.get("std") is None else f" ± {stat['std']:{std_fmt}}"
    return f"{stat['mean']:{mean_fmt}}{spread}"


def under_way_text(report: dict[str, Any]) -> str:
    """Which of the report's cells not evaluated are under way, in words (empty if none is); those
    evaluated otherwise than the sweep asks now are said apart (``evaluated_otherwise``)."""
    under_way = report.get("under_way") or {}
    said = {"running": "running now", "stopped": "stopped at a checkpoint, from which a rerun goes on",
            "trained": "trained, not yet evaluated"}
    parts = [f"{words}: {', '.join(n for n, s in under_way.items() if s == state)}"
             for state, words in said.items() if state in under_way.values()]
    apart = set(under_way) | set(report.get("evaluated_otherwise") or ())
    others = any(name not in apart for name in report["missing"])
    return f" Of these, {'; '.join(parts)}{'; the others not begun' * others}." if parts else ""


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the results table (mean ± std over seeds) and the criteria IoU."""
    spec = SweepSpec.from_dict(report["spec"])
    groups = report["groups"]
    aurocs = sorted({k for g in groups for k in g if k.startswith("auroc:")})
    axes, threads = list(spec.axes), report.get("threads") or []
    head = ["method", "sparsity", *axes, "seeds", *(label for _, label, _ in METRICS),
            *(auroc_title(k) for k in aurocs),
            "training FLOPs", "file bytes"]
    lines = [f"# Sweep report: {report['sweep']}", "",
             f"{report['cells_done']} of {report['cells_total']} cells evaluated; preset `{spec.preset}`, "
             f"Monte Carlo prediction with S={spec.samples}; mean ± std over seeds (sample std)."
             + (f" Each cell trained on {threads[0]} CPU thread{'s' if threads[0] != 1 else ''}."
                if len(threads) == 1 else "")
             + (" Every cell sets " + ", ".join(f"`{k}={yaml_text(v)}`" for k, v in spec.fixed.items()) + "."
                if spec.fixed else ""), "",
             md_row(head), "|" + "---|" * len(head)]
    for g in groups:
        cells = [g["method"], "dense" if g["sparsity"] is None else f"{g['sparsity']:g}",
                 *(setting_text(g, a, str) for a in axes), seeds_text(g),
                 *(mean_std(g.get(k), d) for k, _, d in METRICS), *(mean_std(g.get(k)) for k in aurocs),
                 mean_std(g.get("training_flops"), 0), mean_std(g.get("model_file_bytes"), 0)]
        lines.append(md_row(cells))
    if report["missing"]:
        lines += ["", f"Not evaluated yet: {', '.join(report['missing'])}." + under_way_text(report)]
    if report.get("evaluated_otherwise"):
        lines += ["", f"Of these, scored before otherwise than the sweep asks now (an `--ood` set changed or added "
                      f"since, or `--samples`), which `ssvi sweep --resume` scores again, keeping their training, once "
                      f"the sweep's `--ood` sets can be read: {', '.join(report['evaluated_otherwise'])}."]
    if report.get("failed"):
        lines += ["", "Failed (their logs say more: `logs/<cell>.log` for a cell the sweep ran, the output of `ssvi sweep "
                  "--run-cell` for one a scheduler ran; a rerun repeats the failure unless its cause, a missing dataset or a "
                  "diverged run, say, is dealt with): "
                  + "; ".join(f"{name} ({why})" for name, why in report["failed"].items()) + "."]
    if len(threads) > 1:
        lines += ["", f"The cells trained on {' or '.join(map(str, threads))} CPU threads (`--jobs`, `--threads`, or a "
                  "resume under others); a cell's numbers move in their last digits with the thread count."]
    if report.get("support_unmoved"):
        lines += ["", f"No subspace step before t_end, so the support never moved (the run trained a fixed support, as static does), in: "
                  f"{'; '.join(report['support_unmoved'])}. {UNMOVED_HINT}"]
    if report.get("changed_cells"):
        uncounted = set(report["missing"]) | set(report.get("failed") or {})  # not evaluated: not in the table
        lines += ["", "Run under other settings than the sweep gives them now (a preset edited since, or folders "
                  "copied in), and counted above under the sweep's once evaluated: "
                  + "; ".join(f"{name} ({what}{'; not evaluated' * (name in uncounted)})"
                              for name, what in report["changed_cells"].items()) + "."]
    for key, by_method in (report.get("method_values") or {}).items():
        shown = ", ".join(f"{m} {json.dumps(v)}" for m, v in by_method.items())
        lines += ["", f"`{key}` differs by method (the preset's `methods:` section): {shown}."]
    if report.get("paired"):
        lines += paired_markdown(report["paired"], axes)
    lines += _iou_markdown(groups)
    return "\n".join(lines) + "\n"


def _iou_markdown(groups: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for g in groups:
        iou = g.get("criteria_iou")
        if not iou:
            continue
        names = iou["early"]["criteria"]
        pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
        recorded, n = len(iou["early"]["steps"]), len(g["seeds"])
        over = "seeds" if recorded == n else f"the {recorded} of {n} seeds that recorded it"
        steps = {s: sorted(set(iou[s]["steps"])) for s in STAGES}  # seeds may reach a stage at other steps
        label = lambda s: f"step {steps[s][0]}" + (f"-{steps[s][-1]}" if len(steps[s]) > 1 else "")  # noqa: E731
        shown = [s for k, s in enumerate(STAGES) if k == 0 or steps[s] != steps[STAGES[k - 1]]]  # one column a step
        fewer = "" if len(shown) == len(STAGES) else (" The runs recorded it at too few such steps for three: a "
                                                      "column that would repeat the one before it is left out.")
        out += ["", f"## Criteria overlap: {group_label(g)}", "",
                f"IoU of the entries each removal criterion would drop (mean over {over}), "
                "at the first, middle and last of the (up to ten) subspace steps a run records it at, spread "
                f"over the steps that drop any entry.{fewer}", "",
                "| criteria | " + " | ".join(f"{s} ({label(s)})" for s in shown) + " |",
                "|---|" + "---|" * len(shown)]
        for i, j in pairs:
            out.append(f"| {names[i]} vs {names[j]} | "
                       + " | ".join(f"{iou[s]['iou'][i][j]:.3f}" for s in shown) + " |")
    return out


def write_report(sweep_dir: Path, figures: bool = True, baseline: Optional[list[str]] = None) -> dict[str, Any]:
    """Write report.json, report.md and (with matplotlib) the figures; returns the report."""
    report = build_report(sweep_dir, baseline)
    written = [str(Path(sweep_dir) / REPORT_JSON), str(Path(sweep_dir) / REPORT_MD)]
    if figures and report["groups"]:
        from ssvi_cli.sweep.figures import FiguresUnavailable, write_figures

        try:
            written += [str(p) for p in write_figures(report, Path(sweep_dir))]
        except FiguresUnavailable as exc:
            report["figures_note"] = str(exc)
    from ssvi_cli.sweep.figures import FIGURES

    for name in FIGURES:  # a figure left from an earlier report would show that report's numbers
        if str(Path(sweep_dir) / name) not in written:
            (Path(sweep_dir) / name).unlink(missing_ok=True)
    report["files"] = written
    write_json(Path(sweep_dir) / REPORT_JSON, report)
    write_text(Path(sweep_dir) / REPORT_MD, markdown(report))
    return report
