"""Paired differences between a sweep's groups and one baseline group, seed by seed.

A seed fixes a cell's validation split, initialisation, minibatch order and noise whatever its
method or settings, so two groups run on the same seeds can be compared seed by seed: the
difference of each metric on each seed both groups finished, then its mean and standard error
(sample std of the differences / sqrt(n)). Much of the seed-to-seed spread is shared and cancels,
so a paired difference separates settings that the groups' own mean ± std cannot.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from ssvi_cli.sweep.grid import (SweepError, SweepSpec, group_key, group_label, parse_values, seeds_text, setting_text,
                                 typed_number, yaml_text)

PAIRED_METRICS = (("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"))


def auroc_title(key: str) -> str:
    """A column's title for ``auroc:SET:SCORE``: SET may hold ':' itself (a label, a path)."""
    name = key[len("auroc:"):key.rindex(":")]
    return f"AUROC {name} ({'MI' if key.endswith('information') else 'entropy'})"


def _typed(key: str, value: Any) -> Any:
    """``value`` as a number of the key's kind (1 and 1.0 name one group of a float key)."""
    return float(value) if key == "sparsity" and isinstance(value, int) else \
        value if key in ("method", "sparsity") else typed_number(key, value)


def _value(group: dict[str, Any], key: str) -> str:
    if key == "method":
        return str(group["method"])
    if key == "sparsity":
        return yaml_text(group["sparsity"])
    return yaml_text(_typed(key, group["settings"].get(key)))


def select_baseline(spec: SweepSpec, groups: list[dict[str, Any]], selection: list[str]) -> dict[str, Any]:
    """The one group every ``KEY=VALUE`` of ``selection`` matches (KEY: method, sparsity, or a swept
    config key; ``sparsity=dense`` for a dense method)."""
    wanted: dict[str, str] = {}
    for text in selection:
        key, sep, raw = (part.strip() for part in text.partition("="))
        if not sep or not key:
            raise SweepError(f"--baseline expects KEY=VALUE, e.g. method=vi or sparse.alpha=0.3; got {text!r}")
        bare = [k for k in spec.axes if k.rpartition(".")[2] == key]  # criterion: --criterion's sparse.criterion
        key = bare[0] if key not in ("method", "sparsity", *spec.axes) and len(bare) == 1 else key
        if key not in ("method", "sparsity", *spec.axes):
            swept = ", ".join(spec.axes) or "none"
            raise SweepError(f"--baseline {text!r}: {key!r} is not method, sparsity or a swept key (swept: {swept})")
        if key in wanted:
            raise SweepError(f"--baseline names {key!r} twice")
        values = parse_values(raw, f"--baseline {text!r}") if raw else [None]
        value = values[0] if len(values) == 1 else values
        wanted[key] = "null" if key == "sparsity" and value == "dense" else yaml_text(_typed(key, value))
    # A group without a swept key (its method ignores the key and ran once) matches every swept value.
    swept = {k: {yaml_text(_typed(k, x)) for x in spec.axes[k]} for k in wanted if k in spec.axes}
    matches = [g for g in groups if all(_value(g, k) == v or (k in swept and k not in g["settings"] and v in swept[k])
                                        for k, v in wanted.items())]
    if len(matches) != 1:
        shown = "; ".join(group_label(g) for g in (matches or groups)[:6])
        what = "matches" if matches else "groups are"
        raise SweepError(f"--baseline {' '.join(selection)} names {len(matches)} groups, not one ({what}: {shown})")
    return matches[0]


def check_selection(spec: SweepSpec, cells: list[Any], selection: list[str]) -> Optional[dict[str, Any]]:
    """The grid group a ``--baseline`` names (None without one); refuses, before a sweep runs, one
    that does not name exactly one group of the grid."""
    if not selection:
        return None
    groups = {group_key(vars(c)): {"method": c.method, "sparsity": c.sparsity, "settings": c.settings} for c in cells}
    return select_baseline(spec, list(groups.values()), selection)


def _stat(diffs: list[float]) -> dict[str, Any]:
    n = len(diffs)
    if not n:
        return {"mean": None, "se": None, "n": 0}
    return {"mean": statistics.fmean(diffs), "se": statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None,
            "n": n}


def paired_differences(spec: SweepSpec, cells: list[Any], groups: list[dict[str, Any]], rows: list[dict[str, Any]],
                       selection: list[str]) -> dict[str, Any]:
    """Every other group minus the baseline group, per metric and per OOD AUROC, over common seeds.

    The selection is checked against the grid; a baseline with no evaluated cell yet (an
    interrupted sweep) gives a ``note`` and no differences rather than an error."""
    base = check_selection(spec, cells, selection)
    if base is None:
        raise SweepError("paired differences need a --baseline")
    by_group: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(group_key(row), {})[row["seed"]] = row
    reference = by_group.get(group_key(base), {})
    baseline = {**base, "selection": list(selection)}
    if not reference:
        return {"baseline": baseline, "metrics": [], "groups": [],
                "note": f"no paired differences: the baseline group ({group_label(base)}) has no evaluated cell yet"}
    metrics = [k for k, _ in PAIRED_METRICS] + sorted({k for r in rows for k in r if k.startswith("auroc:")})
    out = []
    for group in groups:
        if group_key(group) == group_key(base):
            continue
        mine = by_group.get(group_key(group), {})
        seeds = sorted(set(mine) & set(reference))
        entry: dict[str, Any] = {"method": group["method"], "sparsity": group["sparsity"],
                                 "settings": group["settings"], "seeds": seeds}
        for metric in metrics:
            pairs = [(mine[s].get(metric), reference[s].get(metric)) for s in seeds]
            entry[metric] = _stat([float(a) - float(b) for a, b in pairs if _finite(a) and _finite(b)])
        out.append(entry)
    return {"baseline": baseline, "metrics": metrics, "groups": out}


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(float(value))


def diff_text(stat: Optional[dict[str, Any]]) -> str:
    """``+mean ± se`` (``-`` without pairs; no ``± se`` from a single pair)."""
    if not stat or stat.get("mean") is None:
        return "-"
    se = f" ± {stat['se']:.4f}" if stat.get("se") is not None else ""
    return f"{stat['mean']:+.4f}{se}"


def paired_markdown(paired: dict[str, Any], axes: list[str]) -> list[str]:
    title = ["", f"## Paired differences from {group_label(paired['baseline'])}", ""]
    if paired.get("note"):
        return [*title, paired["note"] + "."]
    aurocs = [m for m in paired["metrics"] if m.startswith("auroc:")]
    head = ["method", "sparsity", *axes, "seeds", *(f"Δ {label}" for _, label in PAIRED_METRICS),
            *(f"Δ {auroc_title(k)}" for k in aurocs)]
    lines = [*title,
             "Each group minus the baseline, seed by seed over the seeds both finished (a seed fixes the "
             "split, initialisation and batch order of every cell alike): mean ± standard error.", "",
             md_row(head), "|" + "---|" * len(head)]
    for g in paired["groups"]:
        cells = [g["method"], "dense" if g["sparsity"] is None else f"{g['sparsity']:g}",
                 *(setting_text(g, a) for a in axes), seeds_text(g),
                 *(diff_text(g.get(k)) for k in paired["metrics"])]
        lines.append(md_row(cells))
    return lines


def md_row(cells: list[str]) -> str:
    """One row of a Markdown table, a ``|`` in a cell (an OOD folder's path, say) escaped so that it
    stays one cell."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
