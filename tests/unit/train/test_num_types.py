"""How many types (train/num_types.py): the split, the growth rule, and K on made-up users."""

import numpy as np
import pytest

from emdpo_ray.config import load_config
from emdpo_ray.data.records import parse_record
from emdpo_ray.train.linear_mixture import LinearMixture, split_type
from emdpo_ray.train.num_types import growth_choice, types_report, worst_fitting_type


def test_split_type_cuts_one_type_by_its_users_preferences():
    labels = np.array([0, 0, 0, 0, 1, 1])
    # type 0's users: two prefer feature 0, two feature 1; type 1 is left alone
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 1.0], [1.0, 1.0]])
    out = split_type(labels, emb, s=0, new=2, seed=0)
    assert out[4:].tolist() == [1, 1]
    assert len({out[0], out[1]}) == 1 and len({out[2], out[3]}) == 1 and out[0] != out[2]
    assert sorted({out[0], out[2]}) == [0, 2]
    # a type with one user stays as it is
    np.testing.assert_array_equal(split_type(np.array([0, 1, 1]), emb[:3], 0, 2, 0), [0, 1, 1])


def test_growth_stops_at_the_first_gain_within_noise():
    assert growth_choice([None]) == 1
    assert growth_choice([None, [0.1, 0.3], [0.05, 0.2], [-0.01, 0.02]]) == 3
    assert growth_choice([None, [-0.2, 0.4], [0.5, 0.9]]) == 1   # no skipping ahead
    assert growth_choice([None, [0.0, 0.1]]) == 1                 # touching 0 is noise
    # an empty extra type scores the same up to rounding: no gain
    assert growth_choice([None, [0.5, 0.7], [2e-7, 5e-7]]) == 2


def test_worst_fitting_type_by_hand():
    # one feature; type 0 (theta +1) fits its user's ranking (feature 1 over 0), type 1
    # (theta 0) is a random order for its two users: -log 2 each, worse than type 0's
    x = np.array([[[1.0], [0.0]], [[1.0], [0.0]], [[1.0], [0.0]]], np.float32)
    mask = np.ones((3, 2), bool)
    gamma = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mix = LinearMixture(np.array([[1.0], [0.0]], np.float32), gamma.mean(0), gamma)
    assert worst_fitting_type(x, mask, np.arange(3), mix) == 1
    # type 1 with a single user cannot be split: the worst with two users is taken
    gamma2 = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mix2 = LinearMixture(mix.theta, gamma2.mean(0), gamma2)
    assert worst_fitting_type(x, mask, np.arange(3), mix2) == 0


def _users(n_types: int, n_users=30, per_user=6):
    """Type t ranks response t first among words w0..w3 (the rest in a fixed order)."""
    rng = np.random.default_rng(0)
    recs = []
    for u in range(n_users):
        t = u % n_types
        for i in range(per_user):
            order = [t] + [j for j in rng.permutation(4) if j != t][:2]
            resp = ["w0 w0", "w1 w1", "w2 w2", "w3 w3"]
            recs.append(parse_record({"user_id": f"u{u}", "prompt": f"p{i}",
                                      "responses": [resp[j] for j in sorted(order)],
                                      "ranking": [sorted(order).index(j) for j in order],
                                      "true_type": t}, f"t:{len(recs)}"))
    return recs


@pytest.mark.parametrize("n_types", [1, 3])
def test_types_finds_how_many_kinds_of_users_there_are(n_types):
    cfg = load_config(None, ["em.init_restarts=2", "em.init_refine_iterations=5",
                             "em.init_l2=[0.01]"])
    rep = types_report(_users(n_types), cfg, max_types=n_types + 1)
    assert rep["chosen_types"] == n_types
    rows = rep["rows"]
    assert [r["types"] for r in rows] == list(range(1, n_types + 2))
    assert rows[0]["gain_interval"] is None
    if n_types == 3:
        assert rows[2]["ari"] == pytest.approx(1.0)
        assert rows[1]["gain_interval"][0] > 0 and rows[2]["gain_interval"][0] > 0
    assert rows[n_types]["gain_interval"][0] <= 0   # one more type: no gain beyond noise


def test_types_needs_rankings_to_hold_out():
    recs = _users(2, n_users=4, per_user=1)
    with pytest.raises(ValueError, match="nothing to hold out"):
        types_report(recs, load_config(None, []), 3)
    with pytest.raises(ValueError, match="--max-types must be >= 1"):
        types_report(_users(2), load_config(None, []), 0)
    with pytest.raises(ValueError, match="--holdout must be between 0 and 1"):
        types_report(_users(2), load_config(None, []), 2, holdout=1.0)
    with pytest.raises(ValueError, match="--features must be tokens, tokens_by_prompt or"):
        types_report(_users(2), load_config(None, []), 2, features="words")
    with pytest.raises(ValueError, match="--model gives the features itself"):
        types_report(_users(2), load_config(None, []), 2, "some/model", features="tokens_by_prompt")
    with pytest.raises(ValueError, match="reads the prompts with a model: give --model"):
        types_report(_users(2), load_config(None, []), 2, features="tokens_by_prompt_state")


