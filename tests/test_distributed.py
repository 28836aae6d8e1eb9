"""Data-parallel training on torch.distributed: 2 CPU processes with gloo on digits, and the GPU path."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from ssvi_cli import config as C
from ssvi_cli.training import distributed, launcher
from ssvi_cli.training.distributed import DistInfo, SupportMismatch
from ssvi_cli.training.trainer import Interrupted, Trainer, TrainingError
from ssvi_cli.core.layers import SparseLinear, sparse_layers
from ssvi_cli.metrics import accuracy
from ssvi_cli.prediction import predict_loader

WORLD = 2
PER_RANK_BATCH = 32
EPOCHS = 4


def digits_cfg(batch_size: int, **over: Any) -> C.Config:
    # accumulate:3 makes two of every three capture steps parameter steps whose mu gradient comes from
    # the dense leaf (outside DDP), the path most likely to let ranks drift apart.
    base = {"train.epochs": EPOCHS, "train.batch_size": batch_size, "sparse.delta_t": 10,
            "sparse.addition": "accumulate:3",
            "train.device": "cpu", "train.eval_samples": 4, "train.checkpoint_every": 1}
    base.update(over)
    return C.apply_overrides(C.load_preset("digits_mlp"), base)


# ------------------------------------------------------------------ the worker (runs in each process)

def group_threads() -> Optional[list[str]]:
    """Names of this process's threads that belong to the process group (gloo, its TCP store);
    None where /proc cannot list C++ threads."""
    task = Path("/proc/self/task")
    if not task.is_dir():
        return None
    names = [(t / "comm").read_text().strip() for t in task.iterdir()]
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


def _worker(rank: int, port: int, out: str, mode: str) -> None:
    faulthandler.enable()  # a crash in a rank prints its Python stack into the test's output
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    info = DistInfo(rank=rank, local_rank=rank, world_size=WORLD)
    distributed.setup(info, "cpu", timeout_s=120)
    result["threads_during"] = group_threads()
    trainer = None
    try:
        trainer = Trainer.create(digits_cfg(PER_RANK_BATCH), Path(out) / "run", dist_info=info)
        if mode == "mismatch" and rank == 1:
            # Rank 1 alone perturbs its addition scores (still joining the all-reduce).
            trainer.grad_reduce = lambda g: distributed.mean(g) * torch.rand_like(g)
        if mode == "interrupt" and rank == 0:
            # Only rank 0 is asked to stop (as by Ctrl-C); every rank must stop at the same step. Asked
            # after step 26, the ranks agree on it in the next step's all-reduce and stop after step 27.
            trainer.step_hooks.append(lambda tr, kind: setattr(tr, "stop_requested", tr.state.step == 26))
        if mode == "nonfinite" and rank == 1:
            # Rank 1 alone meets a non-finite loss (as a rank-local fp16 overflow in the forward would).
            batches = trainer.batches
            trainer.batches = lambda epoch, start=0: ((x * float("nan") if trainer.state.step == 5 else x, y)
                                                      for x, y in batches(epoch, start))
        try:
            result["summary"] = trainer.fit()
        except (SupportMismatch, TrainingError) as exc:
            result["error"] = str(exc)
        except Interrupted as exc:
            result["interrupted_at"] = exc.step
        result["state"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        result["files_seen_by_rank"] = sorted(p.name for p in (Path(out) / "run").glob("*"))
    finally:
        if trainer is not None:
            trainer.release_process_group()
        distributed.teardown()
        result["threads_after"] = group_threads()
        torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture
def one_thread():
    """The in-test single-process runs: two threads on two busy cores oversubscribe badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_two_ranks(tmp_path: Path, mode: str) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(launcher.free_port(), str(tmp_path), mode), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_group_threads_stopped(ranks: list[dict[str, Any]]) -> None:
    """Teardown left no communication thread behind to run into interpreter shutdown."""
    for r in ranks:
        if r["threads_during"] is not None:
            assert r["threads_during"], "the group's threads were not recognised by name"
            assert r["threads_after"] == [], r["threads_after"]


