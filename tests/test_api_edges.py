"""The Python API at its edges: a loop that leaves the schedule (or never calls step()), a second
Subspace on one model, a forward through submodules only, a layer called twice in one forward,
unbatched and empty conv inputs, and arguments of the wrong type or value (one line naming the
argument, never a comparison error from deep inside)."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssvi_cli as ssvi
from ssvi_cli.core.modes import sampling


def mlp(sparsity: float = 0.7) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ssvi.sparsify(model, sparsity)
    return model


def data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)


def train_step(model, x, y) -> None:
    F.cross_entropy(model(x), y).backward()


def schedule_steps(model, subspace, optimizer, x, y, n: int) -> None:
    """``n`` steps of the loop the API page shows."""
    for _ in range(n):
        train_step(model, x, y)
        subspace.step()
        optimizer.zero_grad()


def test_a_loop_that_steps_the_optimizer_itself_trains_mu_and_skips_that_remove_and_add_step(caplog):
    # Early stopping at a step whose forward captured the dense gradient, then plain fine-tuning:
    # the capture must not outlive that step, or mu would never receive a gradient again.
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=400, delta_t=100)
    schedule_steps(model, subspace, optimizer, x, y, 100)
    layer = model[0]
    idx, before = layer.idx.clone(), layer.mu.detach().clone()
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        for _ in range(3):
            train_step(model, x, y)  # the first is remove-and-add step 100's forward: it captures
            changed = layer.mu.detach().clone()
            optimizer.step()
            assert not torch.equal(changed, layer.mu.detach())  # every one of them trains mu
            optimizer.zero_grad()
            assert not layer.capture_dense_grad
    assert caplog.text.count("ran outside Subspace.step()") == 1 and "remove-and-add step 100: that step is skipped" in caplog.text
    assert torch.equal(idx, layer.idx) and not torch.equal(before, layer.mu.detach())
    moved = []  # back to the schedule: step 100 is a plain step, 200 moves the support
    for _ in range(101):
        train_step(model, x, y)
        moved.append(subspace.step())
        optimizer.zero_grad()
    assert [i for i, m in enumerate(moved) if m] == [100] and subspace.t == 201


def test_steps_past_total_steps_are_plain_and_told_once(caplog):
    """total_steps=len(loader) for a run of several epochs moved the support in the first epoch only,
    silently."""
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=10)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        schedule_steps(model, subspace, optimizer, x, y, 40)
        assert caplog.text == ""
        idx = model[0].idx.clone()
        schedule_steps(model, subspace, optimizer, x, y, 30)
    assert caplog.text.count("Subspace.step() call 41 is past total_steps=40: the remove-and-add steps were spaced for "
                             "40 steps and ended at step 30; pass the run's whole length (len(loader) * epochs)") == 1
    assert torch.equal(idx, model[0].idx) and subspace.t == 70
    caplog.clear()  # a schedule resumed past its end says so too, once
    again = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=10)
    again.load_state_dict(subspace.state_dict())
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        schedule_steps(model, again, optimizer, x, y, 3)
    assert caplog.text.count("Subspace.step() call 71 is past total_steps=40") == 1


def test_a_loop_that_never_calls_step_is_told_once(caplog):
    # optimizer.step() where subspace.step() belongs: the schedule would stay at step 0 silently.
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=100, delta_t=10)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        for _ in range(25):
            train_step(model, x, y)
            optimizer.step()
            optimizer.zero_grad()
    assert caplog.text.count("optimizer.step() ran 10 times since the last Subspace.step(): the schedule stays at "
                             "step 0") == 1 and subspace.t == 0


def test_a_step_whose_forward_called_only_submodules_says_to_call_the_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(64, 32), nn.Linear(32, 10)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model, (x, y) = Net(), data()
    ssvi.sparsify(model, 0.7)
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=10, delta_t=2)
    with pytest.raises(RuntimeError, match=r"ran no forward since the last step; call that model \(model\(x\)\), "
                                           "not its submodules"):
        for _ in range(3):
            F.cross_entropy(model.head(torch.relu(model.body(x))), y).backward()
            subspace.step()
            optimizer.zero_grad()
    assert subspace.t == 2


def test_a_subspace_whose_model_was_made_again_says_so_at_its_first_step(caplog):
    """A notebook's model and optimizer cells run again, the Subspace cell not: subspace.step() stepped the old
    optimizer on the old model, and the new model trained not at all, without a word until the first
    remove-and-add step (never, in a run shorter than delta_t)."""
    (x, y) = data()
    old = mlp()
    subspace = ssvi.Subspace(old, torch.optim.SGD(ssvi.param_groups(old, lr=0.1, lr_sigma=0.01)), total_steps=100,
                             delta_t=50)
    model = mlp()  # the cells run again
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        for _ in range(3):
            train_step(model, x, y)
            subspace.step()
            optimizer.zero_grad()
    assert caplog.text.count("Subspace.step() after no forward of the model this Subspace was given: the step goes "
                             "to that model's optimizer; a model made again needs its own optimizer and Subspace") == 1
    caplog.clear()
    subspace = ssvi.Subspace(model, optimizer, total_steps=100, delta_t=50)  # the right one: nothing said
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        for _ in range(3):
            train_step(model, x, y)
            subspace.step()
            optimizer.zero_grad()
    assert caplog.text == ""


def test_mu_gets_its_gradient_from_a_capture_forward_as_from_any_other():
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=2)
    subspace.t = 4  # a remove-and-add step: its forward captures
    torch.manual_seed(1)  # the same LRT noise in both forwards
    train_step(model, x, y)
    assert model[0].capture_dense_grad
    reference = mlp()
    torch.manual_seed(1)
    train_step(reference, x, y)
    for name in ("mu", "rho", "bias"):
        torch.testing.assert_close(getattr(model[0], name).grad, getattr(reference[0], name).grad)
    subspace.remove()
    assert not model[0].capture_dense_grad and model[0].dense_grad is None
    with pytest.raises(RuntimeError, match="this Subspace was removed"):
        subspace.step()


def test_a_scaled_step_the_loop_takes_itself_after_a_capture_forward_is_unscaled():
    # fp16 recipe without subspace.step(scaler): the scaler unscales and checks mu's own gradient
    model, (x, y) = mlp(), data()
    reference = mlp()
    for net in (model, reference):
        optimizer = torch.optim.SGD(ssvi.param_groups(net, lr=0.1, lr_sigma=0.01))
        if net is model:
            subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=2)
            subspace.t = 4
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        torch.manual_seed(1)
        scaler.scale(F.cross_entropy(net(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.testing.assert_close(model[0].mu, reference[0].mu)


def test_two_models_with_one_optimizer_each_keep_their_schedule():
    a, b = mlp(), mlp()
    optimizer = torch.optim.SGD(ssvi.param_groups(a, 0.1, 0.01) + ssvi.param_groups(b, 0.1, 0.01))
    extra = optimizer.register_step_pre_hook(lambda *args: None)  # another hook after the Subspaces'
    sa = ssvi.Subspace(a, optimizer, total_steps=40, delta_t=2)
    sb = ssvi.Subspace(b, optimizer, total_steps=40, delta_t=2)
    extra.remove()
    x, y = data()
    for t in range(5):
        train_step(a, x, y)
        train_step(b, x, y)
        assert sa.step() == sb.step() == (t in (2, 4))
        optimizer.zero_grad()


def test_a_second_subspace_replaces_the_first(caplog):
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    old = ssvi.Subspace(model, optimizer, total_steps=400, delta_t=3)
    old.t = 2  # the old one would capture the next forward
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        new = ssvi.Subspace(model, optimizer, total_steps=400, delta_t=5)
    assert "already had a Subspace" in caplog.text and old._hooks == []
    with pytest.raises(RuntimeError, match="replaced by a newer Subspace"):
        old.step()
    moved = []
    for _ in range(11):
        before = model[0].mu.detach().clone()
        train_step(model, x, y)
        moved.append((new.step(), not torch.equal(before, model[0].mu.detach())))
        optimizer.zero_grad()
    assert [t for t, (update, _) in enumerate(moved) if update] == [5, 10]
    assert all(changed for _, changed in moved)  # mu trains on every step, updates included


def test_a_short_schedule_without_any_remove_and_add_step_says_so(caplog):
    model = mlp()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        ssvi.Subspace(model, optimizer, total_steps=87)  # t_end 65 < delta_t 100
    assert "no remove-and-add step fits" in caplog.text and "delta_t='auto'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        ssvi.Subspace(model, optimizer, total_steps=87, delta_t="auto")
    assert "no remove-and-add step fits" not in caplog.text


def test_training_forwards_in_eval_mode_are_warned_about_at_the_first_step_not_at_the_first_swap(caplog):
    # model.eval() for a validation pass and no model.train() after it: a common loop bug, which
    # otherwise shows only at the first remove-and-add step, delta_t steps later.
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=400, delta_t=100)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        for evaluated in (False, True, False):  # a validation forward between two training steps: no warning
            train_step(model, x, y)
            subspace.step()
            optimizer.zero_grad()
            if evaluated:
                model.eval()
                with torch.no_grad():
                    model(x)
                model.train()
        assert "eval() mode" not in caplog.text
        model.eval()
        for _ in range(2):
            train_step(model, x, y)
            subspace.step()
            optimizer.zero_grad()
    assert caplog.text.count("after forwards in eval() mode only") == 1 and subspace.t == 5
    model.zero_grad()
    train_step(model, x, y)  # what the warning says: in eval mode the layers still sample and sigma learns
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith("rho"))
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_a_state_dict_sets_the_support_sizes_of_a_structure_only_model():
    model, (x, _) = mlp(0.8), data()
    empty = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ssvi.sparsify(empty, 0.8, structure_only=True)
    empty.load_state_dict(model.state_dict())
    assert [empty[0].active, empty[2].active] == [model[0].active, model[2].active] != [0, 0]
    torch.testing.assert_close(ssvi.predict(empty, x, mode="mean").probs, ssvi.predict(model, x, mode="mean").probs)
    state = model.state_dict()
    state["0.idx"] = state["0.idx"].flip(0)  # not sorted: refused before anything is copied
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ssvi.sparsify(fresh, 0.8, structure_only=True)
    with pytest.raises(ValueError, match="0.idx: not a sorted set"):
        fresh.load_state_dict(state)


def test_a_structure_only_model_never_filled_is_refused_where_it_would_be_used(tmp_path):
    """A loop that forgot to fill a structure_only model trained only its biases (loss flat at 2.25),
    predicted uniform probabilities and saved an empty file, without a word."""
    (x, _) = data()
    empty = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ssvi.sparsify(empty, 0.8, structure_only=True)
    optimizer = torch.optim.Adam(ssvi.param_groups(empty, lr=0.01, lr_sigma=0.01))
    said = r"cannot {}: every sparse layer of the model is empty, as sparsify\(..., structure_only=True\) leaves them"
    with pytest.raises(ValueError, match=said.format("train it")):
        ssvi.Subspace(empty, optimizer, total_steps=10)
    with pytest.raises(ValueError, match=said.format("predict with it")):
        ssvi.predict(empty, x)
    with pytest.raises(ValueError, match=said.format("save it")):
        ssvi.save(empty, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    state = mlp(0.8).state_dict()
    empty.load_state_dict({k: v for k, v in state.items() if not k.startswith("2.")}, strict=False)
    with pytest.raises(ValueError, match=r"cannot predict with it: layer 2 of the model is empty, as sparsify"):
        ssvi.predict(empty, x)  # partly filled: the head's outputs were its bias alone
    empty.load_state_dict(state)  # filled: each works
    ssvi.Subspace(empty, torch.optim.Adam(ssvi.param_groups(empty, lr=0.01, lr_sigma=0.01)), total_steps=10)
    assert ssvi.predict(empty, x).probs.shape == (len(x), 10)
    assert ssvi.save(empty, tmp_path / "m.safetensors") > 0


def test_another_support_loaded_under_a_stepped_optimizer_is_one_clear_error():
    """A file or state dict of another density loaded into a model an optimizer has stepped resizes its
    layers; the optimizer's moments still hold the old support's entries. The next step says so, not
    torch's size mismatch from inside Adam; a new optimizer trains on."""
    model, (x, y) = mlp(0.7), data()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=100, delta_t=10)
    schedule_steps(model, subspace, optimizer, x, y, 3)
    model.load_state_dict(mlp(0.9).state_dict())
    train_step(model, x, y)
    for step in (subspace.step, optimizer.step):  # the schedule's step, and the loop's own
        with pytest.raises(ssvi.OptimizerStateError, match=r"0.mu holds 205 entries, its Adam state 'exp_avg' 614: the "
                           r"optimizer's state belongs to another support of the layer .* build the optimizer again"):
            step()
    # the other order: an optimizer state loaded without the model state saved with it
    saved = optimizer.state_dict()
    fresh = mlp(0.9)  # the saved model's support is another size
    resumed = torch.optim.Adam(ssvi.param_groups(fresh, lr=0.01, lr_sigma=0.01))
    resumed.load_state_dict(saved)
    subspace = ssvi.Subspace(fresh, resumed, total_steps=100, delta_t=10)
    train_step(fresh, x, y)
    with pytest.raises(ssvi.OptimizerStateError, match=r"or an optimizer state loaded without the model state saved "
                       r"with it\); build the optimizer again after loading, or load the model's and the optimizer's"):
        subspace.step()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=100, delta_t=10)
    before = model[0].mu.detach().clone()
    subspace.step()
    assert subspace.t == 1 and not torch.equal(before, model[0].mu.detach())


