"""ssvi_cli.evaluation: data selection, Monte Carlo prefixes, seeding, OOD blocks and errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ssvi_cli import config as C
from ssvi_cli.evaluation import evaluator as E
from ssvi_cli.evaluation.inputs import load_eval_data
from ssvi_cli.evaluation.ood_sets import load_ood
from ssvi_cli.modelfile import Training
from ssvi_cli import metrics as M
from ssvi_cli.data import DataError, DatasetUnavailable, get_spec
from ssvi_cli.training.trainer import Trainer
from ssvi_cli.runs.load import LoadedModel, load_model
from ssvi_cli.prediction import predict_batch


def _train(run_dir: Path, **over) -> LoadedModel:
    base = {"train.epochs": 4, "sparse.sparsity": 0.95, "sparse.delta_t": 10, "train.eval_samples": 2}
    base.update(over)
    Trainer.create(C.apply_overrides(C.load_preset("digits_mlp"), base), run_dir).fit()
    return load_model(run_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, LoadedModel]:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    return run_dir, _train(run_dir)


def _evaluate(loaded: LoadedModel, ood=(), **opts) -> E.EvaluationResult:
    data = load_eval_data(loaded.spec, loaded.card.training, split=opts.pop("split", "test"), ood=ood,
                            seed=opts.get("seed", 0), ood_max_items=300)
    return E.evaluate(loaded.model, data, E.EvalOptions(**opts))


def _numbers(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("text, expected", [("30", (30,)), ("1,5,10,30", (1, 5, 10, 30)),
                                            ("10, 1,10", (1, 10)), (" 7 ", (7,))])
def test_parse_samples_accepts_lists(text, expected):
    assert E.parse_samples(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-3", "1,,5", "five", "2.5", "1;5"])
def test_parse_samples_rejects_bad_strings(text):
    with pytest.raises(ValueError, match="--samples"):
        E.parse_samples(text)


@pytest.mark.parametrize("kwargs", [{"split": "train"}, {"mode": "map"}, {"samples": (5, 1)},
                                    {"samples": (0,)}, {"samples": ()}, {"batch_size": 0}])
def test_options_reject_invalid_values(kwargs):
    with pytest.raises(ValueError):
        E.EvalOptions(**kwargs)


# --------------------------------------------------------------------------- numbers


def test_report_has_every_metric_with_samples_and_mode(run):
    _, loaded = run
    report = _evaluate(loaded, ood=("noise",), samples=(1, 4)).report
    assert report["mode"] == "mc" and report["samples"] == 4 and report["sample_counts"] == [1, 4]
    assert report["dataset"] == "digits" and report["split"] == "test" and report["n"] == 360
    assert set(report["metrics"]) == {
        "accuracy", "nll", "brier", "ece", "debiased_marginal_l2_ce", "entropy_mean", "mi_mean",
        "misclassification_auroc_entropy", "misclassification_auroc_max_prob"}
    assert report["metrics"]["accuracy"] > 0.7
    assert [row["samples"] for row in report["per_samples"]] == [1, 4]
    assert report["per_samples"][-1]["metrics"] == report["metrics"]
    # One Monte Carlo draw has no disagreement between samples: its MI, 0 whatever the model, is no
    # measurement and ranks nothing, so it is left out (None, no OOD score), as in mean mode.
    assert report["per_samples"][0]["metrics"]["mi_mean"] is None
    assert "mutual_information" not in report["per_samples"][0]["ood"]["noise"]["scores"]
    assert report["per_samples"][-1]["ood"] == report["ood"]  # the largest S is the headline
    assert report["metrics"]["mi_mean"] > 0
    noise = report["ood"]["noise"]
    assert noise["n"] == 300
    assert set(noise["scores"]) == set(M.UNCERTAINTY_SCORES)
    for values in noise["scores"].values():
        assert set(values) == {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"}
    # OOD is the positive class: uniform noise is more uncertain than digits for a trained model.
    assert noise["scores"]["entropy"]["auroc"] > 0.8


def test_smaller_sample_counts_are_prefixes_of_one_pass(run):
    """The S=3 numbers of a (3, 8) evaluation equal an independent 3-sample prediction."""
    _, loaded = run
    report = _evaluate(loaded, ood=("noise",), samples=(3, 8), seed=5, batch_size=1000).report
    data = load_eval_data(loaded.spec, loaded.card.training)
    x = torch.stack([data.inputs[i][0] for i in range(len(data.inputs))])
    y = np.array([data.inputs[i][1] for i in range(len(data.inputs))])
    torch.manual_seed(5)
    probs, sample_probs = predict_batch(loaded.model, x, samples=3, mode="mc")
    expected = M.classification_metrics(probs.double(), y, sample_probs.double())
    got = report["per_samples"][0]["metrics"]
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    # ... and a run asked only for S=3 reports the same numbers.
    alone = _evaluate(loaded, samples=(3,), seed=5, batch_size=1000).report
    assert alone["metrics"] == got


def test_same_seed_gives_identical_numbers_and_another_seed_does_not(run):
    _, loaded = run
    first = _evaluate(loaded, ood=("noise",), samples=(2, 6), seed=3)
    second = _evaluate(loaded, ood=("noise",), samples=(2, 6), seed=3)
    assert _numbers(first.report) == _numbers(second.report)
    assert np.array_equal(first.scores_ood["noise"]["entropy"], second.scores_ood["noise"]["entropy"])
    other = _evaluate(loaded, ood=("noise",), samples=(2, 6), seed=4).report
    assert other["metrics"]["mi_mean"] != first.report["metrics"]["mi_mean"]


def test_evaluation_leaves_the_callers_random_stream_alone(run):
    _, loaded = run
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _evaluate(loaded, samples=(2,))
    assert torch.equal(torch.rand(3), expected)


def test_ood_numbers_do_not_depend_on_the_other_sets_requested(run):
    _, loaded = run
    alone = _evaluate(loaded, ood=("noise",), samples=(3,)).report
    both = _evaluate(loaded, ood=("sklearn-photos", "noise"), samples=(3,)).report
    assert list(both["ood"]) == ["sklearn-photos", "noise"]
    assert both["ood"]["noise"] == alone["ood"]["noise"]
    assert both["metrics"] == alone["metrics"]


def test_mean_mode_has_no_samples_and_no_mutual_information(run):
    _, loaded = run
    report = _evaluate(loaded, ood=("noise",), mode="mean").report
    assert report["mode"] == "mean" and report["samples"] is None and report["sample_counts"] == []
    assert report["metrics"]["mi_mean"] is None
    assert set(report["ood"]["noise"]["scores"]) == {"entropy", "one_minus_max_prob"}
    # The mean network draws nothing: another seed gives the very same numbers.
    assert _evaluate(loaded, mode="mean", seed=9).report["metrics"] == report["metrics"]


def test_deterministic_model_is_evaluated_as_the_mean_network(tmp_path):
    loaded = _train(tmp_path / "rigl", **{"sparse.method": "rigl", "train.epochs": 1})
    report = _evaluate(loaded, samples=(5,)).report
    assert report["mode"] == "mean" and report["samples"] is None
    assert any("deterministic" in note for note in report["notes"])


def test_reliability_matches_the_metrics_module(run):
    _, loaded = run
    report = _evaluate(loaded, samples=(2,)).report
    rel = report["reliability"]
    assert len(rel["count"]) == 15 and sum(rel["count"]) == report["n"]
    used = [i for i, c in enumerate(rel["count"]) if c]
    ece = sum(rel["count"][i] * abs(rel["accuracy"][i] - rel["confidence"][i]) for i in used) / report["n"]
    assert ece == pytest.approx(report["metrics"]["ece"], abs=1e-9)
    assert all(rel["accuracy"][i] is None for i, c in enumerate(rel["count"]) if not c)


# --------------------------------------------------------------------------- data selection


def test_val_split_is_the_training_time_validation_split(run):
    run_dir, loaded = run
    trainer = Trainer.resume(run_dir)
    data = load_eval_data(loaded.spec, loaded.card.training, split="val")
    assert data.split == "val"
    assert torch.equal(data.inputs.indices, trainer.splits.val.indices)
    assert len(data.inputs) < len(load_eval_data(loaded.spec, loaded.card.training).inputs)


def test_val_split_needs_the_recorded_training_config(run):
    _, loaded = run
    with pytest.raises(DataError, match="--split test"):
        load_eval_data(loaded.spec, Training(), split="val")


def test_unknown_names_list_the_valid_ones(run):
    _, loaded = run
    with pytest.raises(DataError, match="valid names are: .*digits.*mnist"):
        load_eval_data(loaded.spec, loaded.card.training, dataset="imagenet")
    with pytest.raises(DataError, match="valid names are: .*noise.*sklearn-photos"):
        load_eval_data(loaded.spec, loaded.card.training, ood=("gaussian",))


def test_in_distribution_set_is_refused_as_ood():
    # Checked before any file is read, so no MNIST files are needed.
    with pytest.raises(DataError, match="--ood mnist is the in-distribution dataset itself"):
        load_eval_data(get_spec("mnist"), Training(), ood=("noise", "mnist"))


def test_dataset_with_other_shape_is_refused_with_a_hint(run):
    _, loaded = run
    with pytest.raises(DataError, match=r"takes \(1, 8, 8\).*--ood mnist"):
        load_eval_data(loaded.spec, loaded.card.training, dataset="mnist")


def test_ood_shapes_that_cannot_be_reconciled_are_named():
    two_channel = replace(get_spec("digits"), input_shape=(2, 8, 8), mean=(0.3, 0.3), std=(0.4, 0.4))
    with pytest.raises(DataError, match=r"OOD set sklearn-photos cannot be converted .*\(2, 8, 8\).*3-channel"):
        load_ood("sklearn-photos", two_channel, None, False, 0, 20)
    # The same set converts to a gray 8x8 model (luminance + resize).
    assert load_ood("sklearn-photos", get_spec("digits"), None, False, 0, 20).images.shape == (20, 1, 8, 8)


def test_missing_torchvision_data_offline_says_how_to_get_it(run, tmp_path):
    _, loaded = run
    with pytest.raises(DatasetUnavailable, match="--download"):
        load_eval_data(loaded.spec, loaded.card.training, ood=("svhn",), data_dir=tmp_path)


def test_a_class_subset_is_rebuilt_from_the_spec_alone(tmp_path):
    loaded = _train(tmp_path / "part", **{"data.classes": ("3", "8"), "train.epochs": 1})
    data = load_eval_data(loaded.spec, Training(), ood=("heldout",), ood_max_items=None)  # no training config
    assert loaded.spec.class_names == ("3", "8") and set(data.inputs.labels.tolist()) == {0, 1}
    assert len(data.inputs) + len(data.ood["heldout"]) == 360
    with pytest.raises(DataError, match="^--ood mnist is given twice, as mnist=/a and as mnist=/b; give it once$"):
        load_eval_data(loaded.spec, Training(), ood=("mnist=/a", "mnist=/b"))
    # the folder --data-dir gives may be the same one: the message does not say the folders differ
    with pytest.raises(DataError, match="^--ood mnist is given twice, as mnist=/a and as mnist; give it once$"):
        load_eval_data(loaded.spec, Training(), ood=("mnist=/a", "mnist"), data_dir=Path("/a"))


def test_duplicate_ood_names_are_evaluated_once(run):
    _, loaded = run
    data = load_eval_data(loaded.spec, loaded.card.training, ood=("noise", "noise"), ood_max_items=50)
    assert list(data.ood) == ["noise"] and data.total_items() == 360 + 50


def test_class_names_must_match_unless_the_model_has_placeholder_names():
    import dataclasses

    from ssvi_cli.data import DataError, get_spec
    from ssvi_cli.evaluation.inputs import _check_compatible

    mnist = get_spec("mnist")
    named = dataclasses.replace(mnist, class_names=tuple(f"class {i}" for i in range(10)))
    placeholders = dataclasses.replace(mnist, class_names=tuple(str(i) for i in range(10)))
    _check_compatible("kmnist", named, placeholders)  # ssvi.save without class_names: nothing to compare
    with pytest.raises(DataError, match=r"class 0 is 'class 0' there and '0 - zero' in the model.*"
                                        r"score it as out-of-distribution with --ood kmnist"):
        _check_compatible("kmnist", named, mnist)
