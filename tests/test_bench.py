import json

import pytest
import torch

from ssvi_cli.bench import BENCH_MODELS, BenchOptions, run_bench
from ssvi_cli.cli import run

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
    ssvi = [row for row in r["train"] if row["method"] == "ssvi" and row["step"] == "parameter"]
    # trainable state follows the density (the dense stem keeps it a little above)
    for row in ssvi:
        assert row["bytes_vs_vi"] < 1 - row["sparsity"] + 0.05
        # LeNet-5's dense 5x5 stem runs at 28x28 positions and holds over a quarter of the FLOPs
        assert 0.25 < row["flops_vs_vi"] < 0.4
    assert [a["sparsity"] for a in r["train_amortised"]] == [0.9, 0.95]
    json.dumps(r)


def test_prediction_compares_compact_and_dense_files(lenet_result):
    rows = lenet_result["predict"]
    assert [(p["file"], p["sparsity"]) for p in rows] == [("dense BNN", 0.9), ("compact", 0.9),
                                                          ("dense BNN", 0.95), ("compact", 0.95)]
    for dense, compact in zip(rows[::2], rows[1::2]):
        assert compact["file_bytes"] < 0.25 * dense["file_bytes"]
        assert dense["speedup_vs_dense_file"] == 1.0
        assert compact["speedup_vs_dense_file"] == pytest.approx(dense["median_ms"] / compact["median_ms"])


def test_threads_restored_and_defaults_resolved():
    before = torch.get_num_threads()
    opts = BenchOptions(model="resnet18").resolved()
    assert opts.batch_size == BENCH_MODELS.get("resnet18").batch_size and opts.sparsities == (0.95,)
    run_bench(BenchOptions(model="lenet5", sparsities=(0.9,), batch_size=2, samples=1, repeats=1,
                           warmup=0, threads=1))
    assert torch.get_num_threads() == before


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
    text = capsys.readouterr().out
    assert "dense VI" in text and "compact" in text and "FLOPs convention" in text


@pytest.mark.parametrize("args", [["--sparsity", "1.5"], ["--sparsity", "x"], ["--model", "nope"]])
def test_cli_usage_errors(args, capsys):
    assert run(["bench", *args]) == 2