@pytest.mark.parametrize("load", ["file", "state_dict"])
def test_another_support_loaded_while_the_last_steps_loss_and_gradients_live_trains_on(tmp_path, load):
    """The usual loop still holds the last step's ``loss`` (its graph) and the layers' gradients when a
    model of another density is loaded into it: the next backward failed with torch's "invalid gradient
    ... got [32] but expected shape compatible with [96]" (autograd's accumulator of the old size,
    kept by that graph), or with a size mismatch adding to the old gradient. The resized layers start
    without both: their gradients are those of the loaded model, and a new optimizer trains on."""
    model, (x, y) = mlp(0.7), data()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()  # no zero_grad: the gradients stay
    other = mlp(0.9)
    if load == "file":
        ssvi.save(other, tmp_path / "m.safetensors")
        ssvi.load(tmp_path / "m.safetensors", model=model).train()
        ssvi.load(tmp_path / "m.safetensors", model=other).train()  # as saved: float32 values
    else:
        model.load_state_dict(other.state_dict())
    for net in (model, other):
        torch.manual_seed(1)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
    for mine, theirs in zip((model[0], model[2]), (other[0], other[2])):
        assert torch.equal(mine.idx, theirs.idx) and mine.mu.dtype == torch.float32
        for part in ("mu", "rho"):
            assert torch.equal(getattr(mine, part).grad, getattr(theirs, part).grad)
    before = model[0].mu.detach().clone()
    torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01)).step()
    assert not torch.equal(before, model[0].mu.detach())


