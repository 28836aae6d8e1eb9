"""Stopping and resuming a run gives bit-identical tensors and supports."""

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from ssvi_cli import config as C
from ssvi_cli.training.summary import throughput
from ssvi_cli.training.trainer import Interrupted, Trainer


@pytest.fixture(autouse=True)
def _skip_finish(monkeypatch):
    # The final evaluation/export is covered elsewhere; these tests compare the trained tensors.
    monkeypatch.setattr(Trainer, "finish", lambda self, progress=None: {})


def cfg(**over) -> C.Config:
    base = {"train.epochs": 4, "sparse.delta_t": 7, "data.max_train": 600, "train.checkpoint_every": 1}
    base.update(over)
    return C.apply_overrides(C.load_preset("digits_mlp"), base)


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def stop_at(step: int):
    def hook(trainer: Trainer, kind: str) -> None:
        if trainer.state.step == step:
            trainer.stop_requested = True

    return hook


@pytest.mark.parametrize("stop_step", [20, 27])  # an epoch boundary (10 steps/epoch) and mid-epoch
@pytest.mark.parametrize("method,optim", [("ssvi", "adam"), ("rigl", "sgd")])
def test_interrupt_and_resume_is_bit_identical(tmp_path: Path, stop_step: int, method: str, optim: str):
    c = cfg(**{"sparse.method": method, "optim.name": optim})
    straight = Trainer.create(c, tmp_path / "straight")
    straight.fit()
    assert straight.state.step == 40

    first = Trainer.create(c, tmp_path / "split")
    first.step_hooks.append(stop_at(stop_step))
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.state.step == stop_step
    resumed.fit()
    assert resumed.state.step == 40 and resumed.state.subspace_steps == straight.state.subspace_steps
    assert_identical(final_state(straight), final_state(resumed))
    for p_a, p_b in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        for key in p_a:
            if isinstance(p_a[key], torch.Tensor):
                assert torch.equal(p_a[key], p_b[key]), key


def test_keeps_only_the_last_n_checkpoints(tmp_path: Path):
    trainer = Trainer.create(cfg(**{"train.keep_checkpoints": 2}), tmp_path / "r")
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["checkpoint-00000030.pt", "checkpoint-00000040.pt"]


def signal_at(step: int, *signums: int):
    """A hook that sends this process the given signals, one after another, after ``step``."""
    def hook(trainer: Trainer, kind: str) -> None:
        if trainer.state.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)

    return hook


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_restores_the_handler(tmp_path: Path):
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer.create(cfg(), tmp_path / "r")
    trainer.step_hooks.append(signal_at(13, signal.SIGTERM))
    with pytest.raises(Interrupted) as stop:
        trainer.fit()
    assert stop.value.step == 13 and stop.value.signum == signal.SIGTERM
    assert Trainer.resume(tmp_path / "r").state.step == 13  # the checkpoint holds the finished step
    assert signal.getsignal(signal.SIGTERM) is before



def _stops_unless_ignored_at_start(tmp_path: Path, sig: signal.Signals, handler: Any, signals: int = 1) -> None:
    """``sig`` (``signals`` times at once) checkpoints and stops the run at the step it came in, and
    the handler it ran under (``handler``) comes back; ignored when the run starts, the run goes on."""
    before = signal.signal(sig, handler)
    try:
        trainer = Trainer.create(cfg(), tmp_path / "r")
        trainer.step_hooks.append(signal_at(13, *[sig] * signals))
        with pytest.raises(Interrupted) as stop:
            trainer.fit()
        assert stop.value.step == 13 and stop.value.signum == sig
        assert Trainer.resume(tmp_path / "r").state.step == 13
        assert signal.getsignal(sig) is handler
        signal.signal(sig, signal.SIG_IGN)
        trainer = Trainer.create(cfg(), tmp_path / "ignored")
        trainer.step_hooks.append(signal_at(13, sig))
        trainer.fit()
        assert trainer.state.step == trainer.total_steps and signal.getsignal(sig) is signal.SIG_IGN
    finally:
        signal.signal(sig, before)


