"""The sweep's figures (need the ``plots`` extra, matplotlib): each metric against sparsity per
method with the seed spread, and accuracy against training FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssvi_cli import fileio
from ssvi_cli.evaluation.plots import panel_grid

METRICS_VS_SPARSITY = "metrics_vs_sparsity.png"
ACCURACY_VS_FLOPS = "accuracy_vs_flops.png"
FIGURES = (METRICS_VS_SPARSITY, ACCURACY_VS_FLOPS)


class FiguresUnavailable(RuntimeError):
    """matplotlib is not installed: the tables are written, the figures are not."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise FiguresUnavailable("figures need matplotlib: pip install 'matplotlib>=3.7' "
                                 "(the tables were written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(group: dict[str, Any]) -> str:
    extra = ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in group["settings"].items())
    return group["method"] + (f" ({extra})" if extra else "")


MARKERS = "osD^vP*X"  # one per series: a series drawn over another's points (ssvi whose support never
# moved is static) still shows its own marker


def _marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def _annotate(ax: Any, labels: list[tuple[float, float, str, str]], size: float = 7) -> None:
    """Sparsity labels beside their points, in their series' colour, placed once the axes are laid out:
    a label whose box would cover another's moves down; the same text at the same point (two series
    through one point) is written once."""
    fig = ax.figure
    fig.canvas.draw()  # the axes' final place, limits and scale
    pt = fig.dpi / 72  # pixels per point: offsets are in points, boxes in pixels
    anchors: list[tuple[float, float, str]] = []
    boxes: list[tuple[float, float, float, float]] = []

    def box(px: float, py: float, dy: float, text: str) -> tuple[float, float, float, float]:
        x0, y0 = px + 3 * pt, py + dy * pt  # a glyph of `size` points is about 0.6 of it wide
        return x0, y0, x0 + 0.62 * size * len(text) * pt, y0 + 1.25 * size * pt

    def clear(b: tuple[float, float, float, float]) -> bool:
        return all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in boxes)

    for x, y, text, color in labels:
        px, py = ax.transData.transform((x, y))
        if any(abs(px - qx) < 6 and abs(py - qy) < 6 and text == t for qx, qy, t in anchors):
            continue
        dy = 3.0
        while not clear(box(px, py, dy, text)) and dy > -60:
            dy -= 1.3 * size
        anchors.append((px, py, text))
        boxes.append(box(px, py, dy, text))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, dy), fontsize=size, color=color)


def _save(fig: Any, target: Path) -> Path:
    with fileio.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target