def test_a_resize_asks_for_no_dtype_that_apples_gpu_lacks(monkeypatch):
    """A resized layer drops autograd's accumulator by taking data of another dtype for a moment: float64
    there, which Apple's GPU (MPS) refuses even for an empty tensor, so every sparsify on it would fail."""
    asked = []
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: asked.append(k.get("dtype")) or real(self, *a, **k))
    mlp(0.7)  # each layer's support grows from none to its size
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(torch.bfloat16)
    ssvi.sparsify(model, 0.7)
    assert asked and set(asked) <= {torch.float16, torch.float32}


@pytest.mark.parametrize("fused", [False, True])
def test_another_support_loaded_under_an_optimizer_of_a_plain_loop_is_refused_too(tmp_path, fused):
    """Without a Subspace the check was not made: torch's bare size mismatch from inside Adam, and a
    fused Adam stepped on, its moments of the old size (or crashed the process)."""
    model, (x, y) = mlp(0.5), data()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01), fused=fused)
    train_step(model, x, y)
    optimizer.step()
    ssvi.save(mlp(0.9), tmp_path / "m.safetensors")
    ssvi.load(tmp_path / "m.safetensors", model=model).train()
    optimizer.zero_grad()
    train_step(model, x, y)
    before = model[0].mu.detach().clone()
    with pytest.raises(ssvi.OptimizerStateError, match=r"^the mu of a sparse layer's \(32, 64\) weight holds 205 entries, "
                       r"its Adam state 'exp_avg' 1024: the optimizer's state belongs to another support"):
        optimizer.step()
    assert torch.equal(before, model[0].mu.detach())
    fresh = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01), fused=fused)
    fresh.step()  # built after the load: trains
    assert not torch.equal(before, model[0].mu.detach())


