"""Bad input to any command: a one-line message naming the problem and the fix, exit code 2, no
traceback, and no file created or changed."""

import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ssvi_cli.cli import run
from ssvi_cli.modelfile import read_header

RUN = "run"  # the trained run inside the workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with one small trained run and a collection of bad files."""
    ws = tmp_path_factory.mktemp("ws")
    code = run(["train", "--out", str(ws / RUN), "--epochs", "1", "--set", "model.widths=[32]",
                "--set", "data.max_train=200", "--set", "train.eval_samples=1", "--json"])
    assert code == 0
    good = ws / RUN / "model.safetensors"
    data = good.read_bytes()
    shutil.copytree(ws / RUN, ws / "partial")  # a run stopped before its end: checkpoints only
    (ws / "partial" / "summary.json").unlink()
    (ws / "partial" / "model.safetensors").unlink()
    shutil.copytree(ws / "partial", ws / "unstarted")  # a run that failed before its first checkpoint
    shutil.rmtree(ws / "unstarted" / "checkpoints")
    (ws / "empty_dir").mkdir()
    # a sweep's layout, its cell finished and its checkpoints removed
    shutil.copytree(ws / RUN, ws / "runs_of" / "cells" / "a", ignore=shutil.ignore_patterns("checkpoints"))
    torch.save({"weight": torch.zeros(2)}, ws / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {"weight": torch.zeros(2)}}, ws / "other.pt")  # a trainer's own checkpoint
    torch.save({"weight": torch.zeros(2)}, ws / "legacy.pt", _use_new_zipfile_serialization=False)
    (ws / "cut.pt").write_bytes((ws / "plain.pt").read_bytes()[:300])
    shutil.copy(next((ws / RUN / "checkpoints").iterdir()), ws / "ckpt.bin")  # a checkpoint by another name
    state = torch.load(next((ws / RUN / "checkpoints").iterdir()), weights_only=True)
    rho = next(k for k in state["model"] if k.endswith(".rho"))
    state["model"][rho] = torch.full_like(state["model"][rho], float("nan"))  # a diverged run's, or damaged
    torch.save(state, ws / "nanrho.pt")
    (ws / "readonly.json").write_text("{}")
    (ws / "readonly.json").chmod(0o400)  # made read-only to keep it
    np.savez(ws / "arrays.npz", a=np.zeros(2))
    with zipfile.ZipFile(ws / "notes.zip", "w") as archive:
        archive.writestr("notes.txt", "not weights")
    (ws / "cut.safetensors9").write_bytes(data[:9])  # the header's length and its first byte
    (ws / "model.pt").write_bytes(data)  # a model file renamed as a checkpoint
    (ws / "d.jsonl").mkdir()  # a folder whose name looks like an output file
    (ws / "afile").write_text("a file, not a folder\n")
    (ws / "empty.safetensors").write_bytes(b"")
    (ws / "empty.yaml").write_text("# nothing but a comment\n")
    (ws / "broken.yaml").write_text("model: {name: mlp\n")
    (ws / "latin1.yaml").write_bytes("model: {name: m\xfclp}\n".encode("latin-1"))
    (ws / "cut.safetensors").write_bytes(data[: len(data) // 2])
    n = struct.unpack("<Q", data[:8])[0]
    (ws / "corrupt.safetensors").write_bytes(data[:8] + b'{"__metadata__":' + b"#" * (n - 16) + data[8 + n:])
    meta = dict(read_header(good)["meta"])
    raw = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    save_file(load_file(str(good)), str(ws / "newer.safetensors"), metadata={**raw, "version": "3"})
    spec = json.loads(raw["data_spec"])
    for name, change in (("fewnames", {"class_names": spec["class_names"][:1]}), ("zerostd", {"std": [0.0]}),
                         ("twicenamed", {"class_names": ["a"] * 10}), ("negpixels", {"pixel_max": -3}),
                         # a name that reached the terminal as an escape sequence (a window title, colours)
                         ("escapenamed", {"class_names": ["\x1b]0;TITLE\x07", *spec["class_names"][1:]]})):
        save_file(load_file(str(good)), str(ws / f"{name}.safetensors"),
                  metadata={**raw, "data_spec": json.dumps({**spec, **change})})
    save_file(load_file(str(good)), str(ws / "halfsaid.safetensors"), metadata={**raw, "dtype": "float16"})
    layers = json.loads(raw["layers"])
    layers[0]["kind"] = "conv2d"
    save_file(load_file(str(good)), str(ws / "convsaid.safetensors"), metadata={**raw, "layers": json.dumps(layers)})
    save_file({"weight": torch.zeros(2, 2)}, str(ws / "plain.safetensors"), metadata={"format": "pt"})
    (ws / "notimg.png").write_text("this is text\n")
    np.save(ws / "ok.npy", np.zeros((2, 8, 8), np.uint8))
    np.save(ws / "two.npy", np.zeros((3, 2, 8, 8), np.uint8))
    np.save(ws / "five.npy", np.zeros((1, 1, 1, 8, 8), np.uint8))
    np.save(ws / "zero.npy", np.zeros((0, 8, 8), np.uint8))
    np.save(ws / "text.npy", np.array(["a", "b"]))
    nan = np.zeros((3, 8, 8), np.float32)
    nan[1, 4, 4] = np.nan
    np.save(ws / "nan.npy", nan)
    (ws / "mine.yaml").write_text("train: {epochs: 1}\n")
    return ws


# (argv with {ws} for the workspace, the words the one-line message must hold)
CASES = [
    # sizes beyond any run: 1e20 epochs hung the first subspace step (Ctrl-C only asks for a checkpoint),
    # a batch of 1e20 overflowed torch's index type (exit 1), 1e11 Monte Carlo draws ran for ever
    (["train", "--set", "train.epochs=100000000000000000000"], "train.epochs=100000000000000000000 must be in [1, 1,000,000]"),
    (["train", "--set", "train.batch_size=100000000000000000000"], "must be in [1, 16,777,216]"),
    (["train", "--set", "train.eval_samples=1000000"], "train.eval_samples=1000000 must be in [1, 100,000]"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--samples", "100000000000"], "--samples 100000000000 is more Monte Carlo draws"),
    (["evaluate", "{ws}/run", "--samples", "5,100001"], "--samples 100001 is more Monte Carlo draws per input than"),
    (["sweep", "--samples", "100001", "--dry-run", "--out", "{ws}/sbig"], "at most 100,000"),
    # ~ the shell left unexpanded ("~/x" quoted, --out=~/x): a folder named ~ would be made here
    (["train", "--out", "~/x"], "--out ~/x: the shell did not expand ~"),
    (["train", "--out", "~root/x"], "--out ~root/x: the shell did not expand ~root"),
    (["sweep", "--out", "~/s", "--dry-run"], "--out ~/s: the shell did not expand ~"),
    (["evaluate", "{ws}/run", "--output", "~/e.json"], "--output ~/e.json: the shell did not expand ~"),
    (["export", "{ws}/run", "--output", "~/m.safetensors"], "--output ~/m.safetensors: the shell did not expand ~"),
    # an empty argument, a shell variable that was not set (--out "$RUN"), was read as "." (train wrote here)
    (["train", "--out", ""], "error: the argument after --out is empty (a shell variable that is not set?)"),
    (["train", "--out="], "error: --out's value is empty"),
    (["sweep", "--dry-run", "--out", ""], "the argument after --out is empty"),
    (["inspect", ""], "error: an argument is empty"),
    (["evaluate", "{ws}/run", "--output", ""], "the argument after --output is empty"),
    # an output made read-only was replaced in silence (by a rename, which its mode does not stop)
    (["evaluate", "{ws}/run", "--output", "{ws}/readonly.json"], "--output {ws}/readonly.json is read-only; make it "
                                                                 "writable (chmod u+w) to replace it"),
    (["export", "{ws}/run", "--output", "{ws}/readonly.json"], "--output {ws}/readonly.json is read-only"),
    # train: values, names and config keys
    (["train", "--sparsity", "1.5"], "sparse.sparsity=1.5 must be in [0, 1), e.g. --sparsity 0.95"),
    (["train", "--sparsity", "-0.1"], "sparsity=-0.1 must be in [0, 1)"),
    (["train", "--model", "torchvision:vgg11", "--out", "{ws}/vgg"],
     "cannot take the data's 1x8x8 inputs (pick a model that takes images this small, or train on larger ones"),
    (["train", "--sparsity", "0.999999"], "with no active weight; use a lower sparsity"),
    # torchvision's other tasks are not "unknown"; a misspelt classifier's close names come before the 80 names
    (["train", "--model", "torchvision:fasterrcnn_resnet50_fpn"], "torchvision:fasterrcnn_resnet50_fpn is a detection "
                                                                 "model; ssvi trains torchvision's image classifiers"),
    (["train", "--model", "torchvision:raft_small"], "torchvision:raft_small is an optical flow model"),
    (["train", "--model", "torchvision:quantized_resnet18"], "is a quantized (inference only) model; train its float "
                                                            "classifier, torchvision:resnet18"),
    (["train", "--model", "torchvision:resnet81"], "unknown torchvision classification model 'resnet81' (did you mean "
                                                   "resnet18 or resnet152 or resnet101?); valid names are: alexnet, "),
    (["train", "--preset", "nope"], "unknown preset 'nope'; valid names are: "),
    (["train", "--set", "model.name=alexnet"], "unknown model 'alexnet'; valid names are: "),
    (["train", "--set", "data.name=imagenet"], "unknown dataset 'imagenet'; valid names are: "),
    (["train", "--criterion", "nope"], "unknown criterion 'nope'; valid names are: "),
    (["train", "--method", "magic"], "error: --method: sparse.method='magic'; valid values are: ssvi, vi, static, rigl, "
     "dense"),  # the flag the value came from, then its config key
    (["train", "--epochs", "0"], "error: --epochs: train.epochs=0 must be in [1, 1,000,000]"),
    (["train", "--set", "train.epochs=0"], "error: train.epochs=0 must be in [1, 1,000,000]"),
    (["presets", "mnist_lenet5", "--method", "magic"], "error: --method: sparse.method='magic'; valid values are"),
    (["train", "--device", "tpu"], "train.device='tpu'; valid values are: auto, cpu, cuda"),
    (["train", "--device", "cuda"], "no CUDA device is available; use --device cpu"),
    (["train", "--set", "bogus.key=1"], "valid keys"),
    (["train", "--set", "train.epochs"], "--set expects key.sub=value"),
    # a list cut short was read as the text inside: widths [10, 20]
    (["train", "--set", "model.widths=[10,20"], "--set model.widths=[10,20: the value is not valid YAML"),
    (["train", "--lr", "1e38"], "optim.lr=1e+38 must be > 0 and at most 100"),
    (["train", "--lr", "nan"], "optim.lr expects a finite number"),
    (["train", "--preset", "{ws}/empty.yaml"], "is empty; start from a shipped preset"),
    (["train", "--preset", "{ws}/broken.yaml"], "is not valid YAML"),
    (["train", "--preset", "{ws}/missing.yaml"], "preset file {ws}/missing.yaml does not exist"),
    (["train", "--preset", "{ws}/latin1.yaml"], "preset {ws}/latin1.yaml is not UTF-8 text"),
    (["train", "--preset", "{ws}/afile"], "preset file {ws}/afile: a preset file's name ends in .yaml, .yml or .json; "
                                          "rename it"),
    (["train", "--preset", "mine"], "unknown preset 'mine'; to train from the file mine.yaml, give its name with "
                                    "the suffix: --preset mine.yaml"),
    # a file as the data folder was told to --download, which cannot put anything in a file
    (["train", "--set", "data.name=cifar10", "--set", "data.data_dir={ws}/afile"],
     "cifar10: the data folder {ws}/afile is a file, not a folder; give the folder that holds the dataset"),
    (["train", "--set", "data.name=cifar10", "--set", "data.data_dir={ws}/nodata"],
     "cifar10 not found or corrupted at {ws}/nodata/cifar-10-batches-py (missing data_batch_1, data_batch_2, "
     "data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta; torchvision: "),
    # train: run directories
    (["train", "--out", "{ws}/run"], "already holds a finished run; pass --force to overwrite it, or choose another --out"),
    (["train", "--out", "{ws}/partial"], "already holds a run; pass --force to overwrite it or --resume {ws}/partial"),
    (["train", "--out", "{ws}/unstarted"], "holds a run that stopped before its first checkpoint; pass --force to "
                                           "start it again"),
    (["train", "--out", "{ws}/afile"], "exists and is not a directory"),
    (["train", "--resume", "{ws}/empty_dir"], "has no checkpoint"),
    (["train", "--resume", "{ws}/missing"], "run directory {ws}/missing does not exist"),
    (["train", "--resume", "{ws}/run/model.safetensors"], "{ws}/run/model.safetensors is a file, not a run directory; "
                                                           "give the run's folder ({ws}/run)"),
    (["train", "--resume", "{ws}/runs_of"], "{ws}/runs_of is not a run directory but holds runs, such as "
                                            "{ws}/runs_of/cells/a; name one of them"),
    (["train", "--init-from", "{ws}/runs_of"], "is a folder but not a run (no config.yaml); it holds runs, such as "),
    (["train", "--init-from", "{ws}/cut.pt"], "but a damaged or cut-off zip archive (a torch.save file, say)"),
    # weights that are not finite were taken, and the first step failed after --force had removed the old run
    (["train", "--init-from", "{ws}/nanrho.pt"], "--init-from: checkpoint {ws}/nanrho.pt: layer 'first': rho holds "
                                                 "non-finite values"),
    (["inspect", "{ws}/nanrho.pt"], "layer 'first': rho holds non-finite values"),
    (["export", "{ws}/nanrho.pt", "-o", "{ws}/x.safetensors"], "layer 'first': rho holds non-finite values"),
    (["train", "--init-from", "{ws}/plain.pt"], "but a torch.save file without an ssvi checkpoint's record, and "),
    (["train", "--init-from", "{ws}/cut.safetensors9"], "but a cut-off safetensors file"),
    (["train", "--init-from", "{ws}/legacy.pt"], "but a pickle file (torch.save's legacy format: plain weights, say)"),
    (["train", "--init-from", "{ws}/arrays.npz"], "but a NumPy .npz archive (what np.savez writes), and "),
    (["train", "--init-from", "{ws}/notes.zip"], "but a zip archive that neither torch.save nor np.savez wrote"),
    (["train", "--init-from", "{ws}/empty.safetensors"], "but an empty file"),
    (["train", "--init-from", "{ws}/cut.safetensors", "--set", "model.widths=[32]"],
     "but a cut-off safetensors file (its header runs past the end of the file)"),
    (["train", "--init-from", "{ws}/plain.safetensors"], "but a safetensors file without ssvi metadata"),
    (["train", "--init-from", "{ws}/afile"], "but neither a safetensors file nor a torch.save file"),
    (["train", "--init-from", "torchvision:DEFAULT"], "--init-from torchvision:DEFAULT names torchvision's published "
                                                      "weights, which start only a torchvision:NAME model, not 'mlp'"),
    (["train", "--resume", "{ws}/partial", "--device", "cuda"], "no CUDA device is available"),
    (["train", "--resume", "{ws}/run", "--epochs", "3"], "drop --epochs"),
    (["train", "--resume", "{ws}/partial", "--force"], "drop --force"),  # was taken and did nothing
    # export
    (["export", "{ws}/empty_dir", "-o", "{ws}/x.safetensors"], "{ws}/empty_dir has no checkpoint"),
    (["export", "{ws}/missing", "-o", "{ws}/x.safetensors"], "{ws}/missing does not exist"),
    (["export", "{ws}/run", "-o", "{ws}/nodir/x.safetensors"], "its folder {ws}/nodir does not exist"),
    (["export", "{ws}/run", "-o", "{ws}/afile/x.safetensors"], "its folder {ws}/afile is not a directory"),
    (["export", "{ws}/run", "-o", "{ws}/empty_dir"], "--output {ws}/empty_dir is a directory"),
    (["export", "{ws}/run", "-o", "{ws}/out.txt"], "name the model file *.safetensors"),
    (["export", "{ws}/run", "-o", "-"], "--output -: a model file is written to a file, not standard output"),
    (["export", "{ws}/run/model.safetensors", "-o", "{ws}/run/model.safetensors"], "is the file being exported"),
    (["export", "{ws}/run", "-o", "{ws}/run/model.safetensors", "--dtype", "float16"], "is the model file of the run in {ws}/run,"),
    (["export", "{ws}/partial", "-o", "{ws}/run/model.safetensors"], "is the model file of the run in {ws}/run,"),
    (["export", "{ws}/run", "-o", "{ws}/partial/model.safetensors"], "is the model file of the run in {ws}/partial,"),
    (["export", "{ws}/run", "-o", "{ws}/x.safetensors", "--dtype", "int8"], "valid values are: float32"),
    (["export", "{ws}/empty.safetensors", "-o", "{ws}/x.safetensors"], "is truncated or not a model file (0 bytes"),
    (["export", "{ws}/cut.safetensors", "-o", "{ws}/x.safetensors"], "cut.safetensors is truncated"),
    (["export", "{ws}/corrupt.safetensors", "-o", "{ws}/x.safetensors"], "has a corrupted header"),
    (["export", "{ws}/plain.safetensors", "-o", "{ws}/x.safetensors"], "is a safetensors file but not an ssvi model file"),
    (["export", "{ws}/newer.safetensors", "-o", "{ws}/x.safetensors"], "version 3, newer than this ssvi reads"),
    (["evaluate", "{ws}/run/model.safetensors", "--output", "{ws}/run/model.safetensors"], "is the model file being evaluated"),
    (["evaluate", "{ws}/run", "--output", "{ws}/run/model.safetensors"], "is the model file being evaluated"),
    # inspect
    (["inspect", "{ws}/empty_dir"], "has no checkpoint"),
    # a run's checkpoints folder was said to hold no checkpoint (expected .../checkpoints/checkpoints/...)
    (["inspect", "{ws}/run/checkpoints"], "{ws}/run/checkpoints is the checkpoints folder of the run in {ws}/run; name that folder"),
    (["evaluate", "{ws}/run/checkpoints"], "is the checkpoints folder of the run in {ws}/run"),
    (["train", "--preset", "{ws}/run/model.safetensors"],  # was told to rename it .yaml
     "preset file {ws}/run/model.safetensors holds weights, not a config: --init-from {ws}/run/model.safetensors"),
    (["train", "--preset", "{ws}/run"], "--preset {ws}/run is a run's folder; its config is --preset {ws}/run/config.yaml"),
    (["train", "--set", "model.widths=[512,,512]"], "model.widths: '[512,,512]' has an empty item; remove the extra comma"),
    (["evaluate", "{ws}/run", "--ood", "noise,sklearn-photos"],
     "--ood noise,sklearn-photos: give --ood once per set: --ood noise --ood sklearn-photos"),
    (["inspect", "{ws}/missing"], "{ws}/missing does not exist"),
    (["inspect", "{ws}/newer.safetensors"], "upgrade ssvi to read it"),
    (["infer", "{ws}/fewnames.safetensors", "{ws}/ok.npy"], "data description: data spec names 1 classes for a model of 10"),
    (["evaluate", "{ws}/zerostd.safetensors"], "every mean must be finite and every std positive"),
    (["infer", "{ws}/twicenamed.safetensors", "{ws}/ok.npy"], "data spec names class 'a' twice"),
    (["infer", "{ws}/escapenamed.safetensors", "{ws}/ok.npy"],
     "data spec class name '\\x1b]0;TITLE\\x07' holds a control character"),
    (["infer", "{ws}/negpixels.safetensors", "{ws}/ok.npy"], "pixel_max must be positive"),
    (["inspect", "{ws}/halfsaid.safetensors"], "corrupted header (dtype 'float16', but tensor"),
    (["infer", "{ws}/convsaid.safetensors", "{ws}/ok.npy"], "layer 'first' is recorded as 'conv2d', but that layer of architecture 'mlp' is 'linear'"),
    (["inspect", "{ws}/convsaid.safetensors"], "layer 'first' is recorded as 'conv2d'"),
    (["inspect", "{ws}/run", "--plots", "{ws}/afile"], "--plots {ws}/afile exists and is not a directory"),
    # infer
    (["infer", "{ws}/run", "{ws}/notimg.png"], "image {ws}/notimg.png cannot be read"),
    (["infer", "{ws}/run", "{ws}/two.npy"], "{ws}/two.npy: array of shape (3, 2, 8, 8) has no 1, 3 or 4 channel axis"),
    (["infer", "{ws}/run", "{ws}/five.npy"], "expected one of (H, W), (C, H, W), (H, W, C), (N, H, W), "
                                             "(N, C, H, W), (N, H, W, C)"),
    (["infer", "{ws}/run", "{ws}/zero.npy"], "{ws}/zero.npy: array of shape (0, 8, 8) holds no pixels"),
    (["infer", "{ws}/run", "{ws}/text.npy"], "is not pixels"),
    (["infer", "{ws}/run", "{ws}/nan.npy"], "array holds NaN or infinite values (the first at index 1 of its first axis)"),
    # one file under two labels was scored twice, as two OOD sets
    (["evaluate", "{ws}/run", "--ood", "a={ws}/ok.npy", "--ood", "b={ws}/ok.npy"],
     "--ood b={ws}/ok.npy reads the same file as --ood a={ws}/ok.npy; give it once"),
    (["infer", "{ws}/run", "{ws}/missing.png"], "{ws}/missing.png: no such file or folder"),
    (["infer", "{ws}/run", "{ws}/empty_dir"], "folder holds no images"),
    (["infer", "{ws}/empty_dir", "{ws}/ok.npy"], "has no checkpoint"),
    (["infer", "{ws}/cut.safetensors", "{ws}/ok.npy"], "is truncated"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--output", "{ws}/nodir/p.jsonl"], "its folder {ws}/nodir does not exist"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--output", "{ws}/d.jsonl"], "--output {ws}/d.jsonl is a directory"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--output", "{ws}/p.txt"], "must end in .jsonl or .csv"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--top-k", "0"], "--top-k must be at least 1, got 0"),  # named the three
    (["infer", "{ws}/run", "{ws}/ok.npy", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--device", "cuda"], "no CUDA device is available"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--device", "cuda:1"],
     "unknown device 'cuda:1'; valid values are: auto, cpu, cuda (pick the GPU with CUDA_VISIBLE_DEVICES=1"),
    # evaluate
    (["evaluate", "{ws}/empty_dir"], "has no checkpoint"),
    (["evaluate", "{ws}/missing"], "does not exist; pass a model file, a training checkpoint or a run directory"),
    (["evaluate", "{ws}/runs_of"], "holds runs, such as {ws}/runs_of/cells/a"),
    (["inspect", "{ws}/plain.pt"], "plain.pt is not an ssvi checkpoint but a torch.save file of plain weights"),
    (["inspect", "{ws}/other.pt"], "other.pt is not an ssvi checkpoint (a torch.save file of something else)"),
    (["evaluate", "{ws}/model.pt"], "{ws}/model.pt is a safetensors file (an ssvi model file?) named as a training "
     "checkpoint is; ssvi reads a model file by its .safetensors name: rename it model.safetensors"),
    (["export", "{ws}/ckpt.bin", "-o", "{ws}/x.safetensors"], "is a zip archive (what torch.save writes: a training "
     "checkpoint, say), not an ssvi model file; ssvi export writes one from an ssvi training checkpoint named *.pt"),
    (["evaluate", "{ws}/plain.safetensors"], "not an ssvi model file"),
    (["inspect", "{ws}/arrays.npz"], "{ws}/arrays.npz is a NumPy .npz archive (what np.savez writes), not an ssvi "
     "model file"),
    (["inspect", "{ws}/notes.zip"], "{ws}/notes.zip is a zip archive that neither torch.save nor np.savez wrote"),
    (["train", "--model", "torchvision:resnet18", "--init-from", "{ws}/arrays.npz"],
     "--init-from {ws}/arrays.npz is a NumPy .npz archive (what np.savez writes), not a state_dict; "),
    (["evaluate", "{ws}/run", "--output", "{ws}/nodir/r.json"], "its folder {ws}/nodir does not exist"),
    (["evaluate", "{ws}/run", "--output", "{ws}/empty_dir"], "--output {ws}/empty_dir is a directory"),
    (["evaluate", "{ws}/run", "-o", "{ws}/empty_dir"], "--output {ws}/empty_dir is a directory"),  # -o as infer's
    (["evaluate", "{ws}/run", "-o", ""], "the argument after -o is empty"),  # it read "--output . is a directory"
    # a folder's name, which pathlib reads as a file's: a file named new.csv was written
    (["infer", "{ws}/run", "{ws}/ok.npy", "--output", "{ws}/new.csv/"], "--output {ws}/new.csv/ names a folder (it ends in /); give a file name"),
    (["infer", "{ws}/run", "{ws}/ok.npy", "--output", "{ws}/new.csv/."], "--output {ws}/new.csv/. names a folder (it ends in /.)"),
    (["evaluate", "{ws}/run", "-o", "{ws}/report.json/"], "--output {ws}/report.json/ names a folder"),
    (["export", "{ws}/run", "-o", "{ws}/x.safetensors/"], "--output {ws}/x.safetensors/ names a folder"),
    (["evaluate", "{ws}/run", "--dataset", "imagenet"], "unknown dataset 'imagenet'; valid names are: "),
    (["evaluate", "{ws}/run", "--ood", "svhn", "--data-dir", "{ws}/nodata"],
     "svhn not found or corrupted at {ws}/nodata (missing test_32x32.mat; torchvision: "),
    # bench
    (["bench", "--model", "vgg"], "unknown bench model 'vgg'; valid names are: lenet5, mlp, resnet18; or torchvision:NAME"),
    (["bench", "--sparsity", "2"], "every value must lie in (0, 1)"),
    (["bench", "--sparsity", "0.9,0.90"], "0.9 is given twice; give each sparsity once"),  # crashed on a folder
]

# Typer's own usage errors (a boxed message, exit code 2).
USAGE_CASES = [
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["presets", "--bogus"], "No such option: --bogus"),
    (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["infer", "{ws}/run"], "Missing argument 'inputs'"),
]


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


