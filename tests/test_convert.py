"""sparsify(): any nn.Module as a sparse BNN, from its trained weights."""

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

import ssvi_cli as ssvi
from ssvi_cli.core.allocation import active_count
from ssvi_cli.core.conv import SparseConv2d
from ssvi_cli.core.convert import sparsify
from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.core.modes import capturing_dense_grad, sampling
from ssvi_cli.core.subspace import Schedule, collect_captured, subspace_step


class Custom(nn.Module):
    """Every Conv2d geometry torchvision uses, plus modules that must stay as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.stem = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2))
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.pointwise = nn.Conv2d(8, 6, 1, stride=2)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6 + 4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x, tokens):
        h = torch.relu(self.bn(self.stem(x)))
        h = self.pointwise(self.depthwise(self.grouped(h)))
        h = self.norm(h.mean((2, 3)))
        return self.head(torch.cat([h, self.embed(tokens).mean(1)], 1)) * self.scale


def mean_forward(model, *args):
    with torch.no_grad(), sampling(model, "mean"):
        return model.eval()(*args)


def test_at_sparsity_zero_the_converted_model_computes_the_original():
    torch.manual_seed(0)
    for original, args in ((Custom(), (torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 3)))),
                           (torchvision.models.resnet18(num_classes=10), (torch.randn(2, 3, 32, 32),))):
        original.eval()
        converted = copy.deepcopy(original)
        report = sparsify(converted, 0.0)
        assert not [m for m in converted.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        torch.testing.assert_close(mean_forward(converted, *args), original(*args), atol=1e-5, rtol=1e-5)
        assert report.density == 1.0
    assert isinstance(converted.conv1, SparseConv2d) and converted.bn1.__class__ is nn.BatchNorm2d


def test_at_sparsity_09_it_computes_the_magnitude_pruned_original():
    torch.manual_seed(1)
    original = torchvision.models.resnet18(num_classes=10).eval()
    converted = copy.deepcopy(original)
    report = sparsify(converted, 0.9)
    pruned = copy.deepcopy(original)
    for name, module in pruned.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name != "conv1":  # the stem stays dense
            w = module.weight.data.reshape(-1)
            keep = torch.zeros_like(w, dtype=torch.bool)
            keep[torch.topk(w.abs(), active_count(w.numel(), 0.1)).indices] = True
            w[~keep] = 0.0
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(mean_forward(converted, x), pruned(x), atol=1e-5, rtol=1e-4)
    by_name = {l.name: l for l in report.layers}
    assert by_name["conv1"].dense and by_name["conv1"].active == by_name["conv1"].total
    assert by_name["fc"].active == active_count(512 * 10, 0.1)


def test_the_report_taken_for_the_model_says_to_pass_the_model():
    """``model = ssvi.sparsify(model)`` is the habit of libraries whose conversion returns the model:
    the report then met ``predict`` as "'ConversionReport' object has no attribute 'named_modules'"."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    report = ssvi.sparsify(model, sparsity=0.5)
    for use in (lambda: ssvi.predict(report, torch.rand(4, 8), samples=2), lambda: report.eval(),
                lambda: ssvi.param_groups(report, lr=0.01, lr_sigma=0.01), lambda: report.training,
                lambda: report.fc1):  # a module's attribute, an attribute annotation, a submodule's name
        with pytest.raises((AttributeError, TypeError),  # given where a model is asked for: a TypeError
                           match="converts the model in place and returns this report of it; pass the model"):
            use()
    assert ssvi.predict(model, torch.rand(4, 8), samples=2).probs.shape == (4, 3)
    again = copy.deepcopy(report)  # a report is still a plain dataclass to copy, compare and print
    assert again == report and again.density == report.density and not hasattr(report, "detach")
    assert "2 layers converted" in str(again)
    with pytest.raises(AttributeError) as typo:  # a near miss of the report's own: Python's error as it is
        report.layer
    assert "pass the model" not in str(typo.value) and typo.value.name == "layer"


