import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ssvi_cli.fileio import atomic_path, brief, write_text


def test_atomic_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "m.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors itself creates files 0600
    finally:
        os.umask(mask)
    for name in ("a.txt", "m.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "m.safetensors"]


def test_a_replaced_file_keeps_its_mode(tmp_path):
    """A private (0600) output came back 0644 after infer/evaluate/export replaced it."""
    mask = os.umask(0o022)
    try:
        (tmp_path / "p.txt").write_text("old")
        os.chmod(tmp_path / "p.txt", 0o600)
        write_text(tmp_path / "p.txt", "new")
        (tmp_path / "g.txt").write_text("old")
        os.chmod(tmp_path / "g.txt", 0o664)
        write_text(tmp_path / "g.txt", "new")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "p.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "g.txt").stat().st_mode) == 0o664 and (tmp_path / "g.txt").read_text() == "new"
    # (a read-only output is refused by the commands: tests/test_errors.py)


def test_a_readers_error_in_brief_ends_at_a_sentence_or_a_word():
    torch_says = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
                  "internal miniz error. If you are seeing this error, there is a high chance that your file is corrupted")
    assert brief(RuntimeError(torch_says)) == ("PytorchStreamReader failed reading zip archive: failed finding central "
                                               "directory. This is an internal miniz error.")
    words = brief(ValueError("one two three " * 30), limit=40)
    assert words == "one two three one two three one two..."
    assert brief(RuntimeError("\x1b[1mWeights only\x1b[0m load failed\nmore")) == "Weights only load failed"
    assert brief(EOFError()) == "EOFError" and brief("short") == "short"


def _read_only(monkeypatch, folder):
    """Make ``folder`` refuse new files, as a read-only mount does (chmod does not stop root): on
    writing, and when asked (os.access)."""
    import errno
    import tempfile

    real_mkstemp, real_access = tempfile.mkstemp, os.access

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and os.path.samefile(dir, folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kw)

    def access(path, mode, *args, **kw):
        if os.path.exists(path) and os.path.samefile(path, folder) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "access", access)


def test_an_unwritable_folder_names_the_file_asked_for_not_the_temporary_one(tmp_path, monkeypatch):
    import pytest

    from ssvi_cli.fileio import UnwritablePath

    _read_only(monkeypatch, tmp_path)
    with pytest.raises(UnwritablePath) as caught:
        write_text(tmp_path / "a.txt", "x")
    assert str(caught.value) == f"cannot write {tmp_path / 'a.txt'}: Read-only file system"
    assert isinstance(caught.value, OSError) and not list(tmp_path.iterdir())
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    with pytest.raises(UnwritablePath) as caught:
        write_text(tmp_path / "taken", "x")  # a folder of that name: the error names it, no temporary file
    assert str(caught.value).startswith(f"cannot write {tmp_path / 'taken'}: ")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    (tmp_path / "x.npy").write_bytes(b"")  # a file where a folder of the path should be
    with pytest.raises(UnwritablePath, match=r"cannot write .*x\.npy/a/m: .*x\.npy is a file, not a folder$"):
        write_text(tmp_path / "x.npy" / "a" / "m", "x")
    # a folder above that cannot be searched (another user's): the system's own error, as before
    real_stat, real_mkdir = os.stat, os.mkdir
    locked = str(tmp_path / "locked") + os.sep

    def denied(real):
        return lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", str(p))) \
            if str(p).startswith(locked) else real(p, *a, **k)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "stat", denied(real_stat))
    monkeypatch.setattr(os, "mkdir", denied(real_mkdir))
    with pytest.raises(UnwritablePath, match=r"cannot write .*locked/sub/m: Permission denied$"):
        write_text(tmp_path / "locked" / "sub" / "m", "x")


