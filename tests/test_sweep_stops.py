"""``ssvi sweep`` stopped, killed, failing and resumed: Ctrl-C, a closed terminal, kill -9, a cell
that fails or is busy, and what --resume then does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_cells import TINY

from ssvi_cli.cli import run
from ssvi_cli.sweep.grid import read_spec
from ssvi_cli.sweep.runner import (BUSY_EXIT, CellBusy, Outcome, _stop_all, cell_busy, cell_lock, cell_state, evaluated,
                                   failure)


def test_a_cell_stopped_by_a_signal_says_so():
    from ssvi_cli.sweep.runner import exit_text

    assert (exit_text(-2), exit_text(130), exit_text(-99)) == ("stopped by SIGINT", "exit code 130", "stopped by signal 99")


def _as_foreground() -> None:
    """SIGINT as a terminal's foreground job has it, even when the tests run in a shell's background
    job (which ignores it, and ssvi then leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(proc: subprocess.Popen, ready) -> str:
    """Press Ctrl-C on the sweep once ``ready()`` holds; its stderr after it stopped."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ready():
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGINT, stderr  # ended by the Ctrl-C: a shell shows $? as 130
    return stderr


def _reap(proc: subprocess.Popen, out: Path) -> None:
    """After a failed assertion: stop the sweep and any cell it left (cells run in sessions of their
    own), so a failing test leaves no process behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    # "--": the pattern itself starts with a dash
    subprocess.run(["pkill", "-KILL", "-f", "--", f"--run-cell {out}"], check=False)


def _epochs(cell: Path) -> list[int]:
    path = cell / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_a_cell_stopped_as_it_exits_after_its_evaluation_counts_as_finished(tmp_path: Path):
    """Ctrl-C may reach a cell whose evaluation is already written while its process exits: that
    cell finished (the next --resume skips it), so it is not reported as stopped."""
    script = ("import json, pathlib, signal, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(); "
              "sys.argv[2] == 'done' and (d / 'evaluation.json').write_text(json.dumps({'metrics': {}})); "
              "(d / 'ready').touch(); signal.pause()")
    running = {name: subprocess.Popen([sys.executable, "-c", script, str(tmp_path / name), name],
                                      start_new_session=True) for name in ("done", "midway")}
    deadline = time.monotonic() + 60
    while not all((tmp_path / n / "ready").exists() for n in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    outcome, notes = Outcome(), []
    _stop_all(running, outcome, lambda *a: notes.append(a), lambda name: evaluated(tmp_path / name))
    assert outcome.finished == ["done"] and outcome.stopped == ["midway"]
    # stopped by the SIGINT the sweep sent, whatever stopped the sweep (SIGTERM read as "by SIGINT")
    assert notes == [("finish", "done", ""), ("stop", "midway", "stopped by the sweep")]


def test_stopping_cells_where_there_are_no_process_groups_ends_them(tmp_path: Path, monkeypatch):
    """On Windows (no os.killpg, nor signal.SIGKILL) a stopped sweep crashed with an AttributeError and
    left its cells running; the console's Ctrl-C reaches the cells there, and one still running after
    the grace time is killed."""
    import ssvi_cli.sweep.runner as runner

    monkeypatch.delattr(os, "killpg")  # (signal.SIGKILL stays: Popen.kill sends it here, TerminateProcess there)
    monkeypatch.setattr(runner, "STOP_GRACE_S", 0.5)
    running = {"midway": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])}
    outcome, notes = Outcome(), []
    started = time.monotonic()
    _stop_all(running, outcome, lambda *a: notes.append(a), lambda name: False)
    assert running["midway"].returncode is not None and time.monotonic() - started < 30
    assert outcome.stopped == ["midway"] and notes == [("stop", "midway", "stopped by SIGKILL")]  # killed