def fill(args: list[str], ws: Path) -> list[str]:
    return [a.replace("{ws}", str(ws)) for a in args]


@pytest.fixture
def no_cuda(monkeypatch):
    # The same answers on a machine with a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 25
    assert {c[0][0] for c in CASES + USAGE_CASES} >= {"train", "presets", "export", "inspect", "infer",
                                                      "evaluate", "bench"}


@pytest.mark.parametrize("args, words", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_gives_one_line_and_leaves_no_files(workspace, args, words, capsys, monkeypatch, no_cuda):
    monkeypatch.chdir(workspace)  # a default output (runs/...) would land in the workspace too
    before = listing(workspace)
    code = run(fill(args, workspace))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    # 'train' prints nothing before its checks; infer/evaluate/inspect only after theirs.
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert fill([words], workspace)[0] in lines[0], captured.err
    assert captured.out == ""
    assert listing(workspace) == before


@pytest.mark.parametrize("args, words", USAGE_CASES, ids=[" ".join(c[0]) for c in USAGE_CASES])
def test_typer_usage_errors_exit_2_without_traceback(workspace, args, words, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    before = listing(workspace)
    code = run(fill(args, workspace))
    captured = capsys.readouterr()
    assert code == 2
    assert words in " ".join(captured.err.split()) and "Traceback" not in captured.out + captured.err
    assert listing(workspace) == before


def test_debug_shows_the_traceback_and_keeps_the_exit_code(workspace, capsys):
    assert run(["inspect", str(workspace / "empty_dir"), "--debug"]) == 2  # a user mistake, as without --debug
    err = capsys.readouterr().err
    assert "Traceback" in err and "has no checkpoint" in err


@pytest.mark.parametrize("args, words", [
    (["train", "--sparsity", "1.5", "--out", "{ws}/new"], "sparsity=1.5 must be in [0, 1)"),
    (["inspect", "{ws}/cut.safetensors"], "cut.safetensors is truncated"),
])
def test_the_real_entry_point_prints_no_traceback(workspace, args, words):
    before = listing(workspace)
    proc = subprocess.run([sys.executable, "-m", "ssvi_cli", *fill(args, workspace)], capture_output=True,
                          text=True, timeout=120, cwd=workspace, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fill([words], workspace)[0] in lines[0], proc.stderr
    assert listing(workspace) == before


class _Shell:
    """Pickles as a call of os.system (never made: ssvi reads .pt files with weights_only=True)."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("command", ["inspect", "evaluate", "infer", "export"])
def test_a_pickled_object_is_refused_in_one_line_without_torchs_warnings(tmp_path: Path, command, capsys):
    """A .pt pickled without torch.save (protocol 4) or holding a whole module: one line saying why,
    not torch's protocol warning and its advice about weights_only defaults (in one real process too)."""
    import pickle
    import warnings

    import numpy as np

    inputs = tmp_path / "x.npy"  # an input infer reads: the model's file is what it refuses
    np.save(inputs, np.zeros((1, 8, 8), np.uint8))
    for name, write, why in (
            ("p4.pt", lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4)),
             "is unreadable or corrupted (not a file torch.save wrote: Unsupported operand 149)"),
            ("module.pt", lambda p: torch.save({"m": torch.nn.Linear(2, 2)}, p),
             "is unreadable (it holds Python objects besides tensors, and ssvi reads .pt files with "
             "weights_only=True, never running pickled code)"),
            # a function of a module torch blocks (torch >= 2.6 words this one "unsupported GLOBAL ...")
            ("system.pt", lambda p: torch.save({"x": _Shell()}, p),
             "is unreadable (it holds Python objects besides tensors, and ssvi reads .pt files with "
             "weights_only=True, never running pickled code)")):
        path = tmp_path / name
        write(path)
        args = [command, *{"infer": [str(path), str(inputs)],
                           "export": [str(path), "--output", str(tmp_path / "o.safetensors")]}.get(command, [str(path)])]
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            assert run(args) == 2
        assert not shown, [str(w.message) for w in shown]
        assert capsys.readouterr().err.strip().splitlines() == [f"error: checkpoint {path} {why}"]
        if name == "p4.pt" and command == "inspect":
            proc = subprocess.run([sys.executable, "-m", "ssvi_cli", *args], capture_output=True, text=True)
            assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: checkpoint {path} {why}"], \
                proc.stderr


def test_a_folder_of_runs_is_searched_past_what_cannot_be_read_and_not_through_a_folder_of_images(tmp_path, monkeypatch):
    """A subfolder that cannot be read (another user's lost+found) raised PermissionError, where a
    folder of runs is named; a large folder is not walked to its end."""
    from ssvi_cli.runs.checkpoint import run_below

    for name in ("a_locked", "b_run", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "b_run" / "config.yaml").write_text("")

    def is_run(path: Path) -> bool:
        if path.name == "a_locked":
            raise PermissionError(13, "Permission denied", str(path))
        return (path / "config.yaml").is_file()

    assert run_below(tmp_path, is_run) == tmp_path / "b_run"
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if Path(p).name == "c" else real(p))
    (tmp_path / "b_run" / "config.yaml").unlink()
    assert run_below(tmp_path, is_run) is None
    monkeypatch.undo()
    (tmp_path / "c" / "d").mkdir()
    (tmp_path / "c" / "d" / "config.yaml").write_text("")
    assert run_below(tmp_path, is_run) == tmp_path / "c" / "d"
    assert run_below(tmp_path, is_run, budget=3) is None  # the entries listed count, files or folders
    # a large folder listed only in part: a folder of runs beside it is still found
    (tmp_path / "a_data").mkdir()
    for i in range(5):
        (tmp_path / "a_data" / f"{i}.png").write_bytes(b"")
    assert run_below(tmp_path, is_run, per_folder=3) == tmp_path / "c" / "d"