def test_commands_refuse_an_unwritable_output_before_the_work(tmp_path, monkeypatch, capsys):
    from ssvi_cli.cli import run

    assert run(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--set", "model.widths=[16]",
                "--set", "data.max_train=100", "--set", "train.eval_samples=1", "--json"]) == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    capsys.readouterr()
    stamp = locked.stat().st_mtime_ns
    for argv in (["export", str(tmp_path / "run"), "--output", str(locked / "m.safetensors")],
                 ["evaluate", str(tmp_path / "run"), "--output", str(locked / "r.json")],
                 ["evaluate", str(tmp_path / "run"), "--plots", str(locked)],
                 ["inspect", str(tmp_path / "run"), "--plots", str(locked / "new" / "plots")]):
        assert run(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"cannot write into {locked}: Permission denied" in lines[0], lines
        assert ".tmp" not in lines[0] and "evaluating" not in lines[0]
    assert not list(locked.iterdir()) and locked.stat().st_mtime_ns == stamp  # nothing made, nothing probed
    (tmp_path / "afile").write_text("x")
    assert run(["evaluate", str(tmp_path / "run"), "--plots", str(tmp_path / "afile" / "plots")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --plots {tmp_path / 'afile' / 'plots'}: {tmp_path / 'afile'} is a file, not a folder"


def test_a_path_below_a_folder_this_user_may_not_enter_is_one_line_naming_that_folder(tmp_path, monkeypatch, capsys):
    """pathlib's probes of an output path below another user's private folder raised PermissionError,
    which ended as "error (PermissionError): [Errno 13] ..." with exit code 1."""
    from ssvi_cli.cli import run

    locked = tmp_path / "locked"
    locked.mkdir()
    inside = str(locked) + os.sep
    real_stat, real_access = os.stat, os.access
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(p))) if str(p).startswith(inside) else real_stat(p, *a, **k))
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) else real_access(p, mode, **k))
    for argv, out in ((["train", "--epochs", "1", "--out"], locked / "sub" / "run"),
                      (["sweep", "--method", "ssvi", "--dry-run", "--out"], locked / "sub" / "sweep")):
        assert run([*argv, str(out)]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"error: {out}: Permission denied (this user may not enter {locked})"], lines
    assert [p.name for p in tmp_path.iterdir()] == ["locked"]
    from ssvi_cli.fileio import denied  # a path in bytes, and a rename's two paths

    assert denied(PermissionError(errno.EACCES, "Permission denied", os.fsencode(out))) == \
        f"{out}: Permission denied (this user may not enter {locked})"
    assert denied(PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b")) == "/a -> /b: Permission denied"


def test_json_ready_gives_plain_python_and_null_for_nan():
    import numpy as np
    import torch

    from ssvi_cli.fileio import json_ready

    got = json_ready({"a": np.float64(1.5), "b": np.float32("nan"), "c": torch.tensor([1.0, float("inf")]),
                      "d": True, "e": (np.int64(3), float("-inf")), "f": "NaN"})
    assert got == {"a": 1.5, "b": None, "c": [1.0, None], "d": True, "e": [3, None], "f": "NaN"}
    assert type(got["a"]) is float and type(got["e"][0]) is int and got["d"] is True


def test_a_stream_input_refuses_a_terminal_and_an_endless_device(monkeypatch):
    from ssvi_cli.data import images
    from ssvi_cli.data.spec import DataError

    leader, follower = os.openpty()
    try:
        with pytest.raises(DataError, match="is a terminal; pipe or redirect"):
            images.open_stream(Path(os.ttyname(follower)))
    finally:
        os.close(leader)
        os.close(follower)
    monkeypatch.setattr(images, "STREAM_LIMIT", 1024)
    with pytest.raises(DataError, match="/dev/zero: more than"):
        images.open_stream(Path("/dev/zero"))


def test_every_json_ssvi_writes_is_standard(tmp_path):
    import json

    from ssvi_cli.fileio import append_jsonl, compact_json, write_json

    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in {text!r}"))

    record = {"loss": float("nan"), "acc": 0.5, "kl": float("inf")}
    assert strict(compact_json(record)) == {"loss": None, "acc": 0.5, "kl": None}
    append_jsonl(tmp_path / "m.jsonl", record)
    write_json(tmp_path / "s.json", record)
    assert strict((tmp_path / "m.jsonl").read_text()) == strict((tmp_path / "s.json").read_text())


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def test_a_file_system_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch, caplog, capsys, code):
    """Lustre without its flock option, NFS without lockd: a run goes on, unlocked, and says so."""
    import errno
    import fcntl

    from ssvi_cli.cli import run

    def no_locks(fh, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "r"
    assert run(["train", "--epochs", "1", "--set", "data.max_train=64", "--set", "train.eval_samples=1",
                "--out", str(out), "--json"]) == 0
    assert (out / "model.safetensors").is_file()
    assert f"{out} is not locked: its file system takes no locks" in caplog.text + capsys.readouterr().err
    caplog.clear()
    sweep = tmp_path / "s"  # a sweep takes several locks of its folder: said once
    assert run(["sweep", "--set", "train.epochs=1", "--out", str(sweep), "--dry-run"]) == 0
    assert caplog.text.count(f"{sweep} is not locked: its file system takes no locks") == 1, caplog.text
    caplog.clear()  # and said again by the next command of the same process (a notebook's, say)
    assert run(["sweep", "--set", "train.epochs=1", "--out", str(sweep), "--dry-run"]) == 0
    assert caplog.text.count(f"{sweep} is not locked: its file system takes no locks") == 1, caplog.text


def test_a_system_without_flock_locks_nothing_and_says_so_once(tmp_path, monkeypatch, caplog):
    """Windows has no fcntl: locks were off in silence, where the docstring and README promise a warning."""
    import builtins
    import logging

    import ssvi_cli.locks as locks

    real_import = builtins.__import__

    def no_fcntl(name, *args, **kwargs):
        if name == "fcntl":
            raise ImportError("No module named 'fcntl'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fcntl)
    monkeypatch.setattr(locks, "_UNLOCKED_SAID", [])
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.locks"):
        for name in ("a", "b"):
            with locks.acquire_lock(tmp_path / name / ".lock", "the run's lock"):
                with locks.acquire_lock(tmp_path / name / ".lock", "the run's lock"):  # not kept out
                    pass
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'a'} is not locked: this system has no flock (Windows), so nothing stops a second process "
        "from writing there meanwhile (nor in other runs' folders)"]


