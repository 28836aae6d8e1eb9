"""--init-from torchvision:WEIGHTS, offline: torch.hub's cache under a temporary TORCH_HOME holds a file
of the right architecture under the exact name torchvision's URL ends in, and any network access fails."""

from __future__ import annotations

import json
import math
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn

from ssvi_cli.core.allocation import active_count
from ssvi_cli.core.criteria import top_k_indices
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.training.pretrained import adapt_stem_kernel, adapt_state, resolve_weights

WEIGHTS = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
CACHED = "mobilenet_v3_small-047dcff4.pth"  # the file name download.pytorch.org serves it as
STEM, HEAD = "features.0.0", "classifier.3"
HIDDEN = "classifier.0"  # a classifier layer whose shape does not depend on the classes: loaded


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub checkpoint cache; a download attempt fails as it does without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def published(hub) -> dict[str, torch.Tensor]:
    """Random ImageNet-shaped weights (1000 classes, RGB) where torchvision looks for the real ones."""
    torch.manual_seed(7)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, hub / CACHED)
    return state


def _train(tmp_path, *extra: str) -> list[str]:
    return ["train", "--model", "torchvision:mobilenet_v3_small", "--epochs", "1", "--sparsity", "0.9",
            "--set", "data.max_train=64", "--set", "train.eval_samples=1", "--set", "sparse.allocation=uniform", *extra]


def _config(init_from: str):
    from ssvi_cli import config as C

    return C.apply_overrides(C.load_preset("digits_mlp"), {
        "model.name": "torchvision:mobilenet_v3_small", "model.init_from": init_from, "sparse.sparsity": 0.9,
        "sparse.allocation": "uniform",
        "data.max_train": 64})


def test_the_cache_file_name_is_the_one_torchvision_downloads_to(hub):
    from ssvi_cli.training.pretrained import cache_file

    assert cache_file(resolve_weights("mobilenet_v3_small", "DEFAULT")) == hub / CACHED


