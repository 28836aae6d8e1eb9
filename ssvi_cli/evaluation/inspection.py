"""What a trained posterior looks like: per-layer statistics, file sizes, support history and the
overlap of removal criteria. Pure functions returning plain dicts; the CLI formats them.

SNR is ``|mu| / sigma`` per active weight. Sizes come from the file header (no tensor data read);
the value statistics need the layer tensors.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ssvi_cli import fileio
from ssvi_cli.core.allocation import kept_dense_note
from ssvi_cli.core.overlap import criteria_overlap
from ssvi_cli.modelfile import FileInfo, ModelCard, read_header, size_totals, write_model_file
from ssvi_cli.modelfile.reader import holds_custom_module, read_layers
from ssvi_cli.runs.load import drop_point_masses, load_model, point_masses
from ssvi_cli.runs.rundir import MODEL_FILE, SUPPORT_FILE
from ssvi_cli.core.flops import model_geometry, prediction_flops
from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.prediction import is_bayesian

QUANTILES = {"min": 0.0, "q10": 0.1, "median": 0.5, "q90": 0.9, "max": 1.0}


def _quantiles(values: Tensor) -> dict[str, Optional[float]]:
    v = values.double().flatten().sort().values
    if v.numel() == 0:  # a layer with no active weight: nothing to summarise
        return {k: None for k in QUANTILES}
    # Linear interpolation between order statistics (numpy's default), without torch.quantile's size cap.
    out = {}
    for key, q in QUANTILES.items():
        pos = q * (v.numel() - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, v.numel() - 1)
        out[key] = float(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


def snr(mu: Tensor, sigma: Tensor) -> Tensor:
    """|mu| / sigma in float64 (sigma = 0 with mu = 0, a dense file's empty entry, gives 0)."""
    mu, sigma = mu.double().abs(), sigma.double()
    return torch.where(mu == 0, torch.zeros_like(mu), mu / sigma)


def layer_stats(name: str, layer: SparseGaussian, keep: Optional[Tensor] = None) -> dict[str, Any]:
    """Shape, active/total, density, mu and sigma summaries, SNR quantiles and share of SNR < 1;
    ``keep``: the stored entries the value statistics cover (a dense file's support), default all."""
    mu = layer.mu.detach().double().cpu()
    keep = torch.ones_like(mu, dtype=torch.bool) if keep is None else keep.reshape(-1).cpu()
    mu = mu[keep]
    stats: dict[str, Any] = {
        "name": name,
        "kind": layer.KIND,
        "shape": list(layer.weight_shape),
        "active": layer.active,
        "total": layer.numel,
        "density": layer.density,
        "bayesian": layer.bayesian,
        "mu": {"mean": float(mu.mean()) if mu.numel() else None,
               "std": float(mu.std()) if mu.numel() > 1 else (0.0 if mu.numel() else None),
               "mean_abs": float(mu.abs().mean()) if mu.numel() else None,
               "min": float(mu.min()) if mu.numel() else None,
               "max": float(mu.max()) if mu.numel() else None},
        "sigma": None,
        "snr": None,
        "snr_below_1": None,
    }
    if layer.bayesian:
        sigma = layer.sigma().detach().double().cpu()[keep]
        s = _quantiles(sigma)
        stats["sigma"] = {"mean": float(sigma.mean()) if sigma.numel() else None,
                          "min": s["min"], "median": s["median"], "max": s["max"]}
        ratio = snr(mu, sigma)
        stats["snr"] = _quantiles(ratio)
        stats["snr_below_1"] = float((ratio < 1).double().mean()) if ratio.numel() else None
    return stats


def support_history(run_dir: Path) -> Optional[dict[str, Any]]:
    """Per subspace step: entries swapped (all layers) and IoU of the old and new supports.

    With ``|old| = |new| = n`` per layer and ``s`` new entries, ``|old & new| = n - s`` and
    ``|old | new| = n + s``; the overall IoU sums both over layers.
    """
    path = Path(run_dir) / SUPPORT_FILE
    if not path.is_file():
        return None
    steps = []
    for rec in fileio.read_jsonl(path):
        layers = rec.get("layers", {})
        active = sum(int(l["active"]) for l in layers.values())
        swapped = sum(int(l["swapped"]) for l in layers.values())
        union = active + swapped
        steps.append({"step": int(rec["step"]), "fraction": float(rec["fraction"]), "swapped": swapped,
                      "iou": (active - swapped) / union if union else 1.0,
                      "layer_iou": {n: float(l["iou"]) for n, l in layers.items()}})
    total = sum(s["swapped"] for s in steps)
    return {"steps": steps, "subspace_steps": len(steps), "total_swapped": total,
            "final_iou": steps[-1]["iou"] if steps else None}


def _file_totals(card: ModelCard, info: FileInfo, model: Optional[torch.nn.Module]) -> dict[str, Any]:
    """Sizes from the file header; a checkpoint-only run is written to a temporary file to measure."""
    if info.is_model_file:
        return {**size_totals(read_header(Path(info.path))), "measured_from": "file"}
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / MODEL_FILE
        write_model_file(model, target, card)
        totals = size_totals(read_header(target))
    return {**totals, "measured_from": "checkpoint: bytes the compact file would take"}


def posterior(path: Path) -> tuple[ModelCard, FileInfo, list[tuple[str, SparseGaussian]], Optional[torch.nn.Module]]:
    """The card, file info and named sparse layers of a model file or run directory, and the whole
    model (None for a user's own module's file, read layer by layer: only its code builds the rest)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() != ".pt":
        head = read_header(path)
        if holds_custom_module(head):
            card, info, layers = read_layers(path)
            return card, info, layers, None
    loaded = load_model(path)
    return loaded.card, loaded.file, sparse_layers(loaded.model), loaded.model


def inspect_model(path: Path, drop_fraction: float = 0.3, read: Optional[tuple[Any, ...]] = None) -> dict[str, Any]:
    """The full report for a model file or a run directory. A file saved from a user's own module
    gets everything but the FLOPs, which need its forward (a conv layer's cost depends on its input).
    ``read``: what :func:`posterior` returned for ``path``, when the caller has it already."""
    path = Path(path)
    card, info, named, model = read if read is not None else posterior(path)
    whole = model is not None
    layer_bytes: dict[str, int] = {}
    head = read_header(Path(info.path)) if info.is_model_file else None
    if head is not None:
        for tname, tensor in head["tensors"].items():
            owner = tname.rpartition(".")[0]
            layer_bytes[owner] = layer_bytes.get(owner, 0) + tensor["bytes"]
    cfg = card.training.run_config()
    samples = cfg.train.eval_samples if cfg else 10
    flops_by_layer: dict[str, Optional[int]] = {name: None for name, _ in named}
    bayesian = any(layer.bayesian for _, layer in named)
    moments = False  # whether the first layer's LRT moments are counted once
    if whole:
        geometry = model_geometry(model, card.data.input_shape)
        moments = any(g.first for g in geometry)
        flops = prediction_flops(geometry, {n: l.density for n, l in named}, is_bayesian(model), samples)
        flops_by_layer = {r["layer"]: r["flops"] for r in flops}
    # A dense file's point masses at zero are the weights off its model's support: the value statistics
    # cover the support, as they do for the compact file of the same model.
    empty = point_masses(Path(info.path), named) if info.layout == "dense" and info.is_model_file else {}
    layers = []
    for name, layer in named:
        stats = layer_stats(name, layer, ~empty[name] if name in empty else None)
        stats["flops_per_prediction"] = flops_by_layer[name]
        stats["index"] = next((r["index"] for r in info.layers if r.get("name") == name), None)
        stats["bytes"] = layer_bytes.get(name)
        layers.append(stats)
    drop_point_masses(named, empty)  # what the criteria would drop, from the support as in the compact file
    lam = cfg.sparse.criterion_lambda if cfg else 1.0
    report: dict[str, Any] = {
        "source": str(path),
        "file": info.path,
        "format": {"name": info.format, "version": info.version, "layout": info.layout, "dtype": info.dtype},
        "architecture": card.architecture.to_dict(),
        "data": card.data.to_dict(),
        "training": {**{k: v for k, v in card.training.to_dict().items() if k != "config"},
                     "init_from": ((card.training.config or {}).get("model") or {}).get("init_from")},
        "metrics": card.metrics,
        "max_test": cfg.data.max_test if cfg else None,  # the run's final evaluation scored this many at most
        "layers": layers,
        "totals": _file_totals(card, info, model),  # model None: a file, measured from its header
        "flops": {"per_prediction": sum(flops_by_layer.values()) if whole else None,
                  "samples": samples if bayesian else None,
                  "convention": _flops_convention(whole, bayesian, samples, moments)},
        "criteria_overlap": criteria_overlap(torch.nn.ModuleList(layer for _, layer in named), drop_fraction, lam),
        "support_history": support_history(path) if path.is_dir() else None,
        "notes": [],
    }
    if whole and (kept := kept_dense_note(model)):
        report["notes"].append(f"{kept}, counted by neither the density nor the FLOPs")
    elif head is not None and not whole and (kept := _unconverted(head, {name for name, _ in named})):
        report["notes"].append(kept)
    zeros = sum(int(e.sum()) for e in empty.values())
    if zeros:
        what = ("point masses at zero (mu = sigma = 0)", "the mu, sigma and SNR statistics and the criteria overlap") \
            if bayesian else ("zeros (mu = 0)", "the mu statistics")
        report["notes"].append(
            f"a dense file (ssvi export --dense): {zeros:,} of its {sum(l['total'] for l in layers):,} weights "
            f"are {what[0]}, off the support of the model it was written from; they count as active here, and "
            f"{what[1]} cover the others; ssvi export FILE -o compact.safetensors gives the sparse support back")
    return report


def _unconverted(head: dict[str, Any], layers: set[str]) -> str:
    """For a file read without its module's code: the weight tensors it holds as they are, outside its
    sparse layers (layers ``sparsify`` left unconverted), or "": floating tensors of two or more
    dimensions, as ``core.allocation.kept_dense_weights`` counts a module's parameters (a GRU's
    ``weight_ih_l0``, a module's own matrix ``W``); a buffer of that shape, which a file does not tell
    from a parameter, counts too."""
    kept = {name: math.prod(t["shape"]) for name, t in head["tensors"].items()
            if t["dtype"] in ("F64", "F32", "F16", "BF16") and len(t["shape"]) >= 2
            and name.rpartition(".")[0] not in layers}
    if not kept:
        return ""
    names = ", ".join(list(kept)[:3]) + (", ..." if len(kept) > 3 else "")
    return (f"{sum(kept.values()):,} weights in {len(kept)} weight tensor{'s' * (len(kept) != 1)} stored as they are "
            f"({names}: layers ssvi_cli.sparsify left unconverted), counted by neither the density nor the totals")


def _flops_convention(whole: bool, bayesian: bool, samples: int, moments: bool) -> str:
    if not whole:
        return ("not counted: the file holds a module of the user's own code, whose forward (and so "
                "each layer's input size) only that code knows")
    counted = "1 multiply-add = 2 FLOPs; biases, BatchNorm, activations and noise are not counted"
    if not bayesian:
        return f"per example, one forward pass over the active weights (a deterministic model: nothing is sampled); {counted}"
    if not moments:  # a convolution first (or no first layer of ssvi's own): every layer samples
        return f"per example, MC prediction with S={samples}: one op over the active weights per draw in every layer; {counted}"
    return (f"per example, MC prediction with S={samples}: the first layer's two LRT ops (mean, variance) "
            "once (the fewest; batches where it is faster on a CPU sample its weights per draw instead), "
            f"one op over the active weights per draw in every other layer; {counted}")


def write_snr_plots(layers: list[tuple[str, SparseGaussian]], out_dir: Path) -> list[Path]:
    """Histograms of log10 SNR: one PNG per Bayesian layer and one of all layers together; a
    ``snr_*.png`` an earlier inspection drew in ``out_dir`` (another model's layer) is removed.

    Needs matplotlib (the ``plots`` extra); raises ImportError without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a folder the system refuses only when it is made (/proc, say)
        raise fileio.UnwritablePath(exc.errno, f"--plots {out_dir} cannot be made: {exc.strerror or exc}") from None
    written: list[Path] = []
    everything = []
    for name, layer in layers:
        if not layer.bayesian or layer.active == 0:
            continue
        values = torch.log10(snr(layer.mu.detach().cpu(), layer.sigma().detach().cpu()).clamp_min(1e-6))
        everything.append(values)
        written.append(_histogram(plt, values, f"{name}: log10 SNR over {layer.active:,} weights",
                                  out_dir / f"snr_{name.replace('.', '_')}.png"))
    if everything:
        joined = torch.cat(everything)
        written.append(_histogram(plt, joined, f"all layers: log10 SNR over {len(joined):,} weights", out_dir / "snr_all.png"))
    for stale in sorted(set(out_dir.glob("snr_*.png")) - set(written)):
        if stale.is_file() and not stale.is_symlink() and _drawn_here(stale):
            stale.unlink()
    return written


SNR_SOFTWARE = "ssvi inspect --plots"  # the PNG text chunk that marks a figure this command drew


def _drawn_here(path: Path) -> bool:
    """Whether the PNG at ``path`` carries :data:`SNR_SOFTWARE`: only those are replaced, never a
    figure of the user's that happens to be named snr_*.png."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.info.get("Software") == SNR_SOFTWARE
    except (OSError, ValueError):
        return False


def _histogram(plt: Any, values: Tensor, title: str, target: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.hist(values.numpy(), bins=60, color="#4472c4")
    ax.axvline(0.0, color="#c00000", linewidth=1, label="SNR = 1")
    ax.set_xlabel("log10(|mu| / sigma)")
    ax.set_ylabel("weights")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fileio.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": SNR_SOFTWARE})
    plt.close(fig)
    return target
