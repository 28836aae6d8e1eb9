"""ssvi_cli.save / ssvi_cli.load: any converted module round-trips through the compact file; a
torchvision network rebuilds from the file alone; a custom one loads into the user's model, and
every mismatch is named."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ssvi_cli as ssvi
from ssvi_cli.cli import run
from ssvi_cli.core.layers import SparseGaussian, sparse_layers
from ssvi_cli.modelfile import ModelFileError, read_header


class Net(nn.Module):
    def __init__(self, hidden: int = 32, extra: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.scale = nn.Parameter(torch.ones(()))  # a free parameter, not in a Linear/Conv2d
        if extra:
            self.aux = nn.Linear(10, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x)))) * self.scale


def trained_net(tmp_path):
    """A converted Net after a few Adam steps (moved values, BatchNorm statistics, a support step)."""
    net = Net()
    ssvi.sparsify(net, 0.9, deterministic=["head.3"], dense_first_conv=False)
    opt = torch.optim.Adam(ssvi.param_groups(net, lr=0.01, lr_sigma=0.01))
    sub = ssvi.Subspace(net, opt, total_steps=6, delta_t=2)
    for _ in range(4):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        (F.cross_entropy(net(x), y) + ssvi.kl_term(net, n_train=100)).backward()
        sub.step()
        opt.zero_grad()
    sub.remove()
    assert sub.last_report is not None and sub.last_report.swapped > 0
    return net.eval()


def test_a_custom_module_round_trips_into_a_fresh_instance(tmp_path):
    net = trained_net(tmp_path)
    path = tmp_path / "net.safetensors"
    size = ssvi.save(net, path, class_names=[f"d{i}" for i in range(10)])
    assert size == path.stat().st_size
    meta = read_header(path)["meta"]
    assert meta["architecture"]["name"] == f"custom:{__name__}.Net"
    assert [r["bayesian"] for r in meta["layers"]] == [True, True, False]
    x = torch.randn(7, 1, 8, 8)
    for target in (Net(), None):  # deterministic (converted by load) and already converted
        if target is None:
            target = Net()
            ssvi.sparsify(target, 0.5, deterministic=["head.3"])
        loaded = ssvi.load(path, model=target)
        assert loaded is target and not loaded.training
        assert [(n, l.active) for n, l in sparse_layers(loaded)] == [(n, l.active) for n, l in sparse_layers(net)]
        for (_, a), (_, b) in zip(sparse_layers(net), sparse_layers(loaded)):
            assert torch.equal(a.idx, b.idx) and torch.equal(a.mu, b.mu)
            if a.bayesian:  # sigma too: mean-mode predictions below do not use it
                torch.testing.assert_close(b.sigma(), a.sigma(), rtol=1e-6, atol=0)
        assert torch.equal(loaded.bn.running_mean, net.bn.running_mean) and loaded.scale.item() == net.scale.item()
        assert torch.equal(ssvi.predict(net, x, mode="mean").probs, ssvi.predict(loaded, x, mode="mean").probs)


def test_a_model_built_on_the_meta_device_is_filled_on_the_cpu_or_the_device_asked(tmp_path):
    """A model built under torch.device("meta") (no memory for a big one's weights) came back with every
    tensor still on meta, or failed inside torch with device="cpu"."""
    net = trained_net(tmp_path)
    path = tmp_path / "net.safetensors"
    ssvi.save(net, path)
    x = torch.randn(5, 1, 8, 8)
    for device in (None, "cpu"):
        with torch.device("meta"):
            skeleton = Net()
        loaded = ssvi.load(path, model=skeleton, device=device)
        assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cpu"}
        for (_, a), (_, b) in zip(sparse_layers(net), sparse_layers(loaded)):
            assert torch.equal(a.mu, b.mu) and (not a.bayesian or torch.allclose(a.sigma(), b.sigma(), rtol=1e-6, atol=0))
        assert torch.equal(ssvi.predict(net, x, mode="mean").probs, ssvi.predict(loaded, x, mode="mean").probs)
    with torch.device("meta"):
        skeleton = Net()
    skeleton.register_buffer("table", torch.zeros(3, device="meta"), persistent=False)  # no file fills it
    with pytest.raises(ValueError, match="its buffer table is not in a state dict"):
        ssvi.load(path, model=skeleton)
    with torch.device("meta"):
        skeleton = Net(extra=True)
    with pytest.raises(ModelFileError):  # a tensor the file does not hold is named, not left empty
        ssvi.load(path, model=skeleton)
    assert {t.device.type for t in skeleton.parameters()} == {"meta"}  # and the model is as it was
    with pytest.raises(ModelFileError, match="does not exist"):
        ssvi.load(tmp_path / "typo.safetensors", model=skeleton)
    assert {t.device.type for t in skeleton.parameters()} == {"meta"}


class TiedLM(nn.Module):
    """A language model whose head shares the embedding's weight, with a real non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.full((8,), 2.0, device="cpu"), persistent=False)

    def forward(self, t):
        return self.head(torch.relu(self.body(self.emb(t) * self.scale))).mean(1)


def test_a_meta_model_keeps_its_ties_and_its_real_tensors(tmp_path):
    """The meta tensors alone are given memory, a tied weight as one tensor: to_empty() untied the head
    (the load then failed) and overwrote a real non-persistent buffer with uninitialised memory."""
    model = TiedLM()
    ssvi.sparsify(model, 0.5)
    ssvi.save(model, tmp_path / "lm.safetensors", input_shape=(5,))
    with torch.device("meta"):
        skeleton = TiedLM()
    skeleton.scale = torch.full((8,), 2.0)  # real, as accelerate's init_empty_weights leaves buffers
    loaded = ssvi.load(tmp_path / "lm.safetensors", model=skeleton)
    assert loaded.head.weight is loaded.emb.weight and torch.equal(loaded.scale, torch.full((8,), 2.0))
    tokens = torch.randint(0, 20, (3, 5))
    torch.testing.assert_close(ssvi.predict(loaded, tokens, mode="mean").probs, ssvi.predict(model, tokens, mode="mean").probs)


def test_loading_into_a_different_module_names_the_first_difference(tmp_path):
    path = tmp_path / "net.safetensors"
    ssvi.save(trained_net(tmp_path), path)
    with pytest.raises(ssvi.ModelFileError, match=r"layer 'head.1' has shape \[32, 512\], the Net passed to load needs \[16, 512\]"):
        ssvi.load(path, model=Net(hidden=16))
    with pytest.raises(ssvi.ModelFileError, match="lacks tensor 'aux.weight' of the Net passed to load"):
        ssvi.load(path, model=Net(extra=True))
    smaller = Net()
    del smaller.scale
    with pytest.raises(ssvi.ModelFileError, match=r"holds entries the Net passed to load does not have: \['scale'\]"):
        ssvi.load(path, model=smaller)
    bayesian_head = Net()
    ssvi.sparsify(bayesian_head, 0.5)
    with pytest.raises(ssvi.ModelFileError, match="'head.3' is not Bayesian, unlike that layer of the Net"):
        ssvi.load(path, model=bayesian_head)


def test_a_failed_load_leaves_an_unconverted_model_as_it_was(tmp_path):
    path = tmp_path / "net.safetensors"
    ssvi.save(trained_net(tmp_path), path)
    target = Net(hidden=16)  # deterministic: load converts it first, then the file does not fit
    before = {k: v.clone() for k, v in target.state_dict().items()}
    layers = [(n, type(m)) for n, m in target.named_modules()]
    with pytest.raises(ssvi.ModelFileError, match="has shape"):
        ssvi.load(path, model=target)
    assert [(n, type(m)) for n, m in target.named_modules()] == layers and not sparse_layers(target)
    after = target.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert target(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_a_custom_file_needs_its_code_and_says_so(tmp_path):
    path = tmp_path / "net.safetensors"
    ssvi.save(trained_net(tmp_path), path)
    with pytest.raises(ssvi.ModelFileError, match=r"ssvi_cli.load\(path, model=Net\(\.\.\.\)\)"):
        ssvi.load(path)
    assert run(["infer", str(path), str(tmp_path / "x.npy")]) == 2  # one line, exit 2, not a traceback
    # a torchvision network saved without architecture=: its builder, and how the file would rebuild alone
    net = torchvision.models.resnet18(num_classes=7)
    ssvi.sparsify(net, 0.9)
    ssvi.save(net, tmp_path / "tv.safetensors")
    with pytest.raises(ssvi.ModelFileError, match=r"ssvi_cli.load\(path, model=m\), m = torchvision.models.NAME\("
                                                  r"num_classes=7\) with any change made to it before saving \(a new "
                                                  r"stem, say\) made again \(a file saved with architecture="):
        ssvi.load(tmp_path / "tv.safetensors")
    # followed as said, the hint loads it
    assert torch.equal(ssvi.load(tmp_path / "tv.safetensors", model=torchvision.models.resnet18(num_classes=7)).fc.mu, net.fc.mu)


def test_inspect_reads_a_custom_files_posterior_without_its_code(tmp_path, capsys):
    import json

    from ssvi_cli.evaluation.inspection import snr

    net = trained_net(tmp_path)
    path = tmp_path / "net.safetensors"
    ssvi.save(net, path)
    capsys.readouterr()
    assert run(["inspect", str(path), "--json", "--plots", str(tmp_path / "plots")]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = dict(sparse_layers(net))
    assert [l["name"] for l in report["layers"]] == list(layers) == ["conv", "head.1", "head.3"]
    for l in report["layers"]:
        layer = layers[l["name"]]
        assert (l["kind"], l["shape"], l["active"], l["bayesian"]) == (
            "conv2d" if l["name"] == "conv" else "linear", list(layer.weight_shape), layer.active, layer.bayesian)
        assert l["mu"]["mean_abs"] == pytest.approx(float(layer.mu.detach().abs().double().mean()), rel=1e-6)
        assert l["flops_per_prediction"] is None and l["bytes"] > 0
        if layer.bayesian:
            ratio = snr(layer.mu.detach(), layer.sigma().detach())
            assert l["snr"]["median"] == pytest.approx(float(torch.quantile(ratio.double(), 0.5)), rel=1e-4)
    assert report["flops"]["per_prediction"] is None and "user's own code" in report["flops"]["convention"]
    assert report["totals"]["active_weights"] == sum(l.active for l in layers.values())
    assert report["criteria_overlap"]["criteria"]
    assert sorted(Path(p).name for p in report["plots"]) == ["snr_all.png", "snr_conv.png", "snr_head_1.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["snr_all.png", "snr_conv.png", "snr_head_1.png"]
    assert run(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "custom:" in text and "not recorded, 10 classes" in text and "FLOPs per prediction: - (not counted" in text
    assert report["notes"] == []  # every Linear and Conv2d converted (BatchNorm's weight is no layer's)
    kept = Net()
    kept.conv.padding_mode = "reflect"  # a padding the sparse conv lacks: the layer is kept as it is
    ssvi.sparsify(kept, 0.9, dense_first_conv=False)
    ssvi.save(kept, tmp_path / "kept.safetensors")
    assert run(["inspect", str(tmp_path / "kept.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [
        "72 weights in 1 weight tensor stored as they are (conv.weight: layers ssvi_cli.sparsify left unconverted), "
        "counted by neither the density nor the totals"]


def test_inspect_counts_the_weights_kept_as_they_are_as_training_counts_them(tmp_path, capsys):
    """inspect counted only tensors named *.weight: a GRU's weight_ih_l0/weight_hh_l0 and a module's own
    matrix were left out of its note, where kept_dense_weights (train's summary) counts them."""
    import json

    from ssvi_cli.core.allocation import kept_dense_weights

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.gru = nn.GRU(8, 16, batch_first=True)
            self.W = nn.Parameter(torch.randn(16, 12))  # its own matrix
            self.head = nn.Linear(12, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.gru(self.emb(tokens))[0][:, -1] @ self.W)

    model = Text()
    ssvi.sparsify(model, 0.5)
    ssvi.save(model, tmp_path / "text.safetensors")
    assert run(["inspect", str(tmp_path / "text.safetensors"), "--json"]) == 0
    (note,) = json.loads(capsys.readouterr().out)["notes"]
    kept = kept_dense_weights(model)
    assert kept == 50 * 8 + 3 * 16 * (8 + 16) + 16 * 12
    assert note.startswith(f"{kept:,} weights in 4 weight tensors stored as they are (")


def test_save_refuses_a_model_it_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="convert it with ssvi_cli.sparsify"):
        ssvi.save(Net(), tmp_path / "a.safetensors")
    net = torchvision.models.resnet18(num_classes=10)
    ssvi.sparsify(net, 0.9)
    with pytest.raises(ValueError, match=r"needs input_shape=\(C, H, W\)"):
        ssvi.save(net, tmp_path / "a.safetensors", architecture="torchvision:resnet18")
    with pytest.raises(ValueError, match="the model is not torchvision:resnet34"):
        ssvi.save(net, tmp_path / "a.safetensors", architecture="torchvision:resnet34", input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="class_names holds 2 names for a model with 10 outputs"):
        ssvi.save(net, tmp_path / "a.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32),
                  class_names=["a", "b"])
    with pytest.raises(ValueError, match="'torchvision:NAME', or None"):
        ssvi.save(net, tmp_path / "a.safetensors", architecture="resnet18", input_shape=(3, 32, 32))
    # a name ssvi would read as a checkpoint, and an input shape the model cannot take
    with pytest.raises(ValueError, match=r"a\.pt: name the model file \*\.safetensors"):
        ssvi.save(net, tmp_path / "a.pt", input_shape=(3, 32, 32))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    ssvi.sparsify(mlp, 0.5)
    with pytest.raises(ValueError, match=r"input_shape=\(3, 32, 32\): the model cannot take an input of that shape "
                                         r"\(RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        ssvi.save(mlp, tmp_path / "a.safetensors", input_shape=(3, 32, 32))
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "a.pt").exists()
    assert ssvi.save(mlp, tmp_path / "a.safetensors", input_shape=(1, 8, 8)) > 0
    with pytest.raises(ValueError, match="class_names names 'a' twice; give each output its own name"):
        ssvi.save(mlp, tmp_path / "b.safetensors", class_names=["a", "b", "a"] + [str(i) for i in range(7)])
    assert not (tmp_path / "b.safetensors").exists()
    # one number for every channel, as a sequence of one reads
    ssvi.save(mlp, tmp_path / "b.safetensors", input_shape=(1, 8, 8), mean=0.5, std=0.25)
    spec = read_header(tmp_path / "b.safetensors")["meta"]["data_spec"]
    assert (spec["mean"], spec["std"]) == ([0.5], [0.25])
    for half in ({"mean": 0.5}, {"std": 0.25}):  # one without the other would record the other as 0 or 1
        with pytest.raises(ValueError, match=r"give mean= and std= together, or neither"):
            ssvi.save(mlp, tmp_path / "c.safetensors", input_shape=(1, 8, 8), **half)
    assert not (tmp_path / "c.safetensors").exists()
    # a loaded model keeps its file's value of the one not given
    loaded = ssvi.load(tmp_path / "b.safetensors", model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    ssvi.save(loaded, tmp_path / "c.safetensors", mean=0.4)
    spec = read_header(tmp_path / "c.safetensors")["meta"]["data_spec"]
    assert (spec["mean"], spec["std"]) == ([0.4], [0.25])


def test_save_refuses_nan_or_values_its_dtype_cannot_hold_and_keeps_the_file_there(tmp_path):
    """No reader takes a file holding NaN or inf: a loop saving each epoch to one path would replace its
    last good model with one nothing loads, and find out only when it loads."""
    net = trained_net(tmp_path)
    path = tmp_path / "m.safetensors"
    good = ssvi.save(net, path)
    before = path.read_bytes()
    for tensor, entry in ((net.head[1].mu, 0), (net.bn.running_var, 3), (net.scale, ())):
        with torch.no_grad():
            kept = tensor[entry].clone()
            tensor[entry] = float("nan")
        with pytest.raises(ValueError, match=r"holds 1 non-finite value \(NaN or inf; a diverged model\?\), which no "
                                             r"reader of the file takes: nothing was written"):
            ssvi.save(net, path)
        assert path.read_bytes() == before
        with torch.no_grad():
            tensor[entry] = kept
    with torch.no_grad():
        net.head[1].mu[0] = 1e5
    with pytest.raises(ValueError, match=r"tensor 'head\.1\.mu' holds values beyond float16's range \(largest 65504\); "
                                         r"save as float32 or bfloat16"):
        ssvi.save(net, path, dtype="float16")
    assert path.read_bytes() == before
    assert ssvi.save(net, path, dtype="bfloat16") < good
    assert float(ssvi.load(path, model=Net()).head[1].mu[0].detach()) == pytest.approx(1e5, rel=1e-2)
    assert ssvi.save(net, path, dtype=torch.bfloat16) < good  # the torch dtype, as for the name (it was "unknown")
    assert read_header(path)["meta"]["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"^unknown dtype 'float64'; valid values are: float32, float16, bfloat16$"):
        ssvi.save(net, path, dtype=torch.float64)
    net.double()  # a float64 value beyond float32's range is that, not a divergence
    with torch.no_grad():
        net.head[1].mu[0] = 1e39
    with pytest.raises(ValueError, match=r"tensor 'head\.1\.mu' holds values beyond float32's range"):
        ssvi.save(net, path)


def test_evaluate_asks_for_the_dataset_of_a_file_that_records_none(tmp_path, capsys, caplog):
    net = torchvision.models.resnet18(num_classes=10)  # a file the CLI can build: a torchvision network
    ssvi.sparsify(net, 0.95)
    ssvi.save(net, tmp_path / "a.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32))
    assert run(["evaluate", str(tmp_path / "a.safetensors")]) == 2
    assert capsys.readouterr().err == ("error: the model file records no dataset (ssvi.save without dataset=); name "
                                       "the one to evaluate on with --data\n")
    # one it names that ssvi does not know: what to pass, not "did you mean digits" (which has other inputs)
    ssvi.save(net, tmp_path / "b.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32),
              dataset="mydigits")
    assert "dataset='mydigits' is not a registered dataset" in caplog.text
    assert run(["evaluate", str(tmp_path / "b.safetensors")]) == 2
    assert capsys.readouterr().err == ("error: the model file records the dataset 'mydigits', which ssvi does not "
                                       "know; name the data to evaluate on with --data: one of cifar10, cifar100, "
                                       "digits, fashion-mnist, kmnist, mnist, svhn or imagefolder:PATH (your class "
                                       "folders)\n")
    assert run(["evaluate", str(tmp_path / "b.safetensors"), "--data", "mydigitz"]) == 2  # a typo of --data's own
    assert "unknown dataset 'mydigitz'; valid names are: " in capsys.readouterr().err


def test_a_token_model_is_measured_with_token_ids(tmp_path):
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 6, 5))
    ssvi.sparsify(model, 0.5)
    with pytest.raises(ValueError, match="class_names holds 3 names for a model with 5 outputs"):
        ssvi.save(model, tmp_path / "t.safetensors", input_shape=(6,), class_names=["a", "b", "c"])
    ssvi.save(model, tmp_path / "t.safetensors", input_shape=(6,))
    assert read_header(tmp_path / "t.safetensors")["meta"]["data_spec"]["num_classes"] == 5


def test_a_torchvision_network_rebuilds_from_the_file_alone(tmp_path):
    net = torchvision.models.resnet18(num_classes=3)
    ssvi.sparsify(net, 0.95)
    net.eval()
    path = tmp_path / "r.safetensors"
    ssvi.save(net, path, architecture="torchvision:resnet18", input_shape=(3, 32, 32),
              class_names=["cat", "dog", "owl"], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dataset="pets",
              dtype="float16")
    loaded = ssvi.load(path)
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(loaded, torchvision.models.ResNet)
    # float16 values: the mean network agrees to half precision
    assert torch.allclose(ssvi.predict(net, x, mode="mean").probs, ssvi.predict(loaded, x, mode="mean").probs, atol=2e-2)
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32))
    assert run(["infer", str(path), str(tmp_path / "x.npy"), "--samples", "2", "--json",
                "--output", str(tmp_path / "pred.jsonl")]) == 0
    import json

    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2 and all(r["class"] in ("cat", "dog", "owl") for r in rows)
    assert run(["inspect", str(path), "--json"]) == 0


def test_a_failed_load_changes_nothing_and_a_parameterless_difference_is_caught(tmp_path):
    path = tmp_path / "net.safetensors"
    ssvi.save(trained_net(tmp_path), path)
    target = Net(hidden=16)  # head.1 and head.3 differ from the file; conv comes first and fits
    ssvi.sparsify(target, 0.5, deterministic=["head.3"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ssvi.ModelFileError, match="head.1"):
        ssvi.load(path, model=target)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # a torchvision network with its max-pool removed computes something else than the builder's
    net = torchvision.models.resnet18(num_classes=10)
    net.maxpool = nn.Identity()
    ssvi.sparsify(net, 0.9)
    with pytest.raises(ValueError, match="'maxpool' \\(Identity\\(\\)\\) where the builder has 'maxpool' \\(MaxPool2d"):
        ssvi.save(net, tmp_path / "r.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32))


def test_a_googlenet_with_auxiliary_classifiers_is_told_how_ssvi_builds_it(tmp_path):
    net = torchvision.models.googlenet(num_classes=10, init_weights=False)  # aux_logits=True by default
    ssvi.sparsify(net, 0.9)
    with pytest.raises(ValueError, match=r"also has 'aux1'|has 'aux1'.*\(ssvi builds torchvision:googlenet with aux_logits=False\)"):
        ssvi.save(net, tmp_path / "g.safetensors", architecture="torchvision:googlenet", input_shape=(3, 32, 32))
    plain = torchvision.models.googlenet(num_classes=10, init_weights=False, aux_logits=False)
    ssvi.sparsify(plain, 0.9)
    ssvi.save(plain, tmp_path / "g.safetensors", architecture="torchvision:googlenet", input_shape=(3, 32, 32))
    assert isinstance(ssvi.load(tmp_path / "g.safetensors"), torchvision.models.GoogLeNet)


def test_the_class_count_is_the_models_output_size_whatever_order_its_layers_are_registered_in(tmp_path, caplog):
    import logging

    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 3)
            self.body = nn.Linear(8, 16)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = HeadFirst()
    ssvi.sparsify(model, 0.5)
    model.body.eval()  # a part frozen in eval inside a training model, as when fine-tuning
    ssvi.save(model, tmp_path / "m.safetensors", input_shape=(8,))
    spec = read_header(tmp_path / "m.safetensors")["meta"]["data_spec"]
    assert spec["num_classes"] == 3 and spec["class_names"] == ["0", "1", "2"]
    # the forward that measured the output changed no module's train/eval state
    assert model.training and model.head.training and not model.body.training
    with pytest.raises(ValueError, match="class_names holds 2 names for a model with 3 outputs"):
        ssvi.save(model, tmp_path / "n.safetensors", input_shape=(8,), class_names=["a", "b"])
    # Without input_shape, names of another count than the last layer registered has outputs are warned
    # of (here the body's 16, not the head's 3: still saved, as the names say), not refused; a model
    # loaded back and saved again, its names from its file, is not warned of.
    caplog.set_level(logging.WARNING, logger="ssvi_cli.modelfile.module_io")
    ssvi.save(model, tmp_path / "n.safetensors", class_names=["a", "b", "c"])
    assert "class_names holds 3 names, and body, the last layer registered, has 16 outputs (input_shape= measures " \
           "the output, for a model of one input): the file records 3 classes" in caplog.text
    assert read_header(tmp_path / "n.safetensors")["meta"]["data_spec"]["num_classes"] == 3
    caplog.clear()
    ssvi.save(ssvi.load(tmp_path / "n.safetensors", HeadFirst()), tmp_path / "again.safetensors")
    assert "class_names" not in caplog.text
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ssvi.sparsify(mlp, 0.5)
    ssvi.save(mlp, tmp_path / "two.safetensors", class_names=["a", "b"])  # silently said 2 classes
    assert "class_names holds 2 names, and 3, the last layer registered, has 10 outputs" in caplog.text
    with pytest.raises(ValueError, match="every std positive"):
        ssvi.save(model, tmp_path / "m2.safetensors", input_shape=(8,), mean=[0.0] * 8, std=[0.0] * 8)
    assert not (tmp_path / "m2.safetensors").exists()


def test_a_class_count_taken_from_a_convolution_registered_last_is_warned_of(tmp_path, caplog):
    """A CNN whose head is registered before its convolutions, saved without class_names or
    input_shape, recorded its last convolution's 16 channels as 16 classes, without a word."""
    import logging

    class HeadFirstCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 10)
            self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)

        def forward(self, x):
            return self.head(self.c2(torch.relu(self.c1(x))).mean((2, 3)))

    model = HeadFirstCNN()
    ssvi.sparsify(model, 0.5, dense_first_conv=False)
    caplog.set_level(logging.WARNING, logger="ssvi_cli.modelfile.module_io")
    ssvi.save(model, tmp_path / "m.safetensors")
    assert "the file records 16 classes, the channels of c2, the last layer registered, a convolution; if the model's " \
           "output is another layer's, give class_names= (one per output) (input_shape= measures" in caplog.text
    for given in ({"class_names": [str(i) for i in range(10)]}, {"input_shape": (1, 8, 8)}):
        caplog.clear()
        ssvi.save(model, tmp_path / "m.safetensors", **given)
        assert read_header(tmp_path / "m.safetensors")["meta"]["data_spec"]["num_classes"] == 10
        assert "Conv2d" not in caplog.text
    caplog.clear()
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # a Linear last: no guess said
    ssvi.sparsify(mlp, 0.5)
    ssvi.save(mlp, tmp_path / "mlp.safetensors")
    # nor for a fully convolutional classifier, whose last convolution is its head (it has no Linear)
    fcn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ssvi.sparsify(fcn, 0.5, dense_first_conv=False)
    ssvi.save(fcn, tmp_path / "fcn.safetensors")
    assert caplog.text == ""


def test_a_file_whose_layer_was_untied_when_it_was_written_says_how_to_load_it(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    written = Tied()
    written.head.weight = nn.Parameter(written.head.weight.detach().clone())  # untied, so head was converted
    ssvi.sparsify(written, 0.5)
    ssvi.save(written, tmp_path / "t.safetensors")
    fresh = Tied()
    with pytest.raises(ModelFileError, match="stores layer 'head' as sparse, but in the Tied passed to load it stays "
                                             r"dense \(its weight is tied to embed's.*untie it before loading"):
        ssvi.load(tmp_path / "t.safetensors", model=fresh)
    assert type(fresh.head) is nn.Linear and fresh.head.weight is fresh.embed.weight  # left as it was
    fresh.head.weight = nn.Parameter(fresh.head.weight.detach().clone())
    assert isinstance(ssvi.load(tmp_path / "t.safetensors", model=fresh).head, SparseGaussian)


def _digits_resnet(tmp_path, **save_args):
    """An untrained torchvision ResNet-18 for 8x8 one-channel digits, saved as a digits model."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    ssvi.sparsify(net, 0.9)
    path = tmp_path / "r.safetensors"
    ssvi.save(net.eval(), path, architecture="torchvision:resnet18", input_shape=(1, 8, 8), dataset="digits",
              **save_args)
    return net, path


def test_evaluate_normalises_a_registered_dataset_as_the_file_records(tmp_path, capsys):
    # Saved with its own normalisation (raw pixels in [0, 1]), the model is scored on inputs made that
    # way, as ssvi infer feeds it, not with the digits loaders' own mean and std.
    import json

    from ssvi_cli.data import build_dataset

    net, path = _digits_resnet(tmp_path, mean=[0.0], std=[1.0])
    test = build_dataset("digits", augment=False).test
    x = test.images.float() / 16.0 if test.images.dtype == torch.uint8 else test.images.float()
    y = test.labels
    probs = ssvi.predict(net, x, mode="mean").probs.double()
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    assert run(["evaluate", str(path), "--mode", "mean", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["nll"] == pytest.approx(nll, rel=1e-5)
    assert report["metrics"]["accuracy"] == pytest.approx((probs.argmax(1) == y).double().mean().item())
    assert report["notes"] == ["the inputs were normalised as the model file records (mean [0.0], std [1.0]), not as "
                               "the loaders of digits do (mean [0.30526], std [0.37605]); if the model was trained on the "
                               "loaders' inputs, save it again with ssvi.save(..., mean=, std=) as they are",
                               # a file from one's own loop: ssvi cannot know what it was trained on
                               "the model file records no training run (saved with ssvi.save), so whether these 360 "
                               "test images (ssvi's test split of digits) were left out of its training is not known here"]
    assert run(["evaluate", str(path), "--mode", "mean", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "(torchvision:resnet18, saved for digits)" in said and "trained on digits" not in said


def test_a_registered_dataset_gives_the_default_normalisation_and_pixel_range(tmp_path, capsys, caplog):
    from ssvi_cli.data import get_spec

    digits = get_spec("digits")
    _, path = _digits_resnet(tmp_path)
    spec = read_header(path)["meta"]["data_spec"]
    assert (spec["mean"], spec["std"], spec["pixel_max"]) == (list(digits.mean), list(digits.std), 16.0)
    # so the digits' own raw array (0..16) predicts as it is
    import numpy as np
    from sklearn.datasets import load_digits

    np.save(tmp_path / "raw.npy", load_digits().images[:3])
    assert run(["infer", str(path), str(tmp_path / "raw.npy"), "--mode", "mean", "--json"]) == 0
    # without input_shape the dataset's own channels count; a shape of other channels records none, and says so
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    ssvi.sparsify(mlp, 0.5)
    ssvi.save(mlp, tmp_path / "c.safetensors", dataset="cifar10")
    assert read_header(tmp_path / "c.safetensors")["meta"]["data_spec"]["mean"] == list(get_spec("cifar10").mean)
    ssvi.save(mlp, tmp_path / "c.safetensors", dataset="digits", input_shape=(3, 4, 4))
    assert read_header(tmp_path / "c.safetensors")["meta"]["data_spec"]["mean"] == [0.0, 0.0, 0.0]
    assert "dataset='digits' has 1-channel images but input_shape (3, 4, 4) has 3 channels" in caplog.text
    # a name ssvi does not know keeps no normalisation (0 and 1)
    net = Net()
    ssvi.sparsify(net, 0.5)
    caplog.clear()
    ssvi.save(net, tmp_path / "n.safetensors", input_shape=(1, 8, 8), dataset="my-scans")
    spec = read_header(tmp_path / "n.safetensors")["meta"]["data_spec"]
    assert (spec["mean"], spec["std"], spec["pixel_max"]) == ([0.0], [1.0], 255.0)
    assert caplog.text == ""  # the user's own name: nothing to say
    # a near miss of a registered name is likely a typo that loses the normalisation: said, unless it was given
    ssvi.save(net, tmp_path / "n.safetensors", input_shape=(1, 8, 8), dataset="Digits")
    assert read_header(tmp_path / "n.safetensors")["meta"]["data_spec"]["mean"] == [0.0]
    assert ("dataset='Digits' is not a registered dataset (did you mean digits?): the file records no input "
            "normalisation; give the registered name, or mean= and std=") in caplog.text
    caplog.clear()
    ssvi.save(net, tmp_path / "n.safetensors", input_shape=(1, 8, 8), dataset="Digits", mean=0.5, std=0.2)
    assert caplog.text == ""


def test_a_normalisation_of_the_wrong_channel_count_is_refused_when_saved(tmp_path):
    net = torchvision.models.resnet18(num_classes=10)
    ssvi.sparsify(net, 0.9)
    with pytest.raises(ValueError, match="2 means and stds for inputs of 3 channels; give one of each per channel"):
        ssvi.save(net, tmp_path / "r.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32),
                  mean=[0.5, 0.5], std=[0.2, 0.2])
    assert not (tmp_path / "r.safetensors").exists()
    ssvi.save(net, tmp_path / "r.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32),
              mean=[0.5], std=[0.2])  # one for all channels


def test_a_compiled_or_data_parallel_model_saves_and_loads_as_the_plain_one(tmp_path):
    net = trained_net(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    want = ssvi.predict(net, x, mode="mean").probs
    for wrap in (lambda m: torch.compile(m, backend="eager"), nn.DataParallel):
        path = tmp_path / "w.safetensors"
        ssvi.save(wrap(net), path, input_shape=(1, 8, 8))
        meta = read_header(path)["meta"]
        assert meta["architecture"]["name"].endswith("test_module_io.Net")
        assert {r["name"] for r in meta["layers"]} == {name for name, _ in sparse_layers(net)}
        assert torch.equal(ssvi.predict(ssvi.load(path, model=Net()), x, mode="mean").probs, want)
        wrapped = wrap(Net())  # and a wrapped model, unconverted, loads the plain file and comes back wrapped
        assert ssvi.load(path, model=wrapped) is wrapped
        assert torch.equal(ssvi.predict(wrapped, x, mode="mean").probs, want)
    # DDP has registered the parameters a load would replace or resize: load first, then wrap
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = Net()  # the wrapper's shape without a process group
    with pytest.raises(ValueError, match="load into the model before wrapping it in DistributedDataParallel"):
        ssvi.load(path, model=torch.compile(ddp, backend="eager"))
    assert not sparse_layers(ddp.module)


def _card(path):
    from ssvi_cli.modelfile.card import ModelCard

    return ModelCard.from_metadata(read_header(path)["meta"])


def test_a_loaded_model_saved_again_keeps_its_architecture_and_data_description(tmp_path, capsys):
    """load -> fine-tune -> save: the file still rebuilds without code and normalises its inputs as
    before, so `ssvi infer` runs it and predicts as the model does."""
    import json

    import numpy as np

    assert run(["train", "--set", "train.epochs=1", "--set", "model.widths=[32]", "--out", str(tmp_path / "run")]) == 0
    first = tmp_path / "run" / "model.safetensors"
    model = ssvi.load(first)
    again = tmp_path / "again.safetensors"
    ssvi.save(model, again)
    old, new = _card(first), _card(again)
    assert new.architecture == old.architecture and new.data == old.data and new.data.pixel_max == 16
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 17, (3, 8, 8)).astype(np.float32))
    capsys.readouterr()
    rows = []
    for path in (first, again):
        assert run(["infer", str(path), str(tmp_path / "x.npy"), "--mode", "mean", "--output",
                    str(tmp_path / f"{path.stem}.jsonl")]) == 0
        rows.append([{k: v for k, v in json.loads(line).items() if k != "file"}
                     for line in (tmp_path / f"{path.stem}.jsonl").read_text().splitlines()])
    assert len(rows[0]) == 3 and rows[0] == rows[1]

    # a torchvision network: its normalisation travels with it, and explicit values still win
    net = torchvision.models.resnet18(num_classes=3)
    ssvi.sparsify(net, 0.95)
    tv = tmp_path / "r.safetensors"
    ssvi.save(net.eval(), tv, architecture="torchvision:resnet18", input_shape=(3, 32, 32),
              class_names=["cat", "dog", "owl"], mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), dataset="pets")
    ssvi.save(ssvi.load(tv), tmp_path / "tv2.safetensors")
    assert _card(tmp_path / "tv2.safetensors").data == _card(tv).data
    ssvi.save(ssvi.load(tv), tmp_path / "tv3.safetensors", class_names=["a", "b", "c"])
    assert _card(tmp_path / "tv3.safetensors").data.class_names == ("a", "b", "c")
    assert _card(tmp_path / "tv3.safetensors").data.mean == (0.5, 0.4, 0.3)


def test_a_model_make_model_builds_saves_as_ssvis_own_architecture_that_the_commands_run(tmp_path, capsys):
    from ssvi_cli import config
    from ssvi_cli.data import get_spec
    from ssvi_cli.training.plan import init_model, make_model

    cfg = config.from_preset("digits_mlp", {"model.widths": [16]})
    model = make_model(cfg, get_spec("digits"))  # as docs/API.md builds it for a loop of one's own
    init_model(model, cfg, torch.Generator().manual_seed(0))
    path = tmp_path / "mine.safetensors"
    ssvi.save(model, path)  # no description given: the model's own
    meta = read_header(path)["meta"]
    assert meta["architecture"]["name"] == "mlp" and meta["data_spec"]["name"] == "digits"
    capsys.readouterr()
    assert run(["evaluate", str(path), "--samples", "2", "--json"]) == 0, capsys.readouterr().err
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((3, 8, 8), np.float32))
    assert run(["infer", str(path), str(tmp_path / "x.npy"), "--json"]) == 0, capsys.readouterr().err


def test_a_loaded_model_changed_since_is_saved_as_any_other_with_a_warning(tmp_path, caplog):
    net = torchvision.models.resnet18(num_classes=3)
    ssvi.sparsify(net, 0.95)
    tv = tmp_path / "r.safetensors"
    ssvi.save(net.eval(), tv, architecture="torchvision:resnet18", input_shape=(3, 32, 32), class_names=["a", "b", "c"])
    model = ssvi.load(tv)
    model.fc = nn.Linear(512, 5)  # a new head for another task
    ssvi.sparsify(model, 0.5, dense_first_conv=False)
    with caplog.at_level("WARNING"):
        ssvi.save(model, tmp_path / "new.safetensors")
    assert "no longer has the architecture of the file it was loaded from" in caplog.text
    assert "saved without that file's architecture and data description" in caplog.text
    card = _card(tmp_path / "new.safetensors")
    assert card.architecture.name.startswith("custom:") and card.data.num_classes == 5


def test_a_head_replaced_after_sparsify_is_named_with_the_way_to_save_the_model_as_its_architecture(tmp_path, caplog):
    """A new dense head on a loaded torchvision model: saving it as torchvision:NAME says the head is
    dense and to sparsify again, which then saves a file that rebuilds without code; the warning about
    the loaded file's description does not say the architecture is dropped when it is given."""
    net = torchvision.models.resnet18(num_classes=3)
    ssvi.sparsify(net, 0.95)
    tv = tmp_path / "r.safetensors"
    ssvi.save(net.eval(), tv, architecture="torchvision:resnet18", input_shape=(3, 32, 32))
    model = ssvi.load(tv)
    model.fc = nn.Linear(512, 5)
    with pytest.raises(ValueError, match="'fc' \\(Linear.*SparseLinear\\(\\)\\); a layer replaced after "
                                         "ssvi_cli.sparsify stays dense: sparsify the model again"):
        ssvi.save(model, tmp_path / "new.safetensors", architecture="torchvision:resnet18", input_shape=(3, 32, 32))
    ssvi.sparsify(model, 0.0)  # the head alone is converted
    with caplog.at_level("WARNING"):
        ssvi.save(model.eval(), tmp_path / "new.safetensors", architecture="torchvision:resnet18",
                  input_shape=(3, 32, 32))
    assert "saved without that file's data description" in caplog.text and "architecture and" not in caplog.text
    again = ssvi.load(tmp_path / "new.safetensors")  # no code needed
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ssvi.predict(model, x, mode="mean").probs, ssvi.predict(again, x, mode="mean").probs)


def test_load_names_a_wrong_kernel_or_an_absent_gpu_as_the_callers_mistake(tmp_path):
    net = torchvision.models.resnet18(num_classes=3)
    ssvi.sparsify(net, 0.95)
    path = tmp_path / "r.safetensors"
    ssvi.save(net.eval(), path, architecture="torchvision:resnet18", input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"kernel='x'; valid values are: auto, dense, prediction, sparse"):
        ssvi.load(path, kernel="x")
    with pytest.raises(ValueError, match="device='tpu0' is not a torch device"):
        ssvi.load(path, device="tpu0")
    for meta in ("meta", torch.device("meta")):  # accepted, it gave a model with the file's values dropped
        with pytest.raises(ValueError, match="device='meta' holds no values, so the file's would be lost"):
            ssvi.load(path, device=meta)
    for other in ("mps", "xpu"):  # a backend this torch lacks: said as for CUDA, not torch's own assertion
        if other == "mps" and torch.backends.mps.is_available() or other == "xpu" and torch.xpu.is_available():
            continue
        with pytest.raises(ValueError, match=f"no {other.upper()} device is available; use device='cpu'"):
            ssvi.load(path, device=other)
    with pytest.raises(TypeError, match=r"model= is the class ResNet; pass an instance, model=ResNet\(\)"):
        ssvi.load(path, model=torchvision.models.ResNet)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available; use device='cpu'"):
            ssvi.load(path, device="cuda")


def test_a_loaded_custom_module_with_a_new_head_is_saved_without_the_old_description(tmp_path, caplog):
    net = trained_net(tmp_path)
    path = tmp_path / "net.safetensors"
    ssvi.save(net, path, input_shape=(1, 8, 8), class_names=[f"c{i}" for i in range(10)], mean=0.5, std=0.25)
    model = ssvi.load(path, model=Net())
    ssvi.save(model, tmp_path / "same.safetensors")  # unchanged: the file's description again
    assert _card(tmp_path / "same.safetensors").data == _card(path).data
    model.head[3] = nn.Linear(32, 5)  # a head for another task
    ssvi.sparsify(model, 0.5, dense_first_conv=False)
    with caplog.at_level("WARNING"):
        ssvi.save(model, tmp_path / "new.safetensors", input_shape=(1, 8, 8))
    assert "its sparse layers differ from those it was loaded with" in caplog.text
    assert _card(tmp_path / "new.safetensors").data.class_names == tuple("01234")


def test_mnasnet_whose_loader_reads_its_version_loads_from_a_file_and_a_checkpoint(tmp_path):
    """MNASNet's _load_from_state_dict refuses a state without its module version: the file and the
    checkpoint hold plain dicts of tensors, so every MNASNet run's file failed to load."""
    from ssvi_cli.runs.checkpoint import load_model_state

    net = torchvision.models.mnasnet0_5(num_classes=4)
    ssvi.sparsify(net, 0.9)
    net.eval()
    path = tmp_path / "m.safetensors"
    ssvi.save(net, path, architecture="torchvision:mnasnet0_5", input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    want = ssvi.predict(net, x, mode="mean").probs
    for loaded in (ssvi.load(path), ssvi.load(path, model=torchvision.models.mnasnet0_5(num_classes=4))):
        assert torch.allclose(ssvi.predict(loaded, x, mode="mean").probs, want, atol=1e-6)
    fresh = torchvision.models.mnasnet0_5(num_classes=4)
    ssvi.sparsify(fresh, 0.9, structure_only=True)
    load_model_state(fresh, {k: v.clone() for k, v in net.state_dict().items()})  # a checkpoint's plain dict
    assert torch.allclose(ssvi.predict(fresh.eval(), x, mode="mean").probs, want, atol=1e-6)


def test_a_plain_head_the_file_stores_dense_stays_dense_in_a_fresh_model(tmp_path):
    """load converted every Linear of a fresh model, the new plain head too, then said the file
    lacked it; and save took the class count from the last sparse layer, not the plain head."""
    def mlp(classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))

    model = mlp(10)
    ssvi.sparsify(model, 0.9)
    model[3] = nn.Linear(32, 5)  # a new plain head, as when fine-tuning
    path = tmp_path / "h.safetensors"
    ssvi.save(model, path)
    assert read_header(path)["meta"]["data_spec"]["num_classes"] == 5
    loaded = ssvi.load(path, model=mlp(5))
    assert type(loaded[3]) is nn.Linear and isinstance(loaded[1], SparseGaussian)
    x = torch.randn(3, 64)
    assert torch.allclose(ssvi.predict(loaded, x, mode="mean").probs, ssvi.predict(model.eval(), x, mode="mean").probs)

    class Aliased(nn.Module):  # the plain head registered under two names
        def __init__(self) -> None:
            super().__init__()
            self.body, self.fc = nn.Linear(8, 16), nn.Linear(16, 4)
            self.alias = self.fc

        def forward(self, x):
            return self.fc(torch.relu(self.body(x)))

    aliased = Aliased()
    ssvi.sparsify(aliased, 0.5)
    aliased.fc = aliased.alias = nn.Linear(16, 4)
    ssvi.save(aliased.eval(), tmp_path / "a.safetensors")
    fresh = ssvi.load(tmp_path / "a.safetensors", model=Aliased())
    assert type(fresh.fc) is nn.Linear and fresh.alias is fresh.fc and isinstance(fresh.body, SparseGaussian)
    assert torch.equal(fresh.fc.weight, aliased.fc.weight)


def test_save_names_a_path_or_argument_of_the_wrong_kind(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    ssvi.sparsify(model, 0.5)
    with pytest.raises(ValueError, match="is a folder; give the model file's path"):
        ssvi.save(model, tmp_path)
    with pytest.raises(TypeError, match=r"path=5: give the model file's path"):
        ssvi.save(model, 5)
    with pytest.raises(ValueError, match=r"path='': give the model file's path"):
        ssvi.save(model, "")
    (tmp_path / "x.npy").write_bytes(b"")  # a file where the path wants a folder
    with pytest.raises(OSError, match=r"cannot write .*x\.npy/a/m\.safetensors: .*x\.npy is a file, not a folder"):
        ssvi.save(model, tmp_path / "x.npy" / "a" / "m.safetensors")
    (tmp_path / "x.npy").unlink()
    with pytest.raises(TypeError, match=r"input_shape=8: give a sequence \(C, H, W\), or \(features,\)"):
        ssvi.save(model, tmp_path / "m.safetensors", input_shape=8)
    with pytest.raises(TypeError, match="class_names='abcd': give a sequence of names"):
        ssvi.save(model, tmp_path / "m.safetensors", class_names="abcd")
    assert not list(tmp_path.iterdir())
    import numpy as np

    for shape in (np.array([8]), torch.Size([8]), torch.tensor([8])):  # sizes as arrays are sizes too
        ssvi.save(model, tmp_path / "m.safetensors", input_shape=shape)
        assert read_header(tmp_path / "m.safetensors")["meta"]["data_spec"]["input_shape"] == [8]


def test_load_names_a_run_folder_a_checkpoint_or_plain_weights_for_what_they_are(tmp_path):
    assert run(["train", "--epochs", "1", "--set", "model.widths=[16]", "--set", "data.max_train=100",
                "--set", "train.eval_samples=1", "--out", str(tmp_path / "run")]) == 0
    with pytest.raises(ModelFileError, match=f"is a folder, not a model file; its run's model file is .*run/model"):
        ssvi.load(tmp_path / "run")
    checkpoint = next((tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ModelFileError, match=r"is a zip archive \(what torch.save writes: a training checkpoint, say\), "
                                             r"not an ssvi model file; ssvi export writes one from an ssvi training "):
        ssvi.load(checkpoint)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelFileError, match="write model files with 'ssvi export' or ssvi_cli.save"):
        ssvi.load(tmp_path / "plain.safetensors")


def test_a_model_file_whose_header_length_begins_with_a_zip_archives_bytes_still_reads(tmp_path):
    """The first bytes of a header length of 0x4B50 + k * 65536 read "PK", as a zip archive's do: the
    file was refused as a torch.save file."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    ssvi.sparsify(model, 0.5)
    path = tmp_path / "pk.safetensors"

    def length(pad: int) -> int:
        ssvi.save(model, path, input_shape=(8,), class_names=["a", "b", "c" * pad])
        return int.from_bytes(path.read_bytes()[:8], "little")

    pad = 1 + 0x4B50 - length(1)
    pad += next(d for d in range(-16, 17) if length(pad + d) == 0x4B50)
    assert length(pad) == 0x4B50 and path.read_bytes()[:2] == b"PK"
    assert read_header(path)["meta"]["data_spec"]["num_classes"] == 3
    ssvi.load(path, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))


def test_save_refuses_a_support_no_reader_takes(tmp_path):
    """An EMA model of torch's AveragedModel(use_buffers=True) averages idx as a number (duplicates
    after some updates): predict ran on it and save wrote a file that load refused ('has 818 indices
    but records 819 active entries')."""
    def net() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        ssvi.sparsify(model, 0.8)
        return model

    model = net()
    path = tmp_path / "m.safetensors"
    ssvi.save(model, path)
    kept = path.read_bytes()
    with torch.no_grad():
        model[0].idx[5] = model[0].idx[4]
    with pytest.raises(ValueError, match=r"^the support \(idx\) of layer '0' is not a sorted set of distinct positions "
                                         r"below 4096 \(an index averaged as a number, by torch's AveragedModel"):
        ssvi.save(model, path)
    assert path.read_bytes() == kept  # the last good file stays


def test_the_normalisation_of_an_input_that_is_no_image_is_one_value_or_one_per_feature(tmp_path):
    """save took mean=[1, 2, 3] for 30 features without a word, and wrote 30 zeros and ones where the
    docs say one of each for an input that is not an image."""
    from ssvi_cli.modelfile import read_header

    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
    ssvi.sparsify(model, 0.5)
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match=r"^mean= and std= hold 3 values for inputs of shape \(30,\): give one for all, "
                                         r"or one per feature \(30\)$"):
        ssvi.save(model, path, input_shape=(30,), mean=[1, 2, 3], std=[1, 1, 1])
    with pytest.raises(ValueError, match=r"^mean= and std= hold 7 values for inputs of shape \(30,\)"):  # std's too
        ssvi.save(model, path, input_shape=(30,), mean=0.0, std=[1] * 7)
    assert not path.exists()

    def spec() -> dict:
        return read_header(path)["meta"]["data_spec"]

    ssvi.save(model, path, input_shape=(30,))
    assert (spec()["mean"], spec()["std"]) == ([0.0], [1.0])
    ssvi.save(model, path, input_shape=(30,), mean=list(range(30)), std=[2.0] * 30)
    assert spec()["mean"] == [float(i) for i in range(30)] and spec()["std"] == [2.0] * 30
    ssvi.save(model, path, input_shape=(30,), mean=0.5, std=2)
    assert (spec()["mean"], spec()["std"]) == ([0.5], [2.0])


def test_infer_and_evaluate_refuse_a_model_of_one_output(tmp_path, capsys):
    """A regression head's softmax is 1 for every input: infer printed probability 1, entropy 0 and MI 0
    ("certain") for each input and exited 0."""
    import numpy as np

    net = torchvision.models.resnet18(num_classes=1)
    ssvi.sparsify(net, 0.9)
    path = tmp_path / "one.safetensors"
    ssvi.save(net, path, architecture="torchvision:resnet18", input_shape=(3, 16, 16))
    np.save(tmp_path / "x.npy", np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert run(["infer", str(path), str(tmp_path / "x.npy")]) == 2
    assert capsys.readouterr().err == (f"error: {path} has one output: infer predicts classes, two or more (a "
                                       "regression model's draws are taken in Python, with ssvi.sampling)\n")
    assert run(["evaluate", str(path), "--data", "cifar10"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path} has one output: evaluate scores classifiers")
    assert run(["inspect", str(path)]) == 0  # its weights and supports are still read


def test_a_path_in_the_home_folder_written_with_a_tilde_is_the_home_folders(tmp_path, monkeypatch):
    """ssvi.save(model, "~/m.safetensors") made a folder named ~ in the working directory (save makes
    the folders a path needs) and wrote the model there; load then read "~/..." from it too."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    net = Net()
    ssvi.sparsify(net, 0.5)
    ssvi.save(net.eval(), "~/models/m.safetensors", input_shape=(1, 8, 8))
    assert (home / "models" / "m.safetensors").is_file() and not any(work.iterdir())
    loaded = ssvi.load("~/models/m.safetensors", model=Net())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(ssvi.predict(loaded, x, mode="mean").probs, ssvi.predict(net, x, mode="mean").probs)


def test_a_tilde_naming_no_user_is_a_value_error_naming_it(tmp_path):
    net = Net()
    ssvi.sparsify(net, 0.5)
    for call in (lambda p: ssvi.save(net.eval(), p, input_shape=(1, 8, 8)), ssvi.load):
        with pytest.raises(ValueError, match="~nosuchuser-ssvi/m.safetensors: there is no home folder for ~nosuchuser-ssvi"):
            call("~nosuchuser-ssvi/m.safetensors")