def test_a_closed_terminal_stops_at_a_checkpoint_unless_nohup_ignores_it(tmp_path: Path):
    """SIGHUP (the terminal closed) checkpoints and stops as SIGTERM does; under ``nohup``, which
    ignores SIGHUP, the run goes on."""
    _stops_unless_ignored_at_start(tmp_path, signal.SIGHUP, signal.SIG_DFL)


def test_ctrl_c_twice_as_under_the_launcher_still_checkpoints_the_step(tmp_path: Path):
    """Under torchrun each rank gets SIGINT from the terminal and again from torchrun itself; in a
    job a script ran in the background, which ignores SIGINT, the run goes on."""
    _stops_unless_ignored_at_start(tmp_path, signal.SIGINT, signal.default_int_handler, signals=2)


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    """A run's records without the wall-clock fields, which no two runs share."""
    from ssvi_cli.fileio import read_jsonl

    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
            for r in read_jsonl(run / name)]


@pytest.mark.parametrize("stop_step", [10, 27])  # the last batch of epoch 1 (10 steps/epoch), mid-epoch 3
def test_a_resumed_epoch_records_the_whole_epoch(tmp_path: Path, stop_step: int):
    """The epoch a stop cut in two is recorded as one: its loss, accuracy and swaps cover the
    batches before the stop too (a stop on an epoch's last batch recorded zeros)."""
    c = cfg()
    straight = Trainer.create(c, tmp_path / "straight")
    straight.fit()
    first = Trainer.create(c, tmp_path / "split")
    first.step_hooks.append(stop_at(stop_step))
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer.resume(tmp_path / "split")
    resumed.fit()
    assert records(tmp_path / "split") == records(tmp_path / "straight")
    assert any(r["swapped"] > 0 for r in records(tmp_path / "split"))
    assert throughput(resumed) is not None and resumed.samples_seen == straight.samples_seen
    assert records(tmp_path / "split", "support.jsonl") == records(tmp_path / "straight", "support.jsonl")


def test_a_run_resumed_from_an_older_checkpoint_records_each_epoch_and_step_once(tmp_path: Path):
    """Killed after its newest checkpoint went bad (or between checkpoints), a run resumes from an
    older one and trains the later steps again: their records are written once, not twice."""
    c = cfg(**{"train.keep_checkpoints": 3})
    straight = Trainer.create(c, tmp_path / "straight")
    straight.fit()
    first = Trainer.create(c, tmp_path / "split")
    first.step_hooks.append(stop_at(33))
    with pytest.raises(Interrupted):
        first.fit()
    for path in sorted((tmp_path / "split" / "checkpoints").iterdir())[-2:]:  # steps 30 and 33
        path.unlink()
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.state.step == 20
    resumed.fit()
    assert [r["epoch"] for r in records(tmp_path / "split")] == [1, 2, 3, 4]
    assert records(tmp_path / "split") == records(tmp_path / "straight")
    steps = [r["step"] for r in records(tmp_path / "split", "support.jsonl")]
    assert steps == sorted(set(steps)) and len(steps) == resumed.state.subspace_steps


def test_a_stop_during_the_final_evaluation_says_so_and_resume_finishes(tmp_path: Path, monkeypatch):
    import time

    import ssvi_cli.training.trainer as trainer_module

    def slow_finish(trainer, progress=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler stops this at once
        raise AssertionError("the signal did not stop the final evaluation")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Trainer, "finish", lambda self, progress=None: trainer_module.finish(self, progress))
    monkeypatch.setattr(trainer_module, "finish", slow_finish)
    trainer = Trainer.create(cfg(), tmp_path / "r")
    with pytest.raises(Interrupted) as stop:
        trainer.fit()
    assert stop.value.during == "the final evaluation" and stop.value.step == 40
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(trainer_module, "finish", lambda trainer, progress=None: {"finished": True})
    resumed = Trainer.resume(tmp_path / "r")
    assert resumed.fit() == {"finished": True} and [r["epoch"] for r in records(tmp_path / "r")] == [1, 2, 3, 4]


