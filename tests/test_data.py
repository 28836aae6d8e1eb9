"""Datasets, splits, augmentation, OOD sets and preprocessing (offline, on fixture files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_torchvision import (
    accept_fixture_checksums,
    write_cifar10,
    write_cifar100,
    write_mnist,
    write_svhn,
)
from torch.utils.data import DataLoader

from ssvi_cli.data import (
    DATASETS,
    DIGITS_MEAN,
    DIGITS_STD,
    OOD_SETS,
    DataError,
    DatasetUnavailable,
    DataSpec,
    build_dataset,
    build_ood,
    dataset_names,
    default_data_dir,
    get_spec,
    ood_names,
    preprocess,
)

TORCHVISION_SETS = {  # name -> (writer, n_train, n_test)
    "mnist": (lambda root: write_mnist(root, "MNIST"), 60, 20),
    "fashion-mnist": (lambda root: write_mnist(root, "FashionMNIST"), 60, 20),
    "kmnist": (lambda root: write_mnist(root, "KMNIST"), 60, 20),
    "cifar10": (write_cifar10, 50, 20),
    "cifar100": (write_cifar100, 200, 100),
    "svhn": (write_svhn, 50, 20),
}


@pytest.fixture
def tv_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: write one fixture set under tmp_path and accept its checksums."""

    def make(name: str) -> Path:
        TORCHVISION_SETS[name][0](tmp_path)
        accept_fixture_checksums(monkeypatch, tmp_path)
        return tmp_path

    return make


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits", seed=0)


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


# --------------------------------------------------------------------------- registry / spec


def test_registries_have_the_documented_names():
    assert dataset_names() == sorted(["digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn"])
    assert set(ood_names()) == {"noise", "sklearn-photos"} | set(dataset_names()) - {"digits"}
    assert set(DATASETS) == set(dataset_names()) and set(OOD_SETS) == set(ood_names())


@pytest.mark.parametrize("call", [lambda: build_dataset("imagenet"), lambda: get_spec("imagenet")])
def test_unknown_dataset_lists_valid_names(call):
    with pytest.raises(DataError, match="valid names are: cifar10, cifar100, digits"):
        call()


def test_unknown_ood_lists_valid_names():
    with pytest.raises(DataError, match="valid names are: .*noise.*sklearn-photos"):
        build_ood("textures", get_spec("digits"))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_spec_round_trips_through_json(name):
    spec = get_spec(name)
    assert len(spec.class_names) == spec.num_classes == (100 if name == "cifar100" else 10)
    assert len(spec.mean) == len(spec.std) == spec.input_shape[0]
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(DataError, match="unknown key extra"):
        DataSpec.from_dict({**get_spec("digits").to_dict(), "extra": 1})
    lacking = {k: v for k, v in get_spec("digits").to_dict().items() if k != "mean"}
    with pytest.raises(DataError, match="^missing mean .*: edited, or written by another program$"):
        DataSpec.from_dict(lacking)


def test_spec_of_a_class_subset_round_trips_and_older_specs_still_load():
    from ssvi_cli.config import DataConfig

    spec = get_spec("digits", DataConfig(classes=("7", "2")))
    assert (spec.num_classes, spec.class_names, spec.held_out_classes[:2]) == (2, ("7", "2"), ("0", "1"))
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    full = get_spec("digits").to_dict()
    assert "dataset_classes" not in full  # a model of all the classes is described as before
    assert DataSpec.from_dict(full).dataset_classes == () and DataSpec.from_dict(full).held_out_classes == ()


def test_classes_keep_part_of_every_split_relabelled_in_the_order_given(digits):
    from ssvi_cli.config import DataConfig

    part = build_dataset("digits", seed=0, options=DataConfig(classes=("7", "2", "5")))
    assert part.spec.class_names == ("7", "2", "5") and part.spec.num_classes == 3
    _, test_y = _stack(digits.test)
    x, y = _stack(part.test)
    for new, old in enumerate((7, 2, 5)):  # label `new` holds exactly the test images of digit `old`
        assert _rows(x[y == new]) == _rows(_stack(digits.test)[0][test_y == old])
    for split in (part.train, part.val):
        assert set(_stack(split)[1].tolist()) == {0, 1, 2}
    held, held_y = _stack(part.heldout)
    assert len(held) == int((~torch.isin(test_y, torch.tensor([7, 2, 5]))).sum()) and set(held_y.tolist()) == {-1}
    assert digits.heldout is None


