"""Data-parallel training on torch.distributed: 2 CPU processes with gloo on digits, and the GPU path."""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.multiprocessing as mp

from ssvi_cli import config as C
from ssvi_cli.training import distributed, launcher
from ssvi_cli.training.distributed import DistInfo, SupportMismatch
from ssvi_cli.training.trainer import Interrupted, Trainer, TrainingError
from ssvi_cli.core.layers import SparseLinear, sparse_layers
from ssvi_cli.metrics import accuracy
from ssvi_cli.prediction import predict_loader

WORLD = 2
PER_RANK_BATCH = 32
EPOCHS = 4


def digits_cfg(batch_size: int, **over: Any) -> C.Config:
    # accumulate:3 makes two of every three capture steps parameter steps whose mu gradient comes from
    # the dense leaf (outside DDP), the path most likely to let ranks drift apart.
    base = {"train.epochs": EPOCHS, "train.batch_size": batch_size, "sparse.delta_t": 10,
            "sparse.addition": "accumulate:3",
            "train.device": "cpu", "train.eval_samples": 4, "train.checkpoint_every": 1}
    base.update(over)
    return C.apply_overrides(C.load_preset("digits_mlp"), base)


# ------------------------------------------------------------------ the worker (runs in each process)

def group_threads() -> Optional[list[str]]:
    """Names of this process's threads that belong to the process group (gloo, its TCP store);
    None where /proc cannot list C++ threads."""
    task = Path("/proc/self/task")
    if not task.is_dir():
        return None
    names = [(t / "comm").read_text().strip() for t in task.iterdir()]
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


def _worker(rank: int, port: int, out: str, mode: str) -> None:
    faulthandler.enable()  # a crash in a rank prints its Python stack into the test's output
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    info = DistInfo(rank=rank, local_rank=rank, world_size=WORLD)
    distributed.setup(info, "cpu", timeout_s=120)
    result["threads_during"] = group_threads()
    trainer = None
    try:
        trainer = Trainer.create(digits_cfg(PER_RANK_BATCH), Path(out) / "run", dist_info=info)
        if mode == "mismatch" and rank == 1:
            # Rank 1 alone perturbs its addition scores (still joining the all-reduce).
            trainer.grad_reduce = lambda g: distributed.mean(g) * torch.rand_like(g)
        if mode == "interrupt" and rank == 0:
            # Only rank 0 is asked to stop (as by Ctrl-C); every rank must stop at the same step. Asked
            # after step 26, the ranks agree on it in the next step's all-reduce and stop after step 27.
            trainer.step_hooks.append(lambda tr, kind: setattr(tr, "stop_requested", tr.state.step == 26))
        if mode == "nonfinite" and rank == 1:
            # Rank 1 alone meets a non-finite loss (as a rank-local fp16 overflow in the forward would).
            batches = trainer.batches
            trainer.batches = lambda epoch, start=0: ((x * float("nan") if trainer.state.step == 5 else x, y)
                                                      for x, y in batches(epoch, start))
        try:
            result["summary"] = trainer.fit()
        except (SupportMismatch, TrainingError) as exc:
            result["error"] = str(exc)
        except Interrupted as exc:
            result["interrupted_at"] = exc.step
        result["state"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        result["files_seen_by_rank"] = sorted(p.name for p in (Path(out) / "run").glob("*"))
    finally:
        if trainer is not None:
            trainer.release_process_group()
        distributed.teardown()
        result["threads_after"] = group_threads()
        torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture
def one_thread():
    """The in-test single-process runs: two threads on two busy cores oversubscribe badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_two_ranks(tmp_path: Path, mode: str) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(launcher.free_port(), str(tmp_path), mode), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_group_threads_stopped(ranks: list[dict[str, Any]]) -> None:
    """Teardown left no communication thread behind to run into interpreter shutdown."""
    for r in ranks:
        if r["threads_during"] is not None:
            assert r["threads_during"], "the group's threads were not recognised by name"
            assert r["threads_after"] == [], r["threads_after"]


def test_accuracy(run_dir: Path) -> float:
    """Accuracy of the exported file's mean network on the digits test split."""
    from ssvi_cli.training.plan import load_data
    from ssvi_cli.modelfile import read_model_file

    loaded = read_model_file(run_dir / "model.safetensors")
    splits = load_data(digits_cfg(64))
    loader = torch.utils.data.DataLoader(splits.test, batch_size=256)
    out = predict_loader(loaded.model, loader, torch.device("cpu"), mode="mean")
    return accuracy(out["probs"], out["labels"])


test_accuracy.__test__ = False  # a helper, not a test


# ------------------------------------------------------------------ two CPU processes

@pytest.mark.slow
def test_two_processes_train_identically_and_match_a_single_process(tmp_path: Path, one_thread):
    ranks = run_two_ranks(tmp_path, "full")
    assert_group_threads_stopped(ranks)
    run = tmp_path / "run"
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for key in a:  # supports (idx), mu, rho and biases: bit-identical on both ranks
        assert torch.equal(a[key], b[key]), key
    s0, s1 = ranks[0]["summary"], ranks[1]["summary"]
    assert s0["world_size"] == WORLD and s0["global_batch"] == WORLD * PER_RANK_BATCH
    assert s0["subspace_steps"] > 0 and s0["subspace_steps"] == s1["subspace_steps"]
    assert s0["samples_per_second"] > 0

    # Rank 0 alone wrote the run: each epoch and each subspace step is logged once, not twice.
    assert json.loads((run / "summary.json").read_text())["world_size"] == WORLD
    assert len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert len((run / "support.jsonl").read_text().splitlines()) == s0["subspace_steps"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl",
                                                     "model.safetensors", "summary.json", "support.jsonl"]

    single = Trainer.create(digits_cfg(WORLD * PER_RANK_BATCH), tmp_path / "single")
    ref = single.fit()
    assert single.steps_per_epoch == s0["steps"] // EPOCHS
    assert ref["subspace_steps"] == s0["subspace_steps"]
    # a capture's dense gradient is computed for the global batch, across the ranks: as one process's
    assert ref["training_flops"] == s0["training_flops"] and s0["training_flops_reduction_vs_vi"] > 1
    acc_ddp, acc_single = test_accuracy(run), test_accuracy(tmp_path / "single")
    assert acc_ddp > 0.8 and acc_single > 0.8
    print(f"exported model accuracy: 2 ranks {acc_ddp:.4f}, 1 process {acc_single:.4f}")
    assert abs(acc_ddp - acc_single) < 0.05, (acc_ddp, acc_single)


@pytest.mark.slow
def test_mask_mismatch_between_ranks_is_an_error_on_every_rank(tmp_path: Path):
    for message in errors_on_every_rank(tmp_path, "mismatch"):
        assert "sparse supports differ between ranks" in message
        assert "at step 10" in message  # the first subspace step (delta_t = 10)
        assert "in layer(s) '" in message


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path: Path):
    # The rank alone raising would leave the other waiting in the step's all-reduce (under NCCL until
    # its timeout, under gloo with a connection error in place of the message).
    for message in errors_on_every_rank(tmp_path, "nonfinite"):
        assert message.startswith("non-finite loss at step 5 (epoch 1) in the data term (cross-entropy) on at "
                                  "least one of the 2 processes; no checkpoint was written yet"), message


