import json
from pathlib import Path

import pytest

from ssvi_cli import config as C
from hang_guard import time_bound


def test_override_types_and_round_trip():
    cfg = C.apply_overrides(C.Config(), {"model.widths": "64,32", "sparse.sparsity": "0.9",
                                         "data.augment": "false", "data.max_train": "null"})
    assert cfg.model.widths == (64, 32) and cfg.sparse.sparsity == 0.9 and cfg.data.augment is False
    assert C.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key,value,needle", [
    ("sparse.sparsity", 1.0, "[0, 1)"),
    ("sparse.sparsity", -0.1, "[0, 1)"),
    ("sparse.method", "magic", "valid values are: ssvi, vi, static, rigl, dense"),
    ("sparse.addition", "accumulate:x", "accumulate:N"),
    ("sparse.addition", "accumulate:0", "N ≥ 1"),  # would average no gradient: a support that never moves
    ("sparse.addition", "accumulate:200", "sparse.addition='accumulate:200' must be accumulate:N with N < delta_t=100"),
    ("train.epochs", "ten", "integer"),
    ("train.device", "tpu", "auto, cpu, cuda"),
    ("nosuch.key", 1, "valid keys are"),
    ("sparse.nosuch", 1, "valid keys in 'sparse'"),
    ("optim.lr", 0, "> 0"),
    ("train.seed", -1, "train.seed=-1 must be in [0, 4294967295]"),  # numpy refused it mid-run
    ("train.seed", 2**50, "must be in [0, 4294967295]"),               # overflowed torch's per-epoch seed mid-run
    ("train.device", "cuda:1", "pick the GPU with CUDA_VISIBLE_DEVICES=1 and --device cuda"),
    ("train.epoch", 3, "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian.epochs", 3, "unknown config key 'trian.epochs' (did you mean 'train.epochs'?)"),
    ("lr", 0.1, "unknown config key 'lr' (did you mean 'optim.lr'?)"),  # the one section with that key
    ("train.lr", 0.1, "unknown config key 'train.lr' (did you mean 'optim.lr'?)"),  # under another section
    ("optim.epochs", 3, "unknown config key 'optim.epochs' (did you mean 'train.epochs'?)"),
    ("bayes.sigma_prior", 0.1, "(did you mean 'bayes.prior_sigma'?)"),  # not sigma_param, the closest spelling
    # a close key is the answer: the 51 keys after it were too much to read
    ("optm.lr", 0.1, "unknown config key 'optm.lr' (did you mean 'optim.lr'?); 'ssvi presets NAME' lists every key"),
    ("optim.lrr", 0.1, "(did you mean 'optim.lr'?); 'ssvi presets NAME' lists every key"),
    ("OPTIM.LR", 0.1, "unknown config key 'OPTIM.LR' (did you mean 'optim.lr'?)"),  # was the list of 52 keys
    ("Train.Epochs", 3, "(did you mean 'train.epochs'?)"),
])
def test_bad_values_are_rejected_with_the_choices(key, value, needle):
    with pytest.raises(C.ConfigError) as exc:
        C.apply_overrides(C.Config(), {key: value})
    assert needle in str(exc.value)


def test_a_json_preset_is_read_as_json(tmp_path):
    """A .json preset was read as YAML: a trailing comma passed, and a key given twice was "not valid YAML"."""
    cases = {"comma": ('{"optim": {"lr": 0.1,}}', r"preset .*comma\.json is not valid JSON \(line 1, column 22\)"),
             "twice": ('{"optim": {"lr": 0.1, "lr": 0.2}}', r"preset .*twice\.json gives 'lr' twice in one object"),
             "blank": ("  \n", r"preset .*blank\.json is empty")}
    for name, (text, error) in cases.items():
        (tmp_path / f"{name}.json").write_text(text)
        with pytest.raises(C.ConfigError, match=error):
            C.load_preset(str(tmp_path / f"{name}.json"))
    (tmp_path / "good.json").write_text(json.dumps(C.Config().to_dict()))
    assert C.load_preset(str(tmp_path / "good.json")) == C.Config()


