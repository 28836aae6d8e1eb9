"""What a run keeps track of: its position (:class:`TrainState`, checkpointed), one epoch's running
sums, the progress callbacks a front end passes in, and the density and memory of a model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ssvi_cli.core.layers import sparse_layers


def density_report(model: nn.Module) -> dict[str, Any]:
    layers = sparse_layers(model)
    active = sum(l.active for _, l in layers)
    total = sum(l.numel for _, l in layers)
    return {
        "active": active,
        "total": total,
        "density": active / total if total else 1.0,
        "layers": {n: round(l.density, 6) for n, l in layers},
    }


def trainable_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Bytes of parameters, their gradients, optimizer state and support indices, from the tensors."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = 0
    if optimizer is not None:
        for st in optimizer.state.values():
            state += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, Tensor))
    index = sum(l.idx.numel() * l.idx.element_size() for _, l in sparse_layers(model))
    return {"params": params, "grads": grads, "optimizer": state, "index": index,
            "total": params + grads + state + index}


@dataclass
class Progress:
    """Callbacks the CLI passes to show progress; all optional."""

    on_epoch_start: Optional[Callable[[int, int], None]] = None        # (epoch, n_batches)
    on_batch: Optional[Callable[[dict[str, float]], None]] = None     # live loss/accuracy
    on_epoch_end: Optional[Callable[[dict[str, Any]], None]] = None   # the metrics.jsonl record


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    subspace_steps: int = 0
    # Samples per step over all ranks: batch_size x ranks when the run was created. A run resumed on
    # another number of ranks keeps it (and with it the data order and every schedule).
    global_batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class EpochStats:
    loss: float = 0.0
    nll: float = 0.0
    kl: float = 0.0
    correct: int = 0
    seen: int = 0
    batches: int = 0
    swapped: int = 0
    swaps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, nll: float, kl: float, correct: int, n: int) -> None:
        self.loss += loss * n
        self.nll += nll * n
        self.kl = kl
        self.correct += correct
        self.seen += n
        self.batches += 1
