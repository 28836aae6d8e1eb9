"""``ssvi sweep``: a grid of ordinary runs (methods x sparsities x seeds x config keys), each trained
by ``ssvi train`` and evaluated by ``ssvi evaluate`` in a process of its own, then one report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from ssvi_cli.cli import completion
from ssvi_cli.cli.common import (UsageError, check_output_dir, count, err, out, print_json, progress_bar, tell,
                                 write_out)
from ssvi_cli.cli.numbers import whole
from ssvi_cli.cli.sweep_cell import check_changed, run_cell
from ssvi_cli.machine import path_word, quote_path, shell_join, shell_quote

if TYPE_CHECKING:
    from ssvi_cli.sweep.grid import SweepSpec


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        method: Annotated[Optional[str], typer.Option(help="Methods, comma-separated: ssvi,vi,static,rigl,dense (dense ones ignore --sparsity; default: the preset's).", autocompletion=completion.method_lists)] = None,
        sparsity: Annotated[Optional[str], typer.Option(help="Sparsities, comma-separated, e.g. 0.8,0.9,0.95,0.98 (default: the preset's).")] = None,
        seeds: Annotated[Optional[int], typer.Option(parser=whole("--seeds", 1), metavar="<int>", help="Seeds 0..N-1 per cell (default 1: seed 0).")] = None,
        criterion: Annotated[Optional[str], typer.Option(help="Removal criteria to sweep, comma-separated (the criteria ablation).", autocompletion=completion.of(completion.CRITERIA, listed=True))] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="A config key and its values, a grid axis (--set sparse.alpha=0.3,0.5), or one value for every cell (repeatable); a key that holds a list, model.widths, reads a comma list as one value (128,256) and an axis from bracketed lists ([128],[256]).")] = None,
        preset: Annotated[Optional[str], typer.Option(help="Preset of every cell (default digits_mlp).", autocompletion=completion.presets)] = None,
        file: Annotated[Optional[Path], typer.Option("--file", help="A YAML sweep: preset, methods, sparsities, seeds (a count or a list), set (key: a value, or a list of values for an axis), ood, samples.", exists=True, dir_okay=False)] = None,
        ood: Annotated[Optional[list[str]], typer.Option(help="OOD sets every cell is evaluated on, as 'ssvi evaluate --ood' takes them (repeatable).", autocompletion=completion.of(completion.OOD))] = None,
        samples: Annotated[Optional[int], typer.Option(parser=whole("--samples", 1), metavar="<int>", help="Monte Carlo samples of the evaluation (default 10).")] = None,
        jobs: Annotated[Optional[int], typer.Option(parser=whole("--jobs", 1), metavar="<int>", help="Cells run in parallel, each in its own process (default 1; with --resume: as the sweep last ran).")] = None,
        threads: Annotated[Optional[int], typer.Option(parser=whole("--threads", 1), metavar="<int>", help="Torch threads per cell (default: the CPU cores this process may use / jobs; with --resume and no --jobs: as the sweep last ran).")] = None,
        out_dir: Annotated[Optional[Path], typer.Option("--out", help="Sweep directory (default sweeps/<time>-<preset>).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the sweep and print its cell commands, one per line (for a cluster scheduler); run nothing.")] = False,
        resume: Annotated[Optional[Path], typer.Option(help="Continue the sweep in this directory (finished cells are skipped, interrupted ones resume).")] = None,
        report: Annotated[Optional[Path], typer.Option(help="Only (re)write the report of the sweep in this directory.")] = None,
        run_cell_dir: Annotated[Optional[Path], typer.Option("--run-cell", help="Run one cell directory (train or resume, then evaluate); what --dry-run lists.")] = None,
        figures: Annotated[Optional[bool], typer.Option("--figures/--no-figures", help="Write the figures (needs matplotlib; default yes, or for a sweep that exists, as it last ran).", show_default=False)] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace another sweep in --out (its own files, cells included) instead of refusing; a folder that is not a sweep is never emptied.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the report (with --dry-run: the cell commands; with --run-cell: the cell's training summary and evaluation) as JSON only.")] = False,
        baseline: Annotated[Optional[list[str]], typer.Option(help="Also report every group's paired differences (mean ± standard error over common seeds) from the one group this names: KEY=VALUE with KEY method, sparsity or a swept key (also by its last part: criterion=mean), repeatable (e.g. --baseline method=vi).")] = None,
    ) -> None:
        """The paper's experiments in one command: a grid of runs, evaluated alike, reported as tables and figures."""
        from ssvi_cli.sweep import grid, report as reportmod
        from ssvi_cli.sweep.drift import record_folders
        from ssvi_cli.sweep.paired import check_selection
        from ssvi_cli.sweep.checks import check_ood_paths, check_ood_sets, check_runnable, idle_axes
        from ssvi_cli.sweep.request import spec_from_flags
        from ssvi_cli.sweep.runner import cell_dir, cell_state
        from ssvi_cli.sweep.sweepdir import (claim_sweep_dir, processes_entry, record_figures, recorded_figures,
                                             recorded_processes)
        from ssvi_cli.sweep.sweepfile import write_spec
        from ssvi_cli.training import distributed

        grid_given = any(v for v in (method, sparsity, seeds, criterion, set_, preset, file, ood, samples, out_dir, force))
        if (run_cell_dir or report) and (dry_run or jobs or threads):
            raise UsageError("--run-cell and --report take no --dry-run, --jobs or --threads")
        modes = [n for n, v in (("--run-cell", run_cell_dir), ("--report", report), ("--resume", resume)) if v]
        if modes and force and len(modes) == 1:  # --force replaces a sweep that a grid makes: nothing here
            raise UsageError(f"{modes[0]} replaces nothing: leave out --force (it goes with the whole grid and --out, "
                             "to replace a sweep made under other settings)")
        if len(modes) > 1 or (modes and grid_given):
            grow = (f" (to grow the sweep: the whole grid with --out {quote_path(resume)})"
                    if modes == ["--resume"] and not out_dir else "")
            raise UsageError(f"{modes[0]} takes no grid options{grow}" if len(modes) == 1 else f"use one of {', '.join(modes)}")
        if dry_run and force:
            raise UsageError("--dry-run runs nothing, so it replaces nothing: leave out --force (remove the "
                             "old sweep yourself, or choose another --out)")
        if baseline and (run_cell_dir or dry_run):
            raise UsageError("--baseline goes with a sweep that runs, --resume or --report")
        if report is None and not dry_run and (rank := distributed.info_from_env()) and rank.world_size > 1:
            raise UsageError("ssvi sweep runs as one process, not under torchrun: each process would run the whole "
                             "sweep and its cells would wait for a process group; --jobs runs cells side by side")
        if run_cell_dir is not None:
            # The same commands a user types; their errors reach ssvi's one error handler.
            code = run_cell(run_cell_dir, lambda args: app(args=args, prog_name="ssvi", standalone_mode=False) or 0,
                            json_out)
            if code:
                raise typer.Exit(code)
            return
        if report is not None:
            from ssvi_cli.fileio import UnwritablePath

            try:
                result = reportmod.write_report(report, recorded_figures(report) if figures is None else figures,
                                                baseline)
            except UnwritablePath as exc:  # a sweep on a read-only share: its report is still worth reading
                result = {**reportmod.build_report(report, baseline), "files": []}
                err.print(f"note: the report was not written ({exc}); it is printed only", highlight=False)
            _finish(result, json_out)
            return
        if resume is not None:
            spec, cells = grid.read_spec(resume)
            sweep_dir = resume
            if jobs is None:  # the cells go on as they ran: their numbers move with the thread count
                ran_jobs, ran_threads = recorded_processes(resume)
                jobs, threads = ran_jobs, threads or ran_threads
            figures = recorded_figures(resume) if figures is None else figures
            check_selection(spec, cells, baseline or [])
            if any(cell_state(cell_dir(resume, c), spec) != "done" for c in cells):
                check_ood_paths(spec)
        else:
            notes: list[str] = []
            spec = spec_from_flags(file, preset, method, sparsity, seeds, criterion, set_ or [], ood or [], samples, notes)
            cells = grid.expand(spec)
            check_runnable(spec, cells, device=not dry_run)  # a dry run may list GPU cells on a login node
            for note in notes + idle_axes(spec):  # on stderr: --json keeps standard output for the report
                err.print(f"note: {note}", highlight=False)
            check_ood_sets(spec, cells)
            check_selection(spec, cells, baseline or [])  # before anything is written or run
            sweep_dir = out_dir or Path("sweeps") / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(spec.preset).stem[:48]}"
            check_output_dir(sweep_dir, "--out")
            how, spec, cells, notes = claim_sweep_dir(sweep_dir, spec, cells, force)
            states = check_changed(sweep_dir, spec, cells)  # before the grid is written: a refused one changes nothing
            if force and how in ("same", "grown"):  # --force replaces another sweep only
                err.print(f"note: --force replaces another sweep; {sweep_dir} holds this one, whose finished cells "
                          f"are kept (delete {sweep_dir / 'cells'}, or a cell's folder in it, to train them again)",
                          highlight=False)
            if figures is None:  # the sweep there, continued or grown, as it last ran; a new one with them
                figures = recorded_figures(sweep_dir) if how in ("same", "grown") else True
            if how != "same":  # the same grid continues with its cells as it named them
                for note in notes:  # on stderr: --json keeps standard output for the report
                    err.print(note, highlight=False)
                try:
                    sweep_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # a folder the system refuses only as it is made (/proc/x), as train says it
                    raise UsageError(f"--out {sweep_dir} cannot be made or written: {exc.strerror or exc}") from None
                # how its cells run, with the grid: a --resume after a stop right after it runs them so too
                write_spec(sweep_dir, spec, cells, None if dry_run else processes_entry(jobs or 1, threads, figures))
        if resume is not None:
            states = check_changed(sweep_dir, spec, cells)  # before any cell is listed, skipped as done or resumed
        record_folders(sweep_dir, spec, cells, states)  # the image folders as the cells that start now train on them
        if dry_run:
            record_figures(sweep_dir, figures is not False)
            _dry_run(sweep_dir, cells, json_out, spec)
            return
        from ssvi_cli.training.cpus import usable_cpus

        jobs = jobs or 1  # the cores this process may use (a cluster job's), shared among the cells
        if threads and threads > usable_cpus():  # torch runs no more threads than the cores it may use
            err.print(f"note: --threads {threads} is more than the {count(usable_cpus(), 'core')} this process may "
                      f"use; each cell runs {usable_cpus()}", highlight=False)
            threads = usable_cpus()
        _run(sweep_dir, spec, cells, jobs, threads or max(1, usable_cpus() // jobs), json_out, figures is not False,
             baseline)


def _dry_run(sweep_dir: Path, cells: list[Any], json_out: bool = False, spec: Any = None) -> None:
    from ssvi_cli.fileio import write_text
    from ssvi_cli.sweep.runner import cell_command, cell_dir, evaluated
    from ssvi_cli.sweep.sweepdir import COMMANDS_FILE

    # Absolute paths: a scheduler's job may start in another directory.
    # Quoted for the shell (POSIX, or cmd.exe on Windows): a path with spaces stays one argument.
    lines = [shell_join(["ssvi", *cell_command(cell_dir(sweep_dir.resolve(), c))]) for c in cells]
    write_text(sweep_dir / COMMANDS_FILE, "\n".join(lines) + "\n")
    done = [c.name for c in cells if evaluated(cell_dir(sweep_dir, c), spec)]  # their commands do nothing
    report = shell_join(["ssvi", "sweep", "--report", str(sweep_dir.resolve())])
    if json_out:
        where = sweep_dir.resolve()  # absolute as the commands are: a scheduler's script may run elsewhere
        print_json({"sweep": str(where), "commands_file": str(where / COMMANDS_FILE), "commands": lines,
                    "done": done, "report": report})
        return
    # Plain lines, flushed before the note on stderr: a scheduler script reads them as they are.
    write_out("\n".join(lines) + "\n")
    err.print(f"{count(len(lines), 'cell')} written to {sweep_dir / COMMANDS_FILE}"
              + (f" ({len(done)} of them trained and evaluated already: their commands do nothing)" if done else "")
              + f"; afterwards: {report}", highlight=False)


def _run(sweep_dir: Path, spec: "SweepSpec", cells: list[Any], jobs: int, threads: int, json_out: bool,
         figures: bool, baseline: Optional[list[str]] = None) -> None:
    from ssvi_cli.sweep.report import write_report
    from ssvi_cli.cli.train_fit import KeyboardInterruptHandled
    from ssvi_cli.sweep.runner import cell_dir, cell_state, run_cells
    from ssvi_cli.training.stops import stopped_how
    from ssvi_cli.sweep.sweepdir import record_processes, sweep_lock

    with sweep_lock(sweep_dir):  # shared while the cells run and the report is written; --force waits for it
        record_processes(sweep_dir, jobs, threads, figures)
        # On stderr under --json too, as plain lines (no bar): a sweep runs for long, and silence reads as a hang.
        err.print(f"sweep {sweep_dir}: {count(len(cells), 'cell')}, {jobs} at a time, {count(threads, 'thread')} each")
        with progress_bar(enabled=not json_out) as bar:
            task = bar.add_task("cells", total=len(cells), info="") if bar is not None else None
            running: set[str] = set()

            def listener(event: str, name: str, detail: str) -> None:
                if event == "start":
                    running.add(name)
                else:
                    running.discard(name)
                if bar is not None and task is not None:
                    bar.update(task, advance=0 if event in ("start", "stop") else 1,
                               info=f"running: {', '.join(sorted(running))}" if running else "")
                if bar is None and event != "start":
                    _say(f"{event:>6} {name}" + (f" ({detail})" if detail else ""))
                elif bar is not None and event in ("fail", "stop"):
                    _say(f"{event} {name}: {detail}")

            outcome = run_cells(sweep_dir, cells, jobs, threads, listener, spec)
        paired = "".join(f" --baseline {shell_quote(group)}" for group in baseline or [])  # said again in what to run next
        try:
            result = write_report(sweep_dir, figures, baseline)
        except KeyboardInterrupt:
            if outcome.interrupted:
                raise
            raise KeyboardInterruptHandled("interrupted while the report was written; the cells are kept, and "
                                           f"ssvi sweep --report {quote_path(sweep_dir)}{paired} writes it") from None
    if outcome.interrupted:
        failed = f"; {len(outcome.failed)} failed (logs in {sweep_dir / 'logs'})" if outcome.failed else ""
        # A cell stopped before its first checkpoint starts again; the others continue from theirs.
        resume = f"ssvi sweep --resume {quote_path(sweep_dir)}{paired}"
        how = stopped_how(outcome.signum)  # as train says it
        if outcome.stopped:
            fresh = sum(cell_state(cell_dir(sweep_dir, c)) == "new" for c in cells if c.name in outcome.stopped)
            _say(f"{how}: {count(len(outcome.stopped), 'cell')} stopped{failed}; " + (
                "each continues from its last checkpoint" if not fresh else "each starts again, none had a checkpoint"
                if fresh == len(outcome.stopped) else f"each continues from its last checkpoint ({fresh} had none "
                f"yet and start{'s' if fresh == 1 else ''} again)") + f": {resume}")
        else:  # the stop came between cells, or after the last one: none was running
            _say(f"{how} between cells, none of them running{failed}; the cells not run yet run with: {resume}")
        raise typer.Exit(128 + outcome.signum)
    _finish(result, json_out)
    if outcome.busy:
        err.print(f"{count(len(outcome.busy), 'cell')} running in another process, left to it; when done: "
                  f"{shell_join(['ssvi', 'sweep', '--report', path_word(sweep_dir)])}")
    if outcome.halted:
        err.print(f"{count(len(outcome.halted), 'cell')} of the same data settings not started: two cells failed "
                  f"with the same data error, which each would meet ({outcome.repeated})", highlight=False)
    if outcome.failed:
        err.print(f"{count(len(outcome.failed), 'cell')} failed (logs in {sweep_dir / 'logs'}); rerun with: "
                  f"ssvi sweep --resume {quote_path(sweep_dir)}")
        raise typer.Exit(1)


def _say(text: str) -> None:
    """A line on stderr that may find no terminal (closed: SIGHUP) without ending the sweep before
    its cells are stopped and its report written."""
    tell(text, highlight=False)


def _finish(result: dict[str, Any], json_out: bool) -> None:
    from ssvi_cli.sweep.drift import changed_lines
    from ssvi_cli.sweep.paired import auroc_title
    from ssvi_cli.sweep.report import UNMOVED_HINT, mean_std, under_way_text

    if result.get("changed_cells"):
        n = len(result["changed_cells"])
        err.print("\n".join([f"warning: {count(n, 'cell')} ran under other settings than the sweep gives "
                             f"{'it' if n == 1 else 'them'} now; the report counts {'it' if n == 1 else 'them'} "
                             "under the sweep's settings once evaluated:",
                             *changed_lines(Path(result["sweep"]), result["changed_cells"])]))
    if json_out:
        print_json(result)
        return
    # The OOD sets' AUROC by predictive entropy, as report.md's first OOD columns (MI there too).
    ood = sorted({k for g in result["groups"] for k in g if k.startswith("auroc:") and k.endswith(":entropy")})
    metrics = {"accuracy": "accuracy", "nll": "NLL", "ece": "ECE",
               **{k: auroc_title(k) for k in ood}}
    _group_table(f"sweep {result['sweep']}: {result['cells_done']} of {result['cells_total']} cells (mean ± std "
                 "over seeds)", result["groups"], metrics, lambda g: [mean_std(g.get(k)) for k in metrics])
    for name, why in (result.get("failed") or {}).items():
        err.print(f"failed {name}: {why}", highlight=False)
    if result.get("missing"):
        shown = result["missing"][:8]
        err.print(f"not evaluated yet: {', '.join(shown)}" + (f" and {len(result['missing']) - len(shown)} more"
                                                             if len(result["missing"]) > len(shown) else "") + "."
                  + under_way_text(result), highlight=False)
    if again := result.get("evaluated_otherwise"):
        one = len(again) == 1
        err.print(f"of these, {count(len(again), 'cell')} {'was' if one else 'were'} scored before otherwise than the "
                  f"sweep asks now (an --ood set changed or added since, or --samples): ssvi sweep --resume scores "
                  f"{'it' if one else 'them'} again, keeping {'its' if one else 'their'} training, once the sweep's "
                  "--ood sets can be read", highlight=False)
    if result.get("support_unmoved"):
        err.print(f"note: no subspace step before t_end, so the support never moved, in: "
                  f"{'; '.join(result['support_unmoved'])}. {UNMOVED_HINT}", highlight=False)
    if result.get("paired", {}).get("note"):
        err.print(result["paired"]["note"])
    elif result.get("paired"):
        _paired_table(result["paired"])
    for path in result.get("files", []):
        out.print(f"wrote {path}", highlight=False)
    if result.get("figures_note"):
        err.print(result["figures_note"])


def _paired_table(paired: dict[str, Any]) -> None:
    from ssvi_cli.sweep.grid import group_label
    from ssvi_cli.sweep.paired import PAIRED_METRICS, diff_text

    _group_table(f"paired differences from {group_label(paired['baseline'])} (mean ± standard error over common "
                 "seeds)", paired["groups"], {k: f"Δ {label}" for k, label in PAIRED_METRICS[:3]},
                 lambda g: [diff_text(g.get(k)) for k, _ in PAIRED_METRICS[:3]])


def _group_table(title: str, groups: list[dict[str, Any]], columns: dict[str, str], cells: Any) -> None:
    """One row per group of cells: method, sparsity, the swept settings (a column only where a key
    was swept), the number of seeds (of the shown metrics), then ``columns`` (metric key: heading)
    filled by ``cells(group)``."""
    from ssvi_cli.sweep.grid import seeds_text

    settings = any(g["settings"] for g in groups)
    table = Table(title=title, title_justify="left")
    for col in ("method", "sparsity", *(["settings"] if settings else []), "seeds", *columns.values()):
        table.add_column(col, justify="left" if col in ("method", "settings") else "right")
    for g in groups:
        swept = [", ".join(f"{k}={v}" for k, v in g["settings"].items())] if settings else []
        table.add_row(g["method"], "dense" if g["sparsity"] is None else f"{g['sparsity']:g}", *swept,
                      seeds_text(g, columns), *cells(g))
    out.print(table)