def test_a_misspelt_section_or_preset_name_gets_the_closest_one(tmp_path):
    (tmp_path / "mine.yaml").write_text("modle:\n  widths: [32]\n")
    with pytest.raises(C.ConfigError, match=r"unknown section 'modle' \(did you mean 'model'\?\); valid sections"):
        C.load_preset(str(tmp_path / "mine.yaml"))
    (tmp_path / "mine.yaml").write_text("optimizer:\n  lr: 0.01\n")  # a longer name of a section
    with pytest.raises(C.ConfigError, match=r"unknown section 'optimizer' \(did you mean 'optim'\?\); valid sections"):
        C.load_preset(str(tmp_path / "mine.yaml"))
    (tmp_path / "mine.yaml").write_text("lr: 0.01\n")  # a key written without its section
    with pytest.raises(C.ConfigError, match=r"unknown section 'lr' \(did you mean 'optim.lr', written under its "
                                            r"section\?\); valid sections"):
        C.load_preset(str(tmp_path / "mine.yaml"))
    (tmp_path / "mine.yaml").write_text("train.epochs: 3\n")  # as --set writes it
    with pytest.raises(C.ConfigError, match=r"unknown section 'train.epochs'; a file writes the key under its section: "
                                            r"train: \{epochs: 3\}$"):
        C.load_preset(str(tmp_path / "mine.yaml"))
    with pytest.raises(C.ConfigError, match=r"^preset file digits_mlp.yaml does not exist.*; the shipped preset is "
                                            r"named without its suffix: digits_mlp$"):
        C.load_preset("digits_mlp.yaml")
    with pytest.raises(C.ConfigError, match=r"^unknown preset 'digits' \(did you mean 'digits_mlp'\?\); valid names"):
        C.load_preset("digits")
    with pytest.raises(C.ConfigError, match=r"^unknown preset 'mnist' \(did you mean 'mnist_lenet5' or 'mnist_mlp'\?\)"):
        C.load_preset("mnist")  # two begin so: both
    with pytest.raises(C.ConfigError, match=r"^unknown preset 'digit' \(did you mean 'digits_mlp'\?\)"):
        C.load_preset("digit")
    with pytest.raises(C.ConfigError, match=r"^unknown preset 'cifar10' \(did you mean 'cifar10_resnet18' or "
                                            r"'cifar10_vgg19'\?\)"):  # not cifar100's
        C.load_preset("cifar10")


def test_parse_override_reads_yaml_scalars_not_code():
    key, value = C.parse_override("optim.lr=1e-3")
    assert C.apply_overrides(C.Config(), {key: value}).optim.lr == 1e-3
    assert C.parse_override("model.widths=[8, 8]") == ("model.widths", [8, 8])
    assert C.parse_override("data.name=__import__('os')")[1] == "__import__('os')"
    # YAML reads a trailing colon as a mapping, which no key takes: the text typed is meant
    assert C.parse_override("sparse.addition=accumulate:") == ("sparse.addition", "accumulate:")
    assert C.parse_override("data.name=imagefolder:") == ("data.name", "imagefolder:")
    with pytest.raises(C.ConfigError):
        C.parse_override("novalue")
    # a list cut short is refused (it trained as the text inside); text that only opens with a bracket is text
    with pytest.raises(C.ConfigError, match=r"model.widths=\[10,20: the value is not valid YAML"):
        C.parse_override("model.widths=[10,20")
    for text in ("[old]/model.safetensors", "[2024]data", "{x}y"):
        assert C.parse_override(f"data.data_dir={text}") == ("data.data_dir", text)
    # a path is read as typed: YAML ended `photos #1` at its comment, and another folder trained
    assert C.parse_override("data.name=imagefolder:/d/photos #1") == ("data.name", "imagefolder:/d/photos #1")
    assert C.parse_override("model.init_from='runs/a #1'") == ("model.init_from", "runs/a #1")  # quoted: YAML's
    assert C.parse_override("model.init_from=null") == ("model.init_from", None)
    assert C.parse_override("train.device=cpu #note") == ("train.device", "cpu")  # not a path: YAML's comment
    # the comma form reads each item as YAML does a quoted one: 'it' is it (was "'0' is not a class")
    for text in ("data.classes='0','1',2", "data.classes=['0','1',2]", 'data.classes="0", 1,2'):
        assert C.apply_overrides(C.Config(), dict([C.parse_override(text)])).data.classes == ("0", "1", "2"), text


