import math

import pytest
import torch

from ssvi_cli.core.allocation import layer_densities
from ssvi_cli.core.flops import CONVENTION, method_layers, model_geometry, prediction_flops, recipe_flops, subspace_captures, training_summary
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.models import LayerFactory, build_architecture
from ssvi_cli.core.subspace import Schedule


def tiny_mlp():
    # 6 inputs -> 4 hidden -> 3 classes: 24 + 12 weights
    return build_architecture("mlp", (1, 2, 3), 3, LayerFactory(bayesian=True), widths=(4,))


def test_hand_count_small_mlp():
    model = tiny_mlp()
    geom = model_geometry(model, (1, 2, 3))
    assert [(g.numel, g.positions) for g in geom] == [(24, 1), (12, 1)]
    dens = {g.name: 0.5 for g in geom}
    vi = method_layers(geom, "vi")
    # LRT forward = 2 ops x 2 FLOPs x 36 weights; backward twice that
    assert sum(l.forward for l in vi) == 144 and sum(l.backward for l in vi) == 288
    det = method_layers(geom, "dense")
    assert sum(l.train for l in det) == 3 * 2 * 36
    ssvi = method_layers(geom, "ssvi", dens)
    assert [l.active for l in ssvi] == [12, 6]
    assert sum(l.train for l in ssvi) == 3 * 2 * 2 * 18
    assert sum(l.dense_grad for l in ssvi) == 2 * 36
    # 10 examples, batch 5 -> 2 steps/epoch, 100 epochs -> 200 steps; T_end 150; dT 10 -> 14 updates
    total = recipe_flops(geom, "ssvi", dens, n_train=10, epochs=100, batch_size=5, delta_t=10, t_end=0.75)
    assert total.captures == 14
    assert total.total == 1000 * 216 + 14 * 5 * 72
    static = recipe_flops(geom, "static", dens, n_train=10, epochs=100, batch_size=5, delta_t=10, t_end=0.75)
    assert static.captures == 0 and static.total == 1000 * 216


def test_conv_positions_lenet5():
    model = build_architecture("lenet5", (1, 28, 28), 10, LayerFactory(bayesian=True))
    geom = {g.name: g for g in model_geometry(model, (1, 28, 28))}
    assert geom["first"].positions == 28 * 28 and geom["first"].numel == 6 * 25 and geom["first"].stem
    assert geom["conv2"].positions == 10 * 10 and geom["conv2"].numel == 16 * 6 * 25
    assert geom["fc1"].positions == 1 and geom["fc1"].numel == 400 * 120
    # prediction samples a conv first layer's weights per draw (its moments are exact only for a
    # linear layer): counted S times, as every other layer
    assert not geom["first"].first
    rows = {r["layer"]: r for r in prediction_flops(list(geom.values()), {}, bayesian=True, samples=10)}
    assert rows["first"]["flops"] == 10 * rows["first"]["per_op"]


@pytest.mark.parametrize("delta_t,t_end,total,acc", [(100, 750, 1000, 1), (10, 95, 200, 3), (7, 1, 50, 1)])
def test_captures_match_schedule(delta_t, t_end, total, acc):
    sched = Schedule(delta_t, 0.3, t_end, acc)
    updates = sum(sched.is_update(t) for t in range(total))
    captures = sum(sched.captures(t) for t in range(total))
    assert subspace_captures(total, delta_t, t_end, acc) == updates * acc == captures


def test_resnet18_paper_recipe_is_over_10x_below_dense_vi():
    model = build_architecture("resnet18", (3, 32, 32), 10, LayerFactory(bayesian=True))
    geom = model_geometry(model, (3, 32, 32))
    dens = layer_densities(sparse_layers(model), 0.05, "uniform", dense_stem=True)
    kw = dict(n_train=50_000, epochs=200, batch_size=128, delta_t=100, t_end=0.75)  # the cifar10_resnet18 preset's
    ssvi = recipe_flops(geom, "ssvi", dens, **kw)
    vi = recipe_flops(geom, "vi", None, **kw)
    # CIFAR ResNet-18: ~0.56 GMACs per example, so dense VI trains with ~12 x 0.556e9 FLOPs per example
    assert vi.per_example == pytest.approx(12 * 0.556e9, rel=0.02)
    assert vi.total / ssvi.total >= 10
    assert ssvi.captures == (int(0.75 * 391 * 200) - 1) // 100 == 586  # 391 steps an epoch


def test_prediction_flops_reuse_first_layer():
    model = tiny_mlp()
    geom = model_geometry(model, (1, 2, 3))
    rows = prediction_flops(geom, {"first": 0.5, "hidden.0": 0.5}, bayesian=True, samples=10)
    assert [r["flops"] for r in rows] == [2 * 2 * 12, 10 * 2 * 6]
    mean = prediction_flops(geom, {"first": 0.5, "hidden.0": 0.5}, bayesian=True, samples=0)
    assert [r["flops"] for r in mean] == [2 * 12, 2 * 6]


def test_training_summary_reads_the_models_support():
    model = tiny_mlp()
    for _, layer in sparse_layers(model):
        k = layer.numel // 4
        layer.set_support(torch.arange(k), torch.zeros(k), torch.zeros(k))
    out = training_summary(model, (1, 2, 3), "ssvi", examples=100, batch_size=10, captures=2)
    assert out["training_flops"] == 100 * 3 * 2 * 2 * 9 + 2 * 10 * 2 * 36
    assert out["training_flops_dense_vi"] == 100 * 3 * 2 * 2 * 36
    assert math.isclose(out["training_flops_reduction_vs_vi"], out["training_flops_dense_vi"] / out["training_flops"])
    assert out["flops_convention"] == CONVENTION
    # the probe leaves the model's modes and kernels alone
    assert all(l.mode == "lrt" and l.kernel.name == "auto" for _, l in sparse_layers(model))


