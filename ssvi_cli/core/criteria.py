"""Removal scores of SSVI (METHOD.md §4): pure functions of the variational parameters.

Each active weight is ``θ ~ N(μ, σ²)``; ``t = |μ| / σ`` and ``s = λσ``. A removal score ranks the
active entries of a layer, **higher = keep**. Every score is computed in float64 whatever the input
dtype, has the input's shape and is finite for ``σ > 0`` (``σ = 0`` is floored at ``SIGMA_FLOOR``).

Two scores are returned on a log scale because the statistic itself leaves float64 for realistic
parameters (``M(λ) ≥ e^{λ²σ²/2}`` is ``e^{800}`` at ``λσ = 40``): ``e_exp`` is ``log M(λ)`` and
``snr_exp`` is ``log SNR_exp``. A logarithm is strictly increasing, so the ranking, which is all
the subspace step uses, is that of the statistic in the table of METHOD.md.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ssvi_cli.registry import Registry, UnknownName

__all__ = [
    "CriterionError",
    "REMOVAL_CRITERIA",
    "SIGMA_FLOOR",
    "abs_mgf",
    "criterion_names",
    "folded_normal_mean",
    "folded_normal_var",
    "keep_mask",
    "log_abs_mgf",
    "log_snr_exp",
    "ranking_score",
    "removal_score",
    "snr_abs_of_t",
    "top_k_indices",
]

SIGMA_FLOOR = 1e-300
"""σ is clamped below at this value so that ``σ = 0`` gives finite scores. Any σ a float32
softplus produces other than an exact 0 (smallest subnormal ≈ 1.4e-45) lies above it."""

T_MAX = 1e300
"""``t = |μ|/σ`` saturates here (only reachable with ``σ`` at the floor); scores rank ties above."""

_SERIES_S = 1e-4
"""Below ``s = λσ`` this, ``snr_exp`` uses its cumulant series (see ``_log_exp_var_ratio``)."""

_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

ScoreFn = Callable[[Tensor, Tensor, float], Tensor]


class CriterionError(UnknownName):
    """An unknown removal-criterion name; the message lists the valid ones."""


def _as_f64(mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Cast to float64, broadcast, and floor σ at ``SIGMA_FLOOR``."""
    mu = torch.as_tensor(mu).to(torch.float64)
    sigma = torch.as_tensor(sigma).to(torch.float64).clamp_min(SIGMA_FLOOR)
    return torch.broadcast_tensors(mu, sigma)


def _t(mu: Tensor, sigma: Tensor) -> Tensor:
    """``t = |μ|/σ`` in float64, saturating at ``T_MAX``."""
    return (mu.abs() / sigma).clamp_max(T_MAX)


def _pdf(x: Tensor) -> Tensor:
    """Standard normal density φ(x)."""
    return torch.exp(-0.5 * x * x - _LOG_SQRT_2PI)


def _upper_tail(x: Tensor) -> Tensor:
    """Q(x) = 1 − Φ(x) = erfc(x/√2)/2, accurate in the far tail (no 1 − Φ cancellation)."""
    return 0.5 * torch.special.erfc(x / _SQRT2)


def _fold_excess(t: Tensor) -> Tensor:
    """δ(t) = E|Y| − t = 2(φ(t) − t·Q(t)) for Y ~ N(t, 1), t ≥ 0: what folding adds to the mean."""
    return 2.0 * (_pdf(t) - t * _upper_tail(t))


def folded_normal_mean(mu: Tensor, sigma: Tensor) -> Tensor:
    """E|θ| = |μ|·erf(|μ|/(σ√2)) + σ·√(2/π)·exp(−μ²/(2σ²)), the folded-normal mean (``e_abs``)."""
    mu, sigma = _as_f64(mu, sigma)
    t = _t(mu, sigma)
    return mu.abs() * torch.erf(t / _SQRT2) + 2.0 * sigma * _pdf(t)