def test_train_starts_mu_from_cached_weights_and_reinitialises_the_head(tmp_path, published, capsys):
    from ssvi_cli.cli import run
    from ssvi_cli.runs.load import load_model

    out = tmp_path / "run"
    assert run([*_train(tmp_path), "--init-from", f"torchvision:{WEIGHTS}", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"init from torchvision:{WEIGHTS}" in err
    assert f"head re-initialised ({HEAD}.weight, {HEAD}.bias: the weights' head is for 1000 classes)" in err
    assert f"{STEM}.weight summed over the 3 pretrained input channels" in err
    assert "note: --init-from starts from trained weights, which Adam at this preset's learning rate 0.01" in err
    meta = json.loads(safe_open(str(out / "model.safetensors"), "pt").metadata()["training"])
    assert meta["config"]["model"]["init_from"] == f"torchvision:{WEIGHTS}"
    assert run(["inspect", str(out / "model.safetensors")]) == 0
    shown = "".join(capsys.readouterr().out.split()).replace("│", "")  # the table may wrap the line
    assert f"startedfromtorchvision:{WEIGHTS}" in shown
    # Two steps, no subspace step yet: each loaded layer keeps the support of its largest pretrained |w|.
    layers = dict(sparse_layers(load_model(out / "model.safetensors").model))
    w = published[f"{HIDDEN}.weight"].reshape(-1)
    assert torch.equal(layers[HIDDEN].idx, top_k_indices(w.abs(), active_count(w.numel(), 0.1)))
    stem = published[f"{STEM}.weight"].sum(dim=1).reshape(-1)
    torch.testing.assert_close(layers[STEM].mu.detach(), stem, atol=0.02, rtol=0.0)


def test_train_json_carries_what_init_from_loaded(tmp_path, published, capsys):
    """--json gave a program the summary without the report of what --init-from loaded and re-initialised."""
    from ssvi_cli.cli import run

    out = tmp_path / "run"
    assert run([*_train(tmp_path), "--init-from", f"torchvision:{WEIGHTS}", "--lr", "1e-4", "--json",
                "--out", str(out)]) == 0
    said = capsys.readouterr()
    notes = json.loads(said.out)["notes"]
    assert not any("learning rate" in n for n in notes), notes  # --lr was chosen
    (note,) = [n for n in notes if n.startswith("init from")]
    assert note.startswith(f"init from torchvision:{WEIGHTS}") and f"head re-initialised ({HEAD}.weight" in note
    assert note in said.err  # and said as it came, as without --json
    assert "notes" not in json.loads((out / "summary.json").read_text())


def test_the_first_mu_is_the_pretrained_weight_and_the_head_starts_fresh(tmp_path, published):
    from ssvi_cli.training.trainer import Trainer

    layers = dict(sparse_layers(Trainer.create(_config("torchvision:DEFAULT"), tmp_path / "run").model))
    hidden, w = layers[HIDDEN], published[f"{HIDDEN}.weight"].reshape(-1)
    assert torch.equal(hidden.mu.detach(), w[hidden.idx])
    assert float(w[hidden.idx].abs().min()) >= float(w.abs().sort(descending=True).values[hidden.active - 1])
    torch.testing.assert_close(layers[STEM].mu.detach(), published[f"{STEM}.weight"].sum(dim=1).reshape(-1))
    head = layers[HEAD]
    assert head.weight_shape == (10, 1024) and head.active == active_count(10 * 1024, 0.1)
    assert torch.equal(head.bias.detach(), torch.zeros(10))
    fresh_std = math.sqrt(2.0 / 1024)  # a fresh run's init (the preset's dense_fan_in), not the builder's N(0, 0.01)
    assert abs(float(head.mu.detach().std()) / fresh_std - 1.0) < 0.15


def test_a_gray_input_through_the_summed_kernel_is_the_rgb_copy_through_the_original():
    kernel, x = torch.randn(4, 3, 3, 3), torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(nn.functional.conv2d(x, adapt_stem_kernel(kernel, 1)),
                               nn.functional.conv2d(x.repeat(1, 3, 1, 1), kernel))
    wide = adapt_stem_kernel(kernel, 4)
    assert wide.shape == (4, 4, 3, 3)
    torch.testing.assert_close(wide[:, 3], kernel[:, 0] * 0.75)
    torch.testing.assert_close(wide[:, 1], kernel[:, 1] * 0.75)


def test_rgb_data_keeps_the_stem_and_old_files_without_batch_counters_load():
    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=10)
        reference = torchvision.models.resnet18()
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "num_batches_tracked" not in k}
    adapted = adapt_state(state, model, reference)
    assert adapted.head == ("fc.weight", "fc.bias") and adapted.stem is None
    assert adapted.state["conv1.weight"].shape == (64, 3, 7, 7)
    assert int(adapted.state["bn1.num_batches_tracked"]) == 0
    assert set(adapted.state) == set(model.state_dict()) - {"fc.weight", "fc.bias"}


def test_weights_names_resolve_as_torchvision_spells_them():
    default = resolve_weights("resnet18", "DEFAULT")
    assert default is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert resolve_weights("resnet18", "ResNet18_Weights.DEFAULT") is default
    assert resolve_weights("resnet18", "IMAGENET1K_V1") is default