def test_the_finish_names_its_phases_to_progress_and_to_a_stop(tmp_path: Path, monkeypatch):
    """A stop while the model file was written said "during the final evaluation"; and nothing told a
    person watching that the final evaluation had begun (seconds of silence after the last epoch)."""
    import ssvi_cli.training.summary as summary_module
    from ssvi_cli.training.records import Progress

    def stopped_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop the model file's writing")

    monkeypatch.setattr(summary_module, "write_model_file", stopped_write)
    monkeypatch.setattr(Trainer, "finish", lambda self, progress=None: summary_module.finish(self, progress))
    said = []
    trainer = Trainer.create(cfg(), tmp_path / "r")
    with pytest.raises(Interrupted) as stop:
        trainer.fit(Progress(on_phase=said.append))
    assert stop.value.during == "the writing of the model file and summary"
    n = len(trainer.splits.test)
    assert said == [f"final evaluation on {n:,} test images ({trainer.cfg.train.eval_samples} weight draws, "
                    "then the mean network)"]


def test_a_resume_refuses_a_run_another_process_wrote_while_it_was_read(tmp_path: Path):
    """The run's lock is taken once a --resume has passed its checks; were a newer checkpoint written
    (or the run finished) by then, the checkpoint read is stale: refused, nothing trained from it."""
    import shutil

    from ssvi_cli.runs.rundir import RunBusy
    from ssvi_cli.training.plan import RunPlan

    trainer = Trainer.create(cfg(**{"train.epochs": 2}), tmp_path / "r")
    trainer.step_hooks.append(stop_at(13))
    with pytest.raises(Interrupted):
        trainer.fit()
    plan = RunPlan.resume(tmp_path / "r")
    plan.check_unchanged()  # nothing happened meanwhile
    newest = sorted((tmp_path / "r" / "checkpoints").glob("*.pt"))[-1]
    shutil.copy(newest, newest.with_name("checkpoint-00000099.pt"))  # as the other process's next one
    with pytest.raises(RunBusy, match="another process wrote the run while this one read it"):
        plan.check_unchanged()