def _folded_var_ratio(t: Tensor) -> Tensor:
    """Var|θ|/σ² = t² + 1 − (t + δ)² = 1 − 2tδ − δ², with δ = ``_fold_excess(t)``.

    Written without the ``μ² + σ² − (E|θ|)²`` cancellation: both terms are O(1) and the result lies
    in [1 − 2/π, 1], so it never underflows (it is 1 exactly once φ(t) underflows, t ≳ 38).
    """
    d = _fold_excess(t)
    return 1.0 - 2.0 * t * d - d * d


def folded_normal_var(mu: Tensor, sigma: Tensor) -> Tensor:
    """Var|θ| = μ² + σ² − (E|θ|)², evaluated stably as σ²·(1 − 2tδ − δ²), δ = E|θ|/σ − t."""
    mu, sigma = _as_f64(mu, sigma)
    return sigma * sigma * _folded_var_ratio(_t(mu, sigma))


def snr_abs_of_t(t: Tensor) -> Tensor:
    """SNR of |θ| as a function of t alone: (t + δ)/√(1 − 2tδ − δ²), δ = 2(φ(t) − tQ(t)).

    Strictly increasing in t, equal to √(2/(π − 2)) ≈ 1.3236 at t = 0 and to t itself once
    φ(t) underflows (t ≳ 38); finite up to ``T_MAX``.
    """
    t = torch.as_tensor(t).to(torch.float64)
    d = _fold_excess(t)
    return (t + d) / torch.sqrt(1.0 - 2.0 * t * d - d * d)


def _log_ndtr(x: Tensor) -> Tensor:
    return torch.special.log_ndtr(x)


def log_abs_mgf(mu: Tensor, sigma: Tensor, lam: float = 1.0) -> Tensor:
    """log M(λ), M(λ) = E e^{λ|θ|} = e^{s²/2+λμ}Φ(μ/σ+s) + e^{s²/2−λμ}Φ(−μ/σ+s), s = λσ.

    By symmetry in the sign of μ, with t = |μ|/σ and the larger term factored out:
    log M = s²/2 + λ|μ| + log Φ(t+s) + log1p(exp(−2λ|μ| + log Φ(s−t) − log Φ(t+s))).
    The log1p argument lies in [0, 1] for λ ≥ 0, so nothing overflows.
    """
    mu, sigma = _as_f64(mu, sigma)
    t = _t(mu, sigma)
    s = lam * sigma
    lm = lam * mu.abs()
    big = _log_ndtr(t + s)
    ratio = torch.exp(-2.0 * lm + _log_ndtr(s - t) - big)
    return 0.5 * s * s + lm + big + torch.log1p(ratio)


def abs_mgf(mu: Tensor, sigma: Tensor, lam: float = 1.0) -> Tensor:
    """M(λ) = E exp(λ|θ|) (METHOD.md §4); ``exp(log_abs_mgf)``, so it is inf past e^709."""
    return torch.exp(log_abs_mgf(mu, sigma, lam))


def _third_cumulant(t: Tensor) -> Tensor:
    """κ₃ of X = |Y|, Y ~ N(t, 1), t ≥ 0.

    With ψ₁ = φ − tQ and ψ₃ = (t²+2)φ − (t³+3t)Q (the moments E(U−t)₊ᵏ of U ~ N(0,1)):
    κ₃ = 2ψ₃ + 6(t² − 1)ψ₁ + 24tψ₁² + 16ψ₁³. Every term carries φ(t), so the absolute error is
    tiny for all t (no cancellation of the O(t³) raw moments); κ₃ = 0 once φ underflows, so t is
    clamped at 40 (φ(40) = 0 in float64) to keep t³·Q(t) from becoming inf·0.
    """
    t = t.clamp_max(40.0)
    pdf, q = _pdf(t), _upper_tail(t)
    psi1 = pdf - t * q
    psi3 = (t * t + 2.0) * pdf - (t**3 + 3.0 * t) * q
    return 2.0 * psi3 + 6.0 * (t * t - 1.0) * psi1 + 24.0 * t * psi1**2 + 16.0 * psi1**3


