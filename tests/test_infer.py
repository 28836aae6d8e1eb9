"""ssvi infer: inputs (images, folders, arrays), agreement with predict_batch, outputs, errors,
sparse linear kernels, and speed against the dense file."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssvi_cli import config as C
from ssvi_cli.cli import run
from ssvi_cli.data import get_spec, preprocess
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.modelfile import ModelCard, read_model_file, write_model_file
from ssvi_cli.evaluation.arrays import InputError, array_to_images
from ssvi_cli.evaluation.infer import expand_inputs, run_inference
from ssvi_cli.core.modes import using_kernel
from ssvi_cli.core.layers import SparseGaussian, SparseLinear
from ssvi_cli.prediction import predict_batch


def write_model(path: Path, preset: str = "digits_mlp", class_names=None, **over) -> Path:
    cfg = C.apply_overrides(C.load_preset(preset), {"sparse.sparsity": 0.95, **over})
    spec = get_spec(cfg.data.name)
    if class_names is not None:
        spec = dataclasses.replace(spec, class_names=tuple(class_names))
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    for _, layer in model.named_modules():
        if isinstance(layer, SparseGaussian) and layer.bayesian:
            layer.rho.data += 3.0  # wide posteriors, so Monte Carlo draws differ visibly
    write_model_file(model, path, ModelCard.from_config(cfg, spec))
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "model.safetensors")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    gen = np.random.default_rng(0)
    return gen.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)


def infer_json(capsys, *argv: str) -> dict:
    code = run(["infer", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_json_is_one_document_laid_out_as_every_json_of_ssvi_with_the_records_the_output_file_holds(
        model_file, digits, tmp_path, capsys):
    """--json's records are written out batch by batch (they were all held as dicts to the end), then
    printed under the header: the same document, indented as every --json of ssvi, skipped inputs
    included; with no record, an empty list."""
    np.save(tmp_path / "x.npy", digits)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code = run(["infer", str(model_file), str(tmp_path / "x.npy"), str(tmp_path / "bad.png"), "--skip-unreadable",
                "--batch-size", "5", "--json", "--output", str(tmp_path / "p.jsonl")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert captured.out == json.dumps(doc, indent=2) + "\n"
    assert list(doc) == ["model", "mode", "samples", "seed", "inputs", "seconds", "skipped", "notes", "predictions"]
    assert doc["inputs"] == 12 and [s["input"] for s in doc["skipped"]] == [str(tmp_path / "bad.png")]
    assert doc["seconds"] == round(doc["seconds"], 3) > 0  # in milliseconds, as evaluate's
    assert len(doc["notes"]) == 1 and doc["notes"][0].startswith("skipped 1 of 2 input files that cannot be read")
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert doc["predictions"] == [json.loads(line) for line in lines] and len(lines) == 12
    from ssvi_cli.cli.infer import _JsonRecords

    spooled = _JsonRecords()
    spooled.print({"inputs": 0})  # nothing added: as print_json prints it
    assert capsys.readouterr().out == json.dumps({"inputs": 0, "predictions": []}, indent=2) + "\n"


def test_infer_matches_predict_batch_in_both_modes(model_file, digits, tmp_path, capsys):
    np.save(tmp_path / "x.npy", digits)
    loaded = read_model_file(model_file)
    x = preprocess(torch.from_numpy(digits)[:, None], loaded.spec)
    for mode in ("mc", "mean"):
        samples = ["--samples", "7"] if mode == "mc" else []  # the mean network takes no samples
        out = infer_json(capsys, str(model_file), str(tmp_path / "x.npy"), "--mode", mode, *samples,
                         "--seed", "3", "--top-k", "4")
        torch.manual_seed(3)
        probs, sample_probs = predict_batch(loaded.model, x, 7, mode)
        preds = out["predictions"]
        assert len(preds) == 12 and preds[0]["input"].endswith("x.npy[0]")
        got = torch.tensor([p["probability"] for p in preds])
        torch.testing.assert_close(got, probs.max(1).values, atol=1e-6, rtol=0)
        assert [p["class_index"] for p in preds] == probs.argmax(1).tolist()
        for p in preds:
            tops = [t["probability"] for t in p["top_k"]]
            assert len(tops) == 4 and tops == sorted(tops, reverse=True)
            assert p["class"] == loaded.spec.class_names[p["class_index"]]
            assert p["entropy"] >= 0
        if mode == "mc":
            assert all(p["mutual_information"] >= 0 for p in preds)
            assert max(p["mutual_information"] for p in preds) > 0
            again = infer_json(capsys, str(model_file), str(tmp_path / "x.npy"), "--samples", "7", "--seed", "4")
            assert again["predictions"][0]["probability"] != preds[0]["probability"]
        else:
            assert all(p["mutual_information"] is None for p in preds)


def test_images_folders_and_array_layouts_give_the_same_answer(model_file, digits, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "b").mkdir(parents=True)
    Image.fromarray(digits[0]).save(folder / "b" / "z.png")
    Image.fromarray(np.stack([digits[0]] * 3, -1)).save(folder / "a.png")  # RGB -> gray by luminance
    (folder / "notes.txt").write_text("ignored in folders")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: skipped, not an error
    (folder / ".cache").mkdir()
    Image.fromarray(digits[1]).save(folder / ".cache" / "thumb.png")  # inside a hidden folder: skipped
    np.save(tmp_path / "hw.npy", digits[0])
    np.save(tmp_path / "chw.npy", digits[0][None])
    np.save(tmp_path / "nchw.npy", digits[:1][:, None].astype(np.float32) / 255.0)
    np.save(tmp_path / "hwc.npy", np.stack([digits[0]] * 3, -1))
    out = infer_json(capsys, str(model_file), str(folder), str(tmp_path / "hw.npy"), str(tmp_path / "chw.npy"),
                     str(tmp_path / "nchw.npy"), str(tmp_path / "hwc.npy"), "--mode", "mean")
    names = [p["input"] for p in out["predictions"]]
    assert names[:2] == [str(folder / "a.png"), str(folder / "b" / "z.png")]  # sorted, recursive
    assert len(names) == 6 and not any("/." in name for name in names)
    probs = [p["probability"] for p in out["predictions"]]
    assert np.allclose(probs, probs[0], atol=1e-5), probs


def test_an_array_file_is_mapped_and_converted_a_slice_at_a_time(model_file, digits, tmp_path, capsys, monkeypatch):
    """A .npy file was loaded whole and converted whole: infer on a 512 MB array held 1.2 GB. It is
    mapped now, and its pixels are made a chunk at a time, as predicted: the same answers."""
    import ssvi_cli.evaluation.arrays as arrays
    import ssvi_cli.evaluation.infer as infer

    from ssvi_cli.data.images import read_array

    stack = np.stack([digits[i % len(digits)] for i in range(7)]).astype(np.float32) / 255.0  # (7, H, W)
    np.save(tmp_path / "x.npy", np.transpose(stack[:, None], (0, 2, 3, 1)))  # (N, H, W, C): a strided view
    assert isinstance(read_array(tmp_path / "x.npy"), np.memmap)
    whole = [p["probability"] for p in infer_json(capsys, str(model_file), str(tmp_path / "x.npy"))["predictions"]]
    sizes, convert = [], arrays.ArrayImages.__getitem__
    monkeypatch.setattr(arrays.ArrayImages, "__getitem__", lambda self, i: sizes.append(len(self.arr[i])) or convert(self, i))
    monkeypatch.setattr(infer, "_CHUNK", 3)
    chunked = [p["probability"] for p in infer_json(capsys, str(model_file), str(tmp_path / "x.npy"))["predictions"]]
    assert sizes == [3, 3, 1] and chunked == whole and len(whole) == 7


def test_a_mapped_array_cut_short_while_it_is_read_is_an_error_not_a_crash(tmp_path):
    """A mapped .npy saved again in place while infer read it killed the process (SIGBUS, no word, the
    --output temporary file left behind; the diff review): the next chunk is refused instead."""
    from ssvi_cli.evaluation.arrays import load_array

    np.save(tmp_path / "x.npy", np.zeros((2000, 64), np.float32))
    images = load_array(tmp_path / "x.npy", 1, 16.0, input_shape=(1, 8, 8))
    assert images[:3].shape == (3, 1, 8, 8)
    np.save(tmp_path / "x.npy", np.zeros((10, 64), np.float32))
    with pytest.raises(InputError, match=r"x.npy: the file was cut short while it was read \(saved again\?\)"):
        images[1500:1510]


def test_an_interrupted_infer_says_how_far_it_got_and_what_became_of_the_output(model_file, digits, tmp_path,
                                                                                capsys, monkeypatch):
    """Ctrl-C said "interrupted" alone: thousands of predictions were thrown away, and --output's file
    left as it was, unsaid (the scale review)."""
    import ssvi_cli.evaluation.infer as infer

    np.save(tmp_path / "x.npy", np.stack([digits[0]] * 5))
    real = infer.predict_inputs

    def stopped(model, spec, files, sink, **options):  # the first batch predicted, then Ctrl-C
        real(model, spec, files, lambda batch: sink(batch[:3]) or (_ for _ in ()).throw(KeyboardInterrupt()), **options)

    monkeypatch.setattr(infer, "predict_inputs", stopped)
    out = tmp_path / "preds.csv"
    assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--output", str(out)]) == 130
    assert capsys.readouterr().err.strip().endswith(
        f"interrupted after 3 predictions; {out} was not written (it is written whole, once every input is predicted)")
    out.write_text("kept\n")
    assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--output", str(out)]) == 130
    assert f"; {out} is left as it was" in capsys.readouterr().err and out.read_text() == "kept\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_colour_model_reads_a_4_h_w_array_as_rgba_and_says_a_gray_stack_loses_an_image(caplog):
    import logging

    rgba = np.zeros((4, 8, 8), np.uint8)
    rgba[3] = 255  # opaque: the transparency warning is another's
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.evaluation.arrays"):
        assert array_to_images(rgba, "a.npy", channels=3).shape == (1, 4, 8, 8)
        array_to_images(np.zeros((3, 8, 8), np.uint8), "b.npy", channels=3)  # RGB: nothing lost, no word
    assert [r.getMessage() for r in caplog.records] == [
        "a.npy: an array of shape (4, 8, 8) is read as one RGBA image (C, H, W), its alpha dropped; "
        "four gray images read as (4, 1, H, W)"]


def test_array_shape_rules():
    assert array_to_images(np.zeros((5, 6), np.uint8), "a").shape == (1, 1, 5, 6)
    assert array_to_images(np.zeros((3, 5, 6), np.uint8), "a").shape == (1, 3, 5, 6)
    assert array_to_images(np.zeros((7, 5, 6), np.uint8), "a").shape == (7, 1, 5, 6)
    # For a gray model a leading 3 or 4 is a stack of gray images, not one colour image.
    assert array_to_images(np.zeros((4, 8, 8), np.uint8), "a", channels=1).shape == (4, 1, 8, 8)
    assert array_to_images(np.zeros((1, 8, 8), np.uint8), "a", channels=1).shape == (1, 1, 8, 8)
    assert array_to_images(np.zeros((3, 8, 8), np.uint8), "a", channels=3).shape == (1, 3, 8, 8)
    assert array_to_images(np.zeros((5, 6, 3), np.uint8), "a").shape == (1, 3, 5, 6)
    assert array_to_images(np.zeros((2, 5, 6, 4), np.uint8), "a").shape == (2, 4, 5, 6)
    assert array_to_images(np.full((2, 2), 200, np.int64), "a").dtype == torch.uint8
    # (H, W, 1), np.asarray(img)[..., None]: one gray picture, not H images one pixel wide
    picture = np.arange(30, dtype=np.uint8).reshape(5, 6, 1)
    assert torch.equal(array_to_images(picture, "a", channels=1), torch.from_numpy(picture).permute(2, 0, 1)[None])
    assert array_to_images(np.zeros((7, 5, 6, 1), np.uint8), "a").shape == (7, 1, 5, 6)
    for bad in (np.zeros((2, 2, 5, 6)), np.full((4, 4), 300), np.zeros((4, 4), bool), np.full((4, 4), np.nan)):
        with pytest.raises(InputError, match="^a: "):
            array_to_images(bad, "a")


def test_outputs_jsonl_and_csv(model_file, digits, tmp_path, capsys):
    np.save(tmp_path / "x.npy", digits[:5])
    for suffix in ("jsonl", "csv"):
        target = tmp_path / f"preds.{suffix}"
        assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--output", str(target)]) == 0
        text = target.read_text()
        rows = ([json.loads(l) for l in text.splitlines()] if suffix == "jsonl"
                else list(csv.DictReader(text.splitlines())))
        assert len(rows) == 5 and rows[4]["input"].endswith("x.npy[4]")
        top = {"top_k"} if suffix == "jsonl" else {"top1_class", "top1_probability", "top3_class", "top3_probability"}
        assert set(rows[0]) >= {"class", "probability", "entropy", "mutual_information", *top}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    shown = capsys.readouterr().out
    assert "ssvi infer" in shown and "x.npy[4]" in shown
    assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.txt")]) == 2


@pytest.mark.parametrize("case", ["text_as_png", "two_channels", "float_range", "missing", "empty_folder", "pickle",
                                  "npz", "bomb", "text_as_npy", "long_header"])
def test_bad_inputs_give_one_line_errors_naming_the_file(model_file, tmp_path, capsys, monkeypatch, case):
    target = tmp_path / {"text_as_png": "bad.png", "two_channels": "two.npy", "float_range": "f.npy",
                         "missing": "nope.png", "empty_folder": "empty", "pickle": "obj.npy",
                         "npz": "arrays.npz", "bomb": "huge.png", "text_as_npy": "t.npy", "long_header": "h.npy"}[case]
    if case == "text_as_png":
        target.write_text("not an image")
    elif case == "two_channels":
        np.save(target, np.zeros((4, 2, 8, 8), np.uint8))
    elif case == "float_range":
        np.save(target, np.full((8, 8), 20.0, np.float32))  # above [0, 1] and the digits' raw 0..16
    elif case == "empty_folder":
        target.mkdir()
    elif case == "pickle":
        np.save(target, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "text_as_npy":
        target.write_text("not an array")
    elif case == "long_header":  # numpy refuses to parse it and suggests allow_pickle: not an object array
        import numpy.lib.format as npy_format

        with open(target, "wb") as fh:
            npy_format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (1,) * 5000})
            fh.write(np.zeros(1, np.float32).tobytes())
    elif case == "npz":
        np.savez(target, x=np.zeros((8, 8), np.uint8))
    elif case == "bomb":  # more than twice PIL's pixel limit: PIL refuses it as a decompression bomb
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(target)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    code = run(["infer", str(model_file), str(target)])
    captured = capsys.readouterr()
    assert code == 2
    lines = [l for l in captured.err.splitlines() if l.strip()]
    assert len(lines) == 1 and str(target) in lines[0] and "Traceback" not in captured.err, captured.err
    assert "allow_pickle" not in lines[0]  # numpy's advice to unpickle is not ssvi's
    assert case != "npz" or "save each array as .npy" in lines[0]
    assert case != "text_as_npy" or "lacks numpy's header" in lines[0]
    assert case != "pickle" or "pickled Python objects" in lines[0]
    assert case != "long_header" or "its header is longer than numpy reads safely, past any np.save writes" in lines[0]
    assert case != "float_range" or "its raw 0..16" in lines[0]  # the range this model also reads


def test_infer_never_builds_a_dense_linear_weight(tmp_path, monkeypatch):
    original = SparseGaussian.to_dense
    calls = []

    def guarded(self, values, *args, **kwargs):
        if isinstance(self, SparseLinear):
            calls.append(self.weight_shape)
        return original(self, values, *args, **kwargs)

    monkeypatch.setattr(SparseGaussian, "to_dense", guarded)
    x = [tmp_path / "x.npy"]
    np.save(x[0], np.zeros((3, 28, 28), np.uint8))
    # Density 0.5 is above the training default's sparse-kernel threshold: infer must still go sparse.
    # (uniform allocation: ERK would make some layers fully dense at 0.5; the preset's ERK at 0.95 too)
    for name, preset, over in (("mlp", "digits_mlp", {"sparse.sparsity": 0.5, "sparse.allocation": "uniform"}),
                               ("mlp_erk", "digits_mlp", {}), ("lenet", "mnist_lenet5", {})):
        loaded = read_model_file(write_model(tmp_path / f"{name}.safetensors", preset, **over))
        for mode in ("mc", "mean"):
            run_inference(loaded.model, loaded.spec, x, samples=3, mode=mode)
    assert calls == []
    linear = [m for m in loaded.model.modules() if isinstance(m, SparseLinear)]
    with using_kernel(linear, "dense"):  # the guard does fire on a densified linear weight
        predict_batch(loaded.model, torch.zeros(1, 1, 28, 28), mode="mean")
        assert calls
        calls.clear()
        predict_batch(loaded.model, torch.zeros(64, 1, 28, 28), samples=2, first_layer="sample")
    assert len(calls) == 2 * len([m for m in loaded.model.modules() if isinstance(m, SparseLinear)])


def test_expand_inputs_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([tmp_path / "missing.png"])


def test_a_model_given_as_an_input_and_a_file_infer_does_not_read_are_said_so(model_file, digits, tmp_path, capsys):
    """'ssvi infer x.png RUN' (the arguments swapped) was told the run's folder holds no images, and
    'ssvi infer MODEL data.csv' that the file is no image format Pillow knows."""
    import shutil

    image = tmp_path / "x.png"
    Image.fromarray(digits[0]).save(image)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(model_file, run_dir / "model.safetensors")
    (run_dir / "config.yaml").write_text("model: {name: mlp}\n")
    first = "the model comes first: ssvi infer MODEL INPUTS..."
    for given, said in ((run_dir, f"error: {run_dir} is a run's folder, a model, not inputs; {first}"),
                        (run_dir / "model.safetensors", f"error: {run_dir / 'model.safetensors'} is a model file, not an "
                                                        f"input; {first}")):
        assert run(["infer", str(image), str(given)]) == 2
        assert capsys.readouterr().err.strip() == said
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    assert run(["infer", str(model_file), str(tmp_path / "data.csv")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'data.csv'} is neither an image Pillow reads nor a "
                                               ".npy array, the inputs ssvi infer reads; replace or remove the file")
    scan = tmp_path / "scan.dat"  # an image Pillow reads but infer does not keeps Pillow's reason
    Image.fromarray(np.zeros((8, 8), np.float32)).save(scan, format="TIFF")
    assert run(["infer", str(model_file), str(scan)]) == 2
    assert "has the unsupported mode 'F'; save it as 8-bit gray or RGB" in capsys.readouterr().err
    empty = tmp_path / "empty"  # a folder that is no run still says it holds no images
    empty.mkdir()
    assert run(["infer", str(model_file), str(empty)]) == 2
    assert "folder holds no images" in capsys.readouterr().err


def test_the_embedded_datas_own_arrays_predict_in_their_raw_range(model_file, tmp_path, capsys):
    """``load_digits().images`` holds pixels 0..16; the file's data spec records that range, so the
    array predicts exactly as the same images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:6]  # float64, 0..16
    np.save(tmp_path / "raw.npy", images)
    np.save(tmp_path / "raw_int.npy", images.astype(np.int64))
    np.save(tmp_path / "unit.npy", (images / 16.0).astype(np.float32))
    got = {name: [p["top_k"] for p in infer_json(capsys, str(model_file), str(tmp_path / f"{name}.npy"),
                                                  "--mode", "mean", "--top-k", "10")["predictions"]]
           for name in ("raw", "raw_int", "unit")}
    assert got["raw"] == got["unit"] == got["raw_int"]
    assert read_model_file(model_file).spec.pixel_max == 16.0