def test_a_stop_asked_after_the_last_step_is_not_dropped(tmp_path: Path):
    """A signal during the last epoch's validation or checkpoint stops before the final evaluation
    (which a resume then does), as one during that evaluation does; it used to be ignored."""
    from ssvi_cli.training.records import Progress

    def at_the_end(record: dict) -> None:
        if record["epoch"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer.create(cfg(), tmp_path / "r")
    with pytest.raises(Interrupted) as stop:
        trainer.fit(Progress(on_epoch_end=at_the_end))
    assert stop.value.step == 40 and stop.value.signum == signal.SIGTERM and stop.value.during
    assert Trainer.resume(tmp_path / "r").state.step == 40



def test_a_stop_between_accumulated_minibatches_and_an_fp16_run_resume_bit_identical(tmp_path: Path):
    # The checkpoint kept neither the running mean of the dense gradients that feed the next
    # remove-and-add step (sparse.addition=accumulate:N) nor the fp16 loss scaler's state.
    c = cfg(**{"sparse.addition": "accumulate:4", "train.precision": "fp16"})
    straight = Trainer.create(c, tmp_path / "straight")
    schedule = straight.schedule
    stop = next(t + 1 for t in range(10, 40) if schedule.captures(t) and schedule.captures(t + 1)
                and not schedule.is_update(t))  # two of the four minibatches seen, the step still to come
    seen = {}
    straight.step_hooks.append(lambda tr, kind: seen.update({k: v.clone() for k, v in tr._accumulated.items()})
                               if tr.state.step == stop else None)
    straight.fit()
    assert seen and straight.scaler.is_enabled()

    first = Trainer.create(c, tmp_path / "split")
    first.step_hooks.append(stop_at(stop))
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.state.step == stop and resumed._captured == first._captured > 0
    assert resumed._accumulated.keys() == seen.keys()
    assert all(torch.equal(resumed._accumulated[k], seen[k]) for k in seen)
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    assert resumed.scaler.state_dict()["_growth_tracker"] > 0  # steps since the scale last changed
    resumed.fit()
    assert resumed.state.subspace_steps == straight.state.subspace_steps
    assert_identical(final_state(straight), final_state(resumed))


def test_checkpoints_past_step_99999999_are_listed_in_step_order(tmp_path: Path):
    from ssvi_cli.runs.checkpoint import checkpoint_dir, list_checkpoints

    folder = checkpoint_dir(tmp_path)
    folder.mkdir()
    for step in (100_000_000, 99_999_999, 5, 1_000_000_000):  # the name grows a digit at 10^8
        (folder / f"checkpoint-{step:08d}.pt").write_bytes(b"")
    (folder / "checkpoint-123.pt").write_bytes(b"")  # not one of ours
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-00000005.pt", "checkpoint-99999999.pt", "checkpoint-100000000.pt", "checkpoint-1000000000.pt"]


def test_a_cuda_rng_state_is_restored_onto_the_current_device_however_many_are_visible(monkeypatch):
    # one state per visible device was saved and set back device by device: resumed where fewer GPUs
    # are visible (CUDA_VISIBLE_DEVICES=0, an --nproc 4 run on one GPU) it failed with an IndexError
    from ssvi_cli.runs import checkpoint as ck

    own, other = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_calls.append(state))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("one state per device"))
    state = ck.rng_state()
    assert torch.equal(state["cuda_device"], own) and "cuda" not in state
    ck.set_rng_state(state)
    ck.set_rng_state({**ck.rng_state(), "cuda": [other, own]} | {"cuda_device": own})
    old = {k: v for k, v in ck.rng_state().items() if k != "cuda_device"}
    ck.set_rng_state({**old, "cuda": [other, own, own]})  # a checkpoint of before, three GPUs then
    assert [int(s[0]) for s in set_calls] == [1, 1, 2]


def test_an_overflowed_minibatch_before_the_remove_and_add_step_is_left_out_of_the_mean(tmp_path: Path, monkeypatch):
    # under fp16 with accumulate:N, one overflowed minibatch before the step put inf into the mean: the
    # remove-and-add step was then skipped too, and the scale backed off a second time
    from ssvi_cli.core.layers import SparseGaussian

    trainer = Trainer.create(cfg(**{"sparse.addition": "accumulate:4", "train.precision": "fp16"}), tmp_path / "r")
    schedule = trainer.schedule
    poisoned = next(t for t in range(10, 40) if schedule.captures(t) and not schedule.is_update(t))
    update = next(t for t in range(poisoned, 40) if schedule.is_update(t))
    collect = SparseGaussian.collect_dense_grad

    def overflowing(layer):
        grad = collect(layer)
        return grad * float("inf") if trainer.state.step == poisoned and grad is not None else grad

    monkeypatch.setattr(SparseGaussian, "collect_dense_grad", overflowing)
    reports = []
    trainer.step_hooks.append(lambda tr, kind: reports.append((tr.state.step - 1, kind, tr._captured)))
    trainer.fit()
    kinds = {step: kind for step, kind, _ in reports}
    assert kinds[update] == "subspace"
    assert trainer.state.subspace_steps == schedule.updates  # none skipped
    captured = {step: n for step, _, n in reports}
    assert captured[poisoned] == captured[poisoned - 1] if schedule.captures(poisoned - 1) else captured[poisoned] == 0


