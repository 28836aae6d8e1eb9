"""SSVI at 95% sparsity stays within 2 points of dense VI on digits (same preset and budget)."""

from pathlib import Path

import pytest

from ssvi_cli import config as C
from ssvi_cli.training.trainer import Trainer


@pytest.mark.slow
def test_ssvi_095_within_two_points_of_dense_vi_over_three_seeds(tmp_path: Path):
    acc = {"ssvi": [], "vi": []}
    for seed in (0, 1, 2):
        for method in acc:
            cfg = C.apply_overrides(C.load_preset("digits_mlp"),
                                    {"sparse.method": method, "sparse.sparsity": 0.95, "train.seed": seed})
            summary = Trainer.create(cfg, tmp_path / f"{method}-{seed}").fit()
            acc[method].append(summary["test_accuracy"])
    mean = {m: sum(v) / len(v) for m, v in acc.items()}
    assert mean["vi"] > 0.95, acc
    assert mean["vi"] - mean["ssvi"] <= 0.02, acc
