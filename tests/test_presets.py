import shlex

import pytest

from ssvi_cli import config as C
from ssvi_cli.core.criteria import criterion_names
from ssvi_cli.data import dataset_names, get_spec
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.models import MODELS

import torch

PRESETS = C.list_presets()
REQUIRED = {"digits_mlp", "mnist_lenet5", "mnist_mlp", "cifar10_resnet18", "cifar100_resnet18", "cifar10_vgg19"}


def test_required_presets_ship():
    assert REQUIRED <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_validates_and_builds(name):
    cfg = C.load_preset(name)
    assert cfg.model.name in MODELS
    assert cfg.data.name in dataset_names()
    assert cfg.sparse.criterion in criterion_names()
    command = shlex.split(C.preset_command(PRESETS[name]))
    assert command[:2] == ["ssvi", "train"]
    if name != C.DEFAULT_PRESET:
        assert command[command.index("--preset") + 1] == name
    spec = get_spec(cfg.data.name)
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(torch.randn(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)


CIFAR = ("cifar10_resnet18", "cifar100_resnet18", "cifar10_vgg19")


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_presets_are_the_papers_recipe(name):
    """All 50k training images (no validation split), 391 steps per epoch, the paper's delta_t 100
    stated explicitly and so 586 subspace steps over 200 epochs, beta / N = 0.01 / 50000."""
    import yaml

    from ssvi_cli.core.subspace import Schedule
    from ssvi_cli.data.splits import stratified_split
    from ssvi_cli.training.distributed import global_batches
    from ssvi_cli.training.optim import kl_weight

    assert yaml.safe_load(PRESETS[name].read_text())["sparse"]["delta_t"] == 100
    cfg = C.load_preset(name)
    assert cfg.data.val_fraction == 0.0 and cfg.bayes.mu_init == "fixed" and cfg.bayes.mu_init_std == 0.01

    def plan(val_fraction: float) -> tuple[int, int, Schedule]:
        train, _ = stratified_split(torch.arange(50_000) % 10, val_fraction, cfg.train.seed)
        per_epoch = len(global_batches(torch.arange(len(train)), cfg.train.batch_size, 1))
        total = per_epoch * cfg.train.epochs
        return len(train), per_epoch, Schedule.from_config(cfg.sparse, total)

    n_train, per_epoch, schedule = plan(cfg.data.val_fraction)
    assert (n_train, per_epoch, schedule.delta_t, schedule.t_end, schedule.updates) == (50_000, 391, 100, 58_650, 586)
    total = per_epoch * cfg.train.epochs
    assert kl_weight(cfg, total, total, n_train) == pytest.approx(0.01 / 50_000)
    held_n, _, held = plan(0.1)  # what the former 10% hold-out cost
    assert (held_n, held.updates) == (45_000, 527)


@pytest.mark.parametrize("name", ["cifar10_resnet18", "cifar10_vgg19"])
def test_cifar_classifier_mu_starts_at_the_reference_scale(name):
    """mu ~ N(0, 0.01^2) in every layer, the classifier included; bayes.mu_init=fan_in is the
    He-scaled init over the active fan-in (std 0.198 for 512 inputs at density 0.1)."""
    from ssvi_cli.core.layers import sparse_layers

    def classifier_std(cfg) -> float:
        model = make_model(cfg, get_spec(cfg.data.name))
        init_model(model, cfg, torch.Generator().manual_seed(0))
        (_, head), = [(n, l) for n, l in sparse_layers(model) if not l.normed]
        assert head.weight_shape[0] == 10 and head.mu.numel() > 400
        return float(head.mu.detach().std())

    cfg = C.load_preset(name)
    assert classifier_std(cfg) == pytest.approx(0.01, rel=0.15)
    fan_in = C.apply_overrides(cfg, {"bayes.mu_init": "fan_in"})
    assert classifier_std(fan_in) == pytest.approx((2 / (512 * 0.1)) ** 0.5, rel=0.15)


@pytest.mark.parametrize("name", ["mnist_mlp", "mnist_lenet5"])
def test_mnist_presets_keep_the_fan_in_init(name):
    assert C.load_preset(name).bayes.mu_init == "fan_in"


def test_digits_mu_starts_with_a_dense_layers_init_and_fan_in_scales_by_the_active_fan_in():
    """dense_fan_in (the digits preset's): N(0, 2 / fan_in), as a dense layer's He init with its
    inactive entries masked; fan_in: N(0, 2 / (fan_in * density)), larger by 1/sqrt(density)."""
    from ssvi_cli.core.layers import sparse_layers

    def stds(cfg) -> dict:
        model = make_model(cfg, get_spec(cfg.data.name))
        init_model(model, cfg, torch.Generator().manual_seed(0))
        return {n: (float(l.mu.detach().std()), l.fan_in, l.mu.numel() / l.numel) for n, l in sparse_layers(model)}

    cfg = C.load_preset("digits_mlp")
    assert cfg.bayes.mu_init == "dense_fan_in"
    dense = stds(cfg)
    active = stds(C.apply_overrides(cfg, {"bayes.mu_init": "fan_in"}))
    assert len(dense) == 3
    for name, (std, fan_in, density) in dense.items():
        assert density < 0.8
        assert std == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
        assert active[name][0] == pytest.approx((2 / (fan_in * density)) ** 0.5, rel=0.1)


@pytest.mark.parametrize("name,sparse_lr,dense_lr", [("mnist_mlp", 0.003, 0.003), ("mnist_lenet5", 0.01, 0.005)])
def test_mnist_presets_learning_rates_per_method(name, sparse_lr, dense_lr):
    """The values docs/SWEEP.md chose (and the README's preset table states)."""
    for method in ("ssvi", "static", "rigl"):
        cfg = C.load_preset(name, method)
        assert (cfg.sparse.method, cfg.optim.lr, cfg.sparse.allocation) == (method, sparse_lr, "erk")
    for method in ("vi", "dense"):
        assert C.load_preset(name, method).optim.lr == dense_lr
    assert C.load_preset(name).sparse.method == "ssvi"


def test_config_md_lists_every_key_with_its_default():
    """docs/CONFIG.md is the reference of the keys --set names: each one, once, with the default a
    preset that leaves it out gets, and the allowed values a choice key takes."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \| ([^|]*) \|", text, flags=re.M)
    documented = {key: default for key, default, _ in rows}
    assert len(documented) == len(rows), "a key is listed twice"

    def shown(value):
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        if value is None or isinstance(value, bool):
            return {None: "null", True: "true", False: "false"}[value]
        return str(value)

    defaults = {k: shown(v) for k, v in C.flat_dict(C.Config()).items()}
    assert documented == defaults
    values = {key: cell for key, _, cell in rows}
    for key, options in (("sparse.method", C.METHODS.names()),
                         ("sparse.allocation", C.ALLOCATIONS), ("bayes.sigma_param", C.SIGMA_PARAMS),
                         ("bayes.mu_init", C.MU_INITS), ("optim.name", C.OPTIMIZERS), ("optim.schedule", C.SCHEDULES),
                         ("train.device", C.DEVICES), ("train.kernel", C.KERNELS), ("train.precision", C.PRECISIONS),
                         ("sparse.new_sigma", C.NEW_SIGMA), ("sparse.criterion", criterion_names()),
                         ("model.name", sorted(MODELS)), ("data.name", dataset_names())):
        assert set(re.findall(r"`([a-z0-9_-]+)`", values[key])) >= set(options), key


def test_presets_name_prints_every_key_it_trains_with(capsys, tmp_path):
    """ssvi presets NAME: the config a preset trains with, as YAML that --preset reads back, or JSON."""
    import json

    import yaml

    from ssvi_cli.cli import run

    assert run(["presets", "digits_mlp"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# ssvi train --preset digits_mlp trains with")
    assert C.from_dict(yaml.safe_load(text)) == C.load_preset("digits_mlp")
    assert run(["presets", "mnist_lenet5", "--method", "vi"]) == 0
    assert capsys.readouterr().out.startswith("# ssvi train --preset mnist_lenet5 --method vi trains with these "
                                              "values, the preset's methods: section for vi applied (change one")
    assert run(["presets", "--json"]) == 0  # a methods: section in one shape, the preset file's, as below
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["mnist_lenet5"]["methods"]["vi"] == {"optim": {"lr": 0.005}}
    assert run(["presets", "mnist_lenet5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["methods"] == listed["mnist_lenet5"]["methods"]
    assert run(["presets", "mnist_lenet5", "--method", "vi", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 0.005 and shown["sparse"]["method"] == "vi"
    assert C.from_dict(shown) == C.load_preset("mnist_lenet5", "vi")
    # saved and read back with --preset FILE, it trains every method as the preset does (its methods: too)
    assert run(["presets", "mnist_lenet5"]) == 0
    (tmp_path / "mine.yaml").write_text(capsys.readouterr().out)
    for method in C.METHODS.names():
        assert C.load_preset(str(tmp_path / "mine.yaml"), method) == C.load_preset("mnist_lenet5", method), method
    for args, words in ((["nope"], "unknown preset 'nope'"), (["--method", "vi"], "give the preset's NAME too"),
                        (["digits_mlp", "--method", "foo"], "valid values are: ssvi, vi")):
        assert run(["presets", *args]) == 2
        said = capsys.readouterr().err
        assert words in said and len(said.strip().splitlines()) == 1, said


def test_presets_name_marks_the_keys_a_run_of_it_does_not_use(capsys, tmp_path):
    """digits_mlp printed `augment: true` and `dense_stem: true` as what it trains with: the digits take no
    augmentation and an MLP has no first conv. Such keys say so, with why; the keys a run uses do not."""
    from ssvi_cli.cli import run

    def marked(*args: str) -> dict[str, str]:
        assert run(["presets", *args]) == 0
        text = capsys.readouterr().out
        return {line.split(":")[0].strip(): line.partition("# not used: ")[2] for line in text.splitlines()
                if "# not used: " in line}

    digits = marked("digits_mlp")
    assert digits == {"dense_stem": "mlp has no first conv", "augment": "digits has no augmentation",
                      **dict.fromkeys(("test_fraction", "image_size", "channels", "mean", "std"), "image folders only"),
                      "min_subspace_steps": "sparse.delta_t=auto only", "momentum": "adam takes no momentum",
                      "mu_init_std": "bayes.mu_init=fixed only (mlp has no BatchNorm)"}
    cifar = marked("cifar10_resnet18")
    assert cifar["widths"] == "the hidden layers of mlp only" and "augment" not in cifar and "dense_stem" not in cifar
    assert "momentum" not in cifar and "mu_init_std" not in cifar  # SGD's; BatchNorm's layers start with it
    assert "mu_init_std" in marked("mnist_lenet5")  # no BatchNorm either
    vi = marked("mnist_lenet5", "--method", "vi")
    assert vi["sparsity"] == vi["delta_t"] == vi["dense_stem"] == "--method vi does not use it" and "beta" not in vi
    assert "beta" in marked("mnist_lenet5", "--method", "rigl") and "lr" not in vi
    for size, words in ((8, "images under 16 pixels take no augmentation"), (32, "")):
        folder = tmp_path / f"mine{size}.yaml"
        folder.write_text(f"data: {{name: 'imagefolder:{tmp_path / 'absent'}', image_size: {size}}}\n")
        assert marked(str(folder)).get("augment", "") == words and "image_size" not in marked(str(folder))


def test_presets_file_refuses_what_train_would_refuse_before_reading_data(capsys, tmp_path):
    """ssvi presets FILE printed "ssvi train --preset FILE trains with these values" for a file naming
    a model or dataset that does not exist, or keys train refuses; train then failed at once."""
    from ssvi_cli.cli import run

    (tmp_path / "junk.pt").write_text("junk")  # neither a trained ssvi model nor weights
    cases = {"model: {name: resnet}": "unknown model 'resnet'; valid names are",
             "data: {name: cifar11}": "unknown dataset 'cifar11'",
             "data: {image_size: 16}": "data.image_size=16 applies to image folders",
             "model: {name: lenet5}\ndata: {name: digits}": "lenet5 needs inputs of at least 12x12, got 8x8",
             "data: {name: digits}\nmethods: {vi: {model: {name: lenet5}}}":
                 "with its methods: section's vi: lenet5 needs inputs of at least 12x12",
             "data: {name: digits}\nmodel: {name: mlp, init_from: runs/not-here}":
                 "runs/not-here: no such file or run directory",
             "data: {name: digits}\nmodel: {name: mlp, init_from: 'torchvision:DEFAULT'}":
                 "--init-from torchvision:DEFAULT names torchvision's published weights, which start only a "
                 "torchvision:NAME model, not 'mlp'",
             f"data: {{name: digits}}\nmodel: {{name: mlp, init_from: '{tmp_path / 'junk.pt'}'}}":
                 "junk.pt is not a trained ssvi model",
             "data: {name: digits}\nmodel: {name: 'torchvision:resnet18', init_from: 'torchvision:NOPE'}":
                 "NOPE"}
    for i, (text, words) in enumerate(cases.items()):
        path = tmp_path / f"p{i}.yaml"
        path.write_text(text + "\n")
        assert run(["presets", str(path)]) == 2, text
        said = capsys.readouterr().err
        assert words in said and len(said.strip().splitlines()) == 1, said
        method = ["--method", "vi"] if "methods:" in text else []
        assert run(["train", "--preset", str(path), *method, "--out", str(tmp_path / f"r{i}")]) == 2
        assert words.rpartition("vi: ")[2] in capsys.readouterr().err  # the same refusal
    assert not any(tmp_path.glob("r*"))
    assert run(["presets", str(tmp_path / "p3.yaml"), "--method", "vi"]) == 2  # the file names no methods: section
    assert "error: with --method vi: lenet5 needs inputs of at least 12x12" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere.yaml"  # written for another machine's image folder: shown, not read
    elsewhere.write_text(f"model: {{name: mlp}}\ndata: {{name: 'imagefolder:{tmp_path / 'not-here'}'}}\n")
    assert run(["presets", str(elsewhere)]) == 0
    assert capsys.readouterr().out.startswith(f"# ssvi train --preset {elsewhere} trains with these values")
    elsewhere.write_text(f"model: {{name: resnet}}\ndata: {{name: 'imagefolder:{tmp_path / 'not-here'}'}}\n")
    assert run(["presets", str(elsewhere)]) == 2 and "unknown model 'resnet'" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("model: {name: mlp, widths: [8]}\ndata: {name: digits}\n")
    assert run(["presets", str(good)]) == 0
    assert capsys.readouterr().out.startswith(f"# ssvi train --preset {good} trains with these values")


def test_presets_file_says_the_recipe_keys_it_leaves_to_the_schema_as_train_does(capsys, tmp_path):
    from ssvi_cli.cli import run

    path = tmp_path / "part.yaml"
    path.write_text("model: {name: mlp}\n")
    assert run(["presets", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "prior_sigma: 0.005" in out  # the values it trains with, as ever
    assert err.startswith(f"note: {path} does not set optim.name, bayes.prior_sigma, train.epochs, so the run takes "
                          "the schema's defaults for them")


def test_the_preset_file_config_md_shows_is_one_presets_checks_and_takes(tmp_path, capsys):
    """docs/CONFIG.md's example of a preset file is read as ssvi train reads it, with no note of
    a recipe key left to the schema's defaults."""
    import re
    from pathlib import Path

    from ssvi_cli.cli import run

    text = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    (tmp_path / "mine.yaml").write_text(example)
    assert run(["presets", str(tmp_path / "mine.yaml"), "--json"]) == 0
    said = capsys.readouterr()
    assert "note:" not in said.err
    cfg = C.load_preset(str(tmp_path / "mine.yaml"))
    assert tuple(cfg.model.widths) == (256, 128) and cfg.sparse.delta_t == "auto"
    assert C.load_preset(str(tmp_path / "mine.yaml"), "vi").optim.lr == 0.003
