"""PNG figures of an evaluation: a reliability diagram and OOD score histograms.

matplotlib is an optional extra (``plots``: ``pip install -e '.[plots]'`` in a checkout): it is imported only here, only
when a figure is drawn, with the non-interactive Agg backend so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import numpy as np

from ssvi_cli.fileio import atomic_path

INSTALL_HINT = "pip install 'matplotlib>=3.7'"  # the plots extra's one package, from any install of ssvi
SCORE_LABELS = {
    "entropy": "predictive entropy",
    "mutual_information": "mutual information",
    "one_minus_max_prob": "1 - max probability",
}
SCORE_UNITS = {"entropy": " (nats)", "mutual_information": " (nats)"}  # 1 - max probability: a probability


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def require_pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend, or PlotsUnavailable naming the install command."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailable(f"--plots needs matplotlib, which is not installed; run: {INSTALL_HINT}") from exc
    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def panel_grid(plt: Any, n: int, size: tuple[float, float], **options: Any) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels of ``size`` inches in rows of four (several OOD sets would make one row
    too wide to read), the unused places of the last row hidden; the panels' axes in order."""
    cols = min(4, n)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False, **options)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _finish(plt: Any, fig: Any, path: Path, title: Optional[str] = None) -> Path:
    """The figure's title and layout, saved to ``path`` and closed, whatever the save does."""
    if title is not None:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _subtitle(report: dict[str, Any]) -> str:
    s = f", S={report['samples']}" if report.get("samples") else ""
    return f"{report['dataset']} {report['split']} (n={report['n']}), {report['mode']}{s}"


def reliability_diagram(report: dict[str, Any], path: Path) -> Path:
    """Accuracy against confidence per equal-width bin, with the gap to the diagonal and ECE."""
    plt = require_pyplot()
    rel = report["reliability"]
    lower, upper = np.asarray(rel["lower"], float), np.asarray(rel["upper"], float)
    acc = np.array([np.nan if a is None else a for a in rel["accuracy"]], float)
    conf = np.array([np.nan if c is None else c for c in rel["confidence"]], float)
    count = np.asarray(rel["count"], float)
    width, used = upper - lower, count > 0

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(lower[used], acc[used], width=width[used], align="edge", color="tab:blue", edgecolor="black",
           label="accuracy")
    ax.bar(lower[used], conf[used] - acc[used], bottom=acc[used], width=width[used], align="edge",
           fill=False, hatch="//", edgecolor="tab:red", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ece = report["metrics"]["ece"]
    ax.set_title(f"Reliability: {_subtitle(report)}\nECE (top-label, {len(count)} bins) = {ece:.4f}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(lower, count / max(count.sum(), 1), width=width, align="edge", color="gray", edgecolor="black")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence (max probability)")
    hist.set_ylabel("fraction")
    return _finish(plt, fig, path)


def ood_histograms(report: dict[str, Any], scores_in: dict[str, np.ndarray],
                   scores_ood: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """One row per OOD set, one column per score: in-distribution vs OOD score densities."""
    plt = require_pyplot()
    names, scores = list(scores_ood), list(scores_in)
    fig, axes = plt.subplots(len(names), len(scores), figsize=(4 * len(scores), 2.8 * len(names)),
                             squeeze=False)
    for r, name in enumerate(names):
        for c, score in enumerate(scores):
            ax = axes[r][c]
            a, b = np.asarray(scores_in[score]), np.asarray(scores_ood[name][score])
            hi = float(max(a.max(initial=0.0), b.max(initial=0.0)))
            bins = np.linspace(0.0, hi if hi > 0 else 1.0, 41)
            ax.hist(a, bins=bins, density=True, alpha=0.55, label=f"{report['dataset']} (in)")
            ax.hist(b, bins=bins, density=True, alpha=0.55, label=f"{name} (OOD)")
            auroc = report["ood"][name]["scores"][score]["auroc"]
            ax.set_title(f"{name}: {SCORE_LABELS.get(score, score)}\nAUROC {auroc:.3f}", fontsize=9)
            ax.set_xlabel(SCORE_LABELS.get(score, score) + SCORE_UNITS.get(score, ""), fontsize=8)
            ax.set_ylabel("density (histogram area 1)", fontsize=8)
            ax.legend(fontsize=7)
    return _finish(plt, fig, path, f"OOD scores, {_subtitle(report)}")


def samples_curves(report: dict[str, Any], path: Path) -> Path:
    """Accuracy, NLL, ECE and each OOD AUROC against the number of Monte Carlo samples S."""
    plt = require_pyplot()
    rows = report["per_samples"]
    panels = [(lambda r: r["metrics"]["accuracy"], f"{report['split']} accuracy"), (lambda r: r["metrics"]["nll"], "NLL (nats)"),
              (lambda r: r["metrics"]["ece"], f"ECE (top-label, {report['n_bins']} bins)")]
    for name, block in rows[-1]["ood"].items():  # the largest S has every score (one draw has no MI)
        panels.append((name, list(block["scores"])))
    fig, axes = panel_grid(plt, len(panels), (3.3, 3.0))
    xs = [r["samples"] for r in rows]
    for ax, (what, title) in zip(axes, panels):
        if callable(what):
            ax.plot(xs, [what(r) for r in rows], marker="o")
            ax.set_title(title, fontsize=9)
        else:  # an OOD set: one line per score, where the score exists at that S
            for score in title:
                pts = [(r["samples"], r["ood"][what]["scores"][score]["auroc"]) for r in rows
                       if score in r["ood"][what]["scores"]]
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=SCORE_LABELS.get(score, score))
            ax.set_title(f"OOD AUROC, {what}", fontsize=9)
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("Monte Carlo samples S")
        ax.grid(alpha=0.3)
    return _finish(plt, fig, path, f"Metrics against S (each S a prefix of one pass's draws), {_subtitle(report)}")


def write_plots(result: Any, out_dir: Path) -> list[Path]:
    """``reliability.png``, with OOD sets ``ood_scores.png`` and with several S ``samples.png`` for an
    EvaluationResult; a figure left in ``out_dir`` by an earlier evaluation that this one would not draw
    is removed (it would show the earlier evaluation)."""
    out_dir = Path(out_dir)
    report = result.report
    paths = [reliability_diagram(report, out_dir / "reliability.png")]
    if result.scores_ood:
        paths.append(ood_histograms(report, result.scores_in, result.scores_ood, out_dir / "ood_scores.png"))
    else:
        (out_dir / "ood_scores.png").unlink(missing_ok=True)
    if len(report.get("per_samples", [])) > 1:
        paths.append(samples_curves(report, out_dir / "samples.png"))
    else:
        (out_dir / "samples.png").unlink(missing_ok=True)
    return paths
