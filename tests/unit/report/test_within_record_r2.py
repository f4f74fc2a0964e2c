"""within_record_r2 (report/evaluate.py), worked by hand."""

import numpy as np
import pytest

from emdpo_ray.report.evaluate import within_record_r2


def _records(pad: bool):
    # four records of two responses; within a record x differs by 2 everywhere, y by 2 in
    # records 0 and 1 and by 0 in records 2 and 3 (per-record offsets must not matter)
    x = np.array([[0.0, 2.0], [5.0, 7.0], [1.0, 3.0], [-4.0, -2.0]])[..., None]
    y = np.array([[10.0, 12.0], [0.0, 2.0], [3.0, 3.0], [-1.0, -1.0]])
    mask = np.ones((4, 2), bool)
    if pad:  # a third, padded response with values that would spoil every figure
        x = np.concatenate([x, np.full((4, 1, 1), 1e3)], 1)
        y = np.concatenate([y, np.full((4, 1), -1e3)], 1)
        mask = np.concatenate([mask, np.zeros((4, 1), bool)], 1)
    return x, mask, y


@pytest.mark.parametrize("pad", [False, True])
def test_by_hand(pad):
    # two folds: {0, 2} and {1, 3}. Centred, x = -1, +1 in every record, y = -1, +1 in the
    # first two and 0, 0 in the others. Each fold trains on one record of each kind: slope
    # (1 + 1) / 4 = 0.5, so every test response is predicted +-0.5. Squared errors: 0.25 on
    # each of the 8 responses = 2; the variance of y: 4 responses of 1 = 4; R^2 = 1 - 2/4.
    x, mask, y = _records(pad)
    assert within_record_r2(x, mask, y, ridge=0.0, folds=2) == pytest.approx(0.5)


def test_linear_reward_is_carried_and_noise_is_not():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3, 4))
    mask = np.ones((200, 3), bool)
    assert within_record_r2(x, mask, x @ np.array([1.0, -2.0, 0.0, 0.5]), ridge=1e-6) \
        == pytest.approx(1.0, abs=1e-9)
    assert within_record_r2(x, mask, rng.normal(size=(200, 3))) < 0.05