def test_ctrl_c_leaves_every_cell_resumable(tmp_path: Path):
    out = tmp_path / "sw"
    sweep = [sys.executable, "-m", "ssvi_cli", "sweep"]
    # far more epochs than the test waits for: the cells are always mid-run when Ctrl-C comes
    cmd = [*sweep, "--method", "ssvi", "--sparsity", "0.9,0.95", "--seeds", "1", "--set", "train.epochs=100000",
           *TINY, "--jobs", "2", "--threads", "1", "--out", str(out)]
    cells = [out / "cells" / "ssvi_s0.9_seed0", out / "cells" / "ssvi_s0.95_seed0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_foreground)
    try:
        _interrupted_and_resumed(proc, out, sweep, cells)
    finally:
        _reap(proc, out)


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as bash starts a script's background job


def _one_cell_training(out: Path, preexec) -> tuple[subprocess.Popen, list[Path]]:
    """A sweep of one cell far longer than any test waits, once its cell has trained an epoch."""
    cells = [out / "cells" / "ssvi_s0.95_seed0"]
    proc = subprocess.Popen([sys.executable, "-m", "ssvi_cli", "sweep", "--set", "train.epochs=100000", *TINY,
                             "--threads", "1", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not _epochs(cells[0]) and proc.poll() is None:
        time.sleep(0.5)
    return proc, cells


@pytest.mark.slow
@pytest.mark.parametrize("sigint", [_as_foreground, _ignoring_sigint], ids=["terminal", "background-job"])
def test_a_closed_terminal_stops_every_cell_at_a_checkpoint(tmp_path: Path, sigint):
    """SIGHUP, as a closed terminal sends, stops the sweep as Ctrl-C does: each cell checkpoints
    (cells run in sessions of their own and never get the terminal's hangup themselves). Also from a
    sweep that ignores SIGINT (a script's background job): the SIGINT it sends its cells stops them,
    where they had inherited the ignoring and ran on until killed."""
    out = tmp_path / "sw"
    proc, cells = _one_cell_training(out, sigint)
    try:
        proc.send_signal(signal.SIGHUP)
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 129 and "1 cell stopped" in stderr, stderr
        assert cell_state(cells[0]) == "partial" and (out / "report.json").is_file()
        found = subprocess.run(["pgrep", "-f", "--", f"--run-cell {out}"], capture_output=True, text=True)
        assert found.stdout == ""  # no cell left running
    finally:
        _reap(proc, out)


@pytest.mark.slow
def test_a_killed_sweep_leaves_no_cell_running_on(tmp_path: Path):
    """kill -9 (or the system's out-of-memory killer) gives the sweep no time to stop its cells, which
    run in sessions of their own: each stops at a checkpoint by itself, leaving nothing busy."""
    out = tmp_path / "sw"
    proc, cells = _one_cell_training(out, _as_foreground)
    try:
        proc.kill()
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _cells_running(out):
            time.sleep(0.5)
        assert not _cells_running(out) and not cell_busy(cells[0])
        assert cell_state(cells[0]) == "partial"
        log = (out / "logs" / f"{cells[0].name}.log").read_text()
        assert "checkpoint written" in log, log[-2000:]
        assert failure(cells[0]) is None  # stopped, not failed
    finally:
        _reap(proc, out)


def _cells_running(out: Path) -> bool:
    return subprocess.run(["pgrep", "-f", "--", f"--run-cell {out}"], capture_output=True).stdout != b""


def _interrupted_and_resumed(proc: subprocess.Popen, out: Path, sweep: list[str], cells: list[Path]) -> None:
    stderr = _interrupt_when(proc, lambda: all(_epochs(c) for c in cells))
    assert f"2 cells stopped; each continues from its last checkpoint: ssvi sweep --resume {out}" in stderr
    assert [cell_state(c) for c in cells] == ["partial", "partial"]
    before = {c: _epochs(c) for c in cells}
    for c in cells:  # a cell's log says how to go on: with the sweep, which also evaluates the cell
        log = (out / "logs" / f"{c.name}.log").read_text()
        assert f"checkpoint written. Resume with: ssvi sweep --resume {out} (every cell left), or this cell alone: " \
               f"ssvi sweep --run-cell {c.resolve()}" in log and "ssvi train --resume" not in log

    # --resume continues each cell from its checkpoint (not from epoch 1), and stops again on Ctrl-C
    proc = subprocess.Popen([*sweep, "--resume", str(out), "--jobs", "2", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_foreground)
    try:
        _interrupt_when(proc, lambda: all(len(_epochs(c)) > len(before[c]) + 1 for c in cells))
    finally:
        _reap(proc, out)
    for c in cells:
        assert "resuming" in (out / "logs" / f"{c.name}.log").read_text()
        epochs = _epochs(c)
        assert epochs[: len(before[c])] == before[c] and epochs == list(range(1, len(epochs) + 1)), epochs
    assert [cell_state(c) for c in cells] == ["partial", "partial"]


def test_a_bare_resume_runs_the_cells_with_the_jobs_and_threads_the_sweep_ran_with(tmp_path: Path, monkeypatch, capsys):
    """The resume command an interrupted sweep prints has no --jobs: the cells went on at one job of
    every core's threads, and a CPU cell's numbers move with its thread count. sweep.json records them."""
    import ssvi_cli.sweep.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run_cells", lambda _dir, _cells, jobs, threads, *_: calls.append((jobs, threads)) or Outcome())
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--jobs", "2", "--threads", "1", "--out", str(out), "--no-figures"]) == 0
    assert json.loads((out / "sweep.json").read_text())["ran_with"] == {"jobs": 2, "threads": 1, "figures": False}
    # A cluster job (a cpuset, taskset) may run on 3 of the machine's 16 cores: those are shared out.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    monkeypatch.setattr("ssvi_cli.training.cpus.cgroup_cpu_quota", lambda *a: None)  # a container's own
    for args, ran in (([], (2, 1)), (["--threads", "3"], (2, 3)), (["--jobs", "1"], (1, 3))):
        assert run(["sweep", "--resume", str(out), "--no-figures", *args]) == 0
        assert calls[-1] == ran and f"{ran[0]} at a time" in capsys.readouterr().err
    assert json.loads((out / "sweep.json").read_text())["ran_with"] == {"jobs": 1, "threads": 3, "figures": False}
    assert read_spec(out)[0].fixed["train.epochs"] == 1  # the grid as it was


def test_a_sweep_stopped_as_its_grid_is_written_resumes_with_its_jobs(tmp_path: Path, monkeypatch, capsys):
    """A Ctrl-C between the grid's writing and the cells' start (a few milliseconds) left a sweep.json
    without --jobs: the bare --resume ran the cells one at a time, at every core's threads."""
    import ssvi_cli.sweep.runner as runner
    import ssvi_cli.sweep.sweepdir as sweepdir

    def stopped(*_):
        raise KeyboardInterrupt

    real_lock = sweepdir.sweep_lock
    monkeypatch.setattr(sweepdir, "sweep_lock", stopped)  # the first thing the sweep does after the grid
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--jobs", "2", "--out", str(out), "--no-figures"]) == 130
    assert json.loads((out / "sweep.json").read_text())["ran_with"] == {"jobs": 2, "threads": None, "figures": False}
    monkeypatch.setattr(sweepdir, "sweep_lock", real_lock)
    calls = []
    monkeypatch.setattr(runner, "run_cells", lambda _dir, _cells, jobs, threads, *_: calls.append((jobs, threads)) or Outcome())
    monkeypatch.setattr("ssvi_cli.training.cpus.usable_cpus", lambda: 2)
    assert run(["sweep", "--resume", str(out)]) == 0
    assert calls == [(2, 1)] and "2 at a time, 1 thread each" in capsys.readouterr().err


def test_a_sweep_interrupted_while_its_report_is_written_says_how_to_write_it(tmp_path: Path, monkeypatch, capsys):
    """A Ctrl-C after the last cell, in the report's writing, said only 'interrupted'."""
    import ssvi_cli.sweep.report as reportmod
    import ssvi_cli.sweep.runner as runner

    def stopped(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_cells", lambda *_: Outcome())
    monkeypatch.setattr(reportmod, "write_report", stopped)
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out), "--no-figures"]) == 130
    said = " ".join(capsys.readouterr().err.split())
    assert f"interrupted while the report was written; the cells are kept, and ssvi sweep --report {out} writes it" in said
    # the paired differences asked for are asked for again (the report without them lacked them)
    assert run(["sweep", "--resume", str(out), "--no-figures", "--baseline", "method=ssvi"]) == 130
    assert f"ssvi sweep --report {out} --baseline method=ssvi writes it" in " ".join(capsys.readouterr().err.split())


def test_a_grid_grown_by_a_dry_run_keeps_how_the_sweep_ran(tmp_path: Path, monkeypatch, capsys):
    """Growing the grid wrote sweep.json anew: the --jobs, --threads and --no-figures the sweep ran with
    were lost, and the next bare --resume made figures at one job of every core's threads."""
    import ssvi_cli.sweep.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run_cells", lambda _dir, _cells, jobs, threads, *_: calls.append((jobs, threads)) or Outcome())
    out = tmp_path / "sw"
    grid = ["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out)]
    assert run([*grid, "--jobs", "2", "--threads", "1", "--no-figures"]) == 0
    assert run([*grid, "--seeds", "2", "--dry-run"]) == 0  # grown, for a scheduler's --run-cell, say
    assert len(read_spec(out)[1]) == 2
    assert json.loads((out / "sweep.json").read_text())["ran_with"] == {"jobs": 2, "threads": 1, "figures": False}
    assert run(["sweep", "--resume", str(out)]) == 0
    assert calls[-1] == (2, 1)
    assert json.loads((out / "sweep.json").read_text())["ran_with"]["figures"] is False


def test_a_dry_runs_no_figures_is_kept_for_the_report_of_its_cells(tmp_path: Path, monkeypatch):
    """``--dry-run --no-figures`` for a scheduler's --run-cells: the --report afterwards drew figures."""
    from ssvi_cli.sweep import report as reportmod
    from ssvi_cli.sweep.sweepdir import recorded_figures, recorded_processes

    asked, real = [], reportmod.write_report
    monkeypatch.setattr(reportmod, "write_report", lambda path, figures, *a: asked.append(figures) or real(path, figures, *a))
    out = tmp_path / "sw"
    grid = ["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out)]
    assert run([*grid, "--dry-run", "--no-figures"]) == 0
    assert recorded_figures(out) is False and recorded_processes(out) == (None, None)
    assert run(["sweep", "--report", str(out)]) == 0 and asked == [False]
    assert run([*grid, "--dry-run"]) == 0  # the same grid again: kept as it was given
    assert recorded_figures(out) is False
    assert run([*grid, "--dry-run", "--figures"]) == 0
    assert recorded_figures(out) is True


def test_processes_writing_sweep_json_at_once_lose_none_of_each_others_entries(tmp_path: Path):
    """Each write reads sweep.json, changes its entry and writes the file back: another process's
    write between the two was lost. A write waits for the lock the other holds meanwhile."""
    import threading

    from ssvi_cli.locks import acquire_lock
    from ssvi_cli.sweep.sweepfile import SWEEP_FILE_LOCK, read_entry, write_entry

    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out), "--dry-run"]) == 0
    path = out / "sweep.json"
    with acquire_lock(out / SWEEP_FILE_LOCK, "the lock of sweep.json"):  # another process, in its write
        held = json.loads(path.read_text())
        writer = threading.Thread(target=write_entry, args=(out, "mine", {"a": 1}))
        writer.start()
        writer.join(timeout=1.0)
        assert writer.is_alive()  # waiting for the lock
        path.write_text(json.dumps({**held, "theirs": {"b": 2}}))
    writer.join(timeout=30)
    assert (read_entry(out, "mine"), read_entry(out, "theirs")) == ({"a": 1}, {"b": 2})
    assert read_spec(out)[1]


def test_the_interrupt_message_says_which_cells_start_again(tmp_path: Path, monkeypatch, capsys):
    """Cells stopped before their first checkpoint start again; the message says so only where one did."""
    import ssvi_cli.sweep.runner as runner

    out = tmp_path / "sw"
    stopped = ["ssvi_s0.9_seed0", "ssvi_s0.95_seed0"]
    monkeypatch.setattr(runner, "run_cells", lambda *_: Outcome(stopped=list(stopped), interrupted=True))
    grid = ["sweep", "--sparsity", "0.9,0.95", "--set", "train.epochs=1", *TINY, "--out", str(out), "--no-figures"]
    assert run(grid) == 130
    assert f"2 cells stopped; each starts again, none had a checkpoint: ssvi sweep --resume {out}" in capsys.readouterr().err
    monkeypatch.setattr(runner, "cell_state", lambda path, spec=None: "partial" if path.name == stopped[0] else "new")
    assert run(["sweep", "--resume", str(out), "--no-figures"]) == 130
    assert "each continues from its last checkpoint (1 had none yet and starts again)" in capsys.readouterr().err


def test_a_running_cell_is_locked_and_a_yaml_file_takes_the_flags_names(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out), "--dry-run"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    cell = Path(line.split()[-1])
    with cell_lock(cell):  # as if a killed sweep's cell were still running
        assert run(["sweep", "--run-cell", str(cell)]) == BUSY_EXIT
        assert f"cell {cell.name} is already running (process {os.getpid()})" in capsys.readouterr().err
        assert not cell.exists()  # nothing was written
        # A second sweep over the same folder leaves the cell to its runner: not a failure, and
        # nothing appended to that runner's log.
        assert run(["sweep", "--resume", str(out)]) == 0
        assert "1 cell running in another process, left to it; when done: ssvi sweep --report" in capsys.readouterr().err
        assert not (out / "logs" / f"{cell.name}.log").exists()
        with pytest.raises(CellBusy):
            with cell_lock(cell):
                pass
    assert run(["sweep", "--run-cell", str(cell)]) == 0  # the lock went with its holder
    assert cell_state(cell) == "done"
    capsys.readouterr()

    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text("method: [ssvi, static]\nsparsity: 0.9\nseeds: 2\n")
    assert run(["sweep", "--file", str(spec_file), "--out", str(tmp_path / "y"), "--dry-run"]) == 0
    spec = json.loads((tmp_path / "y" / "sweep.json").read_text())["spec"]
    assert spec["methods"] == ["ssvi", "static"] and spec["sparsities"] == [0.9] and spec["seeds"] == [0, 1]
    spec_file.write_text("method: ssvi\nmethods: [vi]\n")
    assert run(["sweep", "--file", str(spec_file), "--out", str(tmp_path / "z"), "--dry-run"]) == 2
    assert "give 'methods' or 'method', not both" in capsys.readouterr().err


def test_a_failed_cell_is_reported_as_failed_with_its_reason(tmp_path: Path, capsys):
    out = tmp_path / "sw"
    assert run(["sweep", "--method", "vi", "--set", "data.name=digits,mnist", "--set", f"data.data_dir={tmp_path}",
                "--set", "train.epochs=1", *TINY, "--out", str(out), "--no-figures"]) == 1
    err = capsys.readouterr().err
    bad = "vi_name-mnist_seed0"  # not on disk, and no --download
    assert f"failed {bad}: mnist not found" in err and "not evaluated yet" not in err
    report = json.loads((out / "report.json").read_text())
    assert list(report["failed"]) == [bad] and report["missing"] == [] and report["cells_done"] == 1
    assert (out / "logs" / f"{bad}.log").is_file()
    assert f"Failed (their logs say more: `logs/<cell>.log` for a cell the sweep ran, the output of `ssvi sweep " \
           f"--run-cell` for one a scheduler ran; a rerun repeats the failure unless its cause, a missing dataset or a " \
           f"diverged run, say, is dealt with): {bad} (mnist not found" in (out / "report.md").read_text()
    # a cell that runs again drops its old note: the good cell, noted as failed and evaluated again
    good = out / "cells" / "vi_name-digits_seed0"
    (out / "cells" / ".vi_name-digits_seed0.failed").write_text('{"error": "an old failure"}')
    (good / "evaluation.json").unlink()
    from ssvi_cli.sweep.failures import failure

    assert run(["sweep", "--run-cell", str(good)]) == 0
    assert failure(good) is None and failure(out / "cells" / bad) is not None
    capsys.readouterr()
    assert run(["sweep", "--report", str(out), "--json", "--no-figures"]) == 0
    assert list(json.loads(capsys.readouterr().out)["failed"]) == [bad]
    # the sweep that runs it again fails (exit code 1) and still prints its report under --json (README)
    assert run(["sweep", "--resume", str(out), "--json"]) == 1
    assert list(json.loads(capsys.readouterr().out)["failed"]) == [bad]


def test_a_stopped_cell_is_not_a_failed_one_and_a_note_never_stops_the_sweep(tmp_path: Path, capsys):
    from ssvi_cli.cli.sweep import run_cell
    from ssvi_cli.sweep.failures import failure, record_failure

    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out), "--dry-run"]) == 0
    cell = Path(capsys.readouterr().out.split()[-1])
    for code, noted in ((130, None), (143, None), (129, None), (1, "exit code 1")):  # Ctrl-C, SIGTERM, SIGHUP
        assert run_cell(cell, lambda args: code) == code
        assert failure(cell) == noted
    (cell.parent / f".{cell.name}.failed").unlink()
    (cell.parent / f".{cell.name}.failed").mkdir()  # a note that cannot be written
    record_failure(cell, "anything")
    assert run_cell(cell, lambda args: 1) == 1