def _log_exp_var_ratio(t: Tensor, s: Tensor, lm: Tensor) -> Tensor:
    """log(Var e^{λ|θ|} / M(λ)²) = log expm1(D), D = log M(2λ) − 2 log M(λ) ≥ 0.

    D = K(2s) − 2K(s) for K the cumulant generating function of X = |θ|/σ. Two evaluations:

    * s < ``_SERIES_S``: D = κ₂s² + κ₃s³ + O(s⁴), so log D = 2 log s + log(κ₂ + κ₃ s) (relative
      error ≲ 1e-8 at the switch, no underflow even for s = 1e-300);
    * otherwise, with the λ|μ| terms cancelled analytically,
      D = s² + log Φ(t+2s) − 2 log Φ(t+s) + log1p(r₂) − 2 log1p(r₁),
      r₁ = e^{−2λ|μ|}Φ(s−t)/Φ(t+s), r₂ = e^{−4λ|μ|}Φ(2s−t)/Φ(t+2s) (absolute error ~1e-16).

    log expm1(D) is then D + log1p(−e^{−D}) for D > 1 (no overflow at D ~ s² ~ 10³).
    """
    kappa2 = _folded_var_ratio(t)
    tiny = s < _SERIES_S
    s_series = torch.where(tiny, s, torch.zeros_like(s))
    log_d_series = 2.0 * torch.log(s_series) + torch.log(kappa2 + _third_cumulant(t) * s_series)
    log_d_series = log_d_series + 0.5 * torch.exp(log_d_series)  # log expm1(D) ≈ log D + D/2

    s_full = torch.where(tiny, torch.ones_like(s), s)
    lm_full = torch.where(tiny, torch.ones_like(lm), lm)
    phi1, phi2 = _log_ndtr(t + s_full), _log_ndtr(t + 2.0 * s_full)
    r1 = torch.exp(-2.0 * lm_full + _log_ndtr(s_full - t) - phi1)
    r2 = torch.exp(-4.0 * lm_full + _log_ndtr(2.0 * s_full - t) - phi2)
    d = s_full**2 + phi2 - 2.0 * phi1 + torch.log1p(r2) - 2.0 * torch.log1p(r1)
    d = d.clamp_min(torch.finfo(torch.float64).tiny)
    large = d > 1.0
    log_expm1 = torch.where(
        large,
        d + torch.log1p(-torch.exp(-torch.where(large, d, torch.ones_like(d)))),
        torch.log(torch.expm1(torch.where(large, torch.ones_like(d), d))),
    )
    return torch.where(tiny, log_d_series, log_expm1)


def log_snr_exp(mu: Tensor, sigma: Tensor, lam: float = 1.0) -> Tensor:
    """log SNR of e^{λ|θ|}: log[M(λ)/√(M(2λ) − M(λ)²)] = −½ log expm1(log M(2λ) − 2 log M(λ)).

    The variance is never formed as a difference of moments (see ``_log_exp_var_ratio``).
    Saturates only at ``λσ → 0`` where it tends to +inf like −log(λσ√κ₂(t)).
    """
    mu, sigma = _as_f64(mu, sigma)
    return -0.5 * _log_exp_var_ratio(_t(mu, sigma), lam * sigma, lam * mu.abs())


def _check_lam(lam: float) -> None:
    if not lam > 0.0:
        raise ValueError(f"lam must be > 0 for the exponential criteria, got {lam}")


