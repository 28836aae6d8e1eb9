import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ssvi_cli import config as C
from ssvi_cli.data import DataSplits, get_spec
from ssvi_cli.training.trainer import Trainer
from ssvi_cli.training.plan import RunPlan, init_model, make_model
from ssvi_cli.training.optim import make_optimizer
from ssvi_cli.training.records import TrainState, trainable_bytes
from ssvi_cli.core.layers import sparse_layers


def digits_cfg(**over) -> C.Config:
    base = {"train.epochs": 3, "sparse.delta_t": 5, "train.eval_samples": 2}
    base.update(over)
    return C.apply_overrides(C.load_preset("digits_mlp"), base)


def test_active_counts_exact_after_every_optimizer_and_subspace_step(tmp_path: Path):
    cfg = digits_cfg(**{"sparse.sparsity": 0.95})
    trainer = Trainer.create(cfg, tmp_path / "run")
    targets = {n: l.active for n, l in sparse_layers(trainer.model)}
    assert all(0 < k < l.numel for (n, l), k in zip(sparse_layers(trainer.model), targets.values()))
    seen = {"optim": 0, "subspace": 0}
    supports = []

    def check(tr: Trainer, kind: str) -> None:
        seen[kind] += 1
        for name, layer in sparse_layers(tr.model):
            assert layer.active == targets[name]
            assert layer.mu.numel() == layer.rho.numel() == targets[name]
            assert torch.unique(layer.idx).numel() == targets[name]
            assert bool((layer.idx[1:] > layer.idx[:-1]).all())
            for p in (layer.mu, layer.rho):
                state = tr.optimizer.state.get(p, {})
                for v in state.values():
                    if v.dim() == 1:
                        assert v.numel() == targets[name]
        if kind == "subspace":
            supports.append(torch.cat([l.idx for _, l in sparse_layers(tr.model)]).clone())

    trainer.step_hooks.append(check)
    summary = trainer.fit()
    assert seen["subspace"] >= 3 and seen["optim"] > 20
    assert summary["subspace_steps"] == seen["subspace"]
    assert not torch.equal(supports[0], supports[-1])  # the support really moved
    assert abs(summary["density"] - 0.05) < 1e-4
    # Inactive positions have no stored mu/sigma at all: the model's tensors are only active entries.
    state = trainer.model.state_dict()
    assert sum(v.numel() for k, v in state.items() if k.endswith(".mu")) == sum(targets.values())


@pytest.mark.parametrize("method", ["ssvi", "vi", "static", "rigl", "dense"])
def test_every_method_trains_on_digits(tmp_path: Path, method: str):
    cfg = digits_cfg(**{"sparse.method": method, "train.epochs": 2})
    summary = Trainer.create(cfg, tmp_path / method).fit()
    assert summary["test_accuracy"] > 0.5
    if method in ("vi", "dense"):
        assert summary["density"] == 1.0
    else:
        assert summary["density"] < 0.11
    bayes = method in ("ssvi", "vi", "static")
    assert summary["test_mode"] == ("mc" if bayes else "mean")
    assert (tmp_path / method / "model.safetensors").is_file()
    assert (tmp_path / method / "metrics.jsonl").is_file()


@pytest.mark.parametrize("addition", ["mean", "accumulate:2"])
def test_the_mean_estimator_scores_additions_at_mu(tmp_path: Path, addition: str):
    """sparse.addition=mean runs each capture step's forward at theta = mu, every other step on LRT
    draws (no other test of the trainer set it)."""
    cfg = digits_cfg(**{"sparse.addition": addition, "train.epochs": 2, "data.max_train": 640})
    trainer = Trainer.create(cfg, tmp_path / "run")
    seen: list[tuple[int, str]] = []

    def record(layer, args):
        if layer.training:
            seen.append((trainer.state.step, layer.mode))
    sparse_layers(trainer.model)[0][1].register_forward_pre_hook(record)
    trainer.fit()
    captured = {t for t, _ in seen if trainer.schedule.captures(t)}
    assert len(seen) == len({t for t, _ in seen}) and len(captured) >= 2  # one forward per step
    assert {t for t, mode in seen if mode == "mean"} == (captured if addition == "mean" else set())
    assert {mode for _, mode in seen} <= {"lrt", "mean"}


def test_static_never_moves_support(tmp_path: Path):
    cfg = digits_cfg(**{"sparse.method": "static", "train.epochs": 2})
    trainer = Trainer.create(cfg, tmp_path / "s")
    before = [l.idx.clone() for _, l in sparse_layers(trainer.model)]
    trainer.fit()
    assert all(torch.equal(a, l.idx) for a, (_, l) in zip(before, sparse_layers(trainer.model)))


