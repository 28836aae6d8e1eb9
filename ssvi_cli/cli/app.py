"""The ``ssvi`` Typer app and its error handling: the only module that turns exceptions into exit codes."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback
from typing import Annotated, Any, Optional, Sequence

import typer
from rich.markup import escape

from ssvi_cli.argcheck import printable
from ssvi_cli.cli import bench as bench_cmd
from ssvi_cli.cli import evaluate as evaluate_cmd
from ssvi_cli.cli import export as export_cmd
from ssvi_cli.cli import infer as infer_cmd
from ssvi_cli.cli import inspect_cmd
from ssvi_cli.cli import presets as presets_cmd
from ssvi_cli.cli import sweep as sweep_cmd
from ssvi_cli.cli import train as train_cmd
from ssvi_cli.cli.common import Debug, UsageError, err, tell
from ssvi_cli.cli.train_config import train_flag_hint
from ssvi_cli.cli.train_fit import KeyboardInterruptHandled
from ssvi_cli.warned import warnings_scope
from ssvi_cli.training.cpus import fit_torch_threads

app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},  # -h as most tools take it
                  help="Sparse Bayesian neural networks with Sparse Subspace Variational Inference. "
                       "Add --debug anywhere on a command line for debug logs and full tracebacks.")

class _OnceEach(typer.core.TyperCommand):
    """A command whose options that take one value refuse to be given twice: Click keeps the last one,
    so ``--preset digits_mlp --preset mine.yaml`` dropped the first preset, ``--epochs 1 --epochs 2``
    the first count, in silence. Options that gather values (``--set``, ``--ood``) and flags are as
    Click has them."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:  # Click's own reading of the line, which lists each option once per occurrence
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        except Exception as exc:  # noqa: BLE001 - a line Click cannot read: its own parse below says why
            unknown = type(exc).__name__ == "NoSuchOption"  # not an option of its own given without a value
            hint = train_flag_hint(str(getattr(exc, "option_name", ""))) if unknown and self.name == "sweep" else None
            if hint:  # Click's "No such option: --epochs (Possible options: --report)" led nowhere
                raise UsageError(hint) from None
            order = []
        if any(getattr(p, "name", None) == "help" for p in order):  # --help answers whatever else is there
            order = []
        for param in dict.fromkeys(order):
            times = order.count(param)
            once = (getattr(param, "param_type_name", "") == "option" and not getattr(param, "multiple", True)
                    and not getattr(param, "is_flag", True) and not getattr(param, "count", True))
            if once and times > 1 and not ctx.resilient_parsing:  # (Tab's parse: no error line at a Tab)
                raise UsageError(f"{max(param.opts, key=len)} is given {'twice' if times == 2 else f'{times} times'}; "
                                 "give it once (the last value would replace the others in silence)")
        return super().parse_args(ctx, args)


for module in (train_cmd, presets_cmd, evaluate_cmd, export_cmd, infer_cmd, inspect_cmd, bench_cmd, sweep_cmd):
    module.register(app)
