"""The EM driver's pure parts (train/driver.py): record weights, cross-fit scores, names,
the start's wait for the workers."""

import time

import numpy as np
import pytest

from emdpo_ray.train.driver import policy_names, record_weights, type_scores, waited


def test_policy_names():
    assert policy_names(2, False) == ["type_0", "type_1"]
    assert policy_names(2, True) == ["type_0", "type_1", "f0_type_0", "f0_type_1",
                                     "f1_type_0", "f1_type_1"]


def test_weights_without_cross_fitting_score_everything():
    g = np.array([[0.9, 0.1], [0.2, 0.8]])
    w, need = record_weights(g, None)
    np.testing.assert_array_equal(w, g)
    assert need.all()


def test_cross_fitting_trains_out_of_fold_and_scores_in_fold():
    g = np.array([[0.9, 0.1], [0.2, 0.8]])
    fold = np.array([0, 1])
    w, need = record_weights(g, fold)
    # columns: type_0, type_1 | f0_type_0, f0_type_1 (without fold 0) | f1_* (without fold 1)
    np.testing.assert_array_equal(w, [[0.9, 0.1, 0.0, 0.0, 0.9, 0.1],
                                      [0.2, 0.8, 0.2, 0.8, 0.0, 0.0]])
    assert need.tolist() == [[False, False, True, True, False, False],
                             [False, False, False, False, True, True]]
    scores = np.arange(12.0).reshape(2, 6)
    # record 0 (fold 0) takes f0's scores, record 1 (fold 1) takes f1's
    np.testing.assert_array_equal(type_scores(scores, 2, fold), [[2.0, 3.0], [10.0, 11.0]])
    np.testing.assert_array_equal(type_scores(scores, 2, None), scores[:, :2])
    # rewards [N, A, m] are picked the same way, whole rows of responses at a time
    rewards = np.arange(36.0).reshape(2, 6, 3)
    np.testing.assert_array_equal(type_scores(rewards, 2, fold),
                                  [rewards[0, 2:4], rewards[1, 4:6]])


def test_waited_records_the_wait_also_when_the_gather_fails():
    timings: dict = {}
    assert waited(lambda: time.sleep(0.05) or "states", timings)() == "states"
    assert timings["init_features_wait_s"] >= 0.05
    timings.clear()

    def lost():
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        waited(lost, timings)()
    assert timings["init_features_wait_s"] >= 0