def test_options_dense_deterministic_moped_and_the_report():
    torch.manual_seed(2)
    model = Custom()
    weight = model.head.weight.detach().clone()
    report = sparsify(model, 0.5, dense=["pointwise"], deterministic=["grouped"], moped_delta=0.1)
    layers = dict(sparse_layers(model))
    assert layers["pointwise"].active == layers["pointwise"].numel
    assert layers["grouped"].rho is None and not layers["grouped"].bayesian
    head = layers["head"]
    torch.testing.assert_close(head.sigma(), 0.1 * head.mu.abs(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head.mu.detach(), weight.reshape(-1)[head.idx])
    text = str(report)
    assert "stem" in text and "head" in text and "deterministic" in text
    # the density's scope is said: the converted layers' weights, not the model's
    total = sum(l.numel for _, l in sparse_layers(model))
    assert f"5 layers converted, density {report.density:.4f} over their {total:,} weights" in text
    assert {l["name"] for l in report.to_dict()["layers"]} == {"stem", "grouped", "depthwise", "pointwise", "head"}
    with pytest.raises(ValueError, match="wrap a lone layer"):
        sparsify(nn.Linear(3, 3))


def _classification_builders() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_on_meta(name: str, monkeypatch) -> nn.Module:
    """The builder's model on the meta device (shapes only). RegNets compute their widths with tensor
    ops, which fail under the meta device context: those are built on the CPU with every init
    function a no-op (the memory is reserved, never touched) and then moved to meta."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name)
    except NotImplementedError:
        for fn in ("normal_", "uniform_", "kaiming_normal_", "kaiming_uniform_", "trunc_normal_", "constant_",
                   "zeros_", "ones_", "xavier_uniform_", "xavier_normal_"):
            monkeypatch.setattr(nn.init, fn, lambda tensor, *a, **k: tensor)
        with torch.no_grad():
            return torchvision.models.get_model(name).to("meta")


@pytest.mark.parametrize("name", _classification_builders())
def test_every_torchvision_classifier_converts_with_exact_target_counts(name, monkeypatch):
    """On the meta device: no memory, no values; every Linear/Conv2d converted but those an attention
    module reads directly (nn.MultiheadAttention's out_proj, Swin's qkv and proj), every layer at
    exactly round(density * n) active entries."""
    model = build_on_meta(name, monkeypatch)
    report = sparsify(model, 0.9, from_weights=True)
    assert report.layers
    read_directly = (".out_proj", ".qkv", ".proj") if name.startswith("swin") else (".out_proj",)
    left = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # out_proj subclasses Linear
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]  # its in-projection
    own = [n for n, m in model.named_modules()  # a position embedding, a class token, a layer scale
           if not isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))
           and any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    assert sorted(left + attention + own) == sorted(n for n, _ in report.kept) and all(n.endswith(read_directly) for n in left)
    for layer in report.layers:
        expected = layer.total if layer.dense else active_count(layer.total, 0.1)
        assert layer.active == expected, layer.name
    assert all(("reads" in why and "weight directly" in why) or n in attention or "holds its own" in why
               for n, why in report.kept)


def test_a_swin_network_keeps_the_layers_its_window_attention_reads_and_runs():
    torch.manual_seed(0)
    swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2],
                                              window_size=[4, 4], num_classes=3)
    report = sparsify(swin, 0.9)
    kept = dict(report.kept)
    assert kept["features.1.0.attn.qkv"] == "Swin's ShiftedWindowAttention reads qkv.weight directly"
    assert "features.1.0.attn.proj" in kept and "features.1.0.mlp.0" in {l.name for l in report.layers}
    x = torch.randn(2, 3, 32, 32)
    assert ssvi.predict(swin, x, samples=2).probs.shape == (2, 3)  # it crashed: the layers had no weight
    swin.train()
    swin(x).sum().backward()


REPRESENTATIVE = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=10),
    "vit": lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                        hidden_dim=32, mlp_dim=64, num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPRESENTATIVE))
def test_representative_models_train_and_take_a_remove_and_add_step(name):
    torch.manual_seed(3)
    model = REPRESENTATIVE[name]()
    sparsify(model, 0.9)
    counts = {n: l.active for n, l in sparse_layers(model)}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    model.train()
    with capturing_dense_grad(model):
        loss = nn.functional.cross_entropy(model(x), y) + sum(l.kl(0.1) for _, l in sparse_layers(model)) * 1e-4
        loss.backward()
        collect_captured(model, {}, 1)
    report = subspace_step(model, 1, Schedule(1, 0.3, 10), "snr_abs", 1.0, "mean", None)
    assert report.swapped > 0
    assert {n: l.active for n, l in sparse_layers(model)} == counts
    assert all(isinstance(m, SparseGaussian) or type(m) not in (nn.Linear, nn.Conv2d) or n.endswith("out_proj")
               for n, m in model.named_modules())


@pytest.mark.slow
def test_converted_resnet50_trainable_state_is_at_most_8_percent_of_dense_vi():
    """From the actual tensors after one SGD step (parameters, gradients, momentum, indices)."""
    import ssvi_cli as ssvi
    from ssvi_cli.training.records import trainable_bytes

    def state_after_a_step(sparsity: float) -> int:
        torch.manual_seed(4)
        model = torchvision.models.resnet50(num_classes=10)
        sparsify(model, sparsity)
        optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01), momentum=0.9)
        loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
        loss.backward()
        optimizer.step()
        return trainable_bytes(model, optimizer)["total"]

    ratio = state_after_a_step(0.95) / state_after_a_step(0.0)
    assert ratio <= 0.08, ratio


def test_cli_trains_a_torchvision_model_and_every_command_reads_its_file(tmp_path, capsys):
    """--model torchvision:NAME: the file records the builder and rebuilds from the file alone."""
    import json

    import numpy as np

    from ssvi_cli.cli import run

    out = tmp_path / "run"
    assert run(["train", "--model", "torchvision:resnet18", "--epochs", "1", "--out", str(out), "--sparsity", "0.9",
                "--set", "data.max_train=128", "--set", "train.eval_samples=1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "torchvision:resnet18" and abs(summary["density"] - 0.1) < 0.01
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.uint8))
    assert run(["infer", str(out / "model.safetensors"), str(tmp_path / "x.npy"), "--json", "--samples", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 2
    assert run(["evaluate", str(out / "model.safetensors"), "--samples", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_info"]["architecture"] == "torchvision:resnet18"
    assert run(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["name"] == "torchvision:resnet18"
    assert run(["train", "--model", "torchvision:resnet81", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "(did you mean resnet18" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_init_from_a_trained_state_dict_starts_mu_at_the_largest_weights(tmp_path, capsys):
    from ssvi_cli import config as C
    from ssvi_cli.cli import run
    from ssvi_cli.training.trainer import Trainer

    torch.manual_seed(5)
    trained = torchvision.models.resnet18(num_classes=10)
    trained.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # the digits are gray: one input channel
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {
        "model.name": "torchvision:resnet18", "model.init_from": str(tmp_path / "sd.pt"), "sparse.sparsity": 0.9,
        "sparse.allocation": "uniform", "data.max_train": 64})
    model = Trainer.create(cfg, tmp_path / "run").model
    fc = dict(sparse_layers(model))["fc"]
    w = trained.fc.weight.detach().reshape(-1)
    assert fc.active == active_count(w.numel(), 0.1)
    torch.testing.assert_close(fc.mu.detach(), w[fc.idx])
    assert float(w[fc.idx].abs().min()) >= float(w.abs().sort(descending=True).values[fc.active - 1])
    torch.testing.assert_close(fc.bias.detach(), trained.fc.bias.detach())
    # a state_dict of another architecture: one line naming the first mismatching key; nothing written
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "other.pt")
    for argv, words in (
        (["--model", "torchvision:resnet18", "--init-from", str(tmp_path / "other.pt")],
         "holds 'layer1.2.conv1.weight', which the model does not have"),
        (["--init-from", str(tmp_path / "sd.pt")], "deterministic weights start only a torchvision:NAME model"),
        (["--model", "torchvision:resnet18", "--init-from", str(tmp_path / "missing.pt")], "no such file"),
    ):
        assert run(["train", *argv, "--out", str(tmp_path / "bad"), "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def _pruned(original: nn.Module, density: float) -> nn.Module:
    pruned = copy.deepcopy(original)
    for module in pruned.modules():
        if isinstance(module, nn.Linear):
            w = module.weight.data.reshape(-1)
            keep = torch.zeros_like(w, dtype=torch.bool)
            keep[torch.topk(w.abs().float(), active_count(w.numel(), density)).indices] = True
            w[~keep] = 0.0
    return pruned


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_float64_or_bfloat16_model_converts_trains_and_predicts_in_its_dtype(dtype):
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 5)).to(dtype).eval()
    x = torch.randn(6, 40, dtype=dtype)
    for sparsity in (0.0, 0.95):  # at 0.95 the linear layers run the sparse kernel
        model = copy.deepcopy(original)
        sparsify(model, sparsity)
        assert all(p.dtype == dtype for p in model.parameters())
        assert model[0].uses_sparse_kernel() == (sparsity > 0)
        expected = _pruned(original, 1.0 - sparsity)(x) if sparsity else original(x)
        got = mean_forward(model, x)
        assert got.dtype == dtype
        if dtype == torch.float64:  # float64 stays float64 in every kernel, not float32 in disguise
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        model.train()
        out = model(x)  # the training forward (local reparameterisation)
        assert out.dtype == dtype
        out.float().square().mean().backward()
        assert model[0].mu.grad.dtype == dtype
        probs = ssvi.predict(model, x, samples=3).probs
        assert probs.shape == (6, 5) and probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


class Shared(nn.Module):
    """One Linear under two names, and a head whose weight is tied to an embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.block = nn.Linear(8, 8)
        self.again = self.block
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens).mean(1)
        return self.head(self.again(torch.relu(self.block(h))))