def _ssvi(workspace: Path, *args: str, env: dict, shell: str = "") -> subprocess.CompletedProcess:
    """``ssvi`` as a shell starts it, with ``shell`` redirections (``>&-``, ``2>/dev/full``)."""
    command = " ".join(["exec", shlex.quote(sys.executable), "-m", "ssvi_cli", *map(shlex.quote, args), shell])
    return subprocess.run(["bash", "-c", command], capture_output=not shell.strip().startswith(">"), encoding="utf-8",
                          errors="replace", timeout=120, cwd=workspace, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_odd_terminals_encodings_and_closed_streams_change_no_outcome(workspace, tmp_path):
    """Each of these ended a command badly: COLUMNS=0 (containers, CI) printed nothing, errors included;
    an ASCII or latin-1 output encoding failed after the work on a ±, σ or é; a stream closed when ssvi
    started was an AttributeError; a full disk under stderr (2> log) stopped evaluate before its work."""
    model = str(workspace / RUN)
    missing = str(tmp_path / "missing")  # not /nonexistent: some systems have it (HOME=/nonexistent)
    error = _ssvi(workspace, "evaluate", missing, env={"COLUMNS": "0"})
    assert error.returncode == 2 and f"error: model {missing} does not exist" in error.stderr, error.stderr
    shown = _ssvi(workspace, "inspect", model, env={"COLUMNS": "0"})
    assert shown.returncode == 0 and "density" in shown.stdout
    odd = tmp_path / "café run"
    shutil.copytree(workspace / RUN, odd)
    for encoding in ("ascii", "latin-1"):
        for args in (["inspect", str(odd)], ["evaluate", str(odd), "--samples", "2"], ["presets"]):
            done = _ssvi(workspace, *args, env={"PYTHONIOENCODING": encoding})
            assert done.returncode == 0 and "Traceback" not in done.stderr, (encoding, args, done.stderr)
            if encoding == "ascii" and args[0] == "inspect":
                assert "caf\\xe9 run" in done.stdout
    report = tmp_path / "e.json"
    closed = _ssvi(workspace, "evaluate", model, "--samples", "2", "--output", str(report), "--json", env={},
                   shell=">&-")
    assert closed.returncode == 0 and json.loads(report.read_text())["n"] > 0
    full = _ssvi(workspace, "evaluate", model, "--samples", "2", "--output", str(tmp_path / "f.json"), env={},
                 shell="2>/dev/full")
    assert full.returncode == 0 and json.loads((tmp_path / "f.json").read_text())["n"] > 0
    no_stdin = _ssvi(workspace, "infer", model, "-", env={}, shell="<&-")
    assert no_stdin.returncode == 2 and "-: standard input is closed" in no_stdin.stderr
    assert _ssvi(workspace, "presets", env={"COLUMNS": "²"}).returncode == 0  # int() refuses what isdigit() takes
    # stderr's reader gone (| true): rich pointed *stdout* at /dev/null, and the report was lost with exit 0
    kept = tmp_path / "kept.json"
    gone = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -m ssvi_cli evaluate {shlex.quote(model)} "
                           f"--samples 2 --json 2>&1 >{shlex.quote(str(kept))} | true; exit ${{PIPESTATUS[0]}}"],
                          cwd=workspace, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert gone.returncode == 0 and json.loads(kept.read_text())["n"] > 0


