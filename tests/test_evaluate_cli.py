"""``ssvi evaluate`` end to end: tables, JSON, files, plots, torchvision OOD sets and errors."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from ssvi_cli.cli import run
from ssvi_cli.cli.evaluate import METRIC_LABELS
from tests.fixtures_torchvision import write_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A digits MLP trained by ``ssvi train --sparsity 0.95`` (a few epochs, to stay fast)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    code = run(["train", "--out", str(run_dir), "--sparsity", "0.95", "--epochs", "4",
                "--set", "train.eval_samples=2", "--json"])
    assert code == 0
    return run_dir / "model.safetensors"


def _evaluate(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(capsys, *args: str) -> dict:
    code, out, err = _evaluate(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)  # the whole of stdout is one document


def test_digits_model_prints_every_metric_with_s_and_ood(capsys, model_file):
    # S=10 instead of the default 30 keeps the test quick; the time of the default command is
    # measured by hand on an idle machine (README, docs/EVALUATE.md), not asserted on a shared one.
    code, out, err = _evaluate(capsys, str(model_file), "--ood", "noise", "--ood", "sklearn-photos", "--samples", "10")
    assert code == 0, err
    for label in METRIC_LABELS.values():
        assert label in out
    assert "digits test (n=360), mode mc, S=10, seed 0" in out
    assert "OOD detection vs digits test (OOD = positive), mode mc, S=10" in out
    for header in ("AUROC", "AUPR-in", "AUPR-out", "FPR@95%TPR"):
        assert header in out
    for name in ("noise", "sklearn-photos"):
        assert name in out
    assert "sparsity 0.95" in out


def test_json_is_the_only_stdout_and_output_file_matches(capsys, model_file, tmp_path):
    target = tmp_path / "metrics.json"
    doc = _json(capsys, str(model_file), "--ood", "noise", "--samples", "1,3", "--output", str(target))
    for key in ("model", "dataset", "split", "n", "mode", "samples", "seed", "metrics", "ood", "per_samples"):
        assert key in doc
    assert doc["model"] == str(model_file) and doc["dataset"] == "digits" and doc["split"] == "test"
    assert doc["mode"] == "mc" and doc["samples"] == 3 and doc["seed"] == 0 and doc["n"] == 360
    assert [row["samples"] for row in doc["per_samples"]] == [1, 3]
    assert doc["ood"]["noise"]["scores"]["entropy"]["auroc"] > 0.5
    assert json.loads(target.read_text()) == doc
    assert not list(target.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_same_model_same_seed_twice_gives_identical_numbers(capsys, model_file):
    args = (str(model_file), "--ood", "noise", "--samples", "2,5", "--seed", "7")
    first, second = _json(capsys, *args), _json(capsys, *args)
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_the_numbers_come_with_what_produced_them(capsys, model_file):
    """A CPU's numbers move in their last digits with torch's version, the processor and the thread
    count: the run's summary, its model file and each evaluation record them (the reproducibility review:
    none did)."""
    import platform

    import torch

    from ssvi_cli.machine import cpu_model

    made = {"torch": torch.__version__, "python": platform.python_version(), "device": cpu_model(),
            "threads": torch.get_num_threads()}
    doc = _json(capsys, str(model_file))
    summary = json.loads((model_file.parent / "summary.json").read_text())
    for record in (doc["provenance"], summary["provenance"]):
        assert {k: record[k] for k in made} == made and "ssvi" in record
    assert summary["seed"] == 0
    capsys.readouterr()
    code = run(["inspect", str(model_file)])
    out = capsys.readouterr().out
    assert code == 0 and f"torch {torch.__version__}, {cpu_model()}, {torch.get_num_threads()} thread" in out


def test_samples_table_and_val_split_from_a_run_directory(capsys, model_file):
    code, out, err = _evaluate(capsys, str(model_file.parent), "--split", "val", "--samples", "1,2")
    assert code == 0, err
    assert "Metrics vs Monte Carlo samples S" in out and "S=1" in out and "S=2" in out
    assert "digits val" in out


def test_defaults_are_the_test_split_and_30_monte_carlo_samples(capsys, model_file):
    doc = _json(capsys, str(model_file))
    assert (doc["split"], doc["mode"], doc["samples"], doc["seed"]) == ("test", "mc", 30, 0)
    assert doc["ood"] == {} and doc["model_info"]["trained_on"] == "digits"


def test_each_ood_set_is_capped_at_2000_items_or_at_ood_max_items(capsys, model_file):
    """A ViT at 224 pixels took half an hour on the 2000 noise images of an 18-image test split:
    --ood-max-items draws fewer (seeded), the default staying the evaluation's own."""
    from ssvi_cli.evaluation.inputs import OOD_MAX_ITEMS

    assert _json(capsys, str(model_file), "--samples", "1", "--ood", "noise")["ood"]["noise"]["n"] == OOD_MAX_ITEMS == 2000
    few = _json(capsys, str(model_file), "--samples", "1", "--ood", "noise", "--ood-max-items", "50")
    assert few["ood"]["noise"]["n"] == 50 and few["ood"]["noise"]["scores"]["entropy"]["auroc"] is not None