def test_a_float16_model_is_refused_with_the_way_to_train_in_half_precision():
    with pytest.raises(ValueError, match="float16 weights, which cannot hold sigma.*torch.autocast, or use bfloat16"):
        sparsify(nn.Sequential(nn.Linear(8, 4)).half(), 0.5)
    sparsify(nn.Sequential(nn.Linear(8, 4)).half(), 0.5, bayesian=False)  # no sigma: a deterministic one is fine


def test_a_bayesian_model_made_float16_after_sparsify_is_refused_at_its_first_sigma(tmp_path):
    """``model.half()`` after the conversion passed every check, and the KL of the training loss was inf
    (float32: finite); the mean network, which uses no sigma, still predicts."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    sparsify(model, 0.5)
    assert torch.isfinite(ssvi.kl_term(model, 100, prior_sigma=0.005))
    model.half()
    x = torch.randn(4, 64, dtype=torch.float16)
    for use in (lambda: ssvi.kl_term(model, 100, prior_sigma=0.005), lambda: model.train()(x),
                lambda: ssvi.predict(model, x), lambda: ssvi.save(model, tmp_path / "m.safetensors")):
        with pytest.raises(ValueError, match=r"^a sparse Bayesian layer in float16 \(a model.half\(\) after sparsify\?\) "
                           r"cannot hold sigma .* train under torch.autocast, or use bfloat16$"):
            use()
    assert not (tmp_path / "m.safetensors").exists()
    probs = ssvi.predict(model, x, mode="mean").probs
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-3)


def test_a_module_under_two_names_is_one_sparse_layer_and_a_tied_weight_stays_tied(tmp_path):
    model = Shared()
    report = sparsify(model, 0.5)
    assert model.block is model.again and isinstance(model.block, SparseGaussian)
    assert [l.name for l in report.layers] == ["block"]
    assert report.kept == [("embed", "Embedding is not converted (Linear, Conv2d and Conv1d are)"),
                           ("head", "its weight is tied to embed's, which a sparse layer cannot share")]
    assert model.head.weight is model.embed.weight
    path = tmp_path / "shared.safetensors"
    ssvi.save(model, path)  # each shared tensor stored once
    loaded = ssvi.load(path, model=Shared())
    assert loaded.block is loaded.again and loaded.head.weight is loaded.embed.weight
    tokens = torch.randint(0, 12, (3, 4))
    torch.testing.assert_close(mean_forward(loaded, tokens), mean_forward(model, tokens))


def test_a_converted_transformer_encoder_runs_in_eval_mode():
    """torch's encoder fast path (eval, batch_first) reads linear1.weight, which a sparse layer lacks."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), nn.Flatten(), nn.Linear(80, 3))
    original = copy.deepcopy(model).eval()
    sparsify(model, 0.0)
    x = torch.randn(4, 5, 16)
    torch.testing.assert_close(mean_forward(model, x), original(x), atol=1e-5, rtol=1e-5)
    assert ssvi.predict(model, x, samples=2).probs.shape == (4, 3)