def write_figures(report: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    groups = report["groups"]
    panels = [("accuracy", "test accuracy"), ("nll", "NLL"), ("ece", "ECE (15 bins)")]
    aurocs = sorted({k for g in groups for k in g if k.startswith("auroc:") and k.endswith(":entropy")})
    # every OOD set; a path by its file or folder name where no other set has that name (the tables
    # give the whole path)
    names = {k: k[len("auroc:"):-len(":entropy")] for k in aurocs}
    short = {k: Path(n).name if Path(n).is_absolute() else n for k, n in names.items()}
    shown = {k: short[k] if list(short.values()).count(short[k]) == 1 else names[k] for k in aurocs}
    panels += [(k, f"OOD AUROC, {shown[k]} (entropy)") for k in aurocs]
    series: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        series.setdefault(_label(g), []).append(g)
    sparsities = sorted({g["sparsity"] for g in groups if g["sparsity"] is not None})
    fig, axes = panel_grid(plt, len(panels), (4.2, 3.6), dpi=110)
    # methods at one x drawn apart: the sparse ones, or where no sparsity was swept the dense ones at 0
    axis = sparsities or [0.0]
    offset = _dodge(sparsities, [lab for lab, ms in series.items()
                                 if any(g["sparsity"] is not None for g in ms) or not sparsities])
    for ax, (key, title) in zip(axes, panels):
        for i, (label, members) in enumerate(series.items()):
            color = f"C{i}"
            stats = [(g["sparsity"], g[key]) for g in members if g.get(key) and g[key]["mean"] is not None]
            if not stats:
                continue
            if all(s is None for s, _ in stats):  # a dense method: its level across the sparsity axis
                mean, std = stats[0][1]["mean"], stats[0][1]["std"] or 0.0  # no spread for one seed
                if sparsities:  # across the whole panel: a visible line also where one sparsity was swept
                    ax.axhline(mean, color=color, linestyle="--", label=label)
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
                else:  # dense methods alone: each at sparsity 0, where it is
                    ax.errorbar([offset.get(label, 0.0)], [mean], yerr=[std], marker=_marker(i), capsize=3, color=color,
                                label=label)
                continue
            stats.sort(key=lambda t: t[0])
            ax.errorbar([s + offset.get(label, 0.0) for s, _ in stats], [v["mean"] for _, v in stats], yerr=[v["std"] or 0.0 for _, v in stats],
                        marker=_marker(i), capsize=3, color=color, label=label, alpha=0.85)
        ax.set_xlabel("sparsity")
        # ticks at the swept values alone: methods drawn apart are not read as other sparsities (labels
        # turned where values lie close, 0.99 0.995 0.999, so that they do not run into each other)
        close = len(axis) > 1 and min(b - a for a, b in zip(axis, axis[1:])) < (axis[-1] - axis[0]) / 12
        ax.set_xticks(axis, [f"{v:g}" for v in axis], rotation=90 if close else 0, fontsize=8 if close else None)
        if len(axis) == 1:
            ax.set_xlim(axis[0] - 0.01, axis[0] + 0.01)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mean ± std over seeds ({Path(report['sweep']).name})"
                 + ("; methods drawn a little apart along x" if len(offset) > 1 else ""), fontsize=9)
    fig.tight_layout()
    written = [_save(fig, out_dir / METRICS_VS_SPARSITY)]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=110)
    labels: list[tuple[float, float, str, str]] = []
    points = {label: sorted((g["training_flops"]["mean"], g["accuracy"]["mean"], g["accuracy"]["std"] or 0.0,
                             g["sparsity"]) for g in members if g.get("training_flops") and g["training_flops"]["mean"]
                            and g.get("accuracy") and g["accuracy"]["mean"] is not None)
              for label, members in series.items()}
    costs = [c for pts in points.values() for c in {p[0] for p in pts}]
    shared = len(costs) > len(set(costs))  # series of one cost (another init, lr): drawn apart,
    spread = 0.04 if shared and max(costs) >= 10 * min(costs) else 0.02  # by less on an axis of under a decade
    for i, (label, pts) in enumerate(points.items()):
        if not pts:
            continue
        apart = 1.0 + spread * (i / max(len(points) - 1, 1) - 0.5) if shared else 1.0
        ax.errorbar([p[0] * apart for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=_marker(i),
                    capsize=3, color=f"C{i}", label=label, alpha=0.85)
        labels += [(x * apart, y, f"{s:g}", f"C{i}") for x, y, _, s in pts if s is not None]
    ax.set_xscale("log")
    _flops_ticks(ax, [p[0] for line in ax.lines for p in line.get_xydata()])
    ax.set_xlabel("training FLOPs (analytic)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy against training cost, mean ± std over seeds\n(points labelled with their sparsity"
                 + (", equal costs set apart" if shared else "") + ")", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _annotate(ax, labels)  # once the axes are laid out
    written.append(_save(fig, out_dir / ACCURACY_VS_FLOPS))
    plt.close(fig)
    return written


def _dodge(sparsities: list[float], labels: list[str]) -> dict[str, float]:
    """An x offset per method drawn at one x (the sparse ones; the dense ones where no sparsity was
    swept), so that their error bars stay apart: in all a third of the narrowest gap between swept
    sparsities (0.01 where at most one was swept)."""
    if len(labels) < 2:
        return {}
    gaps = [b - a for a, b in zip(sparsities, sparsities[1:])]
    spread = (min(gaps) / 3) if gaps else 0.01
    return {lab: spread * (i / (len(labels) - 1) - 0.5) for i, lab in enumerate(labels)}


def _flops_ticks(ax: Any, xs: list[float]) -> None:
    """Within less than a decade a log axis labels its minor ticks, and their ``3.2×10⁹`` texts run
    into each other: a few round values, written short (``3.5e9``), instead."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    xs = [x for x in xs if x > 0]
    if not xs or max(xs) >= 10 * min(xs):
        return
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.1, hi * 1.1)  # not the decades a log axis gives one value, with its ticks piled at one end
    ticks = [t for t in MaxNLocator(nbins=3, steps=[1, 2, 2.5, 5, 10]).tick_values(lo / 1.1, hi * 1.1) if lo / 1.1 <= t <= hi * 1.1 and t > 0]

    def short(value: float, _pos: Any) -> str:
        exp = len(str(int(value))) - 1 if value >= 1 else 0
        return f"{value / 10 ** exp:.3g}e{exp}"

    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(short))
    ax.xaxis.set_minor_formatter(NullFormatter())