def test_a_subspace_is_resumed_from_its_state_dict_not_pickled_and_another_schedule_is_said(caplog, tmp_path):
    """A Subspace saved whole came back with hooks that do nothing: its first remove-and-add step after
    the load failed, blaming the loop's forward. It is refused when saved, saying what to save."""
    import copy
    import pickle

    model = mlp()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=20, delta_t=2)
    x, y = data()
    schedule_steps(model, subspace, optimizer, x, y, 3)
    for save in (lambda: torch.save({"model": model, "subspace": subspace}, tmp_path / "all.pt"),
                 lambda: pickle.dumps(subspace), lambda: copy.deepcopy(subspace)):
        with pytest.raises(TypeError, match=r"a Subspace is not pickled or copied .*save subspace.state_dict\(\)"):
            save()
    # the model and optimizer themselves still save whole (their hooks come back doing nothing)
    torch.save({"model": model, "optimizer": optimizer, "subspace": subspace.state_dict()}, tmp_path / "ok.pt")
    copy.deepcopy(model)
    # and such files written before the hook's class moved to core.hooks still load
    import ssvi_cli.api as api

    assert pickle.loads(pickle.dumps(api._Hook(None))).fn is None
    old = pickle.dumps(model._forward_hooks, protocol=0).replace(b"cssvi_cli.core.hooks\nHook\n", b"cssvi_cli.api\n_Hook\n")
    assert b"cssvi_cli.api\n_Hook" in old and all(h.fn is None for h in pickle.loads(old).values())
    state = subspace.state_dict()
    assert state == {"t": 3, "delta_t": 2, "t_end": 15}
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        ssvi.Subspace(model, optimizer, total_steps=20, delta_t=2).load_state_dict(state)
        assert "saved under" not in caplog.text
        ssvi.Subspace(model, optimizer, total_steps=40, delta_t=2).load_state_dict(state)
    assert "the Subspace state was saved under {'delta_t': 2, 't_end': 15}, this Subspace has {'delta_t': 2, " \
           "'t_end': 30} (was total_steps or delta_t the same?)" in caplog.text
    resumed = ssvi.Subspace(model, optimizer, total_steps=20, delta_t=2)
    resumed.load_state_dict({"t": 3})  # a state saved before it held the schedule
    assert resumed.t == 3


def test_a_loop_without_backward_is_asked_about_it_at_the_remove_and_add_step(caplog):
    """No layer has a gradient at a remove-and-add step: the warning asks about loss.backward(), not
    about layers the forward did not reach."""
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=100, delta_t=2)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli.api"):
        for _ in range(3):
            F.cross_entropy(model(x), y)  # the loss, never backpropagated
            subspace.step()
    assert subspace.last_report.unreached == ["0", "2"] and subspace.last_report.layers == []
    assert "Subspace step 2: 0, 2 got no gradient from this step's backward (was loss.backward() called before " \
           "subspace.step()?)" in caplog.text


def test_dense_first_conv_keeps_the_first_registered_conv_and_dense_names_another():
    class Net(nn.Module):  # registers its head before its stem
        def __init__(self):
            super().__init__()
            self.head, self.stem = nn.Conv2d(8, 10, 1), nn.Conv2d(1, 8, 3, padding=1)

        def forward(self, x):
            return self.head(torch.relu(self.stem(x))).mean((2, 3))

    net = Net()
    ssvi.sparsify(net, 0.9)
    assert net.head.density == 1.0 and net.stem.density < 1.0
    net = Net()
    ssvi.sparsify(net, 0.9, dense_first_conv=False, dense="stem")
    assert net.stem.density == 1.0 and net.head.density < 1.0