def test_weight_layers_it_does_not_convert_are_reported_and_a_lazy_layer_is_refused():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten(), nn.Linear(24, 3))
    report = sparsify(model, 0.5)
    assert report.kept == [("0", "Conv3d is not converted (Linear, Conv2d and Conv1d are)")]
    recurrent = nn.ModuleDict({"embed": nn.Embedding(10, 8), "lstm": nn.LSTM(8, 8), "cell": nn.GRUCell(8, 8),
                               "head": nn.Linear(8, 3)})
    assert dict(sparsify(recurrent, 0.5).kept) == {
        "embed": "Embedding is not converted (Linear, Conv2d and Conv1d are)",
        "lstm": "LSTM is not converted (Linear, Conv2d and Conv1d are)",
        "cell": "GRUCell is not converted (Linear, Conv2d and Conv1d are)"}
    with pytest.raises(ValueError, match="layer '0' \\(LazyLinear\\) has no shape yet; run one forward pass"):
        sparsify(nn.Sequential(nn.LazyLinear(3)), 0.5)


def test_a_subclass_of_multihead_attention_that_adds_nothing_is_split_and_runs():
    class MyAttention(nn.MultiheadAttention):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = MyAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0].mean(1))

    net = Net()
    report = sparsify(net, 0.5)
    assert report.kept == [] and [layer.name for layer in report.layers][:4] == ["att.q_proj", "att.k_proj", "att.v_proj",
                                                                                 "att.out_proj"]
    assert net(torch.randn(2, 4, 8)).shape == (2, 3)

    class OwnForward(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    net = Net()
    net.att = OwnForward(8, 2, batch_first=True)
    assert dict(sparsify(net, 0.5).kept) == {
        "att": "OwnForward computes with a forward of its own, which a split copy would drop",
        "att.out_proj": "nn.MultiheadAttention reads out_proj.weight directly"}


def test_regnet_builds_as_a_shapes_only_model():
    """RegNet computes its widths with tensors and reads them back: under the meta device (how a run
    plans its supports) it is built on the CPU and moved, instead of failing."""
    from ssvi_cli.models import torchvision_base

    with torch.device("meta"):
        model = torchvision_base("regnet_x_400mf", (1, 32, 32), 10)
    assert all(p.is_meta for p in model.parameters()) and model.stem[0].in_channels == 1


@pytest.mark.parametrize("from_weights", [True, False])
def test_a_conversion_that_fails_part_way_leaves_the_model_as_it_was(monkeypatch, from_weights):
    """A failure at the second layer (out of memory, say) used to leave the first converted."""
    import ssvi_cli.core.convert as convert

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def fail_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")

    monkeypatch.setattr(convert, "_support_from_weights" if from_weights else "initialise", fail_on_the_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        if from_weights:
            sparsify(model, 0.9)
        else:  # one initialise call for every layer: fail it at once
            calls.append(1)
            sparsify(model, 0.9, from_weights=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("extra", ["prune", "prune_bias", "weight_norm", "spectral_norm", "hook", "tensor_hook",
                                   "state_dict_hook"])
def test_a_layer_with_a_hook_or_a_reparametrized_weight_is_refused_before_anything_changes(extra):
    """Its replacement silently dropped the pruning mask, the normalisation or the hook."""
    from torch.nn.utils import parametrizations, prune

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    add = {"prune": lambda m: prune.l1_unstructured(m, "weight", 0.5),
           "weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm,
           "prune_bias": lambda m: prune.l1_unstructured(m, "bias", 0.5),
           "hook": lambda m: m.register_forward_hook(lambda *args: None),
           "tensor_hook": lambda m: m.weight.register_hook(lambda grad: grad),
           "state_dict_hook": lambda m: m._register_state_dict_hook(lambda *args: None)}[extra]
    add(model[2])
    words = {"hook": "forward hooks", "tensor_hook": "tensor hooks",
             "state_dict_hook": "state-dict hooks"}.get(extra, "a pruned or reparametrized weight or bias")
    with pytest.raises(ValueError, match=f"^layer '2' has {words}"):
        sparsify(model, 0.9)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], SparseGaussian)


def test_a_weight_norm_made_permanent_as_the_refusal_says_converts():
    """remove_parametrizations leaves torch's weight_norm state-dict hook on the layer, with no handle
    to remove it: the refusal's own advice led to a second refusal that could not be acted on."""
    from torch.nn.utils import parametrizations, parametrize

    model = nn.Sequential(nn.Conv1d(2, 4, 3), parametrizations.weight_norm(nn.Conv1d(4, 4, 3)), nn.Flatten(),
                          parametrizations.weight_norm(nn.Linear(16, 3)))
    with pytest.raises(ValueError, match="^layer '1' has a pruned or reparametrized weight"):
        sparsify(model, 0.0)
    for layer in (model[1], model[3]):
        parametrize.remove_parametrizations(layer, "weight")
    original = copy.deepcopy(model)
    sparsify(model, 0.0)
    x = torch.randn(2, 2, 8)
    torch.testing.assert_close(mean_forward(model, x), original(x))
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    other[1]._register_load_state_dict_pre_hook(lambda *args: None)  # anyone else's is still refused
    with pytest.raises(ValueError, match="^layer '1' has state-dict hooks"):
        sparsify(other, 0.5)


def test_a_layer_kept_dense_keeps_its_hooks_and_does_not_stop_the_conversion():
    """A hook or spectral norm on a layer sparsify leaves as it is (circular padding) aborted the whole
    conversion, though nothing of it would be lost."""
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(512, 10))
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    parametrizations.spectral_norm(model[0])
    report = sparsify(model, 0.5)
    assert [layer.name for layer in report.layers] == ["2"] and any(name == "0" for name, _ in report.kept)
    model(torch.zeros(1, 3, 8, 8))
    assert calls == [1] and not isinstance(model[0], SparseGaussian)


