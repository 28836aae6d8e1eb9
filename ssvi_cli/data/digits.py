"""The embedded digits: scikit-learn's bundled 8x8 handwritten digits (1797 images of 0-16 grey
levels, 10 classes) and the fixed split of 360 test images, read without importing scikit-learn, whose
import (with SciPy) takes seconds that every process training on digits, a sweep's cells included,
would pay before its first step."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

COUNT = 1797
TEST_FRACTION = 0.2
TEST_SEED = 20_240_601
# Bit i is set where image i is a test image: the split of sklearn.model_selection.train_test_split(
# range(1797), test_size=TEST_FRACTION, random_state=TEST_SEED, stratify=labels), stored so that the
# split is the one every recorded digits run used whatever scikit-learn's version (tests/test_data.py
# recomputes it).
_TEST_BITS = int(
    "5100000108104c5a1021401b0000000202c00329050400802850400048212180a014c0600002b80209c204189008"
    "492088c380246a484500a1800808c2000000900c1600a000a8080004419263e03c80308ae09000b3484212045400"
    "160a0b401c1601800001428804241220040a020240480200405000085600828e8ac48055012020000400180000d0"
    "e601090000304001208900250148002100262180504004105040023428004040220070020046003020100012e044"
    "818042e0018442004184908041a260001000902d04200000914c000b098b150080480c81801800020", 16)


def _bundled_csv() -> Optional[Path]:
    """scikit-learn's own copy of the data, found without running its package (None if not there)."""
    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec is not None else None
    for root in roots or ():
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load() -> tuple[np.ndarray, np.ndarray]:
    """Images (1797, 8, 8), float64 in [0, 16], and labels (1797,), int64: what
    ``sklearn.datasets.load_digits()`` gives as ``images`` and ``target``."""
    path = _bundled_csv()
    if path is not None:
        try:
            table = np.loadtxt(path, delimiter=",")  # 64 pixels and the label per row
        except (OSError, ValueError):
            table = None
        if table is not None and table.shape == (COUNT, 65):
            return table[:, :-1].reshape(COUNT, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # its file moved or unreadable: the public way

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def split_indices(train: bool) -> np.ndarray:
    """The sorted indices of the training (1437) or test (360) images."""
    test = np.array([(_TEST_BITS >> i) & 1 for i in range(COUNT)], dtype=bool)
    return np.flatnonzero(~test if train else test)