class Shared(nn.Module):
    """f(x) - f(x) + b: the same for every weight draw, if each draw is one draw of theta."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(64, 10)
        self.b = nn.Parameter(torch.randn(10))

    def forward(self, x):
        return self.f(x) - self.f(x) + self.b


def test_a_layer_called_twice_in_one_forward_uses_one_draw_per_monte_carlo_sample():
    torch.manual_seed(0)
    model = Shared()
    ssvi.sparsify(model, 0.5, moped_delta=0.5)
    x, _ = data()
    out = ssvi.predict(model, x[:4], samples=20)
    assert float(out.mutual_information.max()) < 1e-9
    torch.testing.assert_close(out.probs[0].float(), torch.softmax(model.b.detach(), 0), atol=1e-5, rtol=0)


def test_a_sparse_conv_takes_an_unbatched_image_and_an_empty_batch():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    images = [torch.randn(3, 8, 8), torch.randn(3, 5, 4)]  # H == out_channels, and not
    expected = [conv(x) for x in images]
    ssvi.sparsify(conv, 0.0, dense_first_conv=False)
    with sampling(conv, "mean"):
        for x, ref in zip(images, expected):
            torch.testing.assert_close(conv(x), ref, atol=1e-6, rtol=0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.Conv2d(32, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 36, 10))
    ssvi.sparsify(model, 0.95, kernel="sparse")  # the 1x1 conv's matrix product and the 3x3's unfold
    assert model(torch.zeros(0, 1, 8, 8)).shape == (0, 10)
    assert ssvi.predict(model, torch.zeros(0, 1, 8, 8), samples=2).probs.shape == (0, 10)


def test_the_highest_sparsity_an_error_suggests_is_accepted():
    report = ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.9375)
    assert "0.0625" in str(report)  # one weight of 16


def test_without_a_generator_torch_manual_seed_decides_the_draws_and_a_bad_one_changes_nothing():
    def converted(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 64))
        ssvi.sparsify(model, 0.8, from_weights=False)
        return model

    one, again, other = converted(1), converted(1), converted(2)
    assert torch.equal(one[0].idx, again[0].idx) and torch.equal(one[0].mu, again[0].mu)  # reproducible
    assert not torch.equal(one[0].idx, other[0].idx)  # another seed, another support
    model = nn.Sequential(nn.Linear(16, 64))
    with pytest.raises(TypeError, match=r"generator=5: give a torch.Generator"):
        ssvi.sparsify(model, 0.5, generator=5, from_weights=False)
    assert isinstance(model[0], nn.Linear)  # refused before any layer was replaced: a retry works
    ssvi.sparsify(model, 0.5, generator=torch.Generator().manual_seed(5), from_weights=False)


def test_converted_layers_keep_nn_geometry_names_for_code_that_reads_them():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    ssvi.sparsify(net, 0.5, dense_first_conv=False)
    conv, fc = net[0], net[2]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 8, (3, 3))
    assert (fc.in_features, fc.out_features) == (128, 10)
    net[2] = nn.Linear(net[2].in_features, 4)  # a new head, as one writes it for nn.Linear
    assert net(torch.randn(2, 3, 4, 4)).shape == (2, 4)
    # .weight, which code written for nn.Linear reads (a tied decoder, say), is not there, and says so
    with pytest.raises(AttributeError, match=r"SparseConv2d has no dense \.weight: its weights are mu \(and rho\) at the "
                                             r"positions idx \(layer.to_dense\(layer.mu\) is the dense posterior mean\); "
                                             r"a module that reads a layer's .weight itself needs the layer left as it is, "
                                             r"sparsify\(..., exclude=\[NAME\]\)"):
        conv.weight
    assert not hasattr(conv, "weight") and conv.to_dense(conv.mu).shape == (8, 3, 3, 3)
    with pytest.raises(AttributeError, match="has no attribute 'weights'"):
        conv.weights
    conv.register_buffer("weight", torch.ones(2))  # one a user registers is found, not hidden by the hint
    assert torch.equal(conv.weight, torch.ones(2))


def sparse_kernel_linear() -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 32))
    ssvi.sparsify(model, 0.9, kernel="sparse")
    return model


@pytest.mark.parametrize("call, error, text", [
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), "abc"), TypeError, "sparsity must be a number"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, moped_delta=-1.0), ValueError, "moped_delta=-1.0"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, moped_delta=0.0), ValueError, "moped_delta=0.0"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, moped_delta=0.1, from_weights=False), ValueError,
     "moped_delta sets sigma from the trained weights"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.999999), ValueError,
     r"sparsity 0.999999 leaves layer 0 \(16 weights\) with no active weight; use a lower sparsity \(at most 0.9375"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.96875), ValueError, r"at most 0.9375: one weight"),
    (lambda m, o: sparse_kernel_linear()(torch.zeros(2, 21)), RuntimeError,
     r"mat1 and mat2 shapes cannot be multiplied \(2x21 and 64x32\)"),  # nn.Linear's words, not transposed
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, sigma_mean=-1.0), ValueError, "sigma_mean=-1.0"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, sigma_std=-5e-4), ValueError, "sigma_std"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.LSTM(4, 4)), 0.5), ValueError, "no Linear, Conv2d or Conv1d layer"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, dense=2), TypeError,
     r"dense=2: give module-name patterns, one string or several"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, deterministic=True), TypeError,
     r"deterministic=True: give module-name patterns"),
    (lambda m, o: ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, bayesian="no"), TypeError,
     r"bayesian='no': give True or False"),
    (lambda m, o: ssvi.sparsify([nn.Linear(4, 4)], 0.5), TypeError, "sparsify converts an nn.Module, not a list"),
    (lambda m, o: ssvi.Subspace(m, None, 10), TypeError, "torch.optim optimizer"),
    (lambda m, o: ssvi.Subspace(o, m, 10), TypeError, "nn.Module"),
    (lambda m, o: ssvi.Subspace(m, o, "10"), TypeError, "total_steps must be an int"),
    (lambda m, o: ssvi.Subspace(m, o, 2.5), TypeError, "total_steps must be an int"),
    (lambda m, o: ssvi.Subspace(m, o, True), TypeError, "total_steps must be an int"),
    (lambda m, o: ssvi.Subspace(m, o, 100, alpha="0.3"), TypeError, "alpha must be a number"),
    (lambda m, o: ssvi.Subspace(m, o, 100, delta_t=2.5), TypeError, "delta_t must be an int"),
    (lambda m, o: ssvi.Subspace(m, o, 100, addition="accumulate:2"), ValueError, "accumulate:N is ssvi train's"),
    (lambda m, o: ssvi.kl_term(m, n_train="10"), TypeError, "n_train must be an int"),
    (lambda m, o: ssvi.kl_term(m, n_train=10, beta="a"), TypeError, "beta must be a number"),
    (lambda m, o: ssvi.kl_term(m, n_train=10, prior_sigma=float("inf")), ValueError, "prior_sigma=inf"),
    (lambda m, o: ssvi.predict(m, torch.randn(64)), ValueError, r"x.unsqueeze\(0\)"),
    (lambda m, o: ssvi.predict(m, torch.randn(2, 5, 64), mode="mean"), ValueError, r"shape \(2, 5, 10\)"),
    (lambda m, o: ssvi.predict(m, torch.randn(2, 5, 64)), ValueError, r"shape \(2, 5, 10\)"),
    (lambda m, o: ssvi.predict(m, np.zeros((2, 64), np.float32)), TypeError, "torch.as_tensor"),
    (lambda m, o: ssvi.predict(m, torch.randn(2, 64), samples=2.5), TypeError, "samples must be an int"),
    (lambda m, o: ssvi.param_groups(m, 0.1, -1.0), ValueError, "lr_sigma=-1.0"),
    (lambda m, o: ssvi.param_groups(m, "0.1", 0.1), TypeError, "lr must be a number"),
    (lambda m, o: ssvi.param_groups(m, torch.tensor([0.1, 0.2]), 0.1), TypeError, "lr must be a number"),
    (lambda m, o: ssvi.param_groups(nn.Linear(4, 2), 0.1, 0.1), ValueError, "convert it with ssvi_cli.sparsify first"),
    (lambda m, o: ssvi.Subspace(m, o, 100).load_state_dict({"t": "x"}), TypeError, "the state's t must be an int"),
    (lambda m, o: ssvi.Subspace(m, o, 100).load_state_dict({"t": -1}), ValueError, "a step count, got -1"),
    (lambda m, o: ssvi.Subspace(m, o, 100).load_state_dict({}), ValueError,
     r"^a dict is no Subspace state: pass what subspace.state_dict\(\) returned"),
    (lambda m, o: ssvi.Subspace(m, o, 100).load_state_dict(m.state_dict()), ValueError, "is no Subspace state"),
    (lambda m, o: ssvi.Subspace(m, o, 100).load_state_dict({0: 1, "a": 2}), ValueError, r"^a dict of keys \['0', 'a'\] is no"),
])
def test_wrong_arguments_are_one_line_naming_the_argument(call, error, text):
    model = mlp()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.01))
    with pytest.raises(error, match=text):
        call(model, optimizer)


def test_numpy_numbers_are_numbers():
    model = mlp()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=np.float32(0.1), lr_sigma=np.float64(0.01)))
    ssvi.Subspace(model, optimizer, total_steps=np.int64(200), delta_t=np.int32(50))
    assert float(ssvi.kl_term(model, n_train=np.int64(10), beta=np.float32(0.5)).detach()) > 0
    ssvi.sparsify(nn.Sequential(nn.Linear(4, 4)), np.float64(0.5))
    # one-element tensors: a learning rate kept in a tensor, an annealed KL weight
    torch.optim.SGD(ssvi.param_groups(model, lr=torch.tensor(0.1), lr_sigma=torch.tensor(0.01)))
    assert float(ssvi.kl_term(model, n_train=10, beta=torch.tensor(0.5)).detach()) > 0
    assert ssvi.predict(model, torch.randn(2, 64), samples=None, mode="mean").samples is None


def test_an_optimizer_state_of_another_support_loaded_into_a_clean_optimizer_is_refused_at_its_step():
    # found clean at its first step, the optimizer was not looked at again after its own state was loaded
    model, (x, y) = mlp(0.9), data()
    other = mlp(0.5)
    other_opt = torch.optim.Adam(ssvi.param_groups(other, lr=0.01, lr_sigma=0.01))
    train_step(other, x, y)
    other_opt.step()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    train_step(model, x, y)
    optimizer.step()  # clean
    optimizer.load_state_dict(other_opt.state_dict())  # moments of the 0.5 model's supports
    optimizer.zero_grad()
    train_step(model, x, y)
    with pytest.raises(ssvi.OptimizerStateError, match=r"holds 205 entries, its Adam state 'exp_avg' 1024"):
        optimizer.step()


def lbfgs_closure(optimizer, model, x, y):
    """The loss closure LBFGS's step calls."""
    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_lbfgs_in_a_plain_loop_is_not_taken_for_a_stale_optimizer(tmp_path):
    # LBFGS keeps one flat direction over all parameters under its first, a sparse mu: the state check
    # read it as moments of another support once anything made it look again (another model converted,
    # the optimizer's own state loaded for a resume)
    model, (x, y) = mlp(0.5), data()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    closure = lbfgs_closure(optimizer, model, x, y)
    for _ in range(2):
        optimizer.step(closure)
    mlp(0.9)  # another model converted: every optimizer is looked at again
    optimizer.step(closure)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = mlp(0.5)
    resumed.load_state_dict(saved["model"])
    again = torch.optim.LBFGS(resumed.parameters(), lr=0.1, max_iter=3)
    again.load_state_dict(saved["optimizer"])
    again.step(lbfgs_closure(again, resumed, x, y))


