"""Seeded truncations and byte flips of a model file: each read is a clean ModelFileError or a
valid load, never another exception, a hang or a traceback."""

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ssvi_cli import config as C
from ssvi_cli.cli import run
from ssvi_cli.data import get_spec
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.modelfile import ModelCard, ModelFileError, read_model_file, write_model_file
from ssvi_cli.prediction import NonFiniteOutput, predict_batch

from hang_guard import time_bound

CASE_SECONDS = 5  # far above a normal read (milliseconds); a read this slow counts as a hang


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    """A small compact Bayesian file (gap8 indices, mu, sigma, biases): mostly header, so flips
    land in the JSON metadata as often as in tensor data."""
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"model.widths": [24, 12], "sparse.sparsity": 0.8})
    spec = get_spec(cfg.data.name)
    torch.manual_seed(0)  # the same tensors whichever tests ran before
    model = make_model(cfg, spec)
    init_model(model, cfg, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    card = ModelCard.from_metadata({"architecture": {"name": "mlp", "widths": [24, 12], "bayesian": True,
                                                     "sigma_param": "softplus"},
                                    "data_spec": spec.to_dict(), "training": {"method": "ssvi", "sparsity": 0.8}})
    write_model_file(model, path, card)
    read_model_file(path)  # the unmodified file loads
    return path.read_bytes()


def mutations(data: bytes, seed: int = 0) -> list[tuple[str, bytes]]:
    """Truncations (every length near the header boundaries, random ones elsewhere), single bit
    flips, byte overwrites and short random runs, most of them inside the 8-byte length and header."""
    rng = random.Random(seed)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cases: list[tuple[str, bytes]] = []
    cuts = set(range(0, 20)) | set(range(header_end - 8, header_end + 8)) | {len(data) - 1}
    cuts |= {rng.randrange(len(data)) for _ in range(60)}
    cases += [(f"truncate {n}", data[:n]) for n in sorted(cuts)]
    for i in range(700):
        pos = rng.randrange(header_end) if i % 4 else rng.randrange(header_end, len(data))
        buf = bytearray(data)
        kind = i % 3
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
            label = f"flip bit at {pos}"
        elif kind == 1:
            buf[pos] = rng.choice(b'0123456789{}[]",:.-eE \x00\xff')
            label = f"overwrite byte at {pos}"
        else:
            run_len = rng.randrange(2, 16)
            buf[pos:pos + run_len] = bytes(rng.randrange(256) for _ in range(run_len))
            label = f"random run of {run_len} at {pos}"
        cases.append((label, bytes(buf)))
    return cases


def fuzz(cases: list[tuple[str, bytes]], path: Path, read) -> dict[str, int]:
    """Write each case to ``path`` and ``read`` it: a one-line ModelFileError naming the file, or a
    valid read, within CASE_SECONDS; anything else fails the test. Returns how many of each."""
    outcomes = {"error": 0, "read": 0}
    for label, data in cases:
        path.write_bytes(data)
        try:
            with time_bound(CASE_SECONDS):
                read(path, label)
            outcomes["read"] += 1
        except ModelFileError as exc:
            message = str(exc)
            assert message and "\n" not in message and str(path) in message, (label, message)
            outcomes["error"] += 1
        except NonFiniteOutput as exc:  # finite weights so large that the logits overflow: refused, one line
            assert "\n" not in str(exc), (label, str(exc))
            outcomes["read"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{label}: {type(exc).__name__}: {exc}")
    return outcomes


def test_every_mutation_is_a_clean_error_or_a_valid_load(original, tmp_path):
    cases = mutations(original)
    assert len(cases) >= 750

    def load_and_predict(path: Path, label: str) -> None:
        loaded = read_model_file(path)
        x = torch.zeros(2, *loaded.spec.input_shape)
        probs, _ = predict_batch(loaded.model, x, samples=2, mode="mc")
        assert probs.shape == (2, loaded.spec.num_classes), label

    outcomes = fuzz(cases, tmp_path / "m.safetensors", load_and_predict)
    # Both outcomes occur: the cases reach the validation and the tensor data.
    assert outcomes["error"] > 300 and outcomes["read"] > 50, outcomes


def test_mutated_files_through_the_cli_never_show_a_traceback(original, tmp_path, capsys):
    # safetensors writes its metadata map in no fixed order, so the file's bytes (and which
    # mutations still load) differ between processes: pick 15 of each outcome by reading first.
    path = tmp_path / "m.safetensors"
    picked: dict[bool, list[tuple[str, bytes]]] = {True: [], False: []}
    for label, data in mutations(original, seed=1):
        path.write_bytes(data)
        try:
            read_model_file(path)
            loads = True
        except ModelFileError:
            loads = False
        if len(picked[loads]) < 15:
            picked[loads].append((label, data))
    assert len(picked[True]) == len(picked[False]) == 15
    for loads, cases in picked.items():
        for label, data in cases:
            path.write_bytes(data)
            with time_bound(4 * CASE_SECONDS):
                code = run(["inspect", str(path), "--json"])
            captured = capsys.readouterr()
            assert "Traceback" not in captured.out + captured.err, label
            assert code == (0 if loads else 2), (label, captured.err)
            if not loads:
                lines = [l for l in captured.err.splitlines() if l.strip()]
                assert len(lines) == 1 and lines[0].startswith("error: "), (label, captured.err)


@pytest.mark.parametrize("field, value, match", [
    # the layer's shape compared on the meta device (allocating failed at once too, as a corrupted header)
    ("architecture", {"widths": [24, 4_000_000_000_000]}, r"layer 'hidden.0' has shape \[12, 24\], the architecture needs "
                                                          r"\[4000000000000, 24\]"),
    ("data_spec", {"input_shape": [1, 8, 2_000_000_000_000]}, r"layer 'first' has shape \[24, 64\], the architecture "
                                                              r"needs \[24, 16000000000000\]"),
    ("data_spec", {"num_classes": 3_000_000_000_000}, r"corrupted header \(data description: data spec names 10 classes "
                                                      r"for a model of 3000000000000\)"),
    # one flipped digit made a width 0: a division by zero, found by CI
    ("architecture", {"widths": [0, 12]}, r"corrupted header \(architecture has a layer width below 1"),
    ("architecture", {"widths": [24, -4]}, r"corrupted header \(architecture has a layer width below 1"),
    ("data_spec", {"input_shape": [1, 0, 8]}, r"corrupted header \(data description: data spec input shape \[1, 0, 8\]"),
    ("data_spec", {"num_classes": 0}, r"corrupted header \(data description: .* 0 classes describe no input or no class")])
def test_an_impossible_size_in_the_metadata_is_refused_before_allocating(original, tmp_path, field, value, match):
    # Found by the fuzz above: one overwritten byte turned a width into trillions and the reader
    # tried to allocate the bias (96 TB) before comparing shapes.
    good = tmp_path / "good.safetensors"
    good.write_bytes(original)
    with safe_open(str(good), "pt") as fh:
        meta = fh.metadata()
    changed = {**json.loads(meta[field]), **value}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={**meta, field: json.dumps(changed)})
    with time_bound(CASE_SECONDS), pytest.raises(ModelFileError, match=match):
        read_model_file(bad)


def test_a_custom_modules_file_read_layer_by_layer_is_a_clean_error_or_a_valid_read(tmp_path):
    # `ssvi inspect` reads a file saved from a user's own module layer by layer (modelfile.reader.
    # read_layers), without the checks that building the architecture gives: the same mutations.
    import ssvi_cli as ssvi
    from ssvi_cli.evaluation.inspection import layer_stats
    from ssvi_cli.modelfile.reader import read_layers

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 12),
                              torch.nn.ReLU(), torch.nn.Linear(12, 10))
    ssvi.sparsify(net, 0.8, dense_first_conv=False, deterministic=["4"])
    path = tmp_path / "custom.safetensors"
    ssvi.save(net, path)
    assert [name for name, _ in read_layers(path)[2]] == ["0", "2", "4"]

    def read_and_summarise(path: Path, label: str) -> None:
        for name, layer in read_layers(path)[2]:
            layer_stats(name, layer)

    outcomes = fuzz(mutations(path.read_bytes(), seed=2)[::2], path, read_and_summarise)
    assert outcomes["error"] > 150 and outcomes["read"] > 25, outcomes