def test_mean_mode_records_no_samples(capsys, model_file):
    doc = _json(capsys, str(model_file), "--mode", "mean", "--ood", "noise")
    assert doc["mode"] == "mean" and doc["samples"] is None and doc["metrics"]["mi_mean"] is None


def test_reading_the_data_is_shown_while_it_lasts_and_counted_in_the_last_line(capsys, model_file, monkeypatch):
    """Reading 20,000 OOD images took 17 s with nothing on the screen, then 'evaluated in 4.9s' left those
    17 s out (the scale review): a status line (on a terminal; gone after it, so an error stays one line)
    is up while the data are read, and the last line names both times."""
    from contextlib import contextmanager

    import ssvi_cli.evaluation.inputs as inputs
    from ssvi_cli.cli import evaluate

    events, real = [], inputs.load_eval_data

    @contextmanager
    def status(text):
        events.append(f"up: {text}")
        yield
        events.append("down")

    monkeypatch.setattr(evaluate.err, "status", status)
    monkeypatch.setattr(evaluate.err, "_force_terminal", True)  # on a terminal only: none else shows it
    monkeypatch.setattr(inputs, "load_eval_data", lambda *a, **k: events.append("reading") or real(*a, **k))
    code, _, err = _evaluate(capsys, str(model_file), "--ood", "noise", "--samples", "2")
    assert code == 0 and events == ["up: reading digits test + OOD noise", "reading", "down"]
    assert re.search(r"^evaluated in \d+\.\ds, after \d+\.\ds reading the data$", err.strip().splitlines()[-1])


def test_the_first_line_names_the_mode_that_runs(capsys, model_file, tmp_path):
    # A deterministic model is evaluated as the mean network whatever --mode says; the line announcing
    # the evaluation says so, not "mc, S=30" followed by a table headed "mode mean".
    code, _, err = _evaluate(capsys, str(model_file), "--mode", "mean")
    assert code == 0 and "on digits test (mean network)" in err
    rigl = tmp_path / "rigl"
    assert run(["train", "--out", str(rigl), "--method", "rigl", "--sparsity", "0.95", "--epochs", "1", "--json"]) == 0
    code, out, err = _evaluate(capsys, str(rigl))
    assert code == 0, err
    assert "on digits test (mean network: the model is deterministic)" in err and "S=30" not in err
    assert "mode mean" in out


def test_torchvision_ood_sets_from_fixture_files_run_end_to_end(capsys, model_file, tmp_path, monkeypatch):
    root = write_all(tmp_path / "data", monkeypatch)
    sets = {"svhn": 20, "cifar10": 20, "cifar100": 100, "mnist": 20, "fashion-mnist": 20}
    args = [str(model_file), "--data-dir", str(root), "--samples", "2"]
    for name in sets:
        args += ["--ood", name]
    doc = _json(capsys, *args)
    assert list(doc["ood"]) == list(sets)
    for name, n in sets.items():
        assert doc["ood"][name]["n"] == n
        for values in doc["ood"][name]["scores"].values():
            assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values.values())


def test_the_data_is_named_as_train_names_it(capsys, model_file):
    """train --data, evaluate --dataset: 'evaluate M --data digits' was 'No such option'."""
    for flag in ("--data", "--dataset"):
        code, _, err = _evaluate(capsys, str(model_file), flag, "digits", "--samples", "1")
        assert code == 0, err