def test_stale_moments_as_long_as_all_parameters_and_an_lbfgs_over_moved_supports_are_refused():
    """The LBFGS exemption (a state as long as all the parameters) let any optimizer's stale moments of
    that length through (a fused Adam stepped on), and missed LBFGS after supports moved at the same total."""
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))

    def layer(sparsity: float, allocation: str = "uniform") -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 10))
        ssvi.sparsify(model, sparsity, allocation=allocation)
        return model

    model = layer(0.55)  # 90 entries; at 0.8, 40 + 40 (mu, rho) + 10 (bias) = 90 parameters in all
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.load_state_dict(layer(0.8).state_dict())
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ssvi.OptimizerStateError, match=r"holds 40 entries, its Adam state 'exp_avg' 90"):
        optimizer.step()

    model, (x, y) = mlp(0.5), data()
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    closure = lbfgs_closure(lbfgs, model, x, y)
    lbfgs.step(closure)
    torch.manual_seed(0)
    erk = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ssvi.sparsify(erk, 0.5, allocation="erk")  # the same total, other layer sizes
    assert sum(p.numel() for p in erk.parameters()) == sum(p.numel() for p in model.parameters())
    model.load_state_dict(erk.state_dict())
    with pytest.raises(ssvi.OptimizerStateError, match=r"this LBFGS's direction and history are of its parameters "
                                                       r"before a sparse layer changed size"):
        lbfgs.step(closure)


def test_the_scale_after_a_remove_and_add_step_follows_that_steps_own_overflow_alone():
    """subspace.step(scaler) backed off on the scaler's own inf checks, each rank's unaveraged gradients
    under DDP (a capture step's are not synchronised): one rank's overflow in a layer kept dense halved
    its scale alone, and the ranks' parameters parted. The step's own, rank-agreed overflow decides."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    ssvi.sparsify(model, 0.5)  # the stem conv stays dense: no remove-and-add step looks at it
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01), lr=0.01)
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):  # steps 0 and 1 plain, step 2 the remove-and-add step
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if subspace.t == 2:  # the remove-and-add step: an inf in the dense stem alone
            model[0].mu.grad[0] = float("inf")
        swapped = subspace.step(scaler)
    assert swapped and not subspace.last_report.skipped and scaler.get_scale() == 1024.0


@pytest.mark.parametrize("whose, shown", [("user", 1), ("ours", 0)])
def test_importing_ssvi_leaves_the_users_warnings_as_they_were(whose, shown):
    """import ssvi_cli hid torch's CSR beta warning from the user's own sparse tensors (a process-wide filter);
    it is hidden from ssvi's own products alone. A process each: torch gives that warning once per process."""
    import subprocess
    import sys

    code = ("import torch, ssvi_cli as ssvi\n"
            "m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))\n"
            "ssvi.sparsify(m, 0.98)\n"
            "if WHOSE == 'user':\n    torch.randn(3, 3).to_sparse_csr()\n"
            "else:\n    m(torch.randn(4, 64)).sum().backward()\n").replace("WHOSE", repr(whose))
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.count("Sparse CSR tensor support is in beta state") == shown, done.stderr


def test_predicted_probabilities_are_contiguous_in_either_mode():
    """mode="mean" gave a transposed view, whose .view(-1) raised; "mc" a contiguous tensor."""
    model, (x, _) = mlp(), data()
    for mode in ("mean", "mc"):
        probs = ssvi.predict(model, x, samples=3, mode=mode).probs
        assert probs.is_contiguous() and probs.view(-1).shape == (32 * 10,), mode


