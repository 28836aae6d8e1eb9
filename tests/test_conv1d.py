"""nn.Conv1d as a sparse Gaussian layer: the geometry, the conversion, training with the Subspace,
and the model file (format version 2 for a file holding one; version 1 otherwise)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import ssvi_cli as ssvi
from ssvi_cli.core.conv import SparseConv1d
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.modelfile.reader import read_layers


def _fill(layer: SparseConv1d, weight: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Give ``layer`` a random support of ``weight``'s entries; returns the dense weight it stands for."""
    flat = weight.detach().flatten()
    keep = torch.rand(flat.numel(), generator=torch.Generator().manual_seed(seed)) < density
    idx = torch.nonzero(keep).flatten()
    layer.set_support(idx, flat[idx].clone(), torch.full((idx.numel(),), -3.0))
    return torch.zeros_like(flat).index_copy(0, idx, flat[idx]).view_as(weight)


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=1, stride=2),
                                      dict(kernel_size=5, stride=2, padding=2, dilation=2),
                                      dict(kernel_size=5, padding="same"), dict(kernel_size=3, padding=1, groups=2)])
def test_the_layer_computes_what_conv1d_does_with_its_weights(kernel, geometry):
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, **geometry)
    layer = SparseConv1d(4, 6, **geometry, bias=True, bayesian=True, kernel=kernel)
    dense = _fill(layer, conv.weight, 0.4, 1)
    layer.bias.data.copy_(conv.bias.data)
    x = torch.randn(3, 4, 17)
    want = F.conv1d(x, dense, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    with ssvi.sampling(nn.Sequential(layer), "mean"):
        torch.testing.assert_close(layer(x), want)
        torch.testing.assert_close(layer(x[0]), want[0])  # one unbatched (C, L) sequence, as nn.Conv1d takes it
    mean, var = layer.moments(x)  # training's LRT: the output variance is the conv of x^2 with sigma^2
    torch.testing.assert_close(mean, want)
    sigma2 = torch.zeros(dense.numel()).index_copy(0, layer.idx, layer.sigma().detach() ** 2).view_as(dense)
    torch.testing.assert_close(var, F.conv1d(x * x, sigma2, None, conv.stride, conv.padding, conv.dilation, conv.groups))
    assert layer.positions(x) == want.shape[0] * want.shape[2]


class Signal(nn.Module):
    """A small 1-D CNN for two-channel sequences of length 40."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 16, 7, padding=3)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Conv1d(32, 32, 3, padding=1, groups=4), nn.ReLU(), nn.Conv1d(32, 32, 1))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean(-1))


def test_sparsify_converts_conv1d_keeps_its_stem_dense_and_computes_the_original_at_sparsity_0():
    torch.manual_seed(0)
    model = Signal().eval()
    original = copy.deepcopy(model)
    report = ssvi.sparsify(model, 0.0)
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        ("stem", "conv1d"), ("body.1", "conv1d"), ("body.4", "conv1d"), ("body.6", "conv1d"), ("head", "linear")]
    assert report.kept == []
    x = torch.randn(5, 2, 40)
    with ssvi.sampling(model, "mean"):
        torch.testing.assert_close(model(x), original(x))
    sparse = Signal()
    report = ssvi.sparsify(sparse, 0.9)
    assert report.layers[0].dense and report.layers[0].active == 16 * 2 * 7  # the first convolution, a Conv1d here
    assert all(0.09 < layer.active / layer.total < 0.11 for layer in report.layers[1:])


def test_a_conv1d_that_a_sparse_layer_cannot_stand_for_is_kept_with_its_reason():
    class Scaled(nn.Conv1d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"), Scaled(4, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 8, 3))
    report = ssvi.sparsify(model, 0.5)
    assert dict(report.kept) == {"0": "padding_mode='reflect' (only zero padding is supported)",
                                 "1": "Scaled subclasses nn.Conv1d with its own forward, which a sparse layer would drop"}
    assert [name for name, _ in sparse_layers(model)] == ["3"]


def test_a_1d_model_trains_with_the_subspace_and_its_file_loads_into_a_fresh_module(tmp_path):
    torch.manual_seed(0)
    model = Signal()
    ssvi.sparsify(model, 0.9)
    x = torch.randn(64, 2, 40)
    y = (x[:, 0].mean(1) > 0).long() + (x[:, 1].mean(1) > 0).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=10)
    before = {name: layer.idx.clone() for name, layer in sparse_layers(model)}
    model.train()
    for _ in range(40):
        loss = F.cross_entropy(model(x), y) + ssvi.kl_term(model, 1000)
        optimizer.zero_grad()
        loss.backward()
        subspace.step()
    moved = [name for name, layer in sparse_layers(model) if not torch.equal(layer.idx, before[name])]
    assert "body.1" in moved and "stem" not in moved  # the dense stem has nothing to move
    assert all(layer.active == before[name].numel() for name, layer in sparse_layers(model))
    assert ssvi.predict(model, x[:4], samples=4).probs.shape == (4, 3)

    path = tmp_path / "signal.safetensors"
    ssvi.save(model, path, class_names=["a", "b", "c"], input_shape=(2, 40))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["version"] == "2"  # a reader of version 1 refuses the file as newer, not as corrupted
    assert [r["kind"] for r in json.loads(meta["layers"])] == ["conv1d"] * 4 + ["linear"]
    loaded = ssvi.load(path, model=Signal())
    with ssvi.sampling(model.eval(), "mean"), ssvi.sampling(loaded, "mean"):
        torch.testing.assert_close(loaded(x), model(x))
    layers = dict(read_layers(path)[2])  # what ssvi inspect reads: each layer built from its record alone
    assert isinstance(layers["body.1"], SparseConv1d) and layers["body.1"].weight_shape == (32, 16, 5)


def test_a_file_without_conv1d_is_still_version_1(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    ssvi.sparsify(model, 0.5)
    ssvi.save(model, tmp_path / "m.safetensors", input_shape=(1, 8, 8))
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()["version"] == "1"


def test_a_file_that_kept_its_conv1d_dense_loads_with_it_dense(tmp_path):
    """A file written while Conv1d was kept as it is (here: excluded) stores it among the dense
    tensors; loading converts the module and puts that layer back."""
    torch.manual_seed(0)
    model = Signal()
    ssvi.sparsify(model, 0.5, exclude=["stem", "body.*"])
    ssvi.save(model, tmp_path / "old.safetensors", class_names=["a", "b", "c"], input_shape=(2, 40))
    loaded = ssvi.load(tmp_path / "old.safetensors", model=Signal())
    assert [name for name, _ in sparse_layers(loaded)] == ["head"] and type(loaded.stem) is nn.Conv1d
    x = torch.randn(3, 2, 40)
    with ssvi.sampling(model.eval(), "mean"), ssvi.sampling(loaded, "mean"):
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_an_input_of_another_channel_count_rank_or_too_short_is_refused_in_torchs_words(kernel):
    """On the sparse kernel a 1x1 convolution took 12 channels for 8 in silence (the product read the
    first 8), and other shapes failed in the kernel's own words."""
    for conv, shapes in ((nn.Conv1d(8, 64, 1), [(2, 12, 40), (2, 7, 40), (2, 8, 0), (1, 2, 8, 40)]),
                         (nn.Conv2d(4, 16, 1), [(2, 5, 6, 6), (2, 4, 0, 6), (2, 4, 6)]),
                         (nn.Conv2d(4, 16, 3), [(2, 4, 2, 2)])):
        model = nn.Sequential(nn.Identity(), copy.deepcopy(conv))
        ssvi.sparsify(model, 0.95, dense_first_conv=False, kernel=kernel)
        for shape in shapes:
            x = torch.randn(*shape)
            with pytest.raises(RuntimeError) as torchs:
                conv(x)
            with pytest.raises(RuntimeError, match=re.escape(str(torchs.value))):
                model(x)