@pytest.mark.parametrize("error, free", [(OSError(errno.ENOSPC, "No space left on device"), 10 << 30),
                                         (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"), 4096)])
def test_a_full_disk_is_said_so_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch, error, free):
    """torch.save on a full disk said only 'unexpected pos 385984 vs 385876'."""
    import shutil
    from collections import namedtuple

    from ssvi_cli.fileio import UnwritablePath, atomic_path

    target = tmp_path / "checkpoint-00000042.pt"
    target.write_bytes(b"the checkpoint before")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 40, (1 << 40) - free, free))
    with pytest.raises(UnwritablePath) as caught:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert str(caught.value).startswith(f"cannot write {target}: no space left on the device (")
    assert str(caught.value).endswith(f"the previous {target.name}, if any, is unchanged")
    assert target.read_bytes() == b"the checkpoint before"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_writer_failing_with_room_to_spare_is_not_called_a_full_disk(tmp_path):
    from ssvi_cli.fileio import atomic_path

    with pytest.raises(RuntimeError, match="a bug"):
        with atomic_path(tmp_path / "x.bin"):
            raise RuntimeError("a bug")


def test_on_a_nearly_full_disk_only_a_writers_error_is_called_a_full_disk(tmp_path, monkeypatch):
    """A stop signal's exception (ssvi's Interrupted, a RuntimeError subclass) raised while the model
    file is written keeps its meaning, however little space is left."""
    import shutil
    from collections import namedtuple

    from ssvi_cli.fileio import atomic_path

    class Interrupted(RuntimeError):
        pass

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 40, (1 << 40) - 4096, 4096))
    with pytest.raises(Interrupted):
        with atomic_path(tmp_path / "model.safetensors"):
            raise Interrupted("stopped")



def test_lock_holder_names_another_holder_and_changes_nothing(tmp_path):
    """lock_holder probes a lock without taking it: the holder's process id while held, None when
    free or missing; the file keeps the holder's id."""
    from ssvi_cli.locks import acquire_lock, lock_holder

    lock = tmp_path / ".lock"
    assert lock_holder(lock) is None and not lock.exists()
    with acquire_lock(lock, "a lock"):
        assert lock_holder(lock) == str(os.getpid())
        assert lock.read_text() == str(os.getpid())
    assert lock_holder(lock) is None


