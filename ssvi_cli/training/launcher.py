"""``ssvi train --nproc N``: the ``torch.distributed.run`` launcher of one node, and the lifetime of
the processes it starts.

``ssvi train --nproc`` checks the run, takes its lock and starts the launcher (:func:`launch`), which
starts the N training processes (:func:`torchrun_main`). No process outlives the one that owns it
(Linux): the launcher inherits the run's lock and is stopped (SIGTERM) when the ``ssvi`` command
ends, however it ends, and each training process is stopped when the launcher ends
(:func:`stop_with_parent`); each stops at a checkpoint, as after Ctrl-C. Should the launcher itself be
killed, the ``ssvi`` command waits for the processes it leaves (they become its children: it is their
subreaper) before it lets go of the lock. So a ``kill -9`` of any of them never leaves training
processes writing a run that no lock keeps.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from ssvi_cli import machine
from ssvi_cli.machine import quote_path
from ssvi_cli.training.cpus import usable_cpus

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # <linux/prctl.h>
PARENT_ENV = "SSVI_LAUNCHED_BY"  # the process id a launched process must find as its parent
ORPHANS_GRACE_S = 60.0  # how long the processes a killed launcher left get to stop at a checkpoint


def _prctl(option: int, value: int) -> bool:
    """Linux's ``prctl(option, value)``; False where it is not to be had (another system)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        return prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_with_parent() -> None:
    """Have the system send this process SIGTERM when its parent ends (Linux): a process started by a
    launcher stops at a checkpoint rather than train on, unowned, once the launcher is gone. A parent
    already gone before this was asked (``PARENT_ENV`` names the one expected) stops it now."""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGTERM):
        expected = os.environ.get(PARENT_ENV)
        if expected and expected.isdigit() and os.getppid() != int(expected):
            os.kill(os.getpid(), signal.SIGTERM)


