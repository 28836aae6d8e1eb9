"""nn.MultiheadAttention split into four projection layers that sparsify converts: the split module
computes what torch's does, conversions and failures, training, and model files from before the
split (which kept the attention whole) and after it."""

from __future__ import annotations

import copy
import itertools
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ssvi_cli as ssvi
from ssvi_cli.core.attention import SplitMultiheadAttention
from ssvi_cli.core.layers import sparse_layers


def _sequences(batch_first: bool, length: int, dim: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)


@pytest.mark.parametrize("batch_first,bias,kv", list(itertools.product([False, True], [True, False], [None, (5, 7)])))
def test_the_split_module_computes_what_torchs_does(batch_first, bias, kv):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, bias=bias, kdim=kv and kv[0], vdim=kv and kv[1], batch_first=batch_first).eval()
    split = SplitMultiheadAttention.from_module(mha)
    q = _sequences(batch_first, 4, 8)
    k, v = _sequences(batch_first, 6, kv[0] if kv else 8), _sequences(batch_first, 6, kv[1] if kv else 8)
    padding = torch.rand(3, 6) < 0.3
    padding[:, 0] = False
    masks = [{}, {"key_padding_mask": padding}, {"attn_mask": padding[0].expand(4, 6).clone()},
             {"attn_mask": torch.randn(3 * 2, 4, 6)}, {"attn_mask": torch.randn(4, 6), "key_padding_mask": torch.randn(3, 6)}]
    for mask, need, average in itertools.product(masks, [True, False], [True, False]):
        want = mha(q, k, v, need_weights=need, average_attn_weights=average, **mask)
        got = split(q, k, v, need_weights=need, average_attn_weights=average, **mask)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
        if need:
            torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
        else:
            assert got[1] is None and want[1] is None


def test_one_unbatched_sequence_a_causal_mask_and_its_hint():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    split = SplitMultiheadAttention.from_module(mha)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for x in (torch.randn(5, 8), torch.randn(2, 5, 8)):
        for need in (True, False):
            want = mha(x, x, x, need_weights=need, attn_mask=causal, is_causal=True)
            got = split(x, x, x, need_weights=need, attn_mask=causal, is_causal=True)
            torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        split(x, x, x, is_causal=True)