def test_plots_are_written_as_png(capsys, model_file, tmp_path):
    folder = tmp_path / "plots"
    code, _, err = _evaluate(capsys, str(model_file), "--ood", "noise", "--samples", "2", "--plots", str(folder))
    assert code == 0, err
    for name in ("reliability.png", "ood_scores.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not (folder / "samples.png").exists()  # one S: nothing to draw against S
    # Several S: the metrics against S drawn too, each OOD score where it exists (no MI at S = 1)
    code, _, err = _evaluate(capsys, str(model_file), "--ood", "noise", "--samples", "1,2", "--plots", str(folder))
    assert code == 0, err
    assert (folder / "samples.png").read_bytes().startswith(PNG_MAGIC)
    # The same folder again without --ood or several S: the old figures would show the earlier evaluation.
    code, _, err = _evaluate(capsys, str(model_file), "--samples", "2", "--plots", str(folder))
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["reliability.png"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_plots_folder_the_system_refuses_to_make_is_refused_before_the_evaluation(capsys, model_file, tmp_path):
    """os.access lets /proc/x through: the folder failed only when the figures were written, after the
    whole evaluation and its --output, with no table printed."""
    report = tmp_path / "report.json"
    code, out, err = _evaluate(capsys, str(model_file), "--plots", "/proc/ssvi-plots", "-o", str(report))
    assert (code, out, err) == (2, "", "error: --plots /proc/ssvi-plots cannot be made: No such file or directory\n")
    assert not report.exists()
    code, _, err = _evaluate(capsys, str(model_file), "--plots", str(tmp_path / "a" / "b"), "--dataset", "nope")
    assert code == 2 and not (tmp_path / "a").exists()  # tried and removed again: a failed command leaves none


def test_the_ood_histograms_name_their_axes(tmp_path):
    """The OOD panels had no axis labels: a mutual-information panel read 0-250,000 over x of 1e-5."""
    pytest.importorskip("matplotlib")
    import numpy as np

    from ssvi_cli.evaluation import plots

    drawn = []
    real_save = plots._save
    plots._save = lambda fig, path: drawn.append(fig) or path
    try:
        report = {"dataset": "digits", "split": "test", "n": 50, "mode": "mc", "samples": 2,
                  "ood": {"noise": {"scores": {"entropy": {"auroc": 0.9}, "mutual_information": {"auroc": 0.8}}}}}
        rng = np.random.default_rng(0)
        plots.ood_histograms(report, {"entropy": rng.random(50), "mutual_information": rng.random(50) * 1e-5},
                             {"noise": {"entropy": rng.random(50), "mutual_information": rng.random(50) * 1e-5}},
                             tmp_path / "ood.png")
    finally:
        plots._save = real_save
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in drawn[0].axes]
    assert labels == [("predictive entropy (nats)", "density (histogram area 1)"),
                      ("mutual information (nats)", "density (histogram area 1)")]


def test_the_samples_figure_draws_each_score_where_it_exists(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from ssvi_cli.evaluation import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    metrics = {"accuracy": 0.9, "nll": 0.3, "ece": 0.02}
    scores = lambda a: {"scores": {"entropy": {"auroc": 0.9}, **({"mutual_information": {"auroc": a}} if a else {})}}  # noqa: E731
    rows = [{"samples": s, "metrics": metrics, "ood": {"noise": scores(a), "photos": scores(a)}}
            for s, a in ((1, None), (5, 0.8), (30, 0.85))]
    report = {"dataset": "digits", "split": "val", "n": 10, "mode": "mc", "samples": 30, "n_bins": 15, "per_samples": rows}
    plots.samples_curves(report, tmp_path / "samples.png")
    axes = [ax for ax in drawn[0].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["val accuracy", "NLL (nats)", "ECE (top-label, 15 bins)",
                                               "OOD AUROC, noise", "OOD AUROC, photos"]
    assert axes[4].get_subplotspec().rowspan.start == 1  # rows of four panels, not one row ever wider
    lines = {line.get_label(): list(line.get_xdata()) for line in axes[3].get_lines()}
    assert lines == {"predictive entropy": [1, 5, 30], "mutual information": [5, 30]}
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1", "5", "30"]


def test_a_warning_is_in_the_json_notes_and_said_once_in_text(capsys, caplog, model_file, tmp_path):
    """A warning about an input went to stderr alone (a program saw no note); kept in the report's notes,
    it must not print a second time under the tables."""
    import numpy as np

    np.save(tmp_path / "square.npy", np.zeros((64, 64), dtype=np.float32))  # 64 rows of 64 values, or one picture?
    code, out, err = _evaluate(capsys, str(model_file), "--samples", "1", "--ood", str(tmp_path / "square.npy"), "--json")
    assert code == 0, err
    assert any("is read as 64 flattened inputs" in note for note in json.loads(out)["notes"])
    caplog.clear()
    code, out, err = _evaluate(capsys, str(model_file), "--samples", "1", "--ood", str(tmp_path / "square.npy"))
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # the warning: stderr's
    assert any("is read as 64 flattened inputs" in m for m in said) and "is read as 64 flattened inputs" not in out


def test_plots_without_matplotlib_name_the_extra(capsys, model_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, out, err = _evaluate(capsys, str(model_file), "--plots", str(tmp_path / "p"))
    assert code == 2 and out == ""
    assert "pip install 'matplotlib>=3.7'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, message", [
    (["--samples", "1,x"], "--samples expects positive integers"),
    (["--samples", "0"], "--samples expects positive integers"),
    (["--ood", "imagenet"], "unknown OOD set 'imagenet'; valid names are: cifar10, cifar100, fashion-mnist"),
    (["--dataset", "nope"], "unknown dataset 'nope'; valid names are: "),
    (["--dataset", "mnist"], "score it as out-of-distribution with --ood mnist"),
    (["--mode", "map"], "--mode 'map' is not valid; valid values are: mc, mean"),
    (["--split", "train"], "--split 'train' is not valid"),
    (["--mode", "mean", "--samples", "5"], "--samples applies to --mode mc"),
    # beyond torch's sizes these were "error (ValueError): Stop argument for islice() ...", exit 1
    (["--batch-size", "99999999999999999999"], "--batch-size must be in [1, 16,777,216], got 99999999999999999999"),
    (["--ood", "noise", "--ood-max-items", "99999999999999999999"], "--ood-max-items must be at most 2,147,483,647, got 99999999999999999999"),
])
def test_mistakes_give_one_line_errors(capsys, model_file, args, message):
    code, out, err = _evaluate(capsys, str(model_file), *args)
    assert code == 2 and out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_torchvision_data_offline_is_a_one_line_error(capsys, model_file, tmp_path):
    code, _, err = _evaluate(capsys, str(model_file), "--ood", "svhn", "--data-dir", str(tmp_path))
    assert code == 2
    assert "svhn not found" in err and "--download" in err and len(err.strip().splitlines()) == 1


def test_missing_model_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _evaluate(capsys, str(tmp_path / "absent.safetensors"))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_a_run_without_its_model_file_is_scored_from_a_checkpoint_and_says_so(capsys, model_file, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(model_file.parent, partial)
    (partial / "model.safetensors").unlink()  # as a run stopped before its end leaves it
    (partial / "summary.json").unlink()
    notes = _json(capsys, str(partial), "--samples", "2")["notes"]
    assert any("training checkpoint" in n and "had not finished" in n for n in notes), notes
    assert not any("checkpoint" in n for n in _json(capsys, str(model_file), "--samples", "2")["notes"])


def test_a_finished_run_whose_model_file_is_gone_is_not_called_unfinished(capsys, model_file, tmp_path):
    import shutil

    done = tmp_path / "done"
    shutil.copytree(model_file.parent, done)
    (done / "model.safetensors").unlink()  # the summary stays: the run reached its end
    notes = _json(capsys, str(done), "--samples", "2")["notes"]
    assert any("training checkpoint" in n and "finished but its model file" in n for n in notes), notes
    assert not any("had not finished" in n for n in notes), notes


def test_a_finished_run_scored_from_an_earlier_checkpoint_says_how_far_that_one_had_trained(capsys, model_file,
                                                                                           tmp_path):
    """Its model file gone and its last checkpoint cut: the note said the run finished, and nothing of
    the earlier checkpoint scored instead (a warning on stderr alone named it)."""
    import shutil

    done = tmp_path / "done"
    shutil.copytree(model_file.parent, done)
    (done / "model.safetensors").unlink()
    *earlier, last = sorted((done / "checkpoints").iterdir())
    last.write_bytes(last.read_bytes()[:1000])
    notes = [n for n in _json(capsys, str(done), "--samples", "2")["notes"] if "training checkpoint" in n]
    step = int(earlier[-1].stem.split("-")[-1])  # checkpoint-<step>.pt
    assert notes == [f"scored the training checkpoint {earlier[-1]}, taken after 3 of 4 epochs (step {step}): the "
                     f"run finished but its model file {done / 'model.safetensors'} is missing and its last "
                     f"checkpoint is missing or unreadable (ssvi train --resume {done} writes it again)"], notes


def test_evaluate_at_the_runs_sample_count_gives_the_numbers_train_printed(tmp_path, capsys):
    """One prediction pass for both: the same seed and batching, so `ssvi evaluate RUN --samples S`
    at S = train.eval_samples reproduces the summary's Monte Carlo test accuracy and NLL."""
    import json

    from ssvi_cli.cli import run

    # a loader worker reads the run's inputs (evaluate reads them itself): the draws are the same
    assert run(["train", "--set", "train.epochs=2", "--set", "model.widths=[32]", "--set", "train.eval_samples=4",
                "--set", "train.num_workers=1", "--out", str(tmp_path / "r"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert run(["evaluate", str(tmp_path / "r"), "--samples", "4", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["accuracy"] == summary["test_accuracy"]
    assert abs(metrics["nll"] - summary["test_nll"]) < 1e-6  # the file's sigma, from rho, to float32 rounding


def test_more_draws_than_the_memory_holds_are_refused_before_predicting(capsys, model_file, monkeypatch):
    """``--samples 100000`` kept every draw of every input and ran the machine out of memory (24 GB, the
    command and others killed); it is refused, naming the most samples that fit."""
    from ssvi_cli import machine
    from ssvi_cli.evaluation import evaluator

    need = evaluator.DRAW_BYTES * 10 * (360 + 2000)  # per sample: 10 classes of the test set and the noise set
    monkeypatch.setattr(machine, "available_memory", lambda: 30 * need + 1)
    code, out, err = _evaluate(capsys, str(model_file), "--samples", "5,31", "--ood", "noise", "--json")
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        f"error: --samples 31 keeps every draw's class probabilities of the 2,360 inputs, about "
        f"{31 * need / 2**30:.1f} GiB; this machine has {(30 * need + 1) / 2**30:.1f} GiB available: give --samples 30 "
        "or fewer, or fewer OOD inputs (--ood-max-items)"]
    assert _json(capsys, str(model_file), "--samples", "5,30", "--ood", "noise")["samples"] == 30
    code, _, err = _evaluate(capsys, str(model_file), "--samples", "31")  # 360 inputs: these fit
    assert code == 0, err
    monkeypatch.setattr(machine, "available_memory", lambda: need // 1000)
    code, _, err = _evaluate(capsys, str(model_file), "--samples", "2", "--json")
    assert code == 2 and "this machine has 0.0 GiB available: give --mode mean\n" in err
    assert _json(capsys, str(model_file), "--mode", "mean")["mode"] == "mean"  # no draws to keep
    monkeypatch.setattr(machine, "available_memory", lambda: None)  # not Linux: nothing is checked
    assert _json(capsys, str(model_file), "--samples", "31")["samples"] == 31


def test_one_draw_reports_no_mutual_information(capsys, model_file, tmp_path):
    """At S = 1 the mutual information is 0 whatever the model: it was shown as 0.0000 and scored OOD
    detection at AUROC 0.5, as if measured. None (a dash) at S = 1, in evaluate, infer and ssvi.predict."""
    import numpy as np
    import torch

    import ssvi_cli as ssvi

    report = _json(capsys, str(model_file), "--samples", "1,5", "--ood", "noise", "--ood-max-items", "50")
    one, five = report["per_samples"]
    assert one["metrics"]["mi_mean"] is None and five["metrics"]["mi_mean"] > 0
    assert "mutual_information" not in one["ood"]["noise"]["scores"]
    assert "mutual_information" in five["ood"]["noise"]["scores"]
    code, out, _ = _evaluate(capsys, str(model_file), "--samples", "1,5", "--ood", "noise", "--ood-max-items", "50")
    assert code == 0 and re.search(r"noise AUROC \(MI\)\s+-\s+0\.\d{4}", out), out
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.float32))
    assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--samples", "1", "--json"]) == 0
    assert [r["mutual_information"] for r in json.loads(capsys.readouterr().out)["predictions"]] == [None, None]
    model = ssvi.load(model_file)
    got = ssvi.predict(model, torch.zeros(2, 1, 8, 8), samples=1)
    assert got.mutual_information is None and got.samples == 1
    assert ssvi.predict(model, torch.zeros(2, 1, 8, 8), samples=2).mutual_information is not None
