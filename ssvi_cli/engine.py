"""The one orchestrator: build a run from a Config, fit it, checkpoint it, evaluate it.

The CLI only resolves names and hands a Config here; nothing in this module prints or exits.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssvi_cli import checkpoint as ckpt
from ssvi_cli import distributed, fileio
from ssvi_cli.allocation import InitSpec, initialise, layer_densities
from ssvi_cli.config import Config, ConfigError, addition_accumulate, dump_yaml, from_dict
from ssvi_cli.criteria import criterion_names
from ssvi_cli.data import DataSpec, DataSplits, build_dataset
from ssvi_cli.flops import training_summary
from ssvi_cli.distributed import SINGLE, DistInfo
from ssvi_cli.layers import set_kernel, set_mode, sparse_layers
from ssvi_cli.models import MODELS, LayerFactory, SSVIModel, build_model
from ssvi_cli.predict import predict_loader
from ssvi_cli.registry import UnknownName
from ssvi_cli.subspace import Schedule, SwapReport, begin_capture, collect_captured, subspace_step

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPPORT_FILE = "support.jsonl"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"
AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad device, ...); the message says what to do."""


class Interrupted(RuntimeError):
    """Training stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint."""

    def __init__(self, run_dir: Path, step: int, signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint written")
        self.run_dir, self.step, self.signum = run_dir, step, signal.Signals(signum)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a config error (exit code 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; valid values are: auto, cpu, cuda")
    return torch.device(name)


def check_names(cfg: Config) -> None:
    """Resolve every registry name before anything is written (errors list valid names)."""
    MODELS.get(cfg.model.name)
    from ssvi_cli.data import DATASETS, dataset_names

    if cfg.data.name not in DATASETS:
        raise UnknownName(f"unknown dataset {cfg.data.name!r}; valid names are: {', '.join(dataset_names())}")
    if cfg.sparse.criterion not in criterion_names():
        raise UnknownName(
            f"unknown criterion {cfg.sparse.criterion!r}; valid names are: {', '.join(criterion_names())}"
        )


def make_model(cfg: Config, spec: DataSpec) -> SSVIModel:
    layers = LayerFactory(bayesian=cfg.bayesian, sigma_param=cfg.bayes.sigma_param)
    return build_model(cfg.model.name, spec.input_shape, spec.num_classes, layers, cfg.model.widths)


def validate_model(cfg: Config, spec: DataSpec) -> None:
    """Build the architecture and plan its supports without training: raises on an impossible
    architecture/input pairing or a sparsity that leaves a layer with no active weight."""
    model = make_model(cfg, spec)
    layer_densities(sparse_layers(model), cfg.density, cfg.sparse.allocation, cfg.model.dense_stem)


def init_model(model: SSVIModel, cfg: Config, generator: torch.Generator) -> dict[str, float]:
    densities = layer_densities(sparse_layers(model), cfg.density, cfg.sparse.allocation,
                                cfg.model.dense_stem)
    init = InitSpec(mu_std=cfg.bayes.mu_init_std, sigma_mean=cfg.bayes.sigma_init_mean,
                    sigma_std=cfg.bayes.sigma_init_std, sigma_param=cfg.bayes.sigma_param)
    initialise(model, densities, init, generator)
    return densities


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Group 1: mu, biases, BatchNorm (lr, weight decay); group 2: rho (lr_sigma, no decay)."""
    rho = [p for n, p in model.named_parameters() if n.endswith(".rho") or n == "rho"]
    rho_ids = {id(p) for p in rho}
    rest = [p for p in model.parameters() if id(p) not in rho_ids]
    o = cfg.optim
    groups = [{"params": rest, "lr": o.lr, "weight_decay": o.weight_decay, "base_lr": o.lr, "name": "mu"}]
    if rho:
        groups.append({"params": rho, "lr": o.lr_sigma, "weight_decay": 0.0, "base_lr": o.lr_sigma,
                       "name": "rho"})
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.Adam(groups, lr=o.lr)


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


class Trainer:
    """Fits one run. Construct with :meth:`create` (new run) or :meth:`resume` (from its checkpoint)."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, splits: DataSplits,
                 model: SSVIModel, optimizer: torch.optim.Optimizer, state: TrainState,
                 dist_info: DistInfo = SINGLE) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.splits, self.model, self.optimizer, self.state = splits, model, optimizer, state
        self.dist = dist_info
        self.n_train = len(splits.train)
        if self.n_train == 0:
            raise TrainingError("the training split is empty")
        state.global_batch = state.global_batch or cfg.train.batch_size * dist_info.world_size
        if state.global_batch < dist_info.world_size:
            raise TrainingError(f"a global batch of {state.global_batch} cannot feed {dist_info.world_size} ranks")
        self.steps_per_epoch = len(distributed.global_batches(torch.arange(self.n_train), state.global_batch,
                                                              dist_info.world_size))
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        s = cfg.sparse
        self.schedule = Schedule(s.delta_t, s.alpha, int(s.t_end * self.total_steps),
                                 addition_accumulate(s.addition))
        self._accumulated: dict[str, Tensor] = {}
        self._captured = 0
        self.stop_requested = False
        self.stop_signal = signal.SIGINT  # the signal that asked for the stop (reported in the exit code)
        self.step_hooks: list[Callable[["Trainer", str], None]] = []
        self.grad_reduce: Optional[Callable[[Tensor], Tensor]] = distributed.mean if dist_info.enabled else None
        self.is_main = dist_info.is_main
        self.net = distributed.wrap(model, self.device)  # DDP for ordinary steps; the model itself alone
        self.amp_dtype = AMP_DTYPES[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.train_seconds = 0.0
        self.samples_seen = 0
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels

    def release_process_group(self) -> None:
        """Drop the DDP wrapper (its reducer holds the process group) before the group is torn down.

        Call it once this rank's training is over (finished, interrupted or failed).
        """
        self.net = self.model

    # -- construction ----------------------------------------------------------
    @classmethod
    def create(cls, cfg: Config, run_dir: Path, splits: Optional[DataSplits] = None,
               dist_info: DistInfo = SINGLE) -> "Trainer":
        """A new run; with ``dist_info`` of several ranks, one rank of a data-parallel run (the
        process group must be set up: :func:`ssvi_cli.distributed.setup`)."""
        check_names(cfg)
        device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        splits = splits or load_data(cfg)
        model = make_model(cfg, splits.spec)
        init_model(model, cfg, torch.Generator().manual_seed(cfg.train.seed))
        model.to(device)
        set_kernel(model, cfg.train.kernel)
        distributed.fork_noise(dist_info)
        return cls(cfg, run_dir, device, splits, model, make_optimizer(model, cfg), TrainState(), dist_info)

    @classmethod
    def resume(cls, run_dir: Path, device: Optional[str] = None,
               splits: Optional[DataSplits] = None, dist_info: DistInfo = SINGLE) -> "Trainer":
        data = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
        cfg = from_dict(data["config"])
        dev = resolve_device(device or cfg.train.device)
        splits = splits or load_data(cfg)
        model = make_model(cfg, splits.spec)
        ckpt.load_model_state(model, data["model"])
        model.to(dev)
        set_kernel(model, cfg.train.kernel)
        optimizer = make_optimizer(model, cfg)
        optimizer.load_state_dict(data["optimizer"])
        trainer = cls(cfg, run_dir, dev, splits, model, optimizer, TrainState(**data["state"]), dist_info)
        ckpt.set_rng_state(data["rng"])
        distributed.fork_noise(dist_info)
        return trainer

    # -- schedules ---------------------------------------------------------------
    def kl_weight(self, step: int) -> float:
        b = self.cfg.bayes
        if not self.cfg.bayesian:
            return 0.0
        warm = min(2.0 * step / self.total_steps, 1.0) if b.kl_warmup else 1.0
        return b.beta * warm / self.n_train

    def lr_factor(self, step: int) -> float:
        if self.cfg.optim.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))

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
        # drawing from the global RNG instead would shift the noise stream of a resumed run.
        loader = torch.utils.data.DataLoader(self.splits.train, batch_sampler=batch_sampler,
                                             num_workers=self.cfg.train.num_workers,
                                             pin_memory=self.device.type == "cuda", generator=gen)
        yield from loader

    # -- one step ------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor, batch_total: Optional[int] = None) -> dict[str, float]:
        """One minibatch: a parameter update, or (every delta_t steps) a subspace update.

        ``x, y`` is this rank's shard of a global minibatch of ``batch_total`` samples.
        """
        cfg, model, t = self.cfg, self.model, self.state.step
        batch_total = batch_total or len(y) * self.dist.world_size
        moves = cfg.moves_support
        capture = moves and self.schedule.captures(t)
        update = moves and self.schedule.is_update(t)
        model.train()
        set_mode(model, "mean" if capture and cfg.sparse.addition == "mean" else "lrt")
        begin_capture(model, capture)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.lr_factor(t)
        # A capture step runs outside DDP: mu's gradient comes from the dense leaf, which DDP cannot
        # see, so that step averages its gradients itself (sync_grads below).
        net = model if capture else self.net
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = net(x)
        nll = F.cross_entropy(logits.float(), y)
        # Ranks' gradients are averaged; weighting this rank's mean by its share of the global batch
        # makes the average exactly the single-process gradient, also for shards of unequal size.
        share = len(y) * self.dist.world_size / batch_total
        kl = sum((layer.kl(cfg.bayes.prior_sigma) for _, layer in sparse_layers(model)),
                 torch.zeros((), device=x.device))
        weight = self.kl_weight(t)
        loss = nll * share + weight * kl
        self._check_finite(nll, kl, loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if capture:
            self._captured += 1
            collect_captured(model, self._accumulated, self._captured, self.scaler.get_scale())
        begin_capture(model, False)
        set_mode(model, "lrt")
        report: Optional[SwapReport] = None
        if update:
            report = subspace_step(model, t, self.schedule, cfg.sparse.criterion,
                                   cfg.sparse.criterion_lambda, cfg.sparse.new_sigma,
                                   self.optimizer, self.grad_reduce)
            distributed.verify_supports(model, t)
            self._accumulated.clear()
            self._captured = 0
            self.state.subspace_steps += 1
            if self.is_main:
                fileio.append_jsonl(self.run_dir / SUPPORT_FILE, {
                    "step": t, "fraction": report.fraction,
                    "layers": {l.name: {"active": l.active, "dropped": l.dropped, "swapped": l.swapped,
                                        "iou": l.iou} for l in report.layers}})
        else:
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

    def _check_finite(self, nll: Tensor, kl: Tensor, loss: Tensor) -> None:
        if torch.isfinite(loss):
            return
        term = "the data term (cross-entropy)" if not torch.isfinite(nll) else "the KL term"
        self._diverged(f"non-finite loss at step {self.state.step} (epoch {self.state.epoch + 1}) in {term}")

    def _check_finite_state(self) -> None:
        """A checkpoint never replaces a good one with a diverged model (NaN/inf in any tensor)."""
        epoch = self.state.epoch + (1 if self.state.batch_in_epoch else 0)  # the epoch of that step
        for name, value in self.model.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                self._diverged(f"non-finite values in {name} after step {self.state.step} "
                               f"(epoch {epoch}); the diverged model was not saved")

    def _diverged(self, what: str) -> None:
        last = ckpt.list_checkpoints(self.run_dir)
        kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise TrainingError(f"{what}; {kept}. Try a lower learning rate (--lr) or a larger bayes.prior_sigma")

    # -- the loop ------------------------------------------------------------------
    def fit(self, progress: Optional[Progress] = None) -> dict[str, Any]:
        """Train to the configured number of epochs (from wherever the state is)."""
        progress = progress or Progress()
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fileio.write_text(self.run_dir / CONFIG_FILE, dump_yaml(cfg))
        with self._stop_signals_checkpoint():
            while self.state.epoch < cfg.train.epochs:
                self._run_epoch(progress)
        return self.finish()

    def _run_epoch(self, progress: Progress) -> None:
        epoch = self.state.epoch
        stats = EpochStats()
        if progress.on_epoch_start:
            progress.on_epoch_start(epoch, self.steps_per_epoch - self.state.batch_in_epoch)
        sizes = [len(b) for b in self.epoch_plan(epoch)[0][self.state.batch_in_epoch:]]
        started = time.perf_counter()
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
            if distributed.any_rank(self.stop_requested, self.device):  # all ranks stop at one step
                self.save()
                raise Interrupted(self.run_dir, self.state.step, self.stop_signal)
        self.train_seconds += time.perf_counter() - started
        distributed.average_buffers(self.model)
        stats.loss, stats.nll, stats.correct, stats.seen = distributed.sum_values(
            [stats.loss, stats.nll, stats.correct, stats.seen], self.device)
        record = self._epoch_record(stats)
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        if self.is_main:
            fileio.append_jsonl(self.run_dir / METRICS_FILE, record)
        if self.state.epoch % self.cfg.train.checkpoint_every == 0 or self.state.epoch == self.cfg.train.epochs:
            self.save()
        if progress.on_epoch_end:
            progress.on_epoch_end(record)

    def _epoch_record(self, stats: EpochStats) -> dict[str, Any]:
        val = self.evaluate_split("val", mode="mean") if len(self.splits.val) and self.is_main else {}
        dens = density_report(self.model)
        n = max(stats.seen, 1)
        return {
            "epoch": self.state.epoch + 1,
            "step": self.state.step,
            "loss": stats.loss / n,
            "nll": stats.nll / n,
            "kl": stats.kl,
            "kl_weight": self.kl_weight(self.state.step),
            "lr": self.cfg.optim.lr * self.lr_factor(self.state.step),
            "train_accuracy": stats.correct / n,
            "val_accuracy": val.get("accuracy"),
            "val_nll": val.get("nll"),
            "density": dens["density"],
            "layer_density": dens["layers"],
            "drop_fraction": self.schedule.drop_fraction(self.state.step) if self.cfg.moves_support else 0.0,
            "subspace_steps": self.state.subspace_steps,
            "swapped": stats.swapped,
            "seconds": time.perf_counter() - stats.started,
            "samples_per_second": self.throughput(),
        }

    @contextmanager
    def _stop_signals_checkpoint(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) or SIGTERM, as a batch scheduler sends before it kills a job, finishes the
        current step, writes a checkpoint and raises :class:`Interrupted`.

        A repeated signal does not cut the step short: under ``--nproc`` each rank gets Ctrl-C twice
        (from the terminal, then forwarded by the launcher), and both must lead to the checkpoint.
        """
        def handler(signum, frame):  # noqa: ARG001
            self.stop_requested = True
            self.stop_signal = signal.Signals(signum)

        previous: dict[int, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- persistence -----------------------------------------------------------------
    def throughput(self) -> Optional[float]:
        """Training samples per second over all ranks (training steps only, no evaluation)."""
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else None

    def save(self) -> Optional[Path]:
        distributed.average_buffers(self.model)  # every rank: the checkpoint holds the ranks' mean
        self._check_finite_state()
        if not self.is_main:
            return None
        payload = {
            "config": self.cfg.to_dict(),
            "data_spec": self.splits.spec.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.to_dict(),
            "rng": ckpt.rng_state(),
        }
        return ckpt.save_checkpoint(self.run_dir, self.state.step, payload, self.cfg.train.keep_checkpoints)

    # -- evaluation -------------------------------------------------------------------
    def loader(self, split: str, batch_size: int = 512) -> torch.utils.data.DataLoader:
        dataset = getattr(self.splits, split)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                           num_workers=self.cfg.train.num_workers)

    def evaluate_split(self, split: str, mode: str = "mc", samples: Optional[int] = None) -> dict[str, Any]:
        """Accuracy and NLL of the mean network or the Monte Carlo model average on a split."""
        from ssvi_cli.metrics import accuracy, nll

        rng = torch.get_rng_state()  # evaluation must not shift the training noise stream
        try:
            out = predict_loader(self.model, self.loader(split), self.device,
                                 samples or self.cfg.train.eval_samples, mode, keep_samples=False)
        finally:
            torch.set_rng_state(rng)
            set_mode(self.model, "lrt")
        probs, labels = out["probs"], out["labels"]
        return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "n": len(labels),
                "mode": mode, "samples": samples or self.cfg.train.eval_samples if mode == "mc" else None}

    def finish(self) -> dict[str, Any]:
        """Final test metrics, density and the compact model file; writes ``summary.json``."""
        cfg = self.cfg
        mode = "mc" if cfg.bayesian else "mean"
        torch.manual_seed(cfg.train.seed)
        test = self.evaluate_split("test", mode=mode)
        test_mean = self.evaluate_split("test", mode="mean") if cfg.bayesian else test
        dens = density_report(self.model)
        summary = {
            "run_dir": str(self.run_dir),
            "method": cfg.sparse.method,
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "sparsity": cfg.sparse.sparsity if cfg.density < 1 else 0.0,
            "density": dens["density"],
            "active_weights": dens["active"],
            "total_weights": dens["total"],
            "epochs": self.state.epoch,
            "steps": self.state.step,
            "subspace_steps": self.state.subspace_steps,
            "world_size": self.dist.world_size,
            "global_batch": self.state.global_batch,
            "precision": cfg.train.precision,
            "samples_per_second": self.throughput(),
            "test_accuracy": test["accuracy"],
            "test_nll": test["nll"],
            "test_mode": mode,
            "test_samples": test["samples"],
            "test_accuracy_mean_net": test_mean["accuracy"],
            "test_nll_mean_net": test_mean["nll"],
        }
        summary.update(training_summary(self.model, self.splits.spec.input_shape, cfg.sparse.method,
                                        examples=self.n_train * self.state.epoch,
                                        batch_size=cfg.train.batch_size,
                                        captures=self.state.subspace_steps * self.schedule.accumulate))
        if self.is_main:
            from ssvi_cli.export import write_model_file

            model_path = self.run_dir / MODEL_FILE
            summary["model_file"] = str(model_path)
            summary["model_file_bytes"] = write_model_file(self.model, model_path, **self.file_metadata(summary))
            fileio.write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary

    def file_metadata(self, metrics: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "architecture": {"name": cfg.model.name, "widths": list(cfg.model.widths),
                             "bayesian": cfg.bayesian, "sigma_param": cfg.bayes.sigma_param},
            "data_spec": self.splits.spec.to_dict(),
            "training": {"method": cfg.sparse.method, "sparsity": cfg.sparse.sparsity,
                         "criterion": cfg.sparse.criterion, "epochs": cfg.train.epochs,
                         "seed": cfg.train.seed, "config": cfg.to_dict()},
            "metrics": metrics,
        }


def load_data(cfg: Config) -> DataSplits:
    d = cfg.data
    return build_dataset(d.name, data_dir=Path(d.data_dir).expanduser() if d.data_dir else None,
                         download=d.download, val_fraction=d.val_fraction, seed=cfg.train.seed,
                         augment=d.augment, max_train=d.max_train)
