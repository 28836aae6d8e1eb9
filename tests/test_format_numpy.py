"""docs/FORMAT.md, section "Running a model file without ssvi", executed by a reader written from it.

The reader (the first half of this file) uses numpy and json only: it parses the safetensors
container by hand, decodes the index codes, rebuilds the dense weights, preprocesses inputs and runs
the forward pass of ``mlp``, ``lenet5`` and ``resnet18``. Nothing of ssvi's own reader (model file,
models, layers, data) is imported. ssvi is used only the way a user would use it, through its CLI
(``ssvi_cli.cli.run``): ``train`` and ``export`` produce the files, ``infer --mode mean --json`` gives
the reference probabilities, which the reader must reproduce to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

ATOL = 1e-5

# =================================================================== the numpy-only reader

# ------------------------------------------------------------------ §1 The container

NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1"}
JSON_METADATA = ("architecture", "data_spec", "training", "metrics", "layers")


def decode_tensor(raw: bytes, dtype: str, shape: list[int]) -> np.ndarray:
    """One tensor's bytes as an array (§1 table; bfloat16 = the upper half of a float32)."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, NUMPY_DTYPES[dtype]).reshape(shape)


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray], dict[str, str]]:
    """(metadata strings, tensors by name, safetensors dtype by name) of a safetensors file (§1)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__")
    data = raw[8 + n:]
    tensors, dtypes = {}, {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        tensors[name] = decode_tensor(data[begin:end], info["dtype"], info["shape"])
        dtypes[name] = info["dtype"]
    return metadata, tensors, dtypes


def parse_metadata(metadata: dict[str, str]) -> dict:
    """The metadata table of "The format (version 1)": JSON-valued entries decoded once more."""
    assert metadata["format"] == "ssvi" and int(metadata["version"]) == 1
    meta = dict(metadata)
    for key in JSON_METADATA:
        meta[key] = json.loads(metadata[key])
    return meta


# ------------------------------------------------------------------ §2 Dense weights

def gap8_decode(codes: np.ndarray) -> np.ndarray:
    """``pos = cumsum(code == 0 ? 255 : code) - 1``, kept where the code is non-zero (§2.1)."""
    c = codes.astype(np.int64)
    pos = np.cumsum(np.where(c == 0, 255, c)) - 1
    return pos[c != 0]


def positions(record: dict, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The active flat positions of a layer record, by its ``index`` code (§2.1)."""
    numel = int(np.prod(record["shape"]))
    code = record["index"]
    if code == "full":
        return np.arange(numel, dtype=np.int64)
    if code == "gap8":
        return gap8_decode(tensors[f"{record['name']}.index"])
    assert code == "flat32"
    return tensors[f"{record['name']}.index"].astype(np.int64)


def densify(record: dict, tensors: dict[str, np.ndarray], values: np.ndarray) -> np.ndarray:
    """Scatter per-active-entry ``values`` into a float64 weight of ``record['shape']`` (§2.2)."""
    pos = positions(record, tensors)
    assert len(pos) == record["active"] == values.size
    dense = np.zeros(int(np.prod(record["shape"])))
    dense[pos] = values.astype(np.float64).ravel()
    return dense.reshape(record["shape"])


