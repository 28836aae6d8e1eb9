"""``imagefolder:PATH``: your own class folders as a dataset, in both layouts, from the data layer to
``ssvi train`` / ``infer`` / ``evaluate``. The images are real: scikit-learn's digits saved as PNG
(and a few other formats and modes) with PIL."""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssvi_cli.cli import run
from ssvi_cli.config import DataConfig
from ssvi_cli.data import DataError, build_dataset, get_spec, preprocess, random_crop_flip, scan_folder
from ssvi_cli.data.imagefolder import decode_images
from ssvi_cli.data.images import read_image
from ssvi_cli.data.spec import DataSpec
from ssvi_cli.modelfile import read_header

NAMES = {0: "zero", 1: "one", 2: "two"}  # folder names; sorted, the classes are one, two, zero
SORTED = ("one", "two", "zero")
SMALL = DataConfig(image_size=8, channels=1)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images * (255.0 / 16.0)).round().astype(np.uint8), bunch.target


def write_class(folder: Path, digit: int, count: int, skip: int = 0) -> None:
    """``count`` images of ``digit`` in ``folder``: gray 8x8 PNGs and, in turn, RGB, upscaled gray,
    upscaled RGBA, palette, JPEG and BMP files."""
    images, target = _digits()
    folder.mkdir(parents=True)
    for j, i in enumerate(np.flatnonzero(target == digit)[skip:skip + count]):
        img, suffix = Image.fromarray(images[i]), ".png"
        kind = j % 7
        if kind == 1:
            img = img.convert("RGB")
        elif kind == 2:
            img = img.resize((24, 24), Image.NEAREST)
        elif kind == 3:
            img = img.convert("RGBA").resize((20, 20), Image.BILINEAR)
        elif kind == 4:
            img = img.convert("RGB").convert("P")
        elif kind == 5:
            img, suffix = img.convert("RGB").resize((16, 16)), ".jpg"
        elif kind == 6:
            suffix = ".bmp"
        img.save(folder / f"{digit}_{j:02d}{suffix}")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Good folders in both layouts, and a bad folder for every error."""
    ws = tmp_path_factory.mktemp("imgs").resolve()
    for digit, name in NAMES.items():
        write_class(ws / "flat" / name, digit, 12)
        for split, (count, skip) in {"train": (8, 0), "val": (2, 8), "test": (3, 10)}.items():
            write_class(ws / "split" / split / name, digit, count, skip)
            if split != "val":
                write_class(ws / "noval" / split / name, digit, count, skip)
    (ws / "afile").write_text("not a folder\n")
    (ws / "empty").mkdir()
    write_class(ws / "oneclass" / "zero", 0, 3)
    write_class(ws / "emptyclass" / "zero", 0, 3)
    (ws / "emptyclass" / "two").mkdir()
    (ws / "emptyclass" / "two" / "notes.txt").write_text("no images here\n")
    for split, names in {"train": ("zero", "one"), "test": ("zero", "two")}.items():
        for name in names:
            write_class(ws / "mismatch" / split / name, 0, 2)
    for split, names in {"train": ("zero", "one", "two"), "test": ("zero", "one")}.items():
        for name in names:
            write_class(ws / "fewer" / split / name, 0, 2)
    write_class(ws / "notest" / "train" / "zero", 0, 2)
    write_class(ws / "notest" / "train" / "one", 1, 2)
    write_class(ws / "badimage" / "zero", 0, 3)
    write_class(ws / "badimage" / "one", 1, 3)
    (ws / "badimage" / "one" / "broken.png").write_text("this is text, not a PNG\n")
    write_class(ws / "splitnames" / "test", 0, 2)  # class folders named as the split layout's
    write_class(ws / "splitnames" / "val", 1, 2)
    write_class(ws / "deadlink" / "zero", 0, 3)
    write_class(ws / "deadlink" / "one", 1, 3)
    (ws / "deadlink" / "one" / "gone.png").symlink_to(ws / "nowhere.png")
    write_class(ws / "latin1" / "zero", 0, 3)
    write_class(ws / os.fsdecode(b"latin1/\xe9t\xe9"), 1, 3)  # a class folder unpacked from a Latin-1 archive
    write_class(ws / "tabbed" / "zero", 0, 3)
    write_class(ws / "tabbed" / "a\tb", 1, 3)  # trained to its end, then no command could read the model
    return ws


# ----------------------------------------------------------------------------- layouts and splits


def test_flat_folder_is_split_stratified_seeded_and_deterministic(ws):
    name = f"imagefolder:{ws / 'flat'}"
    splits = build_dataset(name, options=SMALL, val_fraction=0.25, seed=0)
    assert splits.spec.class_names == SORTED and splits.spec.input_shape == (1, 8, 8)
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (29, 7)  # 36 images, test 0.2
    assert len(splits.val) == 7  # round(0.25 * 29)
    for ds, low, high in ((splits.test, 2, 3), (splits.val, 2, 3)):
        counts = torch.bincount(ds.labels, minlength=3)
        assert counts.sum() == len(ds) and counts.min() >= low and counts.max() <= high  # stratified
    again = build_dataset(name, options=SMALL, val_fraction=0.25, seed=0)
    assert torch.equal(again.val.indices, splits.val.indices) and torch.equal(again.test.images, splits.test.images)
    other = build_dataset(name, options=SMALL, val_fraction=0.25, seed=1)
    assert torch.equal(other.test.images, splits.test.images)  # one test set for every training seed
    assert not torch.equal(other.val.indices, splits.val.indices)


def test_class_names_are_the_sorted_folder_names_and_label_their_images(ws):
    scan = scan_folder(ws / "flat")
    files, labels = scan.parts["all"]
    assert scan.class_names == SORTED and len(files) == 36
    assert all(SORTED[int(y)] == f.parent.name for f, y in zip(files, labels))


def test_split_folders_are_used_as_given(ws):
    splits = build_dataset(f"imagefolder:{ws / 'split'}", options=SMALL, val_fraction=0.5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 9)  # val/ itself, not carved
    assert splits.spec.class_names == SORTED
    assert torch.bincount(splits.val.labels).tolist() == [2, 2, 2]
    noval = build_dataset(f"imagefolder:{ws / 'noval'}", options=SMALL, val_fraction=0.25)
    assert (len(noval.train), len(noval.val), len(noval.test)) == (18, 6, 9)  # val carved from train/
    # max_train shrinks val/ as much as train/, whatever val_fraction says (it sized val/ from itself,
    # and at val_fraction 0 dropped it: no val numbers, with evaluate --split val naming the wrong cause)
    for fraction in (0.0, 0.5):
        capped = build_dataset(f"imagefolder:{ws / 'split'}", options=SMALL, val_fraction=fraction, max_train=12)
        assert (len(capped.train), len(capped.val), len(capped.test)) == (12, 3, 9)


def test_spec_is_known_from_a_scan_without_decoding(ws):
    spec = get_spec(f"imagefolder:{ws / 'badimage'}", SMALL)  # holds an unreadable file: never opened
    assert spec.class_names == ("one", "zero") and spec.num_classes == 2 and spec.name.endswith("badimage")


def test_classes_by_folder_name_or_index_and_evaluate_rebuilds_them_from_the_spec(ws):
    from ssvi_cli.data import data_config_for

    name = f"imagefolder:{ws / 'flat'}"
    full = build_dataset(name, options=SMALL, seed=0)
    part = build_dataset(name, options=DataConfig(image_size=8, channels=1, classes=("zero", "0")), seed=0)
    assert part.spec.class_names == ("zero", "one") and part.spec.dataset_classes == SORTED
    assert len(part.test) + len(part.heldout) == len(full.test) == 7
    assert torch.equal(part.test.images, full.test.images[full.test.labels != 1])  # "two" held out
    again = build_dataset(name, options=data_config_for(part.spec), seed=0)  # what evaluate does
    assert again.spec.class_names == part.spec.class_names and torch.equal(again.test.images, part.test.images)
    assert torch.equal(again.test.labels, part.test.labels) and torch.equal(again.heldout.images, part.heldout.images)


def test_rounding_never_takes_a_class_last_training_image(ws, tmp_path):
    # two images per class at test_fraction 0.9: round(0.9 * 4) = 4 would empty both classes
    splits = build_dataset(f"imagefolder:{ws / 'mismatch' / 'train'}", options=DataConfig(test_fraction=0.9),
                           val_fraction=0.0)
    assert sorted(splits.train.labels.tolist()) == [0, 1] and sorted(splits.test.labels.tolist()) == [0, 1]
    # a long tail: two classes of 10 and six of one; the validation carve (0.1 of 26 rounds to 3, one
    # more than the two big classes' floors) used to take one of the single images
    for digit in range(8):
        write_class(tmp_path / "tail" / "train" / f"c{digit}", digit, 10 if digit < 2 else 1)
        write_class(tmp_path / "tail" / "test" / f"c{digit}", digit, 1)
    splits = build_dataset(f"imagefolder:{tmp_path / 'tail'}", val_fraction=0.1)
    assert set(splits.train.labels.tolist()) == set(range(8))
    assert len(splits.val) == 3 and len(splits.train) == 23  # the third from a big class


def test_a_folder_too_small_for_a_test_split_is_refused_before_training(tmp_path, capsys):
    for digit, name in list(NAMES.items())[:2]:
        write_class(tmp_path / "tiny" / name, digit, 2)  # two per class: round(0.2 * 4) = 1, floors 0
    with pytest.raises(DataError, match="holds 4 images, too few to hold any out for testing at test_fraction=0.1"):
        build_dataset(f"imagefolder:{tmp_path / 'tiny'}", options=DataConfig(test_fraction=0.1))
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'tiny'}", "--set", "data.test_fraction=0.1",
                "--out", str(tmp_path / "r")]) == 2
    assert "raise --set data.test_fraction" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # one image per class: no fraction can help, since each class keeps its one for training
    for digit, name in list(NAMES.items())[:2]:
        write_class(tmp_path / "single" / name, digit, 1)
    for fraction in (0.2, 0.9):
        with pytest.raises(DataError, match="add images: each class keeps one for training, so a class needs two"):
            build_dataset(f"imagefolder:{tmp_path / 'single'}", options=DataConfig(test_fraction=fraction))


def test_a_model_that_cannot_take_the_image_size_is_refused_before_a_run_folder_is_written(ws, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--data", f"imagefolder:{ws / 'flat'}", "--model", "torchvision:vgg11", "--set", "data.image_size=8",
            "--out", str(out)]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert ("torchvision:vgg11 cannot take the data's 3x8x8 inputs (set data.image_size=32, the first of the usual "
            "sizes it takes): Given input size") in err
    assert "Traceback" not in err and not out.exists()
    args[args.index("torchvision:vgg11")] = "torchvision:inception_v3"  # the README's 75 pixels, found for the user
    assert run(args) == 2
    assert "(set data.image_size=75, the first of the usual sizes it takes)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pixels


def test_normalisation_is_measured_on_the_training_split_per_channel(ws):
    name = f"imagefolder:{ws / 'flat'}"
    splits = build_dataset(name, options=DataConfig(image_size=8, channels=3), val_fraction=0.25)
    train = torch.cat([splits.train.images, splits.val.images]).numpy().astype(np.float64) / 255.0
    assert splits.spec.mean == pytest.approx(train.mean(axis=(0, 2, 3)), abs=1e-5)
    assert splits.spec.std == pytest.approx(train.std(axis=(0, 2, 3)), abs=1e-5)
    x = torch.stack([ds[i][0] for ds in (splits.train, splits.val) for i in range(len(ds))])
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-4) and float(x.std()) == pytest.approx(1.0, abs=0.02)
    given = build_dataset(name, options=DataConfig(image_size=8, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)))
    assert (given.spec.mean, given.spec.std) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))


def test_colour_images_have_a_mean_and_std_per_channel(tmp_path):
    """The folders above hold gray pictures (their colour files converted from gray): every channel
    had the same statistics, so channels pooled into one mean went unseen."""
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 0.5, 0.2])  # red bright and spread, blue dark and narrow
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            pixels = (rng.random((8, 8, 3)) * 255 * scale).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    splits = build_dataset(f"imagefolder:{tmp_path}", options=DataConfig(image_size=8, channels=3), val_fraction=0.25)
    train = torch.cat([splits.train.images, splits.val.images]).numpy().astype(np.float64) / 255.0
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    assert mean[0] > 2 * mean[2] and std[0] > 2 * std[2]
    assert splits.spec.mean == pytest.approx(mean, abs=1e-5) and splits.spec.std == pytest.approx(std, abs=1e-5)


def test_images_of_any_size_and_mode_decode_as_infer_reads_them(ws):
    files = tuple(sorted((ws / "flat" / "zero").iterdir()))
    assert {f.suffix for f in files} == {".png", ".jpg", ".bmp"}
    for size, channels in ((8, 1), (16, 3)):
        images = decode_images(files, size, channels)
        assert images.dtype == torch.uint8 and images.shape == (len(files), channels, size, size)
        spec = get_spec(f"imagefolder:{ws / 'flat'}", DataConfig(image_size=size, channels=channels))
        for i, path in enumerate(files):  # the same conversion and antialiased resize as `ssvi infer`
            expected = preprocess(read_image(path), spec)[0]  # spec normalisation is the identity here
            assert torch.allclose(images[i].float() / 255.0, expected, atol=0.5 / 255 + 1e-6), path.name
    gray = decode_images(files[:1], 8, 1)[0, 0].numpy()  # an 8x8 gray PNG comes back pixel for pixel
    assert np.array_equal(gray, np.asarray(Image.open(files[0])))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_by_every_command_and_lands_within_two_levels(tmp_path):
    from ssvi_cli.evaluation.infer import iter_raw
    from ssvi_cli.evaluation.ood_sets import folder_images

    y, x = np.mgrid[0:384, 0:512]  # a smooth 512x384 photo-like picture
    pixels = np.stack([np.sin(x / 40.0 + k) * np.cos(y / 30.0) * 100 + 128 for k in range(3)], -1).astype(np.uint8)
    (tmp_path / "c").mkdir()
    jpeg, png = tmp_path / "c" / "photo.jpg", tmp_path / "c" / "photo.png"
    Image.fromarray(pixels).save(jpeg, quality=95)
    Image.fromarray(pixels).save(png)
    assert read_image(jpeg).shape == (1, 3, 384, 512)  # no size: decoded whole
    assert read_image(jpeg, size=16).shape == (1, 3, 48, 64)  # 1/8: both sides still >= 2 x 16
    assert read_image(jpeg, size=64).shape == (1, 3, 192, 256)  # 1/2
    assert read_image(jpeg, size=24).shape == (1, 3, 48, 64)  # 1/8 leaves 48 = 2 x 24: taken
    assert read_image(jpeg, size=25).shape == (1, 3, 96, 128)  # 48 < 2 x 25: 1/4
    assert read_image(png, size=16).shape == (1, 3, 384, 512)  # not a JPEG: whole
    odd = tmp_path / "odd.jpg"  # 1/8 would decode a 64th column of padding, which the resize squeezed in
    Image.fromarray(pixels[:, :511]).save(odd, quality=95)
    assert read_image(odd, size=16).shape == (1, 3, 384, 511)  # no scale divides 511: whole
    spec = DataSpec("photos", (3, 16, 16), 2, ("a", "b"), (0.0,) * 3, (1.0,) * 3)  # no normalisation
    whole = preprocess(read_image(jpeg), spec)[0]
    folder = decode_images((jpeg,), 16, 3)[0].float() / 255.0  # train and evaluate's decoding
    _, _, raw = next(iter_raw([jpeg], 3, input_shape=(3, 16, 16)))  # infer's
    ood = folder_images(tmp_path / "c", spec, 0, None)  # --ood PATH's
    assert raw.shape == (1, 3, 48, 64) and ood.shape == (2, 3, 16, 16)
    assert torch.allclose(folder, preprocess(raw, spec)[0], atol=0.5 / 255 + 1e-6)
    assert torch.equal(ood[0], preprocess(raw, spec)[0])
    assert (folder - whole).abs().max() <= 2.0 / 255  # the reduced decode is within a level or two of the whole


def test_files_are_read_by_threads_in_order_one_a_thread_ahead_and_none_begun_after_a_stop(ws, monkeypatch):
    import threading
    import time as clock

    from ssvi_cli.data import decoding

    files = tuple(sorted((ws / "flat").rglob("*.*")))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = decode_images(files, 8, 3)
        torch.set_num_threads(2)
        assert torch.equal(decode_images(files, 8, 3), alone)  # two readers: the same images, in order
    finally:
        torch.set_num_threads(before)
    calls, names = [], set()

    def fake(path, size, prepare):
        calls.append(path)
        names.add(threading.current_thread().name)
        clock.sleep(0.001)
        return torch.full((1, 1, 1, 1), int(path.name))

    monkeypatch.setattr(decoding, "_read", fake)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    many = tuple(Path(str(i)) for i in range(200))
    assert [int(p.name) for p, x in decoding.read_ahead(many, 8) if int(x) == int(p.name)] == list(range(200))
    assert {n.startswith("ssvi-decode") for n in names} == {True} and len(names) > 1
    calls.clear()
    taken = decoding.read_ahead(many, 8)
    next(taken)
    taken.close()  # as an error or Ctrl-C in the taker closes it
    clock.sleep(0.1)
    assert len(calls) <= 3 + 1  # one a thread and the one after the first taken, not the other 196


def test_warnings_of_files_read_by_threads_are_said_in_the_files_order(monkeypatch, caplog):
    """The first image with transparent pixels is the one named: the thread that finished first named
    its own (a test of infer saw b.png named before a.png)."""
    import logging
    import time as clock

    from ssvi_cli import warned
    from ssvi_cli.data import decoding

    def fake(path, size=None):
        clock.sleep(0.2 if path.name == "0" else 0.0)  # the first file is read last
        warned.warn_once(logging.getLogger("ssvi_test"), ("", "held-order"), "first: %s", path.name)
        return torch.zeros(1, 1, 1, 1)

    monkeypatch.setattr(decoding, "read_image", fake)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="ssvi_test"), warned.warnings_scope():
        assert [p.name for p, _ in decoding.read_ahead((Path("0"), Path("1")), None)] == ["0", "1"]
    assert [r.getMessage() for r in caplog.records] == ["first: 0"]


def test_a_folder_that_would_not_fit_in_memory_decoded_is_refused_before_a_file_is_read(ws, tmp_path, monkeypatch,
                                                                                       capsys):
    from ssvi_cli import machine
    from ssvi_cli.data import decoding

    monkeypatch.setattr(decoding, "_read", lambda *a: pytest.fail("read a file"))
    monkeypatch.setattr(machine, "available_memory", lambda: 10_000)
    files = tuple(sorted((ws / "flat" / "zero").iterdir()))  # 12 images of 3x32x32: 36,864 bytes
    with pytest.raises(DataError, match=r"the 12 images take 0\.0 MiB decoded at 3x32x32 .*0\.0 MiB available: "
                                        r"use fewer images, a smaller data.image_size when training"):
        decode_images(files, 32, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # each process of a node decodes them
    monkeypatch.setattr(machine, "available_memory", lambda: 36_864 + 1)
    with pytest.raises(DataError, match="in each of the 2 processes"):
        decode_images(files, 32, 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(machine, "available_memory", lambda: 1_000)
    assert run(["train", "--data", f"imagefolder:{ws / 'flat'}", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "MiB decoded at 3x32x32" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_augmentation_only_from_16_pixels(ws):
    name = f"imagefolder:{ws / 'flat'}"
    assert build_dataset(name, options=SMALL).train.augment is None
    big = DataConfig(image_size=16, channels=1)
    assert build_dataset(name, options=big).train.augment is random_crop_flip
    assert build_dataset(name, options=big, augment=False).train.augment is None


# ----------------------------------------------------------------------------- errors, through the CLI

ERRORS = [
    ("nope", "image folder {ws}/nope does not exist"),
    ("afile", "image folder {ws}/afile is a file, not a folder"),
    ("empty", "image folder {ws}/empty holds no class folders"),
    ("oneclass", "holds one class folder (zero); a classifier needs at least two"),
    ("emptyclass", "class folder {ws}/emptyclass/two holds no images"),
    ("mismatch", "{ws}/mismatch/test has other classes than {ws}/mismatch/train (missing: one; extra: two)"),
    ("fewer", "{ws}/fewer/test has other classes than {ws}/fewer/train (missing: two); use the same"),  # no "extra: -"
    ("notest", "image folder {ws}/notest has train/ but no test/"),
    ("badimage", "image {ws}/badimage/one/broken.png cannot be read"),
    ("splitnames", "has val/, test/ but no train/; add {ws}/splitnames/train/<class>/, or, for class folders "
                   "directly in {ws}/splitnames, name none of them train, val, test"),
    ("deadlink", "image {ws}/deadlink/one/gone.png cannot be read"),  # a link to nothing is named, not skipped
    ("latin1", "class folder {ws}/latin1/\\xe9t\\xe9: its name is not UTF-8 text"),
    ("tabbed", "class folder '{ws}/tabbed/a\\tb': its name holds a control character"),
]


@pytest.mark.parametrize("folder, words", ERRORS, ids=[e[0] for e in ERRORS])
def test_folder_errors_are_one_line(ws, folder, words, capsys, tmp_path):
    code = run(["train", "--data", f"imagefolder:{ws / folder}", "--epochs", "1", "--set", "data.image_size=8",
                "--set", "data.channels=1", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert words.replace("{ws}", str(ws)) in lines[0]
    assert captured.out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["--data", "imagefolder:"], "imagefolder: needs the folder after the colon"),
    (["--data", "imagenet"], "valid names are: cifar10, cifar100, digits, fashion-mnist, kmnist, mnist, svhn; "
                             "or imagefolder:PATH"),
    (["--data", "imagefolder:photos", "--set", "data.channels=2"], "data.channels=2 must be 1 or 3"),
    (["--data", "imagefolder:photos", "--set", "data.test_fraction=1"], "data.test_fraction=1.0 must be in (0, 1)"),
    (["--data", "imagefolder:photos", "--set", "data.mean=[0.5,0.5]"],
     "data.mean=[0.5, 0.5] must be 3 numbers, one per channel"),
    # the image folder keys on another dataset would be ignored: refused (a new run; a recorded config
    # that holds them still reads, test_config), before any range check, after the dataset's name
    (["--set", "data.image_size=16"], "data.image_size=16 applies to image folders (data.name=imagefolder:PATH) "
                                      "only; digits has its own input shape and normalisation"),
    (["--data", "mnist", "--set", "data.mean=[0.5]"], "data.mean=[0.5] applies to image folders"),
    (["--data", "cifar10", "--set", "data.channels=2"], "data.channels=2 applies to image folders"),
    # at its default value too: data.test_fraction=0.2 on digits was silently ignored
    (["--set", "data.test_fraction=0.2"], "data.test_fraction=0.2 applies to image folders"),
    (["--set", "data.image_size=32", "--nproc", "2"], "data.image_size=32 applies to image folders"),
    (["--data", "imagefoldr:/tmp", "--set", "data.channels=3"], "unknown dataset 'imagefoldr:/tmp'"),
    (["--data", "imagefoldr:/tmp", "--set", "data.image_size=16"], "unknown dataset 'imagefoldr:/tmp'"),
    (["--data", "MNIST"], "(did you mean mnist or kmnist?)"),
    (["--data", "."], "unknown dataset '.'; . is a folder: for the class folders in it, pass imagefolder:."),
])
def test_bad_names_and_values_are_one_line(args, words, capsys, tmp_path):
    code = run(["train", *args, "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1 and words in captured.err, captured.err


def test_links_are_followed_once_and_names_that_are_not_utf8_are_read_and_shown(ws, tmp_path, capsys):
    """A class folder's subfolder that is a link is searched like any folder, once even where a link
    points back up; an image whose name is not UTF-8 text trains, and infer shows its name escaped
    (the folder digest and every output take it), as it reads PPM and PGM files as torchvision does."""
    photos = tmp_path / "photos"
    for digit, name in NAMES.items():
        write_class(photos / name, digit, 6)
    write_class(tmp_path / "elsewhere", 2, 3, skip=6)
    (photos / "two" / "linked").symlink_to(tmp_path / "elsewhere")
    (photos / "two" / "loop").symlink_to(photos / "two")
    odd = Path(os.fsdecode(bytes(photos / "one") + b"/\xff\xfe.png"))
    shutil.copy(photos / "one" / "1_00.png", odd)
    Image.open(photos / "zero" / "0_00.png").convert("L").save(photos / "zero" / "extra.pgm")
    Image.open(photos / "zero" / "0_00.png").convert("RGB").save(photos / "zero" / "extra.ppm")
    scan = scan_folder(photos)
    files, labels = scan.parts["all"]
    assert len(files) == 6 * 3 + 3 + 1 + 2 and len(set(map(os.path.realpath, files))) == len(files)
    assert sum(f.parent.name == "linked" for f in files) == 3 and odd in files
    out = tmp_path / "run"
    assert run(["train", "--data", f"imagefolder:{photos}", "--epochs", "1", "--set", "data.image_size=8",
                "--set", "data.channels=1", "--set", "train.eval_samples=1", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    shown = f"{photos / 'one'}/\\xff\\xfe.png"
    for output in ("p.csv", "p.jsonl"):
        assert run(["infer", str(out), str(photos / "one"), "--output", str(tmp_path / output)]) == 0
        text = (tmp_path / output).read_text(encoding="utf-8")
        assert shown in (text if output.endswith(".csv") else [json.loads(x)["input"] for x in text.splitlines()])
    capsys.readouterr()
    assert run(["infer", str(out), str(photos / "one"), "--json"]) == 0
    inputs = [p["input"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    assert shown in inputs and all(x.encode("utf-8") for x in inputs)


def test_a_link_into_another_class_or_the_root_is_passed_over_with_a_warning(tmp_path, caplog):
    """cat/loop -> .. took every dog image in again as cat/loop/dog/*.png, labelled cat, in silence."""
    import logging

    photos = tmp_path / "photos"
    for digit, name in NAMES.items():
        write_class(photos / name, digit, 4)
    (photos / "two" / "loop").symlink_to(photos)
    (photos / "one" / "zeros").symlink_to(photos / "zero")
    write_class(photos / "zero" / "sub", 0, 2, skip=4)
    (photos / "one" / "stolen").symlink_to(photos / "zero" / "sub")  # into a subfolder of another class
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data.images"):
        files, labels = scan_folder(photos).parts["all"]
    assert len(files) == 4 * len(NAMES) + 2 and not any(f.parent.name in ("loop", "zeros", "stolen") for f in files)
    assert sorted(r.getMessage().split(" leads to ")[0] for r in caplog.records) == [
        str(photos / "one" / "stolen"), str(photos / "one" / "zeros"), str(photos / "two" / "loop")]
    assert "its images are passed over" in caplog.records[0].getMessage()


def test_images_beside_the_class_folders_are_passed_over_with_a_warning(tmp_path, caplog):
    """photos/stray.png, beside photos/zero/ and photos/one/, was left out in silence."""
    import logging

    photos = tmp_path / "photos"
    for digit, name in NAMES.items():
        write_class(photos / name, digit, 3)
    images, _ = _digits()
    for name in ("stray.png", "other.JPG"):
        Image.fromarray(images[0]).save(photos / name, "PNG" if name.endswith("png") else "JPEG")
    (photos / "notes.txt").write_text("not an image\n")
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data.imagefolder"):
        files, _ = scan_folder(photos).parts["all"]
        scan_folder(photos)  # scanned again: said once
    assert len(files) == 3 * len(NAMES)
    assert [r.getMessage() for r in caplog.records] == [
        f"{photos}: 2 images outside the class folders are passed over (an image's class is its folder's name)"]
    caplog.clear()
    split = tmp_path / "split"
    for part in ("train", "test"):
        for digit, name in NAMES.items():
            write_class(split / part / name, digit, 2)
    Image.fromarray(images[0]).save(split / "stray.png")  # beside train/ and test/
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data.imagefolder"):
        scan_folder(split)
    assert [r.getMessage() for r in caplog.records] == [
        f"{split}: 1 image outside the split folders is passed over (an image's class is its folder's name)"]
    # a folder beside them too (the review: an extra/ class folder of 20 images went unsaid)
    caplog.clear()
    write_class(split / "extra", 0, 2)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data.imagefolder"):
        files, _ = scan_folder(split).parts["train"]
    assert len(files) == 2 * len(NAMES) and caplog.records[-1].getMessage() == \
        f"{split}: extra/ is passed over (the split layout reads train/, val/, test/)"
    # Train/ and Test/ were read as two classes named Train and Test; Val/ beside train/ went unsaid
    write_class(split / "Val" / NAMES[0], 0, 2)
    with pytest.raises(DataError, match=rf"^image folder {split} has Val/: the split layout's folders are named "
                                        "train, val, test in lower case; rename it"):
        scan_folder(split)
    shutil.rmtree(split / "Val")
    (split / "train").rename(split / "Train")
    with pytest.raises(DataError, match=rf"^image folder {split} has Train/: the split layout's folders"):
        scan_folder(split)
    # where names ignore case (macOS, Windows) Train/ is train/: a link stands in for that here
    (split / "Train").rename(split / "train")
    (split / "Train").symlink_to(split / "train", target_is_directory=True)
    shutil.rmtree(split / "extra")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data.imagefolder"):
        assert len(scan_folder(split).parts["train"][0]) == 2 * len(NAMES)
    assert not [r for r in caplog.records if "Train/" in r.getMessage()]  # neither refused nor passed over
    # a class of a flat folder may be named Test (a control group beside it, say): read as before
    flat = tmp_path / "flat"
    write_class(flat / "Test", 0, 2)
    write_class(flat / "Control", 1, 2)
    assert scan_folder(flat).class_names == ("Control", "Test")


def test_an_ood_folder_beside_the_class_folders_is_no_part_of_the_dataset(tmp_path):
    """--ood DATA/extra, a folder the split layout never reads, was refused as "the in-distribution dataset
    itself" (a path inside the dataset's folder); one that holds its images, or a class folder, is."""
    from ssvi_cli.data.ood import parse_ood
    from ssvi_cli.evaluation.ood_sets import check_outside

    data = tmp_path / "data"
    for part in ("train", "test"):
        write_class(data / part / "zero", 0, 2)
        write_class(data / part / "one", 1, 2)
    write_class(data / "extra", 7, 2)
    dataset = f"imagefolder:{data}"
    check_outside(parse_ood(str(data / "extra")), str(data / "extra"), dataset)  # not read by it: an OOD set
    for ood, n in ((data, 8), (data / "train" / "one", 2), (tmp_path, 8)):
        with pytest.raises(DataError, match=f"holds {n} of the images of the in-distribution dataset itself"):
            check_outside(parse_ood(str(ood)), str(ood), dataset)


def test_each_call_that_reads_a_folder_says_its_warnings_again(tmp_path, caplog):
    """A folder's warnings were said once a process: a notebook's second load_data of the folder (or of
    another folder with a transparent image) said nothing. Each call says them once; one command, once."""
    import logging

    from ssvi_cli.config import apply_overrides, load_preset
    from ssvi_cli.training.plan import load_data
    from ssvi_cli.warned import warnings_scope

    photos = tmp_path / "photos"
    for digit, name in NAMES.items():
        write_class(photos / name, digit, 4)
    Image.fromarray(_digits()[0][0]).save(photos / "stray.png")
    cfg = apply_overrides(load_preset("digits_mlp"), {"data.name": f"imagefolder:{photos}", "data.image_size": 8,
                                                      "data.channels": 1})
    said = f"{photos}: 1 image outside the class folders is passed over"
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data"):
        load_data(cfg)
        load_data(cfg)  # the cell run again
        assert caplog.text.count(said) == 2
        caplog.clear()
        with warnings_scope():  # as a command of the CLI
            load_data(cfg)
            load_data(cfg)
        assert caplog.text.count(said) == 1
        caplog.clear()
        # another thread's call, while this one's scope is open, says them too: each call its own scope
        import threading

        opened, done = threading.Event(), threading.Event()

        def holding() -> None:
            with warnings_scope():
                load_data(cfg)
                opened.set()
                done.wait(30)

        other = threading.Thread(target=holding)
        other.start()
        opened.wait(30)
        load_data(cfg)
        done.set()
        other.join()
        assert caplog.text.count(said) == 2


def test_files_of_an_image_kind_ssvi_does_not_read_are_counted_in_a_warning_and_train_says_the_split_sizes(
        tmp_path, caplog, capsys):
    """24 photos saved as .jfif (a JPEG) were left out of training in silence, and nothing said how many
    images a split held."""
    import logging

    photos = tmp_path / "photos"
    for digit, name in NAMES.items():
        write_class(photos / name, digit, 6)
    images, target = _digits()
    for j, i in enumerate(np.flatnonzero(target == 1)[20:23]):  # JPEG under its other names: read
        Image.fromarray(images[i]).save(photos / "one" / f"extra{j}{('.jfif', '.jpe', '.JFIF')[j]}", "JPEG")
    Image.fromarray(images[0]).save(photos / "zero" / "layered.tga")  # an image kind ssvi does not take
    Image.fromarray(images[0]).save(photos / "zero" / "icon.ico")
    (photos / "zero" / "phone.HEIC").write_bytes(b"\0" * 64)  # a phone's photo, which Pillow cannot open: said too
    (photos / "two" / "notes.txt").write_text("not an image\n")  # not an image kind: no word
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.data.images"):
        files, _ = scan_folder(photos).parts["all"]
    assert len(files) == 6 * len(NAMES) + 3 and sum(f.suffix.lower() in (".jfif", ".jpe") for f in files) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{photos / 'zero'}: 3 files passed over (1 .heic, 1 .ico, 1 .tga), a kind ssvi does not read as images "
        "(.png .jpg .jpeg .jpe .jfif .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm); save them as .png or .jpg to use them"]
    code = run(["train", "--data", f"imagefolder:{photos}", "--epochs", "1", "--set", "data.image_size=8",
                "--set", "data.channels=1", "--set", "train.eval_samples=2", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    sizes = summary["images"]
    assert sizes.keys() == {"train", "val", "test"} and sum(sizes.values()) == len(files)
    assert f"({sizes['train']} train, {sizes['val']} val, {sizes['test']} test images)" in err + out
    # what the run found in the folder, said before it trains (it showed only in inspect --json)
    line = next(l for l in err.splitlines() if l.startswith("data: "))
    assert line.startswith(f"data: {len(NAMES)} classes ({', '.join(sorted(NAMES.values()))}); inputs 1x8x8 "
                           "(data.channels, data.image_size); normalised by mean (") and line.endswith(
        ", measured on the training images") and "given" not in line, line
    assert f"final evaluation on {sizes['test']} test images (2 weight draws, then the mean network) ..." in err


def test_the_folder_line_says_which_of_mean_and_std_were_given():
    """--set data.mean=0.5 alone printed the measured std "as given"."""
    from types import SimpleNamespace

    from ssvi_cli.cli.train_fit import _folder_line

    spec = SimpleNamespace(class_names=[f"c{i}" for i in range(12)], input_shape=(1, 8, 8), mean=(0.5,), std=(0.289,))
    line = _folder_line(spec, mean_given=True, std_given=False)
    assert line == ("data: 12 classes (c0, c1, c2, c3, c4, c5, ... c11); inputs 1x8x8 (data.channels, data.image_size); "
                    "normalised by mean (0.500) as given and std (0.289), measured on the training images where not given")
    assert _folder_line(spec, True, True).endswith("mean (0.500) as given and std (0.289) as given")


def test_each_epochs_line_shows_above_a_terminals_bar(ws, tmp_path, capsys, monkeypatch):
    """On a terminal the bar of the next epoch replaced the last one and its line was printed only
    without a bar: a person watching never saw an epoch's val_acc, density or swaps."""
    import contextlib

    from ssvi_cli.cli import train_fit

    class Bar:
        def add_task(self, *args, **kwargs):
            return 0

        def update(self, *args, **kwargs):
            pass

        def remove_task(self, task):
            pass

    monkeypatch.setattr(train_fit, "progress_bar", lambda enabled: contextlib.nullcontext(Bar()))
    assert run(["train", "--data", f"imagefolder:{ws / 'split'}", "--epochs", "2", "--set", "data.image_size=8",
                "--set", "data.channels=1", "--set", "train.eval_samples=1", "--out", str(tmp_path / "r")]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch ")]
    assert [l.split(" loss ")[0] for l in lines] == ["epoch 1/2", "epoch 2/2"] and all("val_acc" in l for l in lines)


# ----------------------------------------------------------------------------- end to end


def test_train_infer_evaluate_on_a_png_folder(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ws)  # a relative path: the model file records the absolute one
    run_dir = tmp_path / "run"
    code = run(["train", "--data", "imagefolder:flat", "--epochs", "2", "--set", "data.image_size=8",
                "--set", "data.channels=1", "--set", "train.eval_samples=2", "--out", str(run_dir), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["dataset"] == f"imagefolder:{ws / 'flat'}"  # recorded absolute
    monkeypatch.chdir(tmp_path)
    model = run_dir / "model.safetensors"
    image = ws / "flat" / "two" / "2_02.png"  # a 24x24 image: resized as in training
    assert run(["infer", str(model), str(image), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["predictions"][0]
    assert pred["class"] in SORTED and {k["class"] for k in pred["top_k"]} == set(SORTED)
    for split, n in (("test", 7), ("val", 3)):  # val: round(0.1 * 29), rebuilt from the recorded config
        assert run(["evaluate", str(model), "--json", "--split", split, "--samples", "2"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["dataset"] == f"imagefolder:{ws / 'flat'}" and report["n"] == n
        assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    # another folder with as many classes under other names: its labels would not be the model's
    for digit, name in NAMES.items():
        write_class(tmp_path / "renamed" / f"class_{name}", digit, 5)
    assert run(["evaluate", str(model), "--dataset", f"imagefolder:{tmp_path / 'renamed'}", "--samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "classes are not the model's: class 0 is 'class_one' there and 'one' in the model" in err
    assert "(name the class folders as the model's classes)" in err
    # --split all: a labelled folder the model never saw, scored whole, by class name, fewer classes too
    write_class(tmp_path / "new" / "train" / "zero", 0, 4, skip=20)
    write_class(tmp_path / "new" / "test" / "zero", 0, 3, skip=30)
    write_class(tmp_path / "new" / "train" / "two", 2, 5, skip=20)
    write_class(tmp_path / "new" / "test" / "two", 2, 2, skip=30)
    assert run(["evaluate", str(model), "--dataset", f"imagefolder:{tmp_path / 'new'}", "--mode", "mean"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(  # on its test split alone, the way is said
        "and 2 classes, but the model takes (1, 8, 8) and predicts 3 classes; a labelled folder that holds some "
        "of the model's classes is scored whole with --split all")
    write_class(tmp_path / "cased" / "Zero", 0, 3)  # one of the model's classes and one misnamed: said
    write_class(tmp_path / "cased" / "two", 2, 3)
    assert run(["evaluate", str(model), "--dataset", f"imagefolder:{tmp_path / 'cased'}", "--mode", "mean"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(
        "is scored whole with --split all (named as the model's classes: 'Zero' is not one of 'one', 'two', 'zero')")
    write_class(tmp_path / "pets" / "cat", 0, 3)  # classes the model does not have: no such pointer
    write_class(tmp_path / "pets" / "dog", 2, 3)
    assert run(["evaluate", str(model), "--dataset", f"imagefolder:{tmp_path / 'pets'}", "--mode", "mean"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("and predicts 3 classes")
    assert run(["evaluate", str(model), "--dataset", f"imagefolder:{tmp_path / 'new'}", "--split", "all",
                "--mode", "mean", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 14 and report["split"] == "all"
    assert report["notes"] == [f"1 of the model's 3 classes ('one') has no image in imagefolder:{tmp_path / 'new'}: "
                               "its scores speak for the others only"]
    from ssvi_cli.data.imagefolder import whole_folder
    from ssvi_cli.runs.load import load_model

    from ssvi_cli.data import data_config_for
    from ssvi_cli.prediction import predict_batch

    loaded = load_model(model)
    whole = whole_folder(str(tmp_path / "new"), data_config_for(loaded.spec), loaded.spec.class_names)
    assert sorted(whole.labels.tolist()) == [SORTED.index("two")] * 7 + [SORTED.index("zero")] * 7  # the model's
    predicted = predict_batch(loaded.model, torch.stack([whole[i][0] for i in range(14)]), 1, "mean")[0].argmax(1)
    assert report["metrics"]["accuracy"] == pytest.approx(float((predicted == whole.labels).float().mean()))
    # one class, an empty class folder, splits of other classes: none a training folder's, all scored
    write_class(tmp_path / "few" / "train" / "zero", 0, 2)
    write_class(tmp_path / "few" / "test" / "two", 2, 3)
    (tmp_path / "few" / "test" / "one").mkdir()
    write_class(tmp_path / "lone" / "zero", 0, 2)
    for folder, n in (("few", 5), ("lone", 2)):
        assert run(["evaluate", str(model), "--dataset", f"imagefolder:{tmp_path / folder}", "--split", "all",
                    "--mode", "mean", "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["n"] == n
    assert run(["evaluate", str(model), "--split", "all", "--samples", "2", "--json"]) == 0  # its own folder
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 36 and "its training images too" in report["notes"][0]
    (tmp_path / "link").symlink_to(ws / "flat")  # the same folder by another path
    assert run(["evaluate", str(model), "--dataset", f"imagefolder:{tmp_path / 'link'}/", "--split", "all",
                "--mode", "mean", "--json"]) == 0
    assert "its training images too" in json.loads(capsys.readouterr().out)["notes"][0]
    # the model's own folder, or a folder inside it, as OOD images: in distribution, so refused (its AUROC said 0.5)
    for ood, n in ((ws / "flat", 36), (tmp_path / "link", 36), (ws / "flat" / "two", 12), (ws, 36)):  # ws: around it
        assert run(["evaluate", str(model), "--ood", str(ood), "--mode", "mean"]) == 2
        assert capsys.readouterr().err == (f"error: --ood {ood} holds {n} of the images of the in-distribution "
                                           f"dataset itself (imagefolder:{ws / 'flat'}), which the model is trained "
                                           "and evaluated on; pick another OOD set\n")
    assert run(["evaluate", str(model), "--ood", str(tmp_path / "lone"), "--mode", "mean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ood"][str(tmp_path / "lone")]["n"] == 2  # beside the model's own
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--set", f"data.name=imagefolder:{ws / 'flat'}",
                "--ood", str(ws / "flat" / "one"), "--out", str(tmp_path / "sw")]) == 2  # before any cell trains
    assert "of the images of the in-distribution dataset itself" in capsys.readouterr().err
    assert not (tmp_path / "sw" / "cells").exists()
    write_class(tmp_path / "new" / "train" / "seven", 7, 2)
    write_class(tmp_path / "new" / "test" / "seven", 7, 2, skip=2)
    for args, words in (([f"imagefolder:{tmp_path / 'new'}"], "has classes the model does not predict (seven)"),
                        (["digits"], "--split all scores every image of an image folder; digits is not one")):
        assert run(["evaluate", str(model), "--dataset", *args, "--split", "all"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_a_model_whose_image_folder_moved_is_told_how_to_evaluate_it(tmp_path, capsys):
    """evaluate said "image folder X does not exist; check the path after imagefolder:", a path the
    user never typed; it says the folder the model was trained on is gone and names --dataset."""
    for digit, name in NAMES.items():
        write_class(tmp_path / "photos" / name, digit, 6)
    run_dir = tmp_path / "run"
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'photos'}", "--epochs", "1", "--set", "data.image_size=8",
                "--set", "data.channels=1", "--set", "train.eval_samples=1", "--out", str(run_dir), "--json"]) == 0
    (tmp_path / "photos").rename(tmp_path / "moved")
    capsys.readouterr()
    assert run(["evaluate", str(run_dir), "--samples", "1"]) == 2
    said = capsys.readouterr().err
    assert said == (f"error: the model was trained on the image folder {tmp_path / 'photos'}, which is not there now; "
                    "if it has moved, give its new place with --data imagefolder:PATH\n")
    assert run(["evaluate", str(run_dir), "--samples", "1", "--dataset", f"imagefolder:{tmp_path / 'moved'}"]) == 0


def test_a_flat_folder_changed_since_training_is_refused_by_evaluate_and_resume(tmp_path, capsys):
    for digit, name in NAMES.items():
        write_class(tmp_path / "photos" / name, digit, 10)
    run_dir = tmp_path / "run"
    args = ["--data", f"imagefolder:{tmp_path / 'photos'}", "--epochs", "2", "--set", "data.image_size=8",
            "--set", "data.channels=1", "--set", "train.eval_samples=1", "--set", "data.classes=zero,one"]
    assert run(["train", *args, "--out", str(run_dir)]) == 0
    model = run_dir / "model.safetensors"
    assert read_header(model)["meta"]["data_spec"]["files_digest"].startswith("sha256:")
    assert run(["evaluate", str(model), "--samples", "1", "--json"]) == 0  # unchanged: evaluates
    capsys.readouterr()
    for k in range(3):  # three more images of one class
        shutil.copy(tmp_path / "photos" / "zero" / "0_00.png", tmp_path / "photos" / "zero" / f"new{k}.png")
    assert run(["evaluate", str(model), "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'photos'} has changed since the model was trained" in err and "Traceback" not in err
    (run_dir / "summary.json").unlink()  # as if interrupted after its last checkpoint
    (run_dir / "model.safetensors").unlink()
    assert run(["train", "--resume", str(run_dir)]) == 2
    assert "has changed since the model was trained" in capsys.readouterr().err
    # The same names with other contents: the run's normalisation, measured again, differs (a resumed
    # run went on, with no word, on other inputs than it started with).
    for k in range(3):
        (tmp_path / "photos" / "zero" / f"new{k}.png").unlink()
    ones = sorted((tmp_path / "photos" / "one").glob("*.png"))
    for i, path in enumerate(sorted((tmp_path / "photos" / "zero").glob("*.png"))):
        shutil.copy(ones[i % len(ones)], path)
    assert run(["train", "--resume", str(run_dir)]) == 2
    said = capsys.readouterr().err
    assert f"error: the images of {tmp_path / 'photos'} have changed since the run started: their normalisation " \
           "measured now, mean [" in said and "put the images back, or start a new run" in said, said
    # the split layout keeps its test images apart: nothing to record
    write_class(tmp_path / "apart" / "train" / "zero", 0, 4)
    write_class(tmp_path / "apart" / "train" / "one", 1, 4)
    write_class(tmp_path / "apart" / "test" / "zero", 0, 2, skip=4)
    write_class(tmp_path / "apart" / "test" / "one", 1, 2, skip=4)
    spec = build_dataset(f"imagefolder:{tmp_path / 'apart'}", options=SMALL).spec
    assert spec.files_digest == "" and "files_digest" not in spec.to_dict()


def test_a_resume_compares_the_normalisation_within_a_decoders_rounding():
    """Refused only where the images changed: another Pillow decodes a JPEG a little otherwise."""
    from ssvi_cli.data.spec import DataError, DataSpec

    spec = DataSpec("imagefolder:/p", (1, 8, 8), 2, ("a", "b"), (0.3,), (0.2,))
    spec.check_same_normalisation({"mean": [0.3004], "std": [0.1996]})
    for unreadable in (None, {}, {"mean": "x", "std": [0.2]}, {"mean": [None], "std": [0.2]}):
        spec.check_same_normalisation(unreadable)
    with pytest.raises(DataError, match="have changed since the run started"):
        spec.check_same_normalisation({"mean": [0.31], "std": [0.2]})
    DataSpec("digits", (1, 8, 8), 2, ("a", "b"), (0.3,), (0.2,)).check_same_normalisation({"mean": [0.9], "std": [0.2]})


def test_class_names_that_differ_only_in_unicode_normalisation_are_the_same_classes():
    """A folder named on macOS (decomposed, NFD) and the same name composed (NFC) print alike; evaluate
    refused them as "class 0 is 'grün' there and 'grün' in the model"."""
    import unicodedata

    from ssvi_cli.data import DataError
    from ssvi_cli.data.spec import DataSpec
    from ssvi_cli.evaluation.inputs import _check_compatible

    def spec(names):
        return DataSpec("imagefolder:x", (1, 8, 8), 2, tuple(names), (0.5,), (0.25,))

    nfc, nfd = unicodedata.normalize("NFC", "grün"), unicodedata.normalize("NFD", "grün")
    assert nfc != nfd
    _check_compatible("imagefolder:x", spec([nfd, "rot"]), spec([nfc, "rot"]))
    with pytest.raises(DataError, match="class 1 is 'blau' there and 'rot' in the model"):
        _check_compatible("imagefolder:x", spec([nfd, "blau"]), spec([nfc, "rot"]))


def test_long_decoding_shows_progress_and_short_decoding_stays_quiet(ws, capsys, tmp_path, monkeypatch):
    """120 photos of 3 MP took 24 s to decode before the first line of output; the progress lines were
    logged where nothing printed them."""
    from ssvi_cli.data import decoding, imagefolder

    args = ["train", "--data", f"imagefolder:{ws / 'split'}", "--epochs", "1", "--set", "data.image_size=8",
            "--set", "data.channels=1", "--set", "train.eval_samples=1"]
    assert run([*args, "--out", str(tmp_path / "quick")]) == 0
    assert "decoded" not in capsys.readouterr().err  # a few milliseconds: nothing to wait for
    monkeypatch.setattr(decoding, "_PROGRESS_EVERY_S", 0.0)  # as if every image took seconds
    monkeypatch.setattr(decoding, "_FIRST_PROGRESS_S", 0.0)
    assert run([*args, "--out", str(tmp_path / "slow"), "--json"]) == 0
    captured = capsys.readouterr()
    n = len(imagefolder.scan_folder(ws / "split").parts["train"][0])
    assert f"decoded 1/{n} train images of {ws / 'split'}" in captured.err  # its own val/: train alone
    assert f"decoded {n}/{n} train images of" in captured.err
    json.loads(captured.out)  # stdout stays the JSON document


def test_the_first_decoding_line_comes_after_a_second_and_the_rest_every_few(ws, monkeypatch, caplog):
    """The first line came after five seconds of decoding, as every later one: seconds of silence."""
    import logging
    from types import SimpleNamespace

    from ssvi_cli.data import decoding, imagefolder

    clock = iter(range(10_000))
    monkeypatch.setattr(decoding, "time", SimpleNamespace(monotonic=lambda: 0.5 * next(clock)))  # 0.5 s a call
    source = imagefolder.folder_source(str(ws / "flat"))
    part = source.load(None, True, False)  # the training images: the flat layout's validation comes from them
    # The CLI's progress handler (an earlier in-process command's) keeps the logger from propagating, and
    # caplog's handler sits only on the root logger before pytest 9.1: it is put on the logger itself,
    # which then passes nothing on (each record caught once, whichever pytest and whichever test ran before).
    progress = logging.getLogger("ssvi_cli.progress")
    monkeypatch.setattr(progress, "propagate", False)
    progress.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ssvi_cli.progress"):
            part.images.decode()
    finally:
        progress.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    n = len(part.images)
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert all(line.endswith(f"/{n} images for training and validation of {ws / 'flat'}") for line in lines), lines
    assert counts[0] == 2 and counts[-1] == n  # 1 s in (a clock read per image), and at the end
    assert all(b - a == 10 for a, b in zip(counts[:-2], counts[1:-1]))  # then every 5 s


@pytest.mark.parametrize("folder", ["split", "flat"])
def test_a_split_asked_for_alone_decodes_only_its_images(ws, monkeypatch, folder):
    """evaluate decoded every split of an image folder (its training images too: 17 s of 19 s on 120
    photos of 3 MP) to score one; the split it asks for comes out the same."""
    from ssvi_cli.data import imagefolder

    everything = build_dataset(f"imagefolder:{ws / folder}", options=SMALL, val_fraction=0.25)
    real, decoded_files = imagefolder.decode_images, []
    monkeypatch.setattr(imagefolder, "decode_images",
                        lambda files, *a, **k: decoded_files.extend(files) or real(files, *a, **k))
    options = replace(SMALL, mean=everything.spec.mean, std=everything.spec.std)  # as evaluate gives them
    for part in ("test", "val"):
        decoded_files.clear()
        alone = build_dataset(f"imagefolder:{ws / folder}", options=options, val_fraction=0.25, needed=(part,))
        want, got = getattr(everything, part), getattr(alone, part)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
        assert len(decoded_files) == len(want) and len(alone.train) == 0


@pytest.mark.parametrize("folder", ["flat", "split", "noval"])
@pytest.mark.parametrize("args", [{}, {"val_fraction": 0.25, "seed": 3}, {"max_train": 5}, {"classes": ("two", "zero")}])
def test_the_training_split_is_counted_without_decoding_an_image(ws, monkeypatch, folder, args):
    """A launcher refuses a training split smaller than its processes before they start; it counts the
    split from the labels, and counts what build_dataset gives."""
    from ssvi_cli.data import imagefolder
    from ssvi_cli.data.splits import train_size

    name, options = f"imagefolder:{ws / folder}", replace(SMALL, classes=args.get("classes"))
    kw = {k: v for k, v in args.items() if k != "classes"}
    want = len(build_dataset(name, options=options, **kw).train)
    monkeypatch.setattr(imagefolder, "decode_images", lambda *a, **k: pytest.fail("decoded an image"))
    assert train_size(name, options=options, **kw) == want


def test_a_folder_with_fewer_training_images_than_processes_is_refused_before_they_start(tmp_path, capsys,
                                                                                         monkeypatch):
    """--nproc 4 on a folder of 3 training images started the processes, each of which printed the
    error, and left an empty run folder behind with its lock file."""
    from ssvi_cli.training import launcher

    for digit, name in list(NAMES.items())[:2]:
        write_class(tmp_path / "tiny" / name, digit, 2)  # 3 training images, 1 test image
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("must not launch"))
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'tiny'}", "--nproc", "4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 3 examples, too few to give each of 4 processes one" in err, err
    assert not (tmp_path / "r").exists()


def test_every_unreadable_image_is_named_at_once(tmp_path, capsys):
    """Training stopped at the first file that did not decode: a folder with several took a run (and a
    decode of the images before it) per file to find them all, and then one per split."""
    for digit, name in list(NAMES.items())[:2]:
        for split in ("train", "test"):
            write_class(tmp_path / "f" / split / name, digit, 4)
    broken = [tmp_path / "f" / "train" / "one" / f"broken{i:02d}.png" for i in range(12)]
    broken.append(tmp_path / "f" / "test" / "zero" / "broken.png")  # in the other split
    for path in broken:
        path.write_text("this is text, not a PNG\n")
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'f'}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert [p for p in broken if str(p) in err] == broken[:11], err  # the first and ten more, then a count
    assert err.startswith(f"error: 13 of 29 images of {tmp_path / 'f'} cannot be read: image {broken[0]} "
                          "cannot be read (not an image format Pillow knows); also ")
    assert err.rstrip().endswith(f"{broken[10]} and 2 more; replace or remove them"), err
    for path in broken[1:]:
        path.unlink()
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'f'}", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(f"error: image {broken[0]} cannot be read (not an image format")


def test_unreadable_files_named_are_those_the_command_decodes(tmp_path):
    """The error named files of classes data.classes leaves out, and decoded again splits that had
    decoded fine, to find the other splits' broken files."""
    from ssvi_cli.data.images import UnreadableImages

    for digit, name in NAMES.items():
        for split in ("train", "test"):
            write_class(tmp_path / "f" / split / name, digit, 3)
    for where in ("train/one", "train/two", "test/zero"):
        (tmp_path / "f" / where / "broken.png").write_text("not a PNG\n")
    name = f"imagefolder:{tmp_path / 'f'}"
    with pytest.raises(UnreadableImages) as caught:  # class two left out: its file is not read
        build_dataset(name, options=replace(SMALL, classes=("one", "zero")))
    assert "2 of 14 images of" in str(caught.value) and "two" not in str(caught.value), str(caught.value)
    for needed, words in ((("test",), "image "), (("train", "val"), r"2 of 1\d (train )?images of")):
        with pytest.raises(UnreadableImages, match=words) as caught:  # evaluate asks for one split
            build_dataset(name, options=replace(SMALL, mean=(0.5,), std=(0.25,)), needed=needed)
        assert ("zero" in str(caught.value)) == (needed == ("test",)), str(caught.value)


def test_a_class_with_no_test_image_is_noted_by_train_and_evaluate(tmp_path, capsys):
    """A flat folder keeps a class's only image for training: the scores then cover the other classes."""
    write_class(tmp_path / "one" / "a", 1, 1)
    write_class(tmp_path / "one" / "b", 2, 12)
    out = tmp_path / "run"
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'one'}", "--epochs", "1", "--set",
                "train.eval_samples=1", "--out", str(out), "--json"]) == 0
    said = "1 of the model's 2 classes ('a') has no image in the test split: its scores speak for the others only"
    assert said in json.loads(capsys.readouterr().out)["notes"]
    assert run(["evaluate", str(out), "--samples", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [said]
    write_class(tmp_path / "two" / "a", 1, 5)  # five images: one is held out for testing, and nothing is said
    write_class(tmp_path / "two" / "b", 2, 12)
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'two'}", "--epochs", "1", "--set",
                "train.eval_samples=1", "--out", str(tmp_path / "run2"), "--json"]) == 0
    assert not any("no image" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_the_stem_note_is_for_sparse_methods_only(ws, tmp_path, capsys):
    # dense VI said its stem "stays dense, so the model's density is 1.0000, not 0.0500" beside a table
    # saying target sparsity 0
    common = ["--data", f"imagefolder:{ws / 'flat'}", "--model", "lenet5", "--epochs", "1", "--set",
              "data.image_size=16", "--set", "data.channels=1", "--set", "train.eval_samples=1"]
    assert run(["train", *common, "--sparsity", "0.9", "--out", str(tmp_path / "s")]) == 0
    assert "stays dense (model.dense_stem), so the model's density is" in " ".join(capsys.readouterr().err.split())
    assert run(["train", *common, "--method", "vi", "--out", str(tmp_path / "v")]) == 0
    assert "stays dense" not in capsys.readouterr().err


def test_classes_and_files_sort_as_text_where_paths_sort_ignoring_case(tmp_path, monkeypatch):
    """A Windows path sorts ignoring case: classes Banana and apple (and their files) came in another
    order than on Linux and macOS and than torchvision's ImageFolder gives, so the labels and the seeded
    split changed with the system. Simulated here by making paths compare as Windows' do."""
    import pathlib

    for cls in ("Banana", "apple"):
        for name in ("B.png", "a.png"):
            (tmp_path / cls).mkdir(exist_ok=True)
            Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / cls / name)
    before = scan_folder(tmp_path)
    monkeypatch.setattr(pathlib.PurePath, "__lt__", lambda a, b: str(a).lower() < str(b).lower())
    monkeypatch.setattr(pathlib.PurePath, "__gt__", lambda a, b: str(a).lower() > str(b).lower())
    assert sorted([Path("B"), Path("a")]) == [Path("a"), Path("B")]  # the simulation holds
    scan = scan_folder(tmp_path)
    assert scan.class_names == before.class_names == ("Banana", "apple")  # as torchvision.datasets.ImageFolder
    files, labels = scan.parts["all"]
    assert [f"{f.parent.name}/{f.name}" for f in files] == ["Banana/B.png", "Banana/a.png", "apple/B.png", "apple/a.png"]
    assert files == before.parts["all"][0] and labels.tolist() == [0, 0, 1, 1]


def test_a_model_or_run_made_before_reduced_jpeg_decoding_reads_its_jpegs_whole(tmp_path, capsys, monkeypatch):
    """A large JPEG is decoded at a reduced scale since 2026-12-06: a run begun before was refused on resume
    ("the images have changed", they had not) and an older model's evaluate scored other pixels than it
    trained on (0.33 -> 0.25 accuracy in a review), without a word. Their data description has no
    reduced_jpeg: their JPEGs are decoded whole, as in their training; a new file records it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ssvi_cli.data import images

    digits, target = _digits()
    for digit, name in NAMES.items():  # 64x64 JPEGs at image size 8: decoded at 1/4 scale since
        (tmp_path / "photos" / name).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(target == digit)[:6]):
            Image.fromarray(digits[i]).resize((64, 64)).save(tmp_path / "photos" / name / f"{j}.jpg", quality=90)
    calls = []
    reduction = images._reduction
    monkeypatch.setattr(images, "_reduction", lambda shape, size: calls.append(shape) or reduction(shape, size))
    run_dir = tmp_path / "run"
    assert run(["train", "--data", f"imagefolder:{tmp_path / 'photos'}", "--epochs", "1", "--set", "data.image_size=8",
                "--set", "data.channels=1", "--set", "train.eval_samples=1", "--out", str(run_dir), "--json"]) == 0
    assert calls  # a new run decodes at a reduced scale, and its file says so
    new = run_dir / "model.safetensors"
    with safe_open(str(new), "pt") as fh:
        meta = dict(fh.metadata())
    spec = json.loads(meta["data_spec"])
    assert spec["reduced_jpeg"] is True
    with safe_open(str(tmp_path / "digits" / "model.safetensors"), "pt") if run(  # other data: as before, no key
            ["train", "--epochs", "1", "--set", "model.widths=[8]", "--out", str(tmp_path / "digits")]) == 0 else None as fh:
        assert "reduced_jpeg" not in json.loads(fh.metadata()["data_spec"])
    old = tmp_path / "old.safetensors"  # the same file as written before the key existed
    save_file(load_file(str(new)), str(old), metadata={**meta, "data_spec": json.dumps(
        {k: v for k, v in spec.items() if k != "reduced_jpeg"})})
    import ssvi_cli as ssvi

    for source, reduced in ((new, True), (old, False)):  # saved again with its classes renamed: decoded alike
        renamed = tmp_path / f"renamed-{source.name}"
        model = ssvi.load(source)
        ssvi.save(model, renamed, class_names=[n.upper() for n in model.ssvi_card.data.class_names])
        with safe_open(str(renamed), "pt") as fh:
            assert json.loads(fh.metadata()["data_spec"]).get("reduced_jpeg", False) is reduced, source
    (tmp_path / "other").mkdir()
    Image.fromarray(digits[0]).resize((64, 64)).save(tmp_path / "other" / "a.jpg")
    image = str(tmp_path / "photos" / "two" / "0.jpg")
    for model, reduced in ((new, True), (old, False)):
        for args in (["evaluate", str(model), "--mode", "mean", "--json"],  # its test split
                     ["evaluate", str(model), "--mode", "mean", "--ood", str(tmp_path / "other"), "--split", "all"],
                     ["infer", str(model), image]):
            calls.clear()
            assert run(args) == 0, capsys.readouterr().err
            capsys.readouterr()
            assert bool(calls) is reduced, (model, args)
    # a run begun before: resumed (its last step's evaluation and model file) as it began, not refused
    begun = tmp_path / "begun"
    with images.whole_jpegs():  # as ssvi decoded before, and so without the key
        assert run(["train", "--data", f"imagefolder:{tmp_path / 'photos'}", "--epochs", "1", "--set",
                    "data.image_size=8", "--set", "data.channels=1", "--set", "train.eval_samples=1", "--out",
                    str(begun), "--json"]) == 0
    capsys.readouterr()
    for done in ("model.safetensors", "summary.json"):
        (begun / done).unlink()
    assert all("reduced_jpeg" not in torch.load(path, weights_only=True)["data_spec"]
               for path in (begun / "checkpoints").iterdir())
    bare = tmp_path / "bare"  # older still: a checkpoint without a data description
    shutil.copytree(begun, bare)
    for path in (bare / "checkpoints").iterdir():
        torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "data_spec"}, path)
    for resumed in (begun, bare):
        calls.clear()
        assert run(["train", "--resume", str(resumed), "--json"]) == 0, capsys.readouterr().err
        assert not calls, resumed
        with safe_open(str(resumed / "model.safetensors"), "pt") as fh:
            assert "reduced_jpeg" not in json.loads(fh.metadata()["data_spec"])
