"""``ssvi sweep``: the grid, cells run as ordinary runs, the report, --dry-run and one-line errors
(stops, kills, failures and resuming: test_sweep_stops.py)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sweep_cells import TINY

from ssvi_cli.cli import run
from ssvi_cli.sweep.grid import SweepError, SweepSpec, expand, parse_axis, read_spec, setting_text
from ssvi_cli.sweep.paired import check_selection
from ssvi_cli.sweep.runner import Outcome, cell_state



def test_the_grid_runs_a_dense_method_once_per_seed_and_names_every_cell():
    spec = SweepSpec(methods=("ssvi", "vi", "rigl"), sparsities=(0.9, 0.95), seeds=(0, 1),
                     axes={"sparse.criterion": ["snr", "mean"]}, fixed={"train.epochs": 2})
    cells = expand(spec)
    names = [c.name for c in cells]
    # ssvi: sparsities x criteria x seeds; rigl ranks removals by |w| whatever the criterion; vi: seeds only
    assert len(names) == len(set(names)) == 2 * 2 * 2 + 2 * 2 + 2
    assert "ssvi_s0.95_criterion-snr_seed1" in names and "vi_seed0" in names and "rigl_s0.9_seed1" in names
    vi = next(c for c in cells if c.method == "vi")
    assert vi.sparsity is None and "--sparsity" not in vi.train_args(spec, Path("x"))
    args = cells[0].train_args(spec, Path("out"))
    assert args[args.index("--set") + 1] == "train.epochs=2" and "sparse.criterion=snr" in args


def test_each_cell_takes_the_presets_values_for_its_method(tmp_path: Path, capsys, monkeypatch):
    preset = tmp_path / "mine.yaml"
    preset.write_text("model: {name: mlp, widths: [16]}\ndata: {max_train: 100}\n"
                      "train: {epochs: 1, eval_samples: 2}\nmethods:\n  vi: {optim: {lr: 0.0123}}\n")
    out = tmp_path / "sw"
    assert run(["sweep", "--preset", str(preset), "--method", "ssvi,vi", "--samples", "2",
                "--out", str(out), "--dry-run"]) == 0
    cells = {Path(line.split()[-1]).name: Path(line.split()[-1]) for line in capsys.readouterr().out.splitlines()}
    assert sorted(cells) == ["ssvi_s0.9_seed0", "vi_seed0"]
    monkeypatch.chdir(tmp_path)  # a scheduler's job gives the cell's folder as it likes: relative here
    for name, lr in (("vi_seed0", 0.0123), ("ssvi_s0.9_seed0", 0.01)):
        given = str(cells[name].relative_to(tmp_path))
        assert run(["sweep", "--run-cell", given] + (["--json"] if name == "vi_seed0" else [])) == 0
        assert f"  lr: {lr}\n" in (cells[name] / "config.yaml").read_text()
        said = capsys.readouterr()
        if name == "vi_seed0":  # one JSON document (train's and evaluate's own output on stderr), as --help says
            cell = json.loads(said.out)
            assert cell["cell"] == name and cell["summary"]["method"] == "vi" and cell["folder"] == str(cells[name])
            assert cell["evaluation"] == json.loads((cells[name] / "evaluation.json").read_text())
            assert "accuracy" in said.err
        else:  # a person's (or a scheduler's log's) output: tables, not JSON
            assert "accuracy" in said.out and not said.out.lstrip().startswith("{")
    kept = (cells["vi_seed0"] / "evaluation.json").read_bytes()  # the sweep's evaluation of a cell is its own
    assert run(["evaluate", str(cells["vi_seed0"]), "--samples", "1", "--output",
                str(cells["vi_seed0"] / "evaluation.json")]) == 2
    assert "is the evaluation of cell vi_seed0 of the sweep in" in capsys.readouterr().err
    assert (cells["vi_seed0"] / "evaluation.json").read_bytes() == kept
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert json.loads((out / "report.json").read_text())["method_values"] == {"optim.lr": {"ssvi": 0.01, "vi": 0.0123}}
    assert not json.loads((out / "report.json").read_text())["missing"]
    assert "`optim.lr` differs by method (the preset's `methods:` section): ssvi 0.01, vi 0.0123." in \
        (out / "report.md").read_text()
    capsys.readouterr()
    # the preset's entries are checked before any cell is made, and an error names the preset
    preset.write_text("methods:\n  vi: {optim: {lr: -1}}\n")
    with pytest.raises(SweepError, match=rf"^preset {preset}: methods.vi: optim.lr"):
        expand(SweepSpec(preset=str(preset), methods=("ssvi",)))


def test_a_cell_that_ran_under_other_settings_is_named_not_skipped_or_resumed(tmp_path: Path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text("model: {name: mlp, widths: [16]}\ndata: {max_train: 100}\n"
                      "sparse: {allocation: erk, sparsity: 0.8}\ntrain: {epochs: 1, eval_samples: 2}\n")
    out = tmp_path / "sw"
    grid_args = ["sweep", "--preset", str(preset), "--method", "ssvi,vi", "--sparsity", "0.9", "--samples", "2",
                 "--out", str(out)]
    assert run([*grid_args, "--dry-run"]) == 0
    cells = {Path(line.split()[-1]).name: Path(line.split()[-1]) for line in capsys.readouterr().out.splitlines()}
    for path in cells.values():
        assert run(["sweep", "--run-cell", str(path)]) == 0, capsys.readouterr().err
    sparse, dense = cells["ssvi_s0.9_seed0"], cells["vi_seed0"]
    evaluated = {name: (path / "evaluation.json").stat().st_mtime_ns for name, path in cells.items()}
    capsys.readouterr()
    assert run([*grid_args, "--dry-run"]) == 0  # the list says which commands have nothing left to do
    assert "2 cells written to " in (err := capsys.readouterr().err) and "(2 of them trained and evaluated already" in err
    # The preset edited after the cells ran. The sparse cell's allocation no longer matches; dense VI
    # ignores the allocation and the preset's sparsity, and how many checkpoints a run keeps changes
    # nothing it learns: its cell still matches. Neither compares a key that changes nothing for an MLP
    # on the digits (the review: an edited mu_init_std stopped the sweep): marked 'not used' by presets.
    preset.write_text("model: {name: mlp, widths: [16]}\ndata: {max_train: 100, augment: false}\n"
                      "bayes: {mu_init_std: 0.05}\nsparse: {allocation: uniform, sparsity: 0.95}\n"
                      "train: {epochs: 1, eval_samples: 2, keep_checkpoints: 3}\n")
    # --run-cell of the cell that still matches too: its group would mix the two settings
    for args in (["sweep", "--resume", str(out)], [*grid_args, "--dry-run"], ["sweep", "--run-cell", str(sparse)],
                 ["sweep", "--run-cell", str(dense)]):
        assert run(args) == 2
        err = capsys.readouterr().err
        lines = err.rstrip().splitlines()
        assert lines[0] == f"  {sparse}: sparse.allocation erk, the sweep's uniform" and "vi_seed0" not in err
        assert lines[1].startswith("error: 1 cell (listed above) ran under other settings than the sweep gives it now")
        assert "delete its folder to run it again" in lines[1] and len(lines) == 2
        assert lines[1].endswith(f"; or go on as they ran: ssvi sweep --preset {preset} --method ssvi,vi --sparsity "
                                 f"0.9 --set sparse.allocation=erk --samples 2 --out {out}")
    assert {n: (p / "evaluation.json").stat().st_mtime_ns for n, p in cells.items()} == evaluated
    # a partial cell (a checkpoint, no final model) is not resumed under its old settings either
    for name in ("model.safetensors", "summary.json", "evaluation.json"):
        (sparse / name).unlink()
    assert cell_state(sparse) == "partial"
    assert run(["sweep", "--resume", str(out)]) == 2
    assert f"  {sparse}: sparse.allocation erk" in capsys.readouterr().err
    # the report is written as it is, and says so in both files and on stderr
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert "warning: 1 cell ran under other settings than the sweep gives it now; the report counts it under the " \
           "sweep's settings once evaluated" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["changed_cells"] == {"ssvi_s0.9_seed0": "sparse.allocation erk, the sweep's uniform"}
    # this one (partial, its --run-cell refused: not a failure of the cell) is not evaluated, so not in the
    # table: said, not "counted"
    assert report["cells_done"] == 1 and report["failed"] == {}
    assert "counted above under the sweep's once evaluated: ssvi_s0.9_seed0 (sparse.allocation erk, the sweep's " \
           "uniform; not evaluated)" in (out / "report.md").read_text()
    # a finished cell whose config cannot be read is named, and the rest is reported
    config = (dense / "config.yaml").read_text()
    (dense / "config.yaml").write_text("model: [\n")
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert json.loads((out / "report.json").read_text())["changed_cells"]["vi_seed0"].startswith(
        "its config.yaml cannot be read (expected the node content")
    capsys.readouterr()
    # a cell that wrote its config and no checkpoint starts again anyway: not compared
    for entry in dense.iterdir():
        if entry.name != "config.yaml":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (dense / "config.yaml").write_text(config.replace("beta: 0.01", "beta: 0.5"))
    assert cell_state(dense) == "new"
    # the changed cell's folder removed, it runs again under the sweep's settings
    shutil.rmtree(sparse)
    assert run(["sweep", "--run-cell", str(sparse)]) == 0, capsys.readouterr().err
    assert "  allocation: uniform\n" in (sparse / "config.yaml").read_text()
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "changed_cells" not in json.loads((out / "report.json").read_text())


def test_published_weights_are_compared_by_the_version_a_run_records():
    from ssvi_cli import config as C
    from ssvi_cli.sweep.drift import _resolved

    cfg = C.apply_overrides(C.Config(), {"model.name": "torchvision:resnet18", "model.init_from": "torchvision:DEFAULT"})
    assert _resolved(cfg) == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert _resolved(C.apply_overrides(cfg, {"model.init_from": "weights.pt"})) == "weights.pt"


def test_bad_grids_are_one_line_errors():
    with pytest.raises(SweepError, match="unknown config key 'sparse.nope'"):
        parse_axis("sparse.nope=1,2")
    with pytest.raises(SweepError, match="grid axis of its own"):
        expand(SweepSpec(axes={"train.seed": [1, 2]}))
    with pytest.raises(SweepError, match="cell ssvi_s0.95_alpha-7_seed0: .*alpha"):
        expand(SweepSpec(axes={"sparse.alpha": [7]}))
    assert parse_axis("model.widths=[64,64],[32]") == ("model.widths", [[64, 64], [32]])
    # a list-valued key reads as 'ssvi train --set' reads it: one list, not an axis
    assert parse_axis("data.classes=0,1,2,3,4") == ("data.classes", [[0, 1, 2, 3, 4]])
    assert parse_axis("sparse.alpha=0.1,0.3") == ("sparse.alpha", [0.1, 0.3])
    # a path as train --set reads it, as typed (YAML ended `h #1` at its comment), each item of a list
    assert parse_axis("data.name=imagefolder:/d/h #1,digits") == ("data.name", ["imagefolder:/d/h #1", "digits"])
    assert parse_axis("model.init_from=null") == ("model.init_from", [None])
    assert parse_axis("data.data_dir='/d/a,b'") == ("data.data_dir", ["/d/a,b"])  # quoted: YAML's, a comma kept


def test_a_seed_count_beyond_any_sweep_is_one_line_before_any_cell_is_made(tmp_path: Path, capsys):
    """--seeds 1e20 (or seeds: 1e20 in a file) was "error (OverflowError): Python int too large to convert
    to C ssize_t", exit 1, and --seeds 1000000 spent minutes making a million cells' folders."""
    (tmp_path / "s.yaml").write_text("seeds: 99999999999999999999\n")
    for args, where in ((["--seeds", "10001"], "--seeds 10001"),
                        (["--file", str(tmp_path / "s.yaml")], f"--file {tmp_path / 's.yaml'}: seeds 99999999999999999999")):
        capsys.readouterr()
        assert run(["sweep", *args, "--out", str(tmp_path / "sw"), "--dry-run"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {where}: at most 10,000 seeds in one sweep (each trains every cell once)"]
        assert not (tmp_path / "sw").exists()


def test_sweep_values_are_read_as_train_reads_them():
    """The numbers typed are the numbers run: ``ssvi train --set train.epochs=010`` trains ten epochs,
    and so does the sweep's cell (YAML 1.1 alone reads 010 as octal 8 and 1e-3 as a string)."""
    assert parse_axis("train.epochs=010,012") == ("train.epochs", [10, 12])
    assert parse_axis("optim.lr=1e-3,3E-3") == ("optim.lr", [0.001, 0.003])
    assert parse_axis("model.widths=[010,8]") == ("model.widths", [[10, 8]])
    for text in ("train.epochs=0x10", "train.epochs=1:30"):
        key, values = parse_axis(text)
        with pytest.raises(SweepError, match="expects"):
            expand(SweepSpec(axes={key: values}))
    from ssvi_cli.config import parse_override
    assert [parse_override(f"train.epochs={v}")[1] for v in ("010", "0x10")] == [10, "0x10"]


def test_a_relative_path_that_is_not_there_names_the_folder_it_was_read_from(tmp_path: Path, capsys, monkeypatch):
    """A sweep file's relative paths are read from the folder ssvi runs in, as the flags' are; run from
    elsewhere, 'unknown OOD set' and 'does not exist' did not say where they were looked for."""
    (tmp_path / "imgs").mkdir()
    import numpy as np

    np.save(tmp_path / "imgs" / "x.npy", np.zeros((2, 8, 8), dtype=np.uint8))
    (tmp_path / "s.yaml").write_text("ood: [imgs]\npreset: mine.yaml\n")
    (tmp_path / "mine.yaml").write_text("train: {epochs: 1}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run(["sweep", "--file", "../s.yaml", "--out", "sw", "--dry-run"]) == 2
    said = capsys.readouterr().err
    assert f"nor is imgs a file or folder in {tmp_path / 'elsewhere'} (relative paths are read from the folder" in said
    assert run(["sweep", "--file", "../s.yaml", "--ood", "../imgs", "--out", "sw", "--dry-run"]) == 2
    assert f"preset file mine.yaml does not exist in {tmp_path / 'elsewhere'}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert run(["sweep", "--file", "s.yaml", "--out", "sw", "--dry-run"]) == 0
    # LABEL=PATH keeps its label, its path made absolute as a bare path's is
    assert run(["sweep", "--file", "s.yaml", "--ood", "mine=imgs", "--out", "sw2", "--dry-run"]) == 0
    assert json.loads((tmp_path / "sw2" / "sweep.json").read_text())["spec"]["ood"] == [f"mine={tmp_path / 'imgs'}"]
    # its cells' evaluations are still found once the folder has moved (the report names the set by its label)
    from ssvi_cli.data.ood import label_of

    assert label_of(f"mine={tmp_path / 'gone'}") == "mine"
    # two sets under one label are refused before any cell trains (each cell's evaluation would refuse them)
    capsys.readouterr()
    assert run(["sweep", "--file", "s.yaml", "--ood", "mine=imgs", "--ood", "mine=imgs/x.npy", "--out", "sw3",
                "--dry-run"]) == 2
    assert f"--ood mine is given twice, as mine={tmp_path / 'imgs'} and as mine={tmp_path / 'imgs' / 'x.npy'}" in \
        " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "sw3").exists()


def test_a_sweep_files_numbers_are_read_as_its_flags_are(tmp_path: Path, capsys):
    """``set: {train.epochs: 010}`` in --file ran 8 epochs (YAML 1.1's octal) where --set ran ten."""
    (tmp_path / "s.yaml").write_text("set: {train.epochs: 010}\nsparsity: [0.9]\nmethod: ssvi\n")
    assert run(["sweep", "--file", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sw"), "--dry-run"]) == 0
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["spec"]["fixed"] == {"train.epochs": 10}


def test_a_baseline_must_name_exactly_one_group_before_anything_runs(tmp_path: Path, capsys):
    spec = SweepSpec(methods=("ssvi", "vi"), sparsities=(0.9, 0.95), seeds=(0, 1), axes={"sparse.alpha": [0.3, 0.5]})
    cells = expand(spec)
    # vi does not move its support: it ran once, and matches any swept alpha
    assert check_selection(spec, cells, ["method=vi"]) == {"method": "vi", "sparsity": None, "settings": {}}
    check_selection(spec, cells, ["method=vi", "sparse.alpha=0.3"])
    check_selection(spec, cells, ["sparsity=0.95", "sparse.alpha=0.5"])
    check_selection(spec, cells, ["sparsity=dense", "sparse.alpha=0.5"])
    # a swept key by its last part, as --criterion names sparse.criterion
    assert check_selection(spec, cells, ["sparsity=0.9", "alpha=0.5"])["settings"] == {"sparse.alpha": 0.5}
    with pytest.raises(SweepError, match=r"names 2 groups, not one \(matches: ssvi, sparsity 0.9, sparse.alpha=0.3; "
                                         r"ssvi, sparsity 0.9, sparse.alpha=0.5\)"):
        check_selection(spec, cells, ["sparsity=0.9"])
    with pytest.raises(SweepError, match="names 0 groups"):
        check_selection(spec, cells, ["sparse.alpha=0.4"])
    with pytest.raises(SweepError, match="'sparse.beta' is not method, sparsity or a swept key \\(swept: sparse.alpha\\)"):
        check_selection(spec, cells, ["sparse.beta=1"])
    with pytest.raises(SweepError, match="expects KEY=VALUE"):
        check_selection(spec, cells, ["vi"])
    # on the command line: refused before anything is written or run
    out = tmp_path / "sw"
    assert run(["sweep", "--method", "ssvi,vi", "--sparsity", "0.9", "--seeds", "1", "--out", str(out),
                "--baseline", "method=rigl"]) == 2
    assert "--baseline method=rigl names 0 groups" in capsys.readouterr().err
    assert not out.exists()
    capsys.readouterr()
    assert run(["sweep", "--method", "ssvi,vi", "--out", str(tmp_path / "d"), "--dry-run", "--baseline", "method=vi"]) == 2
    assert capsys.readouterr().err.strip() == "error: --baseline goes with a sweep that runs, --resume or --report"


def test_cli_errors(tmp_path: Path, capsys):
    assert run(["sweep", "--method", "ssvi,nope", "--out", str(tmp_path / "a"), "--dry-run"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert run(["sweep", "--report", str(tmp_path), "--seeds", "2"]) == 2
    assert "--report takes no grid options" in capsys.readouterr().err
    assert run(["sweep", "--resume", str(tmp_path / "s w"), "--seeds", "3"]) == 2
    assert f"--resume takes no grid options (to grow the sweep: the whole grid with --out '{tmp_path / 's w'}')" \
        in capsys.readouterr().err
    assert run(["sweep", "--report", str(tmp_path)]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err
    for mode in ("--report", "--resume"):  # a mistyped folder is not said to be a folder
        assert run(["sweep", mode, str(tmp_path / "nonexist")]) == 2
        assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nonexist'}: no such folder"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("mine")
    assert run(["sweep", "--out", str(tmp_path / "b"), "--dry-run"]) == 2
    assert "holds x.txt and is not a sweep folder" in capsys.readouterr().err
    assert (tmp_path / "b" / "x.txt").read_text() == "mine"


def test_a_key_given_twice_runs_no_grid_and_exponents_are_numbers(tmp_path: Path, capsys):
    out = str(tmp_path / "a")
    assert run(["sweep", "--criterion", "snr,mean", "--set", "sparse.criterion=e_abs", "--out", out, "--dry-run"]) == 2
    assert "sparse.criterion is given twice (--criterion and --set)" in capsys.readouterr().err
    assert run(["sweep", "--set", "optim.lr=0.1", "--set", "optim.lr=0.2", "--out", out, "--dry-run"]) == 2
    assert "optim.lr is given twice (two --set)" in capsys.readouterr().err
    assert run(["sweep", "--sparsity", "0.9,,0.95", "--out", out, "--dry-run"]) == 2  # a stray comma is no value
    assert "--sparsity '0.9,,0.95' has an empty item; remove the extra comma" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # YAML 1.1 reads 1e-2 as a string; a sweep reads it as the number, so 1e-2 and 0.01 are one value, given twice
    assert run(["sweep", "--set", "optim.lr=1e-2,3e-3,0.01", "--out", out, "--dry-run"]) == 2
    assert "optim.lr 0.01 is given twice; give each value once" in capsys.readouterr().err
    assert run(["sweep", "--set", "optim.lr=1e-2,3e-3", "--out", out, "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [Path(c.split()[-1]).name for c in doc["commands"]] == ["ssvi_s0.95_lr-0.01_seed0", "ssvi_s0.95_lr-0.003_seed0"]
    assert doc["commands_file"] == str((tmp_path / "a").resolve() / "commands.txt")
    assert doc["report"] == f"ssvi sweep --report {(tmp_path / 'a').resolve()}" and doc["done"] == []
    spec = json.loads((tmp_path / "a" / "sweep.json").read_text())["spec"]
    assert spec["axes"]["optim.lr"] == [0.01, 0.003]
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("set: {optim.lr: [1e-3, 2e-3], bayes.beta: 1e-2}\n")
    assert run(["sweep", "--file", str(yaml_file), "--out", str(tmp_path / "y"), "--dry-run"]) == 0
    spec = json.loads((tmp_path / "y" / "sweep.json").read_text())["spec"]
    assert spec["axes"] == {"optim.lr": [0.001, 0.002]} and spec["fixed"] == {"bayes.beta": 0.01}
    # a sweep written before exponents were numbers (its sweep.json holds "1e-3") is the same grid
    old = json.loads((tmp_path / "y" / "sweep.json").read_text())
    old["spec"]["axes"]["optim.lr"] = ["1e-3", "2e-3"]
    (tmp_path / "y" / "sweep.json").write_text(json.dumps(old))
    assert run(["sweep", "--file", str(yaml_file), "--out", str(tmp_path / "y"), "--dry-run"]) == 0
    assert "lr-1e-3_seed0" in capsys.readouterr().out  # its cells keep the names it gave them
    # a flag wins over the file's value of the same key, also --criterion over a fixed criterion
    yaml_file.write_text("set: {sparse.criterion: snr}\n")
    assert run(["sweep", "--file", str(yaml_file), "--criterion", "mean,e_abs", "--out", str(tmp_path / "c"),
                "--dry-run"]) == 0
    spec = json.loads((tmp_path / "c" / "sweep.json").read_text())["spec"]
    assert spec["axes"] == {"sparse.criterion": ["mean", "e_abs"]} and spec["fixed"] == {}
    # `accumulate:` is the text typed, as in ssvi train, not a YAML mapping
    assert run(["sweep", "--set", "sparse.addition=accumulate:", "--out", str(tmp_path / "d"), "--dry-run"]) == 2
    assert "sparse.addition='accumulate:'; valid values are" in capsys.readouterr().err
    # --run-cell takes one cell's folder; the sweep or its cells folder is named as such
    for wrong in (tmp_path / "a", tmp_path / "a" / "cells"):
        assert run(["sweep", "--run-cell", str(wrong)]) == 2
        assert f"--run-cell takes one cell's folder, {tmp_path / 'a' / 'cells' / 'NAME'}" in capsys.readouterr().err
    assert run(["sweep", "--run-cell", str(tmp_path)]) == 2
    assert f"--run-cell {tmp_path}: not a cell of a sweep" in capsys.readouterr().err


def test_a_grid_that_adds_seeds_continues_the_sweep_and_keeps_its_cells(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    grid = ["sweep", *TINY, "--set", "train.epochs=1", "--out", str(out), "--no-figures", "--json"]
    assert run([*grid, "--seeds", "1"]) == 0
    first = out / "cells" / "ssvi_s0.95_seed0" / "evaluation.json"
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert run([*grid, "--seeds", "2", "--method", "ssvi,vi"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cells_done"] == report["cells_total"] == 4 and first.stat().st_mtime_ns == stamp
    header = (out / "report.md").read_text().splitlines()[2]
    assert "Every cell sets `model.widths=[32]`" in header and "`train.epochs=1`." in header
    capsys.readouterr()
    assert run(["sweep", "--run-cell", str(first.parent)]) == 0
    assert "is already trained and evaluated; nothing to do" in capsys.readouterr().err
    # Fewer seeds is a part of the sweep, other settings another sweep: both refused, each saying which
    assert run([*grid, "--seeds", "1"]) == 2
    assert f"{out} holds a larger sweep of 4 cells, of which this grid's one cell is a part: run it all, as it was made, with" in \
        capsys.readouterr().err
    assert run([*grid, "--seeds", "2", "--method", "ssvi,vi", "--set", "optim.lr=0.02"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "holds a different sweep (a grid that only adds seeds" in said and "leaves out" not in said  # same cells
    assert "this one changes what it trains, adding --set optim.lr=0.02):" in said  # what, named as given
    # a --set of the sweep's forgotten is named too (the review: told only "a different sweep", it went in a circle)
    assert run(["sweep", *TINY, "--out", str(out), "--seeds", "2", "--method", "ssvi,vi", "--dry-run"]) == 2
    assert "what it trains, leaving out the sweep's --set train.epochs=1):" in " ".join(capsys.readouterr().err.split())
    # a grid of other cells only (as a sweep file's seeds: [3] beside seeds 0-1) is told to list the old ones too
    assert run([*grid, "--seeds", "1", "--method", "rigl"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "this grid leaves out all 4 of its 4 cells, ssvi_s0.95_seed0 and others: a grid that adds to it lists them " \
           "too" in said
    # with another fixed value too, listing them would not do: not advised
    assert run([*grid, "--seeds", "1", "--method", "rigl", "--set", "optim.lr=0.02"]) == 2
    assert "leaves out" not in capsys.readouterr().err
    assert first.stat().st_mtime_ns == stamp

    # Another evaluation of the same grid (an OOD set more): every cell evaluated again, none retrained
    model = first.parent / "model.safetensors"
    trained = model.stat().st_mtime_ns
    assert run([*grid, "--seeds", "2", "--method", "ssvi,vi", "--ood", "noise", "--dry-run"]) == 0
    assert "is evaluated otherwise now (--ood or --samples): each finished cell evaluated otherwise is evaluated again" in \
        capsys.readouterr().err
    assert run(["sweep", "--report", str(out), "--json", "--no-figures"]) == 0
    assert json.loads(capsys.readouterr().out)["cells_done"] == 0  # stale evaluations are not reported
    assert run(["sweep", "--resume", str(out), "--no-figures", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cells_done"] == 4 and all("auroc:noise:entropy" in c for c in report["cells"])
    assert model.stat().st_mtime_ns == trained and first.stat().st_mtime_ns != stamp
    # The CPU threads each cell trained on (its numbers move in their last digits with them) are said
    (n,) = report["threads"]
    assert f"Each cell trained on {n} CPU thread" in (out / "report.md").read_text()
    metrics = first.parent / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "threads": n + 1}) + "\n" for r in records))  # resumed on others
    assert run(["sweep", "--report", str(out), "--json", "--no-figures"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == [n, n + 1]
    assert f"The cells trained on {n} or {n + 1} CPU threads" in (out / "report.md").read_text()


def test_a_sweep_grows_whatever_the_order_of_its_axes_and_with_values_that_train_alike(tmp_path: Path, capsys):
    """Seeds added to a sweep were refused as "a different sweep" (pointing at --force, which deletes
    its cells) when its --set axes came in another order, or with a value that trains its cells alike:
    a device, a worker count, the run's own test cap (docs/CONFIG.md), or the preset's own learning rate."""
    out = tmp_path / "sw"
    base = ["sweep", "--method", "ssvi", "--sparsity", "0.95", "--out", str(out), "--dry-run"]
    assert run([*base, "--seeds", "1", "--set", "sparse.alpha=0.3,0.5", "--set", "sparse.t_end=0.75,0.9"]) == 0
    names = (out / "commands.txt").read_text()
    assert "ssvi_s0.95_alpha-0.3_t_end-0.75_seed0" in names
    capsys.readouterr()
    for extra in ([], ["--set", "train.device=cpu", "--set", "train.num_workers=0", "--set", "data.max_test=50"],
                  ["--set", "optim.lr=0.01"]):
        assert run([*base, "--seeds", "2", "--set", "sparse.t_end=0.75,0.9", "--set", "sparse.alpha=0.3,0.5",
                    *extra]) == 0, (extra, capsys.readouterr().err)
        said = capsys.readouterr()
        assert "ssvi_s0.95_alpha-0.3_t_end-0.75_seed1" in (out / "commands.txt").read_text()  # named as before
        assert ("goes on with the fixed values given now" in said.err) == bool(extra), said.err
    assert json.loads((out / "sweep.json").read_text())["spec"]["fixed"] == {"optim.lr": 0.01}


def test_one_ood_array_under_two_spellings_is_one_set_given_twice(tmp_path: Path, capsys, monkeypatch):
    np.save(tmp_path / "o.npy", np.zeros((2, 8, 8), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert run(["sweep", "--ood", "o.npy", "--ood", "./o.npy", "--out", "sw", "--dry-run"]) == 2
    assert f"OOD set {tmp_path / 'o.npy'} is given twice" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("args, file, message", [
    (["--ood", "bogus"], None, "unknown OOD set 'bogus'"),
    (["--ood", "heldout"], None, "--ood heldout needs classes held out of training"),
    (["--ood", "heldout", "--set", "data.classes=0,1,2,3,4,5,6,7,8,9"], None,
     "--ood heldout: cell ssvi_s0.95_seed0 trains on data.classes listing every class of digits, so none is held out"),
    (["--ood", "heldout", "--set", "data.classes=[0,1],[0,1,2,3,4,5,6,7,8,9]"], None, "listing every class of digits"),
    (["--ood", ""], None, "the argument after --ood is empty (a shell variable that is not set?)"),
    (["--set", "sparse.criterion=foo"], None, "cell ssvi_s0.95_seed0: unknown criterion 'foo'"),
    (["--criterion", "mean,foo"], None, "unknown criterion 'foo'"),
    (["--set", "optim.fo=1"], None, "unknown config key 'optim.fo' in --set 'optim.fo=1'; did you mean optim.lr"),
    (["--set", "train.epochs=2,"], None, "--set 'train.epochs=2,' has an empty item"),  # ran as a fixed 2
    (["--set", "model.widths=[8],"], None, "--set 'model.widths=[8],' has an empty item"),
    (["--set", "model.widths=[8,],[4]"], None, "--set 'model.widths=[8,],[4]' has an empty item"),  # inside brackets
    (["--set", "train.epochs=,2"], None, "--set 'train.epochs=,2' has an empty item"),
    (["--set", "model.widths="], None, "--set 'model.widths=' holds no values"),  # named neither flag nor key
    (["--set", "data.test_fraction=0.2"], None, "data.test_fraction=0.2 applies to image folders"),
    ([], "set: {data.image_size: 32}\n", "data.image_size=32 applies to image folders"),
    ([], "samples: 0\n", "samples=0: evaluation needs a positive number"),
    ([], "set: {optim.foo: [1, 2]}\n", "unknown config key 'optim.foo' in --file"),
    ([], "axes: {sparse.alpha: [0.1]}\n", "unknown sweep key 'axes'; valid keys are: preset, method, methods"),
    ([], "ood: 5\n", "ood 5: give a set's name or path, or a list of them"),
    ([], "set:\n  optim.lr: 0.1\n  optim.lr: 0.2\n", "not a readable YAML sweep at line 3, column 3: the key 'optim.lr' is given twice"),
    ([], b"seeds: 2 # \xe9t\xe9\n", "not UTF-8 text; save it as UTF-8"),
    # an empty sweep file ran the default grid (a 60-epoch run) as if it were the sweep meant
    ([], "", "is empty; give at least one of its keys (preset, methods, sparsities, seeds, set, ood, samples)"),
    ([], "# my sweep\n", "is empty; give at least one of its keys"),
    ([], "{}\n", "is empty; give at least one of its keys"),
    # a value given twice made one cell under a grid that said two
    (["--method", "ssvi,ssvi"], None, "method ssvi is given twice; give each value once"),
    (["--sparsity", "0.9,0.90"], None, "sparsity 0.9 is given twice"),
    (["--set", "optim.lr=0.01,0.010"], None, "optim.lr 0.01 is given twice"),
    (["--set", "model.widths=[8],[8]"], None, "model.widths [8] is given twice"),
    (["--ood", "noise", "--ood", "noise"], None, "OOD set noise is given twice"),
    (["--criterion", "snr_abs,snr_abs"], None, "error: criterion snr_abs is given twice"),  # named as the flag
    (["--set", "sparse.delta_t=100,100.0"], None, "sparse.delta_t 100 is given twice"),  # as first given
    ([], "seeds: [0, 0]\n", "seed 0 is given twice"),
    ([], "sparsity: [0.9, 0.9]\n", "sparsity 0.9 is given twice"),
    # values compared as a run reads them: the same run under two names, and YAML's yes/no as numbers
    ([], 'sparsity: [0.9, "0.9"]\n', "sparsity 0.9 is given twice"),
    ([], 'set: {data.augment: [on, "on"]}\n', "data.augment true is given twice (also as 'on')"),
    ([], "set: {bayes.beta: [1, true]}\n", "bayes.beta expects a number, got True"),  # not 1 given twice
    ([], "sparsity: no\n", "sparsity false: give numbers, e.g. [0.9, 0.95] (YAML reads yes, no, on and off"),
    ([], "sparsities: [0.9, yes]\n", "sparsities [0.9,true]: give numbers"),
    ([], "method: yes\n", "method true: give method names"),
    ([], "sparsity: [abc]\n", "sparsity ['abc']: give numbers"),
    # an empty value ran the default grid, as an empty file did
    ([], "set: {}\n", "set is empty; give at least one value or leave the key out"),
    ([], "ood: []\n", "ood is empty"),
])
def test_what_a_cell_would_refuse_is_refused_before_any_cell_runs(tmp_path: Path, capsys, args, file, message):
    if file is not None:
        (tmp_path / "sweep.yaml").write_bytes(file if isinstance(file, bytes) else file.encode())
        args = [*args, "--file", str(tmp_path / "sweep.yaml")]
    assert run(["sweep", *args, "--out", str(tmp_path / "sw"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_a_sweep_runs_reports_and_skips_finished_cells(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    code = run(["sweep", "--method", "ssvi,vi", "--sparsity", "0.9", "--seeds", "2", "--ood", "noise",
                "--set", "train.epochs=2", *TINY, "--jobs", "2", "--out", str(out), "--json"])
    assert code == 0
    said = capsys.readouterr()
    report = json.loads(said.out)
    assert report["cells_done"] == report["cells_total"] == 4 and not report["missing"]
    # progress on stderr under --json too, a line per cell: a long sweep said nothing until its report
    assert "2 at a time" in said.err and all(f"finish {c}" in said.err for c in ("ssvi_s0.9_seed0", "vi_seed1"))
    groups = {g["method"]: g for g in report["groups"]}
    assert groups["ssvi"]["seeds"] == [0, 1] and groups["vi"]["sparsity"] is None
    accs = [c["accuracy"] for c in report["cells"] if c["method"] == "ssvi"]
    assert groups["ssvi"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert groups["ssvi"]["accuracy"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert groups["ssvi"]["auroc:noise:entropy"]["n"] == 2 and groups["vi"]["density"]["mean"] == 1.0
    # every cell is an ordinary run directory, evaluated by ssvi evaluate
    cell = out / "cells" / "ssvi_s0.9_seed0"
    assert json.loads((cell / "summary.json").read_text())["method"] == "ssvi"
    assert json.loads((cell / "evaluation.json").read_text())["format"] == "ssvi-evaluation"
    # the criteria overlap of the six criteria at early/middle/late subspace steps
    iou = groups["ssvi"]["criteria_iou"]
    assert set(iou) == {"early", "middle", "late"} and len(iou["late"]["iou"]) == 6
    assert iou["early"]["iou"][3][1] == pytest.approx(1.0)  # snr_abs is ranked by snr's scores
    md = (out / "report.md").read_text()
    assert "| ssvi | 0.9 | 2 |" in md and "| vi | dense | 2 |" in md and "snr vs snr_abs | 1.000 |" in md
    assert (out / "metrics_vs_sparsity.png").stat().st_size > 1000 and (out / "accuracy_vs_flops.png").is_file()
    # a rerun of the same command skips every finished cell
    before = (cell / "evaluation.json").stat().st_mtime_ns
    assert run(["sweep", "--resume", str(out)]) == 0
    assert (cell / "evaluation.json").stat().st_mtime_ns == before
    assert "4 of 4 cells" in capsys.readouterr().out
    # paired differences from dense VI: seed by seed, mean and standard error
    assert run(["sweep", "--report", str(out), "--baseline", "method=vi", "--json", "--no-figures"]) == 0
    paired = json.loads(capsys.readouterr().out)["paired"]
    assert paired["baseline"]["method"] == "vi" and [g["method"] for g in paired["groups"]] == ["ssvi"]
    by_seed = {(c["method"], c["seed"]): c for c in report["cells"]}
    for metric in ("accuracy", "nll", "auroc:noise:entropy"):
        diffs = [by_seed["ssvi", s][metric] - by_seed["vi", s][metric] for s in (0, 1)]
        stat = paired["groups"][0][metric]
        assert stat["n"] == 2 and stat["mean"] == pytest.approx(sum(diffs) / 2)
        assert stat["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5)
    assert "## Paired differences from vi, dense" in (out / "report.md").read_text()
    # a report without figures removes the earlier report's, which would show other numbers
    assert not (out / "metrics_vs_sparsity.png").exists() and not (out / "accuracy_vs_flops.png").exists()
    # a baseline none of whose cells is evaluated (an interrupted sweep): the report, with a note
    for seed in (0, 1):
        (out / "cells" / f"vi_seed{seed}" / "evaluation.json").unlink()
    assert run(["sweep", "--report", str(out), "--baseline", "method=vi", "--no-figures"]) == 0
    assert "the baseline group (vi, dense) has no evaluated cell yet" in capsys.readouterr().err
    assert "has no evaluated cell yet." in (out / "report.md").read_text()
    # a damaged evaluation report is no evaluation: reported as missing, evaluated again on --resume
    (cell / "evaluation.json").write_text('{"format": "ssvi-evaluation", "metrics": {"accuracy": 0.9')
    assert run(["sweep", "--report", str(out), "--json", "--no-figures"]) == 0
    assert "ssvi_s0.9_seed0" in json.loads(capsys.readouterr().out)["missing"]
    assert run(["sweep", "--resume", str(out), "--no-figures"]) == 0
    assert json.loads((cell / "evaluation.json").read_text())["format"] == "ssvi-evaluation"


@pytest.mark.slow
def test_dry_run_lists_cell_commands_that_run_alone(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    assert run(["sweep", "--method", "static,rigl", "--sparsity", "0.8,0.9", "--set", "train.epochs=1", *TINY,
                "--ood", "noise", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == (out / "commands.txt").read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("ssvi sweep --run-cell ") for line in lines)
    assert not (out / "cells").exists()  # nothing ran
    assert lines[-1].endswith("rigl_s0.9_seed0")
    assert run(lines[-1].split()[1:]) == 0  # one cell, as a scheduler would run it
    capsys.readouterr()
    assert run(["sweep", "--report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cells_done"] == 1 and len(report["missing"]) == 3
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    shown = capsys.readouterr()
    assert f"not evaluated yet: {', '.join(report['missing'])}" in shown.err
    header = next(line for line in shown.out.splitlines() if "method" in line)
    assert "AUROC noise" in header and "settings" not in header  # the OOD column; none empty
    (rigl,) = report["groups"]  # deterministic: OOD scored by entropy, no MI
    assert rigl["auroc:noise:entropy"]["n"] == 1 and "auroc:noise:mutual_information" not in rigl


def test_a_dry_runs_json_gives_every_path_absolute(tmp_path: Path, capsys, monkeypatch):
    """A relative --out gave `sweep` and `commands_file` relative beside absolute commands and report:
    a scheduler's script that runs elsewhere found no commands file."""
    monkeypatch.chdir(tmp_path)
    assert run(["sweep", "--set", "train.epochs=1", "--out", "rel", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    where = (tmp_path / "rel").resolve()
    assert doc["sweep"] == str(where) and doc["commands_file"] == str(where / "commands.txt")
    assert all(str(where) in command for command in doc["commands"]) and doc["report"].endswith(str(where))


def test_force_replaces_another_sweep_and_a_yaml_list_key_is_one_value(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", "--out", str(out), "--dry-run"]) == 0
    (out / "cells" / "ssvi_s0.95_seed0").mkdir(parents=True)
    (out / "cells" / "ssvi_s0.95_seed0" / "evaluation.json").write_text("{}")  # a finished cell of that sweep
    assert run(["sweep", "--set", "train.epochs=3", "--out", str(out), "--dry-run"]) == 2
    assert "holds a different sweep" in capsys.readouterr().err
    (out / "notes.md").write_text("mine")
    # A dry run runs nothing, so it must not delete anything either: --force is refused there.
    assert run(["sweep", "--set", "train.epochs=3", "--out", str(out), "--dry-run", "--force"]) == 2
    assert "--dry-run runs nothing, so it replaces nothing" in capsys.readouterr().err
    assert (out / "cells" / "ssvi_s0.95_seed0" / "evaluation.json").read_text() == "{}"
    grid = ["sweep", "--set", "train.epochs=1", "--set", "model.widths=[16]", "--set", "data.max_train=200",
            "--out", str(out), "--no-figures", "--json"]
    assert run([*grid, "--force"]) == 0
    # the old sweep's cell is not reused under new settings: run again, from scratch
    assert json.loads((out / "cells" / "ssvi_s0.95_seed0" / "evaluation.json").read_text())["n"] > 0
    assert (out / "notes.md").read_text() == "mine"  # --force removes the sweep's own files only
    capsys.readouterr()
    # the same grid again with --force: nothing is replaced, and that is said (it went on in silence)
    evaluated = (out / "cells" / "ssvi_s0.95_seed0" / "evaluation.json").stat().st_mtime_ns
    assert run([*grid, "--force"]) == 0
    assert f"note: --force replaces another sweep; {out} holds this one, whose finished cells are kept (delete " \
           f"{out / 'cells'}, or a cell's folder in it, to train them again)" in " ".join(capsys.readouterr().err.split())
    assert (out / "cells" / "ssvi_s0.95_seed0" / "evaluation.json").stat().st_mtime_ns == evaluated
    # A folder that is not a sweep is never emptied, --force or not.
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    for how in (["--dry-run"], ["--force"]):  # refused before any cell runs
        assert run(["sweep", "--out", str(other), *how]) == 2
        assert "holds thesis.tex and is not a sweep folder" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]
    # Printed commands are quoted for a shell: a folder name with a space stays one argument.
    spaced = tmp_path / "my sweep"
    assert run(["sweep", "--set", "train.epochs=1", "--out", str(spaced), "--dry-run"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert shlex.split(line)[-1] == str(spaced.resolve() / "cells" / "ssvi_s0.95_seed0")
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text("seeds: 2\nset:\n  model.widths: [32, 32]\n  sparse.alpha: [0.1, 0.3]\n")
    assert run(["sweep", "--file", str(spec_file), "--out", str(tmp_path / "y"), "--dry-run"]) == 0
    spec = json.loads((tmp_path / "y" / "sweep.json").read_text())["spec"]
    assert spec["fixed"] == {"model.widths": [32, 32]} and spec["axes"] == {"sparse.alpha": [0.1, 0.3]}
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_an_axis_no_method_of_the_grid_uses_is_said(tmp_path: Path, capsys):
    """--method vi --criterion mean,snr made one cell per seed in silence: the values looked swept."""
    for args, key in ((["--method", "vi", "--criterion", "mean,snr"], "sparse.criterion"),
                      (["--method", "vi,dense", "--sparsity", "0.9,0.95"], "the sparsity"),
                      (["--method", "static", "--set", "sparse.alpha=0.3,0.5"], "sparse.alpha")):
        out = tmp_path / key.replace(" ", "-")
        assert run(["sweep", *args, "--out", str(out), "--dry-run"]) == 0
        said = " ".join(capsys.readouterr().err.split())
        assert f"note: no method of this grid ({args[1].replace(',', ', ')}) uses {key}: its 2 values would train alike " \
               "and make no cells of their own" in said
    # one method that uses it is enough: no note
    assert run(["sweep", "--method", "vi,ssvi", "--criterion", "mean,snr", "--out", str(tmp_path / "x"), "--dry-run"]) == 0
    assert "note: no method" not in capsys.readouterr().err


def test_one_seed_has_no_spread_to_show():
    from ssvi_cli.sweep.report import _iou_markdown, _stats, mean_std

    one, two = _stats([0.9611]), _stats([0.96, 0.98])
    assert one == {"mean": 0.9611, "std": None, "n": 1} and mean_std(one) == "0.9611"
    assert two["std"] == pytest.approx(0.02 / 2 ** 0.5) and two["n"] == 2  # the sample std (n - 1)
    assert mean_std(two) == "0.9700 ± 0.0141" and mean_std(_stats([2e-4]), -1) == "2.00e-04"
    # a method that ignores a swept key ran once: its column says so instead of "None"
    assert setting_text({"settings": {}}, "sparse.alpha") == "any"
    assert setting_text({"settings": {"sparse.alpha": 0.3}}, "sparse.alpha") == "0.3"
    # a group's criteria overlap is headed by its settings as key=value, as the paired table names groups
    stage = {"criteria": ["mean", "snr"], "steps": [50], "iou": [[1.0, 0.72], [0.72, 1.0]]}
    group = {"method": "ssvi", "sparsity": 0.95, "settings": {"bayes.beta": 0.01, "model.widths": [64, 64]},
             "seeds": [0], "criteria_iou": {"early": stage, "middle": stage, "late": stage}}
    md = "\n".join(_iou_markdown([group]))
    assert "## Criteria overlap: ssvi, sparsity 0.95, bayes.beta=0.01, model.widths=[64,64]" in md
    # one step recorded (a short run): one column, not the same step three times, and said
    assert "| mean vs snr | 0.720 |" in md.splitlines() and "(mean over seeds)" in md
    assert "| criteria | early (step 50) |" in md.splitlines()
    assert "too few such steps for three: a column that would repeat the one before it is left out." in md
    # a seed without the records (its support history lost) is not averaged in silently, and seeds
    # that reached a stage at other steps show the range
    group["seeds"] = [0, 1, 2]
    group["criteria_iou"]["late"] = {**stage, "steps": [900, 950]}
    md = "\n".join(_iou_markdown([group]))
    assert "(mean over the 1 of 3 seeds that recorded it)" in md and "late (step 900-950)" in md
    assert "| criteria | early (step 50) | late (step 900-950) |" in md.splitlines()


def test_a_metric_over_fewer_seeds_says_so_in_every_table(capsys):
    """The paired table's and the terminal's seeds column gave the group's seed count where a metric
    was averaged over fewer (a seed whose NLL was not finite), as report.md's main table did not."""
    from ssvi_cli.cli.sweep import _group_table, _paired_table
    from ssvi_cli.sweep.paired import paired_markdown

    group = {"method": "ssvi", "sparsity": 0.95, "settings": {}, "seeds": [0, 1, 2],
             "accuracy": {"mean": -0.003, "se": 0.001, "n": 3}, "nll": {"mean": 0.002, "se": None, "n": 1}}
    paired = {"baseline": {"method": "vi", "sparsity": None, "settings": {}}, "metrics": ["accuracy", "nll"],
              "groups": [group]}
    assert "| ssvi | 0.95 | 1 of 3 finite | -0.0030 ± 0.0010 | +0.0020 |" in paired_markdown(paired, [])
    _paired_table(paired)
    assert "1 of 3 finite" in "".join(capsys.readouterr().out.split("\n"))
    group["nll"]["n"] = 3
    group["auroc:noise:mutual_information"] = {"mean": 0.01, "se": None, "n": 1}  # a column not shown
    _group_table("t", [group], {"accuracy": "Δ accuracy", "nll": "Δ NLL"}, lambda g: ["-", "-"])
    assert "finite" not in capsys.readouterr().out
    assert "| ssvi | 0.95 | 1 of 3 finite |" in "\n".join(paired_markdown({**paired, "metrics": [
        *paired["metrics"], "auroc:noise:mutual_information"]}, []))  # where it is shown
    # an OOD set's path with a '|' stays one column (the paths review: 14 header cells over 12 columns)
    table = "\n".join(paired_markdown({**paired, "metrics": ["accuracy", "auroc:/d/p|q:entropy"]}, []))
    head, rule = next((line, after) for line, after in zip(table.splitlines(), table.splitlines()[1:])
                      if line.startswith("| method"))
    assert "AUROC /d/p\\|q (entropy)" in head and head.replace("\\|", "").count("|") == rule.count("---") + 1


def test_a_minus_sign_names_its_own_cell_and_older_sweeps_keep_their_names(tmp_path: Path, capsys):
    spec = SweepSpec(preset="digits_mlp", fixed={"data.name": "imagefolder:/nowhere", "data.channels": 1},
                     axes={"data.mean": [[-0.5], [0.5]], "data.std": [[0.25], [1e-5]]})
    assert sorted(c.name for c in expand(spec)) == [
        "ssvi_s0.95_mean-0.5_std-0.25_seed0", "ssvi_s0.95_mean-0.5_std-1e-05_seed0",
        "ssvi_s0.95_mean-neg0.5_std-0.25_seed0", "ssvi_s0.95_mean-neg0.5_std-1e-05_seed0"]
    with pytest.raises(SweepError, match="would share the folder 'ssvi_s0.95_mean-0.5_std-0.25_seed0', a name that keeps a value's letters"):
        expand(spec, version=2)  # before version 3 the sign was dropped, so -0.5 and 0.5 collided
    with pytest.raises(SweepError, match=r"alike for \{'sparsity': 0.9\} and \{'sparsity': 0.9000001\}"):
        expand(SweepSpec(sparsities=(0.9, 0.9000001)))  # named by what collides: it said "{} and {}"
    one = SweepSpec(preset="digits_mlp", fixed={"data.name": "imagefolder:/nowhere", "data.channels": 1},
                    axes={"data.mean": [[-0.5]]})
    assert [c.name for c in expand(one, version=2)] == ["ssvi_s0.95_mean-0.5_seed0"]  # as a version 2 sweep named it
    # A value out of range gets its own message, not a clash of folder names.
    assert run(["sweep", "--set", "sparse.criterion_lambda=-1,1", "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "sparse.criterion_lambda=-1.0 must be > 0" in capsys.readouterr().err


def test_a_sweep_made_before_collapsing_keeps_its_cells_and_a_report_needs_no_inputs(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    args = ["sweep", "--method", "ssvi,static", "--sparsity", "0.9", "--set", "sparse.alpha=0.3,0.5", "--out", str(out),
            "--dry-run"]
    assert run(args) == 0
    assert {Path(line.split()[-1]).name for line in capsys.readouterr().out.splitlines()} == {
        "ssvi_s0.9_alpha-0.3_seed0", "ssvi_s0.9_alpha-0.5_seed0", "static_s0.9_seed0"}
    data = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**data, "version": 1}))  # as written before the rule
    old_names = {"ssvi_s0.9_alpha-0.3_seed0", "ssvi_s0.9_alpha-0.5_seed0", "static_s0.9_alpha-0.3_seed0",
                 "static_s0.9_alpha-0.5_seed0"}
    assert {c.name for c in read_spec(out)[1]} == old_names
    assert run(args) == 0  # the same grid again continues it, with the cells it has
    assert {Path(line.split()[-1]).name for line in capsys.readouterr().out.splitlines()} == old_names
    assert json.loads((out / "sweep.json").read_text())["version"] == 1
    # An OOD folder that has gone since the sweep was made does not stop its report.
    ood = tmp_path / "ood"
    ood.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(ood / "a.png")
    assert run(["sweep", "--ood", str(ood), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    (ood / "a.png").unlink()
    ood.rmdir()
    capsys.readouterr()
    assert run(["sweep", "--report", str(tmp_path / "o"), "--json", "--no-figures"]) == 0
    assert json.loads(capsys.readouterr().out)["cells_done"] == 0


def test_the_late_criteria_overlap_is_the_last_step_that_drops_an_entry(tmp_path: Path):
    # Late in a long run the drop fraction rounds to no entry in any layer: two empty sets, every
    # IoU 1. The table's "late" column is the last step that dropped something.
    from ssvi_cli.sweep.report import stage_iou

    def record(step: int, dropped: int, value: float) -> dict:
        return {"step": step, "layers": {"a": {"dropped": dropped}, "b": {"dropped": 0}},
                "criteria_iou": {"fraction": 0.1, "lambda": 1.0, "criteria": ["mean", "snr"],
                                 "iou": [[1.0, value], [value, 1.0]]}}

    path = tmp_path / "support.jsonl"
    lines = [record(100, 30, 0.7), record(200, 20, 0.6), record(300, 5, 0.5), record(400, 0, 1.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    stages = stage_iou(path)
    assert {k: v["step"] for k, v in stages.items()} == {"early": 100, "middle": 200, "late": 300}
    assert stages["late"]["iou"][0][1] == 0.5


@pytest.mark.parametrize("case", ["broken_image", "no_images", "nan_array", "seeds_float", "seeds_bool",
                                  "seeds_negative", "no_sparsities", "no_preset", "out_under_a_file"])
def test_a_sweep_refuses_what_its_cells_would_fail_on_before_any_cell_runs(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    good = Image.fromarray(np.zeros((8, 8), np.uint8))
    args = ["sweep", "--method", "ssvi", "--seeds", "1", "--out", "s", "--dry-run"]
    if case == "broken_image":
        Path("odd").mkdir()
        good.save("odd/a.png")
        Path("odd/b.png").write_text("not an image")
        args += ["--ood", "odd"]
    elif case == "no_images":
        Path("texts").mkdir()
        Path("texts/a.txt").write_text("text")
        args += ["--ood", "texts"]
    elif case == "nan_array":
        np.save("nan.npy", np.full((3, 8, 8), np.nan, np.float32))
        args += ["--ood", "nan.npy"]
    elif case == "out_under_a_file":
        Path("afile").write_text("a file")
        args[args.index("s")] = "afile/s"
    else:
        text = {"seeds_float": "seeds: 3.0", "seeds_bool": "seeds: true", "seeds_negative": "seeds: [-1]",
                "no_sparsities": "sparsities: []", "no_preset": "preset: null"}[case]
        Path("sweep.yaml").write_text(text + "\n")
        args = ["sweep", "--file", "sweep.yaml", "--out", "s", "--dry-run"]
    assert run(args) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    said = {"seeds_float": "seeds 3.0: give a count", "seeds_bool": "seeds True: give a count",  # the file's words,
            "seeds_negative": "seeds [-1]: give a count",  # not a cell's refusal of its train.seed
            "no_sparsities": "sparsities is empty", "no_preset": "preset None: give a preset name"}.get(case)
    assert said is None or lines[0].startswith(f"error: --file sweep.yaml: {said}"), lines
    assert not Path("s").exists() and not Path("afile/s").exists()


def test_a_sweep_records_its_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ood").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save("ood/a.png")
    assert run(["sweep", "--method", "ssvi", "--seeds", "1", "--ood", "ood", "--ood", "noise", "--out", "s",
                "--dry-run"]) == 0
    spec, cells = read_spec(Path("s"))
    assert spec.ood == (str(tmp_path.resolve() / "ood"), "noise")
    monkeypatch.chdir(tmp_path / "s")  # another directory: the cell's evaluation still finds the folder
    assert f"--ood {tmp_path.resolve() / 'ood'}" in " ".join(cells[0].eval_args(spec, Path("x")))


def test_an_image_folder_and_a_data_dir_in_a_sweep_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for label in ("a", "b"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "photos" / label / f"{i}.png")
    assert run(["sweep", "--method", "ssvi", "--seeds", "1", "--set", "data.name=imagefolder:photos",
                "--set", "data.data_dir=tv,~/tv2", "--out", "s", "--dry-run"]) == 0
    spec, _ = read_spec(Path("s"))
    assert spec.fixed["data.name"] == f"imagefolder:{tmp_path.resolve() / 'photos'}"
    assert spec.axes["data.data_dir"] == [str(tmp_path.resolve() / "tv"), str(Path.home().resolve() / "tv2")]


def test_a_sweep_made_when_paths_were_recorded_as_typed_still_continues(tmp_path, monkeypatch, capsys):
    """Before runs and sweeps recorded their data paths absolute, a cell's config and sweep.json held
    them as typed: from the same folder, such a sweep is the same sweep and its cells ran as it says."""
    monkeypatch.chdir(tmp_path)
    for label in ("a", "b"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 30 * i + 100 * (label == "b"), np.uint8)).save(f"photos/{label}/{i}.png")
    grid = ["sweep", "--method", "ssvi", "--seeds", "1", "--set", "data.name=imagefolder:photos", "--set",
            "data.image_size=8", "--set", "data.channels=1", "--set", "data.data_dir=tv", "--set", "train.epochs=1",
            *TINY, "--out", "s"]
    assert run(grid) == 0, capsys.readouterr().err
    # as an older ssvi wrote them: relative paths in sweep.json and in the cell's run config
    sweep_file = tmp_path / "s" / "sweep.json"
    doc = json.loads(sweep_file.read_text())
    doc["spec"]["fixed"].update({"data.name": "imagefolder:photos", "data.data_dir": "tv"})
    sweep_file.write_text(json.dumps(doc))
    config = next((tmp_path / "s" / "cells").glob("*/config.yaml"))
    config.write_text(config.read_text().replace(f"imagefolder:{tmp_path.resolve() / 'photos'}", "imagefolder:photos"))
    assert "imagefolder:photos" in config.read_text()
    capsys.readouterr()
    for args in (["sweep", "--resume", "s"], grid):
        assert run(args) == 0, capsys.readouterr().err
        assert "ran under other settings" not in capsys.readouterr().err


def test_an_ood_set_gone_since_the_sweep_was_made_stops_a_cell_before_it_trains(tmp_path: Path, capsys):
    """A scheduler runs the listed cells later: an OOD array deleted meanwhile fails each cell in a
    line before its training, not after it; a finished sweep still reports without it."""
    ood = tmp_path / "odd.npy"
    np.save(ood, np.random.default_rng(0).random((20, 8, 8), dtype=np.float32))
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--ood", str(ood), "--out", str(out), "--dry-run"]) == 0
    cell = Path(capsys.readouterr().out.split()[-1])
    ood.unlink()
    assert run(["sweep", "--run-cell", str(cell)]) == 2
    err = capsys.readouterr().err
    assert f"--ood {ood}: no such file or folder" in err and "read when each cell is evaluated" in err
    assert len(err.strip().splitlines()) == 1 and not (cell / "checkpoints").exists()
    assert run(["sweep", "--resume", str(out)]) == 2 and "no such file or folder" in capsys.readouterr().err
    assert not (cell / "checkpoints").exists()


def test_cells_evaluated_on_another_version_of_an_ood_set_are_evaluated_again_not_averaged(tmp_path: Path, capsys):
    """A scheduler's cells run over days: an OOD array or folder changed between two cells' evaluations
    left them scored on different sets, averaged in one report column. Each evaluation records what
    it read; a cell scored on another version is not counted, and --resume evaluates it again."""
    from ssvi_cli.evaluation.ood_sets import source_digest

    ood, folder = tmp_path / "odd.npy", tmp_path / "imgs"
    np.save(ood, np.random.default_rng(0).random((20, 8, 8), dtype=np.float32))
    folder.mkdir()
    np.save(folder / "a.npy", np.random.default_rng(1).random((6, 8, 8), dtype=np.float32))
    out = tmp_path / "sw"
    assert run(["sweep", "--method", "vi", "--seeds", "2", "--set", "train.epochs=1", *TINY, "--ood", str(ood),
                "--ood", f"mine={folder}", "--out", str(out), "--dry-run"]) == 0
    first, second = (Path(line.split()[-1]) for line in capsys.readouterr().out.splitlines())
    assert run(["sweep", "--run-cell", str(first)]) == 0
    recorded = json.loads((first / "evaluation.json").read_text())["ood_sources"]
    assert recorded == {str(ood): source_digest(ood), "mine": source_digest(folder)}
    np.save(ood, np.zeros((7, 8, 8), np.float32))  # the array replaced between the two cells
    assert run(["sweep", "--run-cell", str(second)]) == 0
    capsys.readouterr()
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["cells_done"] == 1 and report["missing"] == [first.name]
    # said apart from a cell never evaluated (the image-folder sweep review: "not evaluated yet" alone)
    assert report["evaluated_otherwise"] == [first.name]
    assert "of these, 1 cell was scored before otherwise than the sweep asks now (an --ood set changed or added " \
        "since, or --samples): ssvi sweep --resume scores it again, keeping its training" in \
        " ".join(capsys.readouterr().err.split())
    assert f"scored before otherwise than the sweep asks now (an `--ood` set changed or added since, or `--samples`), " \
        f"which `ssvi sweep --resume` scores again, keeping their training, once the sweep's `--ood` sets can be " \
        f"read: {first.name}." in " ".join((out / "report.md").read_text().split())
    (vi,) = report["groups"]
    assert vi[f"auroc:{ood}:entropy"]["n"] == 1
    trained = (first / "model.safetensors").stat().st_mtime_ns
    assert run(["sweep", "--resume", str(out), "--no-figures"]) == 0  # evaluated again on the array as it is
    assert json.loads((first / "evaluation.json").read_text())["ood"][str(ood)]["n"] == 7
    assert (first / "model.safetensors").stat().st_mtime_ns == trained  # not trained again
    assert json.loads((out / "report.json").read_text())["cells_done"] == 2
    np.save(folder / "b.npy", np.zeros((2, 8, 8), np.float32))  # a folder's new file is a change too
    capsys.readouterr()
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert json.loads((out / "report.json").read_text())["cells_done"] == 0


def test_the_report_tells_cells_under_way_from_cells_not_begun(tmp_path: Path, capsys):
    """A scheduler's user runs --report to see which jobs to submit again: a cell interrupted at a
    checkpoint, one running and one never started were all "not evaluated yet"."""
    from ssvi_cli.sweep.runner import cell_lock

    out = tmp_path / "sw"
    assert run(["sweep", "--method", "vi", "--seeds", "5", "--set", "train.epochs=1", *TINY, "--out", str(out),
                "--dry-run"]) == 0
    done, stopped, trained, running, new = (Path(line.split()[-1]) for line in capsys.readouterr().out.splitlines())
    for cell in (done, stopped, trained):
        assert run(["sweep", "--run-cell", str(cell)]) == 0
    for name in ("evaluation.json", "summary.json", "model.safetensors"):  # as if stopped after its checkpoint
        (stopped / name).unlink()
    (trained / "evaluation.json").unlink()
    capsys.readouterr()
    with cell_lock(running):  # as a --run-cell of another process holds it
        assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["missing"] == [stopped.name, trained.name, running.name, new.name]
    assert report["under_way"] == {stopped.name: "stopped", trained.name: "trained", running.name: "running"}
    said = (f"Of these, running now: {running.name}; stopped at a checkpoint, from which a rerun goes on: "
            f"{stopped.name}; trained, not yet evaluated: {trained.name}; the others not begun.")
    assert said in " ".join(capsys.readouterr().err.split())
    assert said in " ".join((out / "report.md").read_text().split())
    for cell in (new, running):
        assert run(["sweep", "--run-cell", str(cell)]) == 0
    capsys.readouterr()
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert json.loads((out / "report.json").read_text())["under_way"] == {stopped.name: "stopped", trained.name: "trained"}
    said = " ".join(capsys.readouterr().err.split())  # every cell not evaluated is under way: no others
    assert said.endswith(f"Of these, stopped at a checkpoint, from which a rerun goes on: {stopped.name}; trained, not "
                         f"yet evaluated: {trained.name}.")
    for lock in (out / "cells").glob(".*.lock"):  # left by the runs; a report looks at locks, makes none
        lock.unlink()
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert not list((out / "cells").glob(".*.lock"))


def test_a_refused_grid_leaves_the_sweep_file_as_it_was(tmp_path: Path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text("model: {name: mlp, widths: [16]}\ndata: {max_train: 100}\ntrain: {epochs: 1, eval_samples: 2}\n")
    out = tmp_path / "sw"
    grid = ["sweep", "--preset", str(preset), "--samples", "2", "--out", str(out)]
    assert run([*grid, "--no-figures", "--json"]) == 0
    written = (out / "sweep.json").read_text()
    preset.write_text(preset.read_text().replace("widths: [16]", "widths: [24]"))  # the finished cell is stale
    capsys.readouterr()
    assert run([*grid, "--seeds", "2", "--dry-run"]) == 2
    assert "ran under other settings than the sweep gives it now" in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == written


def test_cells_whose_support_never_moved_are_named(tmp_path: Path, capsys):
    """Five steps at delta_t 50: SSVI without a subspace step is static sparse VI, and a swept alpha
    changes nothing; the report and the cell's own log say so."""
    out = tmp_path / "sw"
    at = TINY.index("sparse.delta_t=2")
    small = TINY[:at - 1] + TINY[at + 1:]  # the preset's delta_t, 50
    assert run(["sweep", "--method", "ssvi,vi", "--set", "train.epochs=1", *small, "--out", str(out),
                "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "note: no subspace step before t_end, so the support never moved, in: ssvi, sparsity 0.95." in err
    assert "vi, dense" not in err.split("note:")[1]
    report = json.loads((out / "report.json").read_text())
    assert report["support_unmoved"] == ["ssvi, sparsity 0.95"]
    assert "so the support never moved (the run trained a fixed support, as static does), in: ssvi, sparsity 0.95." in \
        (out / "report.md").read_text()
    assert "so the support will not move" in (out / "logs" / "ssvi_s0.95_seed0.log").read_text()


def test_a_sweep_made_when_1_and_1_0_were_two_values_still_grows(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "bayes.beta=0.1,1", "--out", str(out), "--dry-run"]) == 0
    stored = json.loads((out / "sweep.json").read_text())
    stored["spec"]["axes"]["bayes.beta"] = [0.1, 1]  # as such a sweep stored it: its cells say beta-1
    stored["cells"] = [name.replace("beta-1.0", "beta-1") for name in stored["cells"]]
    (out / "sweep.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert run(["sweep", "--set", "bayes.beta=0.1,1", "--seeds", "2", "--out", str(out), "--dry-run",
                "--ood", "noise"]) == 0
    captured = capsys.readouterr()
    assert "the grid adds to the sweep" in captured.err and "is evaluated otherwise now" in captured.err
    names = sorted(Path(line.split()[-1]).name for line in captured.out.splitlines())
    assert names == ["ssvi_s0.95_beta-0.1_seed0", "ssvi_s0.95_beta-0.1_seed1", "ssvi_s0.95_beta-1_seed0",
                     "ssvi_s0.95_beta-1_seed1"]


def test_a_sweep_file_takes_one_ood_set_as_it_takes_one_method(tmp_path: Path, capsys):
    (tmp_path / "sweep.yaml").write_text("method: ssvi\nood: noise\n")
    assert run(["sweep", "--file", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "sw"), "--dry-run"]) == 0
    spec, _ = read_spec(tmp_path / "sw")
    assert spec.ood == ("noise",) and spec.methods == ("ssvi",)


def test_one_number_written_two_ways_is_one_value(tmp_path: Path, capsys):
    """1 and 1.0 of a float key name one cell, one group and one --baseline; a grid that writes a
    value the other way still grows the sweep."""
    assert [c.name for c in expand(SweepSpec(axes=dict([parse_axis("sparse.alpha=1,1.0")])))] == ["ssvi_s0.95_alpha-1.0_seed0"]
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "bayes.beta=0.1,1", "--out", str(out), "--dry-run"]) == 0
    assert run(["sweep", "--set", "bayes.beta=0.1,1.0,0.01", "--out", str(out), "--dry-run"]) == 0
    assert "the grid adds to the sweep" in capsys.readouterr().err
    spec, cells = read_spec(out)
    assert len(cells) == 3 and check_selection(spec, cells, ["bayes.beta=1"])["settings"] == {"bayes.beta": 1.0}
    assert check_selection(spec, cells, ["bayes.beta=1.0"])["settings"] == {"bayes.beta": 1.0}


def test_a_flag_that_replaces_a_sweep_files_value_says_so(tmp_path: Path, capsys):
    """The flag wins over the file, as documented, but the file's values went without a word."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: [ssvi, vi]\nsparsities: [0.9, 0.95]\nseeds: 3\nset: {optim.lr: [0.003, 0.01], train.epochs: 1}\n")
    assert run(["sweep", "--file", str(sweep), "--method", "ssvi", "--sparsity", "0.8", "--seeds", "1",
                "--set", "optim.lr=0.1", "--out", str(tmp_path / "sw"), "--dry-run"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: --method replaces the file's method: [ssvi,vi]",
                     "note: --sparsity replaces the file's sparsities: [0.9,0.95]",
                     "note: --seeds replaces the file's seeds: 3",  # as the file writes it
                     "note: --set optim.lr replaces the file's optim.lr: [0.003,0.01]"]
    assert run(["sweep", "--file", str(sweep), "--out", str(tmp_path / "sw2"), "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err  # nothing replaced, nothing said
    assert run(["sweep", "--file", str(sweep), "--method", "ssvi,vi", "--seeds", "3", "--set", "optim.lr=0.003,0.01",
                "--out", str(tmp_path / "sw3"), "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err  # the file's own values again: nothing replaced


def test_a_sweep_of_dense_methods_alone_draws_them_at_sparsity_zero(tmp_path: Path):
    import warnings

    pytest.importorskip("matplotlib")
    from ssvi_cli.sweep.figures import write_figures

    stat = {"mean": 0.9, "std": 0.01, "n": 2}
    group = {"method": "vi", "sparsity": None, "settings": {}, "seeds": [0, 1], "accuracy": stat, "nll": stat,
             "ece": stat, "training_flops": {"mean": 1e9, "std": 0.0, "n": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend with nothing drawn
        written = write_figures({"groups": [group], "sweep": str(tmp_path)}, tmp_path)
    assert [p.name for p in written] == ["metrics_vs_sparsity.png", "accuracy_vs_flops.png"]


def _figures_drawn(monkeypatch):
    """The sweep's figures module with its figures kept (not written or closed), and one group's metrics."""
    pytest.importorskip("matplotlib")
    from ssvi_cli.sweep import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, target: drawn.append(fig) or target)
    monkeypatch.setattr(figures._pyplot(), "close", lambda fig: None)
    stat = {"mean": 0.9, "std": 0.01, "n": 2}
    return figures, drawn, {"settings": {}, "seeds": [0, 1], "accuracy": stat, "nll": stat, "ece": stat,
                            "training_flops": {"mean": 1e9, "std": 0.0, "n": 2}}


def test_a_dense_methods_level_is_a_visible_line_when_one_sparsity_was_swept(tmp_path: Path, monkeypatch):
    """With one sparsity, dense VI's level was a line from 0.95 to 0.95: nothing to see in any panel."""
    figures, drawn, common = _figures_drawn(monkeypatch)
    figures.write_figures({"groups": [{"method": "ssvi", "sparsity": 0.95, **common},
                                      {"method": "vi", "sparsity": None, **common}], "sweep": str(tmp_path)}, tmp_path)
    for ax in drawn[0].axes:
        fig = ax.figure
        fig.canvas.draw()
        line = next(l for l in ax.get_lines() if l.get_label() == "vi")
        ends = line.get_transform().transform(line.get_xydata())
        assert ends[:, 0].max() - ends[:, 0].min() > 0.5 * ax.bbox.width, ax.get_title()


def test_methods_at_one_sparsity_keep_their_error_bars_apart_and_ticks_name_the_swept_values(tmp_path, monkeypatch):
    """Two methods at one sparsity were drawn at the same x, one error bar over the other; drawn apart,
    the axis must not read as other sparsities: its ticks are the swept values alone."""
    figures, drawn, common = _figures_drawn(monkeypatch)
    groups = [{"method": m, "sparsity": s, **common} for m in ("ssvi", "static", "rigl") for s in (0.9, 0.95)]
    figures.write_figures({"groups": groups, "sweep": str(tmp_path)}, tmp_path)
    for ax in drawn[0].axes:
        if not ax.get_visible():
            continue
        xs = {bars.get_label(): sorted(bars.lines[0].get_xdata()) for bars in ax.containers}
        assert set(xs) == {"ssvi", "static", "rigl"}, ax.get_title()
        at_095 = sorted(x[1] for x in xs.values())
        assert len(set(at_095)) == 3 and at_095[-1] - at_095[0] < 0.05 / 3 + 1e-9  # apart, within a third of the gap
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.9", "0.95"]
    assert "drawn a little apart" in drawn[0].texts[0].get_text()
    assert "mean ± std over seeds" in drawn[1].axes[0].get_title()


def test_dense_methods_alone_are_drawn_apart_and_close_sparsities_keep_their_labels_apart(tmp_path, monkeypatch):
    figures, drawn, common = _figures_drawn(monkeypatch)
    dense = [{**common, "method": "vi", "sparsity": None, "settings": {"optim.lr": lr}} for lr in (0.002, 0.005)]
    figures.write_figures({"groups": dense, "sweep": str(tmp_path)}, tmp_path)
    ax = drawn[0].axes[0]
    xs = [bars.lines[0].get_xdata()[0] for bars in ax.containers]
    assert len(set(xs)) == 2 and max(abs(x) for x in xs) <= 0.01  # apart, both about sparsity 0
    drawn.clear()
    swept = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
    figures.write_figures({"groups": [{**common, "method": m, "sparsity": s} for m in ("ssvi", "static") for s in swept],
                           "sweep": str(tmp_path)}, tmp_path)
    ax = drawn[0].axes[0]
    drawn[0].canvas.draw()
    boxes = [t.get_window_extent() for t in ax.get_xticklabels()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.9", "0.95", "0.98", "0.99", "0.995", "0.999"]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_a_sweep_folder_that_cannot_be_written_is_one_line_and_its_report_still_prints(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out), "--dry-run"]) == 0
    cell = Path(capsys.readouterr().out.split()[-1])
    (cell.parent / f".{cell.name}.lock").mkdir(parents=True)  # where the lock file goes: unwritable as a file
    assert run(["sweep", "--run-cell", str(cell)]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write the cell's lock" in err and "must be writable" in err and "Traceback" not in err
    (out / "report.json").mkdir()  # the report cannot be written either
    assert run(["sweep", "--report", str(out), "--json", "--no-figures"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cells_total"] == 1 and "note: the report was not written (cannot write" in captured.err


def test_sparsity_labels_in_the_flops_figure_never_cover_each_other():
    """Two series through one point printed their sparsity labels on top of each other, unreadable:
    the same label at one place is written once, another one moves below it."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssvi_cli.sweep.figures import _annotate

    fig, ax = plt.subplots(dpi=110)
    ax.set_xscale("log")
    ax.plot([1e9, 1e11], [0.97, 0.99])
    _annotate(ax, [(1e10, 0.98, "0.9", "C0"), (1.01e10, 0.98, "0.9", "C2"), (1e10, 0.98, "0.8", "C1"),
                   (1.02e10, 0.98, "0.95", "C3"), (1e10, 0.98, "0.95", "C4"), (1.2e10, 0.9801, "0.98", "C5")])
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    texts = [t.get_text() for t in ax.texts]
    plt.close(fig)
    assert texts == ["0.9", "0.8", "0.95", "0.98"]  # each once
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), boxes


def test_the_figures_show_every_ood_set_and_readable_flops_within_a_decade(tmp_path: Path, monkeypatch):
    """The metrics figure drew the first OOD set's AUROC only (a sweep with heldout and noise lost the
    noise panel); FLOPs spanning less than a decade were labelled 3.2x10^9 3.4x10^9 ... into each other."""
    pytest.importorskip("matplotlib")
    from ssvi_cli.sweep import figures

    drawn = {}

    def keep(fig, target):
        fig.canvas.draw()
        shown = [[t for t in ax.get_xticklabels() if t.get_text() and min(ax.get_xlim()) <= t.get_position()[0]
                  <= max(ax.get_xlim())] for ax in fig.axes]  # the labels inside the axis
        drawn[target.name] = ([ax.get_title() for ax in fig.axes if ax.get_visible()],
                              [[t.get_text() for t in labels] for labels in shown],
                              [[t.get_window_extent() for t in labels] for labels in shown])
        return target

    monkeypatch.setattr(figures, "_save", keep)
    ood = {"auroc:heldout:entropy": {"mean": 0.95, "std": 0.01}, "auroc:noise:entropy": {"mean": 0.97, "std": 0.01},
           "auroc:/data/mine/blobs.npy:entropy": {"mean": 0.9, "std": 0.01}}
    groups = [{"method": m, "sparsity": s, "settings": {}, "training_flops": {"mean": f, "std": 0.0},
               **{k: {"mean": v, "std": 0.002} for k, v in (("accuracy", a), ("nll", 0.1), ("ece", 0.01))}, **ood}
              for m, s, f, a in (("ssvi", 0.9, 3.1e9, 0.97), ("ssvi", 0.95, 3.6e9, 0.975), ("vi", None, 4.6e9, 0.98))]
    figures.write_figures({"groups": groups, "sweep": str(tmp_path)}, tmp_path)
    titles = drawn[figures.METRICS_VS_SPARSITY][0]
    assert [t for t in titles if t.startswith("OOD")] == ["OOD AUROC, blobs.npy (entropy)", "OOD AUROC, heldout (entropy)",
                                                          "OOD AUROC, noise (entropy)"]
    _, labels, boxes = drawn[figures.ACCURACY_VS_FLOPS]
    assert labels[0] == ["3e9", "4e9", "5e9"]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes[0]) for b in boxes[0][i + 1:])
    # a set named like another's file or folder is shown whole, both of them; a label may hold ':'
    figures.write_figures({"groups": [{**groups[0], "auroc:/a/imgs:entropy": ood["auroc:noise:entropy"],
                                       "auroc:/b/imgs:entropy": ood["auroc:noise:entropy"]}], "sweep": "x"}, tmp_path)
    assert {"OOD AUROC, /a/imgs (entropy)", "OOD AUROC, /b/imgs (entropy)"} <= set(drawn[figures.METRICS_VS_SPARSITY][0])
    from ssvi_cli.sweep.paired import auroc_title

    assert auroc_title("auroc:mnist:rot15:mutual_information") == "AUROC mnist:rot15 (MI)"


def test_series_of_one_training_cost_are_drawn_apart_on_a_readable_flops_axis(tmp_path: Path, monkeypatch):
    """Two series at one cost (mu init fan_in and dense_fan_in) piled their FLOPs labels into one smear
    at the left end of a log axis of several decades, and drew their points over each other."""
    pytest.importorskip("matplotlib")
    from ssvi_cli.sweep import figures

    drawn = {}

    def keep(fig, target):
        fig.canvas.draw()
        ax = fig.axes[0]
        labels = [t for t in ax.get_xticklabels() if t.get_text() and min(ax.get_xlim()) <= t.get_position()[0]
                  <= max(ax.get_xlim())]
        drawn[target.name] = (ax.get_title(), ax.get_xlim(), [t.get_window_extent() for t in labels],
                              [bars.lines[0].get_xdata()[0] for bars in ax.containers])
        return target

    monkeypatch.setattr(figures, "_save", keep)
    groups = [{"method": "ssvi", "sparsity": 0.95, "settings": {"bayes.mu_init": init},
               "training_flops": {"mean": 1.124e12, "std": 0.0}, **{k: {"mean": 0.98, "std": 0.002} for k in
                                                                    ("accuracy", "nll", "ece")}}
              for init in ("fan_in", "dense_fan_in")]
    figures.write_figures({"groups": groups, "sweep": str(tmp_path)}, tmp_path)
    title, (lo, hi), boxes, xs = drawn[figures.ACCURACY_VS_FLOPS]
    assert hi / lo < 2 and len(boxes) >= 2  # a narrow axis with labels, not decades with a pile at one end
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert len(set(xs)) == 2 and max(xs) / min(xs) < 1.05 and "equal costs set apart" in title
    one = [{**groups[0], "sparsity": s} for s in (0.9, 0.95)]  # one series, two points of one cost: none apart
    figures.write_figures({"groups": one, "sweep": str(tmp_path)}, tmp_path)
    assert "set apart" not in drawn[figures.ACCURACY_VS_FLOPS][0]


def test_a_grid_that_fits_the_cells_as_they_ran_grows_after_its_preset_was_edited(tmp_path: Path, capsys):
    from ssvi_cli import config as C

    """With the preset edited since the cells ran (lr 0.01 -> 0.02), the grid that pins their lr was
    refused as "a different sweep" (pointing at --force): the old grid was read through the preset as
    it is now, not as the cells ran. Without the pin it is another sweep, as before."""
    preset = tmp_path / "p.yaml"
    preset.write_text(Path(C.list_presets()["digits_mlp"]).read_text())
    out = tmp_path / "sw"
    grid = ["sweep", "--preset", str(preset), "--method", "ssvi", "--sparsity", "0.95", *TINY,
            "--set", "train.epochs=1", "--out", str(out), "--no-figures"]
    assert run([*grid, "--seeds", "1"]) == 0
    preset.write_text(preset.read_text().replace("lr: 0.01 ", "lr: 0.02 "))
    assert C.load_preset(str(preset)).optim.lr == 0.02
    capsys.readouterr()
    assert run([*grid, "--seeds", "2", "--set", "optim.lr=0.01", "--dry-run"]) == 0, capsys.readouterr().err
    assert "ssvi_s0.95_seed1" in (out / "commands.txt").read_text()
    assert run([*grid, "--seeds", "2", "--dry-run"]) == 2  # the cells ran at 0.01, this grid says 0.02
    assert "holds a different sweep" in capsys.readouterr().err


def test_a_sweep_whose_preset_changed_before_all_its_cells_ran_goes_on_as_they_ran(tmp_path: Path, capsys):
    """An upgrade changed the shipped preset under a half-run sweep: --resume was refused (its started cell
    ran under other settings), and the grid given again with --set as that cell ran was "a different
    sweep" too, for its cell not yet started: no way on but deleting trained cells. The refusal says the
    --set that goes on, and that grid continues it; a value the started cells did not run with does not."""
    import yaml

    from ssvi_cli import config as C

    preset = tmp_path / "p.yaml"
    preset.write_text(Path(C.list_presets()["digits_mlp"]).read_text())
    out = tmp_path / "sw"
    grid = ["sweep", "--preset", str(preset), "--method", "ssvi,vi", "--sparsity", "0.95", "--seeds", "2", *TINY,
            "--set", "train.epochs=1", "--out", str(out), "--no-figures"]
    assert run([*grid, "--dry-run"]) == 0
    assert run(["sweep", "--run-cell", str(out / "cells" / "ssvi_s0.95_seed0")]) == 0  # the others never start
    preset.write_text(preset.read_text().replace("lr: 0.01 ", "lr: 0.02 "))
    capsys.readouterr()
    assert run(["sweep", "--resume", str(out)]) == 2
    # the whole grid, its own --set train.epochs=1 with the one that goes on (a user who gave the flags
    # again but that one was sent between "ran under other settings" and "a different sweep")
    advised = shlex.split(capsys.readouterr().err.rstrip().rpartition("; or go on as they ran: ")[2])
    assert advised[:2] == ["ssvi", "sweep"] and "train.epochs=1" in advised and "optim.lr=0.01" in advised
    assert run([*grid, "--set", "optim.lr=0.03", "--dry-run"]) == 2  # not what the started cell ran with
    assert "holds a different sweep" in capsys.readouterr().err
    assert run([*advised[1:], "--no-figures", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["cells_done"] == 4
    for cell in ("ssvi_s0.95_seed1", "vi_seed0"):  # vi too: the preset gave it the lr the ssvi cell moved from
        assert yaml.safe_load((out / "cells" / cell / "config.yaml").read_text())["optim"]["lr"] == 0.01
    # vi's own lr in the preset's methods: section did not move with it: that grid would change vi's
    # cells, so it is refused, and not advised
    preset.write_text(Path(C.list_presets()["digits_mlp"]).read_text() + "methods:\n  vi:\n    optim: {lr: 0.005}\n")
    out2 = tmp_path / "sw2"
    grid2 = [*grid[:-3], "--out", str(out2), "--no-figures"]
    assert run([*grid2, "--dry-run"]) == 0
    assert run(["sweep", "--run-cell", str(out2 / "cells" / "ssvi_s0.95_seed0")]) == 0
    preset.write_text(preset.read_text().replace("lr: 0.01 ", "lr: 0.02 "))
    capsys.readouterr()
    assert run(["sweep", "--resume", str(out2)]) == 2
    assert "go on as they ran" not in capsys.readouterr().err
    assert run([*grid2, "--set", "optim.lr=0.01", "--dry-run"]) == 2
    assert "holds a different sweep" in capsys.readouterr().err


def test_a_sweeps_checks_read_each_data_config_once_not_once_per_seed(tmp_path: Path, monkeypatch):
    """The names check (which scans an image folder) runs once per distinct data config, not once per
    seed: the image-folder keys the cells set are compared, not every key of every cell."""
    import ssvi_cli.training.plan as plan

    calls = []
    real = plan.check_names
    monkeypatch.setattr(plan, "check_names", lambda cfg, given=(): calls.append(given) or real(cfg, given))
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9,0.95", "--seeds", "3", "--set", "data.val_fraction=0.2",
                "--out", str(tmp_path / "sw"), "--dry-run"]) == 0
    assert calls == [["data.val_fraction"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_sweep_asking_for_cuda_where_there_is_none_says_so_before_any_cell_starts(tmp_path: Path, capsys):
    """Every cell was started and failed alike, each report line advising --device, a flag sweep lacks.
    A dry run still lists the cells (a login node without a GPU, for a GPU cluster)."""
    grid = ["sweep", "--method", "vi", "--set", "train.device=cuda", *TINY]
    assert run([*grid, "--out", str(tmp_path / "a")]) == 2
    assert ("error: train.device=cuda was requested but no CUDA device is available; use --set train.device=cpu"
            in capsys.readouterr().err)
    assert not (tmp_path / "a").exists()
    assert run([*grid, "--out", str(tmp_path / "b"), "--dry-run"]) == 0
    assert (tmp_path / "b" / "commands.txt").is_file()


def test_more_threads_than_cores_are_recorded_as_the_cells_run_them(tmp_path: Path, monkeypatch, capsys):
    """torch runs no more threads than the cores a process may use: --threads 8 on 2 cores ran 2 while
    the banner and sweep.json said 8 (and a later --resume would not compare like with like)."""
    import ssvi_cli.sweep.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run_cells", lambda _dir, _cells, jobs, threads, *_: calls.append((jobs, threads)) or Outcome())
    monkeypatch.setattr("ssvi_cli.training.cpus.usable_cpus", lambda *a: 2)
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--threads", "8", "--out", str(out), "--no-figures"]) == 0
    assert calls == [(1, 2)]
    assert "note: --threads 8 is more than the 2 cores this process may use; each cell runs 2" in capsys.readouterr().err
    assert json.loads((out / "sweep.json").read_text())["ran_with"] == {"jobs": 1, "threads": 2, "figures": False}


@pytest.mark.parametrize("mode", ["--resume", "--report", "--run-cell"])
def test_force_beside_a_mode_that_replaces_nothing_says_so(tmp_path: Path, capsys, mode):
    """It was told "--resume takes no grid options (to grow the sweep: the whole grid with --out ...)":
    --force is no grid option, and growing was beside the point."""
    assert run(["sweep", mode, str(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"error: {mode} replaces nothing: leave out --force" in err and "grid options" not in err


def test_the_help_gives_the_grids_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one option per line
    assert run(["sweep", "--help"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    spec = SweepSpec()
    assert "ignore --sparsity; default: the preset's)" in said and "0.8,0.9,0.95,0.98 (default: the preset's)" in said
    assert f"(default {len(spec.seeds)}: seed 0)" in said


def test_resume_keeps_no_figures_as_it_keeps_jobs(tmp_path: Path, monkeypatch):
    """A sweep started with --no-figures wrote the figures when --resume went on without the flag."""
    import ssvi_cli.sweep.report as report
    import ssvi_cli.sweep.runner as runner
    from ssvi_cli.sweep.runner import Outcome

    said = []
    monkeypatch.setattr(runner, "run_cells", lambda *a, **k: Outcome())
    write = report.write_report
    monkeypatch.setattr(report, "write_report", lambda d, figures, *a, **k: said.append(figures) or write(d, False, *a, **k))
    out = str(tmp_path / "sw")
    assert run(["sweep", "--sparsity", "0.9", "--set", "train.epochs=1", "--out", out, "--no-figures"]) == 0
    assert run(["sweep", "--resume", out]) == 0
    assert run(["sweep", "--resume", out, "--figures"]) == 0  # given: it holds, and is kept in turn
    assert run(["sweep", "--resume", out]) == 0
    assert run(["sweep", "--resume", out, "--no-figures"]) == 0
    assert run(["sweep", "--report", out]) == 0  # --report and the grid run again keep it too
    assert run(["sweep", "--sparsity", "0.9", "--set", "train.epochs=1", "--out", out]) == 0
    assert run(["sweep", "--sparsity", "0.9", "--set", "train.epochs=1", "--out", str(tmp_path / "new")]) == 0
    assert said == [False, False, True, True, False, False, False, True]


def test_a_flag_of_train_given_to_sweep_is_told_its_set(capsys, tmp_path: Path):
    """sweep --epochs 1 said "No such option: --epochs (Possible options: --report)"."""
    for flag, words in (("--epochs", "ssvi sweep takes no --epochs: --set train.epochs=VALUE gives every cell that value"),
                        ("--data-dir", "--set data.data_dir=VALUE"), ("--lr", "--set optim.lr=VALUE"),
                        ("--seed", "ssvi sweep takes no --seed: --seeds N runs seeds 0 to N-1")):
        assert run(["sweep", "--dry-run", flag, "1", "--out", str(tmp_path / "sw")]) == 2
        said = capsys.readouterr().err
        assert said.startswith(f"error: {words}") or words in said, said
        assert len(said.strip().splitlines()) == 1
    assert run(["sweep", "--dry-run", "--bogus", "1"]) == 2  # no key of that name: Click's own refusal
    assert "No such option: --bogus" in capsys.readouterr().err
    assert run(["sweep", "--dry-run", "--widths", "64"]) == 2  # a list-valued key sweeps from bracketed lists
    assert "(--set model.widths=[A],[B] sweeps it)" in capsys.readouterr().err
    assert run(["sweep", "--dry-run", "--sparsity"]) == 2  # its own flag without a value: Click's word, not a hint
    said = capsys.readouterr().err
    assert "requires an argument" in said and "takes no" not in said
    assert not (tmp_path / "sw").exists()


def test_grid_command_gives_flags_that_read_back_to_the_same_grid(tmp_path: Path):
    """The refusal of a sweep whose preset changed advises the whole grid as one command (only the
    --set that goes on was named, and a user who gave the other flags again but not an earlier
    --set went in a circle); a grid that flags cannot say gets None, not a wrong command."""
    from ssvi_cli.sweep.request import grid_command, spec_from_flags

    preset = tmp_path / "my preset.yaml"
    preset.write_text("model: {name: mlp}\n")
    spec = spec_from_flags(None, str(preset), "ssvi,vi", "0.9,0.95", 3, "snr_abs,mean",
                           ["model.widths=[16],[32,32]", "optim.lr=0.005", "data.classes=0,1,2"], ["heldout"], 4)
    command = grid_command(spec, tmp_path / "sw")
    assert command[:2] == ["ssvi", "sweep"] and command[-2:] == ["--out", str(tmp_path / "sw")]
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--preset"] == str(preset.resolve()) and flags["--seeds"] == "3" and flags["--samples"] == "4"
    sets = [v for k, v in zip(command[2::2], command[3::2]) if k == "--set"]
    back = spec_from_flags(None, flags["--preset"], flags["--method"], flags["--sparsity"], int(flags["--seeds"]),
                           None, sets, [flags["--ood"]], int(flags["--samples"]))
    assert back == spec and "sparse.criterion=snr_abs,mean" in sets and "data.classes=[0,1,2]" in sets
    assert grid_command(SweepSpec(), tmp_path) == ["ssvi", "sweep", "--method", "ssvi", "--sparsity", "0.95", "--out",
                                                   str(tmp_path)]
    assert grid_command(SweepSpec(seeds=(3,)), tmp_path) is None  # a sweep file's seed list: no --seeds says it


def test_a_sweep_without_method_or_sparsity_takes_the_presets(tmp_path: Path):
    """They were ssvi at 0.95 whatever the preset said: 'ssvi sweep --preset cifar10_resnet18' ran at
    0.95 where 'ssvi train --preset cifar10_resnet18' trains at 0.9, and a file's method was dropped."""
    from ssvi_cli.sweep.request import spec_from_flags

    mine = tmp_path / "mine.yaml"
    mine.write_text("sparse: {method: static, sparsity: 0.8}\n")
    for preset, methods, sparsities in (("cifar10_resnet18", ("ssvi",), (0.9,)), ("digits_mlp", ("ssvi",), (0.95,)),
                                        (str(mine), ("static",), (0.8,))):
        spec = spec_from_flags(None, preset, None, None, None, None, [], [], None)
        assert (spec.methods, spec.sparsities) == (methods, sparsities)
    spec = spec_from_flags(None, str(mine), "rigl", None, None, None, [], [], None)  # a flag still wins
    assert (spec.methods, spec.sparsities) == (("rigl",), (0.8,))
    own = tmp_path / "own.yaml"  # the preset's method's own value in its methods: section, as train takes it
    own.write_text("sparse: {sparsity: 0.8}\nmethods: {ssvi: {sparse: {sparsity: 0.7}}}\n")
    assert spec_from_flags(None, str(own), None, None, None, None, [], [], None).sparsities == (0.7,)
    sweep_file = tmp_path / "sw.yaml"
    sweep_file.write_text(f"preset: {mine}\nsparsities: [0.5, 0.6]\n")
    spec = spec_from_flags(sweep_file, None, None, None, None, None, [], [], None)
    assert (spec.methods, spec.sparsities) == (("static",), (0.5, 0.6))


def _photo_sweep(tmp_path: Path, tiny: list[str]) -> tuple[Path, Path, list[str]]:
    """A flat folder of 12 grey 8x8 images in two classes, the sweep's folder and a dense VI grid over it."""
    photos = tmp_path / "photos"
    for label in ("a", "b"):
        (photos / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 30 * i + 100 * (label == "b"), np.uint8)).save(photos / label / f"{i}.png")
    out = tmp_path / "s"
    return photos, out, ["sweep", "--method", "vi", "--set", f"data.name=imagefolder:{photos}", "--set",
                         "data.image_size=8", "--set", "data.channels=1", "--set", "train.epochs=1", *tiny, "--out",
                         str(out), "--no-figures"]


def test_an_image_folder_changed_under_a_sweep_stops_it_until_restored(tmp_path: Path, capsys):
    """Images added to the folder a sweep trains on went unsaid: its finished cells were skipped as done, and
    a grown sweep's new seed trained on the other images and was averaged with them (the image-folder sweep
    review). The sweep records each folder's image list as its cells train on it and names every cell that
    trained on another."""
    photos, out, grid = _photo_sweep(tmp_path, TINY)
    assert run([*grid, "--seeds", "1"]) == 0, capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(photos / "a" / "new.png")
    capsys.readouterr()
    for args in (["sweep", "--resume", str(out)], [*grid, "--seeds", "2"], ["sweep", "--run-cell", str(out / "cells" / "vi_seed0")]):
        assert run(args) == 2, args
        said = capsys.readouterr().err
        assert f"{out / 'cells' / 'vi_seed0'}: its image folder {photos} has changed since the sweep's cells trained on " \
               "it (its images differ: added, removed, or of another size)" in said and "or an image folder changed " \
               "since, which restoring it undoes" in " ".join(said.split())
    assert not (out / "cells" / "vi_seed1").exists()  # nothing trained on the other images
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 0
    assert "its image folder" in json.loads((out / "report.json").read_text())["changed_cells"]["vi_seed0"]
    (photos / "a" / "new.png").unlink()  # restored: the sweep goes on, and grows
    assert run([*grid, "--seeds", "2"]) == 0, capsys.readouterr().err
    assert (out / "cells" / "vi_seed1" / "evaluation.json").is_file()
    # A cell in its first epoch (its run held by another process, no checkpoint yet) keeps the record as it
    # is: a cell started beside it on a changed folder is named, not the record moved (the review of this
    # change: the second --run-cell recorded the new images, and both were averaged).
    from ssvi_cli.locks import acquire_lock
    from ssvi_cli.sweep.drift import record_folders, recorded_folders
    from ssvi_cli.sweep.grid import read_spec

    before = recorded_folders(out)
    shutil.rmtree(out / "cells" / "vi_seed1")
    (out / "cells" / "vi_seed1").mkdir()
    shutil.copy(out / "cells" / "vi_seed0" / "config.yaml", out / "cells" / "vi_seed1" / "config.yaml")
    shutil.rmtree(out / "cells" / "vi_seed0")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(photos / "a" / "new.png")
    with acquire_lock(out / "cells" / "vi_seed1" / ".lock", "the run's lock"):  # training, elsewhere
        record_folders(out, *read_spec(out))
    assert recorded_folders(out) == before
    record_folders(out, *read_spec(out))  # stopped in its first epoch: it starts again on the folder as it is
    assert recorded_folders(out) != before


def test_a_sweep_whose_cells_decoded_jpegs_whole_is_not_grown_with_cells_that_would_not(tmp_path: Path, capsys):
    """A sweep on an image folder from an ssvi that decoded large JPEGs whole, grown by this one with a
    seed, pooled the old cell (resumed and reported as it decoded) with a new one decoded at a reduced
    scale, without a word (the upgrade review). A finished cell's model file and a stopped one's
    checkpoint tell; a sweep with no cell left to begin goes on."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    photos, out, grid = _photo_sweep(tmp_path, TINY)
    assert run([*grid, "--seeds", "1"]) == 0, capsys.readouterr().err
    cell = out / "cells" / "vi_seed0"

    def as_older_ssvi_left_it() -> None:  # no reduced_jpeg in its file and checkpoints
        model = cell / "model.safetensors"
        with safe_open(str(model), "pt") as fh:
            meta = dict(fh.metadata())
        spec = json.loads(meta["data_spec"])
        assert spec.pop("reduced_jpeg") is True
        save_file(load_file(str(model)), str(model), metadata={**meta, "data_spec": json.dumps(spec)})
        for path in (cell / "checkpoints").iterdir():
            data = torch.load(path, weights_only=True)
            data["data_spec"].pop("reduced_jpeg", None)
            torch.save(data, path)

    as_older_ssvi_left_it()
    capsys.readouterr()
    for args in ([*grid, "--seeds", "2"], [*grid, "--seeds", "2", "--dry-run"]):
        assert run(args) == 2, args
        said = " ".join(capsys.readouterr().err.split())
        assert (f"vi_seed0 decoded the large JPEGs of {photos} whole (trained by an ssvi from before reduced-scale "
                "decoding), where vi_seed1, not begun, would decode them at a reduced scale, and the report would pool "
                f"the two; report the sweep as it is, ssvi sweep --report {out}, or delete the older") in said, said
    assert not (out / "cells" / "vi_seed1" / "checkpoints").exists()
    assert run(["sweep", "--resume", str(out)]) == 0  # the grid it has: every cell begun, nothing pooled
    (cell / "model.safetensors").unlink()  # stopped at its checkpoint: the checkpoint tells
    (cell / "summary.json").unlink()
    (cell / "evaluation.json").unlink(missing_ok=True)
    capsys.readouterr()
    assert run([*grid, "--seeds", "2"]) == 2
    assert "vi_seed0 decoded the large JPEGs" in capsys.readouterr().err
    shutil.rmtree(cell)  # deleted, as the message says: every cell trains alike
    assert run([*grid, "--seeds", "2"]) == 0, capsys.readouterr().err


def test_an_image_folder_changed_under_a_sweep_from_before_they_were_recorded_is_named(tmp_path: Path, capsys):
    """A sweep from an ssvi that recorded no image folders took the folder as its first run of this one
    found it: images added before then went unsaid and a grown seed was averaged with the old ones (the
    upgrade review). The cells' summaries count the images they trained on: compared with the folder's."""
    assert TINY[2:4] == ["--set", "data.max_train=300"]
    photos, out, grid = _photo_sweep(tmp_path, TINY[:2] + TINY[4:])  # every training image: a capped count says nothing
    assert run([*grid, "--seeds", "1"]) == 0, capsys.readouterr().err

    def as_older_ssvi_left_it() -> None:
        sweep = json.loads((out / "sweep.json").read_text())
        assert sweep.pop("image_folders")
        (out / "sweep.json").write_text(json.dumps(sweep))

    as_older_ssvi_left_it()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(photos / "a" / "new.png")
    capsys.readouterr()
    assert run([*grid, "--seeds", "2"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"its image folder {photos} holds 13 images now, 12 when the cell trained on it (a sweep from an earlier " \
           "ssvi, which recorded no image folders to compare)" in said, said
    assert not (out / "cells" / "vi_seed1").exists() and "image_folders" not in json.loads((out / "sweep.json").read_text())
    (photos / "a" / "new.png").unlink()  # restored: the sweep goes on, and records the folder from now on
    assert run([*grid, "--seeds", "2"]) == 0, capsys.readouterr().err
    assert (out / "cells" / "vi_seed1" / "evaluation.json").is_file()
    assert list(json.loads((out / "sweep.json").read_text())["image_folders"]) == [f"imagefolder:{photos}"]
    # A cell of some classes (data.classes) trained on fewer images than the folder holds: not compared
    from dataclasses import replace

    from ssvi_cli.sweep.drift import _unrecorded_change
    from ssvi_cli.sweep.grid import cell_configs, read_spec

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(photos / "a" / "new.png")
    cell, cfg = next(cell_configs(*read_spec(out)))
    assert _unrecorded_change(out / "cells" / cell.name, cfg, {}) is not None
    some = replace(cfg, data=replace(cfg.data, classes=("a",)))
    assert _unrecorded_change(out / "cells" / cell.name, some, {}) is None


def test_a_cell_log_made_a_link_is_refused_not_appended_through(tmp_path: Path, capsys):
    """A cell's log planted as a link had the cell's output appended to the file it named."""
    out, outside = tmp_path / "sw", tmp_path / "outside.log"
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--seeds", "1", "--set", "train.epochs=1",
                "--out", str(out), "--dry-run"]) == 0
    (out / "logs").mkdir(exist_ok=True)
    outside.write_text("theirs\n")
    (out / "logs" / "ssvi_s0.9_seed0.log").symlink_to(outside)
    capsys.readouterr()
    assert run(["sweep", "--resume", str(out)]) == 2
    said = capsys.readouterr().err
    assert f"{out / 'logs' / 'ssvi_s0.9_seed0.log'} is a symbolic link, which ssvi does not follow here" in said
    assert outside.read_text() == "theirs\n" and not (out / "cells" / "ssvi_s0.9_seed0" / "model.safetensors").exists()


def test_a_sweep_files_missing_preset_is_named_with_the_file_and_found_beside_it(tmp_path: Path, monkeypatch):
    """It was load_preset's message alone, which names neither the sweep file nor a preset lying beside
    it (a relative path is read from the folder ssvi runs in, not the file's)."""
    from ssvi_cli.sweep.request import spec_from_flags

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    sweep_file = Path("sub") / "sw.yaml"
    sweep_file.write_text("preset: mine.yaml\nmethods: [ssvi]\n")
    with pytest.raises(SweepError) as gone:
        spec_from_flags(sweep_file, None, None, None, None, None, [], [], None)
    assert str(gone.value).startswith(f"--file {sweep_file}: preset file mine.yaml does not exist in {tmp_path}")
    assert "beside the sweep file" not in str(gone.value)
    (tmp_path / "sub" / "mine.yaml").write_text("sparse: {sparsity: 0.8}\n")
    with pytest.raises(SweepError, match=r"it is beside the sweep file: write preset: sub/mine\.yaml$"):
        spec_from_flags(sweep_file, None, None, None, None, None, [], [], None)
    sweep_file.write_text("preset: sub/mine.yaml\n")  # as the hint says: found
    assert spec_from_flags(sweep_file, None, None, None, None, None, [], [], None).sparsities == (0.8,)
    sweep_file.write_text("preset: digits_mlp\n")  # a shipped preset's name is no path
    assert spec_from_flags(sweep_file, None, None, None, None, None, [], [], None).sparsities == (0.95,)
    sweep_file.write_text("preset: mine.yaml\n")  # --preset replaces the file's: no word of the file's
    assert spec_from_flags(sweep_file, "digits_mlp", None, None, None, None, [], [], None).sparsities == (0.95,)
