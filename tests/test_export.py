"""The ssvi model file: index codes, round trips, sizes and clean errors on bad files."""

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssvi_cli import config as C
from ssvi_cli.cli import run
from ssvi_cli.data import get_spec
from ssvi_cli.training.trainer import Trainer
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.modelfile import ModelCard, ModelFileError, read_header, read_model_file, size_totals, write_model_file
from ssvi_cli.modelfile.codec import encode_index, gap8_decode, gap8_encode, gap8_size
from ssvi_cli.runs.load import export_model, load_model
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.prediction import predict_batch


def metadata(cfg: C.Config, spec) -> ModelCard:
    return ModelCard.from_config(cfg, spec)


def built(preset: str, **over):
    cfg = C.apply_overrides(C.load_preset(preset), {"sparse.sparsity": 0.95, **over})
    spec = get_spec(cfg.data.name)
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    return model, metadata(cfg, spec), spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = C.apply_overrides(C.load_preset("digits_mlp"),
                            {"train.epochs": 2, "sparse.delta_t": 5, "train.eval_samples": 2})
    run_dir = tmp_path_factory.mktemp("run") / "r"
    trainer = Trainer.create(cfg, run_dir)
    trainer.fit()
    x = torch.stack([trainer.splits.test[i][0] for i in range(64)])
    return trainer, run_dir, x


# ------------------------------------------------------------------ index codes

def test_gap8_round_trip_with_fillers():
    idx = torch.tensor([0, 254, 255, 510, 511, 767, 100_000, 100_001])
    codes = gap8_encode(idx)
    assert codes.dtype == torch.uint8
    # gaps 1, 254, 1, 255, 1, 256 (= filler + 1), 99233 (= 389 fillers + 38), 1
    assert codes.tolist()[:7] == [1, 254, 1, 255, 1, 0, 1]
    assert codes.numel() == gap8_size(idx) == 8 + 1 + 389
    assert torch.equal(gap8_decode(codes), idx)


def test_gap8_random_supports_and_empty():
    gen = torch.Generator().manual_seed(1)
    for numel, k in ((1000, 50), (100_000, 20), (5000, 4999)):
        idx = torch.randperm(numel, generator=gen)[:k].sort().values
        assert torch.equal(gap8_decode(gap8_encode(idx)), idx)
    assert gap8_decode(gap8_encode(torch.zeros(0, dtype=torch.long))).numel() == 0


def test_index_code_choice():
    assert encode_index(torch.arange(10), 10)[0] == "full"
    code, t = encode_index(torch.tensor([3, 40, 90]), 100)
    assert code == "gap8" and t.numel() == 3
    # Very sparse: gaps of ~300k need ~1300 fillers each, more than 4 bytes -> int32 flat indices.
    code, t = encode_index(torch.tensor([5, 400_000, 900_000]), 1_000_000)
    assert code == "flat32" and t.dtype == torch.int32


# ------------------------------------------------------------------ round trips

def test_engine_and_file_agree_mean_exactly_and_mc_with_same_seed(trained):
    trainer, run_dir, x = trained
    engine = trainer.model
    loaded = read_model_file(run_dir / "model.safetensors")
    assert loaded.spec == trainer.splits.spec
    assert loaded.card.training.method == "ssvi" and loaded.file.version == 1
    for (_, a), (_, b) in zip(sparse_layers(engine), sparse_layers(loaded.model)):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.mu, b.mu)
    pe, _ = predict_batch(engine, x, mode="mean")
    pf, _ = predict_batch(loaded.model, x, mode="mean")
    torch.testing.assert_close(pf, pe, atol=1e-5, rtol=0)
    torch.manual_seed(7)
    pe, se = predict_batch(engine, x, samples=5, mode="mc")
    torch.manual_seed(7)
    pf, sf = predict_batch(loaded.model, x, samples=5, mode="mc")
    # Same draws; sigma -> rho -> softplus(rho) round-trips to float32 rounding, hence the 1e-5.
    torch.testing.assert_close(sf, se, atol=1e-5, rtol=0)
    assert torch.equal(pf.argmax(1), pe.argmax(1))
    torch.manual_seed(8)
    other, _ = predict_batch(loaded.model, x, samples=5, mode="mc")
    assert (other - pf).abs().max() > 1e-5  # the seed really sets the draws


