"""What a run reports: the per-epoch record (``metrics.jsonl``), validation and test metrics, and the
final summary with the model file it writes (``summary.json``, ``model.safetensors``).

Checkpoints are never chosen on the test split: the final model is the last epoch, and per-epoch
numbers use the validation split carved from the training data.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

import torch

from ssvi_cli.config import DELTA_T_AUTO
from ssvi_cli.core.flops import training_summary
from ssvi_cli.modelfile import ModelCard, write_model_file
from ssvi_cli.prediction import NonFiniteOutput, predict_pass
from ssvi_cli.runs.provenance import provenance
from ssvi_cli.training import distributed
from ssvi_cli.training.optim import lr_factor
from ssvi_cli.training.records import EpochStats, Progress, density_report

if TYPE_CHECKING:
    from ssvi_cli.training.trainer import Trainer


def evaluate_split(trainer: "Trainer", split: str, mode: str = "mc", samples: Optional[int] = None) -> dict[str, Any]:
    """Accuracy and NLL of the mean network or the Monte Carlo model average on a split: the pass
    ``ssvi evaluate`` makes (:func:`~ssvi_cli.prediction.predict_pass`: its seed and batching, the
    global RNG left as it was, so the training noise stream does not shift)."""
    from ssvi_cli.metrics import accuracy, nll

    samples = samples or trainer.cfg.train.eval_samples
    try:
        out = predict_pass(trainer.model, getattr(trainer.splits, split), trainer.device, samples, mode,
                           keep_samples=False, num_workers=trainer.cfg.train.num_workers)
    except NonFiniteOutput:  # a diverged model: the checkpoint check after this record names what diverged
        nan = float("nan")
        return {"accuracy": nan, "nll": nan, "n": len(getattr(trainer.splits, split)), "mode": mode,
                "samples": samples if mode == "mc" else None}
    probs, labels = out["probs"], out["labels"]
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "n": len(labels),
            "mode": mode, "samples": samples if mode == "mc" else None}


def epoch_record(trainer: "Trainer", stats: EpochStats) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of the epoch that just ended (before the epoch counter moves): its
    learning rate, KL weight and drop fraction are those its last step ran with (``step`` counts the
    steps done, so that step's index is ``step - 1``)."""
    state, cfg = trainer.state, trainer.cfg
    last = max(state.step - 1, 0)
    val = evaluate_split(trainer, "val", mode="mean") if len(trainer.splits.val) and trainer.is_main else {}
    dens = density_report(trainer.model)
    n = max(stats.seen, 1)
    return {
        "epoch": state.epoch + 1,
        "step": state.step,
        "loss": stats.loss / n,
        "nll": stats.nll / n,
        "kl": stats.kl,
        "kl_weight": trainer.kl_weight(last),
        "lr": cfg.optim.lr * lr_factor(cfg, last, trainer.total_steps),
        "train_accuracy": stats.correct / n,
        "val_accuracy": val.get("accuracy"),
        "val_nll": val.get("nll"),
        "density": dens["density"],
        "layer_density": dens["layers"],
        "drop_fraction": trainer.schedule.drop_fraction(last) if cfg.method.moves_support else 0.0,
        "subspace_steps": state.subspace_steps,
        "swapped": stats.swapped,
        "seconds": time.perf_counter() - stats.started,
        "samples_per_second": throughput(trainer),
        "threads": cpu_threads(trainer),  # a CPU run's numbers move in their last digits with it
    }


def throughput(trainer: "Trainer") -> Optional[float]:
    """Training samples per second over all ranks (training steps only, no evaluation)."""
    return trainer.samples_seen / trainer.train_seconds if trainer.train_seconds > 0 else None


def cpu_threads(trainer: "Trainer") -> Optional[int]:
    """The CPU threads a run trains on (None on a GPU, whose numbers do not depend on them)."""
    return torch.get_num_threads() if trainer.device.type == "cpu" else None


def finish(trainer: "Trainer", progress: Progress) -> dict[str, Any]:
    """Final test metrics, density and the compact model file; writes ``summary.json``. ``progress``
    hears when the final evaluation starts; ``trainer.stop_during`` names the phase for a stop."""
    cfg, state = trainer.cfg, trainer.state
    bayesian = cfg.method.bayesian
    mode = "mc" if bayesian else "mean"
    trainer.stop_during = "the final evaluation"
    if progress.on_phase:
        n = cfg.train.eval_samples
        draws = f" ({n} weight draw{'s' * (n != 1)}, then the mean network)" if bayesian else ""
        progress.on_phase(f"final evaluation on {len(trainer.splits.test):,} test images{draws}")
    test = evaluate_split(trainer, "test", mode=mode)
    test_mean = evaluate_split(trainer, "test", mode="mean") if bayesian else test
    dens = density_report(trainer.model)
    summary = {
        "run_dir": str(trainer.run_dir),
        "method": cfg.sparse.method,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "images": trainer.splits.sizes(),  # per split
        "init_from": cfg.model.init_from,  # what the run started from (its FLOPs are not counted)
        "sparsity": cfg.sparse.sparsity if cfg.density < 1 else 0.0,
        "density": dens["density"],
        "active_weights": dens["active"],
        "total_weights": dens["total"],
        "kept_dense_weights": dens["kept_dense"],  # outside the sparse layers (embeddings, Swin's attention projections)
        "epochs": state.epoch,
        "steps": state.step,
        "subspace_steps": state.subspace_steps,
        # The spacing used (sparse.delta_t resolved; "auto" depends on the run's length), None when
        # the method never moves the support.
        "delta_t": trainer.schedule.delta_t if cfg.method.moves_support else None,
        "delta_t_auto": cfg.sparse.delta_t == DELTA_T_AUTO,
        "world_size": trainer.dist.world_size,
        "global_batch": state.global_batch,
        "precision": cfg.train.precision,
        "samples_per_second": throughput(trainer),
        "threads": cpu_threads(trainer),
        "seed": cfg.train.seed,
        "provenance": provenance(trainer.device),  # the versions and the processor or GPU: what moves the numbers
        "test_accuracy": test["accuracy"],
        "test_nll": test["nll"],
        "test_mode": mode,
        "test_samples": test["samples"],
        "test_accuracy_mean_net": test_mean["accuracy"],
        "test_nll_mean_net": test_mean["nll"],
    }
    summary.update(training_summary(trainer.model, trainer.splits.spec.input_shape, cfg.method,
                                    examples=epoch_examples(trainer) * state.epoch, batch_size=state.global_batch,
                                    captures=state.subspace_steps * trainer.schedule.accumulate))
    if trainer.is_main:
        run = trainer.run
        trainer.stop_during = "the writing of the model file and summary"
        summary["model_file"] = str(run.model_file)
        summary["model_file_bytes"] = write_model_file(trainer.model, run.model_file, card(trainer, summary))
        run.write_summary(summary)
    return summary


def card(trainer: "Trainer", metrics: dict[str, Any]) -> ModelCard:
    """The model card of the run with ``metrics``, but its throughput (``summary.json`` keeps it): the
    machine's speed of the moment would make two runs of one model two files of other bytes."""
    return trainer.plan.card.with_metrics({k: v for k, v in metrics.items() if k != "samples_per_second"})


def epoch_examples(trainer: "Trainer") -> int:
    """The examples an epoch trains on: the training split less a last partial batch too small to
    give every process two (``distributed.global_batches``), which is dropped."""
    batches = distributed.global_batches(torch.arange(trainer.n_train), trainer.state.global_batch,
                                         trainer.dist.world_size)
    return sum(len(b) for b in batches)
