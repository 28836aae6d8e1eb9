"""``ssvi train``: resolve the preset and flags into a Config, plan the run once
(``training.plan.RunPlan``), claim its directory and hand it to the trainer; progress and the summary
are printed here."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from ssvi_cli import config as cfgmod
from ssvi_cli.cli import completion
from ssvi_cli.cli.common import (Debug, UsageError, check_run_out, scored_as, fmt, forwarded_args, kv_table, no_reader, out,
                                 print_json, running_a_cell, tell)
from ssvi_cli.cli.numbers import whole
from ssvi_cli.cli.presets import print_train_config
from ssvi_cli.cli.train_config import (build_config, config_origin, default_run_dir, finished_run, idle_settings_note,
                                       init_from_lr_note, nproc_again, pin_init_from, processes_note, recipe_note, set_keys,
                                       threads_note, unused_keys)
from ssvi_cli.cli.train_fit import KeyboardInterruptHandled, fit
from ssvi_cli.machine import quote_path
from ssvi_cli.training.stops import stopped_how


def summary_rows(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": summary["method"],
        "model / data": f"{summary['model']} / {summary['dataset']}",
        "target sparsity": summary["sparsity"],
        "achieved density": f"{summary['density']:.4f} ({summary['active_weights']:,} of {summary['total_weights']:,} weights)"
                            + (f"; {summary['kept_dense_weights']:,} more in layers kept dense" if summary.get("kept_dense_weights") else ""),
        "test accuracy": summary["test_accuracy"],
        "test NLL": summary["test_nll"],
        "evaluated as": scored_as(summary),
        "mean-network accuracy": summary["test_accuracy_mean_net"],
        "epochs / steps": f"{summary['epochs']} / {summary['steps']}",
        "subspace steps": _subspace_row(summary),
        "processes / global batch": f"{summary['world_size']} / {summary['global_batch']}",
        "training throughput": f"{fmt(summary['samples_per_second'], 1)} samples/s ({summary['precision']})",
        "training FLOPs": _flops_row(summary),
        "model file bytes": f"{summary.get('model_file_bytes', 0):,}",
    }


def _subspace_row(summary: dict[str, Any]) -> str:
    """``586 (delta_t 100)``, or ``104 (delta_t 9, auto)`` when the run's length chose it."""
    dt, auto = summary.get("delta_t"), ", auto" if summary.get("delta_t_auto") else ""
    return str(summary["subspace_steps"]) if dt is None else f"{summary['subspace_steps']} (delta_t {dt}{auto})"