def check_memory(nproc: int) -> None:
    """Refuse ``nproc`` training processes and their launcher that would not fit in the memory the
    system has available (Linux; where it cannot be read, nothing is checked): each is taken to be
    this process's size, which has loaded torch as each of them will, a lower bound (each also loads
    the data and builds the model). Too many swap, or the system kills processes, the command's own
    or another's."""
    from ssvi_cli.config import ConfigError

    size, available = machine.own_memory(), machine.available_memory()
    if size is None or available is None or (nproc + 1) * size <= available:
        return
    raise ConfigError(f"--nproc {nproc}: {nproc} processes and their launcher, each at least the size of this one "
                      f"({size / 2**30:.1f} GiB, torch loaded), need {(nproc + 1) * size / 2**30:.1f} GiB; this "
                      f"machine has {available / 2**30:.1f} GiB available; give --nproc {max(1, available // size - 1)} "
                      "or fewer")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The ``torch.distributed.run`` command that runs ``ssvi <args>`` on ``nproc`` local processes
    (through :func:`torchrun_main`)."""
    # Ctrl-C while it imports torch (a second or two) ends it by SIGINT, as Python does, without a traceback;
    # one sent while Python itself started (held until here: launch) is taken as it is let through
    code = (f"import signal, sys\ntry:\n    if hasattr(signal, 'pthread_sigmask'):\n"
            "        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
            f"    from {__name__} import torchrun_main\n    torchrun_main(sys.argv[1:])\n"
            "except KeyboardInterrupt:\n    import os\n    signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
            "    os.kill(os.getpid(), signal.SIGINT)")
    return [sys.executable, "-c", code, "--standalone", f"--nproc-per-node={nproc}", "-m", "ssvi_cli", *args]


def launch_env(nproc: int, env: Optional[dict[str, str]] = None, platform: str = sys.platform) -> dict[str, str]:
    """The launcher's environment: this process's, ``env`` on top, and what a one-node run needs on
    ``platform`` where the user has not set it."""
    full = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
    if platform == "win32":  # torch's Windows builds lack libuv, which its rendezvous store asks for by default
        full.setdefault("USE_LIBUV", "0")
    if platform == "darwin":  # gloo finds its address by the host's name, which a Mac's .local name may not give
        full.setdefault("GLOO_SOCKET_IFNAME", "lo0")  # --standalone: every process is on this machine
    # One thread per process unless the user chose otherwise: N processes share the node's cores.
    full.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    return full


def torchrun_main(argv: Sequence[str]) -> None:
    """``torch.distributed.run`` with ``argv``, ending as its processes did rather than in a traceback:
    a stop signal exits 128 + its number once they have stopped at a checkpoint, and a process that
    failed (having printed its error) gives its exit code (2 for a user's error). Stopped (SIGTERM)
    when the ``ssvi`` command that started it ends."""
    stop_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # for the processes it starts
    # Not torchrun's notices of a shutdown it was asked for: its loggers are made at import, some
    # reading LOGLEVEL (which the processes it starts do not inherit), the others under one parent.
    # Nor its line for a process that failed: that process said its own error, and one killed by a
    # signal is said below.
    level = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "CRITICAL"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    if level is None:
        del os.environ["LOGLEVEL"]
    else:
        os.environ["LOGLEVEL"] = level
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        main(list(argv))
    except SignalException as exc:
        sys.exit(128 + int(exc.sigval))
    except ChildFailedError as exc:
        # The lowest rank's own exit code; not the signal torchrun stopped the others with once one had
        # ended (rank 0, stopping at a checkpoint a little after rank 1, was killed at its end under load)
        codes = [getattr(failure, "exitcode", 1) for _, failure in sorted(exc.failures.items())]
        _say_killed(exc.failures, said=any(isinstance(c, int) and 0 < c < 256 for c in codes))
        sys.exit(next((c for c in codes if isinstance(c, int) and 0 < c < 256), 1))


def _signal_name(number: int) -> str:
    """``SIGKILL``, or ``signal 40`` for a real-time signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _untrained(stopped_by: signal.Signals) -> str:
    from ssvi_cli.training.stops import stopped_how

    return f"{stopped_how(stopped_by)} before the training processes started: nothing was trained"


def _say_killed(failures: dict[int, Any], said: bool = False) -> None:
    """The processes killed by a signal, said as torchrun's own line no longer says them. SIGTERM is
    torchrun's own, sent to the others once one has ended: said only where no process said an error
    of its own (``said``) and no other signal is named."""
    killed = [(rank, f.exitcode) for rank, f in sorted(failures.items())
              if isinstance(getattr(f, "exitcode", None), int) and f.exitcode < 0]
    for rank, code in [k for k in killed if k[1] != -signal.SIGTERM] or ([] if said else killed[:1]):
        print(f"error: the training process of rank {rank} was killed by {_signal_name(-code)}"
              + (" (the system's out-of-memory killer?)" if code == -signal.SIGKILL else "")
              + "; the run's last checkpoint, if any, resumes it: ssvi train --resume RUN_DIR --nproc N", file=sys.stderr)


def _wait_for_orphans(others: set[int], grace_s: float = ORPHANS_GRACE_S) -> str:
    """Wait for the processes a killed launcher left to this one (their subreaper), found as this
    process's children but ``others`` (those it had before), to stop: "stopped"; those still running
    after ``grace_s`` are killed: "killed"; none found (no /proc to find them in): "unwatched"."""
    orphans = set(_children()) - others
    if not orphans:
        return "unwatched"
    deadline, outcome = time.monotonic() + grace_s, "stopped"
    while orphans:
        for pid in list(orphans):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    orphans.discard(pid)
            except ChildProcessError:
                orphans.discard(pid)
        if orphans and time.monotonic() > deadline and outcome == "stopped":
            outcome = "killed"
            for pid in orphans:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.05)
    return outcome


