"""ssvi.sampling: a loop of the user's own draws whole networks (one weight draw per call of the
model), the mean network or training's local reparameterisation, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssvi_cli as ssvi
from ssvi_cli.core.layers import sparse_layers


class Twice(nn.Module):
    """One layer called twice in a forward (shared weights), then a head."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        a, b = self.shared(x), self.shared(x)
        return torch.cat([a, b], 1), self.head(a)


def _model(cls=Twice):
    torch.manual_seed(0)
    model = cls()
    ssvi.sparsify(model, 0.5, sigma_mean=0.5, sigma_std=0.0)
    return model


def test_sample_mode_is_one_weight_draw_per_call_shared_by_the_batch_and_by_a_layer_called_twice():
    model = _model()
    x = torch.randn(1, 6).repeat(4, 1)  # four copies of one input
    lrt, _ = model(x)
    assert not torch.allclose(lrt[0], lrt[1])  # outside: noise per example (training's reparameterisation)
    with torch.no_grad(), ssvi.sampling(model) as same:
        assert same is model
        out, _ = model(x)
        torch.testing.assert_close(out, out[:1].expand_as(out))  # one draw for the whole batch
        torch.testing.assert_close(out[:, :6], out[:, 6:])  # the shared layer: one draw for both calls
        again, _ = model(x)
        assert not torch.allclose(again, out)  # the next call draws afresh
        direct = [model.shared(x[:1]) for _ in range(2)]  # a layer called on its own draws at each call
        assert not torch.allclose(*direct)
    assert not model._forward_hooks and not model._forward_pre_hooks and not model.shared._forward_hooks
    assert {layer.mode for _, layer in sparse_layers(model)} == {"lrt"}


def test_mean_mode_is_the_mean_network_and_sample_mode_trains():
    model = _model()
    x = torch.randn(3, 6)
    with ssvi.sampling(model, "mean"):
        a, b = model(x)[0], model(x)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, :6], nn.functional.linear(x, model.shared.to_dense(model.shared.mu), model.shared.bias))
    with ssvi.sampling(model):
        model(x)[1].sum().backward()
    assert model.shared.mu.grad.abs().sum() > 0 and model.shared.rho.grad.abs().sum() > 0


def test_a_pre_hook_of_the_users_that_raises_leaves_the_next_call_one_draw():
    """Our leave hook ran after a user's pre-hook raised before our enter hook: the count of calls under
    way fell below zero, and from then on a layer called twice drew twice."""
    model = _model()

    def check(module, inputs):
        if inputs[0].shape[-1] != 6:
            raise ValueError("bad input width")

    model.register_forward_pre_hook(check)
    with torch.no_grad(), ssvi.sampling(model):
        with pytest.raises(ValueError, match="bad input width"):
            model(torch.randn(2, 5))
        out, _ = model(torch.randn(3, 6))
        torch.testing.assert_close(out[:, :6], out[:, 6:])


def test_the_mode_is_restored_when_the_block_raises():
    model = _model()
    with pytest.raises(RuntimeError, match="mat1 and mat2"), ssvi.sampling(model):
        model(torch.randn(2, 5))
    assert not model._forward_hooks and not model._forward_pre_hooks
    x = torch.randn(1, 6).repeat(2, 1)
    assert not torch.allclose(*model(x)[0])  # back to training's noise per example


@pytest.mark.parametrize("call, message", [
    (lambda m: ssvi.sampling(m, "draw"), "mode='draw'; valid modes are: lrt, mean, sample"),
    (lambda m: ssvi.sampling(m, "mc"), "mode='mc'; valid modes are: lrt, mean, sample; the Monte Carlo average of S "
                                       "draws is ssvi.predict(model, x, samples=S)"),
    (lambda m: ssvi.predict(m, torch.zeros(1, 6), mode="sample"), "mode must be one of mc, mean, got 'sample'; one "
                                                                  "network drawn at a time is with ssvi.sampling(model, 'sample'): model(x)"),
    (lambda m: ssvi.sampling(nn.Linear(2, 2)), "no sparse layer: convert it with ssvi.sparsify"),
    (lambda m: ssvi.sampling(m.state_dict()), "takes the converted nn.Module, not a OrderedDict"),
])
def test_bad_arguments_are_refused_before_anything_changes(call, message):
    model = _model()
    with pytest.raises((ValueError, TypeError), match=message.replace("(", "\\(").replace(")", "\\)")):
        with call(model):
            pass


@pytest.mark.parametrize("mode", ["mean", "sample"])
def test_a_copy_made_inside_a_block_starts_outside_it_and_a_whole_model_saved_there_loads(mode):
    """A copy kept inside a block (the best model so far, during validation) stayed in the block's mode
    for good: the block restores the original's layers alone. Its hooks came along too, closures that
    torch.save could not pickle and that kept one draw for every later call of the copy."""
    import copy
    import io

    model = _model()
    x = torch.randn(4, 6)
    with ssvi.sampling(model, mode):
        copied = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # the test's own file
    for twin in (copied, loaded):
        assert {layer.mode for _, layer in sparse_layers(twin)} == {"lrt"}
        assert all(layer.forward_draw is None for _, layer in sparse_layers(twin))
        same = twin(x[:1].repeat(3, 1))[0]
        assert not torch.allclose(same[0], same[1])  # training's noise, per example
        with torch.no_grad(), ssvi.sampling(twin):
            assert not torch.allclose(twin(x)[0], twin(x)[0])  # a fresh draw at each call
        with ssvi.sampling(twin, "mean"):
            torch.testing.assert_close(twin(x)[0], twin(x)[0])


def test_torchscript_is_refused_in_words_and_exporting_the_mean_network_works():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ssvi.sparsify(model, 0.5)
    with pytest.raises(TypeError, match=r"torch.jit.script does not compile ssvi's sparse layers \(SparseLinear\); .*"
                                        r"torch.export.export the model inside ssvi.sampling\(model, 'mean'\)"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation of torch.jit.script
            torch.jit.script(model)
    x = torch.randn(2, 6)
    with torch.no_grad(), ssvi.sampling(model, "mean"):
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), model(x))
