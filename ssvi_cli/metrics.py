"""Evaluation metrics of METHOD.md §6: calibration, uncertainty and OOD detection.

Inputs are numpy arrays or torch tensors (converted once, computed in float64):
``probs`` (N, C) predictive probabilities (for a BNN, the Bayesian model average), ``labels`` (N,)
integer classes, ``sample_probs`` (S, N, C) the per-sample softmax outputs. Every function is pure
and returns plain floats or numpy arrays. Entropies use the natural logarithm.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["UNCERTAINTY_SCORES", "accuracy", "average_precision", "brier", "classification_metrics",
           "debiased_marginal_l2_ce", "ece", "expected_entropy", "marginal_l2_ce", "misclassification_auroc",
           "mutual_information", "nll", "ood_metrics", "predictive_entropy", "reliability_bins", "roc_auc",
           "uncertainty_score"]


def _array(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """A numpy copy of ``x`` (torch tensors are detached and moved to the CPU first)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _inputs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _array(probs), _array(labels, np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"expected probs (N, C) and labels (N,), got {p.shape} and {y.shape}")
    return p, y


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of examples with ``argmax_c p_c == y``."""
    p, y = _inputs(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``−(1/N) Σ_n log max(p_{n,y_n}, eps)``."""
    p, y = _inputs(probs, labels)
    return max(0.0, float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], eps)))))  # not -0.0 where every p is 1


def brier(probs: Any, labels: Any) -> float:
    """Brier score ``(1/N) Σ_n Σ_c (p_{n,c} − 1[c = y_n])²`` (in [0, 2])."""
    p, y = _inputs(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability diagram on equal-width bins ``(lo, hi]`` over [0, 1].

    Confidence ``max_c p_c`` falls in bin ``b`` when ``lower[b] < conf ≤ upper[b]``; a confidence of
    exactly 0 goes in the first bin. Returns arrays of length ``n_bins``: ``lower``, ``upper``,
    ``count``, ``confidence`` (mean confidence) and ``accuracy`` (both nan for an empty bin).
    """
    p, y = _inputs(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "confidence": mean_conf, "accuracy": mean_acc}


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error ``Σ_b (n_b/N)·|acc_b − conf_b|`` (bins of ``reliability_bins``)."""
    bins = reliability_bins(probs, labels, n_bins)
    count = bins["count"]
    used = count > 0
    gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(count[used] * gaps) / count.sum())


