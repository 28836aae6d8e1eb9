"""Killing a process never leaves a half-written file under a final name; Ctrl-C or SIGTERM on a
real ``ssvi train`` writes a checkpoint, and the resumed run gives the same bits as an uninterrupted one."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssvi_cli.runs import checkpoint as ckpt
from ssvi_cli.modelfile import read_model_file
from ssvi_cli.fileio import append_jsonl, read_jsonl

# One thread per child: children run side by side on a small shared machine, where OpenMP threads
# of several processes spinning on the same cores slow everything down many times over.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A child that writes checkpoints and model files. "slow-checkpoint"/"slow-export": one good write,
# then a second whose writer stops half way (printing HALF) so the parent can kill it mid-write.
# "loop": real writers, forever, alternating; the parent kills it at a random moment.
CHILD = textwrap.dedent("""
    import io, os, sys, time
    from pathlib import Path
    import torch
    import safetensors.torch as st
    from ssvi_cli.runs import checkpoint as ckpt
    from ssvi_cli import modelfile as export
    from ssvi_cli.modelfile import writer
    from ssvi_cli import config as C
    from ssvi_cli.data import get_spec
    from ssvi_cli.training.plan import init_model, make_model

    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    cfg = C.load_preset("digits_mlp")
    spec = get_spec("digits")
    model = make_model(cfg, spec)

    def reinit(seed):
        init_model(model, cfg, torch.Generator().manual_seed(seed))

    def write_checkpoint(step):
        ckpt.save_checkpoint(run_dir, step, {"config": cfg.to_dict(), "model": model.state_dict()}, keep=2)

    def write_model():
        meta = {"name": "mlp", "widths": list(cfg.model.widths), "bayesian": True, "sigma_param": "softplus"}
        card = export.ModelCard.from_metadata({"architecture": meta, "data_spec": spec.to_dict(),
                                                "training": {"step": step}, "metrics": {}})
        export.write_model_file(model, run_dir / "model.safetensors", card)

    def halfway(data, target):
        with open(target, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            print("HALF", target, flush=True)
            time.sleep(120)
            fh.write(data[len(data) // 2:])

    def slow_torch_save(obj, target):
        buf = io.BytesIO()
        real_torch_save(obj, buf)
        halfway(buf.getvalue(), target)

    def slow_save_file(tensors, target, metadata=None):
        halfway(st.save(tensors, metadata=metadata), target)

    step = 1
    reinit(step)
    write_checkpoint(step)
    write_model()
    print("READY", flush=True)
    real_torch_save = torch.save
    if mode == "slow-checkpoint":
        torch.save = slow_torch_save
    elif mode == "slow-export":
        writer.save_file = slow_save_file
    while True:
        step += 1
        reinit(step)
        write_checkpoint(step)
        write_model()
""")


def start_child(tmp_path: Path, name: str, mode: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    run_dir = tmp_path / name
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    return proc, run_dir


def wait_for(proc: subprocess.Popen, word: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(word):
            return line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"child never printed {word}: {proc.stderr.read()[-2000:]}")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def assert_final_files_complete(run_dir: Path) -> list[Path]:
    """Every file under a final name loads; returns the checkpoints."""
    found = ckpt.list_checkpoints(run_dir)
    assert found, "no checkpoint survived"
    for path in found:
        data = ckpt.load_checkpoint(path)
        assert set(data) >= {"config", "model"}, path
    read_model_file(run_dir / "model.safetensors")
    return found


def test_sigkill_mid_write_keeps_the_previous_checkpoint_and_model_file(tmp_path):
    children = {mode: start_child(tmp_path, mode, mode) for mode in ("slow-checkpoint", "slow-export")}
    before = {}
    for mode, (proc, run_dir) in children.items():
        wait_for(proc, "READY")
        before[mode] = ((run_dir / "model.safetensors").read_bytes(),
                        ckpt.list_checkpoints(run_dir)[0].read_bytes())
    for mode, (proc, run_dir) in children.items():
        half = Path(wait_for(proc, "HALF").split(" ", 1)[1].strip())
        kill(proc)
        # The kill landed mid-write: half a file exists, but only under its temporary name.
        assert half.exists() and half.name.startswith(".") and half.name.endswith(".tmp"), half
        model_bytes, checkpoint_bytes = before[mode]
        found = assert_final_files_complete(run_dir)
        assert [p.name for p in found] == (["checkpoint-00000001.pt"] if mode == "slow-checkpoint"
                                           else ["checkpoint-00000001.pt", "checkpoint-00000002.pt"])
        assert found[0].read_bytes() == checkpoint_bytes
        assert (run_dir / "model.safetensors").read_bytes() == model_bytes
        # A later run of 'ssvi train --resume' starts from the newest complete checkpoint, and its
        # next checkpoint clears the half-written leftover.
        assert ckpt.latest_checkpoint(run_dir) == found[-1]
        if mode == "slow-checkpoint":
            ckpt.save_checkpoint(run_dir, 3, ckpt.load_checkpoint(found[-1]), keep=2)
            assert not half.exists()
            assert sorted(p.name for p in half.parent.iterdir()) == ["checkpoint-00000001.pt",
                                                                     "checkpoint-00000003.pt"]


def test_sigkill_at_random_moments_never_leaves_a_half_written_file(tmp_path):
    rng = random.Random(0)
    children = [start_child(tmp_path, f"loop{i}", "loop") for i in range(3)]
    for proc, _ in children:
        wait_for(proc, "READY")
    for proc, run_dir in children:
        time.sleep(rng.uniform(0.05, 1.0))
        kill(proc)
    for proc, run_dir in children:
        found = assert_final_files_complete(run_dir)
        # keep=2, plus one when the kill fell between writing a checkpoint and pruning the oldest.
        assert len(found) <= 3


def test_a_torn_metrics_line_loses_only_itself(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1})
    with open(path, "ab") as fh:
        fh.write(b'{"epoch": 2, "lo')  # a crash mid-line
    assert read_jsonl(path) == [{"epoch": 1}]
    append_jsonl(path, {"epoch": 2})  # the resumed run writes the record again
    append_jsonl(path, {"epoch": 3})
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]


TRAIN = ["train", "--epochs", "2", "--batch-size", "4", "--set", "data.max_train=600",
         "--set", "sparse.delta_t=9", "--set", "train.eval_samples=1"]


def ssvi(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ssvi_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=as_foreground)


def as_foreground() -> None:
    """SIGINT as a terminal's foreground job has it, even when the tests run in a shell's background
    job (which ignores it, and ssvi then leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_first_epoch(proc: subprocess.Popen) -> None:
    """Read the child's progress until epoch 1 of 2 has ended, so a signal lands during epoch 2."""
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("epoch 1/2") or not line:
            break
    assert lines[-1].startswith("epoch 1/2"), "".join(lines)


def test_sigint_mid_epoch_then_resume_is_bit_identical_to_a_straight_run(tmp_path):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    other = ssvi(*TRAIN, "--out", str(straight))
    proc = ssvi(*TRAIN, "--out", str(stopped))
    wait_for_first_epoch(proc)
    proc.send_signal(signal.SIGINT)  # during epoch 2 (135 steps of 4 examples)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == -signal.SIGINT, rest  # ended by the Ctrl-C, as a shell sees it: $? is 130
    assert f"checkpoint written. Resume with: ssvi train --resume {stopped}" in rest
    assert "Traceback" not in rest
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(stopped))["state"]
    assert state["epoch"] == 1 and 0 < state["batch_in_epoch"] < 135, state
    assert not (stopped / "model.safetensors").exists()

    resumed = subprocess.run([sys.executable, "-m", "ssvi_cli", "train", "--resume", str(stopped)],
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert other.wait(timeout=300) == 0, other.stderr.read()
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(stopped))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(straight))
    assert a["state"] == b["state"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    fa, fb = load_file(str(stopped / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    # The epoch cut in two is recorded as the straight run recorded it (only the clock differs).
    untimed = [[{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
                for r in read_jsonl(run / "metrics.jsonl")] for run in (stopped, straight)]
    assert [r["epoch"] for r in untimed[0]] == [1, 2] and untimed[0] == untimed[1]


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell's handling of Ctrl-C")
def test_ctrl_c_stops_a_shell_loop_of_runs_not_just_the_current_one(tmp_path):
    """A shell waiting on a command that Ctrl-C interrupted goes on with its loop when the command
    exits 130 by itself (it takes the Ctrl-C as handled) and stops when the command ends by SIGINT,
    as Python ends on an uncaught Ctrl-C: ssvi ends by SIGINT once its checkpoint is written."""
    import shlex

    cmd = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "ssvi_cli", *TRAIN))
    script = f'for s in 1 2; do {cmd} --seed $s --out {shlex.quote(str(tmp_path))}/run$s; done; echo loop-ended'
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True,
                            # as a terminal's foreground job, even when the tests run in a shell's background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_first_epoch(proc)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the shell and the run get it
        out, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "checkpoint written. Resume with" in rest, rest
    assert "loop-ended" not in out and not (tmp_path / "run2").exists(), (out, rest)
    assert proc.returncode == -signal.SIGINT, rest


# A module whose own code gets a Ctrl-C half way: as numpy's did, imported as a command first needed it.
HALF_MADE = textwrap.dedent("""
    import os, signal
    os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    total = sum(range(200_000))  # Python code runs on after the signal: Python's handler runs here
    made = True
""")
IMPORTER = textwrap.dedent("""
    import contextlib, os, signal, sys, threading, time
    from ssvi_cli import interrupts
    from ssvi_cli.cli.app import Terminated, _unwinding
    if sys.argv[1] == "guarded":
        interrupts.install()
    if sys.argv[2:] == ["twice"]:  # a second Ctrl-C as the first one's thread starts (torchrun forwards one)
        start = threading.Thread.start
        def start_twice(self):
            threading.Thread.start = start
            os.kill(os.getpid(), signal.SIGINT)
            return start(self)
        threading.Thread.start = start_twice
    try:
        with _unwinding() if sys.argv[1] == "guarded" else contextlib.nullcontext():  # SIGTERM as a command has it
            import half_made
            print("imported", half_made.made, flush=True)
            time.sleep(30)
        print("no signal", flush=True)
    except (KeyboardInterrupt, Terminated) as exc:
        print(type(exc).__name__ + "; module made:", getattr(sys.modules.get("half_made"), "made", False), flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_ctrl_c_during_an_import_takes_effect_once_the_module_is_made(tmp_path):
    """A KeyboardInterrupt raised in a module's own code left it half made: the command then failed
    with that module's error ("module 'numpy' has no attribute 'matrix'", exit 1) or, where C code
    (torch's) cleared it, trained on to the end. The command holds a Ctrl-C (or the SIGTERM that
    unwinds it) back until the import ends."""
    (tmp_path / "half_made.py").write_text(HALF_MADE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent.parent)])}

    def outcome(how: str, sig: str, *more: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", IMPORTER, how, *more], capture_output=True, text=True, timeout=60,
                              env={**env, "SIGNAL": sig},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)).stdout.splitlines()

    assert outcome("guarded", "SIGINT") == ["imported True", "KeyboardInterrupt; module made: True"]
    assert outcome("plain", "SIGINT") == ["KeyboardInterrupt; module made: False"]  # Python's own way
    # SIGTERM (a scheduler's, or a sweep whose process is gone) unwinds a command as Ctrl-C does
    assert outcome("guarded", "SIGTERM") == ["imported True", "Terminated; module made: True"]
    # two at once: the second, in the first one's handler, waited for the lock that handler held, for good
    assert outcome("guarded", "SIGINT", "twice") == ["imported True", "KeyboardInterrupt; module made: True"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_ctrl_c_stops_an_import_that_does_not_end(tmp_path):
    """Held back until an import ends, a Ctrl-C in an import that never ends (a hung file system, say)
    would never act: pressed again seconds later, it acts at once."""
    from ssvi_cli.interrupts import INSIST_S

    (tmp_path / "hung.py").write_text("import time\nprint('importing', flush=True)\nwhile True:\n    time.sleep(0.01)\n")
    code = ("from ssvi_cli import interrupts\ninterrupts.install()\ntry:\n    import hung\n"
            "except KeyboardInterrupt:\n    print('stopped', flush=True)\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent.parent)])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        time.sleep(INSIST_S / 4)
        proc.send_signal(signal.SIGINT)  # again at once (torchrun's forwarded one): still held
        time.sleep(INSIST_S / 4)
        assert proc.poll() is None
        time.sleep(INSIST_S)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == "stopped\n" and proc.returncode == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_ctrl_c_while_the_command_line_is_imported_says_interrupted(tmp_path):
    """The ``ssvi`` command's entry: a Ctrl-C while the command line itself is imported (before the
    command can say anything) ends it as any Ctrl-C does, "interrupted" and by SIGINT, no traceback."""
    code = textwrap.dedent("""
        import os, signal, sys

        class CtrlC:  # a Ctrl-C as typer is looked for: half way through importing the command line
            def find_spec(self, name, path=None, target=None):
                if name == "typer":
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["ssvi", "presets"]
        from ssvi_cli.__main__ import entry
        entry()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr == "interrupted\n" and proc.stdout == "", proc.stderr
    assert proc.returncode == -signal.SIGINT


def test_sigterm_checkpoints_exits_143_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    proc = ssvi(*TRAIN, "--out", str(run))
    wait_for_first_epoch(proc)
    proc.send_signal(signal.SIGTERM)  # as a batch scheduler does before it kills a job
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, rest
    assert "stopped by SIGTERM at step" in rest and f"Resume with: ssvi train --resume {run}" in rest
    assert "Traceback" not in rest
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["state"]
    assert state["epoch"] == 1 and 0 < state["batch_in_epoch"] < 135, state

    resumed = subprocess.run([sys.executable, "-m", "ssvi_cli", "train", "--resume", str(run), "--json"],
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "model.safetensors").is_file()
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


# A short command stopped by SIGTERM or SIGHUP while it writes its output: app.run turns the signal
# into an exception that unwinds the command, so the temporary file beside the output is removed and
# the exit code is 128 + the signal. The child stops itself between the write and the rename, and
# signals itself again as the temporary file is removed: the second signal must not cut that short.
STOPPED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from ssvi_cli import config as C, fileio, modelfile
    from ssvi_cli.cli.app import run
    from ssvi_cli.data import get_spec
    from ssvi_cli.training.plan import init_model, make_model

    sig, source, output = getattr(signal, sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    cfg, spec = C.load_preset("digits_mlp"), get_spec("digits")
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    meta = {"name": "mlp", "widths": list(cfg.model.widths), "bayesian": True, "sigma_param": "softplus"}
    card = modelfile.ModelCard.from_metadata({"architecture": meta, "data_spec": spec.to_dict(),
                                              "training": {"step": 1}, "metrics": {}})
    modelfile.write_model_file(model, source, card)

    signal.signal(sig, signal.SIG_DFL)  # as in a terminal, also where this test runs under nohup
    real_fsync, real_unlink = os.fsync, Path.unlink
    def fsync_then_stop(fd):  # the output is written under its temporary name, not yet renamed
        real_fsync(fd)
        os.kill(os.getpid(), sig)
    def unlink_after_another(self, *args, **kwargs):  # a second signal as the clean-up begins
        if self.name.endswith(".tmp"):
            os.kill(os.getpid(), sig)
        return real_unlink(self, *args, **kwargs)
    Path.unlink = unlink_after_another
    fileio.os.fsync = fsync_then_stop
    sys.exit(run(["export", str(source), "--output", str(output)]))
""")


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_during_a_short_commands_write_leaves_no_temporary_file(tmp_path, name, code):
    script = tmp_path / "stopped_export.py"
    script.write_text(STOPPED_EXPORT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = subprocess.run([sys.executable, str(script), name, str(tmp_path / "source.safetensors"),
                           str(out_dir / "model.safetensors")], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == code, done.stderr[-2000:]
    assert f"stopped by {name}" in done.stderr and "Traceback" not in done.stderr
    assert list(out_dir.iterdir()) == []  # neither the output nor its temporary file


def test_a_command_whose_output_finds_no_reader_ends_as_it_would_have(tmp_path):
    """`ssvi presets | true`, `ssvi infer ... --json | head -c 100` of a large batch: a table or report
    that lost its reader ended the command with exit code 1, "a runtime failure" (infer's --output file
    was written in full), where the same command printed as a table, or train, exited 0; and so did
    `ssvi train --help | head`."""
    import numpy as np

    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "ssvi_cli", "train", "--epochs", "1", "--set", "model.widths=[16]",
                    "--set", "data.max_train=128", "--out", str(run_dir)], env=ENV, timeout=300, check=True,
                   capture_output=True)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3000, 8, 8)).astype(np.float32) * 16)
    read, write = os.pipe()
    os.close(read)  # no reader: every write to it is a broken pipe
    try:
        for args in (["--version"], ["--help"], ["train", "--help"], ["presets"], ["presets", "--json"], ["inspect", str(run_dir)], ["inspect", str(run_dir), "--json"],
                     ["infer", str(run_dir), str(tmp_path / "x.npy"), "--samples", "2"],
                     ["infer", str(run_dir), str(tmp_path / "x.npy"), "--samples", "2", "--json",
                      "--output", str(tmp_path / "p.csv")],
                     ["sweep", "--method", "ssvi", "--sparsity", "0.9", "--out", str(tmp_path / "sw"), "--dry-run"]):
            proc = subprocess.run([sys.executable, "-m", "ssvi_cli", *args], stdout=write, stderr=subprocess.PIPE,
                                  text=True, env=ENV, timeout=300)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len((tmp_path / "p.csv").read_text().splitlines()) == 3001  # the header and every input
        # a usage error beside --help whose reader (of standard error) went is still no success
        proc = subprocess.run([sys.executable, "-m", "ssvi_cli", "nosuchcmd", "--help"], stdout=subprocess.DEVNULL,
                              stderr=write, env=ENV, timeout=300)
        assert proc.returncode != 0
    finally:
        os.close(write)
    if Path("/dev/full").exists():  # a full disk is no reader gone: the report was not written, and it fails
        for args in (["presets"], ["presets", "--json"]):
            with open("/dev/full", "w") as full:
                proc = subprocess.run([sys.executable, "-m", "ssvi_cli", *args], stdout=full, stderr=subprocess.PIPE,
                                      text=True, env=ENV, timeout=300)
            assert proc.returncode == 1 and "No space left on device" in proc.stderr, (args, proc.stderr)


def test_a_run_whose_output_finds_no_reader_trains_to_its_model_file(tmp_path):
    """`ssvi train 2>&1 | head -1`: the first epoch line after head left ended the run with exit code 1,
    before its first checkpoint; the lines are dropped and the run finishes, a success (its summary
    on a stdout with no reader too, as a table or as --json, and when it resumes)."""
    read, write = os.pipe()
    os.close(read)  # no reader: every write to it is a broken pipe
    tiny = ["--epochs", "2", "--set", "model.widths=[16]", "--set", "data.max_train=128"]
    try:
        for name, args, streams in (("both", tiny, {"stdout": write, "stderr": write}),
                                    ("json", [*tiny, "--json"], {"stdout": write, "stderr": subprocess.DEVNULL})):
            proc = subprocess.run([sys.executable, "-m", "ssvi_cli", "train", *args, "--out", str(tmp_path / name)],
                                  env=ENV, timeout=300, **streams)
            assert proc.returncode == 0, name
            assert (tmp_path / name / "model.safetensors").is_file() and (tmp_path / name / "summary.json").is_file()
        for file in ("model.safetensors", "summary.json"):  # a run to resume: its "resuming" line finds no reader
            (tmp_path / "both" / file).unlink()
        proc = subprocess.run([sys.executable, "-m", "ssvi_cli", "train", "--resume", str(tmp_path / "both")],
                              stdout=write, stderr=write, env=ENV, timeout=300)
        assert proc.returncode == 0 and (tmp_path / "both" / "model.safetensors").is_file()
    finally:
        os.close(write)