def test_run_dir_checkpoint_and_reexport_load_the_same_model(trained, tmp_path):
    trainer, run_dir, x = trained
    from_dir = load_model(run_dir)
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    from_ckpt = load_model(ckpt)
    assert from_ckpt.card.architecture == from_dir.card.architecture
    report = export_model(ckpt, tmp_path / "m.safetensors")
    again = read_model_file(tmp_path / "m.safetensors")
    for m in (from_ckpt.model, again.model):
        torch.testing.assert_close(predict_batch(m, x, mode="mean")[0],
                                   predict_batch(from_dir.model, x, mode="mean")[0], atol=1e-6, rtol=0)
    assert report["file_bytes"] == (tmp_path / "m.safetensors").stat().st_size


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_keep_supports_and_predictions(trained, tmp_path, dtype):
    trainer, run_dir, x = trained
    report = export_model(run_dir, tmp_path / f"{dtype}.safetensors", dtype=dtype)
    loaded = read_model_file(tmp_path / f"{dtype}.safetensors")
    assert loaded.file.dtype == dtype and report["dtype"] == dtype
    for (_, a), (_, b) in zip(sparse_layers(trainer.model), sparse_layers(loaded.model)):
        assert torch.equal(a.idx, b.idx)
    pe, _ = predict_batch(trainer.model, x, mode="mean")
    pf, _ = predict_batch(loaded.model, x, mode="mean")
    assert (pf - pe).abs().max() < 0.05
    assert (pf.argmax(1) == pe.argmax(1)).float().mean() > 0.95


def test_dense_file_is_a_full_bnn_with_the_same_predictions(trained, tmp_path):
    trainer, run_dir, x = trained
    report = export_model(run_dir, tmp_path / "dense.safetensors", dense=True)
    # its report counts the model's support, not the stored zeros ("active weights N of N" before)
    active = sum(l.active for _, l in sparse_layers(trainer.model))
    assert report["active_weights"] == active < report["stored_weights"] == report["total_weights"]
    again = export_model(tmp_path / "dense.safetensors", tmp_path / "dense2.safetensors", dense=True)
    assert again["active_weights"] == active  # from the dense file too, whose zeros are stored entries
    assert (tmp_path / "dense2.safetensors").read_bytes()[-1000:] == (tmp_path / "dense.safetensors").read_bytes()[-1000:]
    dense = read_model_file(tmp_path / "dense.safetensors")
    assert dense.file.layout == "dense"
    assert all(l.active == l.numel for _, l in sparse_layers(dense.model))
    torch.testing.assert_close(predict_batch(dense.model, x, mode="mean")[0],
                               predict_batch(trainer.model, x, mode="mean")[0], atol=1e-5, rtol=0)


def test_a_compact_export_of_a_dense_file_restores_the_sparse_support(trained, tmp_path):
    # The dense file stores the weights off the support as mu = sigma = 0; exporting it compact again
    # gives back the run's own file (the same supports and values), not a density-1 "compact" file.
    _, run_dir, x = trained
    export_model(run_dir, tmp_path / "dense.safetensors", dense=True)
    report = export_model(tmp_path / "dense.safetensors", tmp_path / "again.safetensors")
    original = read_model_file(run_dir / "model.safetensors").model
    again = read_model_file(tmp_path / "again.safetensors").model
    assert report["active_weights"] == sum(l.active for _, l in sparse_layers(original)) < report["total_weights"] / 10
    for (name, a), (_, b) in zip(sparse_layers(original), sparse_layers(again)):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.mu, b.mu), name
        assert torch.equal(a.sigma(), b.sigma()), name
    assert torch.equal(predict_batch(again, x, mode="mean")[0], predict_batch(original, x, mode="mean")[0])
    rigl, meta, _ = built("digits_mlp", **{"sparse.method": "rigl"})  # deterministic: no sigma in the file
    write_model_file(rigl, tmp_path / "r.safetensors", meta, dense=True)
    export_model(tmp_path / "r.safetensors", tmp_path / "r2.safetensors")
    back = read_model_file(tmp_path / "r2.safetensors").model
    assert [l.active for _, l in sparse_layers(back)] == [l.active for _, l in sparse_layers(rigl)]


