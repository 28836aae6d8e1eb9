"""``python -m ssvi_cli``: the same command line as ``ssvi`` (and what torchrun workers run)."""

import os
import signal
import sys


def _ends_at_once(signum: int, frame: object) -> None:  # noqa: ARG001
    os._exit(128 + signum)


_ends_at_once.ssvi_until_training = True  # type: ignore[attr-defined]  # training's stop_signals then restores Ctrl-C

if __name__ == "__main__" and "SSVI_RUN_LOCK_HELD" in os.environ and sys.argv[1:2] == ["train"] \
        and all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
    # A training process of ``ssvi train --nproc`` (rundir.LOCK_HELD_ENV: its launcher holds the run's
    # lock and puts a run --force set aside back) stopped before its training takes the stop signals
    # over ends at once: it has not trained, and a KeyboardInterrupt raised in the middle of an import
    # left a module half made (numpy's AttributeError said instead of the stop). The command says how
    # the run ended.
    signal.signal(signal.SIGINT, _ends_at_once)

from ssvi_cli.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
