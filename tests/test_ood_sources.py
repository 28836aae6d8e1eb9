"""Training on part of the classes (``data.classes``) and OOD sets from anywhere, end to end through
the CLI: ``--ood heldout``, ``--ood NAME=DIR``, ``--ood DIR`` (images) and ``--ood FILE.npy``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

from ssvi_cli.cli import run
from ssvi_cli.config import ConfigError, apply_overrides, Config, parse_override
from ssvi_cli.data import get_spec
from ssvi_cli.data.ood import parse_ood
from ssvi_cli.data.spec import DataError
from ssvi_cli.runs.load import load_model
from tests.fixtures_torchvision import accept_fixture_checksums, write_mnist, write_svhn

FAST = ("--sparsity", "0.95", "--epochs", "3", "--set", "train.eval_samples=2")
DIGITS_TEST = 360  # the fixed digits test split; 181 of its images are digits 0-4


def _train(folder: Path, *args: str) -> Path:
    fast = FAST[:2] + FAST[4:] if "--epochs" in args else FAST  # a flag given twice is refused
    assert run(["train", "--out", str(folder), *fast, *args, "--json"]) == 0
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def subset_model(tmp_path_factory) -> Path:
    """A digits MLP trained on the digits 0-4 only."""
    return _train(tmp_path_factory.mktemp("subset") / "run", "--set", "data.classes=0,1,2,3,4")


@pytest.fixture(scope="module")
def full_model(tmp_path_factory) -> Path:
    """A digits MLP trained on all ten digits (one epoch: only its errors are tested)."""
    folder = tmp_path_factory.mktemp("full") / "run"
    assert run(["train", "--out", str(folder), "--epochs", "1", "--set", "train.eval_samples=1", "--json"]) == 0
    return folder / "model.safetensors"


def _evaluate(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report(capsys, model: Path, *ood: str, extra: tuple[str, ...] = ()) -> dict:
    args = [a for name in ood for a in ("--ood", name)]
    code, out, err = _evaluate(capsys, str(model), *args, "--samples", "4", *extra, "--json")
    assert code == 0, err
    return json.loads(out)


def _check_ood_block(block: dict, n: int) -> None:
    assert block["n"] == n
    assert set(block["scores"]) == {"entropy", "mutual_information", "one_minus_max_prob"}
    for values in block["scores"].values():
        assert set(values) == {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"}
        assert 0.0 <= values["auroc"] <= 1.0


# ----------------------------------------------------------------------------- data.classes


def test_subset_model_knows_five_classes_and_records_all_ten(subset_model):
    loaded = load_model(subset_model)
    assert loaded.spec.num_classes == 5 and loaded.spec.class_names == ("0", "1", "2", "3", "4")
    assert loaded.spec.dataset_classes == tuple(str(i) for i in range(10))
    assert loaded.spec.held_out_classes == ("5", "6", "7", "8", "9")
    config = yaml.safe_load((subset_model.parent / "config.yaml").read_text())
    assert config["data"]["classes"] == ["0", "1", "2", "3", "4"]


def test_classes_override_is_one_knob_read_as_strings():
    key, value = parse_override("data.classes=0,1,2,3,4")
    assert apply_overrides(Config(), {key: value}).data.classes == ("0", "1", "2", "3", "4")
    assert apply_overrides(Config(), {"data.classes": [7, "3"]}).data.classes == ("7", "3")
    assert apply_overrides(Config(), {"data.classes": "null"}).data.classes is None
    for bad in ("3", "1,1", ""):
        with pytest.raises(ConfigError, match="data.classes"):
            apply_overrides(Config(), {"data.classes": bad})


@pytest.mark.parametrize("classes, words", [
    ("0,10", "'10' is not a class of digits; valid are 0..9"),
    ("2,two", "'two' is not a class of digits"),
    ("4,4", "naming each class once"),
    ("4", "at least two classes"),
])
def test_bad_class_lists_are_one_line_errors_before_anything_is_written(classes, words, capsys, tmp_path):
    capsys.readouterr()
    code = run(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--set", f"data.classes={classes}"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- --ood heldout


def test_heldout_scores_the_other_classes_of_the_test_split(capsys, subset_model):
    doc = _report(capsys, subset_model, "heldout", "noise")
    assert doc["n"] == 181 and doc["metrics"]["accuracy"] > 0.5  # digits 0-4 of the test split
    _check_ood_block(doc["ood"]["heldout"], DIGITS_TEST - 181)
    _check_ood_block(doc["ood"]["noise"], 2000)
    assert list(doc["per_samples"][0]["ood"]) == ["heldout", "noise"]
    info = doc["model_info"]  # which part of the dataset it learnt, beside its name
    assert (info["trained_on"], info["trained_classes"], info["dataset_classes"]) == ("digits", list("01234"),
                                                                                   list("0123456789"))
    code, out, _ = _evaluate(capsys, str(subset_model), "--samples", "2")
    assert code == 0 and "trained on digits (5 of its 10 classes: 0, 1, 2, 3, 4)" in " ".join(out.split())


def test_heldout_is_capped_and_seeded_like_every_ood_set(subset_model):
    from ssvi_cli.evaluation import inputs

    loaded = load_model(subset_model)
    first, again, other = (inputs.load_eval_data(loaded.spec, loaded.card.training, ood=("heldout",), seed=s,
                                                    ood_max_items=50).ood["heldout"] for s in (0, 0, 1))
    assert len(first) == 50 and (first.images == again.images).all() and not (first.images == other.images).all()


def test_heldout_for_a_model_of_all_classes_says_to_train_with_data_classes(capsys, full_model):
    code, out, err = _evaluate(capsys, str(full_model), "--ood", "heldout")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "all 10 classes of digits" in err and "--set data.classes=0,1,2,3,4 " in err


def test_the_retrain_hint_names_classes_the_dataset_has():
    from ssvi_cli.data.classes import resolve_classes
    from ssvi_cli.evaluation.ood_sets import _retrain_hint

    spec = dataclasses.replace(get_spec("digits"), num_classes=3, class_names=("a", "b", "c"))
    assert "--set data.classes=0,1 (" in _retrain_hint(spec)  # a classifier needs two classes
    assert "data.classes=0,1,2 (" in _retrain_hint(dataclasses.replace(spec, num_classes=6, class_names=tuple("abcdef")))
    assert "2 classes, too few" in _retrain_hint(dataclasses.replace(spec, num_classes=2, class_names=("a", "b")))
    hinted = _retrain_hint(spec).split("data.classes=")[1].split()[0].split(",")
    assert resolve_classes(hinted, spec.class_names, spec.name) == (0, 1)  # the hint is a list ssvi takes


def test_a_class_list_of_every_class_leaves_nothing_held_out(capsys, tmp_path):
    model = _train(tmp_path / "all", "--set", "data.classes=9,8,7,6,5,4,3,2,1,0", "--epochs", "1")
    assert load_model(model).spec.class_names[0] == "9"
    code, _, err = _evaluate(capsys, str(model), "--ood", "heldout")
    assert code == 2 and "none is held out" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- --ood PATH


def _pngs(folder: Path) -> int:
    """Images of several sizes and modes, one in a subfolder, plus files that are not images."""
    rng = np.random.default_rng(0)
    (folder / "more").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)).save(folder / "more" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "more" / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / ".hidden" / "skipped.png")
    (folder / "notes.txt").write_text("not an image\n")
    return 4


def test_folder_of_images_of_any_size_and_mode(capsys, subset_model, tmp_path):
    n = _pngs(tmp_path / "mine")
    doc = _report(capsys, subset_model, str(tmp_path / "mine"))
    _check_ood_block(doc["ood"][str(tmp_path / "mine")], n)


def test_every_unreadable_file_of_an_ood_folder_is_named_at_once(capsys, subset_model, tmp_path):
    """evaluate stopped at the first image of an --ood folder that did not decode."""
    n = _pngs(tmp_path / "mine")
    for i in range(3):
        (tmp_path / "mine" / f"broken{i}.png").write_text("not an image\n")
    code, out, err = _evaluate(capsys, str(subset_model), "--ood", str(tmp_path / "mine"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    broken = [tmp_path / "mine" / f"broken{i}.png" for i in range(3)]
    assert (f"3 of {n + 3} files drawn from {tmp_path / 'mine'} cannot be read: image {broken[0]} cannot be read "
            f"(not an image format Pillow knows); also {broken[1]}, {broken[2]}; replace or remove them") in err, err
    np.save(tmp_path / "mine" / "a_two_channels.npy", np.zeros((3, 2, 8, 8), np.uint8))  # an array too
    code, out, err = _evaluate(capsys, str(subset_model), "--ood", str(tmp_path / "mine"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"4 of {n + 4} files of {tmp_path / 'mine'} cannot be read: --ood {tmp_path / 'mine' / 'a_two_channels.npy'}"
            in err and f"also {broken[0]}, {broken[1]}, {broken[2]}; replace" in err), err


def test_a_folder_draws_alike_however_its_path_is_written(capsys, subset_model, tmp_path, monkeypatch):
    """A sweep records an OOD path absolute; ``ssvi evaluate --ood mine`` typed in its parent folder
    scores the same set with the same Monte Carlo draws, so the numbers agree."""
    _pngs(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    scores = [_report(capsys, subset_model, text)["ood"][text]["scores"]
              for text in ("mine", "./mine", str(tmp_path / "mine"), f"{tmp_path}/mine/more/..")]
    assert all(s == scores[0] for s in scores[1:]), scores
    # LABEL=PATH: the same set and draws, named by its label in the report (a whole path made wide tables)
    doc = _report(capsys, subset_model, f"photos={tmp_path / 'mine'}")
    assert list(doc["ood"]) == ["photos"] and doc["ood"]["photos"]["scores"] == scores[0]
    np.save(tmp_path / "arr.npy", np.zeros((3, 8, 8), np.uint8))
    assert list(_report(capsys, subset_model, "blank=arr.npy")["ood"]) == ["blank"]


@pytest.mark.parametrize("make", [
    lambda rng: rng.integers(0, 256, (6, 8, 8), dtype=np.uint8),                 # (N, H, W) uint8
    lambda rng: rng.random((6, 1, 8, 8)).astype(np.float32),                      # (N, C, H, W) in [0, 1]
    lambda rng: rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8),            # (N, H, W, C) RGB, resized
    lambda rng: rng.integers(0, 17, (6, 8, 8)).astype(np.float64),               # the digits' own 0..16
    lambda rng: rng.integers(0, 17, (6, 64)).astype(np.float64),                 # flattened, as load_digits().data
], ids=["NHW-uint8", "NCHW-unit-float", "NHWC-rgb", "digits-raw-range", "flattened"])
def test_npy_array_of_the_users_inputs(capsys, subset_model, tmp_path, make):
    path = tmp_path / "inputs.npy"
    np.save(path, make(np.random.default_rng(1)))
    doc = _report(capsys, subset_model, str(path))
    _check_ood_block(doc["ood"][str(path)], 6)


def test_an_arrays_layouts_read_as_the_same_images_and_a_capped_set_draws_rows_by_seed(tmp_path):
    """The test above checks counts and keys only: (N, H, W, C) read with H and W swapped passed it."""
    from ssvi_cli.data import get_spec
    from ssvi_cli.evaluation.ood_sets import array_images

    spec = get_spec("digits")
    rgb = np.random.default_rng(0).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    gray = rgb[:, :1]
    layouts = {"nchw": rgb, "nhwc": rgb.transpose(0, 2, 3, 1), "gray_nchw": gray, "gray_nhw": gray[:, 0],
               "gray_nhwc": gray.transpose(0, 2, 3, 1), "flat": gray.reshape(6, 64)}
    read = {}
    for name, arr in layouts.items():
        np.save(tmp_path / f"{name}.npy", arr)
        read[name] = array_images(tmp_path / f"{name}.npy", spec, 0, None)
    full = read["gray_nchw"]
    assert full.shape == (6, 1, 8, 8) and torch.equal(read["nchw"], read["nhwc"])
    assert all(torch.equal(read[name], full) for name in ("gray_nhw", "gray_nhwc", "flat"))
    assert not torch.equal(full, full.transpose(-1, -2))  # not symmetric: a swap of H and W shows
    # the same pixels as the gray images normalised as the digits' test split is
    assert torch.allclose(full, (torch.from_numpy(gray).float() / 255 - spec.mean[0]) / spec.std[0], atol=1e-5)
    drawn = {seed: array_images(tmp_path / "gray_nhw.npy", spec, seed, 3) for seed in (0, 1)}
    for some in drawn.values():  # three distinct rows of the array, in its order
        rows = [next(i for i in range(6) if torch.equal(full[i], image)) for image in some]
        assert len(rows) == 3 and rows == sorted(set(rows))
    assert not torch.equal(drawn[0], drawn[1])


def test_a_square_array_of_flattened_inputs_is_read_so_with_the_warning_infer_gives(capsys, subset_model, tmp_path,
                                                                                     caplog):
    # (64, 64) for the digits: 64 flattened inputs, or one 64x64 picture; a folder's file and infer said
    # which reading they took, the array given whole did not
    import logging

    path = tmp_path / "square.npy"
    np.save(path, np.random.default_rng(2).integers(0, 17, (64, 64)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.evaluation.arrays"):
        doc = _report(capsys, subset_model, str(path))
    assert doc["ood"][str(path)]["n"] == 64
    assert [r.getMessage() for r in caplog.records] == [
        f"--ood {path}: an array of shape (64, 64) is read as 64 flattened inputs of 64 values each; a 64x64 gray "
        "picture reads as one image saved as (1, 64, 64) or as a PNG"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts this process's open files in /proc")
def test_a_folder_of_many_arrays_holds_no_file_open_per_array(subset_model, tmp_path, monkeypatch):
    """Each mapped array held its file open while the folder was drawn from: a folder of 1,100 arrays ran out
    of open files under the common limit of 1,024 (--ood DIR said 83 of them "cannot be read")."""
    import os

    import ssvi_cli.evaluation.ood_sets as ood_sets

    folder = tmp_path / "arrays"
    folder.mkdir()
    for i in range(60):
        np.save(folder / f"{i:03d}.npy", np.full((2, 8, 8), i, np.uint8))
    most, real = [0], ood_sets._folder_array

    def counted(path, spec):  # the open files at each array read
        most[0] = max(most[0], len(os.listdir("/proc/self/fd")))
        return real(path, spec)

    monkeypatch.setattr(ood_sets, "_folder_array", counted)
    before = len(os.listdir("/proc/self/fd"))
    images = ood_sets.folder_images(folder, load_model(subset_model).spec, seed=0, max_items=None)
    assert len(images) == 120 and most[0] - before < 10


def test_a_folder_of_arrays_and_images_reads_as_ssvi_infer_reads_it(capsys, subset_model, tmp_path):
    """--ood DIR of .npy files was refused as a folder without images; each file is now one image or a
    batch by infer's rules, in infer's order, so the OOD set is the inputs infer would predict."""
    import torch

    from ssvi_cli.data import preprocess
    from ssvi_cli.evaluation.infer import expand_inputs, iter_raw
    from ssvi_cli.evaluation.ood_sets import _choose, folder_images

    rng = np.random.default_rng(2)
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    np.save(folder / "a.npy", rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))        # a batch of three
    np.save(folder / "sub" / "b.npy", rng.random((4, 1, 8, 8)).astype(np.float32))   # a batch of four
    np.save(folder / "c.npy", rng.integers(0, 256, (8, 8), dtype=np.uint8))          # one gray image
    np.save(folder / "d.npy", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))       # one colour image
    n = 9 + _pngs(folder)
    spec = get_spec("digits")
    as_infer = torch.cat([preprocess(pixels, spec) for _, _, pixels in
                          iter_raw(expand_inputs([folder]), spec.input_shape[0], spec.pixel_max, spec.input_shape)])
    assert len(as_infer) == n
    assert torch.equal(folder_images(folder, spec, 0, None), as_infer)
    assert torch.equal(folder_images(folder, spec, 0, 5), as_infer[torch.from_numpy(_choose(n, 0, 5))])
    _check_ood_block(_report(capsys, subset_model, str(folder))["ood"][str(folder)], n)
    np.save(folder / "bad.npy", np.zeros((2, 5, 8, 8)))
    code, _, err = _evaluate(capsys, str(subset_model), "--ood", str(folder))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--ood {folder / 'bad.npy'}: array of shape (2, 5, 8, 8) has no 1, 3 or 4 channel axis" in err


def test_npy_far_from_the_data_is_detected_better_than_heldout(capsys, subset_model, tmp_path):
    path = tmp_path / "white.npy"
    np.save(path, np.full((20, 8, 8), 255, dtype=np.uint8))  # all-white squares: nothing like a digit
    doc = _report(capsys, subset_model, str(path), "heldout")
    assert doc["ood"][str(path)]["scores"]["entropy"]["auroc"] > doc["ood"]["heldout"]["scores"]["entropy"]["auroc"]


# ----------------------------------------------------------------------------- --ood NAME=DIR


def test_torchvision_sets_read_from_their_own_folders(capsys, subset_model, tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist-here", "MNIST", n_test=15)
    write_svhn(tmp_path / "svhn-here", n_test=12)
    accept_fixture_checksums(monkeypatch, tmp_path / "svhn-here")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    doc = _report(capsys, subset_model, f"mnist={tmp_path / 'mnist-here'}", f"svhn={tmp_path / 'svhn-here'}",
                  extra=("--data-dir", str(empty)))
    _check_ood_block(doc["ood"]["mnist"], 15)
    _check_ood_block(doc["ood"]["svhn"], 12)
    code, _, err = _evaluate(capsys, str(subset_model), "--ood", "mnist", "--data-dir", str(empty))
    assert code == 2 and "mnist not found" in err  # a plain name still reads --data-dir


def test_a_torchvision_set_given_as_its_own_folder_or_with_bad_labels_is_named_so(capsys, subset_model, tmp_path):
    """mnist=d/MNIST was told to fix --data-dir, which it never gave; labels of 12 in its files read as
    'cannot be converted to the model's input (1, 8, 8)'."""
    import struct

    raw = write_mnist(tmp_path / "d", "MNIST", n_test=15)
    code, _, err = _evaluate(capsys, str(subset_model), "--ood", f"mnist={tmp_path / 'd' / 'MNIST'}")
    assert code == 2 and f"give the folder that holds MNIST/, {tmp_path / 'd'} here" in err and "--data-dir" not in err
    labels = np.arange(15) % 10
    labels[3] = 12
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 15) + labels.astype(np.uint8).tobytes())
    code, _, err = _evaluate(capsys, str(subset_model), "--ood", f"mnist={tmp_path / 'd'}")
    assert code == 2 and "labels in" in err and "run outside 0..9" in err and "converted" not in err, err


