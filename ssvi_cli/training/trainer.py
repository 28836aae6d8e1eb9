"""Fits one run from its :class:`~ssvi_cli.training.plan.RunPlan`: the training step, the epoch loop,
checkpoints and the final summary. Nothing here prints or exits.

One step (:meth:`Trainer.train_step`) reads top to bottom: forward (LRT), loss = CE + KL weight x KL,
backward, then either the optimizer step or, every ``delta_t`` steps while ``t < t_end``, the
subspace step (METHOD.md §4) in its place.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ssvi_cli.config import Config, dump_yaml
from ssvi_cli.core.modes import capturing_dense_grad, sampling
from ssvi_cli.core.overlap import criteria_overlap
from ssvi_cli.core.subspace import Schedule, SwapReport, collect_captured, largest_moving, subspace_step
from ssvi_cli.data import DataSplits, seeded_augmentation
from ssvi_cli.runs import checkpoint as ckpt
from ssvi_cli.training import distributed
from ssvi_cli.training.distributed import SINGLE, DistInfo
from ssvi_cli.training.init_from import model_from_weights
from ssvi_cli.training.optim import kl_weight, lr_factor, make_optimizer, total_kl
from ssvi_cli.training.plan import RunPlan, check_feeds, init_model
from ssvi_cli.training.records import EpochStats, Progress, TrainState, checkpoint_payload, config_note, restore_progress
from ssvi_cli.training.stops import Interrupted, TrainingError, check_finite_loss, loss_trouble, stop_signals
from ssvi_cli.training.summary import epoch_record, finish

log = logging.getLogger(__name__)

AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["Interrupted", "Trainer", "TrainingError"]


class Trainer:
    """Fits one run. Build it with :meth:`from_plan`, or :meth:`create` / :meth:`resume` for short."""

    def __init__(self, plan: RunPlan, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: TrainState, dist_info: DistInfo = SINGLE) -> None:
        cfg, device = plan.cfg, plan.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if plan.run_dir is None:
            raise ValueError("a run needs a run directory")
        self.plan, self.cfg, self.device, self.run = plan, cfg, device, plan.run_dir
        self.splits: DataSplits = plan.splits
        self.model, self.optimizer, self.state, self.dist = model, optimizer, state, dist_info
        self.n_train = len(self.splits.train)
        check_feeds(self.n_train, dist_info.world_size)  # a resume on more processes than examples
        state.global_batch = state.global_batch or cfg.train.batch_size * dist_info.world_size
        if state.global_batch < dist_info.world_size:
            raise TrainingError(f"a global batch of {state.global_batch} cannot feed {dist_info.world_size} ranks")
        self.steps_per_epoch = len(distributed.global_batches(torch.arange(self.n_train), state.global_batch,
                                                              dist_info.world_size))
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.schedule = Schedule.from_config(cfg.sparse, self.total_steps)  # delta_t=auto resolved here
        self._accumulated: dict[str, Tensor] = {}
        self._captured = 0
        self.stop_requested = False
        self.stop_during = "the final evaluation"  # what a stop after the last epoch interrupts (summary.finish sets it)
        self.stop_signal = signal.SIGINT  # the signal that asked for the stop (reported in the exit code)
        self._agreed_stop: Optional[int] = None  # under DDP, the stop the ranks agreed in the last step
        self.step_hooks: list[Callable[["Trainer", str], None]] = []
        self.grad_reduce: Optional[Callable[[Tensor], Tensor]] = distributed.mean if dist_info.enabled else None
        self.is_main = dist_info.is_main
        self.net = distributed.wrap(model, self.device)  # DDP for ordinary steps; the model itself alone
        self.amp_dtype = AMP_DTYPES[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.epoch_stats = EpochStats()  # the current epoch's sums (checkpointed inside an epoch)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def release_process_group(self) -> None:
        """Drop the DDP wrapper (its reducer holds the process group) before the group is torn down.

        Call it once this rank's training is over (finished, interrupted or failed).
        """
        self.net = self.model

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_plan(cls, plan: RunPlan, dist_info: DistInfo = SINGLE) -> "Trainer":
        """A trainer for a planned new run, or for a resumed one (``plan.checkpoint`` set).

        With ``dist_info`` of several ranks, one rank of a data-parallel run (the process group must
        be set up: :func:`ssvi_cli.training.distributed.setup`).
        """
        cfg = plan.cfg
        if plan.checkpoint is None:
            torch.manual_seed(cfg.train.seed)
            generator = torch.Generator().manual_seed(cfg.train.seed)
            if plan.init_weights is not None:
                model = model_from_weights(cfg, plan.splits.spec, plan.init_weights, generator)
            else:
                model = plan.build_model()
                init_model(model, cfg, generator, plan.densities)
                if plan.init_posterior is not None:
                    plan.init_posterior.start(model)
                    plan.init_posterior = None  # the trained model's memory, not held for the whole run
            model.to(plan.device)
            distributed.fork_noise(dist_info)
            return cls(plan, model, make_optimizer(model, cfg), TrainState(), dist_info)
        data = plan.checkpoint
        model = plan.build_model()
        ckpt.load_model_state(model, data["model"])
        model.to(plan.device)
        optimizer = make_optimizer(model, cfg)
        with ckpt.restoring(plan.resumed_from):  # its parts as a checkpoint holds them, else one line
            optimizer.load_state_dict(data["optimizer"])
            state = TrainState(**data["state"])
        trainer = cls(plan, model, optimizer, state, dist_info)
        with ckpt.restoring(plan.resumed_from):
            restore_progress(trainer, data.get("progress"))
            ckpt.set_rng_state(data["rng"])
        distributed.fork_noise(dist_info)
        return trainer

    @classmethod
    def create(cls, cfg: Config, run_dir: Path, splits: Optional[DataSplits] = None,
               dist_info: DistInfo = SINGLE) -> "Trainer":
        """A new run of ``cfg`` in ``run_dir`` (planned here)."""
        return cls.from_plan(RunPlan.new(cfg, run_dir, splits=splits), dist_info)

    @classmethod
    def resume(cls, run_dir: Path, device: Optional[str] = None, splits: Optional[DataSplits] = None,
               dist_info: DistInfo = SINGLE) -> "Trainer":
        """The run in ``run_dir`` at its latest checkpoint."""
        return cls.from_plan(RunPlan.resume(run_dir, device, splits), dist_info)

    # -- data ----------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> tuple[list[Tensor], torch.Generator]:
        """The global minibatches of one epoch: a permutation fixed by (seed, epoch) alone, so any
        number of ranks (and a resumed run) walks the same data in the same order."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_train, generator=gen)
        return distributed.global_batches(order, self.state.global_batch, self.dist.world_size), gen

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of each global minibatch of the epoch; skips ``start`` batches without
        loading them, so a resumed epoch sees exactly the remaining data."""
        plan, gen = self.epoch_plan(epoch)
        batch_sampler = [distributed.shard(b, self.dist).tolist() for b in plan[start:]]
        # A private generator: creating a loader iterator draws its worker base seed from it, and
        # drawing from the global RNG instead would shift the noise stream of a resumed run. Its seed
        # and a batch's indices seed that batch's augmentation: alike with any workers, resumed or not.
        loader = torch.utils.data.DataLoader(seeded_augmentation(self.splits.train, gen.initial_seed()),
                                             batch_sampler=batch_sampler, num_workers=self.cfg.train.num_workers,
                                             pin_memory=self.device.type == "cuda", generator=gen)
        yield from loader

    # -- one step ------------------------------------------------------------------
    def kl_weight(self, step: int) -> float:
        return kl_weight(self.cfg, step, self.total_steps, self.n_train)

    def train_step(self, x: Tensor, y: Tensor, batch_total: Optional[int] = None) -> dict[str, float]:
        """One minibatch: a parameter update, or (every delta_t steps) a subspace update.

        ``x, y`` is this rank's shard of a global minibatch of ``batch_total`` samples.
        """
        cfg, model, t = self.cfg, self.model, self.state.step
        batch_total = batch_total or len(y) * self.dist.world_size
        moves = cfg.method.moves_support
        capture = moves and self.schedule.captures(t)
        update = moves and self.schedule.is_update(t)
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(cfg, t, self.total_steps)
        # The addition score's gradient: at theta = mu for the ``mean`` estimator, else one LRT draw.
        mode = "mean" if capture and cfg.sparse.addition == "mean" else "lrt"
        with sampling(model, mode), capturing_dense_grad(model, capture):
            # A capture step runs outside DDP: mu's gradient comes from the dense leaf, which DDP
            # cannot see, so that step averages its gradients itself (sync_grads below).
            net = model if capture else self.net
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = net(x)
            nll = F.cross_entropy(logits.float(), y)
            # Ranks' gradients are averaged; weighting this rank's mean by its share of the global
            # batch makes the average exactly the single-process gradient, also for unequal shards.
            share = len(y) * self.dist.world_size / batch_total
            kl = total_kl(model, cfg.bayes.prior_sigma, x.device)
            weight = self.kl_weight(t)
            loss = nll * share + weight * kl
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            # After the backward, which every rank joins (its all-reduces): all ranks stop here, or none.
            trouble, stop = distributed.max_over_ranks([loss_trouble(nll, kl, loss), self._local_stop()], self.device)
            self._agreed_stop = stop if self.dist.enabled else None
            check_finite_loss(self.run, self.state, trouble, self.dist.world_size)
            if capture:  # one process: a minibatch the fp16 scaler skips is left out of the mean too
                drop = not update and not self.dist.enabled  # ranks would part: the step's own check agrees
                self._captured += collect_captured(model, self._accumulated, self._captured + 1, self.scaler.get_scale(), drop)
        report = self._subspace_step(t) if update else None
        if not update:
            if capture:
                distributed.sync_grads(list(model.parameters()))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.state.step += 1
        for hook in self.step_hooks:
            hook(self, "subspace" if update else "optim")
        correct = int((logits.argmax(-1) == y).sum())
        return {"loss": nll.item() + weight * kl.item(), "nll": nll.item(), "kl": kl.item(), "kl_weight": weight,
                "correct": correct, "swapped": report.swapped if report else -1}

    def _subspace_step(self, t: int) -> SwapReport:
        """Remove-and-add in every sparse layer (instead of the optimizer step), logged per layer."""
        s = self.cfg.sparse
        # How far the six criteria agree on what to drop now (the sweep's early/middle/late table), at
        # a few of the run's subspace steps.
        overlap = (criteria_overlap(self.model, self.schedule.drop_fraction(t), s.criterion_lambda)
                   if self.is_main and self.schedule.records_overlap(t, largest_moving(self.model)) else None)
        report = subspace_step(self.model, t, self.schedule, s.criterion, s.criterion_lambda, s.new_sigma,
                               self.optimizer, self.grad_reduce)
        distributed.verify_supports(self.model, t)
        self._accumulated.clear()
        self._captured = 0
        if report.skipped:  # an overflowed fp16 backward: back the loss scale off, as a skipped step does
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
            if self.is_main:
                log.warning("step %d: the dense gradient held inf/NaN; this remove-and-add step was skipped", t)
            return report
        self.state.subspace_steps += 1
        if self.is_main:
            layers = {l.name: {"active": l.active, "dropped": l.dropped, "swapped": l.swapped, "iou": l.iou}
                      for l in report.layers}
            self.run.append_support({"step": t, "fraction": report.fraction, "layers": layers, "criteria_iou": overlap})
        return report

    # -- the loop ------------------------------------------------------------------
    def fit(self, progress: Optional[Progress] = None) -> dict[str, Any]:
        """Train to the configured number of epochs (from wherever the state is)."""
        progress = progress or Progress()
        if self.is_main:
            self.run.write_config(config_note(self.state.global_batch, self.cfg, self.run, self.plan.origin) + dump_yaml(self.cfg))
            self.run.cut_records(self.state.epoch, self.state.step)  # a resumed run writes later ones again
        with stop_signals(self._request_stop):
            while self.state.epoch < self.cfg.train.epochs:
                self._run_epoch(progress)
            if self._stop_asked():  # asked after the last step: in its validation
                raise Interrupted(self.run_dir, self.state.step, self.stop_signal, during="the end of training")
        with stop_signals(self._stop_now):  # training is over and checkpointed: a stop needs no step to end
            return self.finish(progress)

    def finish(self, progress: Optional[Progress] = None) -> dict[str, Any]:
        """Final test metrics and the model file (see :func:`ssvi_cli.training.summary.finish`)."""
        return finish(self, progress or Progress())

    def _request_stop(self, signum: signal.Signals) -> None:
        self.stop_requested, self.stop_signal = True, signum

    def _local_stop(self) -> int:
        return int(self.stop_signal) if self.stop_requested else 0

    def _stop_asked(self, agreed: Optional[int] = None) -> bool:
        """Whether any rank was asked to stop (``agreed``: as the ranks agreed in the step); every rank
        then reports the signal that asked (SIGTERM to one process of a --nproc run was reported as
        Ctrl-C, the others' default)."""
        asked = distributed.max_over_ranks([self._local_stop()], self.device)[0] if agreed is None else agreed
        if asked:
            self.stop_requested, self.stop_signal = True, signal.Signals(asked)
        return bool(asked)

    def _stop_now(self, signum: signal.Signals) -> None:
        raise Interrupted(self.run_dir, self.state.step, signum, during=self.stop_during)

    def _run_epoch(self, progress: Progress) -> None:
        epoch = self.state.epoch
        stats = self.epoch_stats = self.epoch_stats if self.state.batch_in_epoch else EpochStats()
        if progress.on_epoch_start:
            progress.on_epoch_start(epoch, self.steps_per_epoch - self.state.batch_in_epoch)
        sizes = [len(b) for b in self.epoch_plan(epoch)[0][self.state.batch_in_epoch:]]
        started = time.perf_counter()
        stats.started = started - stats.before
        for (x, y), batch_total in zip(self.batches(epoch, self.state.batch_in_epoch), sizes):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            out = self.train_step(x, y, batch_total)
            self.samples_seen += batch_total
            self.state.batch_in_epoch += 1
            if out["swapped"] >= 0:
                stats.swapped += out["swapped"]
                stats.swaps += 1
            stats.add(out["loss"], out["nll"], out["kl"], out["correct"], len(y))
            if progress.on_batch:
                progress.on_batch({"loss": stats.loss / stats.seen, "acc": stats.correct / stats.seen})
            if self._stop_asked(self._agreed_stop):  # all ranks stop at one step
                self.train_seconds += time.perf_counter() - started
                self.save()
                distributed.max_over_ranks([0], self.device)  # no rank ends before rank 0's checkpoint is written
                raise Interrupted(self.run_dir, self.state.step, self.stop_signal)
        self.train_seconds += time.perf_counter() - started
        distributed.average_buffers(self.model)
        stats.loss, stats.nll, stats.correct, stats.seen = distributed.sum_values(
            [stats.loss, stats.nll, stats.correct, stats.seen], self.device)
        record = epoch_record(self, stats)
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        if self.is_main:
            self.run.append_metrics(record)
        if self.state.epoch % self.cfg.train.checkpoint_every == 0 or self.state.epoch == self.cfg.train.epochs:
            self.save()
        if progress.on_epoch_end:
            progress.on_epoch_end(record)

    def save(self) -> Optional[Path]:
        """A checkpoint of the run (a collective under DDP: every rank calls it; rank 0 writes it)."""
        payload = checkpoint_payload(self)
        return self.run.save_checkpoint(self.state.step, payload, self.cfg.train.keep_checkpoints) if payload else None