class Classifier(nn.Module):
    """A two-layer transformer encoder over 6 tokens of 16 features, then a head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding).mean(1))


def test_sparsify_converts_the_attention_projections_and_computes_the_original_at_sparsity_0():
    """The packed in-projection and out_proj were kept dense and deterministic: a third of a ViT's
    weights outside the posterior."""
    torch.manual_seed(0)
    model = Classifier().eval()
    original = copy.deepcopy(model)
    report = ssvi.sparsify(model, 0.0)
    names = [layer.name for layer in report.layers]
    assert names[:6] == [f"encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")] + \
        ["encoder.layers.0.linear1", "encoder.layers.0.linear2"]
    assert report.kept == []
    x, padding = torch.randn(2, 6, 16), torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with ssvi.sampling(model, "mean"):  # in eval, with a padding mask: torch's nested-tensor path is left off
        torch.testing.assert_close(model(x, padding), original(x, padding), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(x), original(x), atol=1e-6, rtol=1e-5)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0), 1).eval()
    plain = copy.deepcopy(decoder)
    ssvi.sparsify(decoder, 0.0)
    tgt, memory = torch.randn(4, 2, 16), torch.randn(6, 2, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with ssvi.sampling(decoder, "mean"):
        torch.testing.assert_close(decoder(tgt, memory, tgt_mask=causal), plain(tgt, memory, tgt_mask=causal),
                                   atol=1e-6, rtol=1e-5)


def test_attention_it_cannot_split_is_kept_with_its_reason_and_a_failed_conversion_puts_it_back():
    model = nn.ModuleDict({"kv": nn.MultiheadAttention(8, 2, add_bias_kv=True), "hooked": nn.MultiheadAttention(8, 2),
                           "plain": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 2)})
    model["hooked"].register_forward_hook(lambda *args: None)  # attention maps for a figure, say
    report = ssvi.sparsify(model, 0.5)
    kept = dict(report.kept)
    assert kept["kv"] == "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not converted"
    assert kept["hooked"].startswith("nn.MultiheadAttention with hooks")
    assert kept["kv.out_proj"] == kept["hooked.out_proj"] == "nn.MultiheadAttention reads out_proj.weight directly"
    assert isinstance(model["plain"], SplitMultiheadAttention) and isinstance(model["hooked"], nn.MultiheadAttention)
    with pytest.raises(AttributeError, match="has no in_proj_weight: ssvi_cli.sparsify split nn.MultiheadAttention's "
                                             "in-projection into the layers q_proj, k_proj and v_proj"):
        model["plain"].in_proj_weight  # code that read the packed weight (an attention-map tool)

    again = nn.Sequential(nn.MultiheadAttention(8, 2))
    before = list(again[0].parameters())
    optimizer = torch.optim.SGD(again.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="exclude: 'nothing' matches no"):
        ssvi.sparsify(again, 0.5, exclude="nothing")
    assert type(again[0]) is nn.MultiheadAttention and list(again[0].parameters()) == before
    out, _ = again[0](*[torch.randn(3, 1, 8)] * 3)
    out.sum().backward()
    optimizer.step()  # its weights are the model's again: not refused as taken out


def test_a_transformer_trains_with_the_subspace_and_an_optimizer_made_before_is_refused():
    torch.manual_seed(0)
    model = Classifier()
    stale = torch.optim.Adam(model.parameters())
    ssvi.sparsify(model, 0.9)
    x, y = torch.randn(32, 6, 16), torch.randint(0, 3, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="sparsify"):
        stale.step()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    subspace = ssvi.Subspace(model, optimizer, total_steps=30, delta_t=5)
    before = {name: layer.idx.clone() for name, layer in sparse_layers(model)}
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y) + ssvi.kl_term(model, 1000)
        optimizer.zero_grad()
        loss.backward()
        subspace.step()
    assert not torch.equal(sparse_layers(model)[0][1].idx, before["encoder.layers.0.self_attn.q_proj"])


def _resave(path, meta_update: dict, drop_attention: bool = False) -> None:
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_update)
    if drop_attention:
        arch = json.loads(meta["architecture"])
        arch.pop("attention", None)
        meta["architecture"] = json.dumps(arch)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_files_with_the_attention_split_and_files_from_before_it_load(tmp_path):
    """A file is version 2 when its attention is split; one written before the split (its attention
    whole, its in-projection among the dense tensors) loads as it was saved."""
    torch.manual_seed(0)
    model = Classifier().eval()
    ssvi.sparsify(model, 0.8)
    ssvi.save(model, tmp_path / "new.safetensors", input_shape=(6, 16), class_names=["a", "b", "c"])
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        assert f.metadata()["version"] == "2"
    x = torch.randn(2, 6, 16)
    loaded = ssvi.load(tmp_path / "new.safetensors", model=Classifier())
    with ssvi.sampling(model, "mean"), ssvi.sampling(loaded, "mean"):
        torch.testing.assert_close(loaded(x), model(x))

    old = Classifier().eval()
    ssvi.sparsify(old, 0.8, _split_attention=False)  # as an ssvi before the split converted it
    ssvi.save(old, tmp_path / "old.safetensors", input_shape=(6, 16), class_names=["a", "b", "c"])
    _resave(tmp_path / "old.safetensors", {"version": "1"})
    loaded = ssvi.load(tmp_path / "old.safetensors", model=Classifier())
    attention = loaded.encoder.layers[0].self_attn
    assert type(attention) is nn.MultiheadAttention and "encoder.layers.0.linear1" in dict(sparse_layers(loaded))
    with ssvi.sampling(old, "mean"), ssvi.sampling(loaded, "mean"):
        torch.testing.assert_close(loaded(x), old(x))


def test_a_torchvision_card_says_whether_its_attention_is_split():
    from ssvi_cli.modelfile.card import Architecture
    from ssvi_cli.models import LayerFactory, torchvision_model

    new = Architecture("torchvision:vit_b_32", ())
    assert new.to_dict()["attention"] == "split" and Architecture.from_dict(new.to_dict()).split_attention
    old = {k: v for k, v in new.to_dict().items() if k != "attention"}  # a file from before the split
    assert not Architecture.from_dict(old).split_attention
    assert "attention" not in Architecture("mlp").to_dict() and Architecture.from_dict(Architecture("mlp").to_dict()).split_attention
    whole = torchvision_model("vit_b_32", (3, 224, 224), 3, LayerFactory(bayesian=True, split_attention=False))
    assert sum(type(m) is nn.MultiheadAttention for m in whole.modules()) == 12
    assert not any(isinstance(m, SplitMultiheadAttention) for m in whole.modules())


def test_from_a_review_an_unbiased_out_proj_wrong_shapes_and_names_of_the_attention_itself(tmp_path):
    """out_proj without a bias got uninitialised memory as one; wrong shapes failed in reshape's
    words; exclude= could not keep an attention whole; dense= naming one did not say its layers;
    an attention as the model itself had its out_proj converted; a pruned out_proj read as hooked."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    layer.self_attn.out_proj.bias = None
    model, x = nn.Sequential(layer).eval(), torch.randn(5, 2, 16)
    original = copy.deepcopy(model)
    ssvi.sparsify(model, 0.0)
    assert model[0].self_attn.out_proj.bias is None
    with ssvi.sampling(model, "mean"):
        torch.testing.assert_close(model(x), original(x), atol=1e-6, rtol=1e-5)

    mha = nn.MultiheadAttention(8, 2)
    split = SplitMultiheadAttention.from_module(mha)
    for args in [(torch.randn(3, 2, 8), torch.randn(4, 2, 8), torch.randn(5, 2, 8)),
                 (torch.randn(3, 2, 8), torch.randn(4, 8), torch.randn(4, 8)), (torch.randn(1, 3, 2, 8),) * 3,
                 (torch.randn(3, 2, 9),) * 3]:
        with pytest.raises(AssertionError) as torchs:
            mha(*args)
        with pytest.raises(AssertionError, match=re.escape(str(torchs.value))):
            split(*args)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0])

    net = Net()
    assert dict(ssvi.sparsify(net, 0.5, exclude="att").kept)["att"] == "exclude=" and type(net.att) is nn.MultiheadAttention
    with pytest.raises(ValueError, match=r"^dense: 'att' matches no .* but names the attention att, whose layers are "
                                         r"att.q_proj, .k_proj, .v_proj and .out_proj: 'att.\*' names them"):
        ssvi.sparsify(Net(), 0.5, dense="att")
    with pytest.raises(ValueError, match=r"no Linear, Conv2d or Conv1d layer that sparsify converts \(\(the model itself\)"):
        ssvi.sparsify(nn.MultiheadAttention(8, 2), 0.5)  # its out_proj was converted, and its forward then failed
    pruned = Net()
    prune.l1_unstructured(pruned.att.out_proj, "weight", 0.3)
    assert dict(ssvi.sparsify(pruned, 0.5).kept)["att"].startswith("nn.MultiheadAttention with a pruned")

    old = Net()
    ssvi.sparsify(old, 0.5, _split_attention=False)
    ssvi.save(old, tmp_path / "old.safetensors", input_shape=(4, 8), class_names=["a", "b"])
    converted = Net()
    ssvi.sparsify(converted, 0.5)
    with pytest.raises(ssvi.ModelFileError, match="lacks layer 'att.q_proj' .*: the file keeps that attention whole"):
        ssvi.load(tmp_path / "old.safetensors", model=converted)


