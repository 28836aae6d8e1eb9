"""--init-from a trained ssvi model (a run directory or a model file): the new run starts from its
supports, means and sigma, with the config it was trained with unless --preset is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ssvi_cli.cli import run
from ssvi_cli.cli.train import summary_rows as run_summary_rows
from ssvi_cli.core.layers import sparse_layers

SMALL = ["--epochs", "1", "--sparsity", "0.9", "--set", "model.widths=32,16", "--set", "data.max_train=256",
         "--set", "train.eval_samples=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source") / "run"
    assert run(["train", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained_rigl(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source") / "rigl"
    assert run(["train", *SMALL, "--method", "rigl", "--out", str(out)]) == 0
    return out


def _start(source: Path, tmp_path: Path, **flags):
    """The model a new run from ``source`` starts with, before its first step."""
    from ssvi_cli.cli.train_config import build_config
    from ssvi_cli.training.plan import RunPlan
    from ssvi_cli.training.trainer import Trainer

    cfg = build_config(None, {"model.init_from": str(source), **flags}, [])
    return Trainer.from_plan(RunPlan.new(cfg, tmp_path / "new")).model


def _layers(model) -> dict:
    return dict(sparse_layers(model))


@pytest.mark.parametrize("as_file", [False, True], ids=["run-directory", "model-file"])
def test_a_new_run_starts_from_the_trained_supports_means_sigma_and_biases(trained, tmp_path, as_file):
    from ssvi_cli.runs.load import load_model

    source = trained / "model.safetensors" if as_file else trained
    old = load_model(trained).model
    new = _start(source, tmp_path, **{"train.seed": 5})
    for name, layer in _layers(new).items():
        had = _layers(old)[name]
        assert torch.equal(layer.idx, had.idx), name
        assert torch.equal(layer.mu.detach(), had.mu.detach()), name
        torch.testing.assert_close(layer.sigma().detach(), had.sigma().detach(), rtol=1e-6, atol=0)
    old_state, new_state = old.state_dict(), new.state_dict()
    for key in ("first.bias", "hidden.0.bias", "hidden.1.bias"):
        assert torch.equal(old_state[key], new_state[key]), key


def test_train_from_a_run_takes_its_config_and_says_so(trained, tmp_path, capsys):
    out = tmp_path / "more"
    assert run(["train", "--init-from", str(trained), "--epochs", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    notes = " ".join(summary["notes"])
    assert f"starting from the trained model {trained / 'model.safetensors'} (ssvi at sparsity 0.9, 1 epoch)" in notes
    assert "a new schedule of 2 epochs and a fresh optimizer" in notes
    assert f"the run has the config {trained / 'model.safetensors'} was trained with" in notes
    new = yaml.safe_load((out / "config.yaml").read_text())
    old = yaml.safe_load((trained / "config.yaml").read_text())
    assert new["model"]["widths"] == [32, 16] and new["sparse"]["sparsity"] == 0.9
    assert new["model"]["init_from"] == str((trained / "model.safetensors").resolve())  # the file read
    assert new["train"]["epochs"] == 2
    assert {k: v for k, v in new["data"].items()} == old["data"]
    assert summary["epochs"] == 2 and summary["init_from"] == new["model"]["init_from"]
    assert run(["train", *SMALL, "--out", str(tmp_path / "fresh"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["init_from"] is None
    assert "; this run only)" in run_summary_rows(summary)["training FLOPs"]


def test_a_preset_replaces_the_trained_models_config(trained, tmp_path):
    from ssvi_cli.cli.train_config import build_config

    cfg = build_config("digits_mlp", {"model.init_from": str(trained)}, [])
    assert list(cfg.model.widths) != [32, 16]  # the preset's own, not the model's


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "0.95"], "keeps 154 weights of layer 'first', this run plans 77: the model was trained with "
                             "sparse.sparsity=0.9, this run has sparse.sparsity=0.95"),
    (["--method", "vi"], "the model was trained with sparse.method=ssvi, this run has sparse.method=vi"),
    (["--set", "sparse.allocation=uniform"], "trained with sparse.allocation=erk, this run has sparse.allocation=uniform"),
    (["--model", "resnet18"], "holds architecture mlp; this run builds resnet18 (--model mlp; without --preset"),
    (["--set", "model.widths=32,8"], "holds an MLP of widths [32, 16]; this run's are [32, 8] (--set model.widths=32,16)"),
    (["--set", "data.classes=0,1,2"], "has 10 classes; this run's data (digits) have 3"),
    (["--set", "data.classes=1,0,2,3,4,5,6,7,8,9"], "predicts the classes [0, 1, 2, 3, 4, 5, ...]; this run's data "
                                                    "(digits) have [1, 0, 2, 3, 4, 5, ...]: class 0 is '0' there and '1' here"),
])
def test_a_run_that_does_not_fit_the_trained_model_is_refused_in_one_line(trained, tmp_path, capsys, flags, message):
    out = tmp_path / "no"
    assert run(["train", "--init-from", str(trained), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_training_checkpoint_or_a_run_without_its_model_file_starts_from_the_checkpoint(trained, tmp_path):
    import shutil

    from ssvi_cli.runs.load import load_model
    from ssvi_cli.training.init_posterior import names_trained_model

    checkpoint = sorted((trained / "checkpoints").glob("*.pt"))[-1]
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    assert names_trained_model(str(checkpoint)) and not names_trained_model(str(tmp_path / "plain.pt"))
    cut = tmp_path / "cut"
    shutil.copytree(trained, cut)
    (cut / "model.safetensors").unlink()
    old = _layers(load_model(checkpoint).model)
    for source in (checkpoint, cut):
        new = _start(source, tmp_path / source.name)
        assert all(torch.equal(layer.mu.detach(), old[name].mu.detach()) for name, layer in _layers(new).items())


def test_a_dense_file_starts_from_its_own_support(trained, tmp_path):
    assert run(["export", str(trained), "--dense", "-o", str(tmp_path / "dense.safetensors")]) == 0
    compact = _layers(_start(trained, tmp_path / "a"))
    for name, layer in _layers(_start(tmp_path / "dense.safetensors", tmp_path / "b")).items():
        assert torch.equal(layer.idx, compact[name].idx) and torch.equal(layer.mu.detach(), compact[name].mu.detach())


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_new_run_may_not_be_the_folder_of_the_model_it_starts_from(trained, tmp_path, capsys, nproc):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(trained, source)
    before = sorted(p.name for p in source.rglob("*"))
    argv = ["train", "--init-from", str(source), "--out", str(source), "--force", "--nproc", str(nproc)]
    assert run(argv) == 2
    assert f"--out {source} holds the trained model --init-from starts from" in capsys.readouterr().err
    assert sorted(p.name for p in source.rglob("*")) == before


def test_a_conv_model_with_batch_norm_and_another_sigma_parameterisation(tmp_path):
    from ssvi_cli.runs.load import load_model

    source = tmp_path / "resnet"
    assert run(["train", "--model", "resnet18", "--epochs", "1", "--sparsity", "0.9", "--set", "data.max_train=64",
                "--set", "train.eval_samples=1", "--set", "model.widths=16,16", "--out", str(source)]) == 0
    old = load_model(source).model
    # model.widths: the MLP's alone, not compared for a resnet18
    new = _start(source, tmp_path, **{"bayes.sigma_param": "exp", "model.widths": "512,512"})
    for name, layer in _layers(new).items():
        had = _layers(old)[name]
        assert layer.sigma_param == "exp" and had.sigma_param == "softplus"
        assert torch.equal(layer.mu.detach(), had.mu.detach())
        torch.testing.assert_close(layer.sigma().detach(), had.sigma().detach(), rtol=1e-5, atol=0)
    norms = [k for k in old.state_dict() if k.endswith("running_var")]
    assert norms and all(torch.equal(old.state_dict()[k], new.state_dict()[k]) for k in norms)


def test_notes_for_a_new_seed_and_another_global_batch(trained, tmp_path, capsys):
    out = tmp_path / "notes"
    assert run(["train", "--init-from", str(trained), "--seed", "3", "--batch-size", "32", "--epochs", "1",
                "--out", str(out), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert "the learning rates (cosine from lr 0.01), the KL warm-up and the subspace schedule start again" in notes[1]
    assert notes[2].startswith("the validation split is carved otherwise than the model's (seed 3, val_fraction 0.1; "
                               "the model's: 0, 0.1)")
    assert notes[3] == "the model trained with a global batch of 64, this run with 32 (--batch-size, per process)"


def test_an_image_folders_own_settings_stay_behind_for_other_data(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    from ssvi_cli.cli.train_config import build_config

    bunch = load_digits()
    for digit in range(10):
        (tmp_path / "folder" / str(digit)).mkdir(parents=True)
        for j, i in enumerate([i for i, t in enumerate(bunch.target) if t == digit][:6]):
            Image.fromarray((bunch.images[i] * 255 / 16).astype("uint8")).save(tmp_path / "folder" / str(digit) / f"{j}.png")
    source = tmp_path / "gray"
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'folder'}", "--set", "data.image_size=8", "--set",
                "data.channels=1", "--set", "data.test_fraction=0.2", *SMALL, "--out", str(source)]) == 0
    cfg = build_config(None, {"model.init_from": str(source), "data.name": "digits"}, [])
    assert cfg.data.name == "digits" and cfg.data.image_size == 32 and cfg.data.channels == 3
    same = build_config(None, {"model.init_from": str(source)}, [])
    assert same.data.image_size == 8 and same.data.channels == 1


def test_a_folder_read_at_another_size_is_told_the_models(trained, tmp_path, capsys):
    from PIL import Image

    for digit in range(10):
        (tmp_path / "folder" / str(digit)).mkdir(parents=True)
        for j in range(3):
            Image.new("L", (20, 20), 40 * j + digit).save(tmp_path / "folder" / str(digit) / f"{j}.png")
    assert run(["train", "--init-from", str(trained), "--data", f"imagefolder:{tmp_path / 'folder'}",
                "--out", str(tmp_path / "new")]) == 2
    assert ("this run's data (imagefolder:" in (err := capsys.readouterr().err) and "are [3, 32, 32] (--set "
            "data.channels=1 --set data.image_size=8 reads the folder so)" in err), err


def test_a_deterministic_model_starts_a_bayesian_runs_means_and_the_configured_sigma(trained_rigl, tmp_path):
    from ssvi_cli.runs.load import load_model

    old = _layers(load_model(trained_rigl).model)
    sigma_init = 4e-3  # neither the preset's 1e-3 nor the schema's 6e-4: the run's own value, give or take its spread
    new = _start(trained_rigl, tmp_path, **{"sparse.method": "ssvi", "bayes.sigma_init_mean": sigma_init})
    for name, layer in _layers(new).items():
        assert not old[name].bayesian and layer.bayesian
        assert torch.equal(layer.idx, old[name].idx) and torch.equal(layer.mu.detach(), old[name].mu.detach())
        assert layer.sigma().numel() == layer.active and float(layer.sigma().detach().mean()) == pytest.approx(sigma_init, rel=0.05)


def test_a_bayesian_model_starts_a_deterministic_run_without_its_sigma(trained, tmp_path):
    new = _start(trained, tmp_path, **{"sparse.method": "rigl"})
    assert all(not layer.bayesian and layer.rho is None for layer in _layers(new).values())


def test_only_ssvi_model_files_and_folders_count_as_trained_models(trained, tmp_path):
    from safetensors.torch import save_file

    from ssvi_cli.training.init_posterior import names_trained_model

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert names_trained_model(str(trained)) and names_trained_model(str(trained / "model.safetensors"))
    assert not names_trained_model(str(plain)) and not names_trained_model(str(tmp_path / "junk.safetensors"))
    assert not names_trained_model("torchvision:DEFAULT") and not names_trained_model(str(tmp_path / "absent"))


def test_nproc_checks_the_trained_model_before_its_processes_start(trained):
    from ssvi_cli.cli.train_config import build_config
    from ssvi_cli.config import ConfigError
    from ssvi_cli.training.plan import preflight

    read = preflight(build_config(None, {"model.init_from": str(trained)}, []), world_size=2)
    assert read == str((trained / "model.safetensors").resolve())  # what every process then reads
    with pytest.raises(ConfigError, match="keeps 154 weights of layer 'first', this run plans 77"):
        preflight(build_config(None, {"model.init_from": str(trained), "sparse.sparsity": 0.95}, []), world_size=2)


def test_a_missing_source_is_named_as_such(tmp_path, capsys):
    assert run(["train", "--init-from", str(tmp_path / "nothere"), "--out", str(tmp_path / "no")]) == 2
    assert f"--init-from {tmp_path / 'nothere'}: no such file or run directory" in capsys.readouterr().err


def test_resume_with_other_settings_points_to_a_new_run_from_the_old_one(trained, capsys):
    assert run(["train", "--resume", str(trained), "--epochs", "3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"drop --epochs (a new run from it takes other settings: ssvi train --init-from {trained} --out NEW ...)" in err


def test_a_sweep_whose_cells_cannot_all_start_from_the_model_is_refused_before_any_trains(trained, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--method", "ssvi,vi", "--sparsity", "0.9", "--seeds", "1", "--set", "train.epochs=1",
            "--set", f"model.init_from={trained}", "--set", "model.widths=32,16", "--out", str(out)]
    assert run(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the model was trained with sparse.method=ssvi, this run has sparse.method=vi" in err, err
    assert not (out / "cells").exists() or not any((out / "cells").iterdir())


def test_the_processes_read_the_file_the_launcher_checked():
    from ssvi_cli.cli.train_config import pin_init_from

    argv = ["--init-from", "runs/A", "--epochs", "3", "--set", "optim.lr=0.001"]
    assert pin_init_from(argv, "/x/A/checkpoints/c.pt") == ["--init-from", "/x/A/checkpoints/c.pt", "--epochs", "3",
                                                           "--set", "optim.lr=0.001"]
    assert pin_init_from(["--set", "model.init_from=runs/A"], "/x/m.safetensors") == ["--set", "model.init_from=/x/m.safetensors"]
    assert pin_init_from(argv, None) == argv


def test_an_out_that_holds_a_finished_run_is_refused_before_any_note(trained, tmp_path, capsys):
    other = tmp_path / "other"
    assert run(["train", *SMALL, "--out", str(other)]) == 0
    capsys.readouterr()
    assert run(["train", "--init-from", str(trained), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "note:" not in err, err


def test_a_run_without_out_is_named_after_the_run_it_starts_from(trained, tmp_path, monkeypatch):
    """A run's model file is called model.safetensors: naming the new run 'from-model' said nothing."""
    import shutil

    from ssvi_cli.cli.train_config import build_config, default_run_dir

    monkeypatch.chdir(tmp_path)
    named = tmp_path / "20261206-101500-digits_mlp-ssvi-s0.9"  # the time a default name starts with is dropped
    shutil.copytree(trained, named)
    for source, expect in ((trained / "model.safetensors", "from-run-ssvi-s0.9"),
                           (named / "model.safetensors", "from-digits_mlp-ssvi-s0.9-ssvi-s0.9"),
                           (named, "from-digits_mlp-ssvi-s0.9-ssvi-s0.9")):
        cfg = build_config(None, {"model.init_from": str(source)}, [])
        assert default_run_dir(cfg, None).path.name.split("-", 2)[2] == expect, source
    shutil.copy(trained / "model.safetensors", tmp_path / "weights.v2.safetensors")
    cfg = build_config(None, {"model.init_from": str(tmp_path / "weights.v2.safetensors")}, [])
    assert default_run_dir(cfg, None).path.name.split("-", 2)[2] == "from-weights.v2-ssvi-s0.9"  # its dots kept
    assert default_run_dir(cfg, "presets/my.yaml").path.name.split("-", 2)[2] == "my-ssvi-s0.9"
    assert default_run_dir(cfg, "Mine.YAML").path.name.split("-", 2)[2] == "Mine-ssvi-s0.9"
    checkpoint = next((named / "checkpoints").iterdir())  # a run's checkpoint: named after the run too
    cfg = build_config(None, {"model.init_from": str(checkpoint)}, [])
    assert default_run_dir(cfg, None).path.name.split("-", 2)[2] == "from-digits_mlp-ssvi-s0.9-ssvi-s0.9"