def test_force_leaves_a_sweep_whose_cell_is_running_as_it_is(tmp_path: Path, capsys):
    """--force used to delete sweep.json and the running cells' folders, killing them, then fail."""
    from ssvi_cli.locks import acquire_lock

    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", "--seeds", "2", "--out", str(out), "--dry-run"]) == 0
    (out / "cells" / "ssvi_s0.95_seed1" / "checkpoints").mkdir(parents=True)
    capsys.readouterr()
    with acquire_lock(out / "cells" / ".ssvi_s0.95_seed1.lock", "a cell's lock"):  # as its runner holds it
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert run(["sweep", "--set", "train.epochs=3", "--out", str(out), "--force", "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep that is running (its cell ssvi_s0.95_seed1, in process" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".sweep.lock") == before


def test_force_leaves_a_sweep_that_a_running_sweep_holds_between_its_cells(tmp_path: Path, capsys):
    """A sweep between two cells holds no cell's lock; the sweep's own shared lock keeps --force out."""
    from ssvi_cli.locks import acquire_lock

    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", "--out", str(out), "--dry-run"]) == 0
    capsys.readouterr()
    with acquire_lock(out / ".sweep.lock", "the sweep's lock", shared=True):  # as a running sweep holds it
        assert run(["sweep", "--set", "train.epochs=3", "--out", str(out), "--force", "--no-figures"]) == 2
        assert "holds a sweep that is running (an ssvi sweep)" in capsys.readouterr().err
        with acquire_lock(out / ".sweep.lock", "the sweep's lock", shared=True):  # two sweeps share it
            pass
    assert (out / "sweep.json").is_file()


def test_a_stop_between_cells_does_not_speak_of_stopped_cells(tmp_path: Path, capsys, monkeypatch):
    """Ctrl-C after the last cell had finished said "0 cells stopped; each continues from its last
    checkpoint", which described nothing that happened."""
    import ssvi_cli.sweep.runner as runner

    monkeypatch.setattr(runner, "run_cells", lambda *a, **k: runner.Outcome(interrupted=True))
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--out", str(tmp_path / "sw"), "--no-figures"]) == 130
    said = capsys.readouterr().err
    assert "interrupted between cells, none of them running; the cells not run yet run with: ssvi sweep --resume" in said
    assert "0 cells stopped" not in said
    # a SIGTERM is said as train says it, not as a Ctrl-C
    monkeypatch.setattr(runner, "run_cells", lambda *a, **k: runner.Outcome(stopped=["a"], interrupted=True, signum=15))
    assert run(["sweep", "--resume", str(tmp_path / "sw"), "--no-figures", "--baseline", "sparsity=0.9"]) == 143
    said = " ".join(capsys.readouterr().err.split())
    assert "stopped by SIGTERM: 1 cell stopped" in said and f"--resume {tmp_path / 'sw'} --baseline sparsity=0.9" in said


def test_a_started_cell_resumes_on_the_device_the_sweep_gives_now(tmp_path: Path, monkeypatch):
    """A sweep grown with --set train.device=... resumed its started cells with a bare --resume, on the
    device they began on, though the growth note spoke of the values given now."""
    import ssvi_cli.cli.sweep_cell as sweep_cell
    import ssvi_cli.sweep.runner as runner

    out = tmp_path / "sw"
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--set", "train.device=cpu", "--out", str(out),
                "--dry-run"]) == 0
    cell = out / "cells" / "ssvi_s0.9_seed0"
    monkeypatch.setattr(runner, "cell_state", lambda path, spec=None: "partial")
    monkeypatch.setattr(sweep_cell, "check_changed", lambda *a: None)
    calls: list[list[str]] = []
    assert sweep_cell.run_cell(cell, lambda args: calls.append(args) or 0) == 0
    assert calls[0] == ["train", "--resume", str(cell), "--device", "cpu"] and calls[1][0] == "evaluate"


