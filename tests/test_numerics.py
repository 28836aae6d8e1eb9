"""A loss or model that turns NaN/inf stops training with a message naming the step and the term,
and never replaces the last good checkpoint."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssvi_cli.runs import checkpoint as ckpt
from ssvi_cli import config as C
from ssvi_cli.cli import run
from ssvi_cli.training.trainer import Trainer, TrainingError
from ssvi_cli.core.layers import SparseGaussian, sparse_layers


@pytest.fixture(autouse=True)
def _skip_finish(monkeypatch):
    # The final evaluation/export is not what these tests are about.
    monkeypatch.setattr(Trainer, "finish", lambda self, progress=None: {})


def cfg(**over) -> C.Config:
    # 200 training examples in batches of 20: 9 steps per epoch (180 after the validation split).
    base = {"train.epochs": 4, "data.max_train": 200, "train.batch_size": 20, "sparse.delta_t": 5,
            "train.checkpoint_every": 1, "train.keep_checkpoints": 2}
    base.update(over)
    return C.apply_overrides(C.load_preset("digits_mlp"), base)


def snapshot_at(step: int, into: dict):
    def hook(trainer: Trainer, kind: str) -> None:
        if trainer.state.step == step:
            into.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    return hook


def assert_checkpoint_equals(path: Path, state: dict) -> None:
    saved = ckpt.load_checkpoint(path)["model"]
    assert saved.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(saved[k], v), k
        if v.is_floating_point():
            assert torch.isfinite(saved[k]).all(), k


def test_nan_data_term_names_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer.create(cfg(), tmp_path / "r")
    spe = trainer.steps_per_epoch
    bad_step = 2 * spe + 3  # mid third epoch, after the checkpoints of epochs 1 and 2
    good: dict = {}
    trainer.step_hooks.append(snapshot_at(2 * spe, good))
    real = F.cross_entropy

    def poisoned(logits, y, *args, **kwargs):
        out = real(logits, y, *args, **kwargs)
        return out * float("nan") if trainer.state.step == bad_step else out

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    msg = str(info.value)
    last = ckpt.checkpoint_dir(tmp_path / "r") / f"checkpoint-{2 * spe:08d}.pt"
    assert f"non-finite loss at step {bad_step} (epoch 3)" in msg
    assert "the data term (cross-entropy)" in msg
    assert f"the last good checkpoint is {last}" in msg and "lower learning rate" in msg
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == [
        f"checkpoint-{spe:08d}.pt", f"checkpoint-{2 * spe:08d}.pt"]
    assert_checkpoint_equals(last, good)
    # The kept checkpoint resumes (and, the poison gone, trains to the end).
    monkeypatch.setattr(F, "cross_entropy", real)
    resumed = Trainer.resume(tmp_path / "r")
    assert resumed.state.step == 2 * spe
    resumed.fit()
    assert resumed.state.epoch == 4


def test_infinite_kl_term_is_named(tmp_path, monkeypatch):
    trainer = Trainer.create(cfg(), tmp_path / "r")
    bad_step = 4
    real = SparseGaussian.kl

    def kl(self, prior_sigma):
        out = real(self, prior_sigma)
        return out + float("inf") if trainer.state.step == bad_step else out

    monkeypatch.setattr(SparseGaussian, "kl", kl)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4 \(epoch 1\) in the KL term; "
                                            r"no checkpoint was written yet"):
        trainer.fit()
    assert ckpt.list_checkpoints(tmp_path / "r") == []


def test_a_model_that_diverges_at_an_epoch_end_is_never_checkpointed(tmp_path):
    # The loss of the last step was finite, but its update left NaN in the weights: the epoch-end
    # checkpoint must refuse, so pruning (keep 1) cannot delete the good one.
    trainer = Trainer.create(cfg(**{"train.keep_checkpoints": 1}), tmp_path / "r")
    spe = trainer.steps_per_epoch
    good: dict = {}
    trainer.step_hooks.append(snapshot_at(spe, good))
    first = sparse_layers(trainer.model)[0][0]

    def diverge(t: Trainer, kind: str) -> None:
        if t.state.step == 2 * spe:
            with torch.no_grad():
                sparse_layers(t.model)[0][1].mu[0] = float("nan")

    trainer.step_hooks.append(diverge)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    msg = str(info.value)
    assert f"non-finite values in {first}.mu after step {2 * spe} (epoch 2)" in msg
    assert "the diverged model was not saved" in msg and f"checkpoint-{spe:08d}.pt" in msg
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == [f"checkpoint-{spe:08d}.pt"]
    assert_checkpoint_equals(ckpt.list_checkpoints(tmp_path / "r")[0], good)


def test_cli_reports_an_unpatched_infinite_kl_as_a_runtime_failure(tmp_path, capsys):
    # A prior sigma of 1e-30 squares to zero in float32: the KL term is infinite at the first step.
    code = run(["train", "--out", str(tmp_path / "r"), "--epochs", "1", "--set", "bayes.prior_sigma=1e-30",
                "--set", "data.max_train=100"])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss at step 0 (epoch 1) in the KL term" in err and "bayes.prior_sigma" in err
    # before the first update no learning rate is to blame: the initial values are named instead
    assert "Check the initial values (bayes.sigma_init_mean" in err and "learning rate" not in err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoints").exists()