def test_override_values_are_read_as_typed():
    """YAML 1.1 reads 010 as octal and 0x10 as hex; a --set integer is the decimal typed. Booleans
    take 1 and 0, a one-channel mean takes one number, and a comma list keeps names with spaces."""
    def override(*texts: str) -> C.Config:
        base = C.Config(data=C.DataConfig(name="imagefolder:/pictures", channels=1))
        return C.apply_overrides(base, dict(C.parse_override(t) for t in texts))

    assert override("train.epochs=010").train.epochs == 10
    for text in ("train.epochs=0b11", "optim.lr=0x10", "train.epochs=1:30"):
        with pytest.raises(C.ConfigError, match="expects"):
            override(text)
    assert override("data.augment=1").data.augment is True and override("data.augment=0").data.augment is False
    cfg = override("data.mean=0.5", "data.std=0.25")
    assert (cfg.data.mean, cfg.data.std) == ((0.5,), (0.25,))
    assert override("data.classes=my cat,dog").data.classes == ("my cat", "dog")
    assert override("model.widths=64 32").model.widths == (64, 32) == override("model.widths=[64, 32]").model.widths


def test_a_preset_files_numbers_are_read_as_a_command_line_reads_them(tmp_path):
    """A preset with ``epochs: 010`` trained 8 epochs (YAML 1.1's octal) where --set train.epochs=010
    trains ten; 0x10 was 16 where --set refuses it; 1e-3 is a number."""
    (tmp_path / "p.yaml").write_text("train:\n  epochs: 010\noptim:\n  lr: 1e-3\n")
    cfg = C.load_preset(str(tmp_path / "p.yaml"))
    assert (cfg.train.epochs, cfg.optim.lr) == (10, 0.001)
    (tmp_path / "hex.yaml").write_text("sparse:\n  delta_t: 0x10\n")
    with pytest.raises(C.ConfigError, match="delta_t"):
        C.load_preset(str(tmp_path / "hex.yaml"))
    assert C.read_yaml("a: 010\nb: [1e-3, 0.5, yes]\n") == {"a": 10, "b": [0.001, 0.5, True]}


def test_aliases_that_expand_a_file_past_any_config_or_into_itself_are_refused(tmp_path):
    """A 300-byte preset of nested aliases in train.epochs took gigabytes (the error message quoted the
    value, expanded) before a MemoryError; one that contains itself ended in a RecursionError."""
    rows = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdef", "bcdefg"):
        rows.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (tmp_path / "laughs.yaml").write_text("\n".join(rows) + "\ntrain:\n  epochs: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n")
    with time_bound(10), pytest.raises(C.ConfigError, match=r"aliases \(\*name\) expand it past 100,000 values"):
        C.load_preset(str(tmp_path / "laughs.yaml"))
    (tmp_path / "self.yaml").write_text("train: &t\n  epochs: *t\n")
    with pytest.raises(C.ConfigError, match=r"aliases \(\*name\) make a value contain itself"):
        C.load_preset(str(tmp_path / "self.yaml"))
    with pytest.raises(ValueError, match="contain itself"):
        C.read_typed("&a [*a]")
    with pytest.raises(ValueError, match="contain itself"):  # an ordered map is a list of tuples
        C.read_typed("&x !!omap [{k: *x}]")
    rows = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{n}: &{n} !!omap [{', '.join(f'{{k{i}: *{p}}}' for i in range(9))}]" for p, n in zip("abcdef", "bcdefg")]
    (tmp_path / "omap.yaml").write_text("\n".join(rows) + "\ntrain:\n  epochs: *g\n")
    with time_bound(10), pytest.raises(C.ConfigError, match=r"expand it past 100,000 values"):
        C.load_preset(str(tmp_path / "omap.yaml"))
    shared = "base: &base {lr: 0.01}\noptim:\n  <<: *base\n  name: adam\n"  # an ordinary anchor still reads
    assert C.read_yaml(shared)["optim"] == {"lr": 0.01, "name": "adam"}


