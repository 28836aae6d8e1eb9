"""Multi-process training on ``torch.distributed``: process group, sharding, reductions, checks.

One process per device, launched by ``torchrun`` (or ``ssvi train --nproc N``, which runs
``torch.distributed.run`` for one node: :mod:`ssvi_cli.training.launcher`). The model is wrapped in ``DistributedDataParallel`` for
ordinary steps; the pieces DDP cannot see are reduced here:

- the dense gradient of a subspace step lives on a leaf tensor that is not a parameter, so it is
  all-reduced (:func:`mean`) before the addition scores are ranked;
- a capture step runs its forward outside DDP (``mu`` gets its gradient from that leaf), so every
  parameter gradient of that step is all-reduced in one flat buffer (:func:`sync_grads`);
- BatchNorm running statistics stay per rank during an epoch (``broadcast_buffers=False``, which also
  keeps DDP from silently overwriting the support buffers ``idx`` with rank 0's) and are averaged
  before every evaluation and checkpoint (:func:`average_buffers`).

After each subspace step every rank checks that all supports agree through one small all-reduce of
checksums (:func:`verify_supports`); a mismatch raises :class:`SupportMismatch`, on every rank.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from inspect import signature
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ssvi_cli.core.layers import sparse_layers

log = logging.getLogger(__name__)

# The variables torchrun sets for every worker.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# A multiplicative hash constant (Knuth): spreads neighbouring indices over the 31-bit range.
_HASH = 2654435761


class SupportMismatch(RuntimeError):
    """The sparse supports differ between ranks: training would silently diverge."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()


def info_from_env(environ: Optional[dict[str, str]] = None) -> Optional[DistInfo]:
    """The :class:`DistInfo` of a ``torchrun`` worker, or ``None`` outside one."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in ENV_KEYS):
        return None
    return DistInfo(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))


def setup(info: DistInfo, device: str, timeout_s: float = 1800) -> torch.device:
    """Join the process group (``nccl`` on CUDA where torch has it, else ``gloo``) and return this rank's device.

    ``device`` is the configured ``train.device`` (auto/cpu/cuda). With CUDA each rank takes the GPU
    numbered by its local rank.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but no CUDA device is available; use --device cpu")
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {info.local_rank} has no GPU: this node has "
                               f"{torch.cuda.device_count()}; use --nproc <= that")
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
    else:
        dev = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        with _ctrl_c_ends_at_once():
            # DDP imports torch._dynamo; imported after the group exists, it takes references to the group
            # that are never released, which would keep the group's threads alive past teardown().
            importlib.import_module("torch._dynamo")
            nccl = use_cuda and dist.is_nccl_available()  # torch's Windows builds have gloo alone
            dist.init_process_group("nccl" if nccl else "gloo", rank=info.rank, world_size=info.world_size,
                                    timeout=timedelta(seconds=timeout_s), device_id=dev if nccl else None)
    return dev


