"""The start (train/start.py): preference embeddings, k-means, the linear PL mixture, labels."""

import numpy as np
import pytest

from emdpo_ray.config import load_config
from emdpo_ray.data.records import parse_record
from emdpo_ray.train.start import (initial_gamma, kmeans_init, labels_from_records,
                                   preference_embeddings, response_features)


def test_preference_embedding_by_hand():
    # one user, one ranking of 3 responses with features [1,0], [0,1], [1,1] (best first):
    # weights +1, 0, -1 -> 1*[1,0] + 0*[0,1] - 1*[1,1] = [0, -1]
    x = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    mask = np.array([[True, True, True]])
    np.testing.assert_allclose(preference_embeddings(x, mask, np.array([0]), 1), [[0.0, -1.0]])
    # a pair (+1, -1) and padding: averaged with the ranking above for the same user
    x2 = np.array([[[2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    both = preference_embeddings(np.concatenate([x, x2]), np.array([[1, 1, 1], [1, 1, 0]], bool),
                                 np.array([0, 0]), 1)
    np.testing.assert_allclose(both, [[(0 + 2) / 2, (-1 + 0) / 2]])


def _two_opposite_types(n_users=12, per_user=4):
    """Type 0 ranks 'yes' first, type 1 ranks 'no' first; same responses for everyone."""
    recs, truth = [], []
    for u in range(n_users):
        t = u % 2
        for i in range(per_user):
            order = [0, 1, 2] if t == 0 else [2, 1, 0]
            recs.append(parse_record({"user_id": f"u{u}", "prompt": f"p{i}",
                                      "responses": ["yes yes", "maybe", "no no"],
                                      "ranking": order, "true_type": t}, f"t:{len(recs)}"))
        truth.append(t)
    ui = np.repeat(np.arange(n_users), per_user)
    return recs, ui, np.array(truth)


def test_kmeans_start_separates_opposite_types():
    recs, ui, truth = _two_opposite_types()
    g = kmeans_init(recs, ui, len(truth), 2, seed=0, smoothing=0.1, refine_iterations=2)
    labels = g.argmax(1)
    assert (labels == truth).all() or (labels == 1 - truth).all()
    np.testing.assert_allclose(g.max(1), 0.9)  # never fully certain: the policies get a say


def test_features_follow_the_ranking():
    recs, _, _ = _two_opposite_types(2, 1)
    x, mask = response_features(recs)
    assert mask.all() and x.shape[:2] == (2, 3)
    np.testing.assert_array_equal(x[0, 0], x[1, 2])  # "yes yes": first for type 0, last for 1


def test_labels_start_and_its_errors():
    recs, ui, truth = _two_opposite_types(4, 1)
    cfg = load_config(None, ["em.init=labels", "em.init_smoothing=0.2"])
    g = initial_gamma(cfg, 2, recs, ui, 4)
    assert g.argmax(1).tolist() == truth.tolist() and g.max() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="out of range for 1 types"):
        labels_from_records(recs, ui, 4, 1)
    unlabeled = [parse_record({"user_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"},
                              "f.jsonl:7")]
    with pytest.raises(ValueError, match="f.jsonl:7: true_type"):
        labels_from_records(unlabeled, np.array([0]), 1, 2)


def test_random_start_keeps_the_best_scored_restart():
    recs, ui, _ = _two_opposite_types(6, 1)
    cfg = load_config(None, ["em.init=random", "em.restarts=3"])
    seen = []

    def score(g, r):
        seen.append(g)
        return [1.0, 5.0, 2.0][r]

    g = initial_gamma(cfg, 2, recs, ui, 6, score)
    assert len(seen) == 3 and g is seen[1]
