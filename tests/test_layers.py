import math

import pytest
import torch
import torch.nn.functional as F

from ssvi_cli.core.modes import sampling, using_kernel
from ssvi_cli.core.kernels import CsrPattern, SparseMatmul
from ssvi_cli.core.conv import SparseConv2d
from ssvi_cli.core.layers import SparseLinear
from ssvi_cli.core.gaussian import gaussian_kl, rho_from_sigma, sigma_from_rho


def make_linear(fan_in=12, fan_out=7, density=0.3, bayesian=True, kernel="sparse"):
    layer = SparseLinear(fan_in, fan_out, bayesian=bayesian, kernel=kernel)
    n = fan_in * fan_out
    k = max(1, int(density * n))
    idx = torch.randperm(n)[:k].sort().values
    rho = rho_from_sigma(torch.rand(k) * 0.2 + 0.05, "softplus") if bayesian else None
    layer.set_support(idx, torch.randn(k), rho)
    layer.bias.data.normal_()
    return layer


@pytest.fixture(params=["csr", "bag"])
def product_kernel(request, monkeypatch):
    """Run a test under each of the sparse product's two CPU kernels: MKL's CSR product, or
    ``embedding_bag``, forced here regardless of the batch size and cache rule."""
    from ssvi_cli.core import kernels as layers

    if request.param == "bag":
        monkeypatch.setattr(layers, "BAG_MIN_ROWS", 1)
        monkeypatch.setattr(layers, "bag_table_limit", lambda: 2**62)
    else:
        monkeypatch.setattr(layers, "bag_table_limit", lambda: 0)
    calls = []
    real = F.embedding_bag
    monkeypatch.setattr(layers.F, "embedding_bag", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield request.param
    assert bool(calls) == (request.param == "bag")  # the kernel under test really ran (or did not)


def test_sparse_matmul_gradients_match_dense_autograd(product_kernel):
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    n, k = 84, 20
    idx = torch.randperm(n)[:k].sort().values
    values = torch.randn(k, dtype=torch.float64, requires_grad=True)
    pattern = CsrPattern.from_flat(idx, 7, 12)
    out = SparseMatmul.apply(x, values, pattern)
    dense_values = values.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w = torch.zeros(n, dtype=torch.float64).scatter(0, idx, dense_values).view(7, 12)
    ref = x2 @ w.t()
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(values.grad, dense_values.grad)


def test_bag_kernel_handles_empty_rows_and_an_empty_support(product_kernel):
    """Output rows without active entries are zero (plus bias) in both kernels."""
    from ssvi_cli.core.kernels import csr_product

    x = torch.randn(40, 6)
    bias = torch.randn(4)
    for idx in (torch.tensor([0, 3, 20, 23]), torch.zeros(0, dtype=torch.long)):  # rows 1, 2 empty; none
        pattern = CsrPattern.from_flat(idx, 4, 6)
        values = torch.randn(idx.numel())
        dense = torch.zeros(24).scatter(0, idx, values).view(4, 6)
        torch.testing.assert_close(csr_product(x, pattern.matrix(values), bias), x @ dense.t() + bias)


def test_product_kernel_rule_bag_for_cached_tables_of_32_rows_or_more(monkeypatch):
    from ssvi_cli.core import kernels as layers

    monkeypatch.setattr(layers, "bag_table_limit", lambda: 2**20)
    calls = []
    real = F.embedding_bag
    monkeypatch.setattr(layers.F, "embedding_bag", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    n = 1024 * 1024
    idx = torch.randperm(n)[: n // 20].sort().values
    weight = CsrPattern.from_flat(idx, 1024, 1024).matrix(torch.randn(idx.numel()))
    for rows in (16, 256, 257):  # too few rows; a 1 MiB table; just over 1 MiB
        layers.csr_product(torch.randn(rows, 1024), weight)
    assert calls == [(1024, 256)]


def test_l2_cache_size_is_read_from_sysfs(tmp_path):
    from ssvi_cli.core.kernels import l2_cache_bytes

    for i, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"),
                                             ("2", "Unified", "2048K"), ("3", "Unified", "32M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, text in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(text + "\n")
    assert l2_cache_bytes(tmp_path) == 2048 * 1024
    assert l2_cache_bytes(tmp_path / "missing") == 0


def test_sparse_matmul_gradcheck(product_kernel):
    idx = torch.tensor([0, 3, 5, 9, 10, 17, 22, 23])
    pattern = CsrPattern.from_flat(idx, 4, 6)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: SparseMatmul.apply(a, b, pattern), (x, v))


@pytest.mark.parametrize("mode", ["mean", "lrt_moments"])
def test_sparse_and_dense_kernels_agree_including_variance_path(mode, product_kernel):
    torch.manual_seed(1)
    sparse = make_linear(kernel="sparse")
    dense = make_linear(kernel="dense")
    dense.load_state_dict(sparse.state_dict())
    dense.set_support(sparse.idx, sparse.mu.detach(), sparse.rho.detach())
    x = torch.randn(9, 12)
    if mode == "mean":
        sparse.mode = dense.mode = "mean"
        a, b = sparse(x), dense(x)
        (a.square().sum()).backward()
        (b.square().sum()).backward()
    else:
        ma, va = sparse.moments(x)
        mb, vb = dense.moments(x)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
        a, b = ma + va.sqrt(), mb + vb.sqrt()
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(sparse.rho.grad, dense.rho.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.mu.grad, dense.mu.grad, rtol=1e-4, atol=1e-6)


def test_lrt_output_matches_weight_sampling_moments():
    torch.manual_seed(2)
    layer = make_linear(fan_in=6, fan_out=3, density=0.5)
    x = torch.randn(1, 6).expand(20000, 6)
    with torch.no_grad():
        layer.mode = "lrt"
        lrt = layer(x)
        layer.mode = "sample"
        ws = torch.stack([layer(x[:1])[0] for _ in range(20000)])
    # the exact moments: x W_mu^T + b and (x * x)(sigma^2)^T over the active entries
    mu_w = torch.zeros(layer.numel).scatter(0, layer.idx, layer.mu.detach()).view(3, 6)
    var_w = torch.zeros(layer.numel).scatter(0, layer.idx, layer.sigma().detach() ** 2).view(3, 6)
    mean, var = x[0] @ mu_w.T + layer.bias.detach(), (x[0] * x[0]) @ var_w.T
    for draws in (lrt, ws):  # 20000 draws: the mean within 5 standard errors, the variance within 5%
        torch.testing.assert_close(draws.mean(0), mean, atol=float(5 * (var.max() / 20000) ** 0.5), rtol=0)
        torch.testing.assert_close(draws.var(0), var, atol=0, rtol=0.05)


def test_only_active_entries_are_parameters():
    layer = make_linear(fan_in=100, fan_out=50, density=0.05)
    assert layer.mu.numel() == layer.rho.numel() == layer.idx.numel() == 250
    assert layer.active == 250 and layer.numel == 5000
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"mu", "rho", "bias"}


@pytest.mark.parametrize("ksize,stride,padding", [(3, 1, 1), (1, 2, 0), (3, 2, 1)])
def test_sparse_conv_matches_dense_conv(ksize, stride, padding):
    conv = SparseConv2d(4, 6, ksize, stride=stride, padding=padding, bayesian=True)
    n = conv.numel
    k = n // 4
    idx = torch.randperm(n)[:k].sort().values
    conv.set_support(idx, torch.randn(k), rho_from_sigma(torch.full((k,), 0.1), "softplus"))
    x = torch.randn(2, 4, 9, 9)
    with sampling([conv], "mean"):
        with using_kernel([conv], "sparse"):
            a = conv(x)
        with using_kernel([conv], "dense"):
            b = conv(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    w = torch.zeros(n).scatter(0, idx, conv.mu.detach()).view(conv.weight_shape)
    torch.testing.assert_close(b, F.conv2d(x, w, None, stride, padding), rtol=1e-5, atol=1e-5)


def test_grouped_conv_uses_dense_path():
    conv = SparseConv2d(4, 4, 3, padding=1, groups=2, bayesian=False, kernel="sparse")
    conv.set_support(torch.arange(conv.numel), torch.randn(conv.numel))
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(3)
    # sigma on both sides of the prior's, and not symmetric about it in log scale: the log terms of
    # 0.05 and 0.2 against 0.1 cancel, so a wrong sign of log(prior / sigma) went unseen
    mu, sigma, prior = torch.tensor([0.3, -0.1]), torch.tensor([0.05, 0.3]), 0.1
    kl = gaussian_kl(mu, sigma, prior)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma),
                                              torch.distributions.Normal(0.0, prior)).sum()
    torch.testing.assert_close(kl, exact, rtol=1e-6, atol=0)
    theta = mu + sigma * torch.randn(400000, 2)
    logq = torch.distributions.Normal(mu, sigma).log_prob(theta)
    logp = torch.distributions.Normal(0.0, prior).log_prob(theta)
    mc = (logq - logp).mean(0).sum()
    assert abs(float(kl) - float(mc)) < 0.02 * float(kl)


@pytest.mark.parametrize("param", ["softplus", "exp"])
def test_sigma_rho_round_trip(param):
    sigma = torch.tensor([1e-7, 6e-4, 0.1, 3.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_from_rho(rho_from_sigma(sigma, param), param), sigma)


def test_capture_mode_gives_dense_gradient_at_every_position():
    torch.manual_seed(4)
    layer = make_linear(density=0.2)
    layer.capture_dense_grad = True
    layer.mode = "mean"
    x = torch.randn(8, 12)
    layer(x).square().sum().backward()
    dense = layer.collect_dense_grad()
    w = torch.zeros(layer.numel).scatter(0, layer.idx, layer.mu.detach()).view(7, 12).requires_grad_(True)
    (F.linear(x, w, layer.bias.detach())).square().sum().backward()
    torch.testing.assert_close(dense.view(7, 12), w.grad)
    torch.testing.assert_close(layer.mu.grad, w.grad.flatten()[layer.idx])
    assert math.isclose(float(dense.abs().sum()), float(w.grad.abs().sum()), rel_tol=1e-6)


def test_randn_like_draws_contiguous_noise_for_the_csr_output():
    from ssvi_cli.core.gaussian import randn_like

    t = torch.empty(512, 300).t()  # the layout SparseMatmul returns
    noise = randn_like(t)
    assert noise.shape == t.shape and noise.is_contiguous()
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02


def test_lrt_gradients_of_sparse_kernel_match_dense_with_the_same_noise(product_kernel):
    """Mean and variance paths together, through the noise: same seed, same draws, same gradients."""
    torch.manual_seed(3)
    sparse = make_linear(fan_in=30, fan_out=20, density=0.1, kernel="sparse")
    dense = make_linear(fan_in=30, fan_out=20, density=0.1, kernel="dense")
    dense.load_state_dict(sparse.state_dict())
    dense.set_support(sparse.idx, sparse.mu.detach(), sparse.rho.detach())
    x = torch.randn(16, 30)
    outs = []
    for layer in (sparse, dense):
        torch.manual_seed(7)
        out = layer(x)
        (out.square().sum()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.mu.grad, dense.mu.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.rho.grad, dense.rho.grad, rtol=1e-4, atol=1e-5)


def test_mc_prediction_with_cached_sigma_matches_per_draw_sigma():
    from ssvi_cli.models import LayerFactory, build_architecture
    from ssvi_cli.prediction import predict_batch

    torch.manual_seed(4)
    # the dense kernel: a contiguous first-layer output, so the reference draws its noise alike
    model = build_architecture("mlp", (1, 4, 4), 3, LayerFactory(bayesian=True, kernel="dense"), widths=(8,))
    for _, layer in [("first", model.first), ("hidden", model.hidden[0])]:
        k = layer.numel // 3
        idx = torch.randperm(layer.numel)[:k].sort().values
        layer.set_support(idx, torch.randn(k), rho_from_sigma(torch.rand(k) * 0.3 + 0.05, "softplus"))
    x = torch.randn(5, 1, 4, 4)
    torch.manual_seed(9)
    probs, draws = predict_batch(model, x, samples=4, first_layer="moments")
    # reference: the per-draw computation written out with the same random stream
    torch.manual_seed(9)
    h = model.prepare(x)
    mean, var = model.first.moments(h)
    ref = []
    hidden = model.hidden[0]
    for _ in range(4):
        a = mean.detach() + torch.sqrt(var.detach() + 1e-8) * _noise_like(mean)
        w = hidden.mu.detach() + hidden.sigma().detach() * torch.randn_like(hidden.mu)
        ref.append(torch.softmax(F.linear(torch.relu(a), hidden.to_dense(w)) + hidden.bias.detach(), -1))
    torch.testing.assert_close(draws, torch.stack(ref), rtol=1e-4, atol=1e-5)
    assert all(layer.draws is None and layer.mode == "lrt" for layer in (model.first, hidden))


def _noise_like(t):
    from ssvi_cli.core.gaussian import randn_like

    return randn_like(t)


@pytest.mark.parametrize("ksize,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 1, 1)])
def test_sparse_conv_lrt_gradients_match_dense_including_variance(ksize, stride, padding):
    """Both LRT terms (x*mu and x^2*sigma^2) through the sparse conv paths: values, input and
    parameter gradients equal those of the dense convolution."""
    torch.manual_seed(5)
    conv = SparseConv2d(5, 7, ksize, stride=stride, padding=padding, bayesian=True)
    n = conv.numel
    k = max(1, n // 5)
    idx = torch.randperm(n)[:k].sort().values
    conv.set_support(idx, torch.randn(k), rho_from_sigma(torch.rand(k) * 0.3 + 0.05, "softplus"))
    x0 = torch.randn(3, 5, 8, 8)
    results = []
    for kernel in ("sparse", "dense"):
        conv.mu.grad = conv.rho.grad = None
        x = x0.clone().requires_grad_(True)
        with using_kernel([conv], kernel):
            mean, var = conv.moments(x)
        torch.manual_seed(6)
        g1, g2 = torch.randn(mean.shape), torch.randn(var.shape)
        ((mean * g1).sum() + (var * g2).sum()).backward()
        results.append((mean.detach(), var.detach(), x.grad, conv.mu.grad.clone(), conv.rho.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_load_state_dict_into_a_layer_that_already_ran_uses_the_loaded_support():
    """``load_state_dict`` copies a new support into ``idx`` in place; the sparse kernel's cached
    pattern must follow it, not the support of the layer's earlier forward."""
    torch.manual_seed(0)
    source, target = make_linear(20, 64, 0.05), make_linear(20, 64, 0.05)
    x = torch.randn(4, 20)
    with sampling(target, "mean"):
        target(x)  # builds the pattern of target's own support
    target.load_state_dict(source.state_dict())
    with sampling(source, "mean"), sampling(target, "mean"):
        torch.testing.assert_close(target(x), source(x))


def test_a_support_set_under_inference_mode_still_runs_the_sparse_kernel():
    """An inference tensor (a model loaded inside ``torch.inference_mode()``) has no version counter."""
    torch.manual_seed(0)
    layer = make_linear(20, 64, 0.05)
    x = torch.randn(4, 20)
    with sampling(layer, "mean"):
        expected = layer(x)
        with torch.inference_mode():
            layer.set_support(layer.idx.clone(), layer.mu.detach().clone(), layer.rho.detach().clone())
            torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_a_float64_layer_computes_its_lrt_variance_in_float64(kernel):
    # the variance was always float32 (for half types' underflow), which a float64 model does not need:
    # rho's gradient was then good to 1e-7 only and a float64 gradcheck failed
    torch.manual_seed(0)
    layer = make_linear(kernel=kernel).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    mean, var = layer.moments(x)
    assert mean.dtype == var.dtype == torch.float64
    rho = layer.rho.detach().clone().requires_grad_(True)
    reference = (x * x) @ layer.to_dense(sigma_from_rho(rho, layer.sigma_param) ** 2).t()
    torch.testing.assert_close(var, reference.detach(), rtol=1e-13, atol=0)
    cotangent = torch.randn_like(reference)
    (var * cotangent).sum().backward()
    (reference * cotangent).sum().backward()
    torch.testing.assert_close(layer.rho.grad, rho.grad, rtol=1e-12, atol=0)
    half = make_linear(kernel=kernel).to(torch.bfloat16)  # half types: float32, as before
    assert half.moments(torch.randn(4, 12, dtype=torch.bfloat16))[1].dtype == torch.float32


@pytest.mark.parametrize("bayesian", [False, True])
def test_an_inplace_activation_after_a_sparse_linear_trains(bayesian, product_kernel):
    # the sparse product's output was a view made inside a custom autograd function, which autograd
    # forbids changing in place: VGG's, AlexNet's and MobileNetV3's classifiers (Linear, ReLU(inplace))
    # failed under --method rigl, and a Bayesian model under sampling("sample") with gradients
    torch.manual_seed(0)
    fc1, fc2 = make_linear(fan_in=12, fan_out=9, bayesian=bayesian), make_linear(fan_in=9, fan_out=4, bayesian=bayesian)
    x = torch.randn(300, 12)  # rows enough for either kernel
    with sampling([fc1, fc2], "sample" if bayesian else "mean"):
        torch.manual_seed(1)
        out = fc2(F.relu(fc1(x), inplace=True))
        out.square().sum().backward()
        grads = [p.grad.clone() for p in (fc1.mu, fc1.bias, fc2.mu)]
        for p in (fc1.mu, fc1.bias, fc2.mu):
            p.grad = None
        torch.manual_seed(1)
        ref = fc2(F.relu(fc1(x)))  # the same draws, out of place
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, p in zip(grads, (fc1.mu, fc1.bias, fc2.mu)):
        torch.testing.assert_close(got, p.grad)


def test_an_amd_cpu_takes_the_embedding_bag_kernel_at_any_table_size(tmp_path, monkeypatch):
    """MKL's CSR product ran 2-2.4x slower than embedding_bag on an AMD EPYC at every table size; the
    half-of-L2 bound is the Intel measurement's."""
    import platform

    from ssvi_cli.core import kernels

    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert kernels.cpu_vendor(tmp_path / "cpuinfo") == "AuthenticAMD"
    assert kernels.cpu_vendor(tmp_path / "missing") == ""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(kernels, "l2_cache_bytes", lambda: 512 * 1024)
    try:
        for vendor, limit in (("AuthenticAMD", kernels.NO_LIMIT), ("GenuineIntel", 256 * 1024)):
            monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
            kernels.bag_table_limit.cache_clear()
            assert kernels.bag_table_limit() == limit, vendor
    finally:  # the machine's own value for the tests after this one
        kernels.bag_table_limit.cache_clear()