def test_a_tied_or_hooked_attention_stays_whole_and_a_permanent_weight_norm_does_not_stop_the_split():
    """From a review: the split copied a weight another module shared (the tie was lost without a
    word), took an attention whose in_proj_weight had a post-accumulate-grad hook, and kept one whose
    out_proj's weight_norm had been made permanent as the refusal says."""
    from torch.nn.utils import parametrizations, parametrize

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att, self.proj, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 2)
            self.proj.weight = self.att.out_proj.weight

        def forward(self, x):
            return self.head(self.proj(self.att(x, x, x)[0]))

    tied = Tied()
    kept = dict(ssvi.sparsify(tied, 0.0).kept)
    assert kept["att"].startswith("nn.MultiheadAttention with a weight another module shares")
    assert kept["proj"].startswith("its weight is tied to att.out_proj")
    assert tied.proj.weight is tied.att.out_proj.weight
    hooked = nn.ModuleDict({"att": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 2)})
    hooked["att"].in_proj_weight.register_post_accumulate_grad_hook(lambda p: None)
    assert dict(ssvi.sparsify(hooked, 0.5).kept)["att"].startswith("nn.MultiheadAttention with hooks")
    normed = nn.ModuleDict({"att": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 2)})
    parametrizations.weight_norm(normed["att"].out_proj)
    parametrize.remove_parametrizations(normed["att"].out_proj, "weight")
    ssvi.sparsify(normed, 0.5)
    assert isinstance(normed["att"], SplitMultiheadAttention)