def _candidates(recs):
    from emdpo_ray.data.encode import index_records
    from emdpo_ray.train.start import feature_candidates, heldout_records

    idx = index_records(recs)
    ui, num_users = idx.user_index, len(idx.users)
    cands, mask = feature_candidates("tokens", recs, ui, num_users)
    return cands["tokens"](), mask, ui, num_users, heldout_records(ui, 0.2, 0)


def test_types_across_features_takes_the_k_of_the_features_that_predict_best():
    from emdpo_ray.train.num_types import types_across_features

    x, mask, ui, num_users, held = _candidates(_users(3))
    # features alike for every response see no type (K = 1, every ranking -log 3!); a
    # simpler candidate is passed over when it predicts held-out rankings worse beyond noise
    blind = lambda: np.zeros_like(x)  # noqa: E731
    rep = types_across_features({"blind": blind, "tokens": lambda: x}, mask, ui, num_users,
                                max_types=6, held=held, restarts=2, iterations=5)
    assert rep["candidates"]["blind"]["chosen_types"] == 1
    assert rep["candidates"]["blind"]["rows"][0]["heldout_loglik_per_ranking"] == pytest.approx(
        -np.log(6), abs=1e-6)
    assert rep["candidates"]["tokens"]["chosen_types"] == 3
    # each stops growing at the first K that gains nothing
    assert [[r["types"] for r in c["rows"]] for c in rep["candidates"].values()] == [[1, 2],
                                                                                   [1, 2, 3, 4]]
    assert (rep["features"], rep["chosen_types"]) == ("tokens", 3)
    # two candidates that predict alike: the simpler (first) one is kept
    same = types_across_features({"a": lambda: x, "b": lambda: x.copy()}, mask, ui, num_users,
                                 max_types=6, held=held, restarts=2, iterations=5)
    assert (same["features"], same["chosen_types"]) == ("a", 3)


def test_choose_num_types_needs_rankings_to_hold_out():
    from emdpo_ray.data.encode import index_records
    from emdpo_ray.train.num_types import choose_num_types

    from emdpo_ray.train.start import feature_candidates

    recs = _users(2, n_users=4, per_user=1)
    idx = index_records(recs)
    cands, mask = feature_candidates("tokens", recs, idx.user_index, len(idx.users))
    with pytest.raises(ValueError, match="--types auto: no user has two rankings"):
        choose_num_types(load_config(None, []), cands, mask, idx.user_index, len(idx.users))


def test_train_types_argument_takes_a_number_or_auto():
    import argparse

    from emdpo_ray.cli import _num_types

    assert _num_types("3") == 3 and _num_types("auto") == "auto"
    for bad in ("0", "two", "2.5", "-1", "Auto"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole number >= 1 or auto"):
            _num_types(bad)


def test_types_by_prompt_splits_types_that_flip_with_the_prompts_words_not_their_order():
    from emdpo_ray.data import synth
    from emdpo_ray.data.records import parse_record

    # two mirrored types of `contextual`: their two-type split on token counts is blind, on
    # the counts crossed with the prompt it finds them (whether a second type is kept needs
    # more rankings than this: docs/num_types.md)
    recs, _ = synth.generate(users=120, types=2, rankings_per_user=8, seed=4, family="contextual")
    parsed = [parse_record(r, f"s:{i}") for i, r in enumerate(recs)]
    cfg = load_config(None, [])
    tok = types_report(parsed, cfg, 2)
    rep = types_report(parsed, cfg, 2, features="tokens_by_prompt")
    assert rep["features"] == "tokens_by_prompt"
    assert tok["rows"][1]["ari"] < 0.2 and rep["rows"][1]["ari"] > 0.6
    # the same types where the context is which of the prompt's two topics comes first: the
    # prompt's words as a bag are the same either way, and the crossed counts are blind too
    recs, _ = synth.generate(users=120, types=2, rankings_per_user=8, seed=4, family="lead_topic")
    parsed = [parse_record(r, f"s:{i}") for i, r in enumerate(recs)]
    assert types_report(parsed, cfg, 2, features="tokens_by_prompt")["rows"][1]["ari"] < 0.2


def test_types_cli_errors_name_the_problem(tmp_path):
    import json
    import subprocess
    import sys

    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"user_id": f"u{u}", "prompt": "p", "ranking": [0, 1, 2],
                                        "responses": ["a", "b", "c"]}) + "\n" for u in range(3)))
    out = subprocess.run([sys.executable, "-m", "emdpo_ray", "types", "--data", str(data)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "nothing to hold out" in out.stderr and not out.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u0", "prompt": "p", "responses": ["a", "b"]}\n')
    out = subprocess.run([sys.executable, "-m", "emdpo_ray", "types", "--data", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "bad.jsonl" in out.stderr and ":1" in out.stderr
