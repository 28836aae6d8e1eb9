"""Metrics (METHOD.md §6) against hand computations and independent loop-based reimplementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssvi_cli import metrics as M


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _random_case(n: int = 2000, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = _softmax(2.0 * rng.normal(size=(n, c)))
    labels = rng.integers(0, c, size=n)
    return probs, labels


def _calibrated_case(n: int, c: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the predicted distribution: perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    probs = _softmax(1.5 * rng.normal(size=(n, c)))
    u = rng.random(n)[:, None]
    labels = np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), c - 1)
    return probs, labels


def _loop_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    total = 0.0
    n = len(labels)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        conf_sum = acc_sum = count = 0.0
        for row, y in zip(probs, labels):
            conf = max(row)
            in_bin = (lo < conf <= hi) or (b == 0 and conf == 0.0)
            if in_bin:
                count += 1
                conf_sum += conf
                acc_sum += float(int(np.argmax(row)) == y)
        if count:
            total += count / n * abs(acc_sum / count - conf_sum / count)
    return total


def test_accuracy_nll_brier_by_hand() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0]])
    labels = np.array([0, 1, 0])
    assert M.accuracy(probs, labels) == pytest.approx(2 / 3)  # argmax of the tie is class 0
    assert M.nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.5)) / 3)
    b = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.7**2 + 0.6**2) + (0.5**2 + 0.5**2)) / 3
    assert M.brier(probs, labels) == pytest.approx(b)
    assert M.nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))
    assert str(M.nll(np.array([[1.0, 0.0]]), np.array([0]))) == "0.0"  # not -0.0, which prints as -0.0000


def test_a_tiny_metric_prints_its_digits_and_zero_prints_as_zero() -> None:
    from ssvi_cli.cli.common import fmt

    assert [fmt(3.14e-5), fmt(-2e-6), fmt(0.0), fmt(0.0005), fmt(0.98333), fmt(None)] == [
        "3.14e-05", "-2.00e-06", "0.0000", "0.0005", "0.9833", "-"]
    # a value that four places would round to a whole number it is not (--sparsity 0.99999 read as 1.0000)
    assert [fmt(0.99999), fmt(0.99994), fmt(1.0), fmt(2.999996), fmt(-0.99999), fmt(10132.98, 1)] == [
        "0.99999", "0.9999", "1.0000", "3.0000", "-0.99999", "10133.0"]  # a fraction only (a throughput as ever)
    # with the digits that tell it from 1, not all of them (an AUPR of 0.9999624784172702 broke its column)
    assert [fmt(0.9999624784172702), fmt(0.99999999), fmt(1 - 2**-52)] == ["0.99996", "0.99999999", "0.9999999999999998"]


def test_accepts_torch_tensors() -> None:
    probs, labels = _random_case(200)
    out_np = M.classification_metrics(probs, labels)
    out_t = M.classification_metrics(torch.from_numpy(probs).float(), torch.from_numpy(labels))
    for key, value in out_np.items():
        if value is None:
            assert out_t[key] is None
            continue
        assert out_t[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_ece_hand_computed() -> None:
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.35, 0.65], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    # n_bins=2: bin (0.5, 1] holds all four; conf mean 0.7625, acc 3/4
    assert M.ece(probs, labels, n_bins=2) == pytest.approx(abs(0.75 - (0.95 + 0.9 + 0.65 + 0.55) / 4))
    # n_bins=10: bins (0.9,1]: {0.95 ok}; (0.8,0.9]: {0.9 wrong}; (0.6,0.7]: {0.65 ok}; (0.5,0.6]: {0.55 ok}
    expected = (abs(1 - 0.95) + abs(0 - 0.9) + abs(1 - 0.65) + abs(1 - 0.55)) / 4
    assert M.ece(probs, labels, n_bins=10) == pytest.approx(expected)


def test_bin_boundaries_are_lower_open() -> None:
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    bins = M.reliability_bins(probs, np.array([0, 0]), n_bins=2)
    assert bins["count"].tolist() == [1, 1]  # 0.5 -> (0, 0.5]; 1.0 -> (0.5, 1]
    zero = M.reliability_bins(np.zeros((3, 1)), np.zeros(3, int), n_bins=4)
    assert zero["count"].tolist() == [3, 0, 0, 0]
    assert np.isnan(zero["confidence"][1]) and zero["lower"][0] == 0.0 and zero["upper"][-1] == 1.0


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_loop_reimplementation(n_bins: int) -> None:
    probs, labels = _random_case(600, seed=n_bins)
    assert M.ece(probs, labels, n_bins) == pytest.approx(_loop_ece(probs, labels, n_bins), abs=1e-12)
    bins = M.reliability_bins(probs, labels, n_bins)
    assert bins["count"].sum() == 600


def test_calibrated_data_has_small_errors() -> None:
    probs, labels = _calibrated_case(200_000)
    assert M.ece(probs, labels) < 0.01
    assert M.debiased_marginal_l2_ce(probs, labels) < 0.005


def test_debiasing_removes_upward_bias_of_plugin_l2() -> None:
    debiased, plugin = [], []
    for seed in range(20):
        probs, labels = _calibrated_case(1_000, seed=seed)
        debiased.append(M.debiased_marginal_l2_ce(probs, labels, n_bins=15) ** 2)
        plugin.append(M.marginal_l2_ce(probs, labels, n_bins=15, debias=False) ** 2)
    # the plug-in square carries about ȳ(1−ȳ)·bins/N of sampling noise; the debiased one does not
    # (15 bins / 1000 points · ~0.12 per class ≈ 1.8e-3); clipping at 0 leaves the debiased one a little
    assert np.mean(plugin) > 5 * np.mean(debiased)
    assert np.mean(plugin) > 1.2e-3
    assert np.mean(debiased) < 5e-4


def _loop_marginal_l2(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Independent reimplementation: explicit parts, boundaries, and per-bin loops."""
    n, c = probs.shape
    per_class = []
    for k in range(c):
        p = probs[:, k]
        y = (labels == k).astype(float)
        s = sorted(p)
        parts = min(n_bins, n)
        chunks, start = [], 0
        for i in range(parts):
            size = n // parts + (1 if i < n % parts else 0)
            chunks.append(s[start : start + size])
            start += size
        bounds = sorted({(chunks[i][-1] + chunks[i + 1][0]) / 2 for i in range(parts - 1)} | {1.0})
        members: dict[int, list[int]] = {}
        for j, v in enumerate(p):
            b = next((i for i, hi in enumerate(bounds) if v <= hi), len(bounds) - 1)
            members.setdefault(b, []).append(j)
        total = 0.0
        for idx in members.values():
            if len(idx) < 2:
                continue
            pb, yb = float(np.mean(p[idx])), float(np.mean(y[idx]))
            total += len(idx) / n * ((pb - yb) ** 2 - yb * (1 - yb) / (len(idx) - 1))
        per_class.append(max(total, 0.0))
    return math.sqrt(sum(per_class) / c)


