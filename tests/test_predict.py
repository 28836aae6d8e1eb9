"""ssvi_cli.prediction: Monte Carlo prediction is a posterior-predictive draw, mean mode is the mean
network, the same seed gives the same draws, and the prediction-only fast paths (fused bias, reused
buffers, direct CSR kernel) leave results and gradients as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssvi_cli.core.kernels import CsrPattern, SparseMatmul
from ssvi_cli.core.gaussian import rho_from_sigma
from ssvi_cli.core.layers import sparse_layers
from ssvi_cli.models import LayerFactory, build_architecture
from ssvi_cli.prediction import class_softmax, predict_batch

IN_SHAPE, CLASSES, WIDTHS = (1, 4, 4), 3, (12, 10)


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny products: on a loaded machine, waking a second thread would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_mlp(kernel: str, density: float = 0.4, seed: int = 0):
    """A Bayesian 16-12-10-3 MLP with random supports, means, sigmas and biases."""
    gen = torch.Generator().manual_seed(seed)
    model = build_architecture("mlp", IN_SHAPE, CLASSES, LayerFactory(bayesian=True, kernel=kernel), widths=WIDTHS)
    for _, layer in sparse_layers(model):
        k = max(1, int(density * layer.numel))
        idx = torch.randperm(layer.numel, generator=gen)[:k].sort().values
        sigma = torch.rand(k, generator=gen) * 0.4 + 0.1
        layer.set_support(idx, torch.randn(k, generator=gen), rho_from_sigma(sigma, "softplus"))
        layer.bias.data = torch.randn(layer.bias.shape, generator=gen) * 0.3
    return model


def dense_weights(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, sigma, bias) of a layer as dense (out, in) tensors, zero off the support."""
    with torch.no_grad():
        return layer.to_dense(layer.mu).clone(), layer.to_dense(layer.sigma()).clone(), layer.bias.clone()


def reference_draws(model, x: torch.Tensor, samples: int, gen: torch.Generator) -> torch.Tensor:
    """Straightforward weight sampling: every layer, first included, draws dense weights per draw."""
    layers = [dense_weights(layer) for layer in (model.first, *model.hidden)]
    h0 = x.flatten(1)
    out = []
    for _ in range(samples):
        h = h0
        for i, (mu, sigma, bias) in enumerate(layers):
            if i > 0:
                h = torch.relu(h)
            w = mu + sigma * torch.randn(mu.shape, generator=gen)
            h = F.linear(h, w, bias)
        out.append(torch.softmax(h, -1))
    return torch.stack(out)


