"""What the demo shows: which generation, and how it is printed (demo.py)."""

import numpy as np

from emdpo_ray.demo import printable, typical


def test_typical_sample_is_the_one_nearest_the_policy_mean():
    # policy a: rewards (0, 0), (2, 2), (1, 1.2) -> mean (1, 1.07): the third sample;
    # policy b: one sample; policy c: none
    rewards = np.array([[0.0, 0.0], [2.0, 2.0], [5.0, -5.0], [1.0, 1.2]])
    policy = np.array([0, 0, 1, 0])
    assert typical(rewards, policy, ["a", "b", "c"]) == {"a": 3, "b": 2}


def test_printable_puts_a_generation_on_one_readable_line():
    # a line break becomes ' / '; a control byte and an undecodable byte (U+FFFD) become '?'
    assert printable(" Clearly so.\n- Yes\x1d it\ufffd \n") == "Clearly so. / - Yes? it?"