def test_batchnorm_and_deterministic_models_round_trip(tmp_path):
    model, meta, spec = built("cifar10_resnet18")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    write_model_file(model, tmp_path / "r.safetensors", meta)
    loaded = read_model_file(tmp_path / "r.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(predict_batch(loaded.model, x, mode="mean")[0],
                               predict_batch(model, x, mode="mean")[0], atol=1e-5, rtol=0)
    assert loaded.model.first.active == loaded.model.first.numel  # dense stem stored without index
    rigl, meta, _ = built("digits_mlp", **{"sparse.method": "rigl"})
    write_model_file(rigl, tmp_path / "d.safetensors", meta)
    names = read_header(tmp_path / "d.safetensors")["tensors"]
    assert not any(n.endswith(".sigma") for n in names)
    back = read_model_file(tmp_path / "d.safetensors").model
    assert back.first.rho is None
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(predict_batch(back, x)[0], predict_batch(rigl, x)[0], atol=1e-6, rtol=0)


# ------------------------------------------------------------------ sizes (METHOD.md section 7)

@pytest.mark.parametrize("preset", ["cifar10_resnet18", "mnist_mlp", "digits_mlp"])
def test_compact_file_is_15x_smaller_in_float32_and_28x_in_float16(tmp_path, preset):
    model, meta, _ = built(preset)
    dense = write_model_file(model, tmp_path / "dense.st", meta, dense=True)
    f32 = write_model_file(model, tmp_path / "f32.st", meta)
    f16 = write_model_file(model, tmp_path / "f16.st", meta, dtype="float16")
    assert dense / f32 >= 15, (dense, f32)
    assert dense / f16 >= 28, (dense, f16)
    # The arithmetic dense size inspect reports is exactly the dense file's tensor data.
    head = read_header(tmp_path / "dense.st")
    assert size_totals(read_header(tmp_path / "f32.st"))["dense_bnn_bytes"] == dense - head["header_bytes"]


def test_a_sigma_too_small_for_float16_is_said_when_it_is_stored_as_zero(tmp_path, caplog):
    """float16 stored a sigma below 3e-8 as 0 without a word: a point mass whose SNR inspect showed as
    3.5e28 (the reader's floor of sigma), where the float32 file gave 3.4e6."""
    from ssvi_cli.core.gaussian import rho_from_sigma

    model, meta, _ = built("digits_mlp")
    layers = sparse_layers(model)
    for (_, layer), tiny in zip(layers, ([1e-8, 2e-8], [1e-9], [3e-8])):  # 3e-8 rounds up to 5.96e-8: kept
        with torch.no_grad():
            layer.rho[:len(tiny)] = rho_from_sigma(torch.tensor(tiny, dtype=torch.float64), layer.sigma_param).float()
    caplog.set_level("WARNING", logger="ssvi_cli.modelfile.writer")
    write_model_file(model, tmp_path / "f16.st", meta, dtype="float16")
    said = [r.getMessage() for r in caplog.records if r.name == "ssvi_cli.modelfile.writer"]
    assert said == [f"3 sigma values too small for float16 (its smallest is 5.96e-08) stored as 0, point masses "
                    f"({layers[0][0]}: 2, {layers[1][0]}: 1); save as float32 or bfloat16 to keep them"]
    caplog.clear()
    for dtype in ("bfloat16", "float32"):
        write_model_file(model, tmp_path / f"{dtype}.st", meta, dtype=dtype)
    assert not [r for r in caplog.records if r.name == "ssvi_cli.modelfile.writer"]


# ------------------------------------------------------------------ bad files