for _command in app.registered_commands:
    if _command.cls in (None, typer.core.TyperCommand):
        _command.cls = _OnceEach


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:  # not at a Tab
        from ssvi_cli.cli.console import write_out
        from ssvi_cli.version import __version__
        write_out(f"ssvi {__version__}\n")  # a reader gone (| true) is no failure, as for the commands
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print ssvi's version and exit.")] = False,
             debug: Annotated[bool, typer.Option("--debug", hidden=True)] = False) -> None:
    """ssvi's own options; ``--debug`` (run() takes it out anywhere) is one for Tab's parse of ``ssvi --debug train``."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something impossible (exit code 2)."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.registry import UnknownName

    found: list[type[BaseException]] = [UsageError, ConfigError, UnknownName]
    # The other families only matter once their module has been imported (an error of a module
    # that never loaded cannot be in flight), so this lookup imports nothing new.
    for module, name in (("ssvi_cli.data.spec", "DataError"), ("ssvi_cli.core.allocation", "AllocationError"),
                         ("ssvi_cli.runs.checkpoint", "CheckpointError"), ("ssvi_cli.runs.rundir", "RunDirError"),
                         ("ssvi_cli.modelfile.header", "ModelFileError"), ("ssvi_cli.sweep.grid", "SweepError"),
                         ("ssvi_cli.network", "NetworkSettingError"), ("ssvi_cli.fileio", "UnwritablePath"),
                         ("ssvi_cli.prediction", "NonFiniteOutput")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            found.append(getattr(loaded, name))
    return tuple(found)


def _in_chain(exc: BaseException, kind: type[BaseException]) -> Optional[BaseException]:
    """The first ``kind`` along ``exc``'s chain of causes and contexts (``exc`` itself first), if any:
    a stop that cleaning up turned into another error (rich writing to a closed terminal) is still
    the stop."""
    seen: set[int] = set()
    found: Optional[BaseException] = exc
    while found is not None and id(found) not in seen:
        if isinstance(found, kind):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


class Terminated(BaseException):
    """SIGTERM, or SIGHUP from a closed terminal, outside training's own stop handling: it unwinds the
    command as Ctrl-C does, so that the temporary file of a write in progress is removed."""

    def __init__(self, signum: int) -> None:
        self.signum = signal.Signals(signum)
        super().__init__(f"stopped by {self.signum.name}")


def _torchrun_worker() -> bool:
    """Whether this process is a torchrun worker (training.distributed.ENV_KEYS, read without torch)."""
    return all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def _unwinding() -> Any:
    """SIGTERM or SIGHUP (unless ignored, as under ``nohup``) outside training's and sweeps' own
    handling, which they set over this one while they run, unwinds the command as Ctrl-C does; once,
    so that a second signal does not cut the clean-up short. Not in a ``torchrun`` worker, which its
    launcher stops and whose rank 0 alone speaks."""
    from contextlib import nullcontext

    from ssvi_cli.interrupts import held_back
    from ssvi_cli.training.stops import stop_signals

    if _torchrun_worker():
        return nullcontext()
    stopped: list[signal.Signals] = []

    def unwind(signum: signal.Signals) -> None:
        if held_back(signum):  # in an import: once it ends
            return
        if not stopped:
            stopped.append(signum)
            raise Terminated(signum)

    return stop_signals(unwind, ctrl_c=False)  # Ctrl-C already unwinds, as KeyboardInterrupt


class _Progress(logging.Handler):
    """Prints the ``ssvi_cli.progress`` logger's lines as they are (long work of the lower layers, such
    as decoding an image folder) on stderr, where progress goes."""

    def emit(self, record: logging.LogRecord) -> None:
        tell(printable(record.getMessage()), highlight=False)


def _silent_rank() -> bool:
    """A torchrun worker other than rank 0, which alone speaks for the run."""
    return _torchrun_worker() and os.environ.get("RANK", "0") != "0"


def _say_interrupted() -> None:
    """"interrupted", said once per run: by rank 0 alone among ``--nproc``'s processes."""
    if not _silent_rank():
        tell("interrupted")


def _show_progress() -> None:
    if _silent_rank():
        return
    logger = logging.getLogger("ssvi_cli.progress")
    if not any(isinstance(h, _Progress) for h in logger.handlers):
        logger.addHandler(_Progress())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _usable_streams() -> None:
    """Standard output that cannot encode a character (``PYTHONIOENCODING=ascii``, a cp1252 console:
    ±, σ, a path with é) writes it escaped rather than failing after the work is done; a stream closed
    when ssvi started (``>&-``) is /dev/null rather than an AttributeError at the first line."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - for the process's life
            continue
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (a test's capture): as it is
            pass


def _empty_argument(args: Sequence[str]) -> Optional[str]:
    """The refusal of an empty argument, most often a shell variable that was not set (``--out
    "$RUN"``): taken as ``.``, it trained into the current folder or read it."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if arg == "" or (flag.startswith("--") and eq and not value):
            where = (f"{flag}'s value" if arg else
                     f"the argument after {args[i - 1]}" if i and args[i - 1].startswith("-") else "an argument")
            return f"{where} is empty (a shell variable that is not set?); give one"
    return None