def test_classes_by_name_or_index_on_torchvision_files(tv_root):
    from ssvi_cli.config import DataConfig

    root = tv_root("fashion-mnist")
    splits = build_dataset("fashion-mnist", data_dir=root, options=DataConfig(classes=("Bag", "0")))
    assert splits.spec.class_names == ("Bag", "T-shirt/top")
    assert len(splits.test) == 4 and len(splits.heldout) == 16  # labels i % 10 over 20 test images
    with pytest.raises(DataError, match=r"'Shoe' is not a class of fashion-mnist; valid are indices 0..9 or the "
                                        r"class names \(T-shirt/top, Trouser"):
        get_spec("fashion-mnist", DataConfig(classes=("Bag", "Shoe")))


def test_default_data_dir_is_under_user_cache():
    assert default_data_dir() == Path.home() / ".cache" / "ssvi" / "data"


# --------------------------------------------------------------------------- digits


def test_digits_normalisation_constants_match_data():
    from sklearn.datasets import load_digits

    pixels = load_digits().images / 16.0
    assert abs(pixels.mean() - DIGITS_MEAN) < 1e-3
    assert abs(pixels.std() - DIGITS_STD) < 1e-3


def test_digits_are_scikit_learns_with_its_stratified_split_read_without_importing_it(monkeypatch):
    """Read from scikit-learn's file without its multi-second import, the images, labels and split
    are load_digits() and train_test_split's, bit for bit, also where its file cannot be found."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from ssvi_cli.data import digits as embedded

    bunch = load_digits()
    train, test = train_test_split(np.arange(1797), test_size=embedded.TEST_FRACTION, random_state=embedded.TEST_SEED,
                                   stratify=bunch.target)
    assert np.array_equal(embedded.split_indices(False), np.sort(test))
    assert np.array_equal(embedded.split_indices(True), np.sort(train))
    assert embedded._bundled_csv() is not None  # the quick way is the one taken here
    for found in (embedded._bundled_csv, lambda: None):
        monkeypatch.setattr(embedded, "_bundled_csv", found)
        images, labels = embedded.load()
        assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
        assert images.dtype == np.float64 and labels.dtype == np.int64
    loaded = subprocess.run([sys.executable, "-c", "import sys; from ssvi_cli.data import build_dataset; "
                             "build_dataset('digits'); print('sklearn' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["False"]


def test_digits_shapes_and_sizes(digits):
    assert digits.spec.input_shape == (1, 8, 8) and digits.spec.class_names == tuple("0123456789")
    assert len(digits.test) == 360 and len(digits.train) + len(digits.val) == 1797 - 360
    assert len(digits.val) == round(0.1 * (1797 - 360))
    x, y = digits.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    xs, ys = _stack(digits.train)
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1) < 0.05
    assert set(ys.tolist()) == set(range(10))


def test_digits_test_split_is_fixed_across_seeds_and_val_moves(digits):
    other = build_dataset("digits", seed=1)
    assert torch.equal(_stack(digits.test)[0], _stack(other.test)[0])
    assert not torch.equal(digits.val.indices, other.val.indices)
    again = build_dataset("digits", seed=0)
    assert torch.equal(digits.val.indices, again.val.indices)
    assert torch.equal(digits.train.indices, again.train.indices)


def test_digits_val_is_stratified_and_disjoint(digits):
    assert not set(digits.train.indices.tolist()) & set(digits.val.indices.tolist())
    counts = np.bincount(_stack(digits.val)[1].numpy(), minlength=10)
    assert counts.min() >= 12 and counts.max() <= 16
    assert not _rows(_stack(digits.val)[0]) & _rows(_stack(digits.test)[0])


def test_zero_val_fraction_and_max_train():
    splits = build_dataset("digits", val_fraction=0.0, max_train=100)
    assert len(splits.val) == 0 and len(splits.train) == 100 and len(splits.test) == 360
    capped = build_dataset("digits", val_fraction=0.2, max_train=80, seed=3)
    assert len(capped.train) == 80 and len(capped.val) == 20
    assert torch.equal(capped.train.indices, build_dataset("digits", val_fraction=0.2, max_train=80, seed=3).train.indices)


def test_max_test_draws_one_test_subset_whatever_the_seed(tmp_path):
    """A quick run on CIFAR still scored all 10,000 test images in its final evaluation (minutes on a
    CPU): data.max_test caps it, with the same images for every seed so that runs compare."""
    full = build_dataset("digits").test
    one, other = (build_dataset("digits", max_test=50, seed=s).test for s in (0, 7))
    assert len(one) == 50 and torch.equal(one.indices, other.indices)
    assert set(one.indices.tolist()) <= set(full.indices.tolist())
    assert build_dataset("digits", max_test=10_000).test.indices.tolist() == full.indices.tolist()  # fewer: all
    from ssvi_cli.cli import run

    assert run(["train", "--epochs", "1", "--set", "data.max_test=40", "--set", "train.eval_samples=1",
                "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["images"]["test"] == 40
    assert run(["evaluate", str(tmp_path / "r"), "--samples", "1", "--json", "--output", str(tmp_path / "e.json")]) == 0
    notes = json.loads((tmp_path / "e.json").read_text())["notes"]  # evaluate scores all 360, and says why they differ
    assert "the run's own final evaluation scored 40 of these 360 test images (data.max_test)" in " ".join(notes)


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"max_train": 0}, {"max_test": 0}])
def test_bad_split_arguments_raise(kwargs):
    with pytest.raises(DataError):
        build_dataset("digits", **kwargs)


# --------------------------------------------------------------------------- torchvision sets


@pytest.mark.parametrize("name", sorted(TORCHVISION_SETS))
def test_torchvision_set_builds_from_files(name, tv_root):
    root = tv_root(name)
    _, n_train, n_test = TORCHVISION_SETS[name]
    splits = build_dataset(name, data_dir=root, val_fraction=0.2, augment=False)
    spec = splits.spec
    assert spec == get_spec(name)  # class names read from the files equal the built-in ones
    assert len(splits.train) + len(splits.val) == n_train and len(splits.val) == round(0.2 * n_train)
    assert len(splits.test) == n_test
    for ds in (splits.train, splits.val, splits.test):
        x, y = ds[0]
        assert x.shape == spec.input_shape and x.dtype == torch.float32 and isinstance(y, int)
    xt, yt = _stack(splits.train)
    assert yt.min() >= 0 and yt.max() < spec.num_classes
    # random uint8 pixels have mean 127.5/255 and std ~0.29; check the spec's affine map was applied
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pixels = xt * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)  # exact uint8 levels
    assert not _rows(xt) & _rows(_stack(splits.val)[0])


def test_class_names_come_from_the_files(tv_root):
    splits = build_dataset("cifar10", data_dir=tv_root("cifar10"))
    assert splits.spec.class_names[0] == "airplane" and splits.spec.class_names[-1] == "truck"
    c100 = build_dataset("cifar100", data_dir=tv_root("cifar100")).spec.class_names
    assert c100[0] == "apple" and c100[-1] == "worm" and list(c100) == sorted(c100)
    assert build_dataset("fashion-mnist", data_dir=tv_root("fashion-mnist")).spec.class_names[0] == "T-shirt/top"


def test_svhn_label_ten_becomes_zero(tv_root):
    splits = build_dataset("svhn", data_dir=tv_root("svhn"), val_fraction=0.0)
    labels = _stack(splits.train)[1]
    assert sorted(set(labels.tolist())) == list(range(10))
    assert int(labels[0]) == 0  # the fixture writes 10 for the first image (digit 0)
    assert splits.spec.class_names == tuple("0123456789")


def test_val_is_carved_from_train_and_test_untouched(tv_root):
    root = tv_root("mnist")
    from torchvision.datasets import MNIST

    full = MNIST(root, train=True).data.unsqueeze(1)
    test_raw = MNIST(root, train=False).data.unsqueeze(1)
    splits = build_dataset("mnist", data_dir=root, val_fraction=0.25, seed=5)
    spec = splits.spec
    back = lambda x: (x * spec.std[0] + spec.mean[0]).mul(255).round().to(torch.uint8)  # noqa: E731
    train_px, val_px = back(_stack(splits.train)[0]), back(_stack(splits.val)[0])
    assert _rows(train_px) | _rows(val_px) == _rows(full)
    assert not _rows(train_px) & _rows(val_px)
    assert torch.equal(back(_stack(splits.test)[0]), test_raw)


@pytest.mark.parametrize("name, expected, files", [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                           "t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py", "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
                                       "test_batch, batches.meta"),
    ("svhn", "", "train_32x32.mat"),
])
def test_missing_files_raise_unavailable_with_path_and_hint(tmp_path, name, expected, files):
    with pytest.raises(DatasetUnavailable) as info:
        build_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / expected).rstrip("/") in message and "--download" in message
    assert f"(missing {files}; torchvision: " in message  # the files to place there, by name
    assert "\n" not in message
    if name == "mnist":  # one file of four: it alone is named
        write_mnist(tmp_path, "MNIST")
        (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()
        with pytest.raises(DatasetUnavailable, match=r"\(missing t10k-images-idx3-ubyte; torchvision: "):
            build_dataset(name, data_dir=tmp_path)


def test_corrupted_cifar_file_is_unavailable(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    with pytest.raises(DatasetUnavailable, match=r"its files \(data_batch_1, .*, batches.meta\) are damaged or not "
                                                 "the original ones"):
        build_dataset("cifar10", data_dir=tmp_path)  # every file there, none torchvision's own
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(url, filename, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with monkeypatch.context() as patch:  # --download offline: the files' fault is said, not only the network's
        patch.setattr(tvu, "_urlretrieve", offline)
        with pytest.raises(DatasetUnavailable, match=r"^cifar10's files at .*cifar-10-batches-py are there but fail "
                                                     r"torchvision's checksum .*fetching them again failed \(<urlopen"):
            build_dataset("cifar10", data_dir=tmp_path, download=True)
    accept_fixture_checksums(monkeypatch, tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(DatasetUnavailable, match="--download"):
        build_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("bad", ["garbage", "labels", "empty", "no-images", "truncated"])
def test_a_malformed_mnist_file_is_unavailable_in_one_line(tmp_path, bad):
    """torchvision asserts (AssertionError with no words), or fails on a dtype or a count, on idx files
    that are there but not MNIST's: exit 1 with its words, which named no file. A truncated file fails
    as a RuntimeError, which read as a failed download (with --download: 'check the network') though
    torchvision fetches nothing while the files are there."""
    raw = write_mnist(tmp_path, "MNIST")
    images = raw / "t10k-images-idx3-ubyte"
    if bad == "garbage":
        images.write_bytes(b"\x12\x34" * 500)
    elif bad == "labels":
        images.write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
    elif bad == "empty":
        images.write_bytes(b"")
    elif bad == "truncated":
        images.write_bytes(images.read_bytes()[:1000])
    else:
        images.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28]))
    for download in (False, True):
        with pytest.raises(DatasetUnavailable) as caught:
            build_dataset("mnist", data_dir=tmp_path, download=download)
        message = str(caught.value)
        assert "t10k-images-idx3-ubyte" in message and "\n" not in message
        assert "remove them and pass --download" in message and "network" not in message


def test_labels_outside_the_classes_are_refused_naming_the_split_and_item(tmp_path):
    """Labels of 12 in MNIST's files failed as an IndexError in the loss, or, in the test split, only in
    the final evaluation after the whole training run."""
    import struct

    raw = write_mnist(tmp_path, "MNIST")
    labels = np.arange(20) % 10
    labels[[7, 11]] = (12, 200)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 20) + labels.astype(np.uint8).tobytes())
    with pytest.raises(DataError, match=r"^mnist's test labels in .*MNIST/raw run outside 0\.\.9: 2 of 20 \(the first, "
                                        r"12, at item 7\); the files are damaged or not the original ones$"):
        build_dataset("mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------- augmentation


def test_cifar_augmentation_changes_train_only_and_is_reproducible(tv_root):
    root = tv_root("cifar10")
    plain = build_dataset("cifar10", data_dir=root, augment=False)
    aug = build_dataset("cifar10", data_dir=root, augment=True)
    x_plain = _stack(plain.train)[0]
    torch.manual_seed(0)
    x1 = _stack(aug.train)[0]
    torch.manual_seed(0)
    x2 = _stack(aug.train)[0]
    assert torch.equal(x1, x2) and not torch.equal(x1, x_plain)
    assert x1.shape == x_plain.shape
    for a, b in ((aug.val, plain.val), (aug.test, plain.test)):
        assert torch.equal(_stack(a)[0], _stack(b)[0])


def test_augmentation_is_crop_with_zero_padding_and_flip(tv_root):
    splits = build_dataset("cifar10", data_dir=tv_root("cifar10"))
    spec = splits.spec
    raw = splits.train.images[:1].float() / 255
    torch.manual_seed(1)
    seen = set()
    for _ in range(40):
        x = splits.train[0][0] * torch.tensor(spec.std).view(-1, 1, 1) + torch.tensor(spec.mean).view(-1, 1, 1)
        padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))[0]
        match = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.allclose(
                padded[:, top : top + 32, left : left + 32].flip(-1) if flip else padded[:, top : top + 32, left : left + 32],
                x,
                atol=1e-5,
            )
        ]
        assert match, "augmented image is not a padded crop (+flip) of the original"
        seen.add(match[0])
    assert len(seen) > 10 and {m[2] for m in seen} == {False, True}


def test_seeded_dataloader_reproduces_augmented_batches(tv_root):
    train = build_dataset("cifar10", data_dir=tv_root("cifar10")).train

    def first_batch() -> torch.Tensor:
        loader = DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
        x, y = next(iter(loader))
        assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
        return x

    torch.manual_seed(7)
    a = first_batch()
    torch.manual_seed(7)
    assert torch.equal(a, first_batch())


def test_a_runs_augmentation_is_the_same_with_loader_workers_and_in_a_resumed_epoch(tv_root, tmp_path):
    # Worker i of W augments batches i, i + W, ... from its own RNG: a run resumed at batch 3, or one
    # with another train.num_workers, gave other crops and flips to the same batches.
    from ssvi_cli import config as C
    from ssvi_cli.training.trainer import Trainer

    root = tv_root("cifar10")
    over = {"data.name": "cifar10", "data.data_dir": str(root), "data.val_fraction": 0.0, "model.name": "mlp",
            "model.widths": [8], "train.batch_size": 4, "train.epochs": 1}
    batches = {}
    for workers in (0, 2):
        cfg = C.apply_overrides(C.load_preset("digits_mlp"), {**over, "train.num_workers": workers})
        trainer = Trainer.create(cfg, tmp_path / f"w{workers}")
        assert trainer.splits.train.augment is not None and trainer.steps_per_epoch >= 5
        whole = [x for x, _ in trainer.batches(1)]
        torch.manual_seed(5)  # the global RNG (the layers' noise) plays no part
        assert all(torch.equal(a, b) for a, b in zip(whole[3:], [x for x, _ in trainer.batches(1, start=3)]))
        batches[workers] = whole
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    assert not torch.equal(batches[0][0], [x for x, _ in trainer.batches(2)][0])  # another epoch, other draws
    plain = trainer.splits.train.seeded(7)
    assert torch.equal(plain[0][0], plain[0][0]) and not torch.equal(plain[0][0], trainer.splits.train.seeded(8)[0][0])


def test_digits_and_mnist_are_never_augmented(digits, tv_root):
    assert torch.equal(_stack(digits.train)[0], _stack(build_dataset("digits", augment=True).train)[0])
    root = tv_root("mnist")
    assert torch.equal(
        _stack(build_dataset("mnist", data_dir=root).train)[0],
        _stack(build_dataset("mnist", data_dir=root, augment=False).train)[0],
    )


# --------------------------------------------------------------------------- OOD


def test_svhn_ood_for_digits_has_digits_shape(tv_root):
    root = tv_root("svhn")
    ood = build_ood("svhn", get_spec("digits"), data_dir=root, max_items=7)
    assert len(ood) == 7
    x, y = ood[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y == -1
    full = build_ood("svhn", get_spec("mnist"), data_dir=root, max_items=None)
    assert len(full) == 20 and full[0][0].shape == (1, 28, 28)


def test_a_dataset_registered_after_import_is_an_ood_set_too(tmp_path, monkeypatch):
    """data/ood.py copied DATASETS into its OOD sets once, at its import: a dataset a user's module
    registered later was a dataset for train but an unknown OOD set for evaluate --ood."""
    from ssvi_cli.data.ood import folder_sets, parse_ood
    from ssvi_cli.data.sources import DatasetSource
    from ssvi_cli.data.spec import DataSpec, RawImages

    def load(data_dir, train, download):  # 6 gray 8x8 images of the folder given, 2 classes
        assert data_dir == tmp_path and not train
        return RawImages(torch.arange(6 * 64, dtype=torch.uint8).reshape(6, 1, 8, 8), torch.tensor([0, 1] * 3), ("a", "b"))

    spec = DataSpec("mine", (1, 8, 8), 2, ("a", "b"), (0.5,), (0.25,))
    monkeypatch.setitem(DATASETS._items, "mine", DatasetSource(spec=spec, load=load))
    assert "mine" in OOD_SETS and "mine" in ood_names() and "mine" in folder_sets()
    request = parse_ood(f"mine={tmp_path}")
    assert (request.kind, request.name, request.label) == ("set", "mine", "mine")
    ood = build_ood("mine", get_spec("digits"), data_dir=tmp_path, max_items=4)
    assert len(ood) == 4 and ood[0][0].shape == (1, 8, 8) and ood[0][1] == -1
    assert "digits" not in OOD_SETS and "noise" in OOD_SETS  # the in-distribution default is none; its own stay
    with pytest.raises(ValueError, match="OOD set 'mine' registered twice"):  # as one added to the OOD sets
        OOD_SETS.add("mine", lambda *args: None)


def test_mnist_ood_for_cifar_is_rgb(tv_root):
    ood = build_ood("mnist", get_spec("cifar10"), data_dir=tv_root("mnist"), max_items=5)
    x = ood[0][0]
    assert x.shape == (3, 32, 32)
    assert torch.allclose(
        x[0] * 0.2470 + 0.4914, x[1] * 0.2435 + 0.4822, atol=1e-5
    )  # gray repeated into every channel


def test_missing_ood_files_raise_unavailable(tmp_path):
    with pytest.raises(DatasetUnavailable, match="--download"):
        build_ood("cifar100", get_spec("digits"), data_dir=tmp_path)


@pytest.mark.parametrize("spec_name", ["digits", "cifar10"])
def test_noise_is_seeded(spec_name):
    spec = get_spec(spec_name)
    a, b, c = (build_ood("noise", spec, seed=s, max_items=10) for s in (0, 0, 1))
    assert len(a) == 10 and a[0][0].shape == spec.input_shape and a[0][1] == -1
    assert torch.equal(_stack(a)[0], _stack(b)[0]) and not torch.equal(_stack(a)[0], _stack(c)[0])
    pixels = _stack(a)[0] * torch.tensor(spec.std).view(1, -1, 1, 1) + torch.tensor(spec.mean).view(1, -1, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert len(build_ood("noise", spec)) == 2000


@pytest.mark.parametrize("spec_name", ["digits", "mnist", "cifar10"])
def test_sklearn_photos(spec_name):
    spec = get_spec(spec_name)
    ood = build_ood("sklearn-photos", spec, seed=0, max_items=50)
    x, _ = _stack(ood)
    assert x.shape == (50, *spec.input_shape) and ood[0][1] == -1
    assert x.std() > 0.1 and len(_rows(x)) == 50
    assert torch.equal(x, _stack(build_ood("sklearn-photos", spec, seed=0, max_items=50))[0])


# --------------------------------------------------------------------------- preprocess


def _spec(channels: int, size: int) -> DataSpec:
    return DataSpec("t", (channels, size, size), 2, ("a", "b"), (0.5,) * channels, (0.25,) * channels)


def test_preprocess_rgb_to_gray_uses_luminance_and_resizes():
    img = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    for i in range(3):
        img[i, i] = 255  # pure red, green, blue: each weight of the luminance on its own
    out = preprocess(img, _spec(1, 8))
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.float32
    for i, weight in enumerate((0.299, 0.587, 0.114)):
        assert torch.allclose(out[i], torch.full_like(out[i], (weight - 0.5) / 0.25), atol=1e-4)


def test_preprocess_gray_to_rgb_and_alpha_dropped():
    gray = torch.rand(3, 1, 28, 28)
    rgb = preprocess(gray, _spec(3, 28))
    assert rgb.shape == (3, 3, 28, 28) and torch.allclose(rgb[:, 0], (gray[:, 0] - 0.5) / 0.25)
    assert torch.equal(rgb[:, 0], rgb[:, 2])
    rgba = torch.cat([torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16)], dim=1)
    assert torch.allclose(preprocess(rgba, _spec(3, 16)), (rgba[:, :3] - 0.5) / 0.25)


def test_preprocess_resize_is_antialiased():
    stripes = torch.zeros(1, 1, 32, 32)
    stripes[..., ::2] = 1.0  # one-pixel stripes average to 0.5 under antialiasing
    out = preprocess(stripes, _spec(1, 8)) * 0.25 + 0.5
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=0.05)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(1, 2, 8, 8), "2-channel"),
        (torch.rand(3, 8, 8), "dims"),
        (torch.rand(1, 1, 3, 8, 8), "dims"),
        (torch.rand(1, 3, 8, 8) * 255, r"\[0, 1\]"),
        (torch.ones(1, 3, 8, 8, dtype=torch.int64), "dtype"),
    ],
)
def test_preprocess_rejects_unreconcilable_inputs(images, match):
    with pytest.raises(DataError, match=match):
        preprocess(images, _spec(3, 8))


def test_a_failed_download_of_an_ood_set_says_so_and_nothing_about_converting(tmp_path, monkeypatch):
    """It read 'OOD set mnist cannot be converted to the model's input (1, 8, 8): downloading ...'."""
    import torchvision.datasets as tvd

    from ssvi_cli.data.ood import parse_ood
    from ssvi_cli.evaluation.ood_sets import load_ood

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3]>")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DatasetUnavailable) as caught:
        load_ood(parse_ood(f"mnist={tmp_path}"), get_spec("digits"), None, True, 0, 10)
    assert str(caught.value).startswith("downloading mnist into") and "converted" not in str(caught.value)


