import math

import torch

from ssvi_cli.core.layers import SparseLinear
from ssvi_cli.core.gaussian import rho_from_sigma
from ssvi_cli.core.subspace import Schedule, update_layer


def layer_with(idx, mu, sigma):
    layer = SparseLinear(5, 4, bayesian=True)
    layer.set_support(torch.tensor(idx), torch.tensor(mu), rho_from_sigma(torch.tensor(sigma), "softplus"))
    return layer


def test_schedule_cosine_drop_fraction_and_update_steps():
    s = Schedule(delta_t=10, alpha=0.3, t_end=100)
    assert math.isclose(s.drop_fraction(0), 0.3)
    assert math.isclose(s.drop_fraction(50), 0.15)
    assert s.drop_fraction(100) == 0.0 and s.drop_fraction(500) == 0.0
    assert [t for t in range(120) if s.is_update(t)] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    acc = Schedule(delta_t=10, alpha=0.3, t_end=100, accumulate=3)
    assert [t for t in range(25) if acc.captures(t)] == [8, 9, 10, 18, 19, 20]


def test_update_keeps_count_removes_lowest_adds_highest_gradient():
    #                  idx:   0     3     7     12    19     (snr |mu| / sigma: 9, 0.03, 10, 4, 0.05)
    layer = layer_with([0, 3, 7, 12, 19], [0.9, 0.01, 0.5, -0.8, 0.02], [0.1, 0.3, 0.05, 0.2, 0.4])
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer.mu.grad = torch.ones(5)
    layer.rho.grad = torch.ones(5)
    opt.step()
    before = {i: (m, r) for i, m, r in zip(layer.idx.tolist(), layer.mu.tolist(), layer.rho.tolist())}
    grad = torch.zeros(20)
    grad[[5, 6]] = torch.tensor([3.0, -4.0])  # |grad| ranks 6 then 5
    swap = update_layer("l", layer, grad, fraction=0.4, criterion="snr", lam=1.0, new_sigma="mean", optimizer=opt)
    assert layer.active == 5 and swap.swapped == 2 and swap.dropped == 2
    assert layer.idx.tolist() == [0, 5, 6, 7, 12]
    mu = dict(zip(layer.idx.tolist(), layer.mu.tolist()))
    assert mu[5] == 0.0 and mu[6] == 0.0
    rho = dict(zip(layer.idx.tolist(), layer.rho.tolist()))
    survivors = [rho[i] for i in (0, 7, 12)]
    # the survivors keep their own values, moved to their new positions (7 and 12 each one on)
    assert all((mu[i], rho[i]) == before[i] for i in (0, 7, 12))
    # new entries start at the survivors' mean rho (that of all five, dropped ones too, is another)
    assert math.isclose(rho[5], sum(survivors) / 3, rel_tol=1e-6) and rho[6] == rho[5]
    assert not math.isclose(rho[5], sum(r for _, r in before.values()) / 5, rel_tol=1e-3)
    mom = dict(zip(layer.idx.tolist(), opt.state[layer.mu]["momentum_buffer"].tolist()))
    assert mom[5] == 0.0 and mom[6] == 0.0 and mom[0] != 0.0
    assert math.isclose(swap.iou, 3 / 7)


def test_entry_removed_and_readded_keeps_its_values():
    layer = layer_with([0, 1, 2, 3], [0.5, 0.4, 0.3, 0.001], [0.1] * 4)
    grad = torch.zeros(20)
    grad[3] = 10.0  # the entry with the lowest score has by far the largest gradient
    swap = update_layer("l", layer, grad, fraction=0.25, criterion="mean", lam=1.0, new_sigma="mean", optimizer=None)
    assert layer.idx.tolist() == [0, 1, 2, 3]
    assert math.isclose(layer.mu[3].item(), 0.001, rel_tol=1e-6)
    assert swap.swapped == 0 and swap.dropped == 1


def test_new_sigma_tiny_option():
    layer = layer_with([0, 1], [0.5, 0.0001], [0.1, 0.1])
    grad = torch.zeros(20)
    grad[9] = 1.0
    update_layer("l", layer, grad, fraction=0.5, criterion="snr_abs", lam=1.0, new_sigma="tiny", optimizer=None)
    sigma = dict(zip(layer.idx.tolist(), layer.sigma().tolist()))
    assert math.isclose(sigma[9], 1e-6, rel_tol=1e-4)


def test_a_drop_fraction_of_one_gives_new_entries_the_layers_mean_rho_not_nan():
    # f = 1 (alpha 1 over a very long run rounds there) keeps no entry: the mean over none was NaN
    layer = layer_with([0, 3, 7, 12], [0.9, 0.01, 0.5, -0.8], [0.1, 0.2, 0.3, 0.4])
    old_rho = layer.rho.detach().clone()
    grad = torch.zeros(20)
    grad[[1, 5, 7, 9]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    swap = update_layer("l", layer, grad, fraction=1.0, criterion="snr", lam=1.0, new_sigma="mean", optimizer=None)
    assert swap.dropped == 4 and layer.idx.tolist() == [1, 5, 7, 9]
    assert torch.isfinite(layer.rho).all()
    rho = dict(zip(layer.idx.tolist(), layer.rho.tolist()))
    assert math.isclose(rho[1], float(old_rho.mean()), rel_tol=1e-6) and math.isclose(rho[7], float(old_rho[2]))
