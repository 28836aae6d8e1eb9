"""Removal criteria (METHOD.md §4) against Monte Carlo, high-precision arithmetic and their facts."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from ssvi_cli.core import criteria as C

GRID = [(0.0, 1.0), (0.0, 0.05), (0.7, 0.5), (-0.7, 0.5), (1.5, 0.2), (-0.1, 0.3), (2.0, 1.5)]
N_MC = 2_000_000


def _draws(mu: float, sigma: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return mu + sigma * torch.randn(N_MC, generator=gen, dtype=torch.float64)


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _within(estimate: torch.Tensor, closed: torch.Tensor, se: torch.Tensor, k: float = 5.0) -> None:
    assert abs(float(estimate) - float(closed)) <= k * float(se), (float(estimate), float(closed), float(se))


@pytest.mark.parametrize("mu,sigma", GRID)
def test_folded_normal_moments_match_monte_carlo(mu: float, sigma: float) -> None:
    a = _draws(mu, sigma).abs()
    mean_se = a.std() / math.sqrt(N_MC)
    _within(a.mean(), C.folded_normal_mean(_f64(mu), _f64(sigma)), mean_se)
    centred = a - a.mean()
    var_se = torch.sqrt(((centred**2 - centred.var()) ** 2).mean() / N_MC)
    _within(a.var(), C.folded_normal_var(_f64(mu), _f64(sigma)), var_se)
    snr_mc = a.mean() / a.std()
    snr = C.removal_score("snr_abs", _f64(mu), _f64(sigma))
    assert float(snr) == pytest.approx(float(snr_mc), rel=5e-3)


@pytest.mark.parametrize("mu,sigma", GRID)
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_exp_criteria_match_monte_carlo(mu: float, sigma: float, lam: float) -> None:
    a = _draws(mu, sigma).abs()
    y = torch.exp(lam * a)
    _within(y.mean(), C.abs_mgf(_f64(mu), _f64(sigma), lam), y.std() / math.sqrt(N_MC))
    assert float(C.removal_score("e_exp", _f64(mu), _f64(sigma), lam)) == pytest.approx(
        math.log(float(y.mean())), abs=5e-3
    )
    log_snr_mc = math.log(float(y.mean() / y.std()))
    assert float(C.removal_score("snr_exp", _f64(mu), _f64(sigma), lam)) == pytest.approx(log_snr_mc, abs=1e-2)


def _mp_log_scores(mu: float, sigma: float, lam: float) -> tuple[float, float]:
    """log M(λ) and log SNR_exp from the METHOD.md formula in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    m, s = mpmath.mpf(mu), mpmath.mpf(sigma)

    def mgf(lm: mpmath.mpf) -> mpmath.mpf:
        e = lm * lm * s * s / 2
        return mpmath.exp(e + lm * m) * mpmath.ncdf(m / s + lm * s) + mpmath.exp(e - lm * m) * mpmath.ncdf(
            -m / s + lm * s
        )

    m1, m2 = mgf(mpmath.mpf(lam)), mgf(2 * mpmath.mpf(lam))
    return float(mpmath.log(m1)), float(mpmath.log(m1 / mpmath.sqrt(m2 - m1 * m1)))


@pytest.mark.parametrize(
    "mu,sigma,lam",
    [
        (0.0, 1e-3, 1.0),  # log-space branch, small s
        (0.0, 9e-5, 1.0),  # series branch
        (0.01, 1e-5, 1.0),
        (1.0, 1e-6, 1.0),
        (-0.3, 0.01, 1.0),
        (0.0, 1e-12, 1.0),
        (5.0, 10.0, 4.0),  # M(λ) ~ e^820: only the log is representable
        (-10.0, 10.0, 4.0),
    ],
)
def test_exp_criteria_match_high_precision(mu: float, sigma: float, lam: float) -> None:
    log_m, log_snr = _mp_log_scores(mu, sigma, lam)
    assert float(C.log_abs_mgf(_f64(mu), _f64(sigma), lam)) == pytest.approx(log_m, rel=1e-10, abs=1e-15)
    assert float(C.log_snr_exp(_f64(mu), _f64(sigma), lam)) == pytest.approx(log_snr, rel=1e-7)


def test_snr_exp_continuous_across_series_switch() -> None:
    sigma = torch.tensor([C._SERIES_S * (1 - 1e-9), C._SERIES_S * (1 + 1e-9)], dtype=torch.float64)
    for mu in (0.0, 1e-4, 3e-4, 1.0):
        below, above = C.log_snr_exp(torch.full_like(sigma, mu), sigma, 1.0)
        assert float(below) == pytest.approx(float(above), rel=1e-7)