def test_a_preset_that_sets_a_key_twice_is_refused_with_its_line(tmp_path):
    (tmp_path / "twice.yaml").write_text("optim:\n  lr: 0.01\n  lr_sigma: 0.003\n  lr: 0.1\n")
    with pytest.raises(C.ConfigError, match=r"not valid YAML at line 4, column 3: the key 'lr' is given twice"):
        C.load_preset(str(tmp_path / "twice.yaml"))
    # the parser's complaint, not only what it was doing ("while scanning for the next token")
    (tmp_path / "tab.yaml").write_text("model:\n  name: mlp\n\twidths: [1]\n")
    with pytest.raises(C.ConfigError, match=r"not valid YAML at line 3, column 1: found character '\\t' that cannot "
                                            r"start any token \(while scanning for the next token\)$"):
        C.load_preset(str(tmp_path / "tab.yaml"))


def test_unknown_preset_lists_valid_names():
    with pytest.raises(C.ConfigError) as exc:
        C.load_preset("nope")
    assert "digits_mlp" in str(exc.value)


PER_METHOD = """\
sparse: {method: ssvi, sparsity: 0.95}
optim: {lr: 0.005, lr_sigma: 0.002}
methods:
  ssvi: {optim: {lr: 0.01}}
  rigl: {optim: {lr: 0.02}, train: {epochs: 7}}
"""


def _preset(tmp_path, text: str = PER_METHOD):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


def test_a_preset_gives_each_method_its_own_values(tmp_path):
    from ssvi_cli.cli.train_config import build_config

    p = _preset(tmp_path)
    assert C.load_preset(p).optim.lr == 0.01  # its own method, ssvi
    vi = C.load_preset(p, "vi")
    assert (vi.sparse.method, vi.optim.lr, vi.optim.lr_sigma) == ("vi", 0.005, 0.002)
    rigl = C.load_preset(p, "rigl")
    assert (rigl.optim.lr, rigl.train.epochs, rigl.optim.lr_sigma) == (0.02, 7, 0.002)
    # the flag and --set both choose the method; the user's own values win over the preset's
    assert build_config(p, {"sparse.method": "vi"}, []).optim.lr == 0.005
    assert build_config(p, {}, ["sparse.method=rigl"]).train.epochs == 7
    assert build_config(p, {"sparse.method": "rigl"}, ["optim.lr=0.3"]).optim.lr == 0.3
    assert build_config(p, {"sparse.method": None}, []).optim.lr == 0.01


@pytest.mark.parametrize("methods,needle", [
    ("  magic: {optim: {lr: 0.1}}", "methods: unknown method 'magic'"),
    ("  vi: {optim: {lrr: 0.1}}", "methods.vi: unknown config key 'optim.lrr'"),  # checked though ssvi runs
    ("  vi: {optim: {lr: -1}}", "methods.vi: optim.lr"),
    ("  vi: {sparse: {method: ssvi}}", "methods.vi cannot set sparse.method"),
    ("  vi: {optim: 0.1}", "methods.vi: section 'optim' must be a mapping"),
    ("  vi: {command: x}", "methods.vi: unknown section 'command'; valid sections are: model, data"),
    ("  vi: 3", "methods.vi must be a mapping of sections"),
    ("  - vi", "'methods' must map method names to sections"),
    (" []", "'methods' must map method names to sections"),
])
def test_bad_per_method_values_are_one_line_errors(tmp_path, methods, needle):
    p = _preset(tmp_path, "sparse: {method: ssvi}\nmethods:" + ("\n" if methods.startswith("  ") else "") + methods + "\n")
    with pytest.raises(C.ConfigError) as exc:
        C.load_preset(p)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith(f"preset {p}: ")  # the path as given, as a YAML error names it