def test_a_conversion_that_leaves_nothing_sparse_says_so(caplog):
    # the stem kept by dense_first_conv, or every layer named by dense=: the report's density 1 alone is easy to miss
    cases = [(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), {}, "(0: the stem, dense_first_conv=True)"),
             (nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), {"dense": ("0", "2")}, "(0: dense=; 2: dense=)")]
    for model, kwargs, why in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ssvi_cli.core.convert"):
            assert sparsify(model, 0.9, **kwargs).density == 1.0
        assert [r.getMessage() for r in caplog.records] == [
            f"sparsify(sparsity=0.9) keeps every layer it converts dense {why}: the model has no sparse weight"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.core.convert"):  # one sparse layer, or sparsity 0: no word
        sparsify(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), 0.9, dense="0")
        sparsify(nn.Sequential(nn.Linear(3, 8)), 0.0)
    assert not caplog.records


def test_an_optimizer_built_before_sparsify_is_refused_at_its_first_step():
    # it holds the dense weights taken out of the model: stepping it would leave the sparse layers as they are
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, 0.5)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"^this SGD holds the weights of '0' that sparsify took out of the model, "
                                         r"not its sparse layers, which would never train; build the optimizer after"):
        early.step()
    mu = model[0].mu.detach().clone()
    fresh = torch.optim.SGD(ssvi.param_groups(model, 0.1, 0.01), lr=0.1)
    fresh.step()  # built after the conversion: steps, and moves the sparse layers
    assert not torch.equal(model[0].mu, mu)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    other.step()
    other.add_param_group({"params": [early.param_groups[0]["params"][2]]})  # a group added later is looked at too
    with pytest.raises(ValueError, match="holds the weights of '2' that sparsify took out"):
        other.step()
    dense = nn.Sequential(nn.Linear(4, 2))  # stepped (dense training), then converted under it
    stepped = torch.optim.SGD(dense.parameters(), lr=0.1)
    dense(torch.randn(3, 4)).sum().backward()
    stepped.step()
    sparsify(dense, 0.5)
    stepped.zero_grad()  # the loop's next iteration: the weights taken out get no gradient now
    dense(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match="this SGD holds the weights of '0' that sparsify took out"):
        stepped.step()
    kept = nn.Sequential(nn.Linear(4, 2))  # the same with gradients zeroed in place, not set to None:
    in_place = torch.optim.SGD(kept.parameters(), lr=0.1)  # zeros are no sign of a weight in use elsewhere
    kept(torch.randn(3, 4)).sum().backward()
    in_place.step()
    sparsify(kept, 0.5)
    in_place.zero_grad(set_to_none=False)
    kept(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match="this SGD holds the weights of '0' that sparsify took out"):
        in_place.step()


def test_weights_taken_out_but_still_in_use_are_not_refused(tmp_path):
    """What the step pre-hook must let through: a weight shared with another model, a plain head that
    ssvi.load puts back, the user's layers after a load that failed, an optimizer without __hash__."""
    from ssvi_cli.modelfile.header import ModelFileError

    teacher, student = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    student[0].weight = teacher[0].weight  # shared across models: the teacher still trains it
    teacher_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    sparsify(student, 0.5)
    for _ in range(2):  # passed on the shared weight's gradient, looked at again at the next step
        teacher(torch.randn(2, 4)).sum().backward()
        teacher_opt.step()
    teacher_opt.zero_grad(set_to_none=False)  # a step on zeroed gradients: nothing shows it is in use now
    with pytest.raises(ValueError, match="holds the weights of '0' that sparsify took out"):
        teacher_opt.step()

    def mlp(classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))

    model = mlp(10)
    sparsify(model, 0.9)
    model[3] = nn.Linear(32, 5)  # a new plain head, which the file stores dense
    ssvi.save(model, tmp_path / "h.safetensors")
    loaded = ssvi.load(tmp_path / "h.safetensors", model=mlp(5)).train()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)  # built after the load, as API.md says
    loaded(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    dense = mlp(7)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    with pytest.raises(ModelFileError):  # 7 classes against the file's 5: the user's layers are put back
        ssvi.load(tmp_path / "h.safetensors", model=dense)
    dense(torch.randn(2, 64)).sum().backward()
    dense_opt.step()

    class ComparedSGD(torch.optim.SGD):  # __eq__ without __hash__: unhashable
        def __eq__(self, other):
            return self is other

    plain = nn.Linear(2, 2)
    ComparedSGD(plain.parameters(), lr=0.1).step()


class StdConv(nn.Conv2d):
    """A weight-standardised convolution (timm's StdConv2d): its own forward."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class ScaledLinear(nn.Linear):
    """A linear layer with a learned output scale: a parameter besides weight and bias."""

    def __init__(self, *args):
        super().__init__(*args)
        self.scale = nn.Parameter(torch.full((self.out_features,), 2.0))

    def forward(self, x):
        return super().forward(x) * self.scale


class PlainLinear(nn.Linear):
    """A subclass that adds nothing: converted as an nn.Linear."""


def test_a_subclass_with_its_own_forward_or_parameters_is_kept_as_it_is():
    """Replaced by a plain sparse layer, a subclass lost its forward (the model computed something
    else, silently) or its parameters (a shape error at the next forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), StdConv(4, 4, 3), nn.Flatten(), ScaledLinear(16, 5), nn.ReLU(),
                          PlainLinear(5, 3))
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    report = sparsify(model, 0.0)
    assert report.kept == [("1", "StdConv subclasses nn.Conv2d with its own forward, which a sparse layer would drop"),
                           ("3", "ScaledLinear subclasses nn.Linear with its own forward and its own scale, which a "
                                 "sparse layer would drop")]
    assert [l.name for l in report.layers] == ["0", "5"] and isinstance(model[5], SparseGaussian)
    assert type(model[1]) is StdConv and type(model[3]) is ScaledLinear
    torch.testing.assert_close(mean_forward(model, x), before)
    # the same through a file: ssvi.load converts the model it is given as sparsify does
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        ssvi.save(model, f"{folder}/m.safetensors", input_shape=(3, 6, 6))
        torch.manual_seed(1)
        fresh = nn.Sequential(nn.Conv2d(3, 4, 3), StdConv(4, 4, 3), nn.Flatten(), ScaledLinear(16, 5), nn.ReLU(),
                              PlainLinear(5, 3))
        loaded = ssvi.load(f"{folder}/m.safetensors", model=fresh)
    assert type(loaded[1]) is StdConv and type(loaded[3]) is ScaledLinear
    torch.testing.assert_close(mean_forward(loaded, x), before)
    attention = nn.MultiheadAttention(8, 2, add_bias_kv=True)  # kept whole: its out_proj (a plain subclass) is read directly
    assert dict(sparsify(nn.Sequential(attention, PlainLinear(8, 2)), 0.5).kept)["0.out_proj"].startswith(
        "nn.MultiheadAttention reads out_proj.weight")