def errors_on_every_rank(tmp_path: Path, mode: str) -> list[str]:
    """Each rank's error, once every rank has stopped with one (no summary) and left the group."""
    ranks = run_two_ranks(tmp_path, mode)
    assert_group_threads_stopped(ranks)
    assert all("summary" not in r for r in ranks)
    return [r["error"] for r in ranks]


@pytest.mark.slow
def test_interrupt_on_one_rank_stops_all_and_resumes_on_one_process(tmp_path: Path, one_thread):
    ranks = run_two_ranks(tmp_path, "interrupt")
    assert [r["interrupted_at"] for r in ranks] == [27, 27]
    assert_group_threads_stopped(ranks)
    run = tmp_path / "run"

    from ssvi_cli.runs import checkpoint as ckpt

    # The checkpoint holds the cut epoch's sums over both ranks, so its record covers every sample.
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert saved["progress"]["epoch"]["seen"] == saved["state"]["batch_in_epoch"] * WORLD * PER_RANK_BATCH
    resumed = Trainer.resume(run, device="cpu")  # one process now: the global batch is kept
    assert resumed.state.step == 27 and resumed.state.global_batch == WORLD * PER_RANK_BATCH
    two_rank_steps = resumed.steps_per_epoch
    summary = resumed.fit()
    assert summary["world_size"] == 1 and summary["global_batch"] == WORLD * PER_RANK_BATCH
    assert summary["steps"] == EPOCHS * two_rank_steps
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))
    assert summary["test_accuracy_mean_net"] > 0.8