def _equal_mass_bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value under the equal-mass binning of Kumar et al. (2019).

    The sorted values are split into ``min(n_bins, N)`` consecutive parts of near-equal size (the
    first ``N mod parts`` one longer); boundaries are the midpoints between the last value of a part
    and the first of the next, plus 1.0, deduplicated; a value goes in the first bin whose upper
    boundary is ≥ it, so bins are ``(b_{i−1}, b_i]`` (values above 1 by rounding join the last bin).
    """
    n = len(p)
    parts = min(n_bins, n)
    s = np.sort(p)
    sizes = np.full(parts, n // parts)
    sizes[: n % parts] += 1
    ends = np.cumsum(sizes)[:-1]
    bounds = np.unique(np.append((s[ends - 1] + s[ends]) / 2.0, 1.0))
    return np.minimum(np.searchsorted(bounds, p, side="left"), len(bounds) - 1)


def _class_squared_ce(p: np.ndarray, y: np.ndarray, n_bins: int, debias: bool) -> float:
    """Σ_b (n_b/N)·[(p̄_b − ȳ_b)² − debias·ȳ_b(1 − ȳ_b)/(n_b − 1)] for one class (see ``marginal_l2_ce``)."""
    idx = _equal_mass_bin_index(p, n_bins)
    nb = np.bincount(idx).astype(np.float64)
    used = nb > 0
    p_bar = np.bincount(idx, weights=p)[used] / nb[used]
    y_bar = np.bincount(idx, weights=y)[used] / nb[used]
    nb = nb[used]
    err = (p_bar - y_bar) ** 2
    if debias:
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.where(nb >= 2, err - y_bar * (1.0 - y_bar) / (nb - 1.0), 0.0)
    return float(np.sum(nb * err) / len(p))


def marginal_l2_ce(probs: Any, labels: Any, n_bins: int = 15, debias: bool = True) -> float:
    """Class-marginal L2 calibration error with equal-mass bins (Kumar, Liang & Ma, 2019).

    For each class k, with p = probs[:, k], y = 1[label = k] and the equal-mass bins B of p
    (``_equal_mass_bin_index``):

        E_k = Σ_{b∈B} (n_b/N)·[(p̄_b − ȳ_b)² − ȳ_b(1 − ȳ_b)/(n_b − 1)]

    where the subtracted term (only with ``debias``) is the unbiased estimate of the sampling
    variance of ȳ_b that inflates the plug-in square; bins with n_b < 2 contribute 0. The result is
    ``sqrt(mean_k max(E_k, 0))``: each class's debiased estimate is clipped at 0 (it can be
    negative when the model is nearly calibrated), classes are *averaged* (as the paper's
    ``calibration`` library does, mode ``marginal``, p = 2), and the root is taken last.
    """
    p, y = _inputs(probs, labels)
    per_class = [
        max(_class_squared_ce(p[:, k], (y == k).astype(np.float64), n_bins, debias), 0.0) for k in range(p.shape[1])
    ]
    return float(math.sqrt(np.mean(per_class)))


def debiased_marginal_l2_ce(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """The debiased class-marginal L2 CE the SSVI reference code reports (``marginal_l2_ce``, debias on)."""
    return marginal_l2_ce(probs, labels, n_bins, debias=True)


def _entr(p: np.ndarray) -> np.ndarray:
    """Elementwise ``-p log p`` with ``0 log 0 = 0``."""
    out = np.zeros_like(p)
    positive = p > 0
    out[positive] = -p[positive] * np.log(p[positive])
    return out


def predictive_entropy(probs: Any) -> np.ndarray:
    """Per-example entropy ``H[p] = −Σ_c p_c log p_c`` (0·log 0 = 0), shape (N,)."""
    return _entr(np.clip(_array(probs), 0.0, 1.0)).sum(axis=-1)


def expected_entropy(sample_probs: Any) -> np.ndarray:
    """Per-example mean over samples of the entropy, ``(1/S) Σ_s H[p^{(s)}]``, shape (N,)."""
    sp = _array(sample_probs)
    if sp.ndim != 3:
        raise ValueError(f"expected sample_probs (S, N, C), got {sp.shape}")
    return predictive_entropy(sp).mean(axis=0)


MI_BLOCK = 1 << 20  # elements of sample_probs taken to float64 at a time (8 MB), however many examples


def mutual_information(sample_probs: Any) -> np.ndarray:
    """Epistemic part ``I = H[(1/S) Σ_s p^{(s)}] − (1/S) Σ_s H[p^{(s)}] ≥ 0`` per example.

    Jensen makes it non-negative; rounding negatives (~1e-16) are clipped to 0. Computed a block of
    examples at a time: the working arrays are a few blocks (:data:`MI_BLOCK`), not a few times the input.
    """
    sp = sample_probs.detach().cpu().numpy() if hasattr(sample_probs, "detach") else np.asarray(sample_probs)
    if sp.ndim != 3:
        raise ValueError(f"expected sample_probs (S, N, C), got {sp.shape}")
    rows = max(1, MI_BLOCK // max(1, sp.shape[0] * sp.shape[2]))
    return np.concatenate([np.maximum(predictive_entropy(b.mean(axis=0)) - expected_entropy(b), 0.0)
                           for b in (_array(sp[:, i:i + rows]) for i in range(0, sp.shape[1], rows))] or [np.zeros(0)])


def _one_minus_max_prob(probs: Any, sample_probs: Any = None) -> np.ndarray:
    """``1 − max_c p_c``."""
    return 1.0 - _array(probs).max(axis=-1)


def _entropy_score(probs: Any, sample_probs: Any = None) -> np.ndarray:
    """Predictive entropy of the (model-averaged) probabilities."""
    return predictive_entropy(probs)


def _mi_score(probs: Any, sample_probs: Any = None) -> np.ndarray:
    """Mutual information; needs the per-sample probabilities."""
    if sample_probs is None:
        raise ValueError("the mutual_information score needs sample_probs (S, N, C)")
    return mutual_information(sample_probs)


UncertaintyFn = Callable[[Any, Any], np.ndarray]

UNCERTAINTY_SCORES: dict[str, UncertaintyFn] = {
    "entropy": _entropy_score,
    "mutual_information": _mi_score,
    "one_minus_max_prob": _one_minus_max_prob,
}
"""Name -> ``score(probs, sample_probs=None)``, per example, higher = more uncertain."""


def uncertainty_score(name: str, probs: Any, sample_probs: Any = None) -> np.ndarray:
    """Evaluate the uncertainty score ``name`` of ``UNCERTAINTY_SCORES``."""
    if name not in UNCERTAINTY_SCORES:
        raise ValueError(f"unknown uncertainty score {name!r}; valid names are {', '.join(UNCERTAINTY_SCORES)}")
    return UNCERTAINTY_SCORES[name](probs, sample_probs)


def _threshold_steps(positive: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives flagged (score ≥ τ) at each distinct score τ, highest τ first: the
    steps of the ROC and precision-recall curves, ties taken together. ``positive``: 1 or 0 (or
    True/False) per score."""
    labels, s = _array(positive).ravel(), _array(score).ravel()
    if labels.shape != s.shape:
        raise ValueError(f"{len(labels)} labels for {len(s)} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 1 (positive) or 0 (negative)")
    if labels.min(initial=1) == labels.max(initial=0):
        raise ValueError("a detection score needs both positive and negative examples")
    if not np.isfinite(s).all():
        raise ValueError("a detection score must be finite (NaN or infinity found)")
    order = np.argsort(-s, kind="stable")
    ranked = s[order]
    ends = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), len(ranked) - 1]  # each tie's last
    tp = np.cumsum(labels[order])[ends]
    return tp, ends + 1 - tp