@pytest.mark.parametrize("first_layer", ["moments", "sample"])
@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_mc_draws_match_weight_sampling_reference_in_distribution(kernel, first_layer):
    """Per input, the draws' probabilities have the mean and variance of per-draw weight sampling.

    (With ``moments`` the first layer uses its exact LRT output distribution, so the marginal per
    input is the same; the joint across inputs of a batch is not compared.)
    """
    model = small_mlp(kernel)
    # inputs scaled by 3: first-layer output variances far from 1 (near 1, the moments draw passed with its
    # variance used as its standard deviation)
    x = 3 * torch.randn(4, *IN_SHAPE, generator=torch.Generator().manual_seed(1))
    samples = 6000
    torch.manual_seed(2)
    probs, draws = predict_batch(model, x, samples=samples, first_layer=first_layer)
    ref = reference_draws(model, x, samples, torch.Generator().manual_seed(3))
    assert draws.shape == ref.shape == (samples, 4, CLASSES)
    torch.testing.assert_close(probs, draws.mean(0))
    # standard errors: mean <= 0.5 / sqrt(6000) ~ 0.0065, variance of a [0, 1] variable similar
    torch.testing.assert_close(draws.mean(0), ref.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(draws.var(0), ref.var(0), atol=0.015, rtol=0.1)
    assert float(ref.var(0).max()) > 0.02  # the posterior really is spread: the check has teeth


def test_mc_reference_check_detects_a_wrong_predictive():
    """The tolerances above reject the mean network repeated (no weight noise at all)."""
    model = small_mlp("sparse")
    x = torch.randn(4, *IN_SHAPE, generator=torch.Generator().manual_seed(1))
    mean_probs, _ = predict_batch(model, x, mode="mean")
    ref = reference_draws(model, x, 3000, torch.Generator().manual_seed(3))
    assert float(ref.var(0).max()) > 0.015 * 1.1 + 0.015  # a zero variance fails the variance check
    assert float((ref.mean(0) - mean_probs).abs().max()) > 0.03


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_mean_mode_is_the_deterministic_forward(kernel):
    model = small_mlp(kernel)
    x = torch.randn(5, *IN_SHAPE)
    probs, draws = predict_batch(model, x, mode="mean")
    assert draws is None
    h = x.flatten(1)
    for i, layer in enumerate((model.first, *model.hidden)):
        mu, _, bias = dense_weights(layer)
        h = F.linear(torch.relu(h) if i > 0 else h, mu, bias)
    torch.testing.assert_close(probs, torch.softmax(h, -1), atol=1e-6, rtol=1e-5)
    assert all(layer.mode == "lrt" for _, layer in sparse_layers(model))  # predict restores what it changed
    assert model.training  # and the train/eval state


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_same_seed_same_draws_and_no_state_left_behind(kernel):
    model = small_mlp(kernel)
    x = torch.randn(6, *IN_SHAPE)
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(predict_batch(model, x, samples=5))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert (runs[0][1] - runs[2][1]).abs().max() > 1e-4
    draws = runs[0][1]
    assert all((draws[i] - draws[0]).abs().max() > 1e-5 for i in range(1, 5))  # no shared buffer
    for _, layer in sparse_layers(model):
        assert layer.mode == "lrt" and layer.draws is None


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_sample_scheme_is_per_draw_weight_sampling_on_the_same_stream(kernel):
    """``first_layer="sample"``: each draw samples every layer's active weights in order, from the
    global stream, exactly as the straightforward computation (dense weights zero off the support)."""
    model = small_mlp(kernel, density=0.3, seed=5)
    x = torch.randn(6, *IN_SHAPE)
    torch.manual_seed(21)
    probs, draws = predict_batch(model, x, samples=5, first_layer="sample")
    torch.manual_seed(21)
    layers = [model.first, *model.hidden]
    ref = []
    for _ in range(5):
        h = x.flatten(1)
        for i, layer in enumerate(layers):
            mu, sigma = layer.mu.detach(), layer.sigma().detach()
            w = layer.to_dense(mu + sigma * torch.randn(mu.shape)).detach()
            h = F.linear(torch.relu(h) if i > 0 else h, w, layer.bias.detach())
        ref.append(torch.softmax(h, -1))
    torch.testing.assert_close(draws, torch.stack(ref), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs, draws.mean(0))
    assert all(layer.draws is None and layer.mode == "lrt" for layer in layers)


def test_first_layer_scheme_follows_the_cost_rule():
    """Moments for few rows (one normal per output element is cheap), weight sampling for a sparse
    first layer and a large batch (fewer normals than output elements, cheap CSR product), moments
    again for a dense layer (its normals alone outnumber the output elements)."""
    from ssvi_cli.core.layers import SparseLinear
    from ssvi_cli.prediction import first_layer_scheme

    layer = SparseLinear(784, 1024, bayesian=True)
    k = 784 * 1024 // 20  # density 0.05: the sparse kernel
    layer.set_support(torch.randperm(784 * 1024)[:k].sort().values, torch.zeros(k), torch.zeros(k))
    assert layer.uses_sparse_kernel()
    assert first_layer_scheme(layer, torch.zeros(1, 784)) == "moments"
    assert first_layer_scheme(layer, torch.zeros(256, 784)) == "sample"
    dense = SparseLinear(784, 1024, bayesian=True)
    n = 784 * 1024
    dense.set_support(torch.arange(n), torch.zeros(n), torch.zeros(n))
    assert first_layer_scheme(dense, torch.zeros(256, 784)) == "moments"
    with pytest.raises(ValueError, match="first_layer"):
        predict_batch(small_mlp("sparse"), torch.zeros(1, *IN_SHAPE), first_layer="lrt")


def test_sparse_and_dense_kernels_give_the_same_mean_network():
    sparse, dense = small_mlp("sparse"), small_mlp("dense")
    x = torch.randn(7, *IN_SHAPE)
    torch.testing.assert_close(predict_batch(sparse, x, mode="mean")[0],
                               predict_batch(dense, x, mode="mean")[0], atol=1e-6, rtol=1e-5)


def test_sample_mode_outside_prediction_returns_fresh_tensors():
    """Buffer reuse is only on during predict_batch: plain sample-mode calls never alias."""
    model = small_mlp("sparse")
    layer = model.hidden[0]
    layer.mode = "sample"
    x = torch.randn(3, 12)
    with torch.no_grad():
        a, b = layer(x), layer(x)
    assert a.data_ptr() != b.data_ptr() and (a - b).abs().max() > 1e-5


def test_class_softmax_matches_softmax_in_either_layout():
    logits = torch.randn(9, 10) * 5
    torch.testing.assert_close(class_softmax(logits), torch.softmax(logits, -1))
    transposed = logits.t().contiguous().t()
    torch.testing.assert_close(class_softmax(transposed), torch.softmax(logits, -1))
    three = torch.randn(2, 3, 4)
    torch.testing.assert_close(class_softmax(three), torch.softmax(three, -1))


def test_sparse_matmul_with_fused_bias_gradcheck():
    idx = torch.tensor([0, 3, 5, 9, 10, 17, 22, 23])
    pattern = CsrPattern.from_flat(idx, 4, 6)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: SparseMatmul.apply(a, c, pattern, d), (x, v, b))
    dense = torch.zeros(24, dtype=torch.float64).scatter(0, idx, v.detach()).view(4, 6)
    torch.testing.assert_close(SparseMatmul.apply(x, v, pattern, b), x @ dense.t() + b)