def test_per_method_values_belong_to_presets_only(tmp_path):
    p = _preset(tmp_path, "sparse: {method: ssvi}\nmethods:\n")  # an empty section is no values
    assert C.load_preset(p, "vi").sparse.method == "vi"
    with pytest.raises(C.ConfigError) as exc:  # a bad method name is the caller's, not the preset's
        C.load_preset(p, "VI")
    assert str(exc.value).startswith("sparse.method='VI'; valid values are: ssvi, vi")
    with pytest.raises(C.ConfigError, match="unknown section 'methods'"):  # a saved run config
        C.from_dict({"sparse": {"method": "vi"}, "methods": {"vi": {"optim": {"lr": 0.5}}}})
    base, per_method = C.preset_methods(_preset(tmp_path))
    assert base.optim.lr == 0.005 and per_method == {"ssvi": {"optim.lr": 0.01},
                                                      "rigl": {"optim.lr": 0.02, "train.epochs": 7}}


def test_the_benchmark_takes_each_methods_preset_values():
    from ssvi_cli.bench.models import bench_config, bench_model
    from ssvi_cli.bench import BenchOptions

    bm = bench_model("lenet5")  # its preset's methods: section gives vi and dense their own lr
    opts = BenchOptions(model="lenet5").resolved()
    _, per_method = C.preset_methods(bm.preset)
    assert {per_method[m]["optim.lr"] for m in ("vi", "dense")} != {C.load_preset(bm.preset).optim.lr}
    for method in ("ssvi", "vi", "dense"):
        want = per_method.get(method, {}).get("optim.lr", C.load_preset(bm.preset).optim.lr)
        assert bench_config(bm, opts, method, 0.95, "auto", 100).optim.lr == want


def test_a_recorded_config_with_image_folder_keys_on_another_dataset_still_reads():
    # New runs refuse them (the data layer, tests/test_imagefolder.py); a run recorded before that
    # rule must still resume, load and report.
    recorded = C.Config().to_dict()
    recorded["data"].update(image_size=16, channels=1, mean=[0.5])
    cfg = C.from_dict(recorded)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.mean) == ("digits", 16, (0.5,))


def test_a_list_with_an_empty_item_is_refused_and_a_one_item_tuple_read():
    """'512,,512' trained widths [512, 512] in silence; '(512,)', Python's one-item tuple, stays one item."""
    base = C.Config()
    with pytest.raises(C.ConfigError, match=r"^model.widths: '512,,512' has an empty item; remove the extra comma$"):
        C.apply_overrides(base, {"model.widths": "512,,512"})
    with pytest.raises(C.ConfigError, match="has an empty item"):
        C.apply_overrides(base, {"data.classes": "0,1,"})
    assert C.apply_overrides(base, {"model.widths": "(512,)"}).model.widths == (512,)
    assert C.apply_overrides(base, {"model.widths": "[64, 32]"}).model.widths == (64, 32)


def test_an_image_folder_is_told_by_one_test_of_its_prefix():
    assert C.image_folder("imagefolder:photos/") == "photos/" and C.image_folder("imagefolder:") == ""
    assert C.image_folder("digits") is None and C.image_folder("imagefolder") is None and C.image_folder(None) is None
    assert C.absolute_path("data.name", "imagefolder:~/x") == f"imagefolder:{Path('~/x').expanduser().resolve()}"
    assert C.absolute_path("data.name", "imagefolder:") == "imagefolder:" and C.absolute_path("data.name", "mnist") == "mnist"
