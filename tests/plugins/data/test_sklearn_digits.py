"""sklearn digits: every image once, split fixed whatever the run's seed, features scaled to [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from potstill.plugins.data.sklearn_digits import SklearnDigits


def test_split_sizes_and_scaling(digits):
    assert len(digits.heldout) == 360 and len(digits.train) == 1797 - 360
    features = np.stack([x for x, _ in digits.train + digits.heldout])
    assert features.shape == (1797, 64) and features.dtype == np.float32
    assert features.min() == 0.0 and features.max() == 1.0
    labels = [y for _, y in digits.heldout]
    assert set(labels) == set(range(10))  # a shuffle, so every class is held out


def test_heldout_disjoint_from_train_and_independent_of_seed(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    rows = {row.tobytes(): i for i, row in enumerate((raw.data / 16.0).astype(np.float32))}
    assert len(rows) == 1797  # no duplicate images, so rows identify examples
    train_ids = [rows[x.tobytes()] for x, _ in digits.train]
    heldout_ids = [rows[x.tobytes()] for x, _ in digits.heldout]
    assert sorted(train_ids + heldout_ids) == list(range(1797))  # every image exactly once
    assert all(raw.target[rows[x.tobytes()]] == y for x, y in digits.train + digits.heldout)
    # the split is a pure function of the data: loading again (any run seed) gives the same held-out set
    again = SklearnDigits().load(None)
    assert [rows[x.tobytes()] for x, _ in again.heldout] == heldout_ids
    assert heldout_ids != list(range(360))  # shuffled, not the first images


def test_heldout_bounds():
    assert len(SklearnDigits(heldout=100).load(None).heldout) == 100
    with pytest.raises(ValidationError):
        SklearnDigits(heldout=1797)
