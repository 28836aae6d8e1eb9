import math

import pytest
import torch

from ssvi_cli import config as C
from ssvi_cli.core.allocation import AllocationError, active_count, layer_densities
from ssvi_cli.data import get_spec
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.core.layers import sparse_layers


def resnet(**over):
    cfg = C.apply_overrides(C.load_preset("cifar10_resnet18"), over)
    return cfg, make_model(cfg, get_spec("cifar10"))


def test_uniform_keeps_stem_dense_and_reports_achieved_density():
    cfg, model = resnet(**{"sparse.sparsity": 0.95})
    dens = init_model(model, cfg, torch.Generator().manual_seed(0))
    layers = dict(sparse_layers(model))
    assert dens["first"] == 1.0 and layers["first"].active == layers["first"].numel
    others = [n for n in layers if n != "first"]
    assert all(layers[n].active == active_count(layers[n].numel, 0.05) for n in others)
    total = sum(l.numel for l in layers.values())
    achieved = sum(l.active for l in layers.values()) / total
    assert 0.05 < achieved < 0.0505  # slightly above 1 - sparsity because of the stem


def test_erk_matches_budget_and_gives_small_layers_more_density():
    cfg, model = resnet(**{"sparse.sparsity": 0.9, "sparse.allocation": "erk"})
    layers = sparse_layers(model)
    dens = layer_densities(layers, 0.1, "erk", dense_stem=True)
    sparse = [(n, l) for n, l in layers if n != "first"]
    active = sum(dens[n] * l.numel for n, l in sparse)
    assert abs(active / sum(l.numel for _, l in sparse) - 0.1) < 1e-6
    d = {n: dens[n] for n, _ in sparse}
    assert d["fc"] > d["blocks.7.conv2"]  # 512x10 linear vs 512x512x3x3 conv
    assert max(d.values()) <= 1.0
    # below the cap, density / (sum(shape) / prod(shape)) is one constant (ERK's epsilon)
    eps = {n: d[n] * math.prod(l.weight_shape) / sum(l.weight_shape) for n, l in sparse if d[n] < 1.0}
    assert len(eps) > 10 and max(eps.values()) == pytest.approx(min(eps.values()), rel=1e-9)


def test_sparsity_that_empties_a_layer_is_rejected():
    cfg = C.apply_overrides(C.Config(), {"model.widths": [4], "sparse.sparsity": 0.999})
    model = make_model(cfg, get_spec("digits"))
    with pytest.raises(AllocationError, match="no active weight"):
        init_model(model, cfg, torch.Generator().manual_seed(0))


def test_the_weights_kept_dense_outside_the_sparse_layers_are_counted():
    """Swin's attention projections (a ViT's, before its attention was split) stay dense: train and inspect said
    nothing of them, so "density 0.10" read as the whole model's while 40% of its weights were dense."""
    from torch import nn

    import ssvi_cli as ssvi
    from ssvi_cli.core.allocation import kept_dense_weights

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)
            self.tied = self.head  # one layer under two names: counted once

        def forward(self, tokens):
            x = self.embed(tokens)
            return self.head(self.norm(self.attn(x, x, x)[0]).mean(1))

    model = Block()
    ssvi.sparsify(model, 0.5)
    assert kept_dense_weights(model) == 10 * 8  # the embedding (the attention's four projections are converted)
    whole = Block()
    whole.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)  # kept whole
    ssvi.sparsify(whole, 0.5)
    assert kept_dense_weights(whole) == 10 * 8 + 3 * 8 * 8 + 8 * 8 + 2 * 8  # embedding, in-projection, out_proj, bias_k/v
    cfg = C.load_preset("digits_mlp")
    mlp = make_model(cfg, get_spec("digits"))
    assert kept_dense_weights(mlp) == 0  # every weight of ssvi's own models is in a sparse layer


def test_the_notes_name_what_stays_dense_and_why():
    """ConvNeXt's layer-scale parameters were called 'attention projections, embeddings'; a stem kept
    whole (squeezenet's, ViT's patch embedding) moved the density from 0.1 to 0.117-0.136 unsaid."""
    import torch
    from torch import nn

    import ssvi_cli as ssvi
    from ssvi_cli.core.allocation import kept_dense_note, stem_note

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.layer_scale = nn.Parameter(torch.ones(8, 1, 1))

        def forward(self, x):
            return self.conv(x) * self.layer_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Scaled(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 10, 10))
    ssvi.sparsify(model, 0.9)
    assert kept_dense_note(model).startswith("8 weights sit outside the layers ssvi makes sparse (8 in Scaled: ")
    total = sum(l.numel for _, l in sparse_layers(model))
    density = (216 + round(0.1 * (total - 216))) / total  # the stem whole, the rest at about 0.1
    note = stem_note(model, 0.9)
    assert note.startswith("the first conv, 0 (216 weights), stays dense (model.dense_stem), so the model's density is ")
    assert abs(float(note.split("density is ")[1].split(",")[0]) - density) < 2e-3
    assert stem_note(model, 0.0) == ""
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    ssvi.sparsify(plain, 0.9)
    assert stem_note(plain, 0.9) == "" and kept_dense_note(plain) == ""