def _roc(positive: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates from the highest threshold down, starting at (0, 0)."""
    tp, fp = _threshold_steps(positive, score)
    return np.r_[0.0, fp] / fp[-1], np.r_[0.0, tp] / tp[-1]


def roc_auc(positive: Any, score: Any) -> float:
    """Area under the ROC curve of ``score`` (higher = more likely positive) for labels ``positive``
    (1 or 0 each; trapezoids: a tie counts half), what scikit-learn's ``roc_auc_score`` gives,
    without its seconds-long import."""
    fpr, tpr = _roc(positive, score)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(positive: Any, score: Any) -> float:
    """Σ (Rₖ − Rₖ₋₁) Pₖ over the distinct scores as thresholds (tied scores one step), scikit-learn's
    ``average_precision_score``, summed as Σ (TPₖ − TPₖ₋₁) Pₖ / P: a perfect separation gives exactly
    1 (recall steps summed as fractions gave 1 ± 2e-16, shown as 0.9999999999999999); capped at 1."""
    tp, fp = _threshold_steps(positive, score)
    return min(1.0, float(np.sum(np.diff(tp, prepend=0) * (tp / (tp + fp))) / tp[-1]))


def misclassification_auroc(probs: Any, labels: Any, score: Any) -> float:
    """AUROC of ``score`` (higher = more uncertain) at detecting errors (positives = misclassified).

    nan when every example is right or every one is wrong (the AUROC is undefined).
    """
    p, y = _inputs(probs, labels)
    errors = (p.argmax(axis=1) != y).astype(np.int64)
    if errors.min() == errors.max():
        return float("nan")
    return roc_auc(errors, score)


def ood_metrics(score_in: Any, score_out: Any) -> dict[str, float]:
    """OOD detection with OOD as the positive class and higher score = more OOD.

    ``auroc``; ``aupr_out`` = average precision with OOD positive; ``aupr_in`` = average precision
    with in-distribution positive and score ``−score``; ``fpr_at_95_tpr`` = fraction of
    in-distribution examples flagged (score ≥ τ) at the highest threshold τ that flags ≥ 95% of OOD.
    """
    s_in, s_out = _array(score_in).ravel(), _array(score_out).ravel()
    y = np.concatenate([np.zeros(len(s_in), np.int64), np.ones(len(s_out), np.int64)])
    s = np.concatenate([s_in, s_out])
    fpr, tpr = _roc(y, s)
    return {
        "auroc": roc_auc(y, s),
        "aupr_in": average_precision(1 - y, -s),
        "aupr_out": average_precision(y, s),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def has_spread(sample_probs: Optional[Any]) -> bool:
    """Whether draws ``(S, N, C)`` can disagree: two or more (one draw's MI is 0 whatever the model)."""
    return sample_probs is not None and len(sample_probs) >= 2


def classification_metrics(
    probs: Any, labels: Any, sample_probs: Optional[Any] = None, n_bins: int = 15
) -> dict[str, Optional[float]]:
    """All in-distribution numbers under stable keys.

    ``accuracy, nll, brier, ece, debiased_marginal_l2_ce, entropy_mean, mi_mean`` (None without two
    draws, :func:`has_spread`), ``misclassification_auroc_entropy``, ``..._max_prob`` (``1 − max p``)."""
    p, y = _inputs(probs, labels)
    return {
        "accuracy": accuracy(p, y),
        "nll": nll(p, y),
        "brier": brier(p, y),
        "ece": ece(p, y, n_bins),
        "debiased_marginal_l2_ce": debiased_marginal_l2_ce(p, y, n_bins),
        "entropy_mean": float(predictive_entropy(p).mean()),
        "mi_mean": float(mutual_information(sample_probs).mean()) if has_spread(sample_probs) else None,
        "misclassification_auroc_entropy": misclassification_auroc(p, y, predictive_entropy(p)),
        "misclassification_auroc_max_prob": misclassification_auroc(p, y, _one_minus_max_prob(p)),
    }