def test_commands_in_messages_paste_back_whatever_the_path(workspace, tmp_path, capsys, monkeypatch):
    """'Resume with: ssvi train --resume -int run' pasted back is two arguments: the paths are quoted."""
    odd = tmp_path / "my run"
    shutil.copytree(workspace / RUN, odd)
    assert run(["train", "--resume", str(odd)]) == 0  # finished: nothing to resume, and how to evaluate it
    assert f"Evaluate it: ssvi evaluate {shlex.quote(str(odd / 'model.safetensors'))}" in \
        " ".join(capsys.readouterr().err.split())
    unstarted = tmp_path / "my unstarted"
    shutil.copytree(workspace / "unstarted", unstarted)
    assert run(["evaluate", str(unstarted)]) == 2
    assert f"start it again with ssvi train --out {shlex.quote(str(unstarted))} --force" in capsys.readouterr().err
    # a path that starts with a dash reads as an option: `ssvi evaluate -x/model.safetensors` was "No such option"
    dashed = Path("-x")
    shutil.copytree(workspace / RUN, tmp_path / dashed)
    monkeypatch.chdir(tmp_path)
    assert run(["train", "--resume", str(dashed)]) == 0
    assert "Evaluate it: ssvi evaluate ./-x/model.safetensors" in " ".join(capsys.readouterr().err.split())