def test_flattened_rows_are_one_input_each(model_file, tmp_path, capsys, caplog):
    """``load_digits().data`` is (N, 64): each row is one flattened 8x8 image, not one (N, 64) image
    shrunk to 8x8; a single row (64,) is one image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.save(tmp_path / "flat.npy", digits.data[:5])
    np.save(tmp_path / "images.npy", digits.images[:5])
    np.save(tmp_path / "row.npy", digits.data[3])
    got = {name: infer_json(capsys, str(model_file), str(tmp_path / f"{name}.npy"), "--mode", "mean",
                            "--top-k", "10")["predictions"] for name in ("flat", "images", "row")}
    assert len(got["flat"]) == 5 and [p["top_k"] for p in got["flat"]] == [p["top_k"] for p in got["images"]]
    assert got["row"][0]["top_k"] == got["images"][3]["top_k"]
    shape = (1, 8, 8)
    assert array_to_images(np.zeros((5, 64)), "a", 1, 16.0, shape).shape == (5, 1, 8, 8)
    assert array_to_images(np.zeros((8, 8)), "a", 1, 16.0, shape).shape == (1, 1, 8, 8)  # (H, W) stays an image
    assert array_to_images(np.zeros((5, 64)), "a", 1, 16.0).shape == (1, 1, 5, 64)  # no model shape: an image
    import logging

    with caplog.at_level(logging.WARNING):  # rows one value short were read as one picture, silently
        assert array_to_images(np.zeros((50, 63)), "b.npy", 1, 16.0, shape).shape == (1, 1, 50, 63)
        array_to_images(np.zeros((8, 8)), "c.npy", 1, 16.0, shape)
        array_to_images(np.zeros((28, 28)), "d.npy", 1, 16.0, shape)  # a picture of another size: read quietly
        # 64 x 64: 64 flattened digits, or one 64x64 picture? Read as the rows, and the picture's way said
        assert array_to_images(np.zeros((64, 64)), "e.npy", 1, 16.0, shape).shape == (64, 1, 8, 8)
        assert array_to_images(np.zeros((63, 64)), "f.npy", 1, 16.0, shape).shape == (63, 1, 8, 8)  # quietly
    said = [r.getMessage() for r in caplog.records]
    assert said == ["b.npy: an array of shape (50, 63) is read as one 50x63 gray image, resized to 8x8 (a batch of "
                    "flattened inputs has 64 values per row)",
                    "e.npy: an array of shape (64, 64) is read as 64 flattened inputs of 64 values each; a 64x64 gray "
                    "picture reads as one image saved as (1, 64, 64) or as a PNG"], said
    assert array_to_images(np.zeros((1, 64, 64)), "g.npy", 1, 16.0, shape).shape == (1, 1, 64, 64)
    with pytest.raises(InputError, match=r"^u16\.npy: integer pixels range over \[3, 65000\], not 0\.\.255; pass uint8 "
                                         r"0\.\.255, or floats in \[0, 1\] \(16-bit pixels: x / 65535\)$"):
        array_to_images(np.array([[3, 65000]], dtype=np.uint16), "u16.npy")
    with pytest.raises(InputError, match=r"range over \[-4, 9\], not 0\.\.255; pass uint8 0\.\.255, or floats in \[0, 1\]$"):
        array_to_images(np.array([[-4, 9]], dtype=np.int16), "i16.npy")
    np.save(tmp_path / "short.npy", np.zeros(63))
    assert run(["infer", str(model_file), str(tmp_path / "short.npy")]) == 2
    assert ("array of shape (63,); expected one of (H, W), (C, H, W), (H, W, C), (N, H, W), (N, C, H, W), "
            "(N, H, W, C), (64,), (N, 64)") \
        in capsys.readouterr().err


def test_a_warning_about_an_input_reaches_the_json_notes(model_file, tmp_path, capsys):
    """An array read as one picture was said on stderr alone: a program saw 1 input and no note."""
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "b.npy", np.zeros((2, 62), dtype=np.float32))
    doc = infer_json(capsys, str(model_file), str(tmp_path / "b.npy"))
    assert doc["inputs"] == 1 and any("is read as one 2x62 gray image" in note for note in doc["notes"]), doc["notes"]


def test_mean_mode_refuses_samples_as_evaluate_does(model_file, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((8, 8), np.uint8))
    for command in (["infer", str(model_file), str(tmp_path / "x.npy")], ["evaluate", str(model_file)]):
        assert run([*command, "--mode", "mean", "--samples", "30"]) == 2
        assert "--samples applies to --mode mc" in capsys.readouterr().err


def test_brackets_in_paths_and_class_names_print_as_written(tmp_path, digits, capsys, monkeypatch):
    from ssvi_cli.cli.common import out

    monkeypatch.setattr(out, "width", 200)  # a page wide enough whatever COLUMNS the tests run under
    monkeypatch.chdir(tmp_path)  # short relative paths: the table's input column stays on one line
    names = [f"[red]c{i}[/red]" for i in range(9)] + ["a:b|c"]
    model = write_model(Path("m.safetensors"), class_names=names)
    folder = Path("d[")
    folder.mkdir()
    for name in ("IMG [copy].png", "b].png"):
        Image.fromarray(digits[0]).save(folder / name)
    target = folder / "p.csv"
    assert run(["infer", str(model), str(folder), "-o", str(target), "--top-k", "10"]) == 0
    captured = capsys.readouterr()
    assert "IMG [copy].png" in captured.out and "d[/b].png" in captured.out
    assert any(n in captured.out for n in names[:9])  # a class name as written, not read as a style
    assert f"to {target}" in captured.err
    rows = list(csv.DictReader(target.read_text().splitlines()))
    assert len(rows) == 2 and {rows[0][f"top{i}_class"] for i in range(1, 11)} == set(names)


def test_a_deterministic_model_notes_that_samples_are_not_used(tmp_path, digits, capsys):
    model = write_model(tmp_path / "rigl.safetensors", **{"sparse.method": "rigl"})
    np.save(tmp_path / "x.npy", digits[:2])
    out = infer_json(capsys, str(model), str(tmp_path / "x.npy"), "--samples", "30")
    assert out["mode"] == "mean" and out["samples"] is None
    assert out["notes"] == [f"{model} is deterministic: it runs as the mean network, and --samples is not used"]
    assert run(["infer", str(model), str(tmp_path / "x.npy"), "--samples", "30"]) == 0
    assert "deterministic: it runs as the mean network, and --samples is not used" in capsys.readouterr().err
    assert run(["infer", str(model), str(tmp_path / "x.npy")]) == 0
    assert "--samples" not in capsys.readouterr().err


def test_a_pipe_is_read_as_an_image_or_by_its_array_magic(model_file, digits, tmp_path, capsys):
    np.save(tmp_path / "x.npy", digits[:3])
    Image.fromarray(digits[0]).save(tmp_path / "one.png")
    expected = infer_json(capsys, str(model_file), str(tmp_path / "x.npy"), str(tmp_path / "one.png"),
                          "--mode", "mean")["predictions"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes((tmp_path / "x.npy").read_bytes()), daemon=True)
    writer.start()
    try:
        got = infer_json(capsys, str(model_file), str(fifo), "--mode", "mean")["predictions"]
    finally:
        if writer.is_alive():  # the pipe was never read: open and close its reading end to free the writer
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)
    assert [r["probability"] for r in got] == [r["probability"] for r in expected[:3]]
    assert got[0]["input"] == f"{fifo}[0]"
    # /dev/stdin piped (a PNG) and redirected from a file (an array: a regular file without a suffix).
    command = [sys.executable, "-m", "ssvi_cli", "infer", str(model_file), "/dev/stdin", "--json", "--mode", "mean"]
    proc = subprocess.run(command, input=(tmp_path / "one.png").read_bytes(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    one = json.loads(proc.stdout)["predictions"]
    assert one[0]["input"] == "/dev/stdin" and one[0]["probability"] == expected[3]["probability"]
    with open(tmp_path / "x.npy", "rb") as stdin:
        proc = subprocess.run(command, stdin=stdin, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    three = json.loads(proc.stdout)["predictions"]
    assert [r["probability"] for r in three] == [r["probability"] for r in expected[:3]]
    proc = subprocess.run([*command[:5], "-", *command[6:]], input=(tmp_path / "x.npy").read_bytes(),
                          capture_output=True, timeout=120)  # "-": standard input, here an array
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert [r["input"] for r in json.loads(proc.stdout)["predictions"]] == ["-[0]", "-[1]", "-[2]"]
    proc = subprocess.run(command, input=b"", capture_output=True, timeout=120)
    assert proc.returncode == 2 and "/dev/stdin is empty: nothing was piped" in proc.stderr.decode()
    proc = subprocess.run(command, input=b"not an image", capture_output=True, timeout=120)
    assert proc.returncode == 2 and "BytesIO" not in proc.stderr.decode()
    assert ("standard input (/dev/stdin) cannot be read (not an image format Pillow knows); pipe an image file or a "
            ".npy array into it") in proc.stderr.decode()  # not "replace or remove the file": there is none
    proc = subprocess.run([*command[:5], "-", *command[6:]], input=b"not an image", capture_output=True, timeout=120)
    assert "error: standard input (-) cannot be read (not an image format" in proc.stderr.decode()


def test_a_named_pipe_in_a_folder_is_passed_over_with_a_warning_not_read_for_ever(model_file, digits, tmp_path,
                                                                                   capsys, caplog):
    """A FIFO named pipe.png in an input folder blocked `ssvi infer` on its read for ever."""
    from hang_guard import time_bound

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(digits[0]).save(folder / "one.png")
    os.mkfifo(folder / "pipe.png")
    with time_bound(60):
        code = run(["infer", str(model_file), str(folder), "--json", "--mode", "mean"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [r["input"] for r in json.loads(out)["predictions"]] == [str(folder / "one.png")]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{folder}: 1 file passed over: a named pipe, socket or device, not a regular file"]


@pytest.mark.parametrize("background", [0, 255])
def test_transparent_pixels_are_said_to_be_dropped_once(model_file, digits, tmp_path, capsys, caplog, background):
    """A digit drawn in alpha alone over black (or white) RGB was predicted as a blank image in silence."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :, :3], rgba[:, :, 3] = background, digits[0]
    for name in ("a.png", "b.png"):
        Image.fromarray(rgba, "RGBA").save(tmp_path / name)
    Image.fromarray(np.dstack([digits[1]] * 3 + [np.full((8, 8), 255, np.uint8)]), "RGBA").save(tmp_path / "opaque.png")
    assert run(["infer", str(model_file), str(tmp_path / "opaque.png"), "--mode", "mean"]) == 0
    assert not caplog.records  # all of its alpha 255: nothing is lost
    assert run(["infer", str(model_file), str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--mode", "mean"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"image {tmp_path / 'a.png'} has transparent pixels: alpha is "
                                                 "dropped, not composited")


def test_an_array_with_transparent_pixels_is_said_as_an_image_is(model_file, digits, tmp_path, caplog):
    """FORMAT.md promised the warning for arrays too; an (N, H, W, 4) array lost its alpha in silence."""
    opaque = np.ones((2, 4, 8, 8), dtype=np.float32)  # float alpha 1.0 is opaque
    opaque[:, :3] = digits[:2, None] / 255.0
    np.save(tmp_path / "opaque.npy", opaque)
    assert run(["infer", str(model_file), str(tmp_path / "opaque.npy"), "--mode", "mean"]) == 0
    assert not caplog.records
    rgba = np.zeros((2, 8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = digits[:2]
    np.save(tmp_path / "drawn-in-alpha.npy", rgba)
    assert run(["infer", str(model_file), str(tmp_path / "drawn-in-alpha.npy"), "--mode", "mean"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and " has transparent pixels: alpha is dropped" in said[0] and "drawn-in-alpha.npy" in said[0]


def test_a_file_name_with_a_terminal_escape_is_shown_not_run(model_file, digits, tmp_path, capsys):
    """A file named with an escape sequence (colours, a window title) reached the terminal raw in the table;
    the JSON and the --output file keep the name as it is."""
    name = tmp_path / "a\x1b[31mred.npy"
    np.save(name, digits[:1])
    assert run(["infer", str(model_file), str(name), "--mode", "mean"]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "a\\x1b[31mred.npy" in shown.replace("\n", "")
    assert run(["infer", str(model_file), str(name), "--mode", "mean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["input"] == f"{name}[0]"
    (tmp_path / "b\x1b]0;TITLE\x07.png").write_text("not an image")  # an error naming it shows it too
    assert run(["infer", str(model_file), str(tmp_path / "b\x1b]0;TITLE\x07.png")]) == 2
    said = capsys.readouterr().err
    assert "\x1b" not in said and "\x07" not in said and "b\\x1b]0;TITLE\\x07.png" in said


def test_a_warning_naming_a_file_with_a_terminal_escape_shows_it(model_file, digits, tmp_path):
    """The warning lines (logging) printed a file's name raw, its escape sequence run by the terminal
    and its newline starting a line of its own."""
    rgba = np.zeros((1, 8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = digits[:1]  # transparent pixels: warned, naming the file
    name = tmp_path / "c\x1b]0;TITLE\x07\nerror: forged.npy"
    np.save(name, rgba)
    for debug in ([], ["--debug"]):
        proc = subprocess.run([sys.executable, "-m", "ssvi_cli", "infer", str(model_file), str(name), "--mode", "mean",
                               "--json", *debug], capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        said = proc.stderr.decode()
        assert "has transparent pixels" in said and "c\\x1b]0;TITLE\\x07\\nerror: forged.npy" in said
        assert "\x1b" not in said and "\x07" not in said and "\nerror: forged" not in said


def test_an_output_link_is_written_through_and_guarded_as_its_target(model_file, digits, tmp_path, capsys):
    """infer --output link.csv replaced the link with a file; a link to a run's record would be let
    through by its own name."""
    np.save(tmp_path / "x.npy", digits[:2])
    target = tmp_path / "target.csv"
    target.write_text("old\n")
    (tmp_path / "link.csv").symlink_to(target)
    assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--output", str(tmp_path / "link.csv")]) == 0
    assert (tmp_path / "link.csv").is_symlink() and len(target.read_text().splitlines()) == 3  # header + 2 rows
    run_dir = tmp_path / "run"
    assert run(["train", "--out", str(run_dir), "--epochs", "1", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1"]) == 0
    (tmp_path / "m.jsonl").symlink_to(run_dir / "metrics.jsonl")
    kept = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--output", str(tmp_path / "m.jsonl")]) == 2
    assert "is a record of the run in" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_bytes() == kept
    for name, command in (("e.json", ["evaluate", str(run_dir), "--samples", "1", "-o"]), ("m.safetensors", ["export", str(run_dir), "-o"])):
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / name).symlink_to(tmp_path / "out" / name)  # dangling until written
        assert run([*command, str(tmp_path / name)]) == 0, name
        assert (tmp_path / name).is_symlink() and (tmp_path / "out" / name).stat().st_size > 0
    photo = tmp_path / "photo.png"  # a link to a file of another kind: never written over by a slip
    photo.write_bytes(b"\x89PNG not really")
    (tmp_path / "r.json").symlink_to(photo)
    assert run(["evaluate", str(run_dir), "--samples", "1", "-o", str(tmp_path / "r.json")]) == 2
    assert f"is a link to {photo}, a file of another kind" in capsys.readouterr().err
    assert photo.read_bytes() == b"\x89PNG not really"
    (tmp_path / "plots").mkdir()  # only a checked output file is written through: a plot replaces a link
    (tmp_path / "plots" / "reliability.png").symlink_to(run_dir / "model.safetensors")
    model_bytes = (run_dir / "model.safetensors").read_bytes()
    assert run(["evaluate", str(run_dir), "--samples", "1", "--plots", str(tmp_path / "plots")]) == 0
    assert (run_dir / "model.safetensors").read_bytes() == model_bytes
    assert not (tmp_path / "plots" / "reliability.png").is_symlink()


def test_the_progress_bar_knows_its_total_for_image_files(model_file, digits, tmp_path, capsys, monkeypatch):
    """A folder of images showed a bar with no total (an array's images are counted only once it is
    read; an image file is one input)."""
    import contextlib

    from ssvi_cli.cli import infer as infer_cmd

    class Bar:
        def __init__(self):
            self.totals, self.done = [], 0

        def add_task(self, name, total, info):
            self.totals.append(total)

        def update(self, task, advance):
            self.done += advance

    for i in range(3):
        Image.fromarray(digits[i]).save(tmp_path / f"{i}.png")
    np.save(tmp_path / "two.npy", digits[:2])
    for argv, total in (([str(tmp_path / f"{i}.png") for i in range(3)], 3), ([str(tmp_path)], None)):
        bar = Bar()
        monkeypatch.setattr(infer_cmd, "progress_bar", lambda enabled: contextlib.nullcontext(bar))
        assert run(["infer", str(model_file), *argv]) == 0, capsys.readouterr().err
        assert bar.totals == [total] and bar.done == (total or 5)
    # inputs skipped as unreadable count as done: the bar ended short of its total
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "worse.png").write_text("not an image either")
    files = [str(tmp_path / f"{i}.png") for i in (0, 1)] + [str(tmp_path / "bad.png"), str(tmp_path / "worse.png")]
    for argv in (files, files[::-1]):
        bar = Bar()
        monkeypatch.setattr(infer_cmd, "progress_bar", lambda enabled: contextlib.nullcontext(bar))
        assert run(["infer", str(model_file), *argv, "--skip-unreadable", "--batch-size", "1"]) == 0
        assert bar.totals == [4] and bar.done == 4


def test_on_batch_counts_what_this_call_predicted_or_skipped(model_file, digits, tmp_path):
    """A caller's list of inputs skipped before (one call per folder, say) is not counted again."""
    from ssvi_cli.modelfile import read_model_file

    loaded = read_model_file(model_file)
    files = []
    for i in range(5):
        Image.fromarray(digits[i]).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_text("not an image")
    told: list[int] = []
    skipped = [("earlier.png", InputError("earlier.png: unreadable"))]
    records = run_inference(loaded.model, loaded.spec, [*files, tmp_path / "bad.png"], batch_size=2,
                            skipped=skipped, on_batch=told.append)
    assert len(records) == 5 and len(skipped) == 2 and sum(told) == 6


def test_skip_unreadable_predicts_the_others_and_names_what_it_skipped(model_file, digits, tmp_path, capsys):
    for i in range(3):
        Image.fromarray(digits[i]).save(tmp_path / f"a{i}.png")
    (tmp_path / "bad0.png").write_text("not an image")
    np.save(tmp_path / "bad1.npy", np.full((1100, 8, 8), 20.0, np.float32))  # out of range in each of its chunks
    np.save(tmp_path / "good.npy", digits[3:5])
    out = tmp_path / "preds.jsonl"
    assert run(["infer", str(model_file), str(tmp_path), "--skip-unreadable", "--json", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [r["input"] for r in result["predictions"]] == [
        str(tmp_path / f"a{i}.png") for i in range(3)] + [f"{tmp_path / 'good.npy'}[{i}]" for i in range(2)]
    assert [s["input"] for s in result["skipped"]] == [str(tmp_path / "bad0.png"), str(tmp_path / "bad1.npy")]
    assert "not an image format Pillow knows" in result["skipped"][0]["error"]
    assert result["skipped"][1]["error"].startswith(f"{tmp_path / 'bad1.npy'}: float images range over [20, 20]")
    assert len(out.read_text().splitlines()) == 5
    assert (f"note: skipped 2 of 6 input files that cannot be read: {tmp_path / 'bad0.png'}, {tmp_path / 'bad1.npy'} "
            f"(the first: image {tmp_path / 'bad0.png'} cannot be read") in " ".join(captured.err.split())
    # the same predictions as without the unreadable files
    (tmp_path / "bad0.png").unlink()
    (tmp_path / "bad1.npy").unlink()
    plain = infer_json(capsys, str(model_file), str(tmp_path))
    assert plain["predictions"] == result["predictions"] and "skipped" not in plain
    # an array out of range in its last chunk only: skipped whole, none of its rows predicted
    mixed = np.concatenate([np.full((1024, 8, 8), 0.5, np.float32), np.full((76, 8, 8), 20.0, np.float32)])
    np.save(tmp_path / "mixed.npy", mixed)
    result = infer_json(capsys, str(model_file), str(tmp_path), "--skip-unreadable")
    assert result["predictions"] == plain["predictions"]
    assert [s["input"] for s in result["skipped"]] == [str(tmp_path / "mixed.npy")]
    # the digits' raw 0..16 with rows of 300 further on: the whole array's range is named, as the raw rule read it
    raw = np.concatenate([np.full((1024, 8, 8), 16.0, np.float32), np.full((76, 8, 8), 300.0, np.float32)])
    np.save(tmp_path / "mixed.npy", raw)
    result = infer_json(capsys, str(model_file), str(tmp_path), "--skip-unreadable")
    assert "float images range over [16, 300], not [0, 1]" in result["skipped"][0]["error"], result["skipped"]
    # nothing that reads: an error, not an empty prediction; the flag is named only where it would help
    (tmp_path / "bad0.png").write_text("not an image")
    assert run(["infer", str(model_file), str(tmp_path / "bad0.png"), "--skip-unreadable"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no input could be read: image {tmp_path / 'bad0.png'} cannot be read")
    assert run(["infer", str(model_file), str(tmp_path / "bad0.png"), str(tmp_path / "mixed.npy")]) == 2
    assert "--skip-unreadable" not in capsys.readouterr().err


def test_every_input_that_cannot_be_read_is_named_at_once(model_file, digits, tmp_path, capsys, monkeypatch):
    """infer stopped at the first file it could not read: a folder with several took a run per file."""
    from ssvi_cli.evaluation import infer as infer_mod

    for name in ("a0", "a1", "z"):  # two read before the first bad file, one after
        Image.fromarray(digits[0]).save(tmp_path / f"{name}.png")
    (tmp_path / "bad0.png").write_text("not an image")
    np.save(tmp_path / "bad1.npy", np.full((1100, 8, 8), 20.0, np.float32))  # out of range in each of its chunks
    (tmp_path / "bad2.png").write_text("not an image either")
    predicted = []
    real = infer_mod.predict_records
    monkeypatch.setattr(infer_mod, "predict_records", lambda model, x, *a, **k: predicted.append(len(x)) or real(model, x, *a, **k))
    assert run(["infer", str(model_file), str(tmp_path), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: 3 of 6 input files cannot be read: image "
                                                   f"{tmp_path / 'bad0.png'} cannot be read"), err
    assert err.rstrip().endswith(f"also {tmp_path / 'bad1.npy'}, {tmp_path / 'bad2.png'}; replace or remove them "
                                 "(or --skip-unreadable predicts the others)"), err
    assert predicted == [1, 1], predicted  # a0 and a1; none after the first bad file
    # a file named twice (in its folder and by name) is one file, named once
    assert run(["infer", str(model_file), str(tmp_path), str(tmp_path / "bad2.png"), str(tmp_path / "bad1.npy")]) == 2
    assert capsys.readouterr().err == err
    (tmp_path / "bad1.npy").unlink()
    (tmp_path / "bad2.png").unlink()
    assert run(["infer", str(model_file), str(tmp_path)]) == 2  # one alone keeps its own message
    assert capsys.readouterr().err.startswith(f"error: image {tmp_path / 'bad0.png'} cannot be read (not an image")
    from ssvi_cli.data.images import unreadable

    said = str(unreadable([("-", InputError("standard input (-) cannot be read (x); pipe an image file or a .npy "
                                            "array into it")), ("-", InputError("again")), ("b.png", InputError("b"))], 2,
                          "input files", InputError))
    assert said == ("2 of 2 input files cannot be read: standard input (-) cannot be read (x); also b.png; replace "
                    "or remove them")
    said = str(unreadable([("b.png", InputError("b")), ("-", InputError("s"))], 2, "input files", InputError))
    assert said.endswith("also standard input; replace or remove them")


def test_a_warning_reads_as_the_commands_notes_do_and_debug_names_its_source(model_file, tmp_path):
    # "WARNING ssvi_cli.evaluation.arrays: ..." showed a module path where every other line says "note:"
    np.save(tmp_path / "square.npy", np.zeros((64, 64), np.float32))
    command = [sys.executable, "-m", "ssvi_cli", "infer", str(model_file), str(tmp_path / "square.npy"), "--json"]
    for extra, start in (([], "warning: "), (["--debug"], "WARNING ssvi_cli.evaluation.arrays: ")):
        proc = subprocess.run(command + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next(l for l in proc.stderr.splitlines() if "flattened inputs" in l)
        assert line.startswith(start + f"{tmp_path / 'square.npy'}: an array of shape (64, 64) is read as 64 flattened")


@pytest.mark.parametrize("via_stream", [False, True])
def test_an_array_whose_header_claims_more_than_the_file_holds_is_refused_before_it_is_allocated(tmp_path, via_stream):
    """A 384-byte .npy whose header describes 238 GiB made numpy try to allocate it: MemoryError, exit 1
    (and on a machine that could, gigabytes for nothing). The header is checked against the file first."""
    import io

    from ssvi_cli.data import DataError
    from ssvi_cli.data.images import read_array

    path = tmp_path / "lying.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (100_000, 100_000, 100)})
        fh.write(b"\0" * 10)
    stream = io.BytesIO(path.read_bytes()) if via_stream else None
    with pytest.raises(DataError, match="its header describes 1,000,000,000,000 bytes of data, the file holds 10: cut"):
        read_array(path, stream=stream)
    np.save(path, np.arange(6, dtype=np.float32).reshape(2, 3))  # a whole one reads as before
    stream = io.BytesIO(path.read_bytes()) if via_stream else None
    assert read_array(path, stream=stream).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_predictions_are_written_batch_by_batch_and_an_error_midway_leaves_the_output_as_it_was(
        model_file, digits, tmp_path, capsys, monkeypatch):
    """A folder of a million images held every prediction in memory until the end (about 1.5 KB
    each): they go to --output as each batch is predicted, into a temporary file that replaces the
    output only once every input is predicted."""
    import ssvi_cli.evaluation.infer as infer_module

    np.save(tmp_path / "x.npy", digits[:10])
    written = []
    real = infer_module.PredictionWriter.write
    monkeypatch.setattr(infer_module.PredictionWriter, "write", lambda self, records: written.append(len(records)) or
                        real(self, records))
    out = tmp_path / "preds.csv"
    assert run(["infer", str(model_file), str(tmp_path / "x.npy"), "--batch-size", "4", "--output", str(out)]) == 0
    assert written == [4, 4, 2] and len(out.read_text().splitlines()) == 11
    said = capsys.readouterr()
    assert "wrote 10 predictions to" in said.err and said.out.count("x.npy[") == 10  # the table, from the same batches
    out.write_text("kept\n")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for extra in ([], ["--skip-unreadable"]):  # the batches of x.npy written first, then the error
        given = [str(tmp_path / "x.npy")] if not extra else []
        assert run(["infer", str(model_file), *given, str(tmp_path / "bad.png"), "--batch-size", "4",
                    "--output", str(out), *extra]) == 2
        assert out.read_text() == "kept\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "preds.csv", "x.npy"]
    assert "no input could be read" in capsys.readouterr().err


def test_preprocess_says_its_warnings_at_each_call(model_file, digits, caplog):
    """ssvi.preprocess opened no warnings scope: its transparent-pixels warning came once a process,
    and a notebook's second call, or a call with other images, said nothing."""
    import ssvi_cli as ssvi

    model = ssvi.load(model_file)
    rgba = np.zeros((2, 8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = digits[:2]
    for _ in range(2):
        assert ssvi.preprocess(model, rgba).shape == (2, 1, 8, 8)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("has transparent pixels: alpha is dropped" in m for m in said)
