"""``ssvi bench``: measured training, prediction and memory savings, side by side in one process."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ssvi_cli.cli import completion
from ssvi_cli.cli.common import UsageError, check_device, count, err, out, print_json
from ssvi_cli.cli.numbers import whole


def parse_sparsities(text: str) -> tuple[float, ...]:
    if any(not v.strip() for v in text.split(",")):
        raise UsageError(f"--sparsity {text!r} has an empty item; remove the extra comma")
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sparsity {text!r}: expected comma-separated numbers such as 0.9,0.95") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise UsageError(f"--sparsity {text!r}: every value must lie in (0, 1)")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise UsageError(f"--sparsity {text!r}: {twice[0]:g} is given twice; give each sparsity once")
    return values


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def train_table(result: dict[str, Any]) -> Table:
    t = Table(title="training step (median ms; ratio = / dense VI)", title_justify="left")
    for col, just in (("variant", "left"), ("step", "left"), ("median ms", "right"), ("time ratio", "right"),
                      ("trainable state", "right"), ("state ratio", "right"), ("FLOPs ratio", "right")):
        t.add_column(col, justify=just)
    for r in result["train"]:
        state = "-" if r["compared_bytes"] is None else _mib(r["compared_bytes"])
        ratio = "-" if r["bytes_vs_vi"] is None else f"{r['bytes_vs_vi']:.4f}"
        t.add_row(r["variant"], r["step"], _ms(r["median_ms"]), f"{r['time_vs_vi']:.3f}",
                  state, ratio, f"{r['flops_vs_vi']:.4f}")
    return t


def state_note(result: dict[str, Any]) -> str:
    """What the trainable-state column counts, under the training table."""
    grads = sorted({r["dense_grad_bytes"] for r in result["train"] if "dense_grad_bytes" in r})
    held = " to ".join(_mib(n) for n in grads[:1] + grads[1:][-1:])
    return ("trainable state = parameters + gradients + optimizer state, and SSVI's support index; the dense "
            "rows leave out the index their layers keep at density 1 (a dense layer needs none; --json: "
            "trainable_parts). A subspace step adds to its parameter row's state a dense gradient of the "
            f"sparse layers for the step ({held})")


UNSTEADY = 2.0  # a row whose slowest repeat took this many times its fastest was timed on a busy machine


def unsteady_note(result: dict[str, Any]) -> str:
    """A line naming the rows whose repeats spread past :data:`UNSTEADY` (their medians, and the ratios
    of them, may not hold: a ratio of 1.00x from a run beside other work looked like a finding), or ""."""
    wide = [f"{r.get('variant') or r['file'] + ' ' + format(r['sparsity'], 'g')} {min(t):.3g}-{max(t):.3g} ms"
            for r in result["train"] + result["predict"]
            if len(t := r["times_ms"]) > 1 and min(t) > 0 and max(t) > UNSTEADY * min(t)]
    if not wide:
        return ""
    return (f"note: the repeats of {count(len(wide), 'row')} spread over more than {UNSTEADY:g}x ({'; '.join(wide[:3])}"
            f"{'; ...' if len(wide) > 3 else ''}): the machine was busy, so the medians and their ratios may not hold; "
            "run again with nothing else running (docs/BENCH.md)")


def amortised_table(result: dict[str, Any]) -> Table:
    t = Table(title=f"SSVI per step over one delta_t={result['recipe_delta_t']} cycle (auto kernel)",
              title_justify="left")
    for col in ("sparsity", "parameter ms", "subspace ms", "amortised ms", "ratio / dense VI"):
        t.add_column(col, justify="right")
    for r in result["train_amortised"]:
        t.add_row(f"{r['sparsity']:g}", _ms(r["parameter_ms"]), _ms(r["subspace_ms"]), _ms(r["amortised_ms"]),
                  f"{r['time_vs_vi']:.3f}")
    return t


def predict_table(result: dict[str, Any]) -> Table:
    t = Table(title=f"Monte Carlo prediction, S={result['samples']} (median ms per batch)", title_justify="left")
    for col, just in (("file", "left"), ("sparsity", "right"), ("file bytes", "right"),
                      ("bytes / dense file", "right"), ("median ms", "right"), ("speed-up vs dense file", "right")):
        t.add_column(col, justify=just)
    for r in result["predict"]:
        t.add_row(r["file"], f"{r['sparsity']:g}", f"{r['file_bytes']:,}", f"{r['bytes_vs_dense_file']:.4f}",
                  _ms(r["median_ms"]), f"{r['speedup_vs_dense_file']:.2f}x")
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: Annotated[str, typer.Option(help="mlp (784-1024-1024-10), lenet5, resnet18, or torchvision:NAME (any torchvision classifier, built as ssvi train builds it).", autocompletion=completion.of(completion.BENCH_MODELS))] = "mlp",
        sparsity: Annotated[Optional[str], typer.Option(help="Comma-separated sparsities, each in (0, 1) (default 0.9,0.95,0.98; resnet18 and torchvision: 0.95).")] = None,
        batch_size: Annotated[Optional[int], typer.Option(parser=whole("--batch-size", 1), metavar="<int>", help="Minibatch size (default 256; resnet18: 16; torchvision: 8).")] = None,
        samples: Annotated[Optional[int], typer.Option(parser=whole("--samples", 1), metavar="<int>", help="Monte Carlo draws per prediction (default 16; resnet18 and torchvision: 4).")] = None,
        repeats: Annotated[Optional[int], typer.Option(parser=whole("--repeats", 1), metavar="<int>", help="Timed repeats per variant (default 10; resnet18 and torchvision: 3).")] = None,
        input_size: Annotated[Optional[int], typer.Option(parser=whole("--input-size", 1), metavar="<int>", help="Height and width of the synthetic inputs (default: 28 for mlp and lenet5, 32 for resnet18, 64 for torchvision).")] = None,
        threads: Annotated[Optional[int], typer.Option(parser=whole("--threads", 1), metavar="<int>", help="torch threads (default: torch's current setting).")] = None,
        warmup: Annotated[int, typer.Option(parser=whole("--warmup", 0), metavar="<int>", help="Untimed warm-up runs per variant.")] = 2,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto (CUDA when present); timings synchronise the GPU around every run.", autocompletion=completion.devices)] = "cpu",
        json_out: Annotated[bool, typer.Option("--json", help="Print the full result as JSON only.")] = False,
    ) -> None:
        """Time training steps and MC prediction of SSVI against dense VI, side by side, and count their memory (weights, gradients, optimizer state, files)."""
        from ssvi_cli.bench import BenchOptions, check_input, run_bench
        from ssvi_cli.bench.models import MAX_INPUT_SIZE
        from ssvi_cli.config import MAX_BATCH, MAX_SAMPLES, MAX_THREADS

        for flag, value, most in (("--batch-size", batch_size, MAX_BATCH), ("--samples", samples, MAX_SAMPLES),
                                  ("--input-size", input_size, MAX_INPUT_SIZE), ("--threads", threads, MAX_THREADS)):
            if value is not None and value > most:  # 1e20 overflowed torch's sizes: error (TypeError), exit 1
                raise UsageError(f"{flag} must be at most {most:,}, got {value}")
        device = check_device(device)
        opts = BenchOptions(model=model, sparsities=parse_sparsities(sparsity) if sparsity else None,
                            batch_size=batch_size, samples=samples, repeats=repeats, threads=threads,
                            input_size=input_size, warmup=warmup, device=device)
        resolved = opts.resolved()
        spec = resolved.model_spec()
        check_input(spec, resolved.batch_size)
        from ssvi_cli.training.cpus import usable_cpus

        cores = usable_cpus()
        if resolved.device == "cpu" and resolved.threads > cores:  # on stderr, with --json too
            err.print(f"note: {count(resolved.threads, 'thread')} on {count(cores, 'CPU core')} this process may use: "
                      "the threads wait on each other, and the timings measure that (docs/BENCH.md)", highlight=False)
        if not json_out:
            # The model's note explains its own defaults: shown only when they are all in force.
            own = all(v is None for v in (sparsity, batch_size, samples, repeats))
            note = spec.note if own else ""
            err.print(f"ssvi bench: {model}, {resolved.input_size}x{resolved.input_size} inputs, "
                      f"sparsity {', '.join(f'{v:g}' for v in resolved.sparsities)}, batch {resolved.batch_size}, "
                      f"S={resolved.samples}, {resolved.repeats} repeats, {resolved.threads} thread(s), device {device}"
                      + (f"\n{note}" if note else ""))
        from ssvi_cli.prediction import NonFiniteOutput
        from ssvi_cli.training.stops import TrainingError

        try:
            result = run_bench(opts, on_progress=None if json_out else (lambda msg: err.print(f"  {msg}")))
        except (TrainingError, NonFiniteOutput):  # the run's advice (--lr, a checkpoint) is not bench's
            raise UsageError(f"{model}'s outputs or loss are not finite at batch {resolved.batch_size} and "
                             f"{resolved.input_size}x{resolved.input_size} inputs (BatchNorm over so few values, "
                             "say); a larger --batch-size or --input-size measures it") from None
        if unsteady := unsteady_note(result):  # on stderr, with --json too
            err.print(unsteady, highlight=False)
        if json_out:
            print_json(result)
            return
        m = result["machine"]
        # The command that measures the same again, every setting spelt out (--device cuda, not the cuda:0 (NAME) run on)
        again = (f"ssvi bench --model {model} --sparsity {','.join(f'{v:g}' for v in resolved.sparsities)} --batch-size "
                 f"{resolved.batch_size} --samples {resolved.samples} --repeats {resolved.repeats} --input-size "
                 f"{resolved.input_size} --threads {result['threads']} --warmup {warmup} --device {device}")
        out.print(f"[bold]{escape(again)}[/]", markup=True)
        out.print(escape(f"cpu: {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']}"), markup=True)
        out.print(f"model: {result['architecture']}, the {result['recipe']} preset's recipe")
        shape = "x".join(map(str, result["input_shape"]))
        timed = (f"medians of {result['repeats']} interleaved repeats" if result["repeats"] != 1 else "one run each")
        out.print(f"data: {result['data']}, {shape}; batch {result['batch_size']}, {timed} after "
                  f"{count(result['warmup'], 'warm-up run')}")
        out.print(train_table(result))
        out.print(state_note(result))
        out.print(amortised_table(result))
        out.print(predict_table(result))
        out.print(f"FLOPs convention: {result['flops_convention']}")