@contextmanager
def _ctrl_c_ends_at_once() -> Iterator[None]:
    """Ctrl-C ends the process at once, as the system ends one (SIGINT's default action), while the
    process group forms: its wait for the other ranks runs in C++, where Python's handler never runs
    (Ctrl-C waited out torchrun's 30 s grace and then its SIGKILL); and while torch's compiler, which
    DDP needs, is imported just before it (a KeyboardInterrupt in an import leaves a module half
    made). Nothing has been written by then: the run folder is claimed after. A handler the caller
    set of its own is kept."""
    before = signal.getsignal(signal.SIGINT)
    ours = before is signal.default_int_handler or any(getattr(before, k, False) for k in ("ssvi_until_training", "ssvi_ctrl_c"))
    if not ours or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def teardown() -> None:
    """Leave the process group and stop its communication threads now, while Python is fully alive.

    ``destroy_process_group`` only unregisters the group: an object still holding it (the DDP
    wrapper's reducer; drop it first with :meth:`ssvi_cli.training.trainer.Trainer.release_process_group`)
    keeps gloo's worker threads running into interpreter shutdown, where a rank has been seen to
    abort at exit. Collecting here frees the group, whose destructor joins those threads.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # DDP sits in reference cycles: free it, and with it the group, before returning


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------ data

def shard(batch: Tensor, info: DistInfo) -> Tensor:
    """This rank's part of one global minibatch: every ``world_size``-th index from ``rank``.

    The same strided split as ``DistributedSampler``; the parts of all ranks are disjoint and their
    union is the global batch, so a step sees exactly the samples a single process would.
    """
    return batch[info.rank::info.world_size]


def global_batches(order: Tensor, global_batch: int, world_size: int) -> list[Tensor]:
    """Split an epoch's permutation into global minibatches.

    A final partial batch that would give some rank fewer than two samples is dropped: a rank
    without data would stall DDP, and BatchNorm cannot train on one sample (a network whose feature
    map shrinks to 1x1, such as GoogLeNet at 64x64 or ResNet-18 at 32x32, fails on it). The
    permutation changes every epoch, so the dropped sample is a different one each time. A full
    batch is never dropped (a batch size of one per rank trains on single samples by choice), nor
    a lone batch that gives every rank a sample (the epoch would otherwise be empty).
    """
    batches = list(order.split(global_batch))
    last = len(batches[-1]) if batches else 0
    if batches and (last < world_size or (len(batches) > 1 and last < min(2 * world_size, global_batch))):
        batches.pop()
    return batches


# ------------------------------------------------------------------ reductions

def mean(t: Tensor) -> Tensor:
    """All-reduce mean of ``t`` across ranks (a new tensor; ``t`` itself unchanged)."""
    if not active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def _average_in_place(tensors: list[Tensor]) -> None:
    """Average ``tensors`` across ranks in place, in one flat all-reduce."""
    if not active() or not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(reduced)


def sync_grads(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` across ranks in place."""
    _average_in_place([p.grad for p in params if p.grad is not None])


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across ranks in place."""
    _average_in_place([b for _, b in model.named_buffers() if b.is_floating_point()])


def sum_values(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (epoch statistics)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(values: Sequence[Union[int, Tensor]], device: torch.device) -> list[int]:
    """The largest of every rank's value, on every rank, for each of ``values`` (ints, or one-element
    tensors left on their device), in one all-reduce: a stop asked of any rank (its signal's number, 0
    for none) stops all at the same step, each reporting the signal that asked."""
    if not active():
        return [int(v) for v in values]
    t = torch.stack([torch.as_tensor(v, device=device).reshape(()).long() for v in values])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; its result, or its exception, reaches every rank.

    A failure on rank 0 (say, ``--out`` already holds a run) is raised everywhere instead of leaving
    the other ranks waiting in the next collective.
    """
    result: tuple[Any, Optional[BaseException]] = (None, None)
    if not active() or dist.get_rank() == 0:
        try:
            result = (fn(), None)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            result = (None, exc)
    value, error = broadcast_object(result)
    if error is not None:
        raise error
    return value


# ------------------------------------------------------------------ supports

def support_checksums(model: nn.Module) -> Tensor:
    """Per sparse layer: (count, sum of indices, sum of hashed indices), as int64.

    Any change of one index changes the sums; the hashed sum catches two changes that cancel in the
    plain sum. Values stay far below 2^63 (indices < 2^31 hashed into 31 bits).
    """
    rows = []
    for _, layer in sparse_layers(model):
        idx = layer.idx
        hashed = (idx * _HASH) % (1 << 31)
        rows.append(torch.stack([torch.tensor(idx.numel(), device=idx.device), idx.sum(), hashed.sum()]))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.int64)
    return torch.stack(rows).to(torch.int64)


def verify_supports(model: nn.Module, step: int) -> None:
    """Raise :class:`SupportMismatch` on every rank if any layer's support differs between ranks.

    One all-reduce of ``[c, -c]`` with MAX gives the largest and (negated) smallest checksum of every
    layer across ranks; they agree exactly when all ranks hold the same checksums.
    """
    if not active():
        return
    sums = support_checksums(model)
    both = torch.cat([sums, -sums], dim=1)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[:, :3], -both[:, 3:]
    differs = (hi != lo).any(dim=1).nonzero().flatten().tolist()
    if differs:
        names = [name for name, _ in sparse_layers(model)]
        bad = ", ".join(repr(names[i] or "<root>") for i in differs)
        raise SupportMismatch(
            f"sparse supports differ between ranks after the subspace step at step {step} in layer(s) "
            f"{bad} (seen on rank {dist.get_rank()} of {dist.get_world_size()}); the ranks would "
            "silently diverge. Every rank must rank identical scores: check that all ranks run the "
            "same ssvi version, config and seed, and that nothing alters one rank's gradients or "
            "supports"
        )


# ------------------------------------------------------------------ DDP and launching

def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (the model itself when not distributed).

    ``broadcast_buffers=False``: rank 0's buffers must not overwrite the others' supports every
    forward, which would hide a divergence that :func:`verify_supports` is there to report.
    """
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # Newer PyTorch renamed the flag; both keep the initial broadcast, which only copies equal values.
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(model, device_ids=ids, **no_buffer_sync)


def fork_noise(info: DistInfo) -> None:
    """Give each rank its own noise stream (LRT draws); rank 0 keeps the stream of a single process."""
    if info.rank:
        base = int(torch.randint(0, 2**62, ()).item())
        torch.manual_seed(base + info.rank)