def test_accuracy(run_dir: Path) -> float:
    """Accuracy of the exported file's mean network on the digits test split."""
    from ssvi_cli.training.plan import load_data
    from ssvi_cli.modelfile import read_model_file

    loaded = read_model_file(run_dir / "model.safetensors")
    splits = load_data(digits_cfg(64))
    loader = torch.utils.data.DataLoader(splits.test, batch_size=256)
    out = predict_loader(loaded.model, loader, torch.device("cpu"), mode="mean")
    return accuracy(out["probs"], out["labels"])


test_accuracy.__test__ = False  # a helper, not a test


# ------------------------------------------------------------------ two CPU processes

@pytest.mark.slow
def test_two_processes_train_identically_and_match_a_single_process(tmp_path: Path, one_thread):
    ranks = run_two_ranks(tmp_path, "full")
    assert_group_threads_stopped(ranks)
    run = tmp_path / "run"
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for key in a:  # supports (idx), mu, rho and biases: bit-identical on both ranks
        assert torch.equal(a[key], b[key]), key
    s0, s1 = ranks[0]["summary"], ranks[1]["summary"]
    assert s0["world_size"] == WORLD and s0["global_batch"] == WORLD * PER_RANK_BATCH
    assert s0["subspace_steps"] > 0 and s0["subspace_steps"] == s1["subspace_steps"]
    assert s0["samples_per_second"] > 0

    # Rank 0 alone wrote the run: each epoch and each subspace step is logged once, not twice.
    assert json.loads((run / "summary.json").read_text())["world_size"] == WORLD
    assert len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert len((run / "support.jsonl").read_text().splitlines()) == s0["subspace_steps"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl",
                                                     "model.safetensors", "summary.json", "support.jsonl"]

    single = Trainer.create(digits_cfg(WORLD * PER_RANK_BATCH), tmp_path / "single")
    ref = single.fit()
    assert single.steps_per_epoch == s0["steps"] // EPOCHS
    assert ref["subspace_steps"] == s0["subspace_steps"]
    # a capture's dense gradient is computed for the global batch, across the ranks: as one process's
    assert ref["training_flops"] == s0["training_flops"] and s0["training_flops_reduction_vs_vi"] > 1
    acc_ddp, acc_single = test_accuracy(run), test_accuracy(tmp_path / "single")
    assert acc_ddp > 0.8 and acc_single > 0.8
    print(f"exported model accuracy: 2 ranks {acc_ddp:.4f}, 1 process {acc_single:.4f}")
    assert abs(acc_ddp - acc_single) < 0.05, (acc_ddp, acc_single)


@pytest.mark.slow
def test_mask_mismatch_between_ranks_is_an_error_on_every_rank(tmp_path: Path):
    for message in errors_on_every_rank(tmp_path, "mismatch"):
        assert "sparse supports differ between ranks" in message
        assert "at step 10" in message  # the first subspace step (delta_t = 10)
        assert "in layer(s) '" in message


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path: Path):
    # The rank alone raising would leave the other waiting in the step's all-reduce (under NCCL until
    # its timeout, under gloo with a connection error in place of the message).
    for message in errors_on_every_rank(tmp_path, "nonfinite"):
        assert message.startswith("non-finite loss at step 5 (epoch 1) in the data term (cross-entropy) on at "
                                  "least one of the 2 processes; no checkpoint was written yet"), message


def errors_on_every_rank(tmp_path: Path, mode: str) -> list[str]:
    """Each rank's error, once every rank has stopped with one (no summary) and left the group."""
    ranks = run_two_ranks(tmp_path, mode)
    assert_group_threads_stopped(ranks)
    assert all("summary" not in r for r in ranks)
    return [r["error"] for r in ranks]