@pytest.mark.parametrize("change", [{"active": None}, {"active": "12"}, {"active": -1}, {"active": 2.5},
                                    {"shape": None}, {"shape": [0, 8]}, {"name": 3}, {"bayesian": "yes"},
                                    {"index": None}])
def test_a_malformed_layer_record_is_a_corrupted_header_in_every_command(original, tmp_path, capsys, change):
    """'active': null was int(None): a TypeError and exit 1 in inspect and evaluate."""
    good = tmp_path / "good.safetensors"
    good.write_bytes(original)
    with safe_open(str(good), "pt") as fh:
        meta = fh.metadata()
    layers = json.loads(meta["layers"])
    layers[0] = {**layers[0], **change}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={**meta, "layers": json.dumps(layers)})
    for command in (["inspect", str(bad)], ["evaluate", str(bad), "--samples", "1"]):
        capsys.readouterr()
        assert run(command) == 2
        err = capsys.readouterr().err
        assert "has a corrupted header" in err and len(err.strip().splitlines()) == 1, err


def test_a_dense_tensor_of_the_wrong_kind_is_refused_not_converted(original, tmp_path):
    """One header byte ("F32" -> "I32") made a bias read as integers of about 1e9: every input came out
    one class with probability 1, exit 0. A dense tensor must be floating-point where the model's is."""
    good = tmp_path / "good.safetensors"
    good.write_bytes(original)
    bad = tmp_path / "bad.safetensors"
    data = original.replace(b'"hidden.1.bias":{"dtype":"F32"', b'"hidden.1.bias":{"dtype":"I32"', 1)
    assert data != original
    bad.write_bytes(data)
    with pytest.raises(ModelFileError, match=r"tensor 'hidden.1.bias' is stored as int32, architecture 'mlp' "
                                             r"needs floating-point values"):
        read_model_file(bad)