@pytest.mark.parametrize("bayesian", [True, False])
def test_training_gradients_with_fused_bias_match_the_dense_kernel(bayesian):
    from ssvi_cli.core.layers import SparseLinear

    layers = []
    for kernel in ("sparse", "dense"):
        torch.manual_seed(5)
        layer = SparseLinear(20, 8, bayesian=bayesian, kernel=kernel)
        idx = torch.randperm(160)[:30].sort().values
        rho = rho_from_sigma(torch.rand(30) * 0.2 + 0.05, "softplus") if bayesian else None
        layer.set_support(idx, torch.randn(30), rho)
        layer.bias.data.normal_()
        layers.append(layer)
    x = torch.randn(16, 20)
    outs = []
    for layer in layers:
        layer.mode = "mean"
        torch.manual_seed(7)
        out = layer(x)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layers[0].bias.grad, layers[1].bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layers[0].mu.grad, layers[1].mu.grad, rtol=1e-4, atol=1e-5)


def test_conv_first_layer_samples_its_weights_shared_across_pixels():
    """A conv model (LeNet-5 on 12x12): its first layer always samples weights (``auto`` picks it,
    ``moments`` is refused), so within one draw neighbouring outputs of the stem share one weight draw
    and correlate, as a weight-space posterior implies; LRT noise drawn per output position would
    not (the issue this guards against). ``positions`` counts conv outputs."""
    from ssvi_cli.core.modes import drawing, sampling
    from ssvi_cli.prediction import first_layer_scheme

    torch.manual_seed(0)
    model = build_architecture("lenet5", (1, 12, 12), 3, LayerFactory(bayesian=True))
    for _, layer in sparse_layers(model):
        n = layer.numel
        k = max(1, n // 2)
        idx = torch.randperm(n)[:k].sort().values
        layer.set_support(idx, torch.randn(k) * 0.5, rho_from_sigma(torch.rand(k) * 0.3 + 0.1, "softplus"))
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        assert model.first.positions(x) * model.first.weight_shape[0] == model.first.moments(x)[0].numel()
    assert first_layer_scheme(model.first, x) == "sample"
    with pytest.raises(ValueError, match="exact only for a linear first layer"):
        predict_batch(model, x, samples=2, first_layer="moments")
    # The stem's outputs over many draws: a constant image makes neighbouring pixels see the same
    # input, so under one shared weight draw they move together (correlation near 1).
    flat = torch.ones(1, 1, 12, 12)
    with torch.no_grad(), sampling([model.first], "sample"), drawing([model.first]):
        outs = torch.stack([model.first(flat)[0, 0, 5, 5:7].clone() for _ in range(400)])
    corr = torch.corrcoef(outs.t())[0, 1]
    assert float(corr) > 0.9
    # predict_batch draws exactly that: the same stream gives the same probabilities as a loop of
    # whole-model weight draws.
    torch.manual_seed(3)
    probs, draws = predict_batch(model, x, samples=5)
    torch.manual_seed(3)
    with torch.no_grad(), sampling(model, "sample"):
        ref = torch.stack([torch.softmax(model(x), -1) for _ in range(5)])
    torch.testing.assert_close(draws, ref, rtol=1e-5, atol=1e-6)

def test_outputs_that_are_not_finite_are_an_error_not_a_confident_class(tmp_path, capsys):
    """A weight of 3e38 is finite, so the file reads, but the logits overflow: infer and evaluate
    say so in one line (exit 2) instead of printing NaN as a class with zero entropy."""
    import numpy as np
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    import ssvi_cli as ssvi
    from ssvi_cli.cli import run

    assert run(["train", "--set", "train.epochs=1", "--set", "model.widths=[16]", "--out", str(tmp_path / "r")]) == 0
    path = tmp_path / "r" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".mu"))
    tensors[key][0] = 3e38
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    np.save(tmp_path / "x.npy", np.full((4, 8, 8), 16.0, dtype=np.float32))
    capsys.readouterr()
    for args, first in ((["infer", str(bad), str(tmp_path / "x.npy"), "--mode", "mean"], f"{tmp_path / 'x.npy'}[0]"),
                        (["evaluate", str(bad), "--samples", "2"], "the input at index ")):
        assert run(args) == 2
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("error")]
        assert f"error: the model's outputs are not finite (NaN or infinite logits), first for {first}" in line, err
    with pytest.raises(ValueError, match="not finite"):
        ssvi.predict(ssvi.load(bad), torch.full((2, 1, 8, 8), 3.0), mode="mean")