class _Shown(logging.Formatter):
    """A log line whose control characters are shown as escapes, as in error lines: a file name's terminal
    escape is printed, not run, and its newline forges no line; a traceback (--debug) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))


class _Plain(_Shown):
    """``warning: message``, the level in lower case."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def _stdout_reader_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is the exit of rich's console on a lost reader of standard output (raised in its
    ``on_broken_pipe``, by a console that writes to stdout, not to stderr)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    console = tb.tb_frame.f_locals.get("self") if tb is not None else None
    return tb is not None and tb.tb_frame.f_code.co_name == "on_broken_pipe" and getattr(console, "stderr", True) is False


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 1 runtime failure, 2 usage error, 130 interrupted
    (Ctrl-C; the ``ssvi`` command then ends by SIGINT: :func:`main`), 143 stopped by SIGTERM, 129 by
    SIGHUP."""
    _usable_streams()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = Debug.on = "--debug" in args
    args = [a for a in args if a != "--debug"]
    handler = logging.StreamHandler()  # "warning: ..." as the commands' notes and errors read; --debug names the logger
    handler.setFormatter(_Shown("%(levelname)s %(name)s: %(message)s") if debug else _Plain())
    # A torchrun worker other than rank 0 says no warning: rank 0 meets the same ones and says them.
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR if _silent_rank() else logging.WARNING,
                        handlers=[handler])
    _show_progress()
    fit_torch_threads()
    if (empty := _empty_argument(args)) is not None:
        err.print(f"[bold red]error:[/] {escape(empty)}", markup=True)
        return 2
    try:
        # Standalone mode: Typer reports its own usage errors (exit 2); ours propagate to here.
        with _unwinding(), warnings_scope():  # a folder's warnings once in the command (each command's own)
            app(args=args, prog_name="ssvi")
        return 0
    except Terminated as exc:
        tell(str(exc))
        return 128 + exc.signum
    except SystemExit as exc:
        if _in_chain(exc, KeyboardInterrupt):  # Typer turns a KeyboardInterrupt into a silent exit 130
            _say_interrupted()
            return 130
        if exc.code == 1 and "--help" in args and _stdout_reader_gone(exc):
            return 0  # the help's reader went (| head): rich's console exits 1, "a runtime failure"
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterruptHandled as exc:
        if str(exc):
            tell(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _say_interrupted()
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into messages
        stop = _in_chain(exc, Terminated)
        if isinstance(stop, Terminated):
            tell(str(stop))
            return 128 + stop.signum
        if _in_chain(exc, KeyboardInterrupt):
            _say_interrupted()
            return 130
        # A path the system's permissions keep from this user (probed anywhere, by pathlib, say): the
        # user's to fix, said as one line naming it.
        refused = isinstance(exc, PermissionError) and bool(exc.filename)
        too_long, link = (isinstance(exc, OSError) and exc.errno == e and bool(exc.filename)  # --out x*300; O_NOFOLLOW
                          for e in (errno.ENAMETOOLONG, errno.ELOOP))
        code = 2 if refused or too_long or link or isinstance(exc, _user_errors()) else 1
        if debug:  # the traceback, and the same exit code as without --debug
            traceback.print_exception(exc)
            return code
        from ssvi_cli.fileio import denied

        message = (denied(exc) if refused else f"{exc.filename}: " + ("a name" if max(map(len, os.fsencode(exc.filename).split(
                   b"/"))) > 255 else "a path") + " too long for this system (most allow names of 255 bytes, paths of 4096)"
                   if too_long else
                   f"{exc.filename} is a symbolic link, which ssvi does not follow here, or a loop of them (remove it)"
                   if link else
                   str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if getattr(exc, "ssvi_resume", None):  # a run stopped by it keeps its checkpoints
            message += f"; the run's checkpoints are kept: once that is fixed, resume with: {exc.ssvi_resume}"
        prefix = "error" if code == 2 else f"error ({type(exc).__name__})"
        # escape(): a message may hold brackets (pip extras, paths) that rich would read as markup.
        err.print(f"[bold red]{prefix}:[/] {escape(printable(message))}" + ("" if code == 2 else "  (run with --debug for the traceback)"),
                  markup=True)
        return code


def main() -> None:
    code = run()
    if code == 130 and os.name == "posix" and not _torchrun_worker():  # Windows keeps exit code 130
        # Interrupted, and said so: end as Python ends on an uncaught Ctrl-C, by SIGINT once it has
        # finished (atexit handlers, flushed streams), so that a shell running a loop of ssvi commands
        # stops the loop rather than taking the run for one that handled the Ctrl-C and went on
        # (bash's "wait and cooperative exit"). The shell still shows $? as 130.
        sys.excepthook = lambda *args: None  # no traceback after "interrupted"
        raise KeyboardInterrupt
    sys.exit(code)