def test_commands_in_messages_paste_back_into_windows_shells_too(workspace, tmp_path, capsys, monkeypatch):
    """On Windows the same messages quoted paths with POSIX single quotes, which cmd.exe keeps as part
    of the path: 'C:\\Users\\ana\\my run' does not exist there. Double quotes, as Windows' own tools write."""
    import sys as system

    from ssvi_cli.machine import shell_join, shell_quote

    monkeypatch.setattr(system, "platform", "win32")
    assert shell_quote("C:\\Users\\ana\\my run") == '"C:\\Users\\ana\\my run"'
    assert shell_quote("C:\\R&D\\a|b") == '"C:\\R&D\\a|b"'  # cmd.exe's & and | are plain text in double quotes
    assert shell_join(["ssvi", "sweep", "--report", "C:\\sw"]) == "ssvi sweep --report C:\\sw"
    odd = tmp_path / "my run"
    shutil.copytree(workspace / RUN, odd)
    assert run(["train", "--resume", str(odd)]) == 0
    assert f'Evaluate it: ssvi evaluate "{odd / "model.safetensors"}"' in " ".join(capsys.readouterr().err.split())


def test_a_legal_long_file_name_is_written(workspace, tmp_path):
    """A 242-character name (the limit is 255) was refused: the temporary file added the name again;
    the limit counts bytes, so a name of 80 three-byte characters too."""
    for name in ("m" * 230 + ".safetensors", "中" * 80 + ".safetensors"):
        target = tmp_path / name
        assert run(["export", str(workspace / RUN), "--output", str(target)]) == 0 and target.is_file()