def _score_mean(mu: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """|μ| (RigL magnitude)."""
    return _as_f64(mu, sigma)[0].abs()


def _score_snr(mu: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """t = |μ|/σ in float64 with σ ≥ ``SIGMA_FLOOR`` and t ≤ ``T_MAX``: finite, order-preserving."""
    return _t(*_as_f64(mu, sigma))


def _score_e_abs(mu: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """E|θ| (folded-normal mean)."""
    return folded_normal_mean(mu, sigma)


def _score_snr_abs(mu: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """E|θ|/√Var|θ| evaluated through t alone (``snr_abs_of_t``): ranks exactly like ``snr``."""
    return snr_abs_of_t(_score_snr(mu, sigma, lam))


def _score_e_exp(mu: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """log M(λ) (log scale: M itself overflows float64 at λσ ≈ 38)."""
    _check_lam(lam)
    return log_abs_mgf(mu, sigma, lam)


def _score_snr_exp(mu: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """log[M(λ)/√(M(2λ) − M(λ)²)] (log scale: the ratio underflows for λσ ≳ 38)."""
    _check_lam(lam)
    return log_snr_exp(mu, sigma, lam)


REMOVAL_CRITERIA: Registry[ScoreFn] = Registry("criterion", error=CriterionError, sort=False)
for _name, _fn in (("mean", _score_mean), ("snr", _score_snr), ("e_abs", _score_e_abs),
                   ("snr_abs", _score_snr_abs), ("e_exp", _score_e_exp), ("snr_exp", _score_snr_exp)):
    REMOVAL_CRITERIA.add(_name, _fn)
"""Name -> ``score(mu, sigma, lam)``; float64, same shape, higher = keep (METHOD.md §4)."""


def criterion_names() -> list[str]:
    """Valid removal-criterion names, in registry order."""
    return REMOVAL_CRITERIA.names()


def removal_score(name: str, mu: Tensor, sigma: Tensor, lam: float = 1.0) -> Tensor:
    """Score every entry of ``mu``/``sigma`` with criterion ``name`` (float64, higher = keep)."""
    return REMOVAL_CRITERIA.get(name)(mu, sigma, lam)


def ranking_score(name: str, mu: Tensor, sigma: Tensor, lam: float = 1.0) -> Tensor:
    """What a subspace step ranks by for criterion ``name``: its ``removal_score``, except that
    ``snr_abs`` ranks by ``t`` itself. The two orders are the same (``snr_abs_of_t`` is strictly
    increasing), but ``snr_abs_of_t`` is flat to third order at ``t = 0`` (it rises like t⁴), and
    float64 gives every ``t`` below about 2e-4 its value at 0 or a few ulp either side (and up to
    about 0.1 still puts close values out of order, by an ulp), so entries that ``snr`` tells apart would tie
    or swap there."""
    return removal_score("snr" if name == "snr_abs" else name, mu, sigma, lam)


def top_k_indices(score: Tensor, k: int) -> Tensor:
    """Flat indices of the ``k`` highest scores, ascending; ties go to the lower flat index.

    The same set as the first ``k`` of a stable descending sort (NaN ranks highest, as there), found
    in linear time: ``topk`` gives the k-th highest value, every score above it is taken and the ties
    at it fill up from the lowest index. Two scores that order the entries identically (equal where
    equal) give identical results.
    """
    flat = score.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == n:
        return torch.arange(n, device=flat.device)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    kth = torch.topk(flat, k, sorted=False).values.min()
    chosen = (flat > kth) | flat.isnan()
    missing = k - int(chosen.sum())
    if missing < 0 or kth.isnan():  # the k-th value is NaN itself: no threshold separates the set
        return torch.argsort(flat, descending=True, stable=True)[:k].sort().values
    chosen[(flat == kth).nonzero().squeeze(1)[:missing]] = True
    return chosen.nonzero().squeeze(1)


def keep_mask(score: Tensor, n_keep: int) -> Tensor:
    """Boolean mask (shape of ``score``) marking the ``n_keep`` entries to keep (see ``top_k_indices``)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[top_k_indices(score, n_keep)] = True
    return mask.reshape(score.shape)