@pytest.mark.slow
def test_interrupt_on_one_rank_stops_all_and_resumes_on_one_process(tmp_path: Path, one_thread):
    ranks = run_two_ranks(tmp_path, "interrupt")
    assert [r["interrupted_at"] for r in ranks] == [27, 27]
    assert_group_threads_stopped(ranks)
    run = tmp_path / "run"

    from ssvi_cli.runs import checkpoint as ckpt

    # The checkpoint holds the cut epoch's sums over both ranks, so its record covers every sample.
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert saved["progress"]["epoch"]["seen"] == saved["state"]["batch_in_epoch"] * WORLD * PER_RANK_BATCH
    resumed = Trainer.resume(run, device="cpu")  # one process now: the global batch is kept
    assert resumed.state.step == 27 and resumed.state.global_batch == WORLD * PER_RANK_BATCH
    two_rank_steps = resumed.steps_per_epoch
    summary = resumed.fit()
    assert summary["world_size"] == 1 and summary["global_batch"] == WORLD * PER_RANK_BATCH
    assert summary["steps"] == EPOCHS * two_rank_steps
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))
    assert summary["test_accuracy_mean_net"] > 0.8


# ------------------------------------------------------------------ the CLI

@pytest.mark.slow
def test_cli_nproc_launches_torchrun_and_only_rank0_prints(tmp_path: Path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ssvi_cli", "train", "--nproc", "2", "--device", "cpu", "--batch-size", "32",
         "--epochs", "2", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert summary["world_size"] == 2 and summary["global_batch"] == 64
    assert (out / "model.safetensors").is_file()
    # config.yaml's batch_size is one process's: the file says how to train the run again.
    first = (out / "config.yaml").read_text().splitlines()[0]
    assert first == ("# started on 2 processes of train.batch_size each (a global batch of 64): "
                     "ssvi train --nproc 2 --preset config.yaml trains it again")
    assert C.load_preset(str(out / "config.yaml")).train.batch_size == 32


def test_sweep_under_torchrun_is_refused_not_run_by_every_process(tmp_path: Path, monkeypatch, capsys):
    """Each process ran the whole sweep and its cells, inheriting RANK and WORLD_SIZE, waited for a
    process group that never formed."""
    from ssvi_cli.cli import run

    monkeypatch.chdir(tmp_path)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    for args in (["--seeds", "1"], ["--run-cell", str(tmp_path / "c")], ["--resume", str(tmp_path / "s")]):
        assert run(["sweep", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not under torchrun" in err, err
    assert list(tmp_path.iterdir()) == []
    assert run(["sweep", "--seeds", "1", "--dry-run", "--out", str(tmp_path / "s")]) == 0  # runs nothing


def test_nproc_with_the_default_out_takes_a_folder_of_its_own(tmp_path: Path, monkeypatch, capsys):
    """Two --nproc runs started in the same second shared the default folder: the second was refused."""
    import time

    from ssvi_cli.cli import run
    from ssvi_cli.runs.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    taken = tmp_path / "runs" / "20260101-000000-digits_mlp-ssvi-s0.95"
    taken.mkdir(parents=True)
    with RunDir(taken).hold():  # the other run, just started
        assert run(["train", "--nproc", "2", "--device", "cpu", "--epochs", "1", "--set", "model.widths=[8]",
                    "--set", "data.max_train=64", "--set", "train.eval_samples=1", "--json"]) == 0
    mine = taken.with_name(f"{taken.name}-2")
    assert json.loads((mine / "summary.json").read_text())["world_size"] == 2 and not (taken / "config.yaml").exists()
    # said before the seconds the processes take to start, in which nothing else is printed
    assert capsys.readouterr().err.startswith(f"starting 2 training processes for {mine.relative_to(tmp_path)}\n")


@pytest.mark.slow
def test_ctrl_c_under_nproc_checkpoints_once_and_exits_130(tmp_path: Path):
    out = tmp_path / "run"
    proc = _start_nproc_run(out)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == -signal.SIGINT, rest  # ended by the Ctrl-C: a shell shows $? as 130
    assert rest.count("checkpoint written. Resume with") == 1, rest  # rank 0 alone reports
    assert f"Resume with: ssvi train --resume {out} --nproc 2" in rest, rest  # on as many processes
    assert "Traceback" not in rest
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)["state"]
    assert state["epoch"] == 1 and state["batch_in_epoch"] > 0, state


@pytest.mark.slow
def test_ctrl_c_twice_under_nproc_still_says_where_to_resume(tmp_path: Path):
    """The second Ctrl-C reached the launcher, which quit at once: rank 0's checkpoint was written but
    its line, passed through the launcher, was lost, and the command ended saying nothing."""
    import time

    out = tmp_path / "run"
    proc = _start_nproc_run(out)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == -signal.SIGINT, rest
    assert rest.count("checkpoint written. Resume with") == 1, rest


@pytest.mark.slow
def test_a_stop_signal_to_the_nproc_command_alone_stops_every_process_at_a_checkpoint(tmp_path: Path):
    """kill, a container's stop or timeout signal the command, not its processes: they stop at a
    checkpoint all the same, and the command exits as they did (128 + 15), none left running."""
    out = tmp_path / "run"
    proc = _start_nproc_run(out)
    proc.send_signal(signal.SIGTERM)  # this process alone
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, rest
    assert rest.count("checkpoint written. Resume with") == 1 and "Traceback" not in rest, rest
    left = [p for p in Path("/proc").glob("[0-9]*") if str(out) in _cmdline(p)]
    assert not left, [_cmdline(p) for p in left]
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)["state"]
    assert state["epoch"] == 1 and state["batch_in_epoch"] > 0, state


def _start_nproc_run(out: Path) -> subprocess.Popen:
    """``ssvi train --nproc 2`` writing ``out`` in a session of its own, returned once its first epoch
    is logged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssvi_cli", "train", "--nproc", "2", "--device", "cpu", "--batch-size", "4",
         "--epochs", "3", "--set", "data.max_train=600", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        # as a terminal's foreground job, even when the tests run in a shell's background job (which ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = [proc.stderr.readline()]
    while lines[-1] and not lines[-1].startswith("epoch 1/3"):
        lines.append(proc.stderr.readline())
    assert lines[-1].startswith("epoch 1/3"), "".join(lines)
    return proc


def _running(out: Path) -> list[str]:
    return [_cmdline(p) for p in Path("/proc").glob("[0-9]*") if str(out) in _cmdline(p)]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the processes' lifetime rests on Linux's prctl")
def test_a_killed_nproc_command_leaves_no_process_training_unlocked(tmp_path: Path):
    """kill -9 of the command: its launcher and both processes trained on, no longer locked, and a
    --force run then wrote the same folder with them. Now the launcher holds the lock and stops them
    (each at a checkpoint) before it lets go."""
    from ssvi_cli.locks import lock_holder
    import time

    out = tmp_path / "run"
    proc = _start_nproc_run(out)
    proc.kill()
    proc.wait()
    assert lock_holder(out / ".lock") is not None  # the launcher holds it while the processes stop
    deadline = time.monotonic() + 60
    while (_running(out) or lock_holder(out / ".lock")) and time.monotonic() < deadline:
        time.sleep(0.2)  # (an exiting process's command line reads empty a moment before its files close)
    assert not _running(out) and lock_holder(out / ".lock") is None, _running(out)
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)["state"]
    assert state["epoch"] >= 1 and state["batch_in_epoch"] > 0, state  # stopped at a step, not at an epoch's end


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the processes' lifetime rests on Linux's prctl")
def test_a_killed_launcher_stops_its_processes_before_the_command_ends(tmp_path: Path):
    """kill -9 of the launcher alone (the OOM killer's choice, say): the command exited 247 at once and
    in silence, and both processes trained on, unlocked."""
    out = tmp_path / "run"
    proc = _start_nproc_run(out)
    launcher_pid = next(int(p.name) for p in Path("/proc").glob("[0-9]*") if "torchrun_main" in _cmdline(p)
                        and str(out) in _cmdline(p))
    os.kill(launcher_pid, signal.SIGKILL)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, rest
    assert "the launcher of the 2 processes was killed by SIGKILL" in rest and "Traceback" not in rest, rest
    assert not _running(out), _running(out)  # they ended before the command did
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)["state"]
    assert state["batch_in_epoch"] > 0, state


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_stop_signal_to_one_process_is_reported_as_that_signal(tmp_path: Path):
    """SIGTERM to rank 1 alone (a scheduler stopping one task) stopped every rank at a checkpoint, but
    rank 0 reported it as Ctrl-C ("interrupted", 130): its own default signal."""
    out = tmp_path / "run"
    proc = _start_nproc_run(out)
    rank1 = next(int(p.name) for p in Path("/proc").glob("[0-9]*") if "-m ssvi_cli train" in _cmdline(p)
                 and str(out) in _cmdline(p) and b"\0RANK=1\0" in b"\0" + (p / "environ").read_bytes())
    os.kill(rank1, signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, rest
    assert rest.count("stopped by SIGTERM at step") == 1 and "interrupted" not in rest, rest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the launcher through /proc")
def test_a_stop_before_the_processes_start_is_the_stop_not_a_killed_launcher(tmp_path: Path):
    """A SIGTERM passed on while the launcher was starting ended it before it handled signals: the
    user's own stop was reported as "the launcher ... was killed", exit 1, pointing at --resume."""
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ssvi_cli", "train", "--nproc", "2", "--set", "train.epochs=3",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 60
    while not any("torchrun_main" in c for c in _running(out)) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, rest
    assert rest.strip().splitlines()[-1] == "stopped by SIGTERM before the training processes started: nothing " \
                                           "was trained", rest


def test_a_killed_launcher_is_told_as_what_became_of_its_processes(tmp_path: Path):
    said = {o: launcher.ending_message(launcher.Launched(-9, None, o), 2, tmp_path) for o in ("stopped", "killed", "unwatched")}
    assert all(m.startswith("error: the launcher of the 2 processes was killed by SIGKILL; ") for m in said.values())
    assert "they stopped, each at a checkpoint" in said["stopped"] and "60 s later were killed" in said["killed"]
    assert "make sure none is still running" in said["unwatched"]
    assert "signal 40" in launcher.ending_message(launcher.Launched(-40), 2, tmp_path)  # a real-time signal
    assert launcher.ending_message(launcher.Launched(143, signal.SIGTERM), 2, tmp_path) == ""  # they said it


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_nproc_forwards_the_same_arguments_to_the_launcher(tmp_path: Path, monkeypatch):
    from ssvi_cli.cli import app

    seen: dict[str, Any] = {}

    def fake_launch(nproc: int, args: list[str], env: dict[str, str], pass_fds: list[int]) -> tuple[int, None]:
        seen.update(nproc=nproc, args=args, env=env, pass_fds=pass_fds)
        return launcher.Launched(0)

    monkeypatch.setattr(launcher, "launch", fake_launch)
    for key in distributed.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(app, ["train", "--nproc", "3", "--batch-size", "16", "--precision", "bf16",
                                      "--set", "train.epochs=1", "--set", "sparse.delta_t=5", "--force",
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    args = seen["args"]
    assert seen["nproc"] == 3 and args[0] == "train" and "--nproc" not in args
    assert args[args.index("--batch-size") + 1] == "16" and args[args.index("--precision") + 1] == "bf16"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--set"] == ["train.epochs=1", "sparse.delta_t=5"]
    assert "--force" in args and args[-2:] == ["--out", str(tmp_path / "r")]
    assert seen["env"] == {"SSVI_RUN_LOCK_HELD": str((tmp_path / "r").resolve())}  # held here for rank 0
    assert len(seen["pass_fds"]) == 1  # the lock, which the launcher holds too
    cmd = launcher.launch_command(3, args)
    assert "torchrun_main" in cmd[2] and cmd[3:5] == ["--standalone", "--nproc-per-node=3"]
    assert cmd[5:8] == ["-m", "ssvi_cli", "train"]


@pytest.mark.parametrize("exits, code", [({0: -15, 1: 143}, 143), ({0: 143, 1: 143}, 143), ({0: -9, 1: 2}, 2),
                                         ({0: -15, 1: -15}, 1), ({1: 1, 0: 130}, 130)])
def test_the_launcher_ends_with_the_processes_own_exit_code(monkeypatch, exits, code):
    """SIGTERM to rank 1 alone: rank 0 stopped at the checkpoint a little later, and torchrun, seeing
    rank 1 end, stopped rank 0 with SIGTERM as it finished (under load): its -15 made the command exit 1
    instead of 143. A code a process gave itself wins over the signal torchrun stopped the rest with."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def fail(argv):
        raise ChildFailedError("ssvi", {rank: ProcessFailure(rank, 100 + rank, exit_code, "")
                                        for rank, exit_code in exits.items()})

    monkeypatch.setattr(torchrun, "main", fail)
    monkeypatch.setattr(launcher, "stop_with_parent", lambda: None)
    monkeypatch.setenv(launcher.PARENT_ENV, "1")
    with pytest.raises(SystemExit) as ended:
        launcher.torchrun_main(["-m", "ssvi_cli", "train"])
    assert ended.value.code == code


def test_nproc_forwards_debug_to_its_processes(tmp_path: Path, monkeypatch):
    """ssvi takes --debug before the command parses its options: the processes never saw it."""
    from ssvi_cli.cli import run

    seen: list[list[str]] = []
    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): seen.append(args) or launcher.Launched(0))
    for key in distributed.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for debug in (["--debug"], []):
        assert run(["train", "--nproc", "2", *debug, "--set", "train.epochs=1", "--out", str(tmp_path / "r"),
                    "--force"]) == 0
    assert seen[0][:2] == ["train", "--debug"] and "--debug" not in seen[1]


def test_nproc_checks_the_run_directory_before_launching(tmp_path: Path, monkeypatch):
    from ssvi_cli.cli import run

    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): pytest.fail("must not launch"))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("x")
    assert run(["train", "--nproc", "2", "--out", str(tmp_path / "r")]) == 2


def test_more_processes_than_the_memory_holds_are_refused_before_anything_starts(tmp_path: Path, monkeypatch, capsys):
    """--nproc 99 on a 2-core machine with 24 GiB started 99 processes that each loaded torch: the
    system ran out of memory and killed processes, other commands' too."""
    from ssvi_cli.cli import run

    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): pytest.fail("must not launch"))
    sizes = {"VmRSS": 512 * 2**20, "MemAvailable": 4 * 2**30}  # 0.5 GiB each, 4 GiB free: 7 fit (and the launcher)
    monkeypatch.setattr(launcher, "_meminfo_bytes", lambda path, key: sizes[key])
    capsys.readouterr()
    assert run(["train", "--nproc", "8", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --nproc 8: 8 processes and their launcher, each at least the size of this one (0.5 GiB, torch "
        "loaded), need 4.5 GiB; this machine has 4.0 GiB available; give --nproc 7 or fewer"]
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(launcher, "_meminfo_bytes", lambda path, key: None)  # not Linux: nothing checked
    launcher.check_memory(1000)
    sizes["MemAvailable"] = 4 * 2**30 + 1
    monkeypatch.setattr(launcher, "_meminfo_bytes", lambda path, key: sizes[key])
    launcher.check_memory(7)
    monkeypatch.undo()
    if sys.platform.startswith("linux"):  # the sizes are read from /proc
        assert launcher._meminfo_bytes("/proc/self/status", "VmRSS") > 2**20
        assert launcher._meminfo_bytes("/proc/meminfo", "MemAvailable") > 2**20


def test_resume_of_a_run_in_use_says_so_before_looking_for_its_checkpoint(tmp_path: Path, monkeypatch, capsys):
    """A --nproc run just started (no checkpoint yet) was "has no checkpoint ... is it a run directory
    written by 'ssvi train'?" to a --resume of it."""
    from ssvi_cli.cli import run
    from ssvi_cli.runs.rundir import RunDir

    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): pytest.fail("must not launch"))
    started = tmp_path / "r"
    started.mkdir()
    (started / "config.yaml").write_text("model: {}\n")
    capsys.readouterr()
    for nproc in (["--nproc", "2"], []):
        with RunDir(started).hold():  # the other process, in its first steps
            assert run(["train", "--resume", str(started), *nproc]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the run is in use by another ssvi process" in err, err


def test_nproc_checks_the_whole_run_once_before_launching_or_replacing_a_run(tmp_path: Path, monkeypatch, capsys):
    """Mistakes read as without --nproc (one line, exit 2), before any process starts, and --force
    never costs the old run a refused one would have replaced."""
    from ssvi_cli.cli import run

    old = tmp_path / "old"
    assert run(["train", "--epochs", "1", "--batch-size", "1", "--set", "data.max_train=40",
                "--set", "train.eval_samples=1", "--out", str(old)]) == 0
    (old / "summary.json").unlink()  # as if stopped after its last checkpoint
    (old / "model.safetensors").unlink()
    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): pytest.fail("must not launch"))
    capsys.readouterr()
    for args, words in [
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nope"], "--device"),
        (["--resume", str(tmp_path / "none")], "does not exist"),
        (["--resume", str(old), "--epochs", "3"], "drop --epochs"),
        (["--resume", str(old)], "was trained with a global batch of 1, which cannot feed 2 processes"),
        (["--data", "mnist", "--data-dir", str(tmp_path / "nodata"), "--out", str(old), "--force"], "mnist not found"),
        (["--sparsity", "0.99999", "--set", "model.widths=[4]"], "leaves layer first (256 weights) with no active"),
        (["--set", "data.max_train=1", "--out", str(old), "--force"], "has 1 example, too few to give each of 2 processes one; train on at most 1 process"),
    ]:
        assert run(["train", "--nproc", "2", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert (old / "checkpoints").is_dir() and (old / "config.yaml").is_file()  # --force removed nothing


def test_a_training_split_smaller_than_the_processes_is_refused_before_the_run_is_claimed(tmp_path: Path):
    """Each process needs an example: fewer would give an epoch of no step (a division by zero in the
    KL weight); refused where the run is planned, before a claim (and ``--force``) touches its folder,
    and again by the trainer for a resume on more processes."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.training.plan import RunPlan

    cfg = digits_cfg(4, **{"data.max_train": 2})
    with pytest.raises(ConfigError, match="has 2 examples, too few to give each of 3 processes one"):
        RunPlan.new(cfg, tmp_path / "r", world_size=3)
    assert not (tmp_path / "r").exists()
    plan = RunPlan.new(cfg, tmp_path / "r", world_size=2)  # one each: trains
    assert len(plan.splits.train) == 2
    with pytest.raises(ConfigError, match="too few to give each of 3"):
        Trainer.from_plan(plan, dist_info=DistInfo(rank=0, world_size=3, local_rank=0))


# ------------------------------------------------------------------ pieces

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_partition_each_global_batch(world: int):
    order = torch.randperm(103, generator=torch.Generator().manual_seed(1))
    batches = distributed.global_batches(order, 10, world)
    for batch in batches:
        parts = [distributed.shard(batch, DistInfo(r, r, world)) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) > 0
    # 103 = 10 x 10 + 3: with 2 or more ranks one of them would train on a single sample of the last
    # 3 (BatchNorm cannot), or on none, so that batch is dropped.
    assert len(batches) == (11 if world == 1 else 10)


def test_a_last_batch_of_one_sample_is_dropped_unless_it_is_the_only_one():
    assert [len(b) for b in distributed.global_batches(torch.arange(21), 10, 1)] == [10, 10]
    assert [len(b) for b in distributed.global_batches(torch.arange(22), 10, 1)] == [10, 10, 2]
    assert [len(b) for b in distributed.global_batches(torch.arange(1), 10, 1)] == [1]
    assert distributed.global_batches(torch.arange(3), 10, 4) == []  # a rank would have no data
    # a batch of one sample per rank is the user's choice: every full batch stays
    assert len(distributed.global_batches(torch.arange(10), 1, 1)) == 10
    assert [len(b) for b in distributed.global_batches(torch.arange(10), 2, 2)] == [2] * 5
    assert [len(b) for b in distributed.global_batches(torch.arange(11), 2, 2)] == [2] * 5


def test_info_from_env():
    assert distributed.info_from_env({}) is None
    info = distributed.info_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert info == DistInfo(3, 1, 4) and not info.is_main and info.enabled


def test_support_checksum_sees_a_single_moved_index():
    layer = SparseLinear(20, 10, bayesian=True)
    idx = torch.arange(0, 200, 4)
    layer.set_support(idx, torch.zeros(50), torch.zeros(50))
    before = distributed.support_checksums(layer)
    moved = idx.clone()
    moved[7] += 1
    layer.set_support(moved, torch.zeros(50), torch.zeros(50))
    assert not torch.equal(before, distributed.support_checksums(layer))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_the_lrt_variance_in_float32(precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    trainer = Trainer.create(digits_cfg(32, **{"train.precision": precision, "sparse.delta_t": 4}),
                             Path("/nonexistent-not-written"))
    trainer.is_main = False  # nothing touches the disk in this test
    x, y = next(iter(trainer.batches(0)))
    layer = sparse_layers(trainer.model)[1][1]
    with torch.autocast("cpu", dtype=dtype):
        mean, var = layer.moments(torch.randn(4, layer.weight_shape[1]))
    assert var.dtype == torch.float32
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(5):  # t = 0; capture steps 1, 2 (parameter steps, scaled leaf gradients); subspace step 4
        out = trainer.train_step(x, y)
        assert torch.isfinite(torch.tensor(out["loss"]))
    assert trainer.state.subspace_steps == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert trainer.scaler.is_enabled() == (precision == "fp16")


# ------------------------------------------------------------------ the GPU path

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_with_each_precision(tmp_path: Path, precision: str):
    trainer = Trainer.create(digits_cfg(64, **{"train.device": "cuda", "train.precision": precision,
                                               "train.epochs": 4}), tmp_path / precision)
    summary = trainer.fit()
    assert trainer.device.type == "cuda" and torch.backends.cudnn.benchmark
    assert summary["subspace_steps"] > 0 and summary["test_accuracy_mean_net"] > 0.7
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.gpu
@needs_cuda
def test_cuda_lrt_variance_is_float32_under_bf16_autocast():
    layer = SparseLinear(64, 32, bayesian=True).cuda()
    idx = torch.arange(0, 64 * 32, 7, device="cuda")
    layer.set_support(idx, torch.randn(len(idx), device="cuda") * 0.1, torch.full((len(idx),), -9.0, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mean, var = layer.moments(torch.randn(8, 64, device="cuda"))
    assert var.dtype == torch.float32 and (var > 0).all()  # sigma^2 ~ 1e-8 would underflow in fp16


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dense", [False, True])
def test_model_on_cuda_writes_a_file_that_predicts_like_it(tmp_path: Path, dense: bool):
    from ssvi_cli.modelfile import read_model_file, write_model_file
    from ssvi_cli.prediction import predict_batch
    trainer = Trainer.create(digits_cfg(64, **{"train.device": "cuda", "train.epochs": 1}), tmp_path / "run")
    path = tmp_path / "m.safetensors"
    write_model_file(trainer.model, path, trainer.plan.card, dense=dense)  # dense scatters over a CUDA index
    loaded = read_model_file(path).model
    x = torch.randn(16, 1, 8, 8)
    expected, _ = predict_batch(trainer.model.eval(), x.cuda(), mode="mean")
    got, _ = predict_batch(loaded.eval(), x, mode="mean")
    torch.testing.assert_close(got, expected.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cli_nproc_on_two_gpus_with_nccl(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "ssvi_cli", "train", "--nproc", "2", "--device", "cuda", "--precision", "bf16",
         "--epochs", "2", "--out", str(tmp_path / "run"), "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["world_size"] == 2


def test_ctrl_c_while_the_launcher_imports_torch_ends_it_by_sigint_without_a_traceback(tmp_path: Path):
    """A Ctrl-C in the second or two the launcher spends importing torch printed Python's traceback
    above 'interrupted before the training processes started'."""
    (tmp_path / "slow_launcher.py").write_text("def torchrun_main(argv):\n    raise KeyboardInterrupt\n")
    cmd = launcher.launch_command(2, ["train"])
    code = cmd[2].replace(launcher.__name__, "slow_launcher")
    proc = subprocess.run([sys.executable, "-c", code, *cmd[3:]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == -signal.SIGINT, proc.stderr  # what ending_message reads as interrupted
    assert "Traceback" not in proc.stderr
    assert launcher.ending_message(launcher.Launched(proc.returncode, signal.SIGINT), 2, tmp_path) == \
        "interrupted before the training processes started: nothing was trained"