def test_inspect_reports_flops_per_prediction(tmp_path):
    from ssvi_cli.modelfile import ModelCard, write_model_file
    from ssvi_cli.evaluation.inspection import inspect_model

    model = tiny_mlp()
    for _, layer in sparse_layers(model):
        k = layer.numel // 2
        layer.set_support(torch.arange(k), torch.randn(k), torch.zeros(k))
    spec = {"name": "toy", "input_shape": [1, 2, 3], "num_classes": 3, "class_names": ["a", "b", "c"],
            "mean": [0.0], "std": [1.0]}
    path = tmp_path / "m.safetensors"
    card = ModelCard.from_metadata({"architecture": {"name": "mlp", "widths": [4], "bayesian": True,
                                                     "sigma_param": "softplus"},
                                    "data_spec": spec, "training": {"config": {"train": {"eval_samples": 5}}}})
    write_model_file(model, path, card)
    report = inspect_model(path)
    # first layer: two LRT ops once over 12 active weights; hidden: 5 draws x one op over 6
    assert [l["flops_per_prediction"] for l in report["layers"]] == [2 * 2 * 12, 5 * 2 * 6]
    assert report["flops"]["per_prediction"] == 48 + 60 and report["flops"]["samples"] == 5


def test_the_geometry_of_a_layer_too_large_to_densify_allocates_nothing():
    """inspect counts FLOPs at the input size a file's header names: a 143 KB file claiming a
    (512, N*N) first layer made it build that dense weight (4.5 GB at N = 1000). Only shapes are needed."""
    from ssvi_cli.core.layers import SparseLinear

    layer = SparseLinear(1 << 26, 512, bayesian=True)  # 128 GiB as a dense float32 weight
    model = torch.nn.Sequential(torch.nn.Flatten(), layer)
    (geometry,) = model_geometry(model, (1, 1 << 13, 1 << 13))
    assert geometry.positions == 1 and geometry.numel == 1 << 35
    # a model the meta device cannot run is probed on the CPU
    class NoMeta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = SparseLinear(8, 3, bayesian=True)

        def forward(self, x):
            if x.is_meta:
                raise NotImplementedError("no meta kernel")
            return self.fc(x)

    assert [g.positions for g in model_geometry(NoMeta(), (8,))] == [1]


def test_an_mlps_shapes_need_no_probing_forward(monkeypatch):
    """The first meta-device forward in a process costs 1.5-2 s (torch loads its compiler): an MLP's
    layers apply once per example, so inspect and the training summary count without one; a model
    whose input does not fit is still probed, and refused by the probe."""
    from ssvi_cli import models
    from ssvi_cli.core import flops

    mlp = build_architecture("mlp", (1, 8, 8), 10, LayerFactory(bayesian=True), widths=(16, 16))
    probed = [g.positions for g in model_geometry(mlp, (1, 8, 8))]
    assert probed == [1, 1, 1]
    monkeypatch.setattr(flops, "_probe", lambda *a: pytest.fail("probed"))
    assert [g.positions for g in model_geometry(mlp, (1, 8, 8))] == probed
    assert models.input_error(mlp.to("meta"), (1, 8, 8)) is None
    monkeypatch.undo()
    assert "shapes cannot be multiplied" in models.input_error(mlp, (1, 8, 9))
    lenet = build_architecture("lenet5", (1, 28, 28), 10, LayerFactory(bayesian=True))
    monkeypatch.setattr(flops, "_probe", lambda *a: pytest.fail("probed"))
    with pytest.raises(pytest.fail.Exception):
        model_geometry(lenet, (1, 28, 28))


def test_the_training_flops_leave_out_a_dropped_last_batch(tmp_path):
    """An epoch of 129 examples in batches of 64 trains on 128 (a last batch of one is dropped):
    the count said 129, and under --nproc a last batch too small for every process likewise."""
    from ssvi_cli import config as C
    from ssvi_cli.training.trainer import Trainer

    flops = {}
    for n in (128, 129):
        cfg = C.apply_overrides(C.load_preset("digits_mlp"), {
            "sparse.method": "vi", "data.max_train": n, "data.val_fraction": 0.0, "model.widths": [16],
            "train.epochs": 2, "train.batch_size": 64, "train.eval_samples": 1})
        trainer = Trainer.create(cfg, tmp_path / str(n))
        assert trainer.n_train == n
        flops[n] = trainer.fit()["training_flops"]
    assert flops[129] == flops[128]


def test_a_module_without_forward_rest_samples_its_first_layer_as_predict_does():
    """A user's module with an attribute named first (and no forward_rest) had that layer counted as
    a first layer whose moments are reused, where predict samples every one of its layers per draw."""
    import ssvi_cli as ssvi

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.head = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.head(torch.relu(self.first(x.flatten(1))))

    class Split(Net):  # first and forward_rest, but no prepare: SSVIModel's forward is not its own
        def forward_rest(self, h):
            return self.head(torch.relu(h))

    x = torch.randn(3, 1, 8, 8)
    for net in (Net(), Split()):
        ssvi.sparsify(net, sparsity=0.5)
        assert [g.first for g in model_geometry(net, (1, 8, 8))] == [False, False]
        assert ssvi.predict(net, x, samples=3).probs.shape == (3, 10)
    mlp = build_architecture("mlp", (1, 8, 8), 10, LayerFactory(bayesian=True), widths=(32,))
    assert [g.first for g in model_geometry(mlp, (1, 8, 8))] == [True, False]  # an SSVIModel's: reused
