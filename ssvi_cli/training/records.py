"""What a run keeps track of: its position (:class:`TrainState`, checkpointed), one epoch's running
sums, the progress callbacks a front end passes in, and the density and memory of a model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ssvi_cli.config import Config
from ssvi_cli.core.allocation import kept_dense_weights
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.runs import checkpoint as ckpt
from ssvi_cli.runs.rundir import RunDir
from ssvi_cli.training import distributed
from ssvi_cli.training.stops import check_finite_state


def density_report(model: nn.Module) -> dict[str, Any]:
    layers = sparse_layers(model)
    active = sum(l.active for _, l in layers)
    total = sum(l.numel for _, l in layers)
    return {
        "active": active,
        "total": total,
        "density": active / total if total else 1.0,
        "layers": {n: round(l.density, 6) for n, l in layers},
        "kept_dense": kept_dense_weights(model),
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
    on_phase: Optional[Callable[[str], None]] = None                  # after the last epoch: what runs now


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    subspace_steps: int = 0
    # Samples per step over all ranks: batch_size x ranks when the run was created. A run resumed on
    # another number of ranks keeps it (and with it the data order and every schedule).
    global_batch: int = 0

    def __post_init__(self) -> None:  # read back from a checkpoint: counts, or a ValueError
        bad = {k: v for k, v in self.__dict__.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"the run's position holds {bad}, not counts")

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


SUMMED = ("loss", "nll", "correct", "seen")  # EpochStats' sums over the ranks of a data-parallel run


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
    before: float = 0.0  # seconds of this epoch spent before the run was resumed

    def to_dict(self) -> dict[str, float]:
        """The sums so far and the epoch's seconds, for a checkpoint taken inside the epoch."""
        fields = ("loss", "nll", "kl", "correct", "seen", "batches", "swapped", "swaps")
        return {**{k: getattr(self, k) for k in fields}, "before": time.perf_counter() - self.started}

    @classmethod
    def from_dict(cls, d: dict[str, float], sums: bool = True) -> "EpochStats":
        """The epoch a checkpoint was taken in; ``sums``: with the ranks' summed loss, NLL and counts
        (one rank of a data-parallel run takes them, the others start from zero)."""
        kept = SUMMED if sums else ()
        return cls(**{k: v for k, v in d.items() if k in kept or k in ("kl", "batches", "swapped", "swaps", "before")})

    def add(self, loss: float, nll: float, kl: float, correct: int, n: int) -> None:
        self.loss += loss * n
        self.nll += nll * n
        self.kl = kl
        self.correct += correct
        self.seen += n
        self.batches += 1


def progress_state(trainer: Any) -> dict[str, Any]:
    """What a checkpoint keeps of a :class:`~ssvi_cli.training.trainer.Trainer` beside its
    :class:`TrainState`: the seconds and samples behind its throughput and, taken inside an epoch
    (a stop, even after its last batch), that epoch's sums so far over all ranks, so the resumed
    run's ``metrics.jsonl`` line covers the whole epoch; the fp16 loss scaler's state; and, taken
    between the minibatches whose dense gradients a remove-and-add step averages
    (``sparse.addition=accumulate:N``), their running mean so far (the ranks' mean: the step averages
    the ranks' means, a linear map, so each rank may go on from it). A collective: every rank calls it."""
    epoch = None
    if trainer.state.batch_in_epoch:
        epoch = trainer.epoch_stats.to_dict()
        epoch.update(zip(SUMMED, distributed.sum_values([epoch[k] for k in SUMMED], trainer.device)))
    accumulated = {name: distributed.mean(grad).cpu() for name, grad in trainer._accumulated.items()}
    return {"train_seconds": trainer.train_seconds, "samples_seen": trainer.samples_seen, "epoch": epoch,
            "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
            "accumulated": accumulated, "captured": trainer._captured}


def checkpoint_payload(trainer: Any) -> Optional[dict[str, Any]]:
    """What a checkpoint of ``trainer`` holds, on rank 0 (None on the others). A collective: every rank
    calls it (the BatchNorm statistics and the epoch's sums are the ranks' mean and sum). A diverged
    model is never saved: it raises :class:`~ssvi_cli.training.stops.TrainingError`."""
    distributed.average_buffers(trainer.model)
    check_finite_state(trainer.run, trainer.state, trainer.model)
    progress = progress_state(trainer)
    if not trainer.is_main:
        return None
    return {"config": trainer.cfg.to_dict(), "data_spec": trainer.splits.spec.to_dict(),
            "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(), "state": trainer.state.to_dict(), "rng": ckpt.rng_state(),
            "progress": progress}


def restore_progress(trainer: Any, progress: Optional[dict[str, Any]]) -> None:
    """:func:`progress_state` back into a resumed trainer (a checkpoint from before it has none)."""
    if not progress:
        return
    trainer.train_seconds, trainer.samples_seen = float(progress["train_seconds"]), int(progress["samples_seen"])
    if progress.get("epoch"):
        trainer.epoch_stats = EpochStats.from_dict(progress["epoch"], sums=trainer.is_main)
    if progress.get("scaler") and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(progress["scaler"])
    layers = dict(sparse_layers(trainer.model))
    for name, grad in progress.get("accumulated", {}).items():
        trainer._accumulated[name] = layers[name].dense_grad = grad.to(trainer.device)
    trainer._captured = int(progress.get("captured", 0))


ORIGIN = "# from "  # config.yaml's first comment: where the run's config came from


def config_note(global_batch: int, cfg: Config, run: Optional[RunDir] = None, origin: Optional[str] = None) -> str:
    """The comments above a run's ``config.yaml``: where its config came from (``origin``, for a new
    run; a resumed run keeps the line its file has), and where its global batch is not
    ``train.batch_size``, that it was started on several processes, which that key alone does not record."""
    if origin is None and run is not None and run.config_file.is_file():
        first = run.config_file.read_text(encoding="utf-8").partition("\n")[0]
        origin = first[len(ORIGIN):] if first.startswith(ORIGIN) else None
    said = f"{ORIGIN}{origin}\n" if origin else ""
    started_on = global_batch // max(1, cfg.train.batch_size)
    if started_on <= 1:
        return said
    return said + (f"# started on {started_on} processes of train.batch_size each (a global batch of {global_batch}): "
                   f"ssvi train --nproc {started_on} --preset config.yaml trains it again\n")