@pytest.mark.parametrize("part,broken,said", [
    ("state", None, "KeyError: 'state'"),
    ("state", {"epoch": 1, "step": 10, "bogus": 3}, "unexpected keyword argument 'bogus'"),
    ("state", {"epoch": "one", "step": 10}, "the run's position holds {'epoch': 'one'}, not counts"),
    ("progress", "not a record", "TypeError"),
    ("rng", {"torch": torch.zeros(3, dtype=torch.uint8), "python": [1, 2]}, "RuntimeError"),
    ("optimizer", {"state": {}, "param_groups": []}, "different number of parameter groups"),
])
def test_a_checkpoint_whose_record_is_not_as_ssvi_writes_it_is_refused_in_a_line(tmp_path: Path, part, broken, said):
    """A record that unpickles but is edited or damaged met the restoring code's own exception on
    --resume (KeyError: 'state', TrainState.__init__(), 'state vector is the wrong size'): exit 1."""
    from ssvi_cli.runs.checkpoint import CheckpointError

    c = cfg(**{"train.epochs": 1, "data.max_train": 200})
    Trainer.create(c, tmp_path / "r").fit()
    (path,) = sorted((tmp_path / "r" / "checkpoints").glob("*.pt"))
    data = torch.load(path, weights_only=True)
    if broken is None:
        del data[part]
    else:
        data[part] = broken
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} does not hold a run's state as "
                                              f"ssvi writes one \\(.*{re.escape(said)}"):
        Trainer.resume(tmp_path / "r")


def test_a_checkpoint_of_another_run_is_refused_and_nothing_pruned(tmp_path: Path):
    """A checkpoint copied in from another run (or met through a checkpoints/ link to a shared folder)
    was resumed from: the other run's config trained on, written over config.yaml, the run's own
    checkpoints pruned."""
    import shutil

    from ssvi_cli.runs.checkpoint import CheckpointError

    other = Trainer.create(cfg(**{"train.epochs": 2, "train.seed": 5}), tmp_path / "other")
    other.fit()
    trainer = Trainer.create(cfg(**{"train.epochs": 3}), tmp_path / "r")
    trainer.step_hooks.append(stop_at(13))
    with pytest.raises(Interrupted):
        trainer.fit()
    own = sorted((tmp_path / "r" / "checkpoints").glob("*.pt"))
    config = (tmp_path / "r" / "config.yaml").read_text()
    shutil.copy(sorted((tmp_path / "other" / "checkpoints").glob("*.pt"))[-1],
                tmp_path / "r" / "checkpoints" / "checkpoint-00000099.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint-00000099.pt holds another config than the run's config.yaml: "
                                              r"train.epochs 2 \(config.yaml: 3\); train.seed 5 \(config.yaml: 0\). "
                                              r"--resume trains on with a checkpoint's config: put an edited config.yaml "
                                              r"back as it was \(ssvi train --preset .*config.yaml --out NEW trains with "
                                              r"it\), move a checkpoint of another run out of "):
        Trainer.resume(tmp_path / "r")
    assert all(p.is_file() for p in own) and (tmp_path / "r" / "config.yaml").read_text() == config
    (tmp_path / "r" / "checkpoints" / "checkpoint-00000099.pt").unlink()
    Trainer.resume(tmp_path / "r").fit()  # its own resumes


def test_a_record_file_made_a_link_is_refused_not_appended_through(tmp_path: Path):
    """metrics.jsonl and support.jsonl made links were appended to through them on --resume (into a file
    outside the run); every other file ssvi writes replaces a link."""
    from ssvi_cli.fileio import UnwritablePath, append_jsonl

    trainer = Trainer.create(cfg(**{"train.epochs": 2}), tmp_path / "r")
    trainer.step_hooks.append(stop_at(13))
    with pytest.raises(Interrupted):
        trainer.fit()
    for name in ("metrics.jsonl", "support.jsonl"):
        outside = tmp_path / f"outside-{name}"
        outside.write_text("theirs\n")
        record = tmp_path / "r" / name
        kept = record.read_bytes()
        record.unlink()
        record.symlink_to(outside)
        with pytest.raises(UnwritablePath, match=f"cannot write {record}: it is a symbolic link, which ssvi does not follow"):
            Trainer.resume(tmp_path / "r").fit()
        with pytest.raises(OSError):  # and the append itself, should one be planted while the run trains
            append_jsonl(record, {"epoch": 9})
        assert outside.read_text() == "theirs\n"
        record.unlink()
        record.write_bytes(kept)
    Trainer.resume(tmp_path / "r").fit()