def test_a_header_nested_past_pythons_recursion_limit_is_a_model_file_error(tmp_path):
    depth = 100_000
    body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with time_bound(CASE_SECONDS), pytest.raises(ModelFileError, match="corrupted header"):
        read_model_file(path)


def test_a_layer_recorded_whole_is_checked_against_its_values_before_its_index_is_made(original, tmp_path):
    """A 160 KB file of an MLP 20,000 wide recording its middle layer whole ('full') with one stored
    weight made the reader build that layer's 400,000,000 indices (3.2 GB) before it compared sizes."""
    wide = 20_000
    good = tmp_path / "good.safetensors"
    good.write_bytes(original)
    with safe_open(str(good), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(good))
    del tensors["hidden.0.index"]
    tensors["first.bias"], tensors["hidden.0.bias"] = torch.zeros(wide), torch.zeros(wide)
    layers = json.loads(meta["layers"])
    shapes = {"first": [wide, 64], "hidden.0": [wide, wide], "hidden.1": [10, wide]}
    for record in layers:
        record["shape"] = shapes[record["name"]]
        if record["name"] == "hidden.0":
            record["index"] = "full"
    arch = {**json.loads(meta["architecture"]), "widths": [wide, wide]}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "layers": json.dumps(layers), "architecture": json.dumps(arch)})
    assert bad.stat().st_size < 400_000
    with time_bound(CASE_SECONDS), pytest.raises(ModelFileError, match=r"layer 'hidden.0' is recorded whole "
                                                                      r"\(400000000 entries\) but stores \d+ values of mu"):
        read_model_file(bad)


@pytest.mark.parametrize("change", ["version", "layers", "offsets"])
def test_a_header_field_of_another_json_type_is_a_corrupted_header(original, tmp_path, change):
    """Written raw (safetensors' writer keeps metadata strings), a list for the version or the layers and
    strings for a tensor's offsets were a bare TypeError from ssvi_cli.load, exit code 1 in the commands."""
    n = struct.unpack("<Q", original[:8])[0]
    header = json.loads(original[8:8 + n])
    if change == "offsets":
        header[next(k for k in header if k != "__metadata__")]["data_offsets"] = ["0", "4"]
    else:
        header["__metadata__"][change] = [1]
    raw = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + original[8 + n:])
    with pytest.raises(ModelFileError, match=r"has a corrupted header \(TypeError: "):
        read_model_file(bad)
