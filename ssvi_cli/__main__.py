"""``python -m ssvi_cli``: the same command line as ``ssvi`` (:func:`entry`), and what torchrun workers
run."""

import os
import signal
import sys


def _ends_at_once(signum: int, frame: object) -> None:  # noqa: ARG001
    os._exit(128 + signum)


_ends_at_once.ssvi_until_training = True  # type: ignore[attr-defined]  # training's stop_signals then restores Ctrl-C


def _training_rank() -> bool:
    """A training process of ``ssvi train --nproc`` (rundir.LOCK_HELD_ENV: its launcher holds the run's
    lock and puts a run --force set aside back)."""
    return "SSVI_RUN_LOCK_HELD" in os.environ and sys.argv[1:2] == ["train"] \
        and all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def entry() -> None:
    """The ``ssvi`` command. A Ctrl-C while the command line's modules are imported, before the
    command can say how it ended, ends it as "interrupted" (as Python ends on Ctrl-C: by SIGINT)."""
    rank = _training_rank()
    if rank:
        # Stopped before its training takes the stop signals over, it ends at once: it has not trained,
        # and a KeyboardInterrupt in an import would leave a module half made. The command says how
        # the run ended.
        signal.signal(signal.SIGINT, _ends_at_once)
    else:
        from ssvi_cli import interrupts

        interrupts.install()  # and for every import the command makes later
    try:
        from ssvi_cli.cli import main

        if not rank:
            interrupts.take_pending()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        if os.name == "posix":
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        sys.exit(130)
    main()


if __name__ == "__main__":
    entry()