def _resave(src: Path, dst: Path, *, meta_update=None, tensor_update=None, drop=()) -> None:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as fh:
        meta = dict(fh.metadata())
    tensors = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    meta.update(meta_update or {})
    tensors.update(tensor_update or {})
    save_file(tensors, str(dst), metadata=meta)


@pytest.fixture(scope="module")
def good_file(trained):
    return trained[1] / "model.safetensors"


def bad_files(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    _resave(good, tmp / "newer.safetensors", meta_update={"version": "3"})
    out["newer"] = (tmp / "newer.safetensors", "version 3, newer")
    save_file({"weight": torch.zeros(3, 3)}, str(tmp / "plain.safetensors"), metadata={"x": "y"})
    out["plain"] = (tmp / "plain.safetensors", "not an ssvi model file")
    data = good.read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = (tmp / "cut.safetensors", "truncated")
    (tmp / "cut_header.safetensors").write_bytes(data[:100])
    out["truncated header"] = (tmp / "cut_header.safetensors", "truncated")
    (tmp / "text.safetensors").write_text("hello, this is not a model at all\n")
    out["text"] = (tmp / "text.safetensors", "not an ssvi model file")
    n = struct.unpack("<Q", data[:8])[0]
    broken = data[:8] + b'{"__metadata__":' + b"x" * (n - 16) + data[8 + n:]
    (tmp / "header.safetensors").write_bytes(broken)
    out["header"] = (tmp / "header.safetensors", "corrupted header")
    codes = load_file(str(good))["first.index"].clone()
    codes[5] = 0  # a filler where an entry was: one index missing
    _resave(good, tmp / "index.safetensors", tensor_update={"first.index": codes})
    out["index"] = (tmp / "index.safetensors", "indices but records")
    layers = [dict(r) for r in read_header(good)["meta"]["layers"]]
    layers[1]["shape"] = [3, 3]
    _resave(good, tmp / "shape.safetensors", meta_update={"layers": json.dumps(layers)})
    out["shape"] = (tmp / "shape.safetensors", "has shape [3, 3]")
    sigma = load_file(str(good))["first.sigma"].clone()
    sigma[0] = -1.0
    _resave(good, tmp / "sigma.safetensors", tensor_update={"first.sigma": sigma})
    out["sigma"] = (tmp / "sigma.safetensors", "negative or non-finite")
    mu = load_file(str(good))["first.mu"]
    _resave(good, tmp / "int_mu.safetensors", tensor_update={"first.mu": mu.round().to(torch.int32)})
    out["integer mu"] = (tmp / "int_mu.safetensors", "mu is stored as int32, not as floats")
    _resave(good, tmp / "short_mu.safetensors", tensor_update={"first.mu": mu[:-1].clone()})
    out["short mu"] = (tmp / "short_mu.safetensors", f"mu has shape [{mu.numel() - 1}] for {mu.numel()} indices")
    # what a reader of FORMAT.md alone found accepted: a float flat32 index (truncated into the
    # neighbouring entries: other predictions, exit 0), an input shape no architecture takes (exit 1),
    # a dense layout holding compact layers, a full layer's values stored flat
    from ssvi_cli.modelfile.codec import gap8_decode

    positions = gap8_decode(load_file(str(good))["first.index"]).to(torch.float32) - 0.7
    flat = [dict(r, index="flat32") if r["name"] == "first" else r for r in layers_of(good)]
    _resave(good, tmp / "float_index.safetensors", meta_update={"layers": json.dumps(flat)},
            tensor_update={"first.index": positions})
    out["float flat32 index"] = (tmp / "float_index.safetensors", "stores its flat32 index as float32, not int32")
    spec = dict(read_header(good)["meta"]["data_spec"])
    _resave(good, tmp / "no_input.safetensors", meta_update={"data_spec": json.dumps(dict(spec, input_shape=[]))})
    out["input shape"] = (tmp / "no_input.safetensors", "input shape []; a mlp model takes (channels, height, width)")
    # a key of a newer ssvi: its message listed the keys read without pixel_max, a key it reads
    _resave(good, tmp / "new_key.safetensors", meta_update={"data_spec": json.dumps(dict(spec, resize="crop"))})
    out["new key"] = (tmp / "new_key.safetensors", "unknown key resize (this ssvi reads class_names, input_shape, "
                      "mean, name, num_classes, std and, if present, dataset_classes, files_digest, pixel_max, reduced_jpeg): "
                      "written by a newer ssvi (upgrade) or edited")
    _resave(good, tmp / "dense_layout.safetensors", meta_update={"layout": "dense"})
    out["dense layout"] = (tmp / "dense_layout.safetensors", "but the file's layout is dense")
    record = next(r for r in layers_of(good) if r["name"] == "hidden.1")
    numel = record["shape"][0] * record["shape"][1]
    full = [dict(r, index="full", active=numel) if r["name"] == "hidden.1" else r for r in layers_of(good)]
    _resave(good, tmp / "flat_full.safetensors", meta_update={"layers": json.dumps(full)},
            tensor_update={"hidden.1.mu": torch.zeros(numel), "hidden.1.sigma": torch.full((numel,), 0.01)},
            drop=("hidden.1.index",))
    out["flat full mu"] = (tmp / "flat_full.safetensors", f"mu has shape [{numel}] for the weight shape {record['shape']}")
    return out


def layers_of(path: Path) -> list[dict]:
    return [dict(r) for r in read_header(path)["meta"]["layers"]]


def test_bad_files_raise_model_file_error(good_file, tmp_path):
    for name, (path, words) in bad_files(good_file, tmp_path).items():
        with pytest.raises(ModelFileError, match=re.escape(words)):
            read_model_file(path)


@pytest.mark.parametrize("command", ["inspect", "infer", "export"])
def test_bad_files_give_one_line_errors_through_the_cli(good_file, tmp_path, capsys, command):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((8, 8), dtype=np.uint8))
    for name, (path, words) in bad_files(good_file, tmp_path).items():
        argv = {"inspect": ["inspect", str(path)], "infer": ["infer", str(path), str(tmp_path / "x.npy")],
                "export": ["export", str(path), "-o", str(tmp_path / "o.safetensors")]}[command]
        code = run(argv)
        captured = capsys.readouterr()
        assert code == 2, (name, captured.err)
        assert "Traceback" not in captured.err + captured.out
        lines = [l for l in captured.err.splitlines() if l.strip()]
        assert len(lines) == 1 and words in lines[0] and str(path) in lines[0], (name, captured.err)


