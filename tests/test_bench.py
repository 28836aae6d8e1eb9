import json

import pytest
import torch

from ssvi_cli.bench import BENCH_MODELS, BenchOptions, check_input, run_bench
from ssvi_cli.cli import run
from ssvi_cli.config import ConfigError

TINY = dict(batch_size=4, samples=2, repeats=2, warmup=1, threads=1)


@pytest.fixture(scope="module")
def lenet_result():
    return run_bench(BenchOptions(model="lenet5", sparsities=(0.9, 0.95), **TINY))


def test_result_shape_and_ratios(lenet_result):
    r = lenet_result
    assert r["model"] == "lenet5" and r["threads"] == 1 and r["batch_size"] == 4 and r["samples"] == 2
    assert "synthetic" in r["data"] and r["machine"]["cpu"]
    variants = [row["variant"] for row in r["train"]]
    assert variants == ["dense", "vi"] + [f"ssvi {s} {k}" for s in ("0.9", "0.95")
                                           for k in ("sparse", "dense", "auto", "subspace")]
    for row in r["train"]:
        assert len(row["times_ms"]) == 2 and row["median_ms"] > 0
        assert row["time_vs_vi"] == pytest.approx(row["median_ms"] / r["train"][1]["median_ms"])
    vi = r["train"][1]
    assert vi["time_vs_vi"] == 1.0 and vi["bytes_vs_vi"] == 1.0
    # the dense variants are compared without the index their layers keep at density 1, SSVI with its own
    for row in r["train"][:2]:
        assert row["trainable_parts"]["index"] > 0
        assert row["compared_bytes"] == row["trainable_bytes"] - row["trainable_parts"]["index"]
    ssvi = [row for row in r["train"] if row["method"] == "ssvi" and row["step"] == "parameter"]
    for row in ssvi:
        assert row["compared_bytes"] == row["trainable_bytes"] and row["trainable_parts"]["index"] > 0
        assert row["bytes_vs_vi"] == pytest.approx(row["compared_bytes"] / vi["compared_bytes"])
    # a subspace step's trainer has taken no optimizer step: no ratio, its dense gradient named instead
    for row in (row for row in r["train"] if row["step"] == "subspace"):
        assert row["compared_bytes"] is None and row["bytes_vs_vi"] is None
        # float32 over every weight of the sparse layers, which dense VI's int64 index also spans
        assert row["dense_grad_bytes"] == vi["trainable_parts"]["index"] // 2
    # trainable state follows the density: Adam's two moments, a gradient and the index (8 bytes) over
    # μ and ρ (4 bytes each) make 40 bytes per active weight against dense VI's 32 (the dense stem adds)
    for row in ssvi:
        assert 1.25 * (1 - row["sparsity"]) < row["bytes_vs_vi"] < 1.25 * (1 - row["sparsity"]) + 0.05
        # LeNet-5's dense 5x5 stem runs at 28x28 positions: 150 x 784 of the 416,520 multiply-adds per
        # example (conv2 2,400 x 100, the linear layers 48,000 + 10,080 + 840); the rest scales with density
        stem = 150 * 784 / (150 * 784 + 2400 * 100 + 48000 + 10080 + 840)
        assert row["flops_vs_vi"] == pytest.approx(stem + (1 - stem) * (1 - row["sparsity"]), rel=1e-6)
    assert [a["sparsity"] for a in r["train_amortised"]] == [0.9, 0.95]
    for a in r["train_amortised"]:  # (delta_t - 1) parameter steps and one subspace step, per step
        param = next(row for row in ssvi if row["sparsity"] == a["sparsity"] and row["kernel"] == "auto")
        sub = next(row for row in r["train"] if row["sparsity"] == a["sparsity"] and row["step"] == "subspace")
        dt = a["delta_t"]
        assert (a["parameter_ms"], a["subspace_ms"]) == (param["median_ms"], sub["median_ms"])
        assert a["amortised_ms"] == pytest.approx(((dt - 1) * param["median_ms"] + sub["median_ms"]) / dt)
        assert a["time_vs_vi"] == pytest.approx(a["amortised_ms"] / vi["median_ms"])
    json.dumps(r)


