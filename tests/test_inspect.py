"""ssvi inspect: per-layer statistics, sizes, support history and criteria overlap."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssvi_cli import config as C
from ssvi_cli.cli import run
from ssvi_cli.training.trainer import Trainer
from ssvi_cli.modelfile import read_model_file
from ssvi_cli.core.overlap import criteria_overlap
from ssvi_cli.evaluation.inspection import _quantiles
from ssvi_cli.core.layers import SparseLinear, sparse_layers
from ssvi_cli.core.gaussian import rho_from_sigma


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    cfg = C.apply_overrides(C.load_preset("digits_mlp"),
                            {"train.epochs": 3, "sparse.delta_t": 10, "train.eval_samples": 2,
                             "data.max_test": 200})
    path = tmp_path_factory.mktemp("run") / "r"
    Trainer.create(cfg, path).fit()
    return path


def inspect_json(capsys, *argv: str) -> dict:
    code = run(["inspect", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_inspect_json_on_a_run(run_dir, capsys):
    report = inspect_json(capsys, str(run_dir))
    assert report["data"]["class_names"] == [str(i) for i in range(10)]  # a program need not run infer for them
    model = read_model_file(run_dir / "model.safetensors").model
    layers = dict(sparse_layers(model))
    assert [l["name"] for l in report["layers"]] == list(layers)
    assert abs(report["totals"]["density"] - 0.05) < 1e-3  # the sparsity asked for, overall
    for l in report["layers"]:
        layer = layers[l["name"]]
        assert l["active"] == layer.active and l["total"] == layer.numel
        assert abs(l["density"] - layer.active / layer.numel) < 1e-4  # ERK (the preset's): per layer
        snr = (layer.mu.abs() / layer.sigma()).detach().double()
        q = l["snr"]
        assert q["min"] <= q["q10"] <= q["median"] <= q["q90"] <= q["max"]
        assert np.allclose(list(q.values()), np.quantile(snr.numpy(), [0, 0.1, 0.5, 0.9, 1]), rtol=1e-5)
        assert math.isclose(l["snr_below_1"], float((snr < 1).double().mean()), abs_tol=1e-12)
        assert l["index"] == "gap8" and l["bytes"] > 0
    t = report["totals"]
    assert t["file_bytes"] == (run_dir / "model.safetensors").stat().st_size
    total = sum(l.numel for l in layers.values())
    biases = sum(l.bias.numel() for l in layers.values())
    assert t["dense_bnn_bytes"] == 8 * total + 4 * biases
    # Tensors to tensors: the header (names, the model card) is left out of both sides.
    assert t["tensor_bytes"] == t["file_bytes"] - t["header_bytes"]
    assert t["compression_ratio"] == pytest.approx(t["dense_bnn_bytes"] / t["tensor_bytes"])
    assert t["compression_ratio"] > 15
    history = report["support_history"]
    lines = [json.loads(l) for l in (run_dir / "support.jsonl").read_text().splitlines()]
    assert history["subspace_steps"] == len(lines) > 0
    assert [s["swapped"] for s in history["steps"]] == [
        sum(v["swapped"] for v in rec["layers"].values()) for rec in lines]
    assert all(0 < s["iou"] <= 1 for s in history["steps"])
    overlap = report["criteria_overlap"]
    names, iou = overlap["criteria"], np.array(overlap["iou"])
    assert np.allclose(np.diag(iou), 1) and np.allclose(iou, iou.T)
    # snr_abs is a monotone function of snr (METHOD.md section 4), so it is ranked by snr's scores (criteria.
    # ranking_score): this checks that routing; test_criteria's test_snr_abs_ranks_exactly_like_snr the property.
    assert iou[names.index("snr"), names.index("snr_abs")] == 1.0
    assert report["training"]["method"] == "ssvi" and report["format"]["version"] == 1


def test_inspect_a_file_and_a_checkpoint_only_run(run_dir, tmp_path, capsys):
    report = inspect_json(capsys, str(run_dir / "model.safetensors"))
    assert report["support_history"] is None and report["totals"]["measured_from"] == "file"
    ckpt_run = tmp_path / "ckpt_run"
    ckpt_run.mkdir()
    (ckpt_run / "checkpoints").mkdir()
    for p in (run_dir / "checkpoints").iterdir():
        (ckpt_run / "checkpoints" / p.name).write_bytes(p.read_bytes())
    from_ckpt = inspect_json(capsys, str(ckpt_run))
    assert from_ckpt["totals"]["measured_from"].startswith("checkpoint")
    assert from_ckpt["totals"]["active_weights"] == report["totals"]["active_weights"]
    assert from_ckpt["layers"][0]["snr"] == pytest.approx(report["layers"][0]["snr"])


def test_a_dense_file_says_how_many_of_its_weights_are_the_zeros_off_the_support(run_dir, tmp_path, capsys):
    """export --dense read as a density-1 model with no word of the 95% point masses it stores."""
    dense = tmp_path / "dense.safetensors"
    assert run(["export", str(run_dir), "-o", str(dense), "--dense"]) == 0
    capsys.readouterr()
    compact = inspect_json(capsys, str(run_dir / "model.safetensors"))
    report = inspect_json(capsys, str(dense))
    totals = compact["totals"]
    assert report["totals"]["density"] == 1.0 and compact["notes"] == []
    (note,) = report["notes"]
    assert f"{totals['total_weights'] - totals['active_weights']:,} of its {totals['total_weights']:,} weights" in note
    assert run(["inspect", str(dense)]) == 0
    assert "note: a dense file (ssvi export --dense)" in capsys.readouterr().out
    # the value statistics cover the support, as the compact file's do (they covered the zeros too:
    # a median SNR of 0 and 88% of SNR < 1 in the first layer)
    for mine, theirs in zip(report["layers"], compact["layers"]):
        assert mine["snr"] == pytest.approx(theirs["snr"], rel=1e-5) and mine["mu"] == pytest.approx(theirs["mu"], rel=1e-5)
        assert mine["snr_below_1"] == pytest.approx(theirs["snr_below_1"]) and mine["sigma"] == pytest.approx(theirs["sigma"], rel=1e-5)
    assert report["criteria_overlap"] is not None
    assert np.allclose(report["criteria_overlap"]["iou"], compact["criteria_overlap"]["iou"])
    rigl = tmp_path / "rigl"  # a deterministic model's zeros are mu = 0 alone, and it has no sigma to summarise
    assert run(["train", "--method", "rigl", "--epochs", "1", "--set", "data.max_train=64", "--out", str(rigl)]) == 0
    assert run(["export", str(rigl), "-o", str(tmp_path / "rd.safetensors"), "--dense"]) == 0
    capsys.readouterr()
    (note,) = inspect_json(capsys, str(tmp_path / "rd.safetensors"))["notes"]
    assert "are zeros (mu = 0)" in note and "sigma" not in note


def test_quantiles_match_numpy():
    v = torch.randn(1001).exp()
    got = _quantiles(v)
    want = np.quantile(v.double().numpy(), [0, 0.1, 0.5, 0.9, 1])
    assert np.allclose(list(got.values()), want)


def _one_layer_model(mu: torch.Tensor, sigma: torch.Tensor) -> torch.nn.Module:
    layer = SparseLinear(100, 1, bayesian=True)
    layer.set_support(torch.arange(mu.numel()) * 2, mu, rho_from_sigma(sigma, "softplus"))
    return torch.nn.Sequential(layer)


def test_criteria_overlap_sees_agreement_and_disagreement():
    mu = torch.linspace(0.1, 1.0, 50)
    agree = criteria_overlap(_one_layer_model(mu, torch.full_like(mu, 0.1)), fraction=0.3)
    names = agree["criteria"]
    assert agree["iou"][names.index("mean")][names.index("snr")] == 1.0
    # sigma = mu^2 makes SNR = 1/mu: the smallest |mu| have the largest SNR, the drop sets are disjoint.
    disagree = criteria_overlap(_one_layer_model(mu, mu**2), fraction=0.3)
    assert disagree["iou"][names.index("mean")][names.index("snr")] == 0.0


def test_a_drop_fraction_that_drops_nothing_says_so_rather_than_showing_full_agreement(run_dir, capsys):
    """At a fraction below 1 / (a layer's active entries) no criterion drops anything, and every IoU
    of two empty sets read 1.000: a table of perfect agreement about nothing."""
    assert criteria_overlap(_one_layer_model(torch.linspace(0.1, 1.0, 50), torch.full((50,), 0.1)),
                            fraction=0.3)["dropped"] == 15
    assert inspect_json(capsys, str(run_dir), "--drop-fraction", "1e-6")["criteria_overlap"]["dropped"] == 0
    assert run(["inspect", str(run_dir), "--drop-fraction", "1e-6"]) == 0
    said = capsys.readouterr().out
    assert "no layer drops an entry" in said and "1.000" not in said.split("criteria overlap")[-1]


def test_human_output_and_plots(run_dir, tmp_path, capsys):
    assert run(["inspect", str(run_dir), "--plots", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    for title in ("layers", "posterior", "totals", "support history", "criteria overlap"):
        assert title in captured.out
    # The run's own test accuracy says how it was scored: data.max_test kept 200 of the 360 images.
    row = next(line for line in captured.out.splitlines() if "test accuracy" in line)
    assert "mc, S=2 on 200 test images, part of the test split: data.max_test, at the end of training" in row
    assert "(tensor bytes to tensor bytes)" in captured.out
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_plots_replace_the_figures_an_earlier_inspection_left(run_dir, tmp_path, capsys):
    """Another model's snr_hidden_9.png stayed beside this model's figures, its title naming no model;
    a figure of the user's named snr_*.png is never removed."""
    from PIL import Image

    plots = tmp_path / "plots"
    assert run(["inspect", str(run_dir), "--plots", str(plots)]) == 0
    (plots / "snr_first.png").rename(plots / "snr_hidden_9.png")  # as another model's layer left it
    Image.new("L", (4, 4)).save(plots / "snr_paper_figure.png")
    (plots / "notes.txt").write_text("the user's")
    assert run(["inspect", str(run_dir), "--plots", str(plots)]) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert "snr_hidden_9.png" not in names and {"notes.txt", "snr_paper_figure.png", "snr_all.png"} <= set(names)
    assert len(names) == 6, names


def test_plots_without_matplotlib_is_a_clear_error(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run(["inspect", str(run_dir), "--plots", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_plots_folder_the_system_refuses_to_make_is_one_line(run_dir, capsys):
    assert run(["inspect", str(run_dir), "--plots", "/proc/ssvi-plots"]) == 2
    assert capsys.readouterr().err == "error: --plots /proc/ssvi-plots cannot be made: No such file or directory\n"


def test_tables_piped_into_a_file_keep_one_row_per_line(run_dir, tmp_path):
    # rich folds a table at 80 columns when stdout is not a terminal; a pipe gets a wider page so that
    # `ssvi inspect m | grep hidden` finds whole rows. COLUMNS, when a user sets it, still wins.
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    cmd = [sys.executable, "-m", "ssvi_cli", "inspect", str(run_dir / "model.safetensors")]
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    rows = [line for line in text.splitlines() if line.startswith("│ hidden.0 ")]
    assert len(rows) == 2  # the layer table's row and the posterior table's, each on one line
    assert "512x512" in rows[0] and "262,144" in rows[0] and "FLOPs/prediction" in text
    narrow = subprocess.run(cmd, env={**env, "COLUMNS": "60"}, capture_output=True, text=True, check=True).stdout
    card = narrow[:narrow.index("\nlayers")]  # a table whose words fit 60 columns is laid out in them
    assert max(len(line) for line in card.splitlines() if line.startswith(("│", "┌", "└"))) <= 60 and "│ model " in card
    # one whose words do not (the layer table's seven columns) keeps them whole, at its own width
    assert "…" not in narrow and [line for line in narrow.splitlines() if line.startswith("│ hidden.0 ")] == rows


def _model_file(path: Path, method: str = "ssvi", empty_layer: bool = False) -> Path:
    from ssvi_cli.data import get_spec
    from ssvi_cli.modelfile import ModelCard, write_model_file
    from ssvi_cli.training.plan import init_model, make_model

    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"sparse.method": method})
    spec = get_spec(cfg.data.name)
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    if empty_layer:  # a layer that keeps no weight: valid in a file (FORMAT.md), nothing to summarise
        _, layer = sparse_layers(model)[0]
        none = torch.zeros(0)
        layer.set_support(none.long(), none, none if layer.bayesian else None)
    write_model_file(model, path, ModelCard.from_config(cfg, spec))
    return path


def _no_nan(token: str):
    raise AssertionError(f"{token} is not JSON")


def test_a_layer_without_active_weights_reads_as_empty_statistics(tmp_path, capsys):
    path = _model_file(tmp_path / "m.safetensors", empty_layer=True)
    code = run(["inspect", str(path), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out, parse_constant=_no_nan)  # null, never NaN
    first = report["layers"][0]
    assert first["active"] == 0 and first["snr"]["median"] is None and first["mu"]["mean_abs"] is None
    assert run(["inspect", str(path)]) == 0
    assert "posterior" in capsys.readouterr().out


def test_a_deterministic_model_is_described_as_one(tmp_path, capsys):
    path = _model_file(tmp_path / "rigl.safetensors", method="rigl")
    report = inspect_json(capsys, str(path))
    assert "MC" not in report["flops"]["convention"] and "deterministic" in report["flops"]["convention"]
    assert report["flops"]["samples"] is None
    plots = tmp_path / "plots"
    assert run(["inspect", str(path), "--plots", str(plots)]) == 2
    assert "no Bayesian layer" in capsys.readouterr().err and not plots.exists()
    # an empty SNR table, and its dense size called a BNN's (it is the means alone): said as what they are
    assert report["totals"]["bayesian"] is False
    assert run(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "posterior: none (a deterministic model" in shown and "SNR = |mu| / sigma" not in shown
    assert "dense float32 bytes (means: deterministic)" in shown and "BNN bytes" not in shown
    assert run(["export", str(path), "-o", str(tmp_path / "again.safetensors")]) == 0
    assert "dense float32 bytes (means: deterministic)" in capsys.readouterr().out


def test_an_upper_case_checkpoint_suffix_is_a_checkpoint(run_dir, tmp_path, capsys):
    copy = tmp_path / "r"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "summary.json").write_bytes((run_dir / "summary.json").read_bytes())
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    target = copy / "checkpoints" / (newest.stem + ".PT")
    target.write_bytes(newest.read_bytes())
    assert inspect_json(capsys, str(target))["totals"]["measured_from"].startswith("checkpoint")


def test_the_flops_note_says_how_a_convolution_first_layer_is_counted(tmp_path, capsys):
    import json

    import torchvision

    import ssvi_cli as ssvi
    from ssvi_cli.cli import run

    net = torchvision.models.resnet18(num_classes=3)
    ssvi.sparsify(net, 0.95)
    ssvi.save(net.eval(), tmp_path / "r.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32))
    assert run(["inspect", str(tmp_path / "r.safetensors"), "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)["flops"]
    assert "one op over the active weights per draw in every layer" in flops["convention"]
    assert "LRT" not in flops["convention"]
