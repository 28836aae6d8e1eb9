"""The public loop pieces: param_groups, kl_term, Subspace (schedule, exact counts, optimizer state,
resume, errors) and predict."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import ssvi_cli as ssvi
from ssvi_cli import config as C
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.training.plan import init_model, make_model
from ssvi_cli.data import get_spec


def small(method: str = "ssvi", sparsity: float = 0.8, seed: int = 0):
    cfg = C.apply_overrides(C.load_preset("digits_mlp"), {"sparse.method": method, "sparse.sparsity": sparsity,
                                                          "model.widths": [32]})
    model = make_model(cfg, get_spec("digits"))
    init_model(model, cfg, torch.Generator().manual_seed(seed))
    return model


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(n)]


def run(model, optimizer, subspace, data):
    moved = []
    for x, y in data:
        loss = F.cross_entropy(model(x), y) + ssvi.kl_term(model, n_train=100, beta=0.01, prior_sigma=0.1)
        loss.backward()
        moved.append(subspace.step())
        optimizer.zero_grad()
    return moved


def test_param_groups_put_rho_alone_without_weight_decay():
    model = small()
    mu, rho = ssvi.param_groups(model, lr=0.1, lr_sigma=0.2, weight_decay=5e-4)
    assert {id(l.rho) for _, l in sparse_layers(model)} == {id(p) for p in rho["params"]}
    assert rho["lr"] == 0.2 and rho["weight_decay"] == 0.0 and mu["weight_decay"] == 5e-4
    assert len(mu["params"]) + len(rho["params"]) == len(list(model.parameters()))
    assert len(ssvi.param_groups(small("rigl"), lr=0.1, lr_sigma=0.1)) == 1  # deterministic: no rho


def test_kl_term_is_the_layers_closed_form_over_n():
    model = small()
    expected = sum(float(l.kl(0.1).detach()) for _, l in sparse_layers(model)) * 0.5 / 100
    assert float(ssvi.kl_term(model, n_train=100, beta=0.5, prior_sigma=0.1).detach()) == pytest.approx(expected)
    assert float(ssvi.kl_term(small("rigl"), n_train=100)) == 0.0
    for bad in ({"n_train": 0}, {"n_train": -5}, {"n_train": 100, "beta": -1.0}, {"n_train": 100, "prior_sigma": 0.0}):
        with pytest.raises(ValueError, match="n_train=|beta="):
            ssvi.kl_term(model, **bad)


def test_subspace_moves_supports_on_schedule_with_exact_counts_and_fresh_momentum():
    torch.manual_seed(0)
    model = small()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.05, lr_sigma=0.05), momentum=0.9)
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=5)
    counts = [l.active for _, l in sparse_layers(model)]
    before = [l.idx.clone() for _, l in sparse_layers(model)]
    moved = run(model, optimizer, subspace, batches(40))
    assert [t for t, m in enumerate(moved) if m] == [5, 10, 15, 20, 25]  # every delta_t while t < 0.75 * 40
    assert [l.active for _, l in sparse_layers(model)] == counts
    assert any(not torch.equal(a, l.idx) for a, (_, l) in zip(before, sparse_layers(model)))
    assert subspace.last_report.swapped > 0
    # new entries of the last remove-and-add step started with zero momentum: one more swap to see it
    layer = dict(sparse_layers(model))["first"]
    subspace.t = 5
    x, y = batches(1, seed=9)[0]
    F.cross_entropy(model(x), y).backward()
    old = layer.idx.clone()
    assert subspace.step()
    new = ~torch.isin(layer.idx, old)
    assert new.any() and bool((optimizer.state[layer.mu]["momentum_buffer"][new] == 0).all())


def test_a_subclass_of_a_torch_optimizer_is_reset_like_its_parent_and_odd_state_is_refused_whole():
    class MyAdam(torch.optim.Adam):  # a user's subclass: Adam's own state
        pass

    torch.manual_seed(0)
    model = small()
    optimizer = MyAdam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=5)
    layer = dict(sparse_layers(model))["first"]
    run(model, optimizer, subspace, batches(5))
    old = layer.idx.clone()
    assert run(model, optimizer, subspace, batches(1, seed=9)) == [True]
    new = ~torch.isin(layer.idx, old)
    assert new.any() and bool((optimizer.state[layer.mu]["exp_avg"][new] == 0).all())

    class Odd(torch.optim.Adam):  # keeps per-parameter state of another shape
        def step(self, closure=None):
            out = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["rows"] = torch.zeros(2, 3)
            return out

    model = small()
    optimizer = Odd(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=5)
    run(model, optimizer, subspace, batches(5))
    supports = [l.idx.clone() for _, l in sparse_layers(model)]
    with pytest.raises(ssvi.OptimizerStateError, match=r"Odd's state 'rows' has shape \(2, 3\), not its parameter's"):
        run(model, optimizer, subspace, batches(1, seed=9))
    assert all(torch.equal(a, l.idx) for a, (_, l) in zip(supports, sparse_layers(model)))  # no layer changed


def test_a_deep_copy_of_the_model_an_ema_say_carries_no_working_copy_of_the_schedule():
    torch.manual_seed(0)
    model = small()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=5)
    run(model, optimizer, subspace, batches(5))  # the next step, 5, is a remove-and-add step
    ema = copy.deepcopy(model)
    x, y = batches(1, seed=9)[0]
    ema(x)  # a copied schedule would open a dense-gradient capture on the copy here, never closed
    assert not any(layer.capture_dense_grad for _, layer in sparse_layers(ema))
    kept = [layer.idx.clone() for _, layer in sparse_layers(ema)]
    assert run(model, optimizer, subspace, [(x, y)]) == [True]  # the model's own schedule goes on
    assert all(torch.equal(a, layer.idx) for a, (_, layer) in zip(kept, sparse_layers(ema)))
    assert not torch.equal(kept[0], dict(sparse_layers(model))["first"].idx)
    # a copy taken inside a capture (between a remove-and-add step's forward and its step()) is out of it
    run(model, optimizer, subspace, batches(4))
    x, y = batches(1, seed=10)[0]
    F.cross_entropy(model(x), y).backward()
    assert all(layer.capture_dense_grad for _, layer in sparse_layers(model))
    best = copy.deepcopy(model)
    assert not any(layer.capture_dense_grad or layer.dense_grad is not None for _, layer in sparse_layers(best))
    assert subspace.step() and not any(layer.capture_dense_grad for _, layer in sparse_layers(model))


def test_the_mean_estimator_and_a_resumed_schedule_match_an_uninterrupted_one():
    def train(split: bool):
        torch.manual_seed(1)
        model = small(seed=1)
        optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=1e-2, lr_sigma=1e-2))
        subspace = ssvi.Subspace(model, optimizer, total_steps=20, delta_t=4, addition="mean")
        data = batches(20, seed=2)
        if split:
            run(model, optimizer, subspace, data[:9])
            state = subspace.state_dict()
            subspace.remove()
            subspace = ssvi.Subspace(model, optimizer, total_steps=20, delta_t=4, addition="mean")
            subspace.load_state_dict(state)
            run(model, optimizer, subspace, data[9:])
        else:
            run(model, optimizer, subspace, data)
        return [l.idx for _, l in sparse_layers(model)]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_kind", ["adam", "sgd"])
def test_a_loop_resumed_without_the_schedules_state_is_told_so(caplog, optimizer_kind):
    """A resumed loop that restored the model and optimizer but not the Subspace started the
    schedule again at step 0, every remove-and-add step ahead, without a word."""
    model = small()
    make = {"adam": lambda p: torch.optim.Adam(p, lr=1e-3), "sgd": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)}
    optimizer = make[optimizer_kind](ssvi.param_groups(model, lr=1e-3, lr_sigma=1e-3))
    subspace = ssvi.Subspace(model, optimizer, total_steps=20, delta_t=4)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        run(model, optimizer, subspace, batches(5))  # a fresh run: nothing said
    assert not caplog.records
    saved = {"optimizer": optimizer.state_dict(), "subspace": subspace.state_dict()}
    resumed = make[optimizer_kind](ssvi.param_groups(model, lr=1e-3, lr_sigma=1e-3))
    resumed.load_state_dict(saved["optimizer"])
    forgot = ssvi.Subspace(model, resumed, total_steps=20, delta_t=4)
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        run(model, resumed, forgot, batches(2))
    state = "its state at step 4" if optimizer_kind == "adam" else "its momentum buffers"  # (step 4 was a swap)
    assert [r.getMessage() for r in caplog.records if "step 0" in r.getMessage()] == [
        f"Subspace.step() at the schedule's step 0 with an optimizer that has stepped before ({state}): a loop "
        "resumed from a checkpoint restores the schedule too (subspace.load_state_dict(saved)), or it starts again"]
    caplog.clear()
    again = ssvi.Subspace(model, resumed, total_steps=20, delta_t=4)
    again.load_state_dict(saved["subspace"])
    with caplog.at_level(logging.WARNING, logger="ssvi_cli"):
        run(model, resumed, again, batches(2))
    assert not [r for r in caplog.records if "step 0" in r.getMessage()]


@pytest.mark.parametrize("addition", ["sample", "mean"])
def test_the_mean_estimator_scores_additions_at_mu_and_trains_on_draws(addition):
    """The other tests of addition="mean" pass with the estimator switched off (both sides of each
    comparison share it): here the capture forwards alone run at theta = mu."""
    torch.manual_seed(0)
    model = small()
    optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.05, lr_sigma=0.05))
    subspace = ssvi.Subspace(model, optimizer, total_steps=20, delta_t=4, addition=addition)
    modes: list[str] = []
    sparse_layers(model)[0][1].register_forward_pre_hook(lambda layer, args: modes.append(layer.mode))
    for x, y in batches(9):
        F.cross_entropy(model(x), y).backward()
        subspace.step()
        optimizer.zero_grad()
    captures = [subspace.schedule.captures(t) for t in range(9)]
    assert sum(captures) == 2 and subspace.t == 9
    assert [mode == "mean" for mode in modes] == [addition == "mean" and c for c in captures]


def test_refusals_are_clear():
    model = small()
    with pytest.raises(ssvi.OptimizerStateError, match="LBFGS"):
        ssvi.Subspace(model, torch.optim.LBFGS(model.parameters()), total_steps=10)
    with pytest.raises(ValueError, match="no sparse Gaussian layers"):
        ssvi.Subspace(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    subspace = ssvi.Subspace(model, optimizer, total_steps=10, delta_t=2)
    subspace.t = 2  # an update step whose forward never ran with capture
    with pytest.raises(RuntimeError, match="no dense gradient for the subspace step: the model given to Subspace ran no forward"):
        subspace.step()
    model.eval()  # a forward that ran, in eval mode, captures nothing: the other refusal
    F.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]).backward()
    with pytest.raises(RuntimeError, match=r"no dense gradient for the subspace step: run the step's forward and backward "
                                           r"with the model in train\(\) mode"):
        subspace.step()
    model.train()
    # Arguments are checked when the schedule is made, not at the first remove-and-add step.
    for bad, match in (({"alpha": 2.5}, "^alpha=2.5 must be in"), ({"t_end": 1.5}, "t_end=1.5 must be in"),
                       ({"delta_t": 1}, "delta_t=1 must be an integer >= 2"),
                       ({"criterion": "snr_ab"}, "snr_ab"), ({"new_sigma": "tinyy"}, "new_sigma='tinyy'"),
                       ({"criterion": "e_exp", "criterion_lambda": -1.0}, "criterion_lambda=-1.0 must be")):
        with pytest.raises(ValueError, match=match):
            ssvi.Subspace(model, optimizer, total_steps=10, **bad)
    # An optimizer made before sparsify holds the replaced dense weights: the model would never train.
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    early = torch.optim.Adam(net.parameters(), lr=0.01)
    ssvi.sparsify(net, sparsity=0.5)
    advice = r"does not hold 0\.mu; build it after ssvi_cli.sparsify, from ssvi_cli\.param_groups\(model, lr, lr_sigma\)"
    with pytest.raises(ValueError, match=advice):
        ssvi.Subspace(net, early, total_steps=10)
    with pytest.raises(ValueError, match=r"already sparse \(2 layers were converted before\)"):
        ssvi.sparsify(net, sparsity=0.5)
    one = torch.nn.Sequential(torch.nn.Linear(4, 2))
    ssvi.sparsify(one, sparsity=0.5)
    with pytest.raises(ValueError, match=r"already sparse \(1 layer was converted before\)"):
        ssvi.sparsify(one, sparsity=0.5)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="samples must be a positive number"):
        ssvi.predict(net, x, samples=0)
    with pytest.raises(ValueError, match="no sparse Gaussian layers"):
        ssvi.predict(torch.nn.Linear(6, 3), x)

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(TypeError, match="returned a tuple; prediction needs one tensor"):
        ssvi.predict(Pair(), x)


def test_predict_returns_the_model_average_with_entropy_and_mutual_information():
    model = small()
    x = torch.randn(7, 1, 8, 8)
    torch.manual_seed(3)
    out = ssvi.predict(model, x, samples=5)
    assert out.probs.shape == (7, 10) and out.samples == 5
    assert torch.allclose(out.probs.sum(1), torch.ones(7))
    assert out.entropy.shape == out.mutual_information.shape == (7,)
    assert bool((out.mutual_information >= 0).all()) and bool((out.mutual_information <= out.entropy + 1e-9).all())
    mean = ssvi.predict(model, x, mode="mean")
    assert mean.mutual_information is None and mean.samples is None
    assert model.training  # predict restores the train/eval state
    # printed, a summary rather than every value (the dataclass's repr printed each tensor whole)
    assert repr(out) == (f"Prediction(probs (7, 10), samples=5, entropy mean {float(out.entropy.mean()):.4g}, "
                         f"mutual_information mean {float(out.mutual_information.mean()):.4g})")
    assert repr(mean).endswith("samples=None, entropy mean " + f"{float(mean.entropy.mean()):.4g}, mutual_information None)")


def test_an_overflowed_fp16_capture_skips_the_remove_and_add_step_and_backs_the_scale_off():
    # A loss scale so large that the fp16 backward overflows: the dense gradient is inf, and a step
    # ranked on it would add arbitrary entries. It is skipped, as the scaler skips an optimizer step.
    torch.manual_seed(0)
    model = small()
    optimizer = torch.optim.Adam(ssvi.param_groups(model, lr=0.01, lr_sigma=0.01))
    subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=5)
    scaler = torch.amp.GradScaler("cpu")
    data = batches(11)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        scaler.scale(F.cross_entropy(logits.float(), y)).backward()
        moved = subspace.step(scaler)
        optimizer.zero_grad()
        return moved

    for x, y in data[:5]:
        step(x, y)
    supports = [l.idx.clone() for _, l in sparse_layers(model)]
    scaler.update(1e38)  # the next scaled loss (~2e38) still fits float32; its fp16 gradients do not
    assert step(*data[5]) and subspace.last_report.skipped and subspace.last_report.layers == []
    assert all(torch.equal(a, l.idx) for a, (_, l) in zip(supports, sparse_layers(model)))
    assert scaler.get_scale() == pytest.approx(0.5e38)
    scaler.update(1024.0)
    for x, y in data[6:]:
        step(x, y)
    assert subspace.t == 11 and not subspace.last_report.skipped and subspace.last_report.swapped > 0


@pytest.mark.parametrize("micro", [2, 4])
def test_an_accumulating_loop_scores_additions_on_all_its_micro_batches(micro):
    # With addition="mean" the capture is deterministic: a remove-and-add step after `micro`
    # micro-batches (each loss divided by their count) must pick what one whole batch picks.
    def supports_after(chunks: int):
        torch.manual_seed(0)
        model = small()
        optimizer = torch.optim.SGD(ssvi.param_groups(model, lr=0.05, lr_sigma=0.05))
        subspace = ssvi.Subspace(model, optimizer, total_steps=40, delta_t=5, addition="mean")
        for t, (x, y) in enumerate(batches(6)):
            for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
                (F.cross_entropy(model(xc), yc) / chunks).backward()
            assert subspace.step() == (t == 5)
            optimizer.zero_grad()
        assert subspace.last_report.swapped > 0
        return [set(l.idx.tolist()) for _, l in sparse_layers(model)]

    # The sum over micro-batches rounds otherwise than one batch's gradient, which may swap one
    # near-tied pair; scoring on the last micro-batch alone would change dozens of the ~100 additions.
    whole = supports_after(1)
    assert sum(len(a ^ b) for a, b in zip(whole, supports_after(micro))) <= 2


def test_a_layer_the_remove_and_add_steps_forward_did_not_reach_keeps_its_support():
    """A two-headed model trained on one head per step: on a remove-and-add step the other head has
    no gradient, so it keeps its support (and is named in the report) while the rest moves."""
    torch.manual_seed(0)

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(6, 16)
            self.a = torch.nn.Linear(16, 3)
            self.b = torch.nn.Linear(16, 3)

        def forward(self, x, head):
            return getattr(self, head)(torch.relu(self.body(x)))

    model = TwoHeads()
    ssvi.sparsify(model, sparsity=0.5, from_weights=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    subspace = ssvi.Subspace(model, optimizer, total_steps=8, delta_t=2)
    before = model.b.idx.clone()
    for t in range(3):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        F.cross_entropy(model(x, "a" if t % 2 == 0 else "b"), y).backward()
        subspace.step()
        optimizer.zero_grad()
    report = subspace.last_report
    assert report.unreached == ["b"] and [l.name for l in report.layers] == ["body", "a"]
    assert report.swapped > 0 and torch.equal(model.b.idx, before)


@pytest.mark.parametrize("optimizer_over", ["all", "trainable"])
def test_a_frozen_layer_stays_frozen_and_keeps_its_support(optimizer_over):
    """Freezing before sparsify carries over to mu, rho and the bias; the remove-and-add steps leave
    the frozen layer's support and values alone, and an optimizer over the trainable parameters
    only is accepted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    for p in model[2].parameters():
        p.requires_grad_(False)
    ssvi.sparsify(model, sparsity=0.5)
    frozen = model[2]
    assert not any(p.requires_grad for p in (frozen.mu, frozen.rho, frozen.bias))
    assert model[0].mu.requires_grad and model[4].rho.requires_grad
    params = model.parameters() if optimizer_over == "all" else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    subspace = ssvi.Subspace(model, optimizer, total_steps=8, delta_t=2)
    idx, mu, rho = frozen.idx.clone(), frozen.mu.detach().clone(), frozen.rho.detach().clone()
    first = model[0].idx.clone()
    for _ in range(4):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        F.cross_entropy(model(x), y).backward()
        subspace.step()
        optimizer.zero_grad()
    assert [l.name for l in subspace.last_report.layers] == ["0", "4"] and not subspace.last_report.unreached
    assert not torch.equal(model[0].idx, first)  # the others moved
    assert torch.equal(frozen.idx, idx) and torch.equal(frozen.mu, mu) and torch.equal(frozen.rho, rho)