def test_a_failed_download_leaves_no_empty_folders_behind(tmp_path, monkeypatch):
    """A mistyped --data-dir with --download offline left an empty TYPO/MNIST/raw, which later read
    as a run directory without checkpoints."""
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(url, filename, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "_urlretrieve", offline)
    with pytest.raises(DatasetUnavailable, match=r"^downloading mnist into .*typo/deeper/MNIST/raw failed"):
        build_dataset("mnist", data_dir=tmp_path / "typo" / "deeper", download=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept" / "MNIST" / "raw").mkdir(parents=True)  # folders that were there stay
    with pytest.raises(DatasetUnavailable):
        build_dataset("mnist", data_dir=tmp_path / "kept", download=True)
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["kept", "kept/MNIST",
                                                                                          "kept/MNIST/raw"]


def test_missing_mnist_files_say_gunzip_and_where_data_dir_points(tmp_path):
    """Archives fetched by hand and not unpacked, and --data-dir given as the dataset's own folder."""
    import gzip

    raw = write_mnist(tmp_path, "MNIST")
    for f in list(raw.iterdir()):
        (raw / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    with pytest.raises(DatasetUnavailable, match=r"\(missing train-images-idx3-ubyte, .*t10k-labels-idx1-ubyte; "
                                                 r"their \.gz archives are there: unpack with gunzip; torchvision: "):
        build_dataset("mnist", data_dir=tmp_path)
    for f in list(raw.iterdir()):  # unpacked: a --data-dir of the dataset's own folder names the one above
        (raw / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    for given in (tmp_path / "MNIST", tmp_path / "MNIST" / "raw"):
        with pytest.raises(DatasetUnavailable, match=rf"; give the folder that holds MNIST/, {tmp_path} "
                                                     r"here; torchvision: "):
            build_dataset("mnist", data_dir=given)
    (tmp_path / "data" / "data").mkdir(parents=True)  # two folders of one name, holding no dataset: no hint
    for name in ("mnist", "cifar10", "svhn"):
        with pytest.raises(DatasetUnavailable) as caught:
            build_dataset(name, data_dir=tmp_path / "data" / "data")
        assert "--data-dir is the folder" not in str(caught.value)


def test_a_cifar_archive_fetched_by_hand_is_named_and_download_unpacks_it_offline(tmp_path, monkeypatch):
    """cifar-10-python.tar.gz in --data-dir, not unpacked: the error named the missing batches only."""
    import hashlib
    import shutil
    import tarfile

    import torchvision.datasets as tvd

    folder = write_cifar10(tmp_path / "made")
    accept_fixture_checksums(monkeypatch, tmp_path / "made")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    shutil.rmtree(tmp_path / "made")
    with pytest.raises(DatasetUnavailable, match=rf"\(missing data_batch_1, .*; its archive cifar-10-python.tar.gz is in "
                                                 rf"{tmp_path / 'data'}: --download unpacks it, without the network "
                                                 r"when it is the original; torchvision: "):
        build_dataset("cifar10", data_dir=tmp_path / "data")
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())  # as the original's
    splits = build_dataset("cifar10", data_dir=tmp_path / "data", download=True)  # no network here: unpacked
    assert len(splits.test) == 20 and (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").is_file()


@pytest.mark.parametrize("name", ["noise", "sklearn-photos", "heldout"])
def test_a_dataset_cannot_take_an_ood_sets_name(name):
    """A dataset registered as ``noise`` was listed among the sets ``NAME=DIR`` reads, while ``--ood
    noise`` went on reading the built-in set: the name is refused when the dataset is registered."""
    from ssvi_cli.data.sources import DatasetSource

    with pytest.raises(ValueError, match=f"dataset '{name}' cannot be registered: '{name}' names "):
        DATASETS.add(name, DatasetSource(spec=get_spec("digits"), load=lambda *args: None))
    assert name not in DATASETS


def test_an_ood_set_reserves_its_name_once_it_is_registered(monkeypatch):
    """The reservation came before the registration's own check: a refused one (a dataset of that
    name already there), or a decorator never applied, kept the name from every dataset after it."""
    from ssvi_cli.data.sources import DatasetSource

    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))
    monkeypatch.setattr(DATASETS, "_reserved", dict(DATASETS._reserved))
    monkeypatch.setattr(OOD_SETS, "_items", dict(OOD_SETS._items))
    source = DatasetSource(spec=get_spec("digits"), load=lambda *args: None)
    OOD_SETS.register("unused")  # never applied
    DATASETS.add("unused", source)
    DATASETS._items["mine"] = source
    with pytest.raises(ValueError, match="OOD set 'mine' registered twice"):
        OOD_SETS.add("mine", lambda *args: None)
    del DATASETS._items["mine"]
    DATASETS.add("mine", source)
    OOD_SETS.add("odd", lambda *args: None)
    with pytest.raises(ValueError, match="dataset 'odd' cannot be registered: 'odd' names an OOD set"):
        DATASETS.add("odd", source)