def test_export_to_a_path_with_brackets_and_from_a_checkpoint_onto_its_run(trained, tmp_path, capsys, monkeypatch):
    from ssvi_cli.cli.common import out

    _, run_dir, _ = trained
    monkeypatch.setattr(out, "width", 200)  # whatever COLUMNS the tests run under
    monkeypatch.chdir(tmp_path)  # short paths: the size table keeps the name on one line
    folder = Path("a[")
    folder.mkdir()
    assert run(["export", str(run_dir), "-o", str(folder / "e].safetensors")]) == 0
    assert "a[/e].safetensors" in capsys.readouterr().out
    assert read_model_file(folder / "e].safetensors").card.architecture.name == "mlp"
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    before = (run_dir / "model.safetensors").read_bytes()
    assert run(["export", str(ckpt), "-o", str(run_dir / "model.safetensors"), "--dense"]) == 2
    assert "is the model file of the run in" in capsys.readouterr().err
    assert (run_dir / "model.safetensors").read_bytes() == before
    lookalike = Path("copied")  # a run's config copied to reuse it is no run: its model file may be written
    lookalike.mkdir()
    (lookalike / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    assert run(["export", str(run_dir), "-o", str(lookalike / "model.safetensors")]) == 0


def test_a_dense_or_deterministic_run_records_no_sparsity_or_criterion_it_did_not_use():
    """A model card describes what was trained: dense VI at the preset's sparsity 0.95 is dense, and
    RigL (|w|) ranks by no SNR criterion; the full config keeps what the preset said."""
    from ssvi_cli.config import Config, apply_overrides
    from ssvi_cli.modelfile.card import Training

    for method, sparsity, criterion in (("vi", 0.0, None), ("dense", 0.0, None), ("rigl", 0.95, None),
                                        ("static", 0.95, None), ("ssvi", 0.95, "snr_abs")):
        cfg = apply_overrides(Config(), {"sparse.method": method, "sparse.sparsity": 0.95, "sparse.criterion": "snr_abs"})
        record = Training.from_config(cfg)
        assert (record.sparsity, record.criterion) == (sparsity, criterion), method
        assert record.config["sparse"]["sparsity"] == 0.95


def test_a_model_taken_before_its_runs_end_says_so_wherever_it_goes(tmp_path: Path, capsys):
    """export and infer of a run stopped mid-training used its checkpoint silently, and the exported
    file read as a finished 40-epoch model (inspect, evaluate); now each says how far it had trained,
    and the file records it. A finished run's file carries no such record."""
    np = pytest.importorskip("numpy")
    out = tmp_path / "run"
    assert run(["train", "--out", str(out), "--epochs", "3", "--set", "model.widths=[8]", "--set",
                "data.max_train=64", "--set", "train.eval_samples=1", "--set", "train.keep_checkpoints=3"]) == 0
    assert run(["export", str(out), "-o", str(tmp_path / "done.safetensors")]) == 0
    assert "unfinished" not in read_header(tmp_path / "done.safetensors")["meta"]["training"]
    checkpoints = sorted((out / "checkpoints").glob("*.pt"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    for path in (out / "model.safetensors", out / "summary.json", checkpoints[-1]):
        path.unlink()  # as if stopped after its second epoch
    capsys.readouterr()
    assert run(["export", str(out), "-o", str(tmp_path / "early.safetensors"), "--json"]) == 0
    said = "taken from a checkpoint after 2 of 3 epochs (step 2): its training had not finished"
    captured = capsys.readouterr()
    assert said in captured.err
    assert any(said in note for note in json.loads(captured.out)["notes"])  # for a program too
    training = read_header(tmp_path / "early.safetensors")["meta"]["training"]
    assert training["unfinished"] == {"epoch": 2, "step": 2} and training["epochs"] == 3
    assert run(["inspect", str(tmp_path / "early.safetensors")]) == 0
    assert f"seed 0; {said}" in capsys.readouterr().out
    assert run(["evaluate", str(tmp_path / "early.safetensors"), "--samples", "1", "--json"]) == 0
    assert f"the model was {said}" in json.loads(capsys.readouterr().out)["notes"]
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), dtype=np.uint8))
    for source in (out, tmp_path / "early.safetensors"):
        assert run(["infer", str(source), str(tmp_path / "x.npy")]) == 0
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("change, words", [
    (lambda m: m.__setitem__("first.idx", m["first.idx"].clone().index_fill_(0, torch.tensor([0]), 10**9)),
     "layer 'first': not a sorted set of distinct positions below"),  # a segfault in the sparse kernel
    (lambda m: m.__setitem__("first.idx", m["first.idx"].clone().index_fill_(0, torch.tensor([1]), 0)),
     "layer 'first': not a sorted set of distinct positions below"),  # a duplicate: predicted, exit 0
    (lambda m: m.__setitem__("first.mu", m["first.mu"][:-1]), "layer 'first': mu is not"),
    (lambda m: m.pop("first.rho"), "lacks first.rho"),
])
def test_a_damaged_checkpoint_is_refused_as_a_damaged_model_file_is(trained, tmp_path, capsys, change, words):
    """Checkpoints were installed without the model file's checks: an index out of range crashed the
    process, a duplicate or unsorted one predicted, and export wrote a file ssvi itself then refused."""
    from ssvi_cli.cli import run

    data = torch.load(sorted((trained[1] / "checkpoints").iterdir())[-1], weights_only=True)
    change(data["model"])
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    capsys.readouterr()
    for args in (["inspect", str(bad)], ["export", str(bad), "-o", str(tmp_path / "x.safetensors")]):
        assert run(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"checkpoint {bad}" in err and words in err, err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("shape", [[], [1], [1, 8], [1, 1, 16, 16]])
def test_an_image_model_whose_file_names_another_input_rank_is_refused_in_a_line(tmp_path, shape):
    """A torchvision model's file with an input shape of another rank failed as it was built (IndexError,
    'expected 4D input'): exit 1 with Python's words."""
    import torchvision
    import ssvi_cli as ssvi

    model = torchvision.models.resnet18(num_classes=3)
    ssvi.sparsify(model, sparsity=0.9)
    good = tmp_path / "good.safetensors"
    ssvi.save(model, good, architecture="torchvision:resnet18", input_shape=(3, 16, 16))
    spec = dict(read_header(good)["meta"]["data_spec"])
    _resave(good, tmp_path / "bad.safetensors", meta_update={"data_spec": json.dumps(dict(spec, input_shape=shape))})
    with pytest.raises(ModelFileError, match=re.escape(f"input shape {shape}; a torchvision:resnet18 model takes "
                                                       "(channels, height, width)")):
        read_model_file(tmp_path / "bad.safetensors")


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads this process's memory maps (Linux)")
def test_a_loaded_model_holds_no_mapping_of_its_file(trained, tmp_path):
    """safetensors' load_file mapped the file and the installed float32 tensors kept the mapping for the
    model's life: on Windows a model then cannot be saved back over the file it came from."""
    import ssvi_cli

    trainer, run_dir, x = trained
    path = tmp_path / "m.safetensors"
    export_model(run_dir, path)
    model = ssvi_cli.load(path)
    init = tmp_path / "init.safetensors"  # a torchvision state dict's file, read the same way
    save_file({"w": torch.ones(4096)}, str(init))
    from ssvi_cli.modelfile.reader import load_safetensors

    state = load_safetensors(init)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) not in maps and str(init) not in maps
    ssvi_cli.save(model, path)  # back over its own file: the same predictions
    torch.testing.assert_close(predict_batch(ssvi_cli.load(path), x, mode="mean")[0],
                               predict_batch(model, x, mode="mean")[0], atol=0, rtol=0)
    assert torch.equal(state["w"], torch.ones(4096))