def test_the_stem_is_the_models_first_conv_even_when_it_is_not_converted():
    """dense_first_conv kept the first *converted* Conv2d dense: the next conv after a stem kept as is
    (reflect padding), and a new head converted on an already sparse model."""
    reflect = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(8, 16, 3),
                            nn.Flatten(), nn.LazyLinear(4))
    reflect(torch.zeros(1, 3, 6, 6))
    report = sparsify(reflect, 0.9)
    assert [(l.name, l.dense) for l in report.layers] == [("2", False), ("4", False)]
    assert report.kept == [("0", "padding_mode='reflect' (only zero padding is supported)")]
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 21, 1))
    assert [l.dense for l in sparsify(net, 0.9).layers] == [True, False, False]  # the stem, as before
    net[4] = nn.Conv2d(32, 5, 1)  # a new head for another task, converted alone
    assert [(l.name, l.dense, l.active) for l in sparsify(net, 0.9).layers] == [("4", False, 16)]
    assert "1 layer converted, density 0.1000 over their 160 weights" in str(sparsify(nn.Sequential(nn.Linear(16, 10)), 0.9))


def test_a_module_under_two_names_is_named_by_either_in_dense_and_deterministic():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def model():
        m = nn.ModuleDict({"a": Encoder(), "b": Encoder()})
        m.b.shared = m.a.shared
        return m

    for pattern in ("a.shared", "b.shared", "*.shared"):
        report = sparsify(model(), 0.5, deterministic=pattern, dense=pattern)
        assert {l.name: (l.bayesian, l.dense) for l in report.layers} == {
            "a.shared": (False, True), "a.head": (True, False), "b.head": (True, False)}, pattern


@pytest.mark.parametrize("sparsity", [0.5, 0.95])  # the dense kernel, then the sparse one
def test_an_input_of_another_dtype_is_refused_as_nn_linear_refuses_it(sparsity):
    """At high sparsity the sparse kernels cast a float32 input for a float64 model in silence (and the
    output came back in float32); at low sparsity torch's dense product refused it."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).double()
    sparsify(model, sparsity)
    with pytest.raises(RuntimeError, match=r"input of torch.float32 for a layer in torch.float64; cast one to the "
                                           r"other \(x.to\(torch.float64\)\)"):
        ssvi.predict(model, torch.randn(2, 64), mode="mean")
    assert ssvi.predict(model, torch.randn(2, 64, dtype=torch.float64), mode="mean").probs.dtype == torch.float64
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast inputs of other dtypes are autocast's to cast
        assert model(torch.randn(2, 64)).shape == (2, 3)


@pytest.mark.parametrize("autocast", [False, True])
def test_an_integer_input_is_refused_naming_its_dtype_in_linear_and_conv_layers(autocast):
    """Pixels as uint8 or labels as long: torch's "expected scalar type Long but found Float" from inside
    the sparse product, or, under autocast, whatever the kernel made of it."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 3))
    sparsify(model, 0.5, dense_first_conv=False)
    for layer, x in ((model, torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8)),
                     (model[2], torch.randint(0, 9, (2, 144)))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.raises(RuntimeError, match=rf"^input of {x.dtype} for a layer in torch.float32; cast one to the "
                                                   r"other \(x.to\(torch.float32\)\)$"):
                layer(x)


def test_dense_or_deterministic_may_name_a_layer_kept_as_it_is():
    """dense=("stem",), the documented way to name a stem registered late, raised 'matches no layer'
    once the stem was a subclass kept as it is (kept layers are dense and deterministic already)."""
    model = nn.Sequential()
    model.add_module("body", nn.Conv2d(3, 8, 3))
    model.add_module("stem", StdConv(3, 3, 3))
    report = sparsify(model, 0.9, dense_first_conv=False, dense=("stem",), deterministic="stem")
    assert [l.name for l in report.layers] == ["body"] and dict(report.kept)["stem"].startswith("StdConv subclasses")
    with pytest.raises(ValueError, match="'stme' matches no Linear, Conv2d or Conv1d layer"):  # a typo is still one
        sparsify(nn.Sequential(nn.Linear(2, 2), StdConv(3, 3, 3)), 0.9, dense="stme")


