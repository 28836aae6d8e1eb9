"""Resumable checkpoints: model (with supports), optimizer, schedule position and RNG states.

Saved with ``torch.save`` to a temporary file and renamed; loaded with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ssvi_cli.fileio import atomic_path, brief
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.core.state import load_tensors, support_problem

log = logging.getLogger(__name__)

FORMAT = "ssvi-checkpoint"
VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d{8,})\.pt$")  # 8 digits, more from step 100,000,000 on


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not ours."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file whose bytes do not read as an ssvi checkpoint (a disk fault, a cut copy)."""


CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def latest_checkpoint(run_dir: Path, is_run: Optional[Callable[[Path], bool]] = None) -> Path:
    """The newest checkpoint of ``run_dir``; where it has none but ``is_run`` finds runs below it (a
    sweep's folder, a folder of runs), one of them is named."""
    if not Path(run_dir).exists():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not Path(run_dir).is_dir():  # its model file, say: the folder it is in is the run
        raise CheckpointError(f"{run_dir} is a file, not a run directory; give the run's folder ({Path(run_dir).parent})")
    found = list_checkpoints(run_dir)
    if not found:
        inner = run_below(run_dir, is_run) if is_run is not None else None
        if inner is not None:
            raise CheckpointError(f"{run_dir} is not a run directory but holds runs, such as {inner}; name one of them")
        own = Path(run_dir).name == CHECKPOINT_DIR and bool(list_checkpoints(Path(run_dir).parent))  # r1/checkpoints
        raise CheckpointError(f"{run_dir} is the checkpoints folder of the run in {Path(run_dir).parent}; name that folder"
                              if own else f"{run_dir} has no checkpoint (expected {checkpoint_dir(run_dir)}/checkpoint-*.pt); "
                              "is it a run directory written by 'ssvi train'?")
    return found[-1]


def run_below(folder: Path, is_run: Callable[[Path], bool], depth: int = 2, budget: int = 20_000,
              per_folder: int = 1_000) -> Optional[Path]:
    """The first folder (in name order) up to ``depth`` levels below ``folder`` that ``is_run``
    says holds a run, as a sweep's ``cells/NAME`` does; None if none is found. A large folder of
    images is not walked: each folder's first ``per_folder`` entries are listed, ``budget`` in all.
    What cannot be read is passed by."""
    level = [Path(folder)]
    for _ in range(depth):
        below: list[Path] = []
        for parent in level:
            children = []
            try:
                with os.scandir(parent) as entries:
                    for listed, entry in enumerate(entries):
                        budget -= 1
                        if budget < 0:
                            return None
                        if listed >= per_folder:
                            break
                        try:
                            if entry.is_dir():
                                children.append(Path(entry.path))
                        except OSError:
                            continue
            except OSError:
                continue
            for child in sorted(children):
                try:
                    if is_run(child):
                        return child
                except OSError:
                    continue
                below.append(child)
        level = below
    return None


def rng_state() -> dict[str, Any]:
    """The RNG states a resumed run goes on from: torch's CPU generator, Python's, and the current
    CUDA device's (the one a run uses; ``cuda_device`` names it)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """:func:`rng_state` back, the CUDA state onto the current device (a run resumed on another GPU,
    or where fewer are visible: restoring one state per saved device failed with an IndexError)."""
    torch.set_rng_state(state["torch"])
    py = random.getstate()
    random.setstate((py[0], tuple(int(v) for v in state["python"]), py[2]))
    if torch.cuda.is_available() and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif torch.cuda.is_available() and state.get("cuda"):  # a checkpoint from before: every visible device's
        saved, here = state["cuda"], torch.cuda.current_device()
        torch.cuda.set_rng_state(saved[here] if here < len(saved) else saved[0])


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/checkpoint-<step>.pt`` atomically, then prune all but the last ``keep``."""
    path = checkpoint_dir(run_dir) / f"checkpoint-{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in checkpoint_dir(run_dir).glob(".checkpoint-*.tmp"):
        stale.unlink(missing_ok=True)  # left by a process killed mid-write (one writer per run)
    return path