@pytest.mark.parametrize("n_bins", [3, 15])
def test_debiased_l2_matches_loop_reimplementation(n_bins: int) -> None:
    probs, labels = _random_case(400, c=3, seed=11)
    probs[:40] = probs[40:80]  # duplicated values straddling boundaries
    assert M.debiased_marginal_l2_ce(probs, labels, n_bins) == pytest.approx(
        _loop_marginal_l2(probs, labels, n_bins), rel=1e-12
    )


def test_perfect_one_hot_classifier() -> None:
    labels = np.array([0, 2, 1, 1, 0])
    probs = np.eye(3)[labels]
    assert M.ece(probs, labels) == 0.0
    assert M.nll(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert M.brier(probs, labels) == 0.0
    assert M.accuracy(probs, labels) == 1.0
    assert M.debiased_marginal_l2_ce(probs, labels) == 0.0
    assert math.isnan(M.misclassification_auroc(probs, labels, M.predictive_entropy(probs)))


def test_entropy_of_uniform_and_one_hot() -> None:
    c = 7
    assert M.predictive_entropy(np.full((3, c), 1 / c)) == pytest.approx(np.full(3, math.log(c)))
    assert M.predictive_entropy(np.eye(c)).tolist() == [0.0] * c


def test_mutual_information_zero_when_samples_agree() -> None:
    probs, _ = _random_case(50, seed=3)
    agree = np.stack([probs] * 8)
    assert M.mutual_information(agree) == pytest.approx(np.zeros(50), abs=1e-12)
    assert (M.mutual_information(agree) >= 0).all()
    assert M.expected_entropy(agree) == pytest.approx(M.predictive_entropy(probs))


def test_mutual_information_positive_and_bounded_when_samples_disagree() -> None:
    rng = np.random.default_rng(5)
    sample_probs = _softmax(3.0 * rng.normal(size=(10, 100, 4)))
    mi = M.mutual_information(sample_probs)
    total = M.predictive_entropy(sample_probs.mean(axis=0))
    assert (mi > 0).all()
    assert (mi <= total + 1e-12).all()
    # two confident samples that disagree completely: MI = H[mean] = log 2
    split = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert M.mutual_information(split) == pytest.approx([math.log(2)])


def test_mutual_information_takes_a_block_of_examples_at_a_time(monkeypatch) -> None:
    """``ssvi_cli.predict`` on 100,000 inputs at S = 30 peaked 1.6 GB over its baseline: the whole
    (S, N, C) draws went to float64 and were copied about five times. The same numbers, in blocks."""
    import tracemalloc

    rng = np.random.default_rng(6)
    draws = _softmax(2.0 * rng.normal(size=(30, 10_000, 10))).astype(np.float32)  # 12 MB
    whole = np.asarray(draws, dtype=np.float64)
    direct = np.array([M.predictive_entropy(whole[:, i].mean(axis=0)) - M.predictive_entropy(whole[:, i]).mean()
                       for i in range(whole.shape[1])])
    assert M.mutual_information(draws) == pytest.approx(np.maximum(direct, 0.0), abs=1e-12)
    monkeypatch.setattr(M, "MI_BLOCK", 30 * 10 * 70)  # 70 examples a block: the last block is short
    del whole
    tracemalloc.start()
    try:
        blocked = M.mutual_information(torch.from_numpy(draws))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blocked.shape == (10_000,) and blocked == pytest.approx(np.maximum(direct, 0.0), abs=1e-12)
    assert peak < draws.nbytes / 4, peak  # a few blocks and the (N,) result; it was about 12 times the input


def test_ood_separable_reversed_and_tied() -> None:
    s_in, s_out = np.linspace(0, 1, 50), np.linspace(2, 3, 30)
    sep = M.ood_metrics(s_in, s_out)
    assert sep == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr_at_95_tpr": 0.0})
    rev = M.ood_metrics(s_out, s_in)
    assert rev["auroc"] == 0.0 and rev["fpr_at_95_tpr"] == 1.0
    tied = M.ood_metrics(np.ones(40), np.ones(60))
    assert tied["auroc"] == 0.5 and tied["fpr_at_95_tpr"] == 1.0


def test_ood_sign_convention_higher_is_more_ood() -> None:
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0.0, 1.0, 2000), rng.normal(1.5, 1.0, 2000)
    out = M.ood_metrics(s_in, s_out)
    assert out["auroc"] > 0.8
    # AUROC = P(score_out > score_in): checked by brute-force pair counting
    pairs = (s_out[:, None] > s_in[None, :]).mean() + 0.5 * (s_out[:, None] == s_in[None, :]).mean()
    assert out["auroc"] == pytest.approx(pairs, abs=1e-12)