def test_a_run_stopped_by_a_full_disk_after_a_checkpoint_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """The error alone read as if the run were lost: its earlier checkpoint is kept and resumes."""
    import shutil
    from collections import namedtuple

    from ssvi_cli.cli import run
    from ssvi_cli.runs import checkpoint

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 40, (1 << 40) - 4096, 4096))
    save, calls = checkpoint.torch.save, []

    def second_fills_the_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", second_fills_the_disk)
    out = tmp_path / "r"
    args = ["train", "--epochs", "3", "--set", "data.max_train=64", "--set", "train.eval_samples=1", "--out", str(out)]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err
    assert f"the run's checkpoints are kept: once that is fixed, resume with: ssvi train --resume {out}" in err
    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert run(["train", "--resume", str(out), "--json"]) == 0
    assert (out / "model.safetensors").is_file()
    monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    assert run(["train", "--epochs", "1", "--set", "data.max_train=64", "--out", str(tmp_path / "s")]) == 2
    assert "resume" not in capsys.readouterr().err  # no checkpoint yet: nothing to resume
    from ssvi_cli.runs.rundir import RunDir

    def unlistable(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

    monkeypatch.setattr(RunDir, "checkpoints", unlistable)  # the folder cannot be listed either: the error as it came
    assert run(["train", "--epochs", "1", "--set", "data.max_train=64", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "resume" not in err


def test_records_append_after_a_torn_line_without_pread_which_windows_lacks(tmp_path, monkeypatch):
    """The second line of every metrics.jsonl read the last byte with os.pread: on Windows any run of two
    epochs ended in "error (AttributeError): module 'os' has no attribute 'pread'"."""
    import os

    from ssvi_cli.fileio import append_jsonl

    monkeypatch.delattr(os, "pread", raising=False)
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 1})
    append_jsonl(path, {"epoch": 2})
    with open(path, "ab") as fh:
        fh.write(b'{"epoch": 3, "lo')  # a crash mid-write
    append_jsonl(path, {"epoch": 4})
    assert path.read_bytes() == b'{"epoch":1}\n{"epoch":2}\n{"epoch": 3, "lo\n{"epoch":4}\n'


def test_a_record_file_with_a_damaged_line_says_so_and_a_torn_last_line_does_not(tmp_path, caplog):
    """inspect reported a support history of 0 steps for a damaged support.jsonl, in silence."""
    import logging

    from ssvi_cli.fileio import read_jsonl

    path = tmp_path / "support.jsonl"
    path.write_text('{"step": 50}\njunk\n[1, 2]\n{"step": 150}\n{"step": 2')  # the last one cut by a crash
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.fileio"):
        assert read_jsonl(path) == [{"step": 50}, {"step": 150}]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: lines 2 and 1 more are not JSON records and are passed over; what is read from the file leaves them out"]
    caplog.clear()
    path.write_text('{"step": 50}\n{"step": 1')
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.fileio"):
        assert read_jsonl(path) == [{"step": 50}]
    assert not caplog.records
    path.write_bytes(b'{"step": 50}\n\xff\xfe\n{"step": 100}\n')  # bytes that are not UTF-8: a line passed over
    assert read_jsonl(path) == [{"step": 50}, {"step": 100}]


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_kept(tmp_path: Path):
    """The lock is opened for writing our process id: through a link (a .lock planted in an --out
    folder that looked empty) it emptied the link's target."""
    from ssvi_cli.fileio import UnwritablePath
    from ssvi_cli.locks import acquire_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(UnwritablePath, match="it is a symbolic link, which ssvi does not follow"):
        with acquire_lock(tmp_path / "run" / ".lock", "the run's lock"):
            pass
    assert victim.read_text() == "precious"


def test_telling_a_checkpoint_reads_a_bounded_part_of_its_record(tmp_path: Path, monkeypatch):
    """is_checkpoint read the archive's data.pkl whole: a 1.5 MB file inflating to 1.5 GiB took 3.7 GB
    of memory before --init-from refused it. It reads pieces, at most RECORD_READ_LIMIT bytes."""
    import zipfile
    from ssvi_cli.runs import checkpoint as ckpt

    def archive(name: str, before: int) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("archive/data.pkl", b"\0" * before + ckpt.FORMAT.encode() + b"\0" * 10)
        return path

    straddling = archive("straddling.pt", (1 << 20) - 3)  # the name across two pieces read
    assert ckpt.is_checkpoint(straddling)
    late = archive("late.pt", 3 << 20)
    assert ckpt.is_checkpoint(late)
    monkeypatch.setattr(ckpt, "RECORD_READ_LIMIT", 2 << 20)
    assert not ckpt.is_checkpoint(late) and ckpt.is_checkpoint(straddling)