def _children() -> set[int]:
    """This process's children (Linux's /proc; none found elsewhere)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").glob("*/children"):
        try:
            found |= {int(p) for p in task.read_text().split()}
        except (OSError, ValueError):
            pass
    return found


def ending_message(ended: "Launched", nproc: int, run_dir: Path, untrained: bool = False) -> str:
    """What the ``ssvi`` command says of a launch its processes could not report: a launcher killed by
    itself (the out-of-memory killer's choice, a ``kill -9`` of it) and what became of its processes,
    or a stop signal that ended the launcher before it started them, or ended them before they
    trained (``untrained``: no new checkpoint; a stop signal ends a process silently until training
    handles it); "" otherwise."""
    if ended.stopped_by is not None and ended.code > 0 and untrained:
        return _untrained(ended.stopped_by)
    if ended.code >= 0:
        return ""
    name = _signal_name(-ended.code)
    if ended.stopped_by is not None:
        return _untrained(ended.stopped_by)
    said = {"stopped": "they stopped, each at a checkpoint where it reached one",
            "killed": f"those still running {ORPHANS_GRACE_S:g} s later were killed"}.get(
        ended.orphans, "ssvi cannot watch them on this system: make sure none is still running")
    return (f"error: the launcher of the {nproc} processes was killed by {name}; {said}; the run's last "
            f"checkpoint, if any, resumes it: ssvi train --resume {quote_path(run_dir)}")


class Launched(NamedTuple):
    """How :func:`launch` ended: the launcher's exit code (negative: killed by that signal), the stop
    signal passed on to it, if any, and, for a launcher killed by itself, what became of its processes
    (:func:`_wait_for_orphans`; "unwatched" where ssvi cannot watch them on this system)."""

    code: int
    stopped_by: Optional[signal.Signals] = None
    orphans: str = ""


def launch(nproc: int, args: Sequence[str], env: Optional[dict[str, str]] = None,
           pass_fds: Sequence[int] = ()) -> Launched:
    """Run ``ssvi <args>`` on ``nproc`` processes of this node (``env``: variables added to theirs;
    ``pass_fds``: this process's files the launcher keeps open, as the run's lock, which it then holds
    for as long as it runs); returns how it ended (:class:`Launched`: a launcher killed by itself is
    returned once the processes it left have stopped).

    The launcher runs in a session of its own, so that a stop signal reaches its processes once and
    by one path: Ctrl-C at the terminal, or a SIGTERM or SIGHUP sent to this process alone, is passed
    to the launcher, which passes it to every process; each stops at a checkpoint (``stop_signals``),
    and this process waits for them before it returns. Should this process fail meanwhile, the
    launcher is stopped and waited for, never left running."""
    from ssvi_cli.training.stops import requests_to_stop

    full = launch_env(nproc, env)
    proc: Optional[subprocess.Popen] = None
    stopped: list[signal.Signals] = []
    sent: list[bool] = []

    def forward(signum: int, frame: Any, before: bool = False) -> None:  # noqa: ARG001
        # Once: a second Ctrl-C while the processes write their checkpoint made the launcher quit at
        # once, and what rank 0 then said (passed through the launcher) was lost.
        stopped.append(signal.Signals(signum))
        if not sent and proc is not None and proc.poll() is None:
            sent.append(True)
            try:
                proc.send_signal(signum)
            except ValueError:  # SIGINT on Windows, which cannot send it: there the launcher, in this console,
                if before:  # had the console's Ctrl-C itself, unless it came before the launcher was
                    proc.terminate()  # started, when it has no processes yet (terminate() would not end those)

    previous: dict[int, Any] = {}
    reaper = _prctl(PR_SET_CHILD_SUBREAPER, 1)
    others = _children() if reaper else set()  # children of this process's own, never waited for here
    orphans = ""
    try:
        try:  # before the launcher exists: a signal in between still reaches it
            for sig in requests_to_stop():
                previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: signals stay with it
            pass
        # The launcher starts with Ctrl-C held (blocked; the mask is inherited) until its code can take it:
        # one in Python's own start-up ended it in "Fatal Python error: init_import_site" and a traceback.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
        try:
            proc = subprocess.Popen(launch_command(nproc, args), env=full, start_new_session=True,
                                    pass_fds=tuple(pass_fds))
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if stopped:  # a signal came while it started
            forward(stopped[0], None, before=True)
        code = proc.wait()
        if code < 0:  # the launcher was killed (by a stop signal before it could handle one): its processes are ours
            orphans = _wait_for_orphans(others | {proc.pid}) if reaper else "unwatched"
    finally:
        if proc is not None and proc.poll() is None:  # this process failed: the launcher goes too
            proc.terminate()
            proc.wait()
        if reaper:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)
        for sig, old in previous.items():
            signal.signal(sig, old)
    return Launched(code, stopped[0] if stopped else None, orphans)