def _tiny_vit(monkeypatch):
    """torchvision's vit_b_32 builder made small (16 features, two blocks, 32-pixel images)."""
    import torchvision

    real = torchvision.models.get_model

    def get_model(name, **kwargs):
        if name != "vit_b_32":
            return real(name, **kwargs)
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=16, mlp_dim=32, num_classes=kwargs["num_classes"])

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    return lambda: get_model("vit_b_32", num_classes=3)


def test_a_torchvision_file_or_checkpoint_from_before_the_split_loads_and_saves_again_whole(monkeypatch, tmp_path):
    from ssvi_cli.modelfile import ModelCard, read_header, with_attention_of

    make = _tiny_vit(monkeypatch)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    old = make().eval()
    ssvi.sparsify(old, 0.8, _split_attention=False)  # converted as an ssvi before the split did
    ssvi.save(old, tmp_path / "old.safetensors", architecture="torchvision:vit_b_32", input_shape=(3, 32, 32))
    with safe_open(str(tmp_path / "old.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["version"] == "1" and "attention" not in json.loads(meta["architecture"])
    loaded = ssvi.load(tmp_path / "old.safetensors")
    assert any(type(m) is nn.MultiheadAttention for m in loaded.modules())
    ssvi.save(loaded, tmp_path / "again.safetensors")  # was refused: the check built the attention split
    again = ssvi.load(tmp_path / "again.safetensors")
    with ssvi.sampling(old, "mean"), ssvi.sampling(again, "mean"):
        torch.testing.assert_close(again(x), old(x))

    new = make().eval()
    ssvi.sparsify(new, 0.8)
    ssvi.save(new, tmp_path / "new.safetensors", architecture="torchvision:vit_b_32", input_shape=(3, 32, 32))
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["version"] == "2" and json.loads(meta["architecture"])["attention"] == "split"
    back = ssvi.load(tmp_path / "new.safetensors")
    with ssvi.sampling(new, "mean"), ssvi.sampling(back, "mean"):
        torch.testing.assert_close(back(x), new(x))

    card = ModelCard.from_metadata(read_header(tmp_path / "new.safetensors")["meta"])  # a checkpoint's: split, unless its state says
    assert with_attention_of(card, old.state_dict()).architecture.split_attention is False
    assert with_attention_of(card, new.state_dict()).architecture.split_attention is True
