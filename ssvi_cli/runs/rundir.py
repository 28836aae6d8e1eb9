"""A run directory: its file names (elsewhere named only to point a user to one), how a run claims
(or replaces) its folder, and where its checkpoints, epoch records, support history and summary go.

| file | written by |
| --- | --- |
| ``config.yaml`` | the resolved configuration, at the start |
| ``metrics.jsonl`` | one record per epoch |
| ``support.jsonl`` | one record per subspace step |
| ``checkpoints/checkpoint-<step>.pt`` | the last N resumable checkpoints |
| ``model.safetensors`` | the compact model file, at the end |
| ``summary.json`` | the final summary, at the end |
| ``evaluation.json`` | a sweep cell's evaluation (``ssvi sweep``) |

``--force`` replaces a run by these entries only (set aside until the new run has a checkpoint:
:mod:`ssvi_cli.runs.aside`); a folder that is not a run is never emptied.
"""

from __future__ import annotations

import errno
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Optional

from ssvi_cli import config as cfgmod, fileio, locks
from ssvi_cli.machine import quote_path
from ssvi_cli.runs import aside, checkpoint as ckpt


CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUPPORT_FILE = "support.jsonl"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.json"
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, SUPPORT_FILE, ckpt.CHECKPOINT_DIR, MODEL_FILE, SUMMARY_FILE, EVALUATION_FILE)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists, holds a run, is a file)."""


class RunBusy(RunDirError):
    """Another process is writing the run (training, resuming or replacing it)."""


LOCK_FILE = ".lock"  # hidden: an empty folder with it is still empty, and --force leaves it
LOCK_HELD_ENV = "SSVI_RUN_LOCK_HELD"  # the run whose lock the launcher of this process holds for it


def checkpoints_owner(path: Path) -> Optional[Path]:
    """The run whose checkpoints folder holds ``path`` (that folder itself or anything below it, as
    the path resolves, however it was reached), or None."""
    for folder in (Path(path).resolve(), *Path(path).resolve().parents):
        if fileio.is_entry(folder, ckpt.CHECKPOINT_DIR) and RunDir(folder.parent).trained_here():
            return folder.parent
    return None


class RunDir:
    """The files of one training run under ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def default(cls, preset: str, method: str, sparsity: Optional[float], root: Path = Path("runs")) -> "RunDir":
        """``runs/<YYYYmmdd-HHMMSS>-<preset, its first 48 characters>-<method>[-s<sparsity>]``: a valid name."""
        name = (Path(preset).stem if preset.lower().endswith(cfgmod.PRESET_SUFFIXES) else Path(preset).name)[:48]  # a file's, cut
        tag = f"{name}-{method}" + (f"-s{sparsity:g}" if sparsity is not None else "")
        return cls(root / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}")

    # -- claiming --------------------------------------------------------------------

    def hold(self, flag: str = "--out", create: bool = True) -> ContextManager[Any]:
        """The run's lock (:data:`LOCK_FILE`), held until the returned context ends, so that no second
        process writes the run meanwhile: a ``--force`` over a run in progress, or a second ``--resume``
        of it, is refused (:class:`RunBusy`). ``create``: make the folder of a new run (a folder that
        cannot be made or written is refused now, in a line, naming ``flag``); otherwise a missing
        folder is left for the caller to refuse."""
        if not create and not self.path.is_dir():
            return nullcontext()
        if self.path.is_dir() and os.environ.get(LOCK_HELD_ENV) == str(self.path.resolve()):
            return nullcontext()  # ssvi train --nproc holds it for the processes it started
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{flag} {self.path} exists and is not a directory")
        fileio.check_writable(self.path, flag)
        try:
            return locks.acquire_lock(self.path / LOCK_FILE, "the run's lock")
        except fileio.UnwritablePath as exc:  # a folder the system refuses only when it is made
            why = f"{self.path / LOCK_FILE} is a symbolic link, which ssvi does not follow (remove it)" \
                if exc.errno == errno.ELOOP else os.strerror(exc.errno) if exc.errno else str(exc)
            raise fileio.UnwritablePath(exc.errno, f"{flag} {self.path} cannot be made or written: {why}") from None
        except locks.Locked as exc:
            raise self._busy(flag, exc.holder) from None

    def check_free(self, flag: str) -> None:
        """Refuse a run another process holds (:class:`RunBusy`): before a check whose error would mislead."""
        held = self.path.is_dir() and os.environ.get(LOCK_HELD_ENV) == str(self.path.resolve())  # --nproc's launcher
        if not held and (holder := locks.lock_holder(self.path / LOCK_FILE)) is not None:
            raise self._busy(flag, holder)

    def _busy(self, flag: str, holder: str) -> RunBusy:
        return RunBusy(f"{flag} {self.path}: the run is in use by another ssvi process (process {holder}, or the "
                       "processes it started); wait for it to end, or stop it, and run this again")

    def fresh(self) -> "RunDir":
        """This folder, or the first of ``NAME-2``, ``NAME-3``, ... that is not there, made now by an
        exclusive mkdir: for a default run name, so that runs started in the same second (a loop of
        background jobs) each get a folder of their own."""
        fileio.check_writable(self.path, "the default run folder")  # refused by the system: one line, naming it
        for n in range(1, 10_000):
            candidate = self.path if n == 1 else self.path.with_name(f"{self.path.name}-{n}")
            try:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise fileio.UnwritablePath(exc.errno, f"the default run folder {candidate} cannot be made: "
                                            f"{exc.strerror or exc} (give one with --out)") from None
            return RunDir(candidate)
        raise RunDirError(f"no free run folder next to {self.path}; give one with --out")

    def claim(self, force: bool = False) -> "RunDir":
        """Make sure a new run may write here: an empty or missing folder, or (``force``) an old run,
        whose files are set aside (:data:`RUN_ENTRIES`; all else stays). A folder holding anything but
        a run is refused, ``force`` or not. Call it once all else is checked, holding the lock (:meth:`hold`)."""
        if self.check_claim(force, held=True):
            aside.set_aside(self.path, RUN_ENTRIES)  # until the new run has a checkpoint (runs/aside.py)
        return self

    def check_claim(self, force: bool = False, held: bool = False) -> bool:
        """:meth:`claim`'s refusals, changing nothing; whether there is an old run to remove. A run
        another process holds is refused first (``held``: this process holds it)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a directory")
        if not held:  # running: no advice to --force or --resume it
            self.check_free("--out")
        aside.settle_run(self, RUN_ENTRIES)  # a run a --force left aside (its process killed): back, or gone
        owner = checkpoints_owner(self.path)
        if owner is not None:
            where = "is" if self.path.resolve().parent == owner else "is inside"
            raise RunDirError(f"--out {self.path} {where} the checkpoints folder of the run in {owner}, which that "
                              "run's --resume reads and its --force removes; choose another --out")
        entries = fileio.visible_entries(self.path) if self.path.is_dir() else []
        if not entries:
            return False
        if not self.is_run():
            raise RunDirError(fileio.not_ours(self.path, entries, "run"))
        if not self._left_traces():  # a config kept as config.yaml (a preset, a copy): --force would remove it
            raise RunDirError(f"--out {self.path} holds a config.yaml but no run trained there (no lock, record or "
                              f"checkpoint), so it is left as it is, --force or not; choose another --out (to train "
                              f"from that config: --preset {self.config_file})")
        if not force:
            if self.finished():
                raise RunDirError(f"--out {self.path} already holds a finished run; pass --force to overwrite "
                                  "it, or choose another --out")
            if not self.checkpoints():  # stopped before its first checkpoint: nothing to resume
                raise RunDirError(f"--out {self.path} holds a run that stopped before its first checkpoint; pass "
                                  "--force to start it again, or choose another --out")
            raise RunDirError(
                f"--out {self.path} already holds a run; pass --force to overwrite it or "
                f"--resume {self.path} to continue it"
            )
        return True

    def finished(self) -> bool:
        """Whether the run reached its end: its summary and model file are written."""
        return self.summary_file.is_file() and self.model_file.is_file()

    def trained_here(self) -> bool:
        """Whether a run trained in this folder (a lock, a record or a checkpoint beside its
        ``config.yaml``), not only a config saved as ``config.yaml`` (a user's preset, a copy)."""
        return self.is_run() and self._left_traces()

    def _left_traces(self) -> bool:
        """Whether a run left its lock, a record or a checkpoint here (:meth:`trained_here` for a folder
        already known to hold a run's config)."""
        evidence = (self.path / LOCK_FILE, self.metrics_file, self.summary_file)
        return any(p.is_file() for p in evidence) or bool(self.checkpoints())

    def is_run(self) -> bool:
        """Whether the folder holds an ssvi run: a ``config.yaml`` that reads as a run's config."""
        return self.read_config() is not None

    def read_config(self) -> Optional[Any]:
        """The run's :class:`~ssvi_cli.config.Config` from its ``config.yaml``, or None when there is
        none or it does not read as one."""
        import yaml

        from ssvi_cli.config import ConfigError, from_dict

        try:
            data = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
            return from_dict(data)  # anything but a mapping of config sections is a ConfigError
        except (OSError, yaml.YAMLError, ConfigError, TypeError, ValueError):
            return None

    def checked_config(self, cfg: Any, checkpoint: Path) -> Any:
        """``cfg``, the config ``checkpoint`` holds, when it is the run's own ``config.yaml``'s: one copied in
        from another run (or a shared folder ``checkpoints`` links to) would be trained on, the run's pruned."""
        if (own := self.read_config()) is None or own == cfg:
            return cfg
        mine, theirs = own.to_dict(), cfg.to_dict()
        keys = [f"{s}.{k} {theirs[s].get(k)!r} (config.yaml: {v!r})" for s in mine for k, v in mine[s].items()
                if v != theirs.get(s, {}).get(k)]
        raise ckpt.CheckpointError(f"{checkpoint} holds another config than the run's config.yaml: {'; '.join(keys[:3])}"
                                   f"{'; ...' if len(keys) > 3 else ''}. --resume trains on with a checkpoint's config: "
                                   f"put an edited config.yaml back as it was (ssvi train --preset {quote_path(self.config_file)} "
                                   f"--out NEW trains with it), move a checkpoint of another run out of {checkpoint.parent}")

    # -- files -------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def support_file(self) -> Path:
        return self.path / SUPPORT_FILE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    def write_config(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fileio.write_text(self.config_file, text)

    def append_metrics(self, record: dict[str, Any]) -> None:
        fileio.append_jsonl(self.metrics_file, record)

    def append_support(self, record: dict[str, Any]) -> None:
        fileio.append_jsonl(self.support_file, record)

    def cut_records(self, epochs: int, steps: int) -> None:
        """Keep the ``metrics.jsonl`` lines of the first ``epochs`` epochs and the ``support.jsonl``
        lines of the first ``steps`` steps: a run resumed from an older checkpoint (the newest one
        unreadable, or the process killed between checkpoints) writes the later ones again."""
        for path, keep in ((self.metrics_file, lambda r: r.get("epoch", 0) <= epochs),
                           (self.support_file, lambda r: r.get("step", 0) < steps)):
            if path.is_symlink():  # appended through, into a file outside the run
                raise fileio.UnwritablePath(errno.ELOOP, f"cannot write {path}: it is a symbolic link, which ssvi does "
                                                         "not follow (remove it)")
            if not path.is_file():
                continue
            records = fileio.read_jsonl(path)
            kept = [r for r in records if isinstance(r, dict) and keep(r)]
            if len(kept) != len(path.read_text(encoding="utf-8").splitlines()):  # later or torn lines
                fileio.write_text(path, "".join(fileio.compact_json(r) + "\n" for r in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        fileio.write_json(self.summary_file, summary)

    def read_summary(self) -> dict[str, Any]:
        """The final summary, or {} when the run has none (yet) or it is unreadable."""
        if not self.summary_file.is_file():
            return {}
        try:
            return json.loads(self.summary_file.read_text(encoding="utf-8"))
        except ValueError:
            return {}

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Checkpoints, oldest first."""
        return ckpt.list_checkpoints(self.path)

    def latest_checkpoint(self) -> Path:
        """The newest checkpoint; a run that stopped before its first one is named as such."""
        found = self.checkpoints()
        if not found and self.path.is_dir() and self.is_run():
            if not self._left_traces():
                raise ckpt.CheckpointError(f"{self.path} holds a config.yaml but no run trained there, so there is "
                                           f"nothing to read or resume; to train from it: ssvi train --preset "
                                           f"{quote_path(self.config_file)} --out NEW_FOLDER")
            if self.summary_file.is_file():  # it finished, after its last checkpoint: they went since
                gone = "checkpoints" + ("" if self.model_file.is_file() else " and model file")
                raise ckpt.CheckpointError(f"{self.path} holds a run whose {gone} are gone (its records remain), so "
                                           f"there is nothing to read or resume; ssvi train --out {quote_path(self.path)} --force "
                                           "trains it again, replacing those records")
            replaced = aside.kept_note(self.path, f"ssvi train --out {quote_path(self.path)}")
            raise ckpt.CheckpointError(f"{self.path} holds a run that stopped before its first checkpoint, so there "
                                       f"is nothing to read or resume; " + (replaced or "start it again with ssvi train "
                                       f"--out {quote_path(self.path)} --force"))
        if not found and (self.path / LOCK_FILE).is_file() and not fileio.visible_entries(self.path):
            if (holder := locks.lock_holder(self.path / LOCK_FILE)) is not None:  # starting now, in its first epoch
                raise ckpt.CheckpointError(f"{self.path} holds a run that is starting (process {holder}): nothing to "
                                           "read or resume until its first checkpoint")
            replaced = aside.kept_note(self.path, f"ssvi train --out {quote_path(self.path)}")
            raise ckpt.CheckpointError(f"{self.path} holds no run: one was stopped there before it began, so there is "
                                       "nothing to read or resume; " + (replaced or "train with --out "
                                       f"{quote_path(self.path)} again (only its lock is left)"))
        return found[-1] if found else ckpt.latest_checkpoint(self.path, lambda p: RunDir(p).is_run())  # not a run

    def load_latest(self, purpose: str = "resuming from", warn: bool = True) -> tuple[Path, dict[str, Any]]:
        """The newest readable checkpoint and its contents: :func:`ssvi_cli.runs.checkpoint.load_latest`."""
        return ckpt.load_latest(self, purpose, warn)

    def save_checkpoint(self, step: int, payload: dict[str, Any], keep: int) -> Path:
        saved = ckpt.save_checkpoint(self.path, step, payload, keep)
        aside.settle_run(self, RUN_ENTRIES)  # the run a --force replaces goes once this one has a checkpoint
        return saved