def test_aupr_in_and_out_reflect_imbalance() -> None:
    rng = np.random.default_rng(2)
    s_in, s_out = rng.normal(0.0, 1.0, 5000), rng.normal(1.0, 1.0, 250)
    out = M.ood_metrics(s_in, s_out)
    # a precision-recall curve is anchored at the positive rate: OOD is the rare class here
    assert out["aupr_in"] > 0.95
    assert out["aupr_out"] < 0.5
    assert out["aupr_in"] > out["aupr_out"]
    swapped = M.ood_metrics(-s_out, -s_in)  # roles exchanged: in <-> out with the score negated
    assert swapped["aupr_in"] == pytest.approx(out["aupr_out"])
    assert swapped["aupr_out"] == pytest.approx(out["aupr_in"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr_at_95_tpr_matches_direct_threshold(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s_in = np.round(rng.normal(0.0, 1.0, 1000), 1)  # rounding creates ties
    s_out = np.round(rng.normal(2.0, 1.0, 333), 1)
    # highest threshold τ that flags (score ≥ τ) at least 95% of the OOD examples
    candidates = np.unique(s_out)[::-1]
    tau = next(t for t in candidates if np.mean(s_out >= t) >= 0.95)
    expected = np.mean(s_in >= tau)
    assert M.ood_metrics(s_in, s_out)["fpr_at_95_tpr"] == pytest.approx(expected)


def test_misclassification_auroc() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1])  # the two least confident are wrong
    score = M.UNCERTAINTY_SCORES["one_minus_max_prob"](probs, None)
    assert M.misclassification_auroc(probs, labels, score) == 1.0
    assert M.misclassification_auroc(probs, labels, -score) == 0.0
    assert math.isnan(M.misclassification_auroc(probs, np.array([1, 1, 1, 1]), score))  # all wrong


def test_uncertainty_scores_registry() -> None:
    rng = np.random.default_rng(9)
    sample_probs = _softmax(rng.normal(size=(4, 20, 3)))
    probs = sample_probs.mean(axis=0)
    assert set(M.UNCERTAINTY_SCORES) == {"entropy", "mutual_information", "one_minus_max_prob"}
    for name in M.UNCERTAINTY_SCORES:
        assert M.uncertainty_score(name, probs, sample_probs).shape == (20,)
    assert M.uncertainty_score("entropy", probs) == pytest.approx(M.predictive_entropy(probs))
    with pytest.raises(ValueError, match="sample_probs"):
        M.uncertainty_score("mutual_information", probs)
    with pytest.raises(ValueError, match="entropy"):
        M.uncertainty_score("variance", probs)


def test_classification_metrics_keys_and_values() -> None:
    rng = np.random.default_rng(4)
    sample_probs = _softmax(2.0 * rng.normal(size=(6, 300, 5)))
    probs = sample_probs.mean(axis=0)
    labels = rng.integers(0, 5, 300)
    out = M.classification_metrics(probs, labels, sample_probs)
    assert list(out) == [
        "accuracy",
        "nll",
        "brier",
        "ece",
        "debiased_marginal_l2_ce",
        "entropy_mean",
        "mi_mean",
        "misclassification_auroc_entropy",
        "misclassification_auroc_max_prob",
    ]
    assert out["ece"] == pytest.approx(M.ece(probs, labels))
    assert out["mi_mean"] == pytest.approx(M.mutual_information(sample_probs).mean())
    assert all(isinstance(v, float) for v in out.values())
    assert M.classification_metrics(probs, labels)["mi_mean"] is None


@pytest.mark.parametrize("n_in, n_out", [(360, 20), (93, 2000)])
def test_average_precision_of_a_perfect_separation_is_exactly_one(n_in, n_out):
    # sklearn's sum of recall steps rounds to 1 + 2e-16 for 360 in-distribution scores below 20 OOD
    # ones, and to 1 - 1e-16 for 93 in-distribution scores (shown as 0.9999999999999999)
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    found = False
    for _ in range(100):
        s_in, s_out = rng.random(n_in), 2 + rng.random(n_out)
        out = M.ood_metrics(s_in, s_out)
        assert out["aupr_in"] == 1.0 and out["aupr_out"] == 1.0 and out["auroc"] == 1.0
        y = np.r_[np.zeros(n_in), np.ones(n_out)]
        found |= average_precision_score(y, np.r_[s_in, s_out]) != 1.0 or average_precision_score(1 - y, -np.r_[s_in, s_out]) != 1.0
    assert found  # the rounding this guards against really occurs


def test_roc_and_precision_curves_agree_with_scikit_learn_ties_included():
    """AUROC, average precision and the ROC steps are computed here (scikit-learn's import takes
    seconds per evaluation); they agree with sklearn.metrics to a rounding, on tied and untied scores."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    rng = np.random.default_rng(1)
    for trial in range(600):
        n = int(rng.integers(2, 300))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        tied = trial % 2 == 1  # a few score levels, many ties, as a max probability of 1.0 gives
        s = rng.integers(0, int(rng.integers(1, 12)), n) / 7 if tied else rng.normal(size=n)
        assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.average_precision(y, s) == pytest.approx(min(1.0, average_precision_score(y, s)), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        ours = M._roc(y, s)
        assert np.array_equal(ours[0], fpr) and np.array_equal(ours[1], tpr)
    assert M.roc_auc([False, True, True], [0.3, 0.2, 0.9]) == roc_auc_score([0, 1, 1], [0.3, 0.2, 0.9])
    for y, s, why in (([1, 1], [0.1, 0.2], "both positive and negative"),
                      ([0, 1], [0.1, float("nan")], "must be finite"),
                      ([1, 2, 2], [0.1, 0.2, 0.3], "labels must be 1 .positive. or 0"),
                      ([-1, 1], [0.1, 0.2], "labels must be 1 .positive. or 0"),
                      ([0, 1, 1], [0.2, 0.1], "3 labels for 2 scores")):
        for metric in (M.roc_auc, M.average_precision):
            with pytest.raises(ValueError, match=why):
                metric(np.array(y), np.array(s))
    with pytest.raises(ValueError, match="4 labels for 3 scores"):  # a score per example, checked
        M.misclassification_auroc(np.eye(4)[[0, 1, 1, 0]], np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.8]))


def test_the_metrics_import_no_scikit_learn():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from ssvi_cli import metrics as M; rng = np.random.default_rng(0); "
            "p = rng.dirichlet(np.ones(3), 50); M.classification_metrics(p, rng.integers(0, 3, 50)); "
            "M.ood_metrics(rng.random(20), rng.random(5)); print('sklearn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == \
        ["False"]