def test_a_cell_whose_summary_does_not_read_is_rebuilt_from_its_checkpoint(tmp_path: Path, capsys):
    """The advice was to delete the cell's folder, its model file and checkpoints with it."""
    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out), "--no-figures"]) == 0
    cell = next((out / "cells").iterdir())
    (cell / "summary.json").write_text("junk")
    capsys.readouterr()
    assert run(["sweep", "--report", str(out), "--no-figures"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"summary.json cannot be read (JSONDecodeError); delete {cell / 'summary.json'} and "
            f"{cell / 'evaluation.json'} and resume the sweep: the cell's last checkpoint writes them again") in err
    model = (cell / "model.safetensors").read_bytes()
    (cell / "summary.json").unlink()
    (cell / "evaluation.json").unlink()
    assert run(["sweep", "--resume", str(out), "--no-figures"]) == 0
    assert json.loads((cell / "summary.json").read_text())["model_file_bytes"] == len(model)


def test_a_cell_stopped_in_its_evaluation_says_so_and_is_evaluated_again(tmp_path: Path, capsys, monkeypatch):
    """Ctrl-C in a cell's evaluation ended --run-cell with exit 130 and not a word (its training's stops
    say where to resume); the trained cell is evaluated, not trained, again."""
    import ssvi_cli.evaluation.evaluator as ev

    out = tmp_path / "sw"
    assert run(["sweep", "--method", "vi", "--set", "train.epochs=1", *TINY, "--out", str(out), "--dry-run"]) == 0
    cell = Path(capsys.readouterr().out.split()[-1])
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run(["sweep", "--run-cell", str(cell)]) == 130
    err = capsys.readouterr().err
    assert ("interrupted in the evaluation; the training is kept and the cell is evaluated again. Resume with: "
            f"ssvi sweep --resume {out}") in err
    assert cell_state(cell) == "trained" and failure(cell) is None
    monkeypatch.setattr(ev, "evaluate", real)
    trained = (cell / "model.safetensors").stat().st_mtime_ns
    assert run(["sweep", "--run-cell", str(cell)]) == 0
    assert cell_state(cell) == "done" and (cell / "model.safetensors").stat().st_mtime_ns == trained


def test_cells_that_fail_alike_on_a_data_error_stop_the_sweep_starting_those_of_the_same_data(tmp_path: Path, capsys):
    """A damaged image in the sweep's folder failed every cell in turn, each decoding the folder first:
    two failures with the same data error leave the rest of that folder's cells unstarted."""
    import numpy as np
    from PIL import Image

    for c in range(2):
        (tmp_path / "bad" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((8, 8), 60 * c + i, np.uint8)).save(tmp_path / "bad" / f"c{c}" / f"{i}.png")
    (tmp_path / "bad" / "c1" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "sw"
    assert run(["sweep", "--method", "vi", "--seeds", "3", "--set", f"data.name=imagefolder:{tmp_path / 'bad'}",
                "--set", "data.image_size=8", "--set", "data.channels=1", "--set", "train.epochs=1", *TINY,
                "--out", str(out), "--no-figures", "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("bad.png cannot be read") == 3, err  # two failed cells, and the line below
    assert "1 cell of the same data settings not started: two cells failed with the same data error, which each " \
           "would meet (image " in err
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["failed"]) == ["vi_seed0", "vi_seed1"] and report["missing"] == ["vi_seed2"]


def test_the_halting_rule_keeps_the_cells_of_other_data_and_other_errors():
    """Two seeds of one grid point failing alike halted every later method, sparsity and axis value."""
    from ssvi_cli.sweep.failures import DATA_ERROR, halted, record_failure
    from ssvi_cli.sweep.grid import Cell

    def cell(name: str, data: str) -> Cell:
        return Cell(name, "vi", None, 0, {"data.name": data, "optim.lr": 0.1})

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cells_dir = Path(tmp)
        cells = [cell("a0", "fashion_mnist"), cell("a1", "fashion_mnist"), cell("a2", "fashion_mnist"),
                 cell("b0", "mnist"), cell("b1", "mnist")]
        for name in ("a0", "a1"):
            record_failure(cells_dir / name, "fashion_mnist not found", DATA_ERROR)
        assert halted(cells_dir, cells, {"a0": 2, "a1": 2}, cells[2:]) == ([cells[2]], "fashion_mnist not found")
        assert halted(cells_dir, cells, {"a0": 2}, cells[2:]) is None  # one failure: no rule yet
        record_failure(cells_dir / "a1", "another error", DATA_ERROR)
        assert halted(cells_dir, cells, {"a0": 2, "a1": 2}, cells[2:]) is None  # not the same error
        for name in ("a0", "a1"):
            record_failure(cells_dir / name, "too few weights at this sparsity", "AllocationError")
        assert halted(cells_dir, cells, {"a0": 2, "a1": 2}, cells[2:]) is None  # not a data error
        # a preset's methods: section gives one method other data: its cells are not the failed ones'
        for name in ("a0", "a1"):
            record_failure(cells_dir / name, "fashion_mnist not found", DATA_ERROR)
        other = Cell("c0", "ssvi", 0.9, 0, {"data.name": "fashion_mnist", "optim.lr": 0.1})
        assert halted(cells_dir, [*cells, other], {"a0": 2, "a1": 2}, [other],
                      {"ssvi": {"data.val_fraction": 0.2}}) is None
        assert halted(cells_dir, [*cells, other], {"a0": 2, "a1": 2}, [other]) == ([other], "fashion_mnist not found")


def test_a_cell_finished_by_another_process_meanwhile_is_said_so(tmp_path: Path, monkeypatch):
    """A --resume beside a --run-cell of the same cell: the cell found itself done and exited 0, and the
    sweep said "finish" as if it had trained it (the concurrency review)."""
    import ssvi_cli.sweep.runner as runner

    out = tmp_path / "sw"
    assert run(["sweep", "--set", "train.epochs=1", *TINY, "--out", str(out), "--no-figures"]) == 0
    spec, cells = read_spec(out)
    assert cell_state(out / "cells" / cells[0].name, spec) == "done"
    monkeypatch.setattr(runner, "cell_state", lambda *_: "new")  # as the sweep saw it before the other finished
    events = []
    outcome = runner.run_cells(out, cells, 1, 1, lambda *e: events.append(e), spec)
    assert outcome.finished == [cells[0].name]
    assert ("finish", cells[0].name, "trained and evaluated by another process") in events, events
