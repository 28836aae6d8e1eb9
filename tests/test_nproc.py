"""``ssvi train --nproc N``: the launcher, its processes (2 CPU processes with gloo on digits) and
the signals that stop them: Ctrl-C, SIGTERM, SIGHUP, a killed command or launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ssvi_cli import config as C, machine
from ssvi_cli.training import distributed, launcher

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
    origin, first = (out / "config.yaml").read_text().splitlines()[:2]
    assert origin.startswith("# from the preset digits_mlp, then this command line's flags and --set values")
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


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes through /proc")
def test_a_stop_while_the_processes_start_is_said_once_they_have_ended(tmp_path: Path):
    """A SIGTERM while the processes loaded torch (seconds, before training handles a stop) ended
    them silently, and the command exited 143 without a word, the folder left with its lock alone."""
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ssvi_cli", "train", "--nproc", "2", "--set", "train.epochs=3",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("torchrun_main" not in c and "--nproc" not in c for c in _running(out)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and not list(out.glob("checkpoints/*")), rest
    assert rest.strip().splitlines()[-1] == "stopped by SIGTERM before the training processes started: nothing " \
                                           "was trained", rest
    # a Ctrl-C before training: the processes end at once (ssvi_cli/__main__.py), this says it
    assert launcher.ending_message(launcher.Launched(130, signal.SIGINT), 2, tmp_path, untrained=True) == \
        "interrupted before the training processes started: nothing was trained"


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


def test_a_stop_as_the_finished_processes_end_says_the_run_had_finished(tmp_path: Path, monkeypatch, capsys):
    """A Ctrl-C in the second or two the launcher takes to end after the run's summary (torchrun's own
    teardown) exited 130 with nothing said, as if the run had stopped before its end. It still exits
    130 (a shell's loop of runs stops on the Ctrl-C), saying that the run had finished."""
    from ssvi_cli.cli import run

    def finished_then_stopped(nproc, args, env, pass_fds=()):
        path = Path(env["SSVI_RUN_LOCK_HELD"])
        (path / "config.yaml").write_text("{}")  # as rank 0 writes it when training begins
        (path / "summary.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"0")
        return launcher.Launched(130, signal.SIGINT)

    for key in distributed.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(launcher, "launch", finished_then_stopped)
    assert run(["train", "--nproc", "2", "--set", "train.epochs=1", "--out", str(tmp_path / "r")]) == 130
    assert "interrupted as the training processes ended: the run had finished, its model file and summary written" \
        in " ".join(capsys.readouterr().err.split())
    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): launcher.Launched(130, signal.SIGINT))
    assert run(["train", "--nproc", "2", "--set", "train.epochs=1", "--out", str(tmp_path / "s")]) == 130
    assert "the run had finished" not in capsys.readouterr().err  # stopped at a checkpoint: the processes said so


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


