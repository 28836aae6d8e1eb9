"""``ssvi train``'s progress while a run trains and finishes: the run's headline and notes, a bar per
epoch on a terminal (a line per epoch either way), a line when the final evaluation starts, and the
message a stop signal leaves."""

from __future__ import annotations

from typing import Any, Callable

from ssvi_cli.cli.common import count, fmt, progress_bar, tell
from ssvi_cli.cli.train_config import nproc_again
from ssvi_cli.config import image_folder
from ssvi_cli.machine import quote_path
from ssvi_cli.training.stops import stopped_how


def fit(trainer, interrupted_cls, quiet: bool, say: Callable[[str], None], bar: bool = True) -> dict[str, Any]:
    """Train with a progress display on stderr (none when ``quiet``; a line per epoch, no bar, without
    ``bar``: under --json); ``say`` takes the notes about the run. A line that finds no reader
    (``2>&1 | head``) is dropped: the run goes on to its model file."""
    from ssvi_cli.core.allocation import kept_dense_note, stem_note
    from ssvi_cli.training.records import Progress

    cfg = trainer.cfg
    if not quiet:
        images = ", ".join(f"{n:,} {name}" for name, n in trainer.splits.sizes().items())
        tell(f"training {cfg.model.name} on {cfg.data.name} ({images} images) with {cfg.sparse.method} "
             f"(density {cfg.density:.3g}, {count(cfg.train.epochs, 'epoch')}, device {trainer.device}) -> {trainer.run_dir}")
        if image_folder(cfg.data.name) is not None:  # what was found in the user's folder
            tell(_folder_line(trainer.splits.spec, cfg.data.mean is not None, cfg.data.std is not None), highlight=False)
    if cfg.method.moves_support and trainer.schedule.updates == 0:
        hint = "" if cfg.sparse.delta_t == "auto" else " (--set sparse.delta_t=auto spaces them to fit the run)"
        say(f"note: a run of {count(trainer.total_steps, 'step')} has no subspace step before t_end at "
            f"delta_t {trainer.schedule.delta_t}, so the support will not move{hint}")
    if kept := kept_dense_note(trainer.model):
        say(f"note: {kept}; the sparsity, file savings and FLOPs count the converted layers")
    if stem := stem_note(trainer.model, 1 - cfg.density):  # dense and vi: none
        say(f"note: {stem}")
    with progress_bar(enabled=not quiet and bar) as bar:
        task = None

        def on_epoch_start(epoch: int, n_batches: int) -> None:
            nonlocal task
            if bar is not None:
                if task is not None:
                    bar.remove_task(task)
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=n_batches, info="")

        def on_batch(live: dict[str, float]) -> None:
            if bar is not None and task is not None:
                bar.update(task, advance=1, info=f"loss {live['loss']:.4f} acc {live['acc']:.3f}")

        def on_epoch_end(rec: dict[str, Any]) -> None:
            if not quiet:  # above the bar on a terminal, which shows the epoch running alone
                # the loss is the NLL plus the KL times its weight, which grows with the warm-up (the
                # epoch's mean; metrics.jsonl's "kl" is the unweighted KL at its last step)
                tell(f"epoch {rec['epoch']}/{cfg.train.epochs} loss {rec['loss']:.4f} "
                          f"(nll {rec['nll']:.4f} + weighted kl {rec['loss'] - rec['nll']:.4f}) train_acc {rec['train_accuracy']:.3f} "
                          f"val_acc {fmt(rec['val_accuracy'], 3)} density {rec['density']:.4f} "
                          f"swapped {rec['swapped']} {rec['seconds']:.1f}s")

        try:
            return trainer.fit(Progress(on_epoch_start, on_batch, on_epoch_end,
                                        on_phase=None if quiet else lambda text: tell(f"{text} ...")))
        except OSError as exc:  # a full disk, a folder made read-only: what was checkpointed is kept
            try:
                kept = trainer.is_main and bool(trainer.run.checkpoints())
            except OSError:  # the folder itself unreadable now: the error as it came
                kept = False
            if kept:
                exc.ssvi_resume = f"ssvi train --resume {quote_path(trainer.run_dir)}" + nproc_again(trainer.dist.world_size)
            raise
        except interrupted_cls as stop:
            how = stopped_how(stop.signum)
            message = (f"{how} during {stop.during}; training had finished and its checkpoint is written"
                       if stop.during else f"{how} at step {stop.step}; checkpoint written")
            # One line per run, not per rank: the other ranks exit with the same code, silently.
            raise KeyboardInterruptHandled(message if trainer.is_main else "", exit_code=128 + int(stop.signum),
                                           resume=f"ssvi train --resume {quote_path(stop.run_dir)}" + nproc_again(trainer.dist.world_size)
                                           if trainer.is_main else "") from None


def _folder_line(spec: Any, mean_given: bool, std_given: bool) -> str:
    """An image folder's classes, input shape and normalisation, as the run reads them (each of the
    mean and std given, or measured on the training images)."""
    names = spec.class_names
    shown = ", ".join(names) if len(names) <= 8 else f"{', '.join(names[:6])}, ... {names[-1]}"

    def values(v: Any, given: bool) -> str:
        return "(" + ", ".join(f"{x:.3f}" for x in v) + ")" + (" as given" if given else "")

    how = "" if mean_given and std_given else ", measured on the training images" + (
        "" if not (mean_given or std_given) else " where not given")
    return (f"data: {len(names):,} class{'es' * (len(names) != 1)} ({shown}); inputs {'x'.join(map(str, spec.input_shape))} "
            f"(data.channels, data.image_size); normalised by mean {values(spec.mean, mean_given)} and std "
            f"{values(spec.std, std_given)}{how}")


class KeyboardInterruptHandled(Exception):
    """A stop signal after the checkpoint was written; the exit code is the shell's 128 + signal
    number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130, resume: str = "") -> None:
        super().__init__(f"{message}. Resume with: {resume}" if message and resume else message)
        self.message, self.exit_code, self.resume = message, exit_code, resume
