"""--init-from a trained ssvi model (a run directory or a model file): the new run starts from its
supports, means and sigma, with the config it was trained with unless --preset is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ssvi_cli.cli import run
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
    assert f"starting from the trained model {trained} (ssvi at sparsity 0.9, 1 epoch)" in notes
    assert "a new schedule of 2 epochs and a fresh optimizer" in notes
    assert f"the run has the config {trained} was trained with" in notes
    new = yaml.safe_load((out / "config.yaml").read_text())
    old = yaml.safe_load((trained / "config.yaml").read_text())
    assert new["model"]["widths"] == [32, 16] and new["sparse"]["sparsity"] == 0.9
    assert new["model"]["init_from"] == str(trained.resolve())
    assert new["train"]["epochs"] == 2
    assert {k: v for k, v in new["data"].items()} == old["data"]
    assert summary["epochs"] == 2


def test_a_preset_replaces_the_trained_models_config(trained, tmp_path):
    from ssvi_cli.cli.train_config import build_config

    cfg = build_config("digits_mlp", {"model.init_from": str(trained)}, [])
    assert list(cfg.model.widths) != [32, 16]  # the preset's own, not the model's


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "0.95"], "keeps 154 weights of layer 'first', this run plans 77: the model was trained with "
                             "ssvi at sparsity 0.9 (allocation erk), this run is ssvi at sparsity 0.95"),
    (["--method", "vi"], "this run is vi (dense)"),
    (["--set", "model.widths=32,8"], "holds a mlp of widths [32, 16]; this run's are [32, 8] (--set model.widths=32,16)"),
    (["--set", "data.classes=0,1,2"], "has 10 classes; this run's data (digits) have 3"),
])
def test_a_run_that_does_not_fit_the_trained_model_is_refused_in_one_line(trained, tmp_path, capsys, flags, message):
    out = tmp_path / "no"
    assert run(["train", "--init-from", str(trained), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_training_checkpoint_is_refused_with_the_ways_that_work(trained, tmp_path, capsys):
    checkpoint = sorted((trained / "checkpoints").glob("*.pt"))[-1]
    assert run(["train", "--model", "torchvision:mobilenet_v3_small", "--init-from", str(checkpoint),
                "--out", str(tmp_path / "no")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"is an ssvi training checkpoint; --init-from takes a model file (ssvi export {checkpoint}" in err


def test_a_deterministic_model_starts_a_bayesian_runs_means_and_the_configured_sigma(trained_rigl, tmp_path):
    from ssvi_cli.runs.load import load_model

    old = _layers(load_model(trained_rigl).model)
    new = _start(trained_rigl, tmp_path, **{"sparse.method": "ssvi"})
    sigma_init = 1e-3  # the digits preset's bayes.sigma_init_mean, give or take its spread
    for name, layer in _layers(new).items():
        assert not old[name].bayesian and layer.bayesian
        assert torch.equal(layer.idx, old[name].idx) and torch.equal(layer.mu.detach(), old[name].mu.detach())
        assert layer.sigma().numel() == layer.active and float(layer.sigma().detach().mean()) == pytest.approx(sigma_init, rel=0.5)


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

    preflight(build_config(None, {"model.init_from": str(trained)}, []), world_size=2)
    with pytest.raises(ConfigError, match="keeps 154 weights of layer 'first', this run plans 77"):
        preflight(build_config(None, {"model.init_from": str(trained), "sparse.sparsity": 0.95}, []), world_size=2)


def test_a_missing_source_is_named_as_such(tmp_path, capsys):
    assert run(["train", "--init-from", str(tmp_path / "nothere"), "--out", str(tmp_path / "no")]) == 2
    assert f"--init-from {tmp_path / 'nothere'}: no such file or run directory" in capsys.readouterr().err


def test_resume_with_other_settings_points_to_a_new_run_from_the_old_one(trained, capsys):
    assert run(["train", "--resume", str(trained), "--epochs", "3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"drop --epochs (a new run from it takes other settings: ssvi train --init-from {trained} --out NEW ...)" in err