def test_predict_refuses_a_model_of_one_output_and_points_to_sampling():
    """A regression head's softmax is 1 for every input: predict gave probabilities 1, entropy and MI 0
    ("certain") with no word; its draws are taken with ssvi.sampling."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    ssvi.sparsify(head, 0.5)
    x = torch.randn(3, 1)
    for mode in ("mc", "mean"):
        with pytest.raises(ValueError, match=r"^the model has one output, .*ssvi\.sampling\(model\)"):
            ssvi.predict(head, x, samples=5, mode=mode)
    with ssvi.sampling(head), torch.no_grad():  # as the message says
        draws = torch.stack([head(x) for _ in range(30)])
    assert draws.shape == (30, 3, 1) and float(draws.std(0).mean()) > 0
    two = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 2))  # two classes: still a classifier
    ssvi.sparsify(two, 0.5)
    assert ssvi.predict(two, x, samples=5).probs.shape == (3, 2)


def test_predict_says_what_is_wrong_with_the_inputs_it_is_given():
    """One example, a list of numbers and an input holding NaN were torch's errors of the model's code
    ("Dimension out of range", "'list' object has no attribute 'flatten'") or blamed the weights."""
    from ssvi_cli import config
    from ssvi_cli.training.plan import init_model, load_data, make_model

    cfg = config.from_preset("digits_mlp", {"sparse.sparsity": 0.95, "data.max_train": 64})
    mlp = make_model(cfg, load_data(cfg).spec)  # ssvi's own MLP: its forward flattens a batch
    init_model(mlp, cfg, torch.Generator().manual_seed(0))
    seq = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    ssvi.sparsify(seq, sparsity=0.5)
    nan = torch.rand(3, 64)
    nan[2, 5] = float("nan")
    for model in (mlp, seq):
        with pytest.raises((ValueError,), match=r"x.unsqueeze\(0\)"):
            ssvi.predict(model, torch.rand(64), samples=2)
        with pytest.raises(TypeError, match=r"x is a list of numbers; pass a tensor batch, torch.tensor\(x, dtype=torch.float32\)"):
            ssvi.predict(model, [[0.0] * 64] * 2, samples=2)
        with pytest.raises(ValueError, match="the input at index 2 of x holds NaN or inf"):
            ssvi.predict(model, nan, samples=2)
        assert ssvi.predict(model, torch.rand(2, 64), samples=2).probs.shape == (2, 10)
    with pytest.raises(ValueError, match="one example: pass a batch"):  # the MLP's own error, said so
        ssvi.predict(mlp, torch.rand(64), samples=2)
    with torch.no_grad():
        seq[0].mu.mul_(1e30)  # a diverged model: finite inputs, outputs that are not
    with pytest.raises(ValueError, match="its weights or these inputs overflow float32"):
        ssvi.predict(seq, torch.full((2, 64), 1e10), samples=2)


def test_outputs_that_are_not_finite_past_the_inputs_are_the_models():
    """More output rows than inputs (per-token logits, flattened): the check of the inputs for NaN
    indexed past them ("index 2 is out of bounds") instead of saying the outputs are not finite."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.head(x)
            return torch.cat([out, out * float("inf")])  # the second half of the rows diverged

    model = Tokens()
    ssvi.sparsify(model, sparsity=0.5)
    with pytest.raises(ValueError, match="first for the input at index 2"):
        ssvi.predict(model, torch.rand(2, 4), samples=2)


def test_steps_count_from_zero_so_the_first_remove_and_add_step_is_the_call_at_t_delta_t():
    """As API.md says: with delta_t=2 the third call (t = 2) is the first remove-and-add step, then
    every second one until t_end * total_steps; subspace.t is the number of steps taken."""
    model, (x, y) = mlp(0.7), data()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=10, delta_t=2, t_end=0.75)
    said = []
    for _ in range(10):
        train_step(model, x, y)
        said.append(subspace.step())
        optimizer.zero_grad()
    assert said == [False, False, True, False, True, False, True, False, False, False]  # t = 2, 4, 6 < 7.5
    assert subspace.t == 10


def test_a_wrong_argument_is_a_type_error_that_names_it(tmp_path):
    """None for the model gave named_modules' AttributeError, step(optimizer) a TypeError from inside
    torch (and a wrong warning at the next step), a numpy scalar for mean= or an int class name a
    bare TypeError of iteration."""
    model = mlp()
    x, y = data()
    for call in (lambda: ssvi.predict(None, x), lambda: ssvi.kl_term(None, 10), lambda: ssvi.param_groups(None, 0.1, 0.1),
                 lambda: ssvi.save(None, tmp_path / "m.safetensors")):
        with pytest.raises(TypeError, match="^give the model, an nn.Module converted by ssvi_cli.sparsify; not a NoneType$"):
            call()
    with pytest.raises(TypeError, match="^x is None; pass a tensor batch$"):
        ssvi.predict(model, None)
    with pytest.raises(TypeError, match="^samples must be an int"):
        ssvi.predict(model, x, mode="mean", samples="x")
    assert type(ssvi.predict(model, x, samples=np.int64(2)).samples) is int
    optimizer = torch.optim.SGD(ssvi.param_groups(model, 0.01, 0.01), lr=0.01)
    subspace = ssvi.Subspace(model, optimizer, total_steps=100, delta_t=10)
    train_step(model, x, y)
    with pytest.raises(TypeError, match="^step\\(\\) takes mixed precision's GradScaler, or nothing; not a SGD$"):
        subspace.step(optimizer)
    assert subspace.t == 0 and not subspace.step() and subspace.t == 1  # the forward still counts: no warning
    path = tmp_path / "m.safetensors"
    ssvi.save(model, path, mean=np.float32(0.5), std=torch.tensor(0.25))
    assert ssvi.load(path, model=mlp()).ssvi_card.data.mean == (0.5,)
    ssvi.save(model, path, mean=torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1), std=[torch.tensor(0.5)] * 3)  # broadcast shape
    assert ssvi.load(path, model=mlp()).ssvi_card.data.std == (0.5, 0.5, 0.5)
    for kw, said in ((dict(mean="0.5", std="0.2"), "mean='0.5': give a number, or a sequence of numbers"),
                     (dict(mean=[[0.5]], std=[1.0]), r"mean=\[\[0.5\]\]: give a number"),
                     (dict(class_names=[str(i) for i in range(9)] + [None]), r"class_names holds None \(NoneType\)"),
                     (dict(class_names=list(range(10))), r"class_names holds 0 \(int\): give each output's name as a str")):
        with pytest.raises(TypeError, match=said):
            ssvi.save(model, path, **kw)