def test_a_layer_whose_forward_is_replaced_on_the_instance_is_kept_and_a_pruned_subclass_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    plain = model[2].forward
    model[2].forward = lambda x: plain(x) * 10  # what accelerate's add_hook_to_module does
    assert sparsify(model, 0.5).kept == [("2", "Linear has its forward replaced on the instance, which a sparse "
                                               "layer would drop")]
    pruned = nn.Sequential(PlainLinear(4, 4))
    import torch.nn.utils.prune as prune

    prune.l1_unstructured(pruned[0], "weight", 0.5)  # weight_orig and weight_mask: refused as for nn.Linear
    with pytest.raises(ValueError, match="has a pruned or reparametrized weight"):
        sparsify(pruned, 0.5)


def test_a_file_that_stores_a_subclass_sparse_loads_it_as_it_was_trained(tmp_path, monkeypatch):
    """Files written when ssvi converted every subclass (its forward dropped) load with the sparse layer
    in its place, as the model was trained; a fresh conversion keeps the subclass."""
    import ssvi_cli.core.targets as targets

    def model():
        torch.manual_seed(0)
        return nn.Sequential(StdConv(1, 4, 3), nn.Flatten(), nn.Linear(144, 3))

    with monkeypatch.context() as old:  # the conversion of an ssvi before subclasses were kept
        old.setattr(targets, "_own_behaviour", lambda module: None)
        trained = model()
        sparsify(trained, 0.5, dense_first_conv=False)
        ssvi.save(trained, tmp_path / "old.safetensors", input_shape=(1, 8, 8))
    loaded = ssvi.load(tmp_path / "old.safetensors", model=model())
    assert isinstance(loaded[0], SparseConv2d)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(ssvi.predict(loaded, x, mode="mean").probs, ssvi.predict(trained, x, mode="mean").probs)
    assert type(model()[0]) is StdConv and [l.name for l in sparsify(model(), 0.5).layers] == ["2"]


def test_a_dense_layer_is_outside_the_budget_and_its_check():
    """dense= named a layer too small for the sparsity, and sparsify refused it as left with no
    weight (advising a lower sparsity); under ERK the dense layer took its share of the budget from
    the others. Like the stem, it is now outside both."""
    small = nn.Sequential(nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 2))  # 400 weights: none left at 0.999
    report = sparsify(small, 0.999, dense="2")
    assert [(l.name, l.active, l.dense) for l in report.layers] == [("0", 40, False), ("2", 400, True)]
    for allocation in ("uniform", "erk"):
        alone = sparsify(nn.Sequential(nn.Linear(64, 64)), 0.9, allocation=allocation)
        beside = sparsify(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), 0.9, dense="2",
                          allocation=allocation)
        assert beside.layers[0].active == alone.layers[0].active == 410


def test_layers_kept_as_they_are_are_warned_of_where_the_report_is_not_printed(caplog):
    """A user's loop rarely prints the report: an Embedding or LSTM left as it is trained as a point
    estimate outside the posterior without a word."""
    recurrent = nn.ModuleDict({"embed": nn.Embedding(10, 8), "lstm": nn.LSTM(8, 8), "head": nn.Linear(8, 3)})
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        sparsify(recurrent, 0.5)
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(  # 80 + 4 * 8 * 8 * 2; 24 converted
        "sparsify keeps 2 modules with weights as they are, deterministic and dense (592 weights, 96.1% of the weights it "
        "converted or kept): embed (Embedding is not converted (Linear, Conv2d and Conv1d are)); lstm (LSTM is not converted "
        "(Linear, Conv2d and Conv1d are)); the report's kept")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5)
    assert not caplog.records