def test_snr_abs_depends_on_t_alone() -> None:
    t = torch.tensor([0.0, 0.3, 1.0, 2.5, 7.0, 40.0, 1e4], dtype=torch.float64)
    ref = C.removal_score("snr_abs", t, torch.ones_like(t))
    for sigma in (2.0**-30, 2.0**-5, 4.0, 2.0**10):
        s = torch.full_like(t, sigma)
        torch.testing.assert_close(C.removal_score("snr_abs", t * s, s), ref, rtol=1e-13, atol=0)
        torch.testing.assert_close(C.removal_score("snr_abs", -t * s, s), ref, rtol=1e-13, atol=0)


def test_snr_abs_increasing_in_t() -> None:
    t = torch.cat([torch.linspace(0, 60, 200_001, dtype=torch.float64), torch.logspace(2, 8, 10_001, dtype=torch.float64)])
    f = C.snr_abs_of_t(t)
    assert torch.isfinite(f).all()
    assert (f.diff() > 0).all()
    assert float(f[0]) == pytest.approx(math.sqrt(2 / (math.pi - 2)), rel=1e-14)
    assert float(f[-1]) == pytest.approx(1e8, rel=1e-14)


def _random_layer(n: int = 50_000) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    mu = 0.01 * torch.randn(n, generator=gen)
    sigma = (6e-4 + 5e-4 * torch.randn(n, generator=gen)).abs()
    mu[:500] = 0.0  # a block of exact ties at t = 0
    mu[500:1000], sigma[500:1000] = mu[1000:1500], sigma[1000:1500]  # duplicated entries
    mu[2000:2010] = 1e3  # t ~ 1e6..1e7
    return mu, sigma


@pytest.mark.parametrize("k", [0, 1, 499, 5_000, 25_000, 49_600, 50_000])
def test_snr_abs_ranks_exactly_like_snr(k: int) -> None:
    mu, sigma = _random_layer()
    snr = C.removal_score("snr", mu, sigma)
    snr_abs = C.removal_score("snr_abs", mu, sigma)
    assert torch.equal(C.keep_mask(snr, k), C.keep_mask(snr_abs, k))
    assert torch.equal(C.top_k_indices(snr, k), C.top_k_indices(snr_abs, k))


def test_keep_mask_breaks_ties_by_index() -> None:
    score = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert C.keep_mask(score, 2).tolist() == [False, True, True, False, False]
    assert C.keep_mask(score, 4).sum() == 4
    with pytest.raises(ValueError):
        C.keep_mask(score, 6)


def test_float32_inputs_at_large_t_are_finite_and_distinct() -> None:
    sigma = torch.full((50,), 1e-4, dtype=torch.float32)
    mu = sigma * torch.linspace(9_900, 10_100, 50, dtype=torch.float32)
    e_abs32 = C.folded_normal_mean(mu, sigma).float()
    assert ((mu * mu + sigma * sigma - e_abs32 * e_abs32) <= 0).all()  # why float64 / t is needed
    for name in C.criterion_names():
        score = C.removal_score(name, mu, sigma)
        assert score.dtype == torch.float64
        assert torch.isfinite(score).all(), name
        if name != "snr_exp":  # at large t, SNR of e^{λ|θ|} -> 1/sqrt(expm1(λ²σ²)): no μ left
            assert score.unique().numel() == 50, name
    assert (C.removal_score("snr_abs", mu, sigma).diff() > 0).all()


EXTREME_MU = [0.0, 1e-8, -1e-8, 1.0, -10.0, 10.0, 1e4]
EXTREME_SIGMA = [0.0, 1e-12, 1e-6, 1.0, 1e3]


@pytest.mark.parametrize("name", C.criterion_names())
@pytest.mark.parametrize("lam", [0.25, 1.0, 4.0])
def test_scores_finite_for_extreme_inputs(name: str, lam: float) -> None:
    mu, sigma = torch.meshgrid(torch.tensor(EXTREME_MU), torch.tensor(EXTREME_SIGMA), indexing="ij")
    score = C.removal_score(name, mu, sigma, lam)
    assert score.shape == mu.shape and score.dtype == torch.float64
    assert torch.isfinite(score).all(), score
    t = torch.logspace(-3, 8, 200, dtype=torch.float64)
    for sig in (1e-12, 1.0, 10.0):
        s = torch.full_like(t, sig)
        assert torch.isfinite(C.removal_score(name, t * s, s, lam)).all()


@pytest.mark.parametrize("name", ["snr", "snr_abs", "snr_exp"])
def test_snr_like_scores_rank_tiny_sigma_first(name: str) -> None:
    mu = torch.tensor([1.0, 1.0, 1.0, 1.0])
    sigma = torch.tensor([1e-2, 1e-6, 1e-12, 0.0])
    score = C.removal_score(name, mu, sigma)
    assert torch.isfinite(score).all()
    assert (score.diff() > 0).all()