def test_a_ctrl_c_during_a_remove_and_add_step_takes_effect_once_the_step_is_done_whole(monkeypatch):
    """A notebook's Stop between a layer's optimizer state moving to its new support and the support
    itself changing left Adam's moments on the wrong entries, and the schedule at the same step, so a
    re-run cell did that step again: the step is done whole, then the KeyboardInterrupt is raised."""
    import os
    import signal

    from ssvi_cli.core.layers import SparseGaussian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    ssvi.sparsify(model, 0.5)
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=1e-2, lr_sigma=1e-2))
    subspace = ssvi.Subspace(model, optimizer, total_steps=100, delta_t=2, t_end=1.0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))

    def forward_backward() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()

    while not subspace.schedule.is_update(subspace.t):
        forward_backward()
        subspace.step()
    forward_backward()
    layers = [model[0], model[2]]
    before = [(layer.idx.clone(), optimizer.state[layer.mu]["exp_avg"].clone()) for layer in layers]
    original, calls = SparseGaussian.set_support, []

    def set_support_after_ctrl_c(self, *args, **kwargs):  # the moments have moved; the support not yet
        calls.append(self)
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SparseGaussian, "set_support", set_support_after_ctrl_c)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # a notebook's, whatever pytest's is
    try:
        t = subspace.t
        with pytest.raises(KeyboardInterrupt):
            subspace.step()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, handler)
    assert calls == layers and subspace.t == t + 1 and subspace.last_report.step == t
    for layer, (idx, moment) in zip(layers, before):
        assert not torch.equal(layer.idx, idx)
        kept = torch.isin(layer.idx, idx)
        new_moment = optimizer.state[layer.mu]["exp_avg"]
        torch.testing.assert_close(new_moment[kept], moment[torch.isin(idx, layer.idx)])  # both sorted by index
        assert (new_moment[~kept] == 0).all()


def test_reports_shown_as_a_cells_value_are_one_short_line():
    """A notebook shows a cell's last value by its repr: the dataclasses' own printed every layer on
    one line (2,807 characters for a ResNet-18's conversion report)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.unused = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), nn.Embedding(4, 2)

        def forward(self, x):
            return self.body(x)

    model = Net()
    report = ssvi.sparsify(model, 0.5)
    assert repr(report) == ("ConversionReport(2 layers converted, density 0.5000 over 176 weights, 1 kept as it is; "
                            "print() it for the table)")
    assert str(report).splitlines()[0].split() == ["layer", "kind", "shape", "active", "/", "total", "density", "posterior"]
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.1))
    subspace = ssvi.Subspace(model, optimizer, total_steps=10, delta_t=2, t_end=1.0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    while subspace.last_report is None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        subspace.step()
    shown = repr(subspace.last_report)
    assert shown.startswith("SwapReport(step=2, fraction=0.") and shown.endswith(" in 2 layers, skipped=False, unreached=[])")
    assert len(subspace.last_report.layers) == 2


def test_a_subspace_made_after_the_api_module_is_reloaded_still_replaces_the_old_one():
    """importlib.reload(ssvi_cli.api) (an autoreload of an edited ssvi) emptied the record of the
    models' Subspaces: a new one left the old one's hooks on the model, its layers capturing dense
    gradients at every forward from then on. Run apart: a reload would change the classes other
    tests in this process use."""
    import subprocess
    import sys

    script = """
import importlib, logging, torch
from torch import nn
import ssvi_cli as ssvi
import ssvi_cli.api
logging.basicConfig(level=logging.WARNING, format="%(message)s")
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
ssvi.sparsify(model, 0.5)
old = ssvi.Subspace(model, torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.1)), total_steps=10, delta_t=2)
importlib.reload(ssvi_cli.api)
new = ssvi_cli.api.Subspace(model, torch.optim.SGD(ssvi.param_groups(model, lr=0.1, lr_sigma=0.1)), total_steps=10, delta_t=2)
print(old._removed, len(model._forward_pre_hooks), len(model._forward_hooks))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1", "1"]
    assert "this model already had a Subspace: the new one replaces it" in done.stderr


def test_a_ctrl_c_held_through_a_block_that_then_fails_is_raised_with_the_failure_as_its_context():
    """The Ctrl-C came first: it is not lost to the block's own exception, which stays its context."""
    import os
    import signal

    from ssvi_cli.interrupts import uninterrupted

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                raise RuntimeError("the step failed")
        assert isinstance(caught.value.__context__, RuntimeError)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(RuntimeError, match="the step failed"):  # without a Ctrl-C, the block's own
            with uninterrupted():
                raise RuntimeError("the step failed")
    finally:
        signal.signal(signal.SIGINT, handler)


def test_an_optimizer_wrapper_is_refused_naming_the_optimizer_it_wraps():
    """Accelerate's AcceleratedOptimizer wraps a torch optimizer: the refusal said its state could not
    be reset and to use Adam or SGD, where passing the wrapped one (.optimizer) works."""

    class Wrapper(torch.optim.Optimizer):  # as Accelerate's: a torch Optimizer holding the real one
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        @property
        def state(self):
            return self.optimizer.state

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    ssvi.sparsify(model, 0.5)
    wrapper = Wrapper(torch.optim.Adam(ssvi.param_groups(model, lr=1e-2, lr_sigma=1e-2)))
    with pytest.raises(ssvi.OptimizerStateError, match=r"^Wrapper wraps torch.optim.Adam: give Subspace the optimizer it "
                       r"wraps \(its .optimizer\), and under gradient accumulation .* accelerator.sync_gradients is True"):
        ssvi.Subspace(model, wrapper, total_steps=10)
    assert ssvi.Subspace(model, wrapper.optimizer, total_steps=10).t == 0