def test_a_model_or_input_path_with_a_tilde_the_shell_left_is_read_from_home(workspace, tmp_path, capsys, monkeypatch):
    """--init-from, --preset and --ood read '~/r1' (quoted, or after '=') as the home folder's, while
    evaluate, infer, inspect and export said '~/r1 does not exist' (the paths review)."""
    home = tmp_path / "home"
    shutil.copytree(workspace / RUN, home / "r1")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    model = "~/r1/model.safetensors"
    assert run(["inspect", "~/r1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == str(home / "r1" / "model.safetensors")
    assert run(["export", "~/r1", "-o", str(tmp_path / "e.safetensors")]) == 0
    capsys.readouterr()
    np.save(home / "x.npy", np.zeros((2, 64), np.float32))
    assert run(["infer", model, "~/x.npy", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 2
    assert run(["inspect", "~nosuchuser-ssvi/r1"]) == 2  # no such user: the path as given, and its own error
    assert "~nosuchuser-ssvi/r1 does not exist" in capsys.readouterr().err
    (tmp_path / "~" / "r1").mkdir(parents=True)  # a folder really named so here is the one read: no model in it
    assert run(["inspect", "~/r1"]) == 2 and str(home) not in capsys.readouterr().err


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="file names there are Unicode text")
def test_a_model_at_a_path_that_is_not_utf8_reads_back_and_a_recorded_path_must_be(workspace, tmp_path, capsys):
    """train --out and export -o wrote model files under a name of Latin-1 bytes that evaluate, infer,
    inspect, export and --init-from could not read (safetensors opens UTF-8 paths only); and a run
    from such a path failed writing its config, after training."""
    odd = tmp_path / os.fsdecode(b"o\xe9")
    shutil.copytree(workspace / RUN, odd)
    assert run(["inspect", str(odd), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["active_weights"] > 0
    assert run(["export", str(odd), "-o", str(odd / "again.safetensors"), "--json"]) == 0
    capsys.readouterr()
    assert run(["evaluate", str(odd / "again.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 360  # the test digits, scored
    for flag, value in (("--init-from", str(odd / "model.safetensors")), ("--data", f"imagefolder:{odd}")):
        assert run(["train", flag, value, "--out", str(tmp_path / "r")]) == 2
        said = capsys.readouterr().err
        assert "o\\udce9" in said and "the path is not UTF-8 text, which the run's config and model file record; " \
            "rename it" in said and not (tmp_path / "r").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_sweep_folder_the_system_refuses_to_make_is_a_user_error(tmp_path: Path, capsys):
    """`ssvi sweep --out /proc/x` said "error (FileNotFoundError): [Errno 2] ..." with exit code 1, where
    train says the folder cannot be made, exit code 2."""
    for extra in ([], ["--dry-run"]):
        assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--out", "/proc/ssvi-sweep", *extra]) == 2
        said = capsys.readouterr().err
        assert said.startswith("error: --out /proc/ssvi-sweep cannot be made or written: ") and said.count("\n") == 1, said


def test_a_sweep_folder_named_with_a_newline_is_refused(tmp_path: Path, capsys):
    """commands.txt holds one command a line: a newline in --out split one over two, and a script
    reading it line by line ran the second half as a command of its own."""
    out = tmp_path / "sw\ntouch pwned #"
    assert run(["sweep", "--method", "ssvi", "--sparsity", "0.9", "--out", str(out), "--dry-run"]) == 2
    said = capsys.readouterr().err
    assert "a folder name with a control character (a newline, say) is refused" in said and said.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