def test_prediction_compares_compact_and_dense_files(lenet_result):
    rows = lenet_result["predict"]
    assert [(p["file"], p["sparsity"]) for p in rows] == [("dense BNN", 0.9), ("compact", 0.9),
                                                          ("dense BNN", 0.95), ("compact", 0.95)]
    for dense, compact in zip(rows[::2], rows[1::2]):
        assert compact["file_bytes"] < 0.25 * dense["file_bytes"]
        assert dense["speedup_vs_dense_file"] == 1.0
        assert compact["speedup_vs_dense_file"] == pytest.approx(dense["median_ms"] / compact["median_ms"])
        assert compact["time_vs_dense_file"] == pytest.approx(compact["median_ms"] / dense["median_ms"])
        assert compact["bytes_vs_dense_file"] == pytest.approx(compact["file_bytes"] / dense["file_bytes"])
    # each sparsity's own file: 0.95's compact file holds about half the weights of 0.9's (the header alike)
    assert rows[3]["file_bytes"] < 0.7 * rows[1]["file_bytes"]


def test_threads_restored_and_defaults_resolved():
    opts = BenchOptions(model="resnet18").resolved()
    assert opts.batch_size == BENCH_MODELS.get("resnet18").batch_size and opts.sparsities == (0.95,)
    before = torch.get_num_threads()
    try:  # a count the bench's own 1 differs from (under pytest-xdist each worker runs on 1 already)
        torch.set_num_threads(3)
        run_bench(BenchOptions(model="lenet5", sparsities=(0.9,), batch_size=2, samples=1, repeats=1,
                               warmup=0, threads=1))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_cli_json(capsys):
    code = run(["bench", "--model", "lenet5", "--sparsity", "0.9", "--batch-size", "2", "--samples", "1",
                "--repeats", "1", "--warmup", "0", "--threads", "1", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sparsities"] == [0.9] and len(data["predict"]) == 2


def test_cli_tables(capsys):
    code = run(["bench", "--model", "lenet5", "--sparsity", "0.9", "--batch-size", "2", "--samples", "1",
                "--repeats", "1", "--warmup", "0", "--threads", "1"])
    assert code == 0
    text, progress = capsys.readouterr()
    assert "dense VI" in text and "compact" in text and "FLOPs convention" in text
    assert "bytes / dense file" in text and "speed-up vs dense file" in text  # a ratio says what it is of
    assert "training steps, repeat 1/1" in progress and "prediction, repeat 1/1" in progress  # each phase named
    assert "the dense rows leave out the index their layers keep at density 1" in " ".join(text.split())
    # the first line is the command that measures the same again, every setting spelt out
    assert text.splitlines()[0] == ("ssvi bench --model lenet5 --sparsity 0.9 --batch-size 2 --samples 1 --repeats 1 "
                                    "--input-size 28 --threads 1 --warmup 0 --device cpu")
    assert "batch 2, one run each after 0 warm-up runs" in text  # not "medians of 1 interleaved repeats"


def test_the_command_that_measures_again_takes_the_device_as_the_flag_names_it(capsys, monkeypatch):
    """On a GPU it said --device cuda:0 (NVIDIA H200), which --device refuses (and a shell splits)."""
    import ssvi_cli.bench as bench_pkg

    result = run_bench(BenchOptions(model="lenet5", sparsities=(0.9,), batch_size=2, samples=1, repeats=1,
                                    warmup=0, threads=1))
    result["device"] = "cuda:0 (NVIDIA H200)"  # as a GPU's run records it
    monkeypatch.setattr(bench_pkg, "run_bench", lambda *a, **k: result)
    monkeypatch.setattr("ssvi_cli.cli.bench.check_device", lambda device: "cuda")
    assert run(["bench", "--model", "lenet5", "--sparsity", "0.9", "--batch-size", "2", "--samples", "1",
                "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "auto"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(" --warmup 0 --device cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_one_gives_no_advice_meant_for_sweeps(capsys):
    """It added "(in a sweep: --set train.device=cpu)", a training run's advice, to bench, evaluate and infer."""
    assert run(["bench", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --device cuda was requested but no CUDA device is available; "
                                               "use --device cpu")


def test_more_threads_than_cores_is_noted(capsys, monkeypatch):
    import os

    import ssvi_cli.bench as bench_pkg

    monkeypatch.setattr(bench_pkg, "run_bench", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr("ssvi_cli.training.cpus.cgroup_cpu_quota", lambda *a: None)  # a container's own
    assert run(["bench", "--threads", "3"]) == 1
    assert "note: 3 threads on 2 CPU cores this process may use" in capsys.readouterr().err
    assert run(["bench", "--threads", "2"]) == 1
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "--sparsity '1.5': every value must lie in (0, 1)"),
    (["--sparsity", "x"], "--sparsity 'x': expected comma-separated numbers"),
    (["--model", "nope"], "unknown bench model 'nope'; valid names are: lenet5, mlp, resnet18"),
    (["--sparsity", "0.9,,0.95"], "--sparsity '0.9,,0.95' has an empty item"),
    (["--sparsity", "0.95,"], "--sparsity '0.95,' has an empty item"),
    # numbers beyond torch's sizes were "error (TypeError): randn(): argument 'size' failed to unpack", exit 1
    (["--batch-size", "99999999999999999999"], "--batch-size must be at most 16,777,216, got 99999999999999999999"),
    (["--samples", "100001"], "--samples must be at most 100,000, got 100001"),
    (["--input-size", "99999999999999999999"], "--input-size must be at most 4,096, got 99999999999999999999"),
    (["--threads", "99999999999999999999"], "--threads must be at most 4,096, got 99999999999999999999"),
])
def test_cli_usage_errors(args, message, capsys):
    """Each refused in its own line (exit code 2 alone would pass for any usage error, this one or not)."""
    assert run(["bench", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}"), captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


# torchvision:NAME, built as `ssvi train --model torchvision:NAME` builds it. squeezenet1_1 at 32x32 is
# the smallest classifier that runs the whole bench in about two seconds.
TV_TINY = dict(batch_size=2, samples=1, repeats=1, warmup=0, threads=1, input_size=32)


SQUEEZENET_READS: list[dict] = []  # what the bench below read back from its files, one entry per file


@pytest.fixture(scope="module")
def squeezenet_result():
    import ssvi_cli.modelfile as modelfile
    from ssvi_cli.core.layers import sparse_layers

    original = modelfile.read_model_file

    def spy(path, kernel="auto"):
        loaded = original(path, kernel=kernel)
        layers = [layer for _, layer in sparse_layers(loaded.model)]
        SQUEEZENET_READS.append({"file": path.name, "layout": loaded.file.layout, "model": loaded.card.architecture.name,
                                 "active": sum(l.active for l in layers), "total": sum(l.numel for l in layers)})
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modelfile, "read_model_file", spy)
        return run_bench(BenchOptions(model="torchvision:squeezenet1_1", sparsities=(0.9, 0.95), **TV_TINY))


def test_torchvision_model_is_benchmarked_as_trained(squeezenet_result):
    r = squeezenet_result
    assert r["model"] == r["architecture"] == "torchvision:squeezenet1_1"
    assert r["recipe"] == "cifar10_resnet18" and r["recipe_delta_t"] == 100 and r["input_shape"] == [3, 32, 32]
    assert [row["variant"] for row in r["train"]] == ["dense", "vi"] + [
        f"ssvi {s} {k}" for s in ("0.9", "0.95") for k in ("sparse", "dense", "auto", "subspace")]
    vi = r["train"][1]
    # SGD with momentum: after a parameter step every parameter has a gradient and a momentum buffer
    assert vi["trainable_parts"]["optimizer"] > 0 and vi["trainable_parts"]["grads"] > 0
    for row in r["train"]:
        assert row["trainable_bytes"] == sum(row["trainable_parts"].values())
        assert row["median_ms"] > 0 and row["flops_per_step"] > 0
    for row in (row for row in r["train"] if row["method"] == "ssvi"):
        if row["step"] == "parameter":  # SGD: μ, ρ, their gradients and momenta, and SSVI's index: 32 bytes
            # per active weight against dense VI's 24 (the dense 3x3 stem holds 0.2 %)
            assert 4 / 3 * (1 - row["sparsity"]) < row["bytes_vs_vi"] < 4 / 3 * (1 - row["sparsity"]) + 0.01
        assert row["flops_vs_vi"] < 1
    subspace = [row for row in r["train"] if row["step"] == "subspace"]
    # a subspace step replaces the optimizer step: no momentum is added, the dense gradient is counted
    assert all(row["flops_vs_vi"] > next(p for p in r["train"] if p["variant"] == f"ssvi {row['sparsity']:g} auto")
               ["flops_vs_vi"] for row in subspace)
    assert [a["sparsity"] for a in r["train_amortised"]] == [0.9, 0.95]
    json.dumps(r)


def test_torchvision_prediction_reads_the_files_back(squeezenet_result):
    rows = squeezenet_result["predict"]
    assert [(p["file"], p["sparsity"]) for p in rows] == [("dense BNN", 0.9), ("compact", 0.9),
                                                          ("dense BNN", 0.95), ("compact", 0.95)]
    for dense, compact in zip(rows[::2], rows[1::2]):
        assert compact["file_bytes"] < 0.2 * dense["file_bytes"] and compact["median_ms"] > 0
    # each file timed was read back as the torchvision network in the layout written: the compact one
    # with its sparsity, the dense BNN file with every weight stored
    assert [(r["file"], r["layout"]) for r in SQUEEZENET_READS] == [
        (f"model-{s}-{layout}.safetensors", layout) for s in ("0.9", "0.95") for layout in ("dense", "compact")]
    for read, s in zip(SQUEEZENET_READS, (0.9, 0.9, 0.95, 0.95)):
        assert read["model"] == "torchvision:squeezenet1_1"
        density = 1.0 if read["layout"] == "dense" else 1 - s
        assert abs(read["active"] / read["total"] - density) < 0.01, read


def test_torchvision_defaults_fit_two_cpus():
    opts = BenchOptions(model="torchvision:resnet50").resolved()
    assert (opts.input_size, opts.batch_size, opts.repeats, opts.samples, opts.sparsities) == (64, 8, 3, 4, (0.95,))
    spec = BenchOptions(model="torchvision:resnet50", input_size=48).model_spec()
    assert spec.input_shape == (3, 48, 48) and spec.name == "torchvision:resnet50"
    assert BenchOptions(model="mlp").model_spec().input_shape == (1, 28, 28)


@pytest.mark.parametrize("name, size, message", [
    ("torchvision:alexnet", 16, "cannot run on 3x16x16 inputs"),   # pools to nothing
    ("torchvision:vit_b_16", 64, "cannot run on 3x64x64 inputs"),  # fixed 224x224 patches
    ("lenet5", 8, "cannot run on 1x8x8 inputs"),
])
def test_inputs_a_model_cannot_take_are_refused_before_building(name, size, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_input(BenchOptions(model=name, input_size=size).model_spec(), 2)
    assert "data.image_size" not in str(caught.value)  # train's advice, not bench's: --input-size is named


def test_rows_whose_repeats_spread_are_noted(capsys, monkeypatch):
    """A run beside other work gave a prediction speed-up of 1.00x, and nothing said the timings were unsteady."""
    import ssvi_cli.bench as bench_pkg
    from ssvi_cli.cli.bench import unsteady_note

    steady = {"train": [{"variant": "vi", "times_ms": [60.0, 66.0, 70.0]}],
              "predict": [{"file": "compact", "sparsity": 0.95, "times_ms": [10.0, 11.0]}]}
    assert unsteady_note(steady) == ""
    busy = {"train": [{"variant": "vi", "times_ms": [60.0, 488.0, 70.0]}],
            "predict": [{"file": "compact", "sparsity": 0.95, "times_ms": [10.0, 31.0]}]}
    assert unsteady_note(busy) == ("note: the repeats of 2 rows spread over more than 2x (vi 60-488 ms; compact 0.95 "
                                   "10-31 ms): the machine was busy, so the medians and their ratios may not hold; "
                                   "run again with nothing else running (docs/BENCH.md)")
    assert unsteady_note({"train": [{"variant": "vi", "times_ms": [60.0]}], "predict": []}) == ""  # one repeat
    monkeypatch.setattr(bench_pkg, "run_bench", lambda *a, **k: {**busy, "machine": {}})
    assert run(["bench", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "note: the repeats of 2 rows spread" in err and json.loads(out)["train"][0]["variant"] == "vi"


def test_networks_with_auxiliary_classifiers_are_built_without_them():
    # torchvision's GoogLeNet returns a tuple in training mode with its auxiliary heads
    from ssvi_cli.models import torchvision_base

    check_input(BenchOptions(model="torchvision:googlenet", input_size=64).model_spec(), 2)
    built = torchvision_base("googlenet", (3, 64, 64), 10)
    assert not built.aux_logits and built.aux1 is None and built.aux2 is None


@pytest.mark.slow
def test_resnet50_trainable_state_at_095_is_under_8_percent_of_dense_vi():
    """The issue's target, from the actual tensors after a step (small inputs: state does not depend on them)."""
    r = run_bench(BenchOptions(model="torchvision:resnet50", sparsities=(0.95,), batch_size=2, samples=1,
                               repeats=1, warmup=0, threads=1, input_size=32))
    auto = next(row for row in r["train"] if row["variant"] == "ssvi 0.95 auto")
    assert auto["bytes_vs_vi"] <= 0.08
    assert auto["trainable_parts"]["optimizer"] > 0


def test_cli_json_torchvision(capsys):
    code = run(["bench", "--model", "torchvision:squeezenet1_1", "--sparsity", "0.9", "--batch-size", "2",
                "--samples", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--input-size", "32", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "torchvision:squeezenet1_1" and data["input_shape"] == [3, 32, 32]
    assert len(data["train"]) == 6 and len(data["predict"]) == 2


@pytest.mark.parametrize("args, words", [
    (["--model", "torchvision:resnet5O"], ["unknown torchvision classification model", "did you mean resnet50"]),
    (["--model", "torchvision:alexnet", "--input-size", "16"], ["cannot run on 3x16x16", "--input-size"]),
    (["--model", "resnet5"], ["unknown bench model", "torchvision:NAME"]),
])
def test_cli_bad_torchvision_model_is_one_line(args, words, capsys):
    assert run(["bench", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()  # the whole of stderr: no traceback or other line beside it
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words)
    assert captured.out == ""


def test_an_auto_schedule_is_benched_at_its_cap(monkeypatch):
    import dataclasses

    from ssvi_cli.bench import run as benchrun
    from ssvi_cli.config import PAPER_DELTA_T, load_preset

    assert benchrun.recipe_delta_t("digits_mlp") == load_preset("digits_mlp").sparse.delta_t == 50

    def auto_preset(name):
        cfg = load_preset(name)
        return dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, delta_t="auto"))

    monkeypatch.setattr(benchrun, "load_preset", auto_preset)
    assert benchrun.recipe_delta_t("digits_mlp") == PAPER_DELTA_T


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_every_sparse_layer_is_benched_at_the_named_sparsity(name, monkeypatch):
    """Whatever allocation a preset trains with (ERK here), a bench row at sparsity s holds each
    sparse layer at s."""
    from ssvi_cli import config as C
    from ssvi_cli.bench import models
    from ssvi_cli.bench.models import bench_config, bench_model
    from ssvi_cli.core.layers import sparse_layers
    from ssvi_cli.data import get_spec
    from ssvi_cli.training.plan import init_model, make_model

    bm = bench_model(name)
    erk = C.apply_overrides(C.load_preset(bm.preset), {"sparse.allocation": "erk"})
    monkeypatch.setattr(models, "from_preset", lambda preset, over: C.apply_overrides(erk, over))
    cfg = bench_config(bm, BenchOptions(model=name).resolved(), "ssvi", 0.95, "auto", 100)
    model = make_model(cfg, get_spec(cfg.data.name))
    init_model(model, cfg, torch.Generator().manual_seed(0))
    densities = {n: round(layer.density, 3) for n, layer in sparse_layers(model)}
    dense_stem = {"first"} if name == "lenet5" else set()  # LeNet's first conv stays dense at any sparsity
    assert len(densities) >= 3 and densities == {n: 1.0 if n in dense_stem else 0.05 for n in densities}


def test_prediction_is_benched_as_infer_reads_a_file(monkeypatch):
    # At sparsity 0.8 (density 0.2) `auto` would multiply the linear layers densely; `ssvi infer`
    # reads files under the `prediction` policy, where they multiply over their stored entries.
    import ssvi_cli.modelfile as modelfile
    from ssvi_cli.core.layers import sparse_layers

    original, kernels = modelfile.read_model_file, []

    def spy(path, kernel="auto"):
        loaded = original(path, kernel=kernel)
        kernels.append({n: l.uses_sparse_kernel() for n, l in sparse_layers(loaded.model) if l.is_linear()})
        return loaded

    monkeypatch.setattr(modelfile, "read_model_file", spy)
    run_bench(BenchOptions(model="mlp", sparsities=(0.8,), batch_size=2, samples=1, repeats=1, warmup=0, threads=1))
    compact = kernels[1]  # the dense file first, then the compact one
    assert compact and all(compact.values()), kernels


def test_the_header_names_the_sparsities_and_a_models_note_only_for_its_own_defaults(capsys, monkeypatch):
    import ssvi_cli.bench as bench_pkg

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the header")

    monkeypatch.setattr(bench_pkg, "run_bench", stop)  # the command imports it from the package when it runs
    assert run(["bench", "--model", "resnet18"]) == 1
    header = capsys.readouterr().err
    assert "sparsity 0.95, batch 16, S=4, 3 repeats" in header and "resnet18 defaults to batch 16" in header
    assert run(["bench", "--model", "resnet18", "--batch-size", "2", "--sparsity", "0.5,0.9"]) == 1
    header = capsys.readouterr().err
    assert "sparsity 0.5, 0.9, batch 2, S=4" in header and "defaults to" not in header


def test_the_subspace_row_times_a_step_that_records_no_criteria_overlap():
    """As all but ten of a long run's subspace steps: the first one records it (and cost half again)."""
    from ssvi_cli.bench.run import _plain_update
    from ssvi_cli.core.subspace import Schedule

    long = Schedule(100, 0.3, 75_000)  # the bench's schedule: 100,000 one-batch epochs
    assert long.records_overlap(100, 5000) and _plain_update(long, 5000) == 200
    assert not long.records_overlap(200, 5000)
    assert _plain_update(Schedule(100, 0.3, 550), 5000) == 100  # every step of a short run records it


def test_the_benchs_subspace_step_is_one_that_records_no_criteria_overlap(tmp_path):
    """The step the subspace row times, taken as the bench takes it: a remove-and-add step whose
    support record holds no criteria overlap (the first update step, 100, would hold one)."""
    from ssvi_cli.bench.models import bench_config, synthetic_splits
    from ssvi_cli.bench.run import _subspace_at, _train_step, _trainer, recipe_delta_t
    from ssvi_cli.fileio import read_jsonl

    opts = BenchOptions(model="mlp", sparsities=(0.95,), **TINY).resolved()
    bm = opts.model_spec()
    splits, x, y = synthetic_splits(bm, opts.batch_size, opts.seed)
    trainer = _trainer(bench_config(bm, opts, "ssvi", 0.95, "auto", recipe_delta_t(bm.preset)), splits, tmp_path, "s")
    _train_step(trainer, x, y, _subspace_at(trainer))
    records = read_jsonl(trainer.run_dir / "support.jsonl")
    assert [r["step"] for r in records] == [200] and records[0]["criteria_iou"] is None
    assert sum(layer["swapped"] for layer in records[0]["layers"].values()) > 0


@pytest.mark.parametrize("failure", ["loss", "outputs"])
def test_a_model_that_diverges_at_benchs_small_settings_is_told_what_bench_can_change(capsys, monkeypatch, failure):
    # regnet_x_400mf at batch 2 and 32 px: the run's advice (--lr, a larger prior, 'no checkpoint was
    # written') named flags bench does not have
    import ssvi_cli.bench as bench_pkg
    from ssvi_cli.prediction import NonFiniteOutput
    from ssvi_cli.training.stops import TrainingError

    def diverge(*args, **kwargs):
        if failure == "loss":
            raise TrainingError("non-finite loss at step 1 (epoch 1); try a lower learning rate (--lr)")
        raise NonFiniteOutput(2, 0)

    monkeypatch.setattr(bench_pkg, "run_bench", diverge)
    code = run(["bench", "--model", "lenet5", "--sparsity", "0.9", "--batch-size", "2", "--repeats", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("lenet5's outputs or loss are not finite at batch 2 and 28x28 inputs (BatchNorm over so few values, say); "
            "a larger --batch-size or --input-size measures it") in " ".join(err.split())
