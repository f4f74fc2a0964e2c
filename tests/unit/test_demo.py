"""The demo's choice of which generation to show (demo.py)."""

import numpy as np

from emdpo_ray.demo import typical


def test_typical_sample_is_the_one_nearest_the_policy_mean():
    # policy a: rewards (0, 0), (2, 2), (1, 1.2) -> mean (1, 1.07): the third sample;
    # policy b: one sample; policy c: none
    rewards = np.array([[0.0, 0.0], [2.0, 2.0], [5.0, -5.0], [1.0, 1.2]])
    policy = np.array([0, 0, 1, 0])
    assert typical(rewards, policy, ["a", "b", "c"]) == {"a": 3, "b": 2}