class _ReadsQkv(nn.Module):
    """An attention block that reads its qkv layer's weight itself, as timm's EVA, BEiT and Swin V2 do."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.q_bias = nn.Parameter(torch.zeros(24))

    def forward(self, x):
        q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.q_bias).chunk(3, -1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


def test_exclude_leaves_the_layers_it_names_as_they_are():
    """A module that reads a layer's .weight itself (timm's EVA, BEiT) crashed at every forward after
    sparsify, and nothing kept that layer out: dense= still made it sparse. exclude= does."""
    torch.manual_seed(0)
    net = nn.Sequential(_ReadsQkv(), nn.Flatten(), nn.Linear(32, 3))
    x = torch.randn(2, 4, 8)
    before = torch.softmax(net(x), -1)
    report = sparsify(net, 0.0, exclude="*.qkv")
    assert dict(report.kept)["0.qkv"] == "exclude=" and isinstance(net[0].qkv, nn.Linear)
    assert [l.name for l in report.layers] == ["0.proj", "2"]
    torch.testing.assert_close(ssvi.predict(net, x, mode="mean").probs, before)
    with pytest.raises(ValueError, match=r"^exclude: 'head' matches no Linear, Conv2d or Conv1d layer that sparsify would convert"):
        sparsify(nn.Sequential(nn.Linear(4, 3)), 0.5, exclude=("head",))
    crashed = nn.Sequential(_ReadsQkv(), nn.Flatten(), nn.Linear(32, 3))
    sparsify(crashed, 0.5)
    with pytest.raises(AttributeError, match=r"needs the layer left as it is, sparsify\(\.\.\., exclude=\[NAME\]\)"):
        crashed(x)


def test_timms_attention_classes_keep_the_layers_they_read_and_a_plain_subclass_converts():
    """Known by module and class name (timm is not installed here: classes of those names stand in)."""
    eva = type("EvaAttention", (_ReadsQkv,), {"__module__": "timm.models.eva"})
    beit = type("Attention", (_ReadsQkv,), {"__module__": "timm.models.beit"})
    other = type("Attention", (_ReadsQkv,), {"__module__": "somewhere.else"})  # the same class name elsewhere
    plain = type("Linear", (nn.Linear,), {"__module__": "timm.layers.linear", "__qualname__": "Linear",
                                          "forward": lambda self, x: torch.nn.functional.linear(x, self.weight, self.bias)})
    for cls, kept in ((eva, "timm's EvaAttention reads qkv.weight directly"),
                      (beit, "timm's BEiT Attention reads qkv.weight directly"), (other, None)):
        report = sparsify(nn.Sequential(cls(), nn.Flatten(), plain(32, 3)), 0.5)
        assert dict(report.kept).get("0.qkv") == kept and "2" in {l.name for l in report.layers}


def test_a_module_that_applies_a_weight_of_its_own_is_reported_kept():
    """timm's CondConv2d holds its weight and calls F.conv2d: 89% of an efficientnet_cc_b0_4e's weights
    stayed dense and deterministic, neither in the report's kept nor warned of."""

    class CondConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3 * 3 * 3 * 8))
            self.scale = nn.Parameter(torch.ones(8))  # one dimension: not a weight

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight[0].view(8, 3, 3, 3), padding=1) * self.scale[:, None, None]

    net = nn.Sequential(nn.Conv2d(3, 3, 1), CondConv(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    report = sparsify(net, 0.5)
    assert report.kept == [("1", "CondConv holds its own weight, kept as it is (Linear, Conv2d and Conv1d are converted)")]


def test_exclude_dense_and_the_warning_count_a_layer_by_any_of_its_names_and_a_weight_once(caplog):
    """From a review: exclude= missed a shared layer's second name and took a layer kept for another
    reason (out_proj) in silence; dense= accepted a module kept for a weight of its own (a ViT's
    encoder, holding its position embedding), which names no layer; the warning counted a tied weight
    twice."""
    import logging

    shared = nn.Linear(4, 4)
    net = nn.ModuleDict({"a": shared, "b": shared, "h": nn.Linear(4, 2)})
    assert dict(sparsify(net, 0.5, exclude="b").kept)["a"] == "exclude="  # listed under its first name
    att = nn.ModuleDict({"att": nn.MultiheadAttention(8, 2, add_bias_kv=True), "h": nn.Linear(8, 2)})  # kept whole
    with pytest.raises(ValueError, match=r"^exclude: 'att.out_proj' matches no Linear, Conv2d or Conv1d layer that sparsify"):
        sparsify(att, 0.5, exclude="att.out_proj")
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=3)
    with pytest.raises(ValueError, match=r"^dense: 'encoder' matches no Linear, Conv2d or Conv1d layer that sparsify converts"):
        sparsify(vit, 0.9, dense="encoder")

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(100, 16), nn.Linear(16, 16), nn.Linear(16, 100, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.mid(self.emb(x)))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        sparsify(Tied(), 0.5)
    assert "(1,600 weights, 86.2% of the weights it converted or kept)" in caplog.records[-1].getMessage()


class _TransposedLinear(nn.Module):
    """transformers' Conv1D as GPT-2 uses it: a linear layer whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_transformers_conv1d_converts_as_the_linear_layer_it_is(tmp_path):
    """GPT-2's attention and MLP layers (transformers' Conv1D) were kept dense and deterministic: a
    sparsified GPT-2 had its classifier head alone in the posterior. Known by module and class name
    (transformers is not installed here: a class of that name stands in); a subclass is not taken."""
    conv1d = type("Conv1D", (_TransposedLinear,), {"__module__": "transformers.pytorch_utils", "__qualname__": "Conv1D"})
    other = type("Conv1D", (_TransposedLinear,), {"__module__": "somewhere.else", "__qualname__": "Conv1D"})
    torch.manual_seed(0)
    net = nn.Sequential(conv1d(8, 5), nn.ReLU(), conv1d(3, 8))
    original = copy.deepcopy(net)
    report = sparsify(net, 0.0)
    assert [(layer.name, layer.kind, layer.shape) for layer in report.layers] == [("0", "linear", (8, 5)),
                                                                                  ("2", "linear", (3, 8))]
    x = torch.randn(2, 7, 5)
    torch.testing.assert_close(mean_forward(net, x), original(x))
    sparse = nn.Sequential(conv1d(8, 5), nn.ReLU(), conv1d(3, 8))
    weight = sparse[0].weight.detach().t().clone()
    sparsify(sparse, 0.5)
    kept = torch.zeros(40).index_copy(0, sparse[0].idx, sparse[0].mu.detach())
    torch.testing.assert_close(kept[kept != 0], weight.flatten()[kept != 0])  # mu = w.T at the largest |w|
    assert int((kept != 0).sum()) == 20 and kept.abs().min() == 0 and \
        weight.flatten()[kept != 0].abs().min() >= weight.flatten()[kept == 0].abs().max()
    assert sparsify(nn.Sequential(other(3, 4), nn.Linear(3, 2)), 0.5).kept[0][1].startswith("Conv1D holds its own")
    subclass = type("MyConv1D", (conv1d,), {})  # it may compute otherwise: kept
    assert sparsify(nn.Sequential(subclass(3, 4), nn.Linear(3, 2)), 0.5).kept[0][1].startswith("MyConv1D holds its own")
    ssvi.save(net, tmp_path / "m.safetensors", input_shape=(7, 5), class_names=["a", "b", "c"])
    loaded = ssvi.load(tmp_path / "m.safetensors", model=nn.Sequential(conv1d(8, 5), nn.ReLU(), conv1d(3, 8)))
    torch.testing.assert_close(mean_forward(loaded, x), original(x))
