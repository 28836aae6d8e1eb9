"""``python -m ssvi_cli``: the same command line as ``ssvi`` (and what torchrun workers run)."""

import os
import signal

if __name__ == "__main__" and all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
    # A torchrun worker stopped (Ctrl-C, passed on by the launcher) before its training takes the stop
    # signals over ends at once: it has written nothing yet, and a KeyboardInterrupt raised in the
    # middle of an import left a module half made (numpy's AttributeError said instead of the stop).
    # ``ssvi train --nproc`` says how the run ended.
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

from ssvi_cli.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