def test_nproc_checks_the_run_directory_before_launching(tmp_path: Path, monkeypatch, capsys):
    from ssvi_cli.cli import run

    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): pytest.fail("must not launch"))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("x")
    capsys.readouterr()
    assert run(["train", "--nproc", "2", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {tmp_path / 'r'} holds config.yaml and is not a run "
                                               "folder; choose another --out (--force replaces only a run)")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["config.yaml"]  # checked, not claimed: no lock left


def test_more_processes_than_the_memory_holds_are_refused_before_anything_starts(tmp_path: Path, monkeypatch, capsys):
    """--nproc 99 on a 2-core machine with 24 GiB started 99 processes that each loaded torch: the
    system ran out of memory and killed processes, other commands' too."""
    from ssvi_cli.cli import run

    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): pytest.fail("must not launch"))
    sizes = {"VmRSS": 512 * 2**20, "MemAvailable": 4 * 2**30}  # 0.5 GiB each, 4 GiB free: 7 fit (and the launcher)
    monkeypatch.setattr(machine, "meminfo_bytes", lambda path, key: sizes[key])
    capsys.readouterr()
    assert run(["train", "--nproc", "8", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --nproc 8: 8 processes and their launcher, each at least the size of this one (0.5 GiB, torch "
        "loaded), need 4.5 GiB; this machine has 4.0 GiB available; give --nproc 7 or fewer"]
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(machine, "meminfo_bytes", lambda path, key: None)  # not Linux: nothing checked
    launcher.check_memory(1000)
    sizes["MemAvailable"] = 4 * 2**30  # exactly what 7 and the launcher take: they fit
    monkeypatch.setattr(machine, "meminfo_bytes", lambda path, key: sizes[key])
    launcher.check_memory(7)
    with pytest.raises(Exception, match="--nproc 8: 8 processes"):
        launcher.check_memory(8)
    monkeypatch.undo()
    if sys.platform.startswith("linux"):  # the sizes are read from /proc
        assert machine.own_memory() > 2**20 and machine.available_memory() > 2**20


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


def test_a_model_that_cannot_train_on_one_example_per_process_is_refused_before_it_starts(tmp_path: Path, monkeypatch,
                                                                                          capsys):
    """ResNet-18's BatchNorm on its last, 1x1 feature map takes no single example: a batch of one, or a
    resume on more processes that gives one of them a single example (a global batch of 3 over 2),
    failed at the first step, under --nproc with every rank's error, gloo's and torchrun's log lines.
    One line, exit 2, before anything is written or launched."""
    from ssvi_cli.cli import run

    monkeypatch.setattr(launcher, "launch", lambda nproc, args, env, pass_fds=(): pytest.fail("must not launch"))
    tiny = ["--model", "resnet18", "--epochs", "1", "--set", "data.max_train=12", "--set", "train.eval_samples=1"]
    for nproc in ([], ["--nproc", "2"]):
        assert run(["train", *tiny, "--batch-size", "1", *nproc, "--out", str(tmp_path / "one")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "resnet18 cannot train on one example per step (train.batch_size=1); give each " \
            "process a batch of 2 or more (Expected more than 1 value per channel when training" in err, err
    assert not (tmp_path / "one").exists()
    three = tmp_path / "three"
    assert run(["train", *tiny, "--batch-size", "3", "--out", str(three)]) == 0
    (three / "summary.json").unlink()  # as if stopped after its last checkpoint
    (three / "model.safetensors").unlink()
    capsys.readouterr()
    assert run(["train", "--resume", str(three), "--nproc", "2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "one example per process, which a global batch of 3 over 2 processes gives; resume it on at most 1 " \
           "(--nproc 1)" in err, err


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


def test_ctrl_c_in_the_launchers_python_start_up_waits_for_its_code(tmp_path: Path, monkeypatch, capfd):
    """A Ctrl-C passed to the launcher while Python itself started (its site import) ended it in "Fatal
    Python error: init_import_site" and a traceback: it is held until the launcher's code takes it."""
    (tmp_path / "slow_launcher.py").write_text("import time\ndef torchrun_main(argv):\n    time.sleep(60)\n")
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(1.5)\n")  # a slow start-up, as under load
    real, popen = launcher.launch_command, subprocess.Popen
    monkeypatch.setattr(launcher, "launch_command",
                        lambda n, a: [part.replace(launcher.__name__, "slow_launcher") for part in real(n, a)])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))

    def interrupted_as_it_starts(*args, **kwargs):
        proc = popen(*args, **kwargs)
        time.sleep(0.5)  # inside sitecustomize's sleep
        proc.send_signal(signal.SIGINT)
        return proc

    monkeypatch.setattr(launcher.subprocess, "Popen", interrupted_as_it_starts)
    started = time.monotonic()
    ended = launcher.launch(2, ["train"])
    err = capfd.readouterr().err
    assert ended.code == -signal.SIGINT and "Fatal Python error" not in err and "Traceback" not in err, err
    assert time.monotonic() - started < 30  # taken once let through, not after torchrun_main's minute
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # this process's own mask as it was


def test_an_unreadable_newest_checkpoint_is_warned_of_once_under_nproc(tmp_path: Path, caplog):
    """The check before launching passed over it with the warning, and rank 0 again: said twice."""
    from ssvi_cli.cli import run
    from ssvi_cli.runs.rundir import RunDir
    from ssvi_cli.training.plan import preflight_resume

    out = tmp_path / "r"
    assert run(["train", "--epochs", "2", "--set", "model.widths=[8]", "--set", "data.max_train=64",
                "--set", "train.eval_samples=1", "--set", "train.checkpoint_every=1", "--out", str(out)]) == 0
    (out / "summary.json").unlink()  # as if stopped after its last checkpoint
    (out / "model.safetensors").unlink()
    newest = RunDir(out).checkpoints()[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    caplog.clear()
    preflight_resume(out, world_size=2)
    assert "unreadable" not in caplog.text
    RunDir(out).load_latest()  # as rank 0 resumes
    assert caplog.text.count("is unreadable or corrupted") == 1


@pytest.mark.slow
def test_nproc_says_a_warning_once_and_no_torchrun_line_for_a_damaged_image(tmp_path: Path):
    """A warning was said three times (the checks before the launch, then each rank) and torchrun added
    its own line for the failed process; each rank still says the error it meets."""
    import numpy as np
    from PIL import Image

    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * c + i, np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    (tmp_path / "imgs" / "loose.png").write_bytes(b"x")  # outside the class folders: passed over, warned of
    (tmp_path / "imgs" / "c0" / "bad.png").write_bytes(b"not a png")  # met by every rank as it decodes
    proc = subprocess.run(
        [sys.executable, "-m", "ssvi_cli", "train", "--nproc", "2", "--device", "cpu", "--epochs", "1",
         "--data", f"imagefolder:{tmp_path / 'imgs'}", "--set", "data.image_size=8", "--set", "data.channels=1",
         "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert sum("1 image outside the class folders is passed over" in line for line in lines) == 1, proc.stderr
    assert 1 <= sum(line.startswith("error: image ") and "bad.png cannot be read" in line for line in lines) <= 2
    assert not any("exitcode" in line or "api.py" in line or "killed by" in line for line in lines), proc.stderr


def test_a_process_killed_by_a_signal_is_named_and_torchruns_own_stops_are_not(capsys):
    from types import SimpleNamespace as F

    launcher._say_killed({0: F(exitcode=-signal.SIGTERM), 1: F(exitcode=-signal.SIGKILL)})
    assert capsys.readouterr().err == (
        "error: the training process of rank 1 was killed by SIGKILL (the system's out-of-memory killer?); the "
        "run's last checkpoint, if any, resumes it: ssvi train --resume RUN_DIR --nproc N\n")
    launcher._say_killed({1: F(exitcode=-signal.SIGTERM)})  # only torchrun's stop: that one, said
    assert "rank 1 was killed by SIGTERM;" in capsys.readouterr().err
    # another process said its own error (rank 0's broken connection to the killed one): still named
    launcher._say_killed({0: F(exitcode=1), 1: F(exitcode=-signal.SIGKILL)}, said=True)
    assert "rank 1 was killed by SIGKILL" in capsys.readouterr().err
    launcher._say_killed({0: F(exitcode=2), 1: F(exitcode=-signal.SIGTERM)}, said=True)  # torchrun's own stop
    assert capsys.readouterr().err == ""


def test_the_checks_before_the_launch_say_their_warnings_only_when_they_fail(caplog):
    import logging

    from ssvi_cli.cli.train import _said_on_failure

    log = logging.getLogger("ssvi_cli.data.imagefolder")
    with caplog.at_level("WARNING"):
        with _said_on_failure():  # passed: rank 0 says it again as it reads the data
            log.warning("an image passed over")
        assert "an image passed over" not in caplog.text
        with pytest.raises(ValueError), _said_on_failure():
            log.warning("every image passed over")
            raise ValueError("no images")
        assert "every image passed over" in caplog.text  # it explains the error
    assert logging.getLogger("ssvi_cli").propagate


def test_a_worker_stopped_before_its_training_ends_at_once_and_silently(tmp_path: Path):
    """A Ctrl-C passed on to the processes while they imported left a module half made: rank 0 said
    numpy's "AttributeError: module 'numpy' has no attribute 'matrix'" instead of the stop, or Python
    printed KeyboardInterrupt tracebacks. Before training a worker has written nothing: it ends at once
    with 130, and ``ssvi train --nproc`` says the run was interrupted before it trained."""
    import time

    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(launcher.free_port()), "PYTHONWARNINGS": "ignore",
           "SSVI_RUN_LOCK_HELD": str(tmp_path / "r")}  # started by ssvi train --nproc
    proc = subprocess.Popen([sys.executable, "-m", "ssvi_cli", "train", "--epochs", "1", "--out", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.5)  # importing
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "" and err == "", err
    assert not (tmp_path / "r").exists()


def test_the_handler_for_the_time_before_training_gives_way_to_ctrl_c_once_training_has_taken_it(monkeypatch):
    """The worker's end-at-once handler came back after training (stop_signals restored it), so a
    Ctrl-C while the summary printed ended the process with nothing said."""
    import importlib.util

    from ssvi_cli.training.stops import stop_signals

    from ssvi_cli.runs.rundir import LOCK_HELD_ENV

    for key, value in {LOCK_HELD_ENV: "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)  # a --nproc training process's variables and command
    monkeypatch.setattr(sys, "argv", ["ssvi", "train"])
    spec = importlib.util.spec_from_file_location("ssvi_main", Path(launcher.__file__).parents[1] / "__main__.py")
    main_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_module)  # not as __main__: nothing installed, nothing run

    assert f'"{LOCK_HELD_ENV}"' in Path(spec.origin).read_text()  # the launcher's variable, spelt out there
    assert signal.getsignal(signal.SIGINT) is not main_module._ends_at_once
    before = signal.signal(signal.SIGINT, main_module._ends_at_once)
    try:
        with stop_signals(lambda signum: None):
            assert signal.getsignal(signal.SIGINT) is not main_module._ends_at_once
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_claim_refused_under_nproc_is_said_as_it_is(tmp_path: Path, monkeypatch, capsys):
    """A failure before the launch met the put-back check in _launch's finally before the names it
    reads were set: a NameError would have hidden the refusal."""
    from ssvi_cli.cli import run
    from ssvi_cli.runs.rundir import RunDir, RunDirError

    def refused(self, force=False):
        raise RunDirError(f"--out {self.path} refused here")

    monkeypatch.setattr(RunDir, "claim", refused)
    assert run(["train", "--nproc", "2", "--device", "cpu", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --out {tmp_path / 'r'} refused here"


def test_ctrl_c_ends_a_rank_waiting_for_the_others_at_once(tmp_path: Path):
    """A rank waiting in the process group's rendezvous (C++, where Python's handler never runs) let
    Ctrl-C wait until torchrun killed it 30 s later; it ends by SIGINT at once now: nothing is written
    yet."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from ssvi_cli.training import distributed as d\n"
            "print('waiting', flush=True)\n"
            "d.setup(d.DistInfo(0, 0, 2), 'cpu', timeout_s=120)  # rank 1 never comes\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting", proc.stderr.read()
        time.sleep(3)  # into the rendezvous
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == -signal.SIGINT  # not after the 120 s timeout
    finally:
        proc.kill()
        proc.wait()


def test_the_rendezvous_keeps_a_handler_of_the_callers_own():
    def mine(*_: Any) -> None:
        pass

    def _until_training(*_: Any) -> None:
        pass

    _until_training.ssvi_until_training = True  # type: ignore[attr-defined]  # as __main__._ends_at_once

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, mine)
        with distributed._ctrl_c_ends_at_once():
            assert signal.getsignal(signal.SIGINT) is mine
        for ours in (signal.default_int_handler, _until_training):  # Python's own; __main__'s under --nproc
            signal.signal(signal.SIGINT, ours)
            with distributed._ctrl_c_ends_at_once():
                assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
            assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_launchers_environment_fits_the_system_and_keeps_the_users(monkeypatch):
    """torch's Windows builds lack libuv (USE_LIBUV=0) and gloo on a Mac may not find its address by
    the host's .local name (GLOO_SOCKET_IFNAME=lo0); a value the user set is kept, and every system
    shares the cores between the processes."""
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("USE_LIBUV", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launcher, "usable_cpus", lambda: 8)
    mac, windows, linux = (launcher.launch_env(2, {"X": "1"}, platform) for platform in ("darwin", "win32", "linux"))
    assert mac["GLOO_SOCKET_IFNAME"] == "lo0" and "USE_LIBUV" not in mac
    assert windows["USE_LIBUV"] == "0" and "GLOO_SOCKET_IFNAME" not in windows
    assert "USE_LIBUV" not in linux and "GLOO_SOCKET_IFNAME" not in linux
    assert all(e["X"] == "1" and e["OMP_NUM_THREADS"] == "4" and e[launcher.PARENT_ENV] == str(os.getpid())
               for e in (mac, windows, linux))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "en0")
    assert launcher.launch_env(2, None, "darwin")["GLOO_SOCKET_IFNAME"] == "en0"
    assert launcher.launch_env(2, {"OMP_NUM_THREADS": "3"}, "linux")["OMP_NUM_THREADS"] == "3"