def _one_step_bytes(method: str, tmp_path: Path) -> int:
    cfg = C.apply_overrides(C.load_preset("cifar10_resnet18"),
                            {"sparse.method": method, "sparse.sparsity": 0.95, "train.batch_size": 4,
                             "train.epochs": 1})
    spec = get_spec("cifar10")
    ds = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    splits = DataSplits(ds, ds, ds, spec)
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    plan = RunPlan.new(cfg, tmp_path / method, splits=splits, device="cpu")
    trainer = Trainer(plan, model, make_optimizer(model, cfg), TrainState())
    x, y = next(iter(trainer.batches(0)))
    trainer.train_step(x, y)
    sizes = trainable_bytes(model, trainer.optimizer)
    assert sizes["grads"] > 0 and sizes["optimizer"] > 0
    return sizes["total"]


def test_resnet18_trainable_state_at_095_is_under_8_percent_of_dense_vi(tmp_path: Path):
    ssvi = _one_step_bytes("ssvi", tmp_path)
    dense = _one_step_bytes("vi", tmp_path)
    assert ssvi / dense <= 0.08, (ssvi, dense)


def test_fp16_training_skips_an_overflowed_remove_and_add_step(tmp_path: Path, caplog):
    trainer = Trainer.create(digits_cfg(**{"train.precision": "fp16", "sparse.addition": "accumulate:2"}),
                             tmp_path / "run")
    (tmp_path / "run").mkdir(exist_ok=True)  # fit() makes it; these steps run without fit()
    x, y = next(iter(trainer.batches(0)))
    for _ in range(4):  # steps 0-3; step 4 is a capture step (accumulate:2), step 5 a subspace step
        trainer.train_step(x, y)
    supports = [l.idx.clone() for _, l in sparse_layers(trainer.model)]
    trainer.scaler.update(1e38)  # the scaled loss fits float32, its fp16 gradients overflow
    with caplog.at_level("WARNING"):
        trainer.train_step(x, y)  # capture: the optimizer step is skipped by the scaler itself
        trainer.scaler.update(1e38)
        out = trainer.train_step(x, y)
    assert out["swapped"] == 0 and trainer.state.subspace_steps == 0
    assert all(torch.equal(a, l.idx) for a, (_, l) in zip(supports, sparse_layers(trainer.model)))
    assert trainer.scaler.get_scale() == pytest.approx(0.5e38)
    assert "step 5: the dense gradient held inf/NaN; this remove-and-add step was skipped" in caplog.text
    trainer.scaler.update(1024.0)
    for _ in range(5):  # steps 6-10: the next remove-and-add step (10) runs on finite gradients
        out = trainer.train_step(x, y)
    assert trainer.state.subspace_steps == 1 and out["swapped"] > 0
    records = (tmp_path / "run" / "support.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [10]  # the skipped step left no record


@pytest.mark.parametrize("builder, size", [("googlenet", 32), ("inception_v3", 80)])
def test_networks_with_auxiliary_classifiers_train_on_their_main_logits(tmp_path: Path, builder, size):
    # torchvision builds them with auxiliary heads whose training-mode output is a tuple; ssvi's
    # builder leaves the heads out, so a training step sees plain logits.
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"model.name": f"torchvision:{builder}",
                                                          "train.batch_size": 2, "train.epochs": 1})
    spec = get_spec("digits")
    spec = type(spec)("tiny", (3, size, size), 10, spec.class_names, (0.0,) * 3, (1.0,) * 3)
    ds = TensorDataset(torch.randn(2, 3, size, size), torch.tensor([1, 7]))
    plan = RunPlan.new(cfg, tmp_path / builder, splits=DataSplits(ds, ds, ds, spec), device="cpu")
    model = plan.build_model()
    init_model(model, cfg, torch.Generator().manual_seed(0))
    trainer = Trainer(plan, model, make_optimizer(model, cfg), TrainState())
    assert not any(name.startswith(("aux", "AuxLogits")) for name, _ in model.named_children())
    x, y = next(iter(trainer.batches(0)))
    out = trainer.train_step(x, y)
    assert math.isfinite(out["loss"])


def test_an_epochs_record_gives_the_rates_its_last_step_ran_with(tmp_path: Path):
    """metrics.jsonl gave the learning rate, KL weight and drop fraction of the step after the epoch:
    the last epoch's lr read 0.0, a rate no step used, and epoch 1's the second epoch's first."""
    cfg = digits_cfg(**{"train.epochs": 2, "data.max_train": 200, "model.widths": [32], "sparse.delta_t": 2})
    trainer = Trainer.create(cfg, tmp_path / "run")
    used: dict[int, tuple[float, float]] = {}
    trainer.step_hooks.append(lambda tr, kind: used.__setitem__(
        tr.state.step - 1, (tr.optimizer.param_groups[0]["lr"], tr.kl_weight(tr.state.step - 1))))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["lr"] > 0
    for r in records:
        lr, weight = used[r["step"] - 1]
        assert r["lr"] == pytest.approx(lr) and r["kl_weight"] == pytest.approx(weight)
        assert r["drop_fraction"] == pytest.approx(trainer.schedule.drop_fraction(r["step"] - 1))
