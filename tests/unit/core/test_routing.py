"""Which type answers a request: core/routing.py, without HTTP."""

import numpy as np
import pytest

from emdpo_ray.core.routing import UnknownModel, choose_type, pinned_type


def test_pinned_type_parses_only_type_names():
    assert pinned_type("type-2", 3) == 2
    assert pinned_type(None, 3) is None
    assert pinned_type("", 3) is None
    assert pinned_type("emdpo", 3) is None          # any other model name routes normally
    assert pinned_type("type-x", 3) is None
    with pytest.raises(UnknownModel, match="type-0 .. type-2"):
        pinned_type("type-3", 3)


def test_pinned_beats_everything():
    rng = np.random.default_rng(0)
    sure = np.log([1e-9, 1 - 2e-9, 1e-9])
    assert choose_type(k=3, weights=np.array([1.0, 0, 0]), rng=rng, pinned=2,
                       log_posterior=sure) == (2, "pinned")


def test_confident_user_goes_to_map_type_and_unsure_user_to_mmra():
    rng = np.random.default_rng(0)
    w = np.array([0.0, 0.0, 1.0])  # MMRA always draws type 2
    sure = np.log([0.01, 0.98, 0.01])
    # entropy of (0.01, 0.98, 0.01) = -(2 * 0.01 ln 0.01 + 0.98 ln 0.98) = 0.1119 nats
    assert choose_type(k=3, weights=w, rng=rng, log_posterior=sure,
                       min_confidence=0.12) == (1, "known_user")
    assert choose_type(k=3, weights=w, rng=rng, log_posterior=sure,
                       min_confidence=0.11) == (2, "mmra")
    assert choose_type(k=3, weights=w, rng=rng) == (2, "mmra")


def test_sample_mode_draws_from_the_posterior():
    rng = np.random.default_rng(1)
    post = np.log([0.25, 0.75])
    picks = [choose_type(k=2, weights=np.array([1.0, 0.0]), rng=rng, log_posterior=post,
                         mode="sample")[0] for _ in range(4000)]
    assert abs(np.mean(picks) - 0.75) < 0.03  # 4000 draws: sd 0.007


def test_mmra_draw_follows_the_weights():
    rng = np.random.default_rng(2)
    picks = [choose_type(k=3, weights=np.array([0.2, 0.0, 0.8]), rng=rng)[0]
             for _ in range(5000)]
    counts = np.bincount(picks, minlength=3) / 5000
    assert counts[1] == 0 and abs(counts[2] - 0.8) < 0.03