NOT_TENSORS = ("it holds Python objects besides tensors, and ssvi reads .pt files with weights_only=True, "
               "never running pickled code")


def torch_load_tensors(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers, never pickled code.
    torch's warning about a pickle protocol (any file pickled without torch.save) is not shown: the
    refusal that follows says what is wrong. Raises what ``torch.load`` raises."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def holds_objects(exc: BaseException) -> bool:
    """Whether torch's weights-only refusal ``exc`` met a class or function to import (a whole
    model saved with ``torch.save(model)``), not merely bytes it cannot read."""
    return "unsupported global" in str(exc).lower()  # "Unsupported global: ...", later "unsupported GLOBAL ..."


def unpickler_reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says what it met (``Unsupported operand 110``),
    without its advice to load the file with ``weights_only=False``."""
    advice = ("Weights only load failed", "Check the documentation of torch.load")
    lines = [line.strip() for line in str(exc).partition("WeightsUnpickler error:")[2].splitlines()] or \
            [line.strip() for line in str(exc).splitlines() if not line.strip().startswith(advice)]
    said = next((line for line in lines if line), "")
    return f"not a file torch.save wrote: {said}" if said else brief(exc)


# Read errors of the system rather than of the file's bytes (no permission, no file handles or memory
# left, a stale network handle): a checkpoint that meets them may be whole.
NOT_THE_FILE = frozenset(getattr(errno, name) for name in ("EACCES", "EPERM", "EMFILE", "ENFILE", "ENOMEM", "EAGAIN",
                                                           "ESTALE") if hasattr(errno, name))


def is_checkpoint(path: Path) -> bool:
    """Whether the torch.save archive at ``path`` is an ssvi training checkpoint: its pickled record
    (``data.pkl``, names and containers; the tensors are files beside it) holds the format's name."""
    try:
        with zipfile.ZipFile(path) as archive:
            record = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return record is not None and _holds(archive, record, FORMAT.encode())
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False


RECORD_READ_LIMIT = 64 << 20  # a checkpoint's data.pkl is kilobytes to a few megabytes (no tensor data)


def _holds(archive: zipfile.ZipFile, name: str, text: bytes) -> bool:
    """Whether ``text`` is in the first :data:`RECORD_READ_LIMIT` bytes of the archive's member ``name``,
    read in pieces: a small file can inflate to gigabytes (a zip bomb)."""
    seen, tail = 0, b""
    with archive.open(name) as fh:
        while seen < RECORD_READ_LIMIT and (block := fh.read(1 << 20)):
            if text in tail + block:
                return True
            seen, tail = seen + len(block), (tail + block)[-len(text):]
    return False


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain containers only)."""
    from ssvi_cli.modelfile.header import safetensors_header

    if safetensors_header(path) is not None:  # a model file renamed .pt (torch.load's error depends on its bytes)
        raise CorruptCheckpoint(f"{path} is a safetensors file (an ssvi model file?) named as a training checkpoint "
                                f"is; ssvi reads a model file by its .safetensors name: rename it "
                                f"{Path(path).with_suffix('.safetensors').name}")
    try:
        data = torch_load_tensors(path, map_location=map_location)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        if holds_objects(exc):  # a class or function to import: never, here
            raise CorruptCheckpoint(f"checkpoint {path} is unreadable ({NOT_TENSORS})") from None
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable or corrupted ({unpickler_reason(exc)})") from None
    except OSError as exc:
        if exc.errno in NOT_THE_FILE:  # the system, not the bytes: not passed over for an older checkpoint
            raise CheckpointError(f"cannot read checkpoint {path} ({brief(exc)})") from None
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable or corrupted ({brief(exc)})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable or corrupted ({brief(exc)})") from None
    except (KeyError, IndexError, TypeError, AttributeError, AssertionError, struct.error) as exc:
        # what any bytes may send the unpickler to ('hello': KeyError: 101, which says nothing to the reader)
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable or corrupted (not a file torch.save "
                                f"wrote: {type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CorruptCheckpoint(f"{path} is not an ssvi checkpoint but a torch.save file of plain weights "
                                    "(ssvi train --model torchvision:NAME --init-from starts a run from them)")
        raise CorruptCheckpoint(f"{path} is not an ssvi checkpoint (a torch.save file of something else)")
    if not isinstance(version := data.get("version", 0), int):
        raise CorruptCheckpoint(f"checkpoint {path} has a corrupted format version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this ssvi ({VERSION}); "
                              "upgrade ssvi to read it")
    return data


@contextmanager
def restoring(path: Optional[Path]) -> Iterator[None]:
    """Restore parts of the checkpoint at ``path`` inside: one not as ssvi writes it (an edited record that
    still unpickles) is a :class:`CheckpointError` naming the file, not the restoring code's exception."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        what = f"{type(exc).__name__}: {brief(exc)}" if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} does not hold a run's state as ssvi writes one ({what}); resume "
                              "from an earlier checkpoint (move this one aside) or start the run again") from None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "model state") -> None:
    """Restore supports first (their sizes vary), each checked as a model file's are, then every
    tensor strictly; a problem is a :class:`CheckpointError` that ``where`` begins."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a dict of tensors")
    for name, layer in sparse_layers(model):
        prefix = f"{name}." if name else ""
        try:
            idx = state[prefix + "idx"]
            mu = state[prefix + "mu"]
        except KeyError as exc:
            raise CheckpointError(f"{where} lacks {exc.args[0]}") from None
        rho = state.get(prefix + "rho")
        if layer.bayesian and rho is None:
            raise CheckpointError(f"{where} lacks {prefix}rho")
        if problem := support_problem(layer.numel, idx, mu, rho if layer.bayesian else None):
            raise CheckpointError(f"{where}: layer {name!r}: {problem}")
        layer.set_support(idx, mu, rho)
    try:
        missing, unexpected = load_tensors(model, state)
    except RuntimeError as exc:  # a tensor of another shape
        raise CheckpointError(f"{where} does not fit its architecture ({brief(exc)})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_latest(run: Any, purpose: str = "resuming from", warn: bool = True) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint of ``run`` (a :class:`~ssvi_cli.runs.rundir.RunDir`) and its
    contents (read once, with ``weights_only=True``).

    A newest checkpoint whose bytes do not read (a disk fault, a cut copy) is passed over, with a
    warning ("<its error>; <purpose> <name>, the one before it"; not with ``warn`` off, for a check
    that the resume itself repeats), for the one before it; it stays
    on disk (``train --resume`` renames it ``NAME.unreadable``: RunPlan.set_aside_unreadable).
    When none reads, the newest one's error is raised, naming the older ones that failed too."""
    latest = run.latest_checkpoint()  # a clear error for a missing folder or no checkpoint
    first_error: Optional[CorruptCheckpoint] = None
    unread: list[str] = []
    for path in reversed(run.checkpoints()):
        try:
            data = load_checkpoint(path)
        except CorruptCheckpoint as exc:
            first_error = first_error or exc
            unread.append(path.name)
            continue
        except CheckpointError:
            if path.exists():
                raise
            continue  # gone since it was listed: renamed NAME.unreadable by a resume on another rank
        if warn and path != latest and first_error is not None:
            log.warning("%s; %s %s, the one before it", first_error, purpose, path.name)
        return path, data
    assert first_error is not None
    if len(unread) > 1:
        older = ", ".join(unread[1:])
        raise CorruptCheckpoint(f"{first_error}; the older {older} do{'es' if len(unread) == 2 else ''} "
                                "not read either") from first_error
    raise first_error