def test_export_onto_another_name_of_its_source_is_refused(trained, tmp_path, capsys):
    """The check compared resolved paths, which a second name of the same file passed: on macOS's
    case-insensitive disk MODEL.safetensors for model.safetensors, and export replaced its source; a hard
    link, a second name on any disk, stands in for it here."""
    trainer, run_dir, x = trained
    source = tmp_path / "m.safetensors"
    export_model(run_dir, source)
    alias = tmp_path / "alias.safetensors"
    alias.hardlink_to(source)
    before = source.read_bytes()
    assert run(["export", str(source), "-o", str(alias), "--dtype", "float16"]) == 2
    assert f"--output {alias} is the file being exported" in capsys.readouterr().err
    assert source.read_bytes() == before and alias.read_bytes() == before


def test_one_model_gives_one_file_byte_for_byte(trained, tmp_path):
    """safetensors wrote the header's keys in an order that changed from one process to the next, and the
    file recorded the run's throughput: two exports of one run, or two runs of one model, were files of
    other bytes (and, the header's length moving, of other sizes)."""
    import subprocess
    import sys

    trainer, run_dir, x = trained
    for name in ("a", "b"):  # separate processes: each its own hash order
        subprocess.run([sys.executable, "-m", "ssvi_cli", "export", str(run_dir), "-o", str(tmp_path / f"{name}.safetensors"),
                        "--dtype", "float16"], check=True, capture_output=True)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    raw = (tmp_path / "a.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert "samples_per_second" not in json.loads(header["__metadata__"]["metrics"])
    assert "samples_per_second" in json.loads((run_dir / "summary.json").read_text())  # the summary keeps it
    assert len(load_file(str(tmp_path / "a.safetensors"))) == len(header) - 1  # safetensors reads it