def _flops_row(summary: dict[str, Any]) -> str:
    total, ratio = summary.get("training_flops"), summary.get("training_flops_reduction_vs_vi")
    if total is None:
        return "-"
    return f"{total:.3g} ({ratio:.1f}x below dense VI, analytic{'; this run only' if summary.get('init_from') else ''})"


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        ctx: typer.Context,
        preset: Annotated[Optional[str], typer.Option(help=f"Preset name (see 'ssvi presets') or a YAML path. Default {cfgmod.DEFAULT_PRESET}; with --init-from a trained ssvi model, the config that model was trained with.", show_default=False, autocompletion=completion.presets)] = None,
        model: Annotated[Optional[str], typer.Option(help="Architecture: mlp, lenet5, resnet18, vgg16, vgg19, or torchvision:NAME (any torchvision classifier, built without weights).", autocompletion=completion.of(completion.MODELS))] = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Dataset: digits (embedded), mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn, or imagefolder:PATH (your class folders; --set data.image_size=, data.channels=).", autocompletion=completion.of(completion.DATASETS))] = None,
        data_dir: Annotated[Optional[Path], typer.Option(help="Folder of torchvision datasets (default ~/.cache/ssvi/data).")] = None,
        download: Annotated[Optional[bool], typer.Option("--download/--no-download", help="Download missing torchvision datasets.", show_default=False)] = None,
        init_from: Annotated[Optional[str], typer.Option(help="A trained ssvi model (a run directory, a model file or a training checkpoint): the run starts from its supports, mu and sigma, with its config unless --preset is given. torchvision:NAME models also start from a trained state_dict (.pt read with weights_only=True, or .safetensors), or from torchvision's published weights, torchvision:WEIGHTS (torchvision:DEFAULT, or a weights name as torchvision spells it, the README's example; fetched into torch's hub cache): a head for other classes is re-initialised, the first conv fits the data's channels, and the support is each layer's largest |w|.")] = None,
        sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights that are exactly zero, in [0, 1).")] = None,
        method: Annotated[Optional[str], typer.Option(help="ssvi, vi, static, rigl or dense.", autocompletion=completion.methods)] = None,
        criterion: Annotated[Optional[str], typer.Option(help="Removal criterion: mean, snr, e_abs, snr_abs, e_exp, snr_exp.", autocompletion=completion.of(completion.CRITERIA))] = None,
        epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
        batch_size: Annotated[Optional[int], typer.Option(help="Minibatch size.")] = None,
        lr: Annotated[Optional[float], typer.Option(help="Learning rate of mu (and BN, biases).")] = None,
        seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
        device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (default: the config's train.device, auto: CUDA when present).", autocompletion=completion.devices)] = None,
        out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default: in runs/, named by date, time, preset, method and sparsity; from-NAME for the preset with --init-from a trained model).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set optim.lr_sigma=0.02 (repeatable).")] = None,
        resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its last checkpoint.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace the run in --out (its own files, kept aside until the new run has a checkpoint; a folder that is not a run is never emptied).")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the final summary (summary.json) as JSON only, with the run's notes as notes.")] = False,
        precision: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (autocast; fp16 adds a gradient scaler). The LRT variance stays float32.", autocompletion=completion.of(cfgmod.PRECISIONS))] = None,
        nproc: Annotated[Optional[int], typer.Option(parser=whole("--nproc", 1), metavar="<int>", help="Processes on this node, data parallel (started with torchrun); --batch-size is per process.")] = None,
        kernel: Annotated[Optional[str], typer.Option(help="Weight products: auto (per layer by density and type), sparse (active entries only) or dense (a transient dense weight).", autocompletion=completion.kernels)] = None,
        print_config: Annotated[bool, typer.Option("--print-config", help="Print the config this command would train with (with --resume: the run's), as YAML that --preset reads back (--json: JSON), and exit: nothing is trained or written.")] = False,
    ) -> None:
        """Train a sparse Bayesian network with SSVI (or a baseline via --method).

        Also runs as one worker of: torchrun --nproc-per-node N -m ssvi_cli train ...
        """
        from ssvi_cli.data import reads_data_dir
        from ssvi_cli.runs import aside
        from ssvi_cli.runs.rundir import RUN_ENTRIES, RunDir
        from ssvi_cli.training import distributed, launcher
        from ssvi_cli.training.plan import RunPlan
        from ssvi_cli.training.trainer import Interrupted, Trainer

        info = distributed.info_from_env()
        overrides = {
            "model.name": model, "model.init_from": init_from, "data.name": data,
            "data.data_dir": str(data_dir) if data_dir is not None else None, "data.download": download, "sparse.sparsity": sparsity, "sparse.method": method, "sparse.criterion": criterion,
            "train.epochs": epochs, "train.batch_size": batch_size, "optim.lr": lr, "train.seed": seed,
            "train.device": device, "train.precision": precision, "train.kernel": kernel}
        if resume is not None:
            given = [n for n, v in (("--preset", preset), ("--model", model), ("--init-from", init_from), ("--data", data),
                                     ("--data-dir", data_dir), ("--download", download is not None), ("--sparsity", sparsity),
                                     ("--method", method), ("--criterion", criterion), ("--epochs", epochs),
                                     ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed),
                                     ("--set", set_), ("--out", out_dir), ("--precision", precision),
                                     ("--kernel", kernel), ("--force", force)) if v]
            if given:
                settings = [g for g in given if g not in ("--out", "--force")]
                raise UsageError(f"--resume continues a run with its saved config; drop {', '.join(given)}" + (
                    f" (a new run from it takes other settings: ssvi train --init-from {quote_path(resume)} --out NEW ...)" if settings else ""))
        elif out_dir is not None and not print_config:
            check_run_out(out_dir)  # a sweep's cells folder, say, before anything else
        if print_config:
            return print_train_config(resume, preset, overrides, set_ or [], json_out)
        if nproc is not None and nproc > 1:
            if info is not None:
                raise UsageError("--nproc starts torch.distributed.run itself; under torchrun drop it")
            if resume is None or not finished_run(resume, json_out, True):  # a finished run starts no process
                _launch(ctx, nproc, resume, preset, out_dir, force, overrides, set_ or [], device)
            return
        if info is not None and info.enabled:
            launcher.stop_with_parent()  # a launcher killed outright leaves no process training unowned
        info = info or distributed.SINGLE
        notes: list[str] = []  # rank 0's notes, said on stderr as they come and kept for --json's "notes"

        def say(note: str) -> None:  # each line of it a note
            for line in note.splitlines() if info.is_main else ():
                tell(line, highlight=False)
                notes.append(line.removeprefix("note: "))  # as evaluate's JSON notes read
        with ExitStack() as held:  # the run's lock, held by rank 0 to the end (RunDir.hold)
            if resume is not None:
                if finished_run(resume, json_out, info.is_main):
                    return
                if info.is_main:
                    RunDir(resume).check_free("--resume")  # in use: said before "no checkpoint yet"
                # One pre-flight: the checkpoint is read once, the device resolved (a clear error for an
                # absent GPU) and the data loaded, all before the process group exists.
                try:
                    plan = RunPlan.resume(resume, device=device)
                except KeyboardInterrupt:  # it said just "interrupted"
                    raise KeyboardInterruptHandled(
                        "interrupted while the run's checkpoint and data were read, before it went on; nothing "
                        "changed" if info.is_main else "", resume=f"ssvi train --resume {quote_path(resume)}"
                        + nproc_again(info.world_size) if info.is_main else "") from None
                if info.is_main:  # once it has passed its checks (a refused one leaves no lock file behind)
                    held.enter_context(RunDir(resume).hold("--resume", create=False))
                    plan.check_unchanged()
                    for path in plan.set_aside_unreadable():
                        say(f"note: a checkpoint that does not read (above) is renamed {path}, so that "
                            "pruning passes it by; rename it back to try it again")
            else:
                # Names, device, data and the layer budget are checked before --force removes an old run,
                # so a missing dataset or an impossible sparsity never costs the run being replaced.
                cfg = build_config(preset, overrides, set_ or [])
                plan = RunPlan.new(cfg, out_dir or default_run_dir(cfg, preset), progress=not json_out and info.is_main,
                                   given=set_keys(set_ or []), world_size=info.world_size)
                plan.origin = config_origin(plan.cfg, preset)
                if out_dir is not None and info.is_main:
                    plan.run_dir.check_claim(force)  # a refused --out (a finished run there) before any note
                say("\n".join(n for n in (plan.init_note, plan.data_note) if n))
                say(init_from_lr_note(plan.cfg, overrides, set_ or []))
                given = [*set_keys(set_ or []), *(k for k, v in overrides.items() if v is not None)]
                say("" if running_a_cell() else recipe_note(plan.cfg, preset, given))
                if (unused := unused_keys(plan.cfg, overrides, set_ or [])) and not running_a_cell():
                    # a sweep gives every cell its fixed keys: no note in each
                    say(f"note: {plan.cfg.sparse.method} does not use {', '.join(unused)}, so "
                        f"{'it changes' if len(unused) == 1 else 'they change'} nothing here")
                say("" if running_a_cell() else idle_settings_note(plan.cfg, overrides, set_ or []))
                if (data_dir is not None or download) and not reads_data_dir(plan.cfg.data.name):
                    say(f"note: --data-dir and --download are for torchvision datasets; {plan.cfg.data.name} "
                        "reads no data folder, so they change nothing")
            trainer = None
            try:
                distributed.setup(info, device or plan.cfg.train.device)
                if resume is None:
                    # Rank 0 locks and claims the run directory (with --force, removing the old run's files);
                    # the others take its answer.
                    def claim() -> Path:
                        run_dir = plan.run_dir.fresh() if out_dir is None else plan.run_dir  # a default name: a
                        run_dir.check_claim(force)  # run started this second may have it; a non-run gets no lock
                        held.enter_context(run_dir.hold())
                        return run_dir.claim(force).path

                    plan.run_dir = RunDir(distributed.on_main(claim))  # rank 0's folder, on every rank
                trainer = Trainer.from_plan(plan, dist_info=info)
                if resume is not None and info.is_main:
                    where = (f"at epoch {trainer.state.epoch + 1}, step {trainer.state.step}"
                             if trainer.state.epoch < trainer.cfg.train.epochs else
                             f"after its last epoch (step {trainer.state.step}): the final evaluation and model file")
                    tell(f"resuming {resume} {where}" + (f" on {info.world_size} processes" if info.enabled else ""))
                    say(threads_note(trainer.run, trainer.device.type))
                    say(processes_note(trainer.state.global_batch, trainer.cfg.train.batch_size, info.world_size))
                summary = fit(trainer, Interrupted, quiet=not info.is_main, say=say, bar=not json_out)
            finally:
                if trainer is not None:
                    trainer.release_process_group()
                distributed.teardown()
                if info.is_main and plan.run_dir.path.is_dir():  # a run --force set aside: removed, or back
                    say(aside.settle_run(plan.run_dir, RUN_ENTRIES) or "")  # where the new one has no checkpoint
        if not info.is_main:
            return
        # The run is done and its files written: an output with no reader (| head) leaves it a success.
        if json_out:
            try:
                print_json({**summary, "notes": notes})
            except OSError:
                no_reader(stdout=True)
            return
        tell(kv_table(f"ssvi train: {trainer.run_dir}", summary_rows(summary)), console=out)
        # Paths on lines of their own, never folded into a cell, so a person can copy them.
        model = quote_path(summary.get("model_file"))
        tell(f"model file: {summary.get('model_file')}\nnext: ssvi evaluate {model} --ood noise | ssvi infer {model} "
             f"IMAGES | ssvi inspect {model}", console=out, highlight=False)