def test_dense_and_deterministic_patterns_take_one_string_and_must_match_a_layer():
    def net():
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    model = net()
    ssvi.sparsify(model, sparsity=0.8, dense="2", deterministic="0")
    assert model[2].density == 1.0 and model[0].density < 1.0
    assert not model[0].bayesian and model[2].bayesian
    with pytest.raises(ValueError, match=r"dense: '3' matches no Linear, Conv2d or Conv1d layer .*\(they are: 0, 2\)"):
        ssvi.sparsify(net(), sparsity=0.8, dense=("2", "3"))
    with pytest.raises(ValueError, match="deterministic: 'fc'"):
        ssvi.sparsify(net(), sparsity=0.8, deterministic=["fc"])


def test_preprocess_reads_pixels_as_infer_reads_an_array_and_makes_the_models_input():
    """An application serving a file had to normalise pixels by hand from model.ssvi_card."""
    import numpy as np

    from ssvi_cli.data import digits
    from ssvi_cli.data.transforms import preprocess as to_input

    model = small()
    spec = model.ssvi_card.data
    raw, _ = digits.load()
    raw = raw[:6]                                           # 0..16, the digits' own range
    x = ssvi.preprocess(model, raw)
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, to_input(torch.from_numpy(raw[:, None] / 16.0).float(), spec))
    as_uint8 = np.round(raw * 255 / 16).astype(np.uint8)    # the same pixels as 8-bit images, channels last, in RGB
    rgb = np.repeat(as_uint8[..., None], 3, axis=-1)
    assert torch.allclose(ssvi.preprocess(model, torch.from_numpy(rgb)), x, atol=0.02)
    assert ssvi.preprocess(model, as_uint8[0]).shape == (1, 1, 8, 8)       # one (H, W) image
    assert ssvi.preprocess(model, np.zeros((2, 16, 16), np.uint8)).shape == (2, 1, 8, 8)  # resized
    assert ssvi.predict(model, x, samples=2).probs.shape == (6, 10)
    with pytest.raises(ValueError, match=r"^pixels: array of shape \(2, 5, 5, 5, 5\); expected one of"):
        ssvi.preprocess(model, np.zeros((2, 5, 5, 5, 5)))
    with pytest.raises(ValueError, match=r"^pixels: float images range over \[300, 300\], not \[0, 1\]"):
        ssvi.preprocess(model, np.full((2, 8, 8), 300.0))
    with pytest.raises(ValueError, match="no description of its inputs"):
        ssvi.preprocess(torch.nn.Linear(64, 10), raw)
    half = torch.from_numpy(raw / 16.0).to(torch.bfloat16)  # numpy has no bfloat16: read as float
    assert torch.allclose(ssvi.preprocess(model, half), x, atol=0.05)
    wide = torch.from_numpy(as_uint8).to(torch.int64)  # integer pixels of another type, 0..255, as infer reads them
    assert torch.allclose(ssvi.preprocess(model, wide), ssvi.preprocess(model, as_uint8))
    import dataclasses

    flat = dataclasses.replace(model.ssvi_card, data=dataclasses.replace(spec, input_shape=(64,)))
    model.ssvi_card = flat  # as ssvi.save(model, path, input_shape=(64,)) describes a model of vectors
    with pytest.raises(ValueError, match=r"described as \(64,\), not images"):
        ssvi.preprocess(model, raw)


def test_preprocess_says_when_uint8_pixels_look_like_the_raw_range(caplog):
    """The digits' 0..16 cast to uint8 were read as 0..255, nearly black, in silence; int64 reads them raw."""
    import numpy as np

    from ssvi_cli.data import digits

    model = small()
    raw = digits.load()[0][:4]
    with caplog.at_level(logging.WARNING):
        ssvi.preprocess(model, raw.astype(np.int64))
        assert not caplog.records
        ssvi.preprocess(model, raw.astype(np.uint8))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("pixels: uint8 pixels, up to 16, are read as 0..255 (nearly black)")