@pytest.mark.parametrize("weights, words", [
    ("ResNet50_Weights.IMAGENET1K_V1", "are not weights of torchvision:mobilenet_v3_small; its weights are: "
                                       "MobileNet_V3_Small_Weights.IMAGENET1K_V1, MobileNet_V3_Small_Weights.DEFAULT"),
    ("MobileNet_V3_Small_Weights.IMAGENET1K_V2", "(did you mean MobileNet_V3_Small_Weights.IMAGENET1K_V1"),
])
def test_weights_of_another_builder_or_misspelt_are_one_line(tmp_path, hub, capsys, weights, words):
    from ssvi_cli.cli import run

    assert run([*_train(tmp_path), "--init-from", f"torchvision:{weights}", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_no_network_and_no_cached_file_says_where_to_put_it(tmp_path, hub, capsys):
    from ssvi_cli.cli import run

    assert run([*_train(tmp_path), "--init-from", "torchvision:DEFAULT", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot download https://download.pytorch.org/models/" + CACHED in err, err
    assert f"put that file at {hub / CACHED}" in err and "Name or service not known" in err
    assert not (tmp_path / "bad").exists() and not (hub / CACHED).exists()


def test_a_cached_file_that_does_not_fit_names_the_first_key(tmp_path, hub, capsys):
    from ssvi_cli.cli import run

    torch.save(torchvision.models.squeezenet1_1().state_dict(), hub / CACHED)
    assert run([*_train(tmp_path), "--init-from", "torchvision:DEFAULT", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks 'features.0.0.weight'" in err and len(err.splitlines()) == 1, err
    # how far off it is, and what the file holds instead (a bare "lacks" read as a damaged file)
    counts = re.search(r"\((\d+) of the model's \1 tensors are missing, and the file holds (\d+) the model does not "
                       r"have, such as 'features\.0\.weight'\)", err)  # squeezenet's: none of mobilenet's
    assert counts, err
    mobilenet = torchvision.models.mobilenet_v3_small().state_dict()  # neither counts BatchNorm's step counters
    assert int(counts.group(1)) == sum(not k.endswith("num_batches_tracked") for k in mobilenet) - 2  # head: skipped
    assert int(counts.group(2)) == len(torchvision.models.squeezenet1_1().state_dict())  # it has no BatchNorm
    resnet = torchvision.models.resnet18().state_dict()  # one that has: its step counters are no tensors it holds
    torch.save(resnet, hub / CACHED)
    assert run([*_train(tmp_path), "--init-from", "torchvision:DEFAULT", "--out", str(tmp_path / "bad")]) == 2
    held = re.search(r"the file holds (\d+) the model does not have", capsys.readouterr().err)
    assert held and int(held.group(1)) == sum(not k.endswith("num_batches_tracked") for k in resnet) < len(resnet)
    (hub / CACHED).write_bytes(b"not a checkpoint")
    assert run([*_train(tmp_path), "--init-from", "torchvision:DEFAULT", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a readable state_dict" in err and "delete it" in err, err
    assert not (tmp_path / "bad").exists()


def test_a_state_dict_file_is_adapted_as_the_same_published_weights_are(tmp_path, published):
    """A file trained on other data (ImageNet's 1000 classes, RGB) was refused at its first mismatching
    shape, where the same weights named torchvision:WEIGHTS were adapted: the head is now re-initialised
    and the stem summed over its channels alike; a backbone saved without its head gets a new one; a
    file trained for this data loads as it is."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.data import build_dataset
    from ssvi_cli.training.init_weights import base_for, load_init_weights

    torch.save(published, tmp_path / "imagenet.pt")
    spec = build_dataset("digits", max_train=64).spec
    from_file = load_init_weights(_config(str(tmp_path / "imagenet.pt")), spec)
    from_cache = load_init_weights(_config(f"torchvision:{WEIGHTS}"), spec)
    assert from_file.state.keys() == from_cache.state.keys() and from_file.reinitialised == (f"{HEAD}.weight", f"{HEAD}.bias")
    assert all(torch.equal(from_file.state[k], from_cache.state[k]) for k in from_file.state)
    assert from_file.describe() == from_cache.describe().replace(f"torchvision:{WEIGHTS}", str(tmp_path / "imagenet.pt"))
    assert f"head re-initialised ({HEAD}.weight, {HEAD}.bias: the weights' head is for 1000 classes)" in from_file.describe()
    # tensors counted as the refusal below counts them: BatchNorm's step counters are none
    weights = sum(not k.endswith("num_batches_tracked") for k in published) - 2  # the head's two re-initialised
    assert f": {weights} tensors loaded;" in from_file.describe() and weights < len(from_file.state)
    own = base_for(_config(str(tmp_path / "own.pt")), spec).state_dict()  # trained for these 10 gray classes
    torch.save(own, tmp_path / "own.pt")
    mine = load_init_weights(_config(str(tmp_path / "own.pt")), spec)
    assert mine.reinitialised == () and mine.stem is None and all(torch.equal(mine.state[k], v) for k, v in own.items())
    backbone = {k: v for k, v in published.items() if not k.startswith(f"{HEAD}.")}  # saved without its head
    torch.save(backbone, tmp_path / "backbone.pt")
    trunk = load_init_weights(_config(str(tmp_path / "backbone.pt")), spec)
    assert trunk.reinitialised == (f"{HEAD}.weight", f"{HEAD}.bias") and "head re-initialised" in trunk.describe()
    assert f"({HEAD}.weight, {HEAD}.bias: not in the file)" in trunk.describe()
    assert all(torch.equal(trunk.state[k], from_cache.state[k]) for k in trunk.state)
    own[f"{HIDDEN}.weight"] = own[f"{HIDDEN}.weight"][:, :-1]  # another architecture: still refused, named
    torch.save(own, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=f"'{HIDDEN}.weight' has shape .* \\(the weights are for another architecture"):
        load_init_weights(_config(str(tmp_path / "other.pt")), spec)


@pytest.mark.parametrize("builder, aux", [("googlenet", ("aux1.", "aux2.")), ("inception_v3", ("AuxLogits.",))])
def test_published_auxiliary_classifiers_are_left_out(builder, aux):
    from ssvi_cli.models import torchvision_base

    # The published files hold the auxiliary classifiers; ssvi builds these networks without them.
    published = torchvision.models.get_model(builder, aux_logits=True, init_weights=False).state_dict()
    assert any(k.startswith(aux) for k in published)
    size = (3, 80, 80) if builder == "inception_v3" else (3, 32, 32)
    model, reference = torchvision_base(builder, size, 10), torchvision_base(builder, size, 1000)
    adapted = adapt_state(published, model, reference)
    assert not any(k.startswith(aux) for k in adapted.state)
    loaded = model.load_state_dict(adapted.state, strict=False)
    assert loaded.unexpected_keys == [] and sorted(loaded.missing_keys) == sorted(adapted.head) == ["fc.bias", "fc.weight"]


def test_a_state_dict_with_auxiliary_classifiers_loads_without_them(tmp_path):
    """torchvision's default GoogLeNet has auxiliary classifiers, so the state_dict a user saves has
    them: it was refused ("leave those keys out"); they are left out, as from published weights."""
    from ssvi_cli import config as C
    from ssvi_cli.data import get_spec
    from ssvi_cli.training.init_weights import load_init_weights

    path = tmp_path / "googlenet.pt"  # trained with torchvision's default heads, for this data
    torch.save(torchvision.models.googlenet(num_classes=10, init_weights=False).state_dict(), path)
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"model.name": "torchvision:googlenet",
                                                          "model.init_from": str(path)})
    spec = get_spec("digits")
    spec = type(spec)("rgb", (3, 32, 32), 10, spec.class_names, (0.0,) * 3, (1.0,) * 3)
    init = load_init_weights(cfg, spec)
    assert not any(k.startswith(("aux1.", "aux2.")) for k in init.state) and "conv1.conv.weight" in init.state
    assert "auxiliary classifiers left out (aux1, aux2: ssvi builds the network without them)" in init.describe()
    torch.save({**torch.load(path, weights_only=True), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(C.ConfigError, match=r"holds 'extra.weight', which the model does not have"):
        load_init_weights(cfg, spec)  # any other key is still refused


def test_a_wrappers_state_dict_is_read_under_its_prefix(tmp_path):
    """A LightningModule's checkpoint holds {'state_dict': {'model.conv1.weight': ...}}: it was refused
    with a bare "lacks 'conv1.weight'"; the network's keys are read under the prefix, the rest left out
    and said. A model beside its EMA copy (two prefixes) is refused naming both."""
    from ssvi_cli import config as C
    from ssvi_cli.data import get_spec
    from ssvi_cli.training.init_weights import load_init_weights

    net = torchvision.models.resnet18(num_classes=10).state_dict()
    path = tmp_path / "lightning.ckpt.pt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in net.items()}, "criterion.weight": torch.ones(10)}}, path)
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"model.name": "torchvision:resnet18",
                                                          "model.init_from": str(path)})
    spec = get_spec("digits")
    spec = type(spec)("rgb", (3, 32, 32), 10, spec.class_names, (0.0,) * 3, (1.0,) * 3)
    init = load_init_weights(cfg, spec)
    assert set(init.state) == set(net) and torch.equal(init.state["conv1.weight"], net["conv1.weight"])
    assert "the network's weights read under 'model.' (a wrapper's state_dict), 1 other tensor left out" in init.describe()
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.items() if not k.startswith("fc.")}}, path)
    headless = load_init_weights(cfg, spec)  # a wrapped backbone saved without its head: read under the prefix
    assert set(headless.state) == set(net) - {"fc.weight", "fc.bias"} and headless.reinitialised == ("fc.weight", "fc.bias")
    torch.save({**{f"model.{k}": v for k, v in net.items()},  # the network beside its backbone alone
                **{f"backbone.{k}": v for k, v in net.items() if not k.startswith("fc.")}}, path)
    assert set(load_init_weights(cfg, spec).state) == set(net)  # read under model., the one that holds it whole
    torch.save({**{f"model.{k}": v for k, v in net.items()}, **{f"ema.{k}": v for k, v in net.items()}}, path)
    with pytest.raises(C.ConfigError, match=r"holds the network under 2 prefixes \('ema.', 'model.'\)"):
        load_init_weights(cfg, spec)


def test_a_state_dict_file_read_as_users_save_it(tmp_path):
    """A wrapped model's keys (DataParallel's module., torch.compile's _orig_mod.) are unwrapped; a
    pickled whole model, a text file and an ssvi model file are each told apart in one line."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.training.init_weights import read_state_dict

    net = nn.Sequential(nn.Linear(4, 3))
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    assert set(read_state_dict(tmp_path / "ddp.pt")) == {"0.weight", "0.bias"}
    torch.save({f"_orig_mod.{k}": v for k, v in net.state_dict().items()}, tmp_path / "compiled.pt")
    assert set(read_state_dict(tmp_path / "compiled.pt")) == {"0.weight", "0.bias"}
    for nested in ("module._orig_mod.", "_orig_mod.module."):  # DDP around a compiled model, and the other way
        torch.save({f"{nested}{k}": v for k, v in net.state_dict().items()}, tmp_path / "nested.pt")
        assert set(read_state_dict(tmp_path / "nested.pt")) == {"0.weight", "0.bias"}, nested
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ConfigError, match=r"holds Python objects besides tensors .*save model.state_dict\(\) instead$"):
        read_state_dict(tmp_path / "whole.pt")
    for text in ("epoch 3: loss 0.1\n", "# notes\n\nA README, not weights.\n"):  # the second fails torch's weights-only check
        (tmp_path / "text.pt").write_text(text)
        with pytest.raises(ConfigError, match=r"is not a readable state_dict \(not a PyTorch file: neither a zip archive nor a pickle\)$"):
            read_state_dict(tmp_path / "text.pt")
    # cut short: torch's "[Errno 22] Invalid argument", and for a .safetensors file "not a file torch.save wrote"
    big = {"w": torch.zeros(64, 64)}
    torch.save(big, tmp_path / "whole_w.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole_w.pt").read_bytes()[:9000])
    with pytest.raises(ConfigError, match=r"\(a zip archive, as torch.save writes, cut short or damaged: copy or save it again\)$"):
        read_state_dict(tmp_path / "cut.pt")
    from safetensors.torch import save_file

    save_file(big, str(tmp_path / "w.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:9000])
    with pytest.raises(ConfigError, match=r"\(not a readable safetensors file: Error while deserializing"):
        read_state_dict(tmp_path / "cut.safetensors")
    import ssvi_cli as ssvi

    ssvi.sparsify(net, 0.5)
    ssvi.save(net, tmp_path / "sparse.safetensors")
    with pytest.raises(ConfigError, match="is an ssvi model file"):
        read_state_dict(tmp_path / "sparse.safetensors")


def test_a_learning_rate_for_training_from_scratch_is_noted_unless_one_was_chosen():
    """The digits preset's Adam at 0.01 took a trained ResNet-18 to chance accuracy within an epoch;
    nothing said so. Said where the command line chose no rate, and for Adam only."""
    from ssvi_cli import config as C
    from ssvi_cli.cli.train_config import build_config, init_from_lr_note

    given = {"model.init_from": "w.pt", "model.name": "torchvision:resnet18"}
    cfg = build_config("digits_mlp", given, [])
    assert "fine-tuning usually wants a rate near 1e-4 (--lr 1e-4)" in init_from_lr_note(cfg, given, [])
    assert init_from_lr_note(build_config("digits_mlp", {**given, "optim.lr": 1e-4}, []),
                             {**given, "optim.lr": 1e-4}, []) == ""
    assert init_from_lr_note(build_config("digits_mlp", given, ["optim.lr=0.01"]), given, ["optim.lr=0.01"]) == ""
    assert init_from_lr_note(C.apply_overrides(cfg, {"optim.name": "sgd"}), given, []) == ""
    assert init_from_lr_note(build_config("digits_mlp", {}, []), {}, []) == ""


def test_a_training_checkpoint_gives_the_state_dict_it_holds_under_a_known_key(tmp_path):
    """{'model': sd, 'optimizer': ...} (torchvision's reference scripts) and {'model_state_dict': sd, ...}
    (PyTorch's tutorial) were "does not hold a state_dict", naming nothing they held."""
    from ssvi_cli.config import ConfigError
    from ssvi_cli.training.init_weights import read_state_dict

    net = nn.Linear(3, 2)
    sd = net.state_dict()
    optim = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9).state_dict()
    import argparse

    args = argparse.Namespace(lr=0.1, model="resnet18", epochs=90)  # torchvision's reference scripts save it
    for layout in ({"model": sd, "optimizer": optim, "epoch": 3, "args": args},
                   {"model_state_dict": sd, "optimizer_state_dict": optim},
                   {"state_dict": sd, "epoch": 1}):
        torch.save(layout, tmp_path / "ckpt.pt")
        got = read_state_dict(tmp_path / "ckpt.pt")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"weights": sd, "epoch": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"nor one under state_dict, model_state_dict, model, net; its keys: "
                                          r"'weights', 'epoch'$"):
        read_state_dict(tmp_path / "other.pt")


def test_weights_with_nan_or_inf_are_refused_naming_the_tensor_before_a_run_folder(tmp_path, capsys):
    """The first loss would be NaN, and its error pointed at the σ and prior settings."""
    from ssvi_cli.cli import run

    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    state[f"{STEM}.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    state[f"{HIDDEN}.weight"][:2] = float("nan")
    torch.save(state, tmp_path / "both.pt")
    # the stem's kernel summed over the colours for the gray digits: 16 x 1 x 3 x 3; the first bad tensor is named
    for name, key, words in (("inf.pt", STEM, "infinite values (1 of 144)"), ("both.pt", STEM, "infinite values (1 of 144)")):
        out = tmp_path / f"run-{name}"
        assert run(_train(tmp_path, "--init-from", str(tmp_path / name), "--out", str(out))) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: --init-from {tmp_path / name}: '{key}.weight' holds {words}; the run that saved it had "
            "diverged, or the file is damaged")
        assert not out.exists()
    state = {k: v.nan_to_num(0.0, 0.0, 0.0) if v.is_floating_point() else v for k, v in state.items()}
    state[f"{HIDDEN}.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    torch.save(state, tmp_path / "head.pt")
    assert run(_train(tmp_path, "--init-from", str(tmp_path / "head.pt"), "--out", str(tmp_path / "h"))) == 2
    assert f"'{HIDDEN}.weight' holds NaN or infinite values (3 of 589,824)" in capsys.readouterr().err


def test_init_from_leaves_the_layers_kept_as_they_are_to_trains_note(monkeypatch, caplog):
    """sparsify's warning of the layers it keeps as they are (for a loop that does not print its
    report) came beside ssvi train's own note of the weights outside the sparse layers."""
    import logging

    from ssvi_cli.config import Config
    from ssvi_cli.data import get_spec
    from ssvi_cli.training import init_from

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.head = nn.Conv3d(1, 1, 1), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(x.flatten(1))

    net = Net()
    monkeypatch.setattr(init_from, "base_for", lambda cfg, spec: net)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        model = init_from.model_from_weights(Config(), get_spec("digits"), net.state_dict(), torch.Generator().manual_seed(0))
    assert [name for name, _ in sparse_layers(model)] == ["head"] and not caplog.records
