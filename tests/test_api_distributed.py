"""The public Subspace under DistributedDataParallel (2 CPU processes, gloo) and under autocast:
identical supports on every rank after every remove-and-add step; exact counts in mixed precision."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import ssvi_cli as ssvi
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.training.launcher import free_port

STEPS, DELTA_T = 10, 3


def net() -> nn.Module:
    torch.manual_seed(0)  # the same initial model on every rank, as a user's seeded script builds it
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    ssvi.sparsify(model, 0.9, from_weights=False)
    return model


@contextlib.contextmanager
def _ddp_loop(rank: int, port: int):
    """This rank's model, its DDP wrapper, the optimizer and the Subspace, inside a gloo group of two."""
    import torch._dynamo  # noqa: F401 - imported before the group exists, so it holds no reference to it

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    ddp = sub = None
    try:
        model = net()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ssvi.param_groups(model, lr=0.05, lr_sigma=0.05), momentum=0.9)
        sub = ssvi.Subspace(ddp, opt, total_steps=STEPS, delta_t=DELTA_T)
        yield model, ddp, opt, sub
    finally:
        # DDP's reducer holds the group: drop it before the group goes, as Trainer.release_process_group
        # does (the callers drop theirs too). A group destroyed under a live reducer leaves gloo's
        # threads to die with the interpreter, which once aborted a rank at exit (SIGABRT).
        if sub is not None:
            sub.remove()
        ddp = sub = None
        gc.collect()
        torch.distributed.destroy_process_group()


def _rank(rank: int, port: int, out: str, micro: int) -> None:
    with _ddp_loop(rank, port) as (model, ddp, opt, sub):
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        agreed, moved, synced = [], 0, []
        for _ in range(STEPS):
            x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            # micro > 1: gradient accumulation as DDP users write it, no_sync() on all but the last
            for i, (xc, yc) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
                with ddp.no_sync() if i < micro - 1 else contextlib.nullcontext():
                    loss = F.cross_entropy(ddp(xc), yc) + ssvi.kl_term(model, n_train=320, beta=0.01)
                    (loss / micro).backward()
            moved_now = sub.step()
            synced.append(ddp.require_backward_grad_sync)
            if moved_now:
                moved += sub.last_report.swapped
                # Compare the supports across ranks right away, before DDP's next forward
                # broadcasts rank 0's buffers (idx among them) over the others'.
                mine = torch.cat([layer.idx for _, layer in sparse_layers(model)]).float()
                theirs = [torch.zeros_like(mine) for _ in range(2)]
                torch.distributed.all_gather(theirs, mine)
                agreed.append(torch.equal(theirs[0], theirs[1]))
            opt.zero_grad()
        torch.save({"agreed": agreed, "moved": moved, "synced": synced, "state": model.state_dict(),
                    "counts": [layer.active for _, layer in sparse_layers(model)]}, Path(out) / f"rank{rank}.pt")
        del ddp, sub  # before the group is destroyed (_ddp_loop)


@pytest.mark.slow
@pytest.mark.parametrize("micro", [1, 2])
def test_ranks_pick_the_same_support_under_ddp(tmp_path: Path, micro: int):
    mp.spawn(_rank, args=(free_port(), str(tmp_path), micro), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["agreed"] == b["agreed"] == [True, True]  # steps 3 and 6 (the support freezes at t_end = 7)
    assert a["synced"] == [True] * STEPS  # DDP synchronises again after every capture step
    assert a["moved"] > 0 and a["moved"] == b["moved"]
    expected = [layer.active for _, layer in sparse_layers(net())]
    assert a["counts"] == b["counts"] == expected
    for key in a["state"]:  # supports, mu, rho, biases, BatchNorm affine: the same model on both ranks
        if "running_" in key or "num_batches" in key:
            continue  # each rank's own statistics until DDP's next forward broadcasts rank 0's
        assert torch.equal(a["state"][key], b["state"][key]), key


def _rank_leaves(rank: int, port: int, out: str) -> None:
    """Three steps of the schedule, then the loop steps the optimizer itself: the first of those
    steps follows the capture forward of remove-and-add step 3, which ran unsynchronised."""
    with _ddp_loop(rank, port) as (model, ddp, opt, sub):
        gen = torch.Generator().manual_seed(100 + rank)
        for t in range(6):
            x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            F.cross_entropy(ddp(x), y).backward()
            sub.step() if t < DELTA_T else opt.step()
            opt.zero_grad()
        torch.save({"state": model.state_dict(), "synced": ddp.require_backward_grad_sync},
                   Path(out) / f"rank{rank}.pt")
        del ddp, sub  # before the group is destroyed (_ddp_loop)


@pytest.mark.slow
def test_ranks_stay_alike_when_the_loop_leaves_the_schedule_on_a_capture_step(tmp_path: Path):
    mp.spawn(_rank_leaves, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["synced"] and b["synced"]
    for key in a["state"]:
        if "running_" in key or "num_batches" in key:
            continue
        torch.testing.assert_close(a["state"][key], b["state"][key], msg=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_loop_under_autocast_keeps_exact_counts(dtype):
    model = net()
    counts = [layer.active for _, layer in sparse_layers(model)]
    # plain SGD: a step on gradients still scaled by the fp16 scaler (65536) would throw mu far off
    opt = torch.optim.SGD(ssvi.param_groups(model, lr=0.05, lr_sigma=0.05))
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    sub = ssvi.Subspace(model, opt, total_steps=8, delta_t=2)
    before = [p.detach().clone() for p in model.parameters()]
    moved = 0
    for _ in range(8):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        with torch.autocast("cpu", dtype=dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y) + ssvi.kl_term(model, n_train=320, beta=0.01)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # PyTorch's AMP recipe with gradient clipping: unscale, clip, step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        if sub.step(scaler):
            moved += sub.last_report.swapped
        opt.zero_grad()
        assert [layer.active for _, layer in sparse_layers(model)] == counts
    assert moved > 0
    # finite, unscaled updates (rho of a small sigma is about -7 and below, so it is left out)
    assert all(bool(p.abs().max() < 10) for n, p in model.named_parameters() if not n.endswith("rho"))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(b.shape != p.shape or not torch.equal(b, p) for b, p in zip(before, model.parameters()))