# ----------------------------------------------------------------------------- errors


def _bad_inputs(root: Path) -> None:
    (root / "no-images").mkdir(parents=True)
    (root / "no-images" / "readme.txt").write_text("nothing to see\n")
    np.save(root / "flat.npy", np.zeros((5, 63)))  # 64 values per row would be flattened 8x8 digits
    np.save(root / "fivedim.npy", np.zeros((2, 1, 1, 8, 8)))
    np.save(root / "nochannels.npy", np.zeros((2, 5, 8, 8)))
    np.save(root / "empty.npy", np.zeros((0, 8, 8)))
    np.save(root / "picture.npy", np.zeros((8, 8, 1)))  # np.asarray(img)[..., None]: not 8 images 1 pixel wide
    np.save(root / "colour.npy", np.zeros((8, 8, 3)))
    (root / "notes.txt").write_text("text\n")
    (root / "text.npy").write_text("not an array\n")


@pytest.mark.parametrize("value, words", [
    ("{root}/no-images", "holds no images"),
    ("{root}/flat.npy", "array of shape (5, 63); expected (N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4, "
                        "or (N, 64) flattened"),
    ("{root}/fivedim.npy", "array of shape (2, 1, 1, 8, 8); expected"),
    ("{root}/nochannels.npy", "array of shape (2, 5, 8, 8); expected"),
    ("{root}/empty.npy", "array of shape (0, 8, 8) holds no images; an OOD set needs at least one"),
    ("{root}/picture.npy", "array of shape (8, 8, 1) is one (H, W, C) image, as ssvi infer reads it; an OOD set is a "
                           "batch, (N, H, W), (N, H, W, C) or (N, C, H, W)"),
    ("{root}/colour.npy", "array of shape (8, 8, 3) is one (H, W, C) image"),  # was 8 gray images 3 pixels wide
    ("{root}/missing.npy", "no such file or folder"),
    ("{root}/notes.txt", "a file must be a .npy array"),
    ("{root}/text.npy", "text.npy: not a .npy file (it lacks numpy's header)"),
    ("noise={root}", "noise is not read from a folder"),
    ("heldout={root}", "heldout is not read from a folder"),
    ("imagenet={root}/missing", "unknown OOD set 'imagenet'; NAME=DIR takes one of"),
    ("mine={root}/missing", "; LABEL=PATH names a folder or .npy array of your own, and {root}/missing is none"),
    ("mine={root}/notes.txt", "a file must be a .npy array"),
    ("mine={root}/no-images", "holds no images"),
    ("SVHN={root}", "set names are lower case (svhn); a label of your own (LABEL=PATH) is no set's name"),
    ("svnh={root}/no-images", "holds no images (.png, "),  # a label: the folder read as the user's own
    ("svnh={root}/no-images", "(read as your own images, labelled svnh; torchvision's svhn in that folder is --ood svhn="),
    ("svhn=", "give the folder after '='"),
    ("textures", "valid names are"),
    ("digits", "the in-distribution dataset itself; pick another OOD set, or --ood heldout"),
])
def test_ood_mistakes_are_one_line_errors(capsys, subset_model, tmp_path, value, words):
    _bad_inputs(tmp_path)
    code, out, err = _evaluate(capsys, str(subset_model), "--ood", value.format(root=tmp_path))
    assert code == 2 and out == ""
    assert words.format(root=tmp_path) in " ".join(err.split()) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_value_is_a_name_then_name_dir_then_a_path(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    (tmp_path / "noise").mkdir()  # a folder that shares a registered name
    (tmp_path / "mine").mkdir()
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data.ood"):
        assert parse_ood("noise").kind == "set" and parse_ood("./noise").kind == "path"
    assert [r.getMessage() for r in caplog.records] == [  # it went unsaid (the paths review)
        "--ood noise is the built-in set, not the folder noise here; for that folder give --ood ./noise"]
    assert parse_ood("mine").kind == "path"  # exists on disk
    (tmp_path / "x.NPY").touch()
    assert parse_ood("x.NPY").kind == "path"
    request = parse_ood("cifar10=~/data")
    assert (request.label, request.name, request.data_dir) == ("cifar10", "cifar10", Path("~/data").expanduser())
    # spaces around a value go, unless a folder has them: "sp " beside sp read sp (the paths review)
    (tmp_path / "sp ").mkdir()
    (tmp_path / "sp").mkdir()
    assert parse_ood("sp ").path == Path("sp ") and parse_ood(" sp").path == Path("sp")
    assert parse_ood("mine=sp ").path == Path("sp") and parse_ood(" noise ").kind == "set"


def test_a_label_is_any_name_but_a_sets_and_is_kept_when_its_folder_is_gone(tmp_path, monkeypatch, capsys,
                                                                               subset_model):
    """LABEL=PATH: labels near a set's name (emnist, notmnist, cifar) are a user's own; a set's name in
    capitals is refused; a label's report name survives its folder's move (a sweep's cells stay
    evaluated); a folder labelled like a mistyped set (svnh=) that holds no images says which set."""
    from ssvi_cli.data.ood import label_of

    monkeypatch.chdir(tmp_path)
    _pngs(tmp_path / "own")
    for label in ("emnist", "notmnist", "cifar", "fmnist", "mnist:rot15"):
        request = parse_ood(f"{label}=own")
        assert (request.kind, request.label, request.labelled) == ("path", label, True), label
    with pytest.raises(DataError, match=r"set names are lower case \(svhn\); a label of your own"):
        parse_ood("SVHN=own")
    for text, label in (("mine=/gone/x", "mine"), ("mnist=/data", "mnist"), ("/a=b/c.npy", "/a=b/c.npy"),
                        ("noise", "noise"), ("own", "own")):
        assert label_of(text) == label
    (tmp_path / "svhn-files").mkdir()
    (tmp_path / "svhn-files" / "test_32x32.mat").write_bytes(b"MATLAB")
    code, _, err = _evaluate(capsys, str(subset_model), "--ood", "svnh=svhn-files")
    assert code == 2 and "read as your own images, labelled svnh; torchvision's svhn in that folder is --ood " \
                          "svhn=svhn-files" in " ".join(err.split())


def test_name_dir_is_read_as_such_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """./mnist, a data folder where one runs ssvi, does not turn --ood mnist=./mnist into a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    for value in ("mnist=./mnist", "mnist=mnist", f"mnist={tmp_path / 'mnist'}"):
        request = parse_ood(value)
        assert (request.kind, request.name) == ("set", "mnist"), value
        assert request.data_dir.resolve() == (tmp_path / "mnist").resolve()
    (tmp_path / "odd=name").mkdir()  # a folder whose own name holds '=' is still that folder
    assert parse_ood("odd=name").kind == "path"


@pytest.mark.parametrize("command", ["evaluate", "infer"])
@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_a_seed_out_of_range_is_a_usage_error(capsys, subset_model, tmp_path, command, seed):
    """Not a crash once an OOD set or input is sampled with it (exit 1, numpy's words)."""
    np.save(tmp_path / "x.npy", np.zeros((3, 8, 8), dtype=np.float32))
    args = [command, str(subset_model), *(("--ood", str(tmp_path / "x.npy")) if command == "evaluate"
                                           else (str(tmp_path / "x.npy"),)), "--seed", seed]
    assert run(args) == 2
    assert "--seed" in capsys.readouterr().err