def test_lambda_changes_e_exp() -> None:
    mu = torch.tensor([1.3, 0.0], dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.5], dtype=torch.float64)
    small, large = C.removal_score("e_exp", mu, sigma, 0.05), C.removal_score("e_exp", mu, sigma, 4.0)
    assert not torch.allclose(small, large)
    assert small[0] > small[1]  # small λ: ranks like E|θ| (1.3 > 1.2)
    assert large[1] > large[0]  # large λ: the wide weight wins
    with pytest.raises(ValueError):
        C.removal_score("e_exp", mu, sigma, 0.0)


def test_simple_scores_match_definitions() -> None:
    mu = torch.tensor([-2.0, 0.5, 0.0])
    sigma = torch.tensor([0.5, 0.25, 1.0])
    assert C.removal_score("mean", mu, sigma).tolist() == [2.0, 0.5, 0.0]
    assert C.removal_score("snr", mu, sigma).tolist() == [4.0, 2.0, 0.0]
    e_abs = C.removal_score("e_abs", mu, sigma)
    assert float(e_abs[2]) == pytest.approx(math.sqrt(2 / math.pi))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(C.CriterionError) as info:
        C.removal_score("magnitude", torch.zeros(2), torch.ones(2))
    assert isinstance(info.value, ValueError)
    for name in ("mean", "snr", "e_abs", "snr_abs", "e_exp", "snr_exp"):
        assert name in str(info.value)
    assert C.criterion_names() == list(C.REMOVAL_CRITERIA)



@pytest.mark.parametrize("seed", range(6))
def test_top_k_indices_is_the_stable_sort_prefix(seed: int) -> None:
    """Linear-time selection = the first k of a stable descending sort, as a set: many ties, -inf,
    NaN and the edge counts included."""
    gen = torch.Generator().manual_seed(seed)
    n = 500
    score = torch.randint(0, 12, (n,), generator=gen).double()  # heavy ties
    score[torch.randperm(n, generator=gen)[:40]] = -math.inf
    if seed % 2:
        score[torch.randperm(n, generator=gen)[:7]] = math.nan
    for k in (0, 1, 6, 7, 8, 100, 250, 459, 460, 499, 500):
        ref = torch.argsort(score, descending=True, stable=True)[:k].sort().values
        got = C.top_k_indices(score, k)
        assert torch.equal(got, ref), k
    with pytest.raises(ValueError):
        C.top_k_indices(score, n + 1)


def _layer_with_tiny_t() -> torch.nn.Module:
    """A layer whose μ puts t = |μ|/σ at distinct values from 1e-16 to 1e-5, where float64 holds
    ``snr_abs_of_t`` flat (to third order it is) and rounding moves it up and down by an ulp, with
    larger t after them; entry order reversed so that the lowest index is not the lowest t."""
    from ssvi_cli.core.layers import SparseGaussian
    layer = SparseGaussian((8, 10), bias=False, bayesian=True)  # 64 of 80 entries active
    t = torch.cat([torch.logspace(-16, -5, 40, dtype=torch.float64), torch.linspace(0.5, 5.0, 24, dtype=torch.float64)])
    sigma = 1e-3
    layer.set_support(torch.arange(64), (t * sigma).flip(0).float(),
                      torch.full((64,), math.log(math.expm1(sigma)), dtype=torch.float32))
    assert not bool((C.snr_abs_of_t(t[:40]).diff() > 0).all())  # the region the test needs
    return layer


def test_snr_abs_drops_what_snr_drops_where_float64_flattens_it() -> None:
    """A subspace step under snr_abs removes the entries snr would, at t near 0 too (where the value
    of snr_abs ties or falls by an ulp), and the criteria overlap agrees: both rank snr_abs by snr's
    scores (criteria.ranking_score), the routing this checks; test_snr_abs_ranks_exactly_like_snr
    checks that snr_abs's own scores rank so."""
    from ssvi_cli.core.overlap import criteria_overlap
    from ssvi_cli.core.subspace import update_layer
    kept = {}
    for criterion in ("snr", "snr_abs"):
        layer = _layer_with_tiny_t()
        update_layer("l", layer, (torch.arange(80) >= 64).float().reshape(8, 10), 0.25, criterion, 1.0, "mean", None)
        kept[criterion] = layer.idx[layer.idx < 64].tolist()  # the 16 added are 64..79
    assert len(kept["snr"]) == 48 and kept["snr"] == kept["snr_abs"]
    assert kept["snr"] == list(range(48))  # the 16 lowest t: the last 16 entries
    layer = _layer_with_tiny_t()
    layer.set_support(torch.arange(60), layer.mu.detach()[:60].clone(), layer.rho.detach()[:60].clone())
    overlap = criteria_overlap(torch.nn.Sequential(layer), fraction=0.25)
    names = overlap["criteria"]
    assert overlap["iou"][names.index("snr")][names.index("snr_abs")] == 1.0