def test_a_training_split_smaller_than_the_processes_is_refused_before_the_run_is_claimed(tmp_path: Path):
    """Each process needs an example: fewer would give an epoch of no step (a division by zero in the
    KL weight); refused where the run is planned, before a claim (and ``--force``) touches its folder,
    and again by the trainer for a resume on more processes."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.training.plan import RunPlan

    cfg = digits_cfg(4, **{"data.max_train": 2})
    with pytest.raises(ConfigError, match="has 2 examples, too few to give each of 3 processes one"):
        RunPlan.new(cfg, tmp_path / "r", world_size=3)
    assert not (tmp_path / "r").exists()
    plan = RunPlan.new(cfg, tmp_path / "r", world_size=2)  # one each: trains
    assert len(plan.splits.train) == 2
    with pytest.raises(ConfigError, match="too few to give each of 3"):
        Trainer.from_plan(plan, dist_info=DistInfo(rank=0, world_size=3, local_rank=0))


# ------------------------------------------------------------------ pieces

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_partition_each_global_batch(world: int):
    order = torch.randperm(103, generator=torch.Generator().manual_seed(1))
    batches = distributed.global_batches(order, 10, world)
    for batch in batches:
        parts = [distributed.shard(batch, DistInfo(r, r, world)) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) > 0
    # 103 = 10 x 10 + 3: with 2 or more ranks one of them would train on a single sample of the last
    # 3 (BatchNorm cannot), or on none, so that batch is dropped.
    assert len(batches) == (11 if world == 1 else 10)


def test_a_last_batch_of_one_sample_is_dropped_unless_it_is_the_only_one():
    assert [len(b) for b in distributed.global_batches(torch.arange(21), 10, 1)] == [10, 10]
    assert [len(b) for b in distributed.global_batches(torch.arange(22), 10, 1)] == [10, 10, 2]
    assert [len(b) for b in distributed.global_batches(torch.arange(1), 10, 1)] == [1]
    assert distributed.global_batches(torch.arange(3), 10, 4) == []  # a rank would have no data
    # a batch of one sample per rank is the user's choice: every full batch stays
    assert len(distributed.global_batches(torch.arange(10), 1, 1)) == 10
    assert [len(b) for b in distributed.global_batches(torch.arange(10), 2, 2)] == [2] * 5
    assert [len(b) for b in distributed.global_batches(torch.arange(11), 2, 2)] == [2] * 5


def test_info_from_env():
    assert distributed.info_from_env({}) is None
    info = distributed.info_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert info == DistInfo(3, 1, 4) and not info.is_main and info.enabled


def test_support_checksum_sees_a_single_moved_index():
    layer = SparseLinear(20, 10, bayesian=True)
    idx = torch.arange(0, 200, 4)
    layer.set_support(idx, torch.zeros(50), torch.zeros(50))
    before = distributed.support_checksums(layer)
    moved = idx.clone()
    moved[7] += 1
    layer.set_support(moved, torch.zeros(50), torch.zeros(50))
    assert not torch.equal(before, distributed.support_checksums(layer))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_the_lrt_variance_in_float32(precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    trainer = Trainer.create(digits_cfg(32, **{"train.precision": precision, "sparse.delta_t": 4}),
                             Path("/nonexistent-not-written"))
    trainer.is_main = False  # nothing touches the disk in this test
    x, y = next(iter(trainer.batches(0)))
    layer = sparse_layers(trainer.model)[1][1]
    with torch.autocast("cpu", dtype=dtype):
        mean, var = layer.moments(torch.randn(4, layer.weight_shape[1]))
    assert var.dtype == torch.float32
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(5):  # t = 0; capture steps 1, 2 (parameter steps, scaled leaf gradients); subspace step 4
        out = trainer.train_step(x, y)
        assert torch.isfinite(torch.tensor(out["loss"]))
    assert trainer.state.subspace_steps == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert trainer.scaler.is_enabled() == (precision == "fp16")


# ------------------------------------------------------------------ the GPU path

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_with_each_precision(tmp_path: Path, precision: str):
    trainer = Trainer.create(digits_cfg(64, **{"train.device": "cuda", "train.precision": precision,
                                               "train.epochs": 4}), tmp_path / precision)
    summary = trainer.fit()
    assert trainer.device.type == "cuda" and torch.backends.cudnn.benchmark
    assert summary["subspace_steps"] > 0 and summary["test_accuracy_mean_net"] > 0.7
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.gpu
@needs_cuda
def test_cuda_lrt_variance_is_float32_under_bf16_autocast():
    layer = SparseLinear(64, 32, bayesian=True).cuda()
    idx = torch.arange(0, 64 * 32, 7, device="cuda")
    layer.set_support(idx, torch.randn(len(idx), device="cuda") * 0.1, torch.full((len(idx),), -9.0, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mean, var = layer.moments(torch.randn(8, 64, device="cuda"))
    assert var.dtype == torch.float32 and (var > 0).all()  # sigma^2 ~ 1e-8 would underflow in fp16


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dense", [False, True])
def test_model_on_cuda_writes_a_file_that_predicts_like_it(tmp_path: Path, dense: bool):
    from ssvi_cli.modelfile import read_model_file, write_model_file
    from ssvi_cli.prediction import predict_batch
    trainer = Trainer.create(digits_cfg(64, **{"train.device": "cuda", "train.epochs": 1}), tmp_path / "run")
    path = tmp_path / "m.safetensors"
    write_model_file(trainer.model, path, trainer.plan.card, dense=dense)  # dense scatters over a CUDA index
    loaded = read_model_file(path).model
    x = torch.randn(16, 1, 8, 8)
    expected, _ = predict_batch(trainer.model.eval(), x.cuda(), mode="mean")
    got, _ = predict_batch(loaded.eval(), x, mode="mean")
    torch.testing.assert_close(got, expected.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cli_nproc_on_two_gpus_with_nccl(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "ssvi_cli", "train", "--nproc", "2", "--device", "cuda", "--precision", "bf16",
         "--epochs", "2", "--out", str(tmp_path / "run"), "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["world_size"] == 2