@contextmanager
def _said_on_failure() -> Iterator[None]:
    """The warnings ssvi logs in the block, held back and said only should it fail (they may explain
    the error): ``--nproc``'s checks before the launch meet what rank 0 then meets and says."""
    if Debug.on:  # every line as it comes
        yield
        return
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    logger = logging.getLogger("ssvi_cli")
    hold, propagate = Hold(), logger.propagate
    logger.addHandler(hold)
    logger.propagate = False
    try:
        yield
    except BaseException:
        for record in held:
            logging.getLogger().handle(record)
        raise
    finally:
        logger.removeHandler(hold)
        logger.propagate = propagate


def _since(path: Path, started_ns: int) -> bool:
    """Whether ``path`` was written at or after ``started_ns`` (a file gone or unreadable: no)."""
    try:
        return path.stat().st_mtime_ns >= started_ns
    except OSError:
        return False


def _launch(ctx: typer.Context, nproc: int, resume: Optional[Path], preset: Optional[str], out_dir: Optional[Path], force: bool,
            overrides: dict[str, Any], sets: list[str], device: Optional[str]) -> None:
    """Check the run here, once, where errors read well (and before ``--force`` removes an old run),
    then rerun the command on ``nproc`` processes. A stop signal sent to this process alone (``kill``,
    a container's stop, ``timeout``) reaches them too: each stops at a checkpoint, as without
    ``--nproc``, and this process exits as they did."""
    from ssvi_cli.runs import aside
    from ssvi_cli.runs.rundir import LOCK_HELD_ENV, RUN_ENTRIES, RunDir
    from ssvi_cli.training import launcher
    from ssvi_cli.training.plan import preflight, preflight_resume

    # the file a trained --init-from model was read from; how the launch ended; whether --force set a run aside
    read, ended, set_aside = None, None, False
    launcher.check_memory(nproc)  # before anything is written
    with _said_on_failure():  # rank 0 says the warnings again as it reads the data
        if resume is None:
            cfg = build_config(preset, overrides, sets)
            read = preflight(cfg, given=set_keys(sets), world_size=nproc, out=out_dir)
            run = RunDir(out_dir) if out_dir else default_run_dir(cfg, preset).fresh()
            run.check_claim(force)  # a folder that is not a run is refused before a lock is left in it
            flag = "--out"
        else:
            run, flag = RunDir(resume), "--resume"
            run.check_free(flag)  # running, not yet checkpointed: in use, not "no checkpoint"
            preflight_resume(resume, device, nproc)
    # The lock is held here until the processes end, and by the launcher too, should this process be
    # killed first (launcher.launch); rank 0 knows it by LOCK_HELD_ENV.
    with run.hold(flag, create=resume is None) as lock:
        try:
            if resume is None:
                out_dir = run.claim(force).path
            args = pin_init_from(forwarded_args(ctx, drop=("nproc", "out_dir")), read)
            if out_dir is not None:
                args += ["--out", str(out_dir)]
            tell(f"starting {nproc} training processes for {run.path}", highlight=False)  # each loads torch and the data
            set_aside, started = (run.path / aside.ASIDE).is_dir(), time.time_ns()
            ended = launcher.launch(nproc, ["train", *args], env={LOCK_HELD_ENV: str(run.path.resolve())},
                                    pass_fds=[lock.fileno()] if hasattr(lock, "fileno") else [])
            # Nothing written since the launch, as a run --force set aside may be back already (rank 0 puts
            # it back and aside again as it claims; a move keeps a file's time): no checkpoint, and no
            # config.yaml (rank 0 writes it as training begins: a resumed run's final evaluation writes no
            # checkpoint)
            untrained = not any(_since(path, started) for path in [*run.checkpoints(), run.config_file])
        finally:  # the run --force set aside: removed, or back where the processes left no checkpoint
            if note := aside.settle_run(run, RUN_ENTRIES):
                tell(note)
            elif set_aside and not (run.path / aside.ASIDE).is_dir() and ended is not None and untrained:
                tell(aside.put_back_note(run.path))  # rank 0 put it back before it ended
    if message := launcher.ending_message(ended, nproc, run.path, untrained):  # unsaid by them
        tell(message)
    if ended.stopped_by is not None and ended.code:  # the processes stopped at a checkpoint and said so
        if not message and run.finished() and _since(run.summary_file, started):  # or ended, as the stop came
            tell(f"{stopped_how(ended.stopped_by)} as the training processes ended: the run had finished, its model file and summary written")
        raise typer.Exit(128 + int(ended.stopped_by))
    if ended.code:
        raise typer.Exit(1 if ended.code < 0 else ended.code)