@pytest.mark.parametrize("first_layer", ["sample", "moments"])
def test_a_bfloat16_mlp_predicts_with_either_first_layer_scheme_and_refuses_float32_inputs_alike(first_layer):
    # The moments scheme (the GPU's choice for a linear first layer, the CPU's for a small batch) once
    # handed the next bfloat16 layer the float32 of its promoted buffer, which that layer refuses.
    model = small_mlp("auto").to(torch.bfloat16)
    x = torch.randn(5, *IN_SHAPE)
    probs, draws = predict_batch(model, x.to(torch.bfloat16), samples=3, first_layer=first_layer)
    assert probs.dtype == torch.float32 and draws.shape == (3, 5, CLASSES)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    with pytest.raises(RuntimeError, match=r"input of torch.float32 for a layer in torch.bfloat16"):
        predict_batch(model, x, samples=2, first_layer=first_layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast a float32 input is autocast's to cast
        assert predict_batch(model, x, samples=2, first_layer=first_layer)[0].shape == (5, CLASSES)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_the_moments_scheme_adds_no_spread_of_its_own_where_sigma_is_tiny(kernel):
    """The first layer's moments drew its outputs with sqrt(var + 1e-8), training's LRT guard: for a
    model whose sigma is tiny (one just converted from trained weights) that constant was nearly all
    the spread of the draws, so MI moved with the scheme, which follows the batch size and device."""
    model = small_mlp(kernel).double()
    for _, layer in sparse_layers(model):
        layer.rho.data = rho_from_sigma(torch.full_like(layer.rho, 1e-6), "softplus")
    x = torch.randn(4, *IN_SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spread = {}
    for scheme in ("moments", "sample"):
        torch.manual_seed(2)
        spread[scheme] = float(predict_batch(model, x, samples=400, first_layer=scheme)[1].var(0).mean())
    assert spread["sample"] > 0 and 0.5 < spread["moments"] / spread["sample"] < 2, spread


def test_a_model_returning_an_output_object_is_told_to_return_its_logits():
    """A transformers model returns a ModelOutput: the refusal names what to return."""
    import ssvi_cli as ssvi

    class Output(dict):
        pass

    class HfLike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return Output(logits=self.fc(x))

    model = HfLike()
    ssvi.sparsify(model, 0.5)
    with pytest.raises(TypeError, match=r"^the model's forward returned a Output; prediction needs one tensor of class "
                                        r"logits \(wrap the model so that it returns them: a transformers model's "
                                        r"\.logits, docs/API\.md\)"):
        ssvi.predict(model, torch.randn(2, 4))