def index_code_for(pos: np.ndarray, numel: int) -> str:
    """The writer's choice, as "Index codes" states it: full, else gap8 if its bytes <= 4 * active."""
    if len(pos) == numel:
        return "full"
    gaps = np.diff(pos, prepend=-1)
    gap8_bytes = len(pos) + int(((gaps - 1) // 255).sum())
    return "gap8" if gap8_bytes <= 4 * len(pos) else "flat32"


class NumpyModel:
    """A model file in numpy: metadata, tensors, and the dense weights of the mean network (§1, §2)."""

    def __init__(self, path: Path) -> None:
        metadata, self.tensors, self.dtypes = read_safetensors(path)
        self.meta = parse_metadata(metadata)
        self.arch = self.meta["architecture"]
        self.spec = self.meta["data_spec"]
        self.records = {r["name"]: r for r in self.meta["layers"]}
        self.mean_weights = {name: self.dense(name, "mu") for name in self.records}

    def dense(self, name: str, part: str) -> np.ndarray:
        """The dense ``mu`` or ``sigma`` weight of layer ``name``."""
        return densify(self.records[name], self.tensors, self.tensors[f"{name}.{part}"])

    def tensor(self, name: str) -> np.ndarray:
        """A plain (state_dict) tensor such as a bias or a BatchNorm statistic, in float64 (§2.4)."""
        return self.tensors[name].astype(np.float64)


# ------------------------------------------------------------------ §3 Preprocessing

LUMA = np.array([0.299, 0.587, 0.114])


def resize_matrix(n: int, m: int) -> np.ndarray:
    """(m, n) antialiased bilinear resampling matrix of one axis (§3.3)."""
    s = n / m
    support = max(s, 1.0)
    a = np.zeros((m, n))
    for i in range(m):
        center = s * (i + 0.5)
        j0 = max(int(center - support + 0.5), 0)  # int() truncates toward zero
        j1 = min(int(center + support + 0.5), n)
        j = np.arange(j0, j1)
        w = np.maximum(0.0, 1.0 - np.abs(j - center + 0.5) / support)
        a[i, j0:j1] = w / w.sum()
    return a


def preprocess(images: np.ndarray, spec: dict) -> np.ndarray:
    """(N, c, h, w) pixels -> the model's normalised (N, C, H, W) float64 input (§3.1-§3.4)."""
    c_model, h_model, w_model = spec["input_shape"]
    pixel_max = float(spec.get("pixel_max", 255.0))
    if pixel_max != 255.0 and images.dtype != np.uint8 and images.min() >= 0 and 1 < images.max() <= pixel_max:
        x = images / pixel_max  # the dataset's own scale (the digits' 0..16)
    elif np.issubdtype(images.dtype, np.integer):
        x = images / 255.0
    else:
        x = images.astype(np.float64)
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] != c_model:
        x = np.einsum("nchw,c->nhw", x, LUMA)[:, None] if c_model == 1 else np.repeat(x, 3, axis=1)
    if x.shape[2:] != (h_model, w_model):
        ah, aw = resize_matrix(x.shape[2], h_model), resize_matrix(x.shape[3], w_model)
        x = np.clip(np.einsum("ih,nchw,jw->ncij", ah, x, aw), 0.0, 1.0)
    mean = np.array(spec["mean"]).reshape(1, -1, 1, 1)
    std = np.array(spec["std"]).reshape(1, -1, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------ §4 Building blocks

def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def linear(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray]) -> np.ndarray:
    """``x · Wᵀ + b`` for W of shape (out, in)."""
    return x @ w.T + (0.0 if b is None else b)


def conv2d(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray], stride: int, padding: int) -> np.ndarray:
    """Cross-correlation, dilation 1, groups 1, zero padding, via im2col (a tensordot over windows)."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    y = np.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3]))  # (N, oh, ow, out)
    y = y.transpose(0, 3, 1, 2)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def batchnorm(x: np.ndarray, model: NumpyModel, name: str) -> np.ndarray:
    """Eval-mode BatchNorm with running statistics and eps = 1e-5."""
    shape = (1, -1, 1, 1)
    mean = model.tensor(f"{name}.running_mean").reshape(shape)
    var = model.tensor(f"{name}.running_var").reshape(shape)
    return (x - mean) / np.sqrt(var + 1e-5) * model.tensor(f"{name}.weight").reshape(shape) \
        + model.tensor(f"{name}.bias").reshape(shape)


def max_pool2(x: np.ndarray) -> np.ndarray:
    """2x2 windows, stride 2, no padding, a trailing odd row/column dropped."""
    n, c, h, w = x.shape
    x = x[:, :, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """adaptive_avg_pool2d(x, 1), flattened: the mean over H and W -> (N, C)."""
    return x.mean(axis=(2, 3))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ §5 The architectures

Weights = dict[str, np.ndarray]


def forward_mlp(m: NumpyModel, w: Weights, x: np.ndarray) -> np.ndarray:
    """mlp: flatten, ``first``, then ReLU + ``hidden.i`` for each hidden layer; no final ReLU."""
    h = linear(x.reshape(len(x), -1), w["first"], m.tensor("first.bias"))
    for i in range(len(m.arch["widths"])):
        h = linear(relu(h), w[f"hidden.{i}"], m.tensor(f"hidden.{i}.bias"))
    return h


def forward_lenet5(m: NumpyModel, w: Weights, x: np.ndarray) -> np.ndarray:
    """lenet5: conv(pad 2)-ReLU-pool, conv-ReLU-pool, flatten, fc1-ReLU-fc2-ReLU-fc3."""
    h = max_pool2(relu(conv2d(x, w["first"], m.tensor("first.bias"), stride=1, padding=2)))
    h = max_pool2(relu(conv2d(h, w["conv2"], m.tensor("conv2.bias"), stride=1, padding=0)))
    h = relu(linear(h.reshape(len(h), -1), w["fc1"], m.tensor("fc1.bias")))
    h = relu(linear(h, w["fc2"], m.tensor("fc2.bias")))
    return linear(h, w["fc3"], m.tensor("fc3.bias"))


RESNET18_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)  # stride of blocks.0 ... blocks.7's first conv


def basic_block(m: NumpyModel, w: Weights, b: str, stride: int, x: np.ndarray) -> np.ndarray:
    """ReLU(bn2(conv2(ReLU(bn1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN when present."""
    u = relu(batchnorm(conv2d(x, w[f"{b}.conv1"], None, stride=stride, padding=1), m, f"{b}.bn1"))
    u = batchnorm(conv2d(u, w[f"{b}.conv2"], None, stride=1, padding=1), m, f"{b}.bn2")
    if f"{b}.shortcut.0" in w:
        x = batchnorm(conv2d(x, w[f"{b}.shortcut.0"], None, stride=stride, padding=0), m, f"{b}.shortcut.1")
    return relu(u + x)


def forward_resnet18(m: NumpyModel, w: Weights, x: np.ndarray) -> np.ndarray:
    """resnet18: stem conv-bn1-ReLU, blocks.0..7, global average pool, fc."""
    h = relu(batchnorm(conv2d(x, w["first"], None, stride=1, padding=1), m, "bn1"))
    for i, stride in enumerate(RESNET18_STRIDES):
        h = basic_block(m, w, f"blocks.{i}", stride, h)
    return linear(global_avg_pool(h), w["fc"], m.tensor("fc.bias"))


FORWARD: dict[str, Callable[[NumpyModel, Weights, np.ndarray], np.ndarray]] = {
    "mlp": forward_mlp, "lenet5": forward_lenet5, "resnet18": forward_resnet18,
}


# ------------------------------------------------------------------ §6 Prediction

def predict_mean(m: NumpyModel, images: np.ndarray) -> np.ndarray:
    """Mean-network class probabilities (θ = μ) of raw pixel images (N, c, h, w)."""
    x = preprocess(images, m.spec)
    return softmax(FORWARD[m.arch["name"]](m, m.mean_weights, x))


def predict_mc(m: NumpyModel, images: np.ndarray, samples: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo: per draw θ = μ + σ ε on the active entries of every Bayesian layer; returns
    (mean probabilities (N, K), per-draw probabilities (S, N, K))."""
    x = preprocess(images, m.spec)
    draws = []
    for _ in range(samples):
        w = {}
        for name, rec in m.records.items():
            mu = m.tensors[f"{name}.mu"].astype(np.float64).ravel()
            if rec["bayesian"]:
                sigma = m.tensors[f"{name}.sigma"].astype(np.float64).ravel()
                mu = mu + sigma * rng.standard_normal(mu.size)
            w[name] = densify(rec, m.tensors, mu)
        draws.append(softmax(FORWARD[m.arch["name"]](m, w, x)))
    stacked = np.stack(draws)
    return stacked.mean(axis=0), stacked


def entropy(p: np.ndarray) -> np.ndarray:
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)


# =================================================================== producing files and references (CLI only)

from ssvi_cli.cli import run  # noqa: E402  (the CLI: train, export, infer; never its reader)


def cli(*argv: str) -> None:
    code = run(list(argv))
    assert code == 0, f"ssvi {' '.join(argv)} exited with {code}"


def train(out: Path, *argv: str) -> Path:
    """``ssvi train --out OUT ...``; returns the run's model file."""
    cli("train", "--out", str(out), "--json", *argv)
    return out / "model.safetensors"


def export(source: Path, out: Path, dtype: str) -> Path:
    cli("export", str(source), "-o", str(out), "--dtype", dtype, "--json")
    return out


def infer(capsys, model_file: Path, inputs: list[Path], class_names: list[str], mode: str = "mean",
          *extra: str) -> dict:
    """``ssvi infer FILE INPUT... --json`` with every class listed; adds ``probs`` (N, K), the rows
    in input order, to the JSON."""
    capsys.readouterr()
    code = run(["infer", str(model_file), *map(str, inputs), "--mode", mode,
                "--top-k", str(len(class_names)), "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    probs = np.zeros((len(out["predictions"]), len(class_names)))
    for row, pred in enumerate(out["predictions"]):
        for top in pred["top_k"]:
            probs[row, class_names.index(top["class"])] = top["probability"]
    out["probs"] = probs
    return out


def save(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return path


def assert_reader_matches_infer(capsys, tmp_path: Path, model_file: Path,
                                arrays: dict[str, np.ndarray]) -> NumpyModel:
    """The reader's mean-network probabilities of every array equal ``ssvi infer``'s (one call)."""
    model = NumpyModel(model_file)
    ours = np.concatenate([predict_mean(model, images) for images in arrays.values()])
    files = [save(tmp_path, name, images) for name, images in arrays.items()]
    ref = infer(capsys, model_file, files, model.spec["class_names"])
    assert ref["mode"] == "mean"
    np.testing.assert_allclose(ours, ref["probs"], atol=ATOL, rtol=0)
    assert [p["class_index"] for p in ref["predictions"]] == ours.argmax(1).tolist()
    return model


def pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------ fixtures: runs trained by the CLI

@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory) -> Path:
    """The default digits MLP (softplus, sparsity 0.95: gap8 indices), two epochs."""
    return train(tmp_path_factory.mktemp("mlp") / "run", "--epochs", "2")


@pytest.fixture(scope="module")
def mlp_exp_file(tmp_path_factory) -> Path:
    """A very sparse digits MLP with sigma = exp(rho): its sparsest layers need flat32 indices."""
    return train(tmp_path_factory.mktemp("mlp_exp") / "run", "--epochs", "1", "--sparsity", "0.9995",
                 "--set", "sparse.allocation=uniform", "--set", "bayes.sigma_param=exp", "--set", "train.eval_samples=1")


@pytest.fixture(scope="module")
def mlp_wide_file(tmp_path_factory) -> Path:
    """A digits MLP with wide posteriors (σ ≈ 0.05) and logits large enough after one epoch (μ's
    init over the active fan-in) that Monte Carlo draws differ visibly."""
    return train(tmp_path_factory.mktemp("mlp_wide") / "run", "--epochs", "1", "--set", "sparse.allocation=uniform",
                 "--set", "bayes.sigma_init_mean=0.05", "--set", "bayes.mu_init=fan_in", "--set", "train.eval_samples=1")


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory) -> Path:
    from fixtures_torchvision import write_cifar10, write_mnist

    root = tmp_path_factory.mktemp("tv")
    write_mnist(root, n_train=64, n_test=8)
    write_cifar10(root, n_train=20, n_test=4)
    return root


def small_run(root: Path, out: Path, preset: str, n_train: int, batch: int) -> Path:
    return train(out, "--preset", preset, "--epochs", "1", "--batch-size", str(batch),
                 "--set", f"data.data_dir={root}", "--set", f"data.max_train={n_train}",
                 "--set", "train.eval_samples=1")


@pytest.fixture(scope="module")
def lenet_file(torchvision_root, tmp_path_factory) -> Path:
    return small_run(torchvision_root, tmp_path_factory.mktemp("lenet") / "run", "mnist_lenet5", 64, 32)


@pytest.fixture(scope="module")
def resnet_file(torchvision_root, tmp_path_factory) -> Path:
    from fixtures_torchvision import accept_fixture_checksums

    with pytest.MonkeyPatch.context() as mp:
        accept_fixture_checksums(mp, torchvision_root)
        return small_run(torchvision_root, tmp_path_factory.mktemp("resnet") / "run", "cifar10_resnet18", 16, 16)


# =================================================================== tests

def test_gap8_decoding_by_hand():
    """§2.1 gap8 on a code with fillers: positions 0, 3, 300, 301, 1000 have gaps 1, 3, 297, 1, 699,
    written 1 | 3 | 0 42 | 1 | 0 0 189."""
    codes = np.array([1, 3, 0, 42, 1, 0, 0, 189], dtype=np.uint8)
    np.testing.assert_array_equal(gap8_decode(codes), [0, 3, 300, 301, 1000])
    assert index_code_for(np.array([0, 3, 300, 301, 1000]), 2000) == "gap8"  # 8 bytes <= 20
    assert index_code_for(np.array([4000]), 5000) == "flat32"  # 16 fillers: 16 bytes > 4
    assert index_code_for(np.array([1019]), 5000) == "gap8"  # 3 fillers + 1: exactly 4 bytes
    assert index_code_for(np.arange(6), 6) == "full"


def test_container_metadata_and_tensor_table(mlp_file):
    """§1 and §2: the container parses by hand and holds exactly the documented tensors."""
    model = NumpyModel(mlp_file)
    meta = model.meta
    assert meta["layout"] == "compact" and meta["dtype"] == "float32"
    assert model.arch == {"name": "mlp", "widths": [512, 512], "bayesian": True, "sigma_param": "softplus"}
    assert model.spec["input_shape"] == [1, 8, 8] and len(model.spec["class_names"]) == 10
    assert [r["name"] for r in meta["layers"]] == ["first", "hidden.0", "hidden.1"]
    assert [r["shape"] for r in meta["layers"]] == [[512, 64], [512, 512], [10, 512]]
    expected = set()
    for r in meta["layers"]:
        expected |= {f"{r['name']}.mu", f"{r['name']}.sigma", f"{r['name']}.bias"}
        expected |= {f"{r['name']}.index"} if r["index"] != "full" else set()
        assert r["kind"] == "linear" and r["index"] == "gap8" and r["bayesian"]
        assert model.tensors[f"{r['name']}.mu"].shape == (r["active"],)
        assert model.dtypes[f"{r['name']}.index"] == "U8"
    assert set(model.tensors) == expected
    assert all(model.dtypes[n] == "F32" for n in expected if not n.endswith(".index"))


def test_index_codes_follow_the_documented_rule(mlp_file, mlp_exp_file):
    """"Index codes": every layer's code is what the stated rule picks for its positions."""
    codes = []
    for path in (mlp_file, mlp_exp_file):
        model = NumpyModel(path)
        for rec in model.meta["layers"]:
            pos = positions(rec, model.tensors)
            assert np.all(np.diff(pos) > 0) and pos.min() >= 0 and pos.max() < np.prod(rec["shape"])
            assert index_code_for(pos, int(np.prod(rec["shape"]))) == rec["index"]
            codes.append(rec["index"])
    assert "gap8" in codes and "flat32" in codes
    assert NumpyModel(mlp_exp_file).dtypes["first.index"] == "I32"


def test_sigma_is_stored_not_rho(mlp_file, mlp_exp_file):
    """§2.3: the file holds σ (positive, about the 1e-3 init) for softplus and exp alike; ρ would be
    about -7 for both."""
    for path, param in ((mlp_file, "softplus"), (mlp_exp_file, "exp")):
        model = NumpyModel(path)
        assert model.arch["sigma_param"] == param
        sigma = np.concatenate([model.tensors[f"{n}.sigma"].ravel() for n in model.records])
        assert sigma.min() > 0 and 1e-4 < np.median(sigma) < 1e-2


@pytest.mark.parametrize("case", ["uint8", "float", "downsize", "upsize", "rgb", "rgba_resized",
                                  "raw_digits_0_16"])
def test_mlp_mean_network_matches_infer(case, mlp_file, tmp_path, capsys):
    """§3 (every preprocessing branch, pixel_max included) and §5 mlp against ``ssvi infer --mode mean``."""
    rng = np.random.default_rng(1)
    images = {
        "uint8": lambda: pixels(rng, (6, 1, 8, 8)),
        "float": lambda: rng.random((6, 1, 8, 8)).astype(np.float32),
        "downsize": lambda: pixels(rng, (6, 1, 13, 11)),
        "upsize": lambda: pixels(rng, (6, 1, 5, 6)),
        "rgb": lambda: pixels(rng, (6, 3, 8, 8)),
        "rgba_resized": lambda: pixels(rng, (6, 4, 10, 9)),
        "raw_digits_0_16": lambda: rng.integers(0, 17, size=(6, 1, 8, 8)).astype(np.float64),
    }[case]()
    assert_reader_matches_infer(capsys, tmp_path, mlp_file, {case: images})


def test_flat32_exp_model_matches_infer(mlp_exp_file, tmp_path, capsys):
    """§2 with flat32 indices and sigma_param exp: the mean network needs no σ at all."""
    rng = np.random.default_rng(2)
    assert_reader_matches_infer(capsys, tmp_path, mlp_exp_file, {"x": pixels(rng, (8, 1, 8, 8))})


def test_mlp_monte_carlo_agrees_with_infer(mlp_wide_file, tmp_path, capsys):
    """§6: numpy weight draws and ssvi's draws give the same predictive up to Monte Carlo error.

    The mutual information is what tells σ apart: for this file it is about 0.04; it would be 0
    without noise, about 1e-4 with σ² in place of σ and about 2 with softplus(σ) (σ read as ρ)."""
    samples = 200
    images = pixels(np.random.default_rng(3), (16, 1, 8, 8))
    model = NumpyModel(mlp_wide_file)
    probs, draws = predict_mc(model, images, samples, np.random.default_rng(0))
    ref = infer(capsys, mlp_wide_file, [save(tmp_path, "x", images)], model.spec["class_names"], "mc",
                "--samples", str(samples))
    assert ref["mode"] == "mc" and ref["samples"] == samples
    np.testing.assert_allclose(probs, ref["probs"], atol=0.05, rtol=0)
    mi = entropy(probs) - entropy(draws).mean(axis=0)
    ref_mi = np.array([p["mutual_information"] for p in ref["predictions"]])
    assert ref_mi.mean() > 0.02 and abs(mi.mean() - ref_mi.mean()) < 0.2 * ref_mi.mean()
    np.testing.assert_allclose(mi, ref_mi, atol=0.015, rtol=0)
    np.testing.assert_allclose(entropy(probs), [p["entropy"] for p in ref["predictions"]], atol=0.05)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_lenet5_matches_infer_in_every_dtype(dtype, lenet_file, tmp_path, capsys):
    """§1 (F16, BF16 with numpy) and §5 lenet5; each file against ``ssvi infer`` on that same file."""
    path = lenet_file if dtype == "float32" else export(lenet_file.parent, tmp_path / f"{dtype}.safetensors", dtype)
    images = pixels(np.random.default_rng(4), (6, 1, 28, 28))
    model = assert_reader_matches_infer(capsys, tmp_path, path, {"x": images})
    assert model.meta["dtype"] == dtype
    assert [r["name"] for r in model.meta["layers"]] == ["first", "conv2", "fc1", "fc2", "fc3"]
    assert model.records["first"]["index"] == "full" and model.records["fc1"]["shape"] == [120, 400]
    floating = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    assert {model.dtypes[n] for n in model.tensors if not n.endswith(".index")} == {floating}
    if dtype != "float32":  # the narrow file holds the float32 file's values, rounded
        wide = NumpyModel(lenet_file).tensors["fc1.mu"].astype(np.float64)
        narrow = model.tensors["fc1.mu"].astype(np.float64)
        rel = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
        assert np.all(np.abs(narrow - wide) <= rel * np.abs(wide) + 1e-7)


@pytest.mark.slow
def test_resnet18_matches_infer(resnet_file, tmp_path, capsys):
    """§5 resnet18 (BatchNorm, shortcuts, average pool) with RGB, gray (repeated) and resized inputs,
    in float32 and in a bfloat16 export."""
    rng = np.random.default_rng(5)
    arrays = {"rgb": pixels(rng, (3, 3, 32, 32)), "gray": pixels(rng, (2, 1, 32, 32)),
              "resized": pixels(rng, (2, 3, 40, 36))}
    model = assert_reader_matches_infer(capsys, tmp_path, resnet_file, arrays)
    names = [r["name"] for r in model.meta["layers"]]
    assert names[:4] == ["first", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1"] and names[-1] == "fc"
    assert [n for n in names if "shortcut" in n] == [f"blocks.{i}.shortcut.0" for i in (2, 4, 6)]
    assert model.records["first"]["index"] == "full"
    bf16 = export(resnet_file.parent, tmp_path / "bf16.safetensors", "bfloat16")
    assert_reader_matches_infer(capsys, tmp_path, bf16, {"bf16": pixels(rng, (2, 3, 32, 32))})
