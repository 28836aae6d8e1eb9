"""Stopping a run on request: Ctrl-C (SIGINT), SIGTERM (as a batch scheduler sends before it kills
a job) or SIGHUP (a closed terminal): finish the current step, write a checkpoint and raise
:class:`Interrupted`; and stopping one that cannot go on (:class:`TrainingError`)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad device, ...); the message says what to do."""


def diverged(run: Any, what: str, first: bool = False) -> NoReturn:
    """Stop a diverged run (``run``: its RunDir), naming its last good checkpoint. ``first``: at the
    first step, before any update a learning rate made: the start itself is the trouble."""
    last = run.checkpoints()
    kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
    fix = ("Check the initial values (bayes.sigma_init_mean, bayes.mu_init_std, bayes.prior_sigma) and the "
           "inputs' scale" if first else "Try a lower learning rate (--lr) or a larger bayes.prior_sigma")
    raise TrainingError(f"{what}; {kept}. {fix}")


class Interrupted(RuntimeError):
    """Training stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint."""

    def __init__(self, run_dir: Path, step: int, signum: int = signal.SIGINT, during: str = "") -> None:
        super().__init__(f"interrupted during {during} after step {step}" if during else
                         f"interrupted at step {step}; checkpoint written")
        # ``during``: what the stop cut short after training, whose last checkpoint is already written.
        self.run_dir, self.step, self.signum, self.during = Path(run_dir), step, signal.Signals(signum), during


def stopped_how(signum: int) -> str:
    """How a stop is said: "interrupted" for Ctrl-C, else "stopped by SIGTERM" (by "signal N" for one
    without a name)."""
    if signum == signal.SIGINT:
        return "interrupted"
    try:
        return f"stopped by {signal.Signals(signum).name}"
    except ValueError:
        return f"stopped by signal {signum}"


LOSS_TERMS = {1: "the KL term", 2: "the data term (cross-entropy)"}  # the codes of :func:`loss_trouble`


def loss_trouble(nll: Any, kl: Any, loss: Any) -> Any:
    """On the loss's device, without waiting for it: 0 where the loss is finite, else the code in
    :data:`LOSS_TERMS` of the term that went (the data term where both did)."""
    import torch  # here: the command line imports this module before any command needs torch

    return torch.where(torch.isfinite(loss), 0, torch.where(torch.isfinite(nll), 1, 2))


def check_finite_loss(run: Any, state: Any, trouble: int, processes: int = 1) -> None:
    """A non-finite loss ends the run (:func:`diverged`), naming the term that went; ``trouble`` is
    :func:`loss_trouble`'s code, the largest over ``processes`` ranks in a data-parallel run, where
    every rank stops at the same step (one rank stopping alone would leave the others waiting)."""
    if not trouble:
        return
    where = f" on at least one of the {processes} processes" if processes > 1 else ""
    diverged(run, f"non-finite loss at step {state.step} (epoch {state.epoch + 1}) in {LOSS_TERMS[int(trouble)]}"
                  f"{where}", first=state.step == 0)


def check_finite_state(run: Any, state: Any, model: Any) -> None:
    """A checkpoint never replaces a good one with a diverged model (NaN/inf in any tensor)."""
    import torch

    epoch = state.epoch + (1 if state.batch_in_epoch else 0)  # the epoch of that step
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            diverged(run, f"non-finite values in {name} after step {state.step} "
                          f"(epoch {epoch}); the diverged model was not saved")


def requests_to_stop() -> list[signal.Signals]:
    """The signals that ask a run to stop at a checkpoint: Ctrl-C (SIGINT), SIGTERM (a scheduler) and,
    where the system has it, SIGHUP (the terminal closed); each unless it was ignored when ssvi
    started (``nohup``'s SIGHUP, the SIGINT of a job a script ran in the background), which stays so."""
    found = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    return [sig for sig in found if signal.getsignal(sig) is not signal.SIG_IGN]


@contextmanager
def stop_signals(on_signal: Callable[[signal.Signals], None], ctrl_c: bool = True) -> Iterator[None]:
    """Route the :func:`requests_to_stop` signals (without SIGINT unless ``ctrl_c``) to ``on_signal``
    inside the block; the previous handlers come back after it. A repeated signal is routed too
    rather than cutting the step short: under ``torchrun`` each rank gets Ctrl-C twice (from the
    terminal, then forwarded by torchrun), and both must lead to the checkpoint. Outside the main
    thread the signals are left alone."""
    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        on_signal(signal.Signals(signum))

    previous: dict[int, Any] = {}
    try:
        for sig in requests_to_stop():
            if ctrl_c or sig != signal.SIGINT:
                previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():  # a handler for the time before training: Ctrl-C's own after it
            signal.signal(sig, signal.default_int_handler if getattr(old, "ssvi_until_training", False) else old)
