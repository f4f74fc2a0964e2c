"""The start (train/start.py): preference embeddings, k-means, the linear PL mixture, labels."""

import numpy as np
import pytest

from emdpo_ray.config import load_config
from emdpo_ray.data.records import parse_record
from emdpo_ray.train.start import (HELDOUT_PER_USER, initial_gamma, kmeans_init,
                                   labels_from_records, response_features)
from emdpo_ray.train.linear_mixture import preference_embeddings


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


def test_counts_by_hand_with_uneven_rankings_and_a_capped_vocabulary():
    recs = [parse_record({"user_id": "a", "prompt": "p", "responses": ["b a", "a a c"],
                          "ranking": [1, 0]}, "t:0"),
            parse_record({"user_id": "b", "prompt": "p", "responses": ["c", "a", "a b"],
                          "ranking": [2, 0, 1]}, "t:1")]
    x, mask = response_features(recs)   # vocabulary a, b, c (sorted); ranked order
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(x[0], [[2, 0, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(x[1], [[1, 1, 0], [0, 0, 1], [1, 0, 0]])
    # capped at two words: the most frequent, a (5 times) and b (2), c (2) tied with b;
    # whichever is kept, the columns are the counts of the same two words in every response
    x2, _ = response_features(recs, max_words=2)
    assert x2.shape == (2, 3, 2) and x2[..., 0].sum() == 5
    kept = 1 if x2[0, 0, 1] == 0 else 2   # b's column or c's
    np.testing.assert_array_equal(x2[..., 1], x[..., kept])


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


def test_record_loglik_by_hand():
    from emdpo_ray.train.linear_mixture import record_logliks

    # rewards log 3 and 0: the ranked-first response wins with probability 3 / (3 + 1)
    x = np.array([[[1.0], [0.0]]], np.float32)
    s = record_logliks(x, np.array([[True, True]]), np.array([[np.log(3.0)]]))
    np.testing.assert_allclose(s, [[np.log(0.75)]], rtol=1e-6)


def test_predictive_loglik_by_hand():
    from emdpo_ray.train.start import predictive_loglik

    # one user, two records, two types, eta 1/2 each; record 1 is held out. After record 0
    # the posterior is (0.5, 0.25) normalised = (2/3, 1/3); record 1 then has probability
    # 2/3 * 0.5 + 1/3 * 0.75 = 7/12.
    scores = np.log([[0.5, 0.25], [0.5, 0.75]])
    got = predictive_loglik(scores, np.array([False, True]), np.array([0, 0]), 1,
                            np.array([0.5, 0.5]))
    assert got == pytest.approx(np.log(7 / 12))


def test_heldout_records_keep_every_user_some_rankings():
    from emdpo_ray.train.start import heldout_records

    ui = np.array([0] * 10 + [1] * 1 + [2] * 3)
    held = heldout_records(ui, 0.2, seed=0)
    assert held[ui == 0].sum() == 2 and held[ui == 1].sum() == 0 and held[ui == 2].sum() == 1
    np.testing.assert_array_equal(held, heldout_records(ui, 0.2, seed=0))  # seeded


def test_auto_features_keep_the_candidate_that_predicts_held_out_rankings():
    from emdpo_ray.train.start import choose_features, heldout_records

    recs, ui, truth = _two_opposite_types(20, 5)
    x, mask = response_features(recs)
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    held = heldout_records(ui, 0.2, 0)
    name, l2, scores, gamma, per_user = choose_features(
        {"noise": lambda: noise, "tokens": lambda: x}, mask, ui, 20, 2, seed=0,
        refine_iterations=2, held=held, restarts=2)
    assert name == "tokens" and l2 == 1e-2
    # the chosen candidate's figure per user, which the guard's paired test starts from
    assert per_user.shape == (20,) and per_user.sum() / held.sum() == pytest.approx(scores[name][l2])
    assert scores["tokens"][1e-2] > scores["noise"][1e-2]
    labels = gamma.argmax(1)  # the chosen start's split, fitted without the held-out rankings
    assert (labels == truth).all() or (labels == 1 - truth).all()
    assert scores["tokens"][1e-2] > -np.log(6)  # better than a random order of 3


def test_the_l2_path_keeps_the_penalty_that_predicts_held_out_rankings():
    from emdpo_ray.train.start import choose_features, heldout_records
    from emdpo_ray.train.linear_mixture import l2_path, feature_start

    recs, ui, truth = _two_opposite_types(20, 5)
    x, mask = response_features(recs)
    held = heldout_records(ui, 0.2, 0)
    # a penalty of 10 shrinks every preference to ~0 (a random order, -log 6); 1e-3 keeps them
    name, l2, scores, gamma, _ = choose_features({"tokens": lambda: x}, mask, ui, 20, 2, seed=0,
                                                 refine_iterations=2, held=held, restarts=2,
                                                 l2s=(10.0, 1e-3))
    assert l2 == 1e-3 and set(scores["tokens"]) == {10.0, 1e-3}
    assert scores["tokens"][10.0] == pytest.approx(-np.log(6), abs=0.05)
    assert scores["tokens"][1e-3] > scores["tokens"][10.0] + 0.3
    # the path starts at the given fit and each step continues from the one before
    mix = feature_start(x, mask, ui, 20, 2, seed=0, refine_iterations=2, l2=10.0)
    path = l2_path(x, mask, ui, 20, mix, [10.0, 1e-3], 2)
    assert len(path) == 2 and path[0] is mix
    assert np.abs(path[1].theta).max() > 10 * np.abs(mix.theta).max()


def test_the_simplest_candidate_within_noise_of_the_best_is_chosen_by_hand():
    from emdpo_ray.train.start import simplest_within_noise

    n = np.array([1, 1])
    # "simple" trails the best by 0.1 on one user and leads it by 0.05 on the other: paired
    # per user its shortfall is +0.1, +0.025 or -0.05 per ranking (probabilities 1/4, 1/2,
    # 1/4), so its 68% interval reaches below 0 and it is kept
    near = {"simple": np.array([-1.1, -0.9]), "complex": np.array([-1.0, -0.95])}
    assert simplest_within_noise(near, n) == "simple"
    # trailing on both users by 0.1 and 0.3 its shortfall is at least 0.1 in every resample
    behind = {"simple": np.array([-1.1, -1.3]), "complex": np.array([-1.0, -1.0])}
    assert simplest_within_noise(behind, n) == "complex"
    # the best is kept when it is the simplest; a middle one within noise of the best (c:
    # -0.95 per ranking; b behind it by 0.2 on one user, ahead by 0.1 on the other) when the
    # simplest trails
    assert simplest_within_noise({"a": np.array([0.0, 0.0]), "b": np.array([-1.0, 0.0])}, n) == "a"
    three = {"a": np.array([-2.0, -2.0]), "b": np.array([-1.0, -1.0]), "c": np.array([-0.8, -1.1])}
    assert simplest_within_noise(three, n) == "b"


def test_mixture_loglik_by_hand():
    from emdpo_ray.train.linear_mixture import LinearMixture, mixture_loglik

    # one feature; responses [1] and [0]; type 0 has theta log 3, type 1 theta 0.
    # "ranked [1] first": p = 3/4 under type 0, 1/2 under type 1; eta (0.5, 0.5) -> 5/8.
    # A second user with the reverse order: 1/4 and 1/2 -> 3/8. Two records of user 0: the
    # product within each type, 0.5 * 9/16 + 0.5 * 1/4 = 13/32.
    x = np.array([[[1.0], [0.0]], [[0.0], [1.0]], [[1.0], [0.0]]], np.float32)
    mask = np.ones((3, 2), bool)
    mix = LinearMixture(np.array([[np.log(3)], [0.0]], np.float32), np.array([0.5, 0.5]),
                        np.zeros((2, 2)))
    got = mixture_loglik(x, mask, np.array([0, 1, 0]), 2, mix)
    assert got == pytest.approx(np.log(13 / 32) + np.log(3 / 8), abs=1e-5)


def test_restarts_keep_the_start_of_highest_likelihood():
    from emdpo_ray.train.linear_mixture import feature_start, mixture_loglik

    recs, ui, truth = _two_opposite_types(12, 3)
    x, mask = response_features(recs)
    x = x + np.random.default_rng(1).normal(scale=0.3, size=x.shape).astype(np.float32)
    one = feature_start(x, mask, ui, 12, 2, seed=0, refine_iterations=3, restarts=1)
    info: dict = {}
    many = feature_start(x, mask, ui, 12, 2, seed=0, refine_iterations=3, restarts=4, info=info)
    lls = info["restart_logliks"]
    assert len(lls) == 4 and info["restart_chosen"] == int(np.argmax(lls))
    # restart 0 is the k-means start itself: more restarts never lower the likelihood
    assert lls[0] == pytest.approx(mixture_loglik(x, mask, ui, 12, one))
    assert mixture_loglik(x, mask, ui, 12, many) == pytest.approx(max(lls))
    assert max(lls) >= lls[0]


def test_reference_features_are_asked_for_only_when_used():
    recs, ui, truth = _two_opposite_types(8, 5)
    calls = []

    def ref():
        from emdpo_ray.models.features import Representations

        calls.append(1)
        return Representations(np.zeros((len(recs), 3, 4), np.float32),
                               np.zeros((len(recs), 5), np.float32))

    tok_info: dict = {}
    kmeans_init(recs, ui, 8, 2, 0, 0.1, 2, features="tokens", reference_features=ref,
                info=tok_info)
    assert not calls
    # one candidate: its held-out log-likelihood is still measured (EM's guard compares to it)
    assert tok_info["features"] == "tokens" and set(tok_info["heldout_loglik_per_ranking"]) == {"tokens"}
    assert tok_info["l2"] == 1e-2 and set(tok_info["heldout_loglik_by_l2"]["tokens"]) == {"0.01"}
    info: dict = {}
    g = kmeans_init(recs, ui, 8, 2, 0, 0.1, 2, features="auto", reference_features=ref, info=info)
    assert calls == [1] and set(info["heldout_loglik_per_ranking"]) == {
        "tokens", "tokens_by_prompt", "tokens_by_prompt_state", "reference", "both"}
    # fresh restarts on every record vs the chosen start continued: the likelier is kept
    lls = info["final_logliks"]
    assert set(lls) == {"fresh", "continued"} and info["final"] == max(lls, key=lls.get)
    labels = g.argmax(1)
    if info["features"] != "reference":  # all-zero reference features carry nothing
        assert (labels == truth).all() or (labels == 1 - truth).all()
    with pytest.raises(ValueError, match="needs the reference model's features"):
        kmeans_init(recs, ui, 8, 2, 0, 0.1, 2, features="reference")


def test_lbfgs_finds_a_hand_worked_minimum():
    # sum (t - c)^2 + 0.5 t0 t1 with c = [1, -1]: the gradient is zero where
    # 2 t0 + 0.5 t1 = 2 and 0.5 t0 + 2 t1 = -2; by symmetry t1 = -t0, so 1.5 t0 = 2: t = [4/3, -4/3]
    from emdpo_ray.train.linear_mixture import lbfgs

    c = np.array([1.0, -1.0])

    def fun(t):
        return float(((t - c) ** 2).sum() + 0.5 * t[0] * t[1]), 2 * (t - c) + 0.5 * t[::-1]

    np.testing.assert_allclose(lbfgs(fun, np.zeros(2, np.float32)), [4 / 3, -4 / 3], atol=1e-3)


def test_pl_logp_grad_by_hand():
    # m = 2: log P = log sigmoid(r0 - r1), d/dr0 = 1 - sigmoid(r0 - r1) = -d/dr1.
    # r = [ln 3, 0]: sigmoid = 3/4, so log P = ln 0.75 and the gradient [1/4, -1/4].
    # m = 3, r = 0: log P = ln(1/3) + ln(1/2); d/dr0 = 1 - 1/3, d/dr1 = 1 - 1/3 - 1/2,
    # d/dr2 = 1 - 1/3 - 1/2 - 1 (its own last stage cancels its pull); a padded third
    # column must be the m = 2 row.
    from emdpo_ray.train.linear_mixture import pl_logp_grad

    r = np.array([[np.log(3), 0.0, 0.0], [0.0, 0.0, 0.0], [np.log(3), 0.0, 7.0]])
    mask = np.array([[True, True, False], [True, True, True], [True, True, False]])
    logp, g = pl_logp_grad(r, mask)
    np.testing.assert_allclose(logp, [np.log(0.75), np.log(1 / 6), np.log(0.75)])
    np.testing.assert_allclose(g, [[0.25, -0.25, 0], [2 / 3, 1 / 6, -5 / 6], [0.25, -0.25, 0]],
                               atol=1e-12)


def test_pl_logp_grad_at_any_scale():
    # r = [0, -800, -900]: after the best, both left are ~e^-800 of it, whose sum underflows
    # to 0 from the row's max; exactly, log P = -log(1 + e^-800 + e^-900) - log(1 + e^-100)
    # ~ -e^-100 and the gradient [~0, ~e^-100, ~-e^-100], all 0 to 1e-40
    from emdpo_ray.train.linear_mixture import pl_logp_grad, pl_logp_grad_logspace

    logp, g = pl_logp_grad(np.array([[0.0, -800.0, -900.0]]), np.ones((1, 3), bool))
    np.testing.assert_allclose(logp, [0.0], atol=1e-40)
    np.testing.assert_allclose(g, [[0.0, 0.0, 0.0]], atol=1e-40)
    # at ordinary scales the sums agree with the log-space form, padding included
    rng = np.random.default_rng(0)
    r, mask = rng.normal(size=(50, 4)) * 5, np.ones((50, 4), bool)
    mask[::3, 3:], mask[::7, 2:] = False, False
    for a, b in zip(pl_logp_grad(r, mask), pl_logp_grad_logspace(r, mask)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_weighted_objective_matches_autograd_of_the_training_loss():
    # the start's closed-form gradient against torch autograd of core/losses.py's likelihood
    import torch

    from emdpo_ray.core.losses import plackett_luce_logp
    from emdpo_ray.train.linear_mixture import weighted_objective

    rng = np.random.default_rng(0)
    x, w, theta = rng.normal(size=(6, 4, 5)), rng.random((6, 2)), rng.normal(size=(2, 5))
    mask = np.ones((6, 4), bool)
    mask[1, 3:], mask[4, 2:] = False, False
    loss, grad = weighted_objective(x, mask, w, theta, 0.3)
    t = torch.tensor(theta, requires_grad=True)
    r = torch.einsum("nmv,kv->nkm", torch.tensor(x), t)
    lp = torch.stack([plackett_luce_logp(r[:, j], torch.tensor(mask)) for j in range(2)], 1)
    ref = -(torch.tensor(w) * lp.double()).sum() / 6 + 0.3 * (t ** 2).sum()
    ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-5)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_the_start_keeps_the_compiler_stack_out_of_the_driver():
    # torch.optim imports torch._dynamo on first use: 2 s of every run's fixed cost
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from emdpo_ray.train.linear_mixture import fit_linear_mixture\n"
            "x = np.random.default_rng(0).normal(size=(8, 3, 4)).astype(np.float32)\n"
            "g = np.tile([[0.9, 0.1], [0.1, 0.9]], (2, 1))\n"
            "fit_linear_mixture(x, np.ones((8, 3), bool), np.arange(8) % 4, 4, g, 2)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_split_merge_moves_by_hand():
    from emdpo_ray.train.linear_mixture import split_merge_moves

    fit = np.array([-1.0, -0.5, -0.2])          # type 0's users fit worst, then type 1's
    theta = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]])
    # type 2 has no users: merging it away comes first (with either live type, ties by
    # index), then the live pair whose weights point the same way; each move splits a live
    # type other than the one merged away, the worst fitted first
    dead = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]] * 3)
    assert split_merge_moves(theta, dead, fit) == [(0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1),
                                                   (0, 1, 0)]
    # every type has users: pairs by cosine, (0, 1) first (0.99), then (1, 2), then (0, 2)
    theta = np.array([[1.0, 0.0], [0.9, 0.1], [0.1, 1.0]])
    live = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    assert split_merge_moves(theta, live, fit) == [(0, 1, 0), (0, 1, 2), (1, 2, 0), (1, 2, 1),
                                                   (0, 2, 0), (0, 2, 1)]


def test_merge_split_by_hand():
    from emdpo_ray.train.linear_mixture import merge_split

    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    emb = np.array([[0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0], [-1, 0], [-1, 0]], float)
    out = merge_split(labels, emb, 0, 1, 2, seed=0)   # 1 joins 0; 2 splits along its users
    assert (out[:4] == 0).all()
    assert sorted([tuple(out[4:6]), tuple(out[6:])]) == [(1, 1), (2, 2)]
    assert merge_split(np.array([0, 0, 1, 2]), emb[:4], 0, 1, 2, seed=0) is None  # one user


def _three_types(per_type=6, per_user=4):
    """Type t ranks response t first, the other two after it in a fixed order."""
    recs, truth = [], []
    for u in range(3 * per_type):
        t = u % 3
        for i in range(per_user):
            order = [t] + [j for j in (0, 1, 2) if j != t]
            recs.append(parse_record({"user_id": f"u{u}", "prompt": f"p{i}",
                                      "responses": ["a a", "b b", "c c"],
                                      "ranking": order}, f"t:{len(recs)}"))
        truth.append(t)
    return recs, np.repeat(np.arange(3 * per_type), per_user), np.array(truth)


def test_split_merge_frees_a_type_that_em_keeps_merged():
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.core.estep import smoothed_onehot
    from emdpo_ray.train.linear_mixture import fit_linear_mixture, mixture_loglik, split_merge

    recs, ui, truth = _three_types()
    x, mask = response_features(recs)
    u = len(truth)
    # a poor optimum: type 0's users split over types 0 and 2, types 1 and 2 kept as one;
    # EM settles with two identical types, each holding half of two true types
    wrong = np.where(truth == 0, np.arange(u) % 2 * 2, 1)
    stuck = fit_linear_mixture(x, mask, ui, u, smoothed_onehot(wrong, 3, 0.05), 20)
    assert stuck.gamma.max(1).min() < 0.6
    info: dict = {}
    fixed = split_merge(x, mask, ui, u, stuck, 1e-2, 20, seed=0, tries=6, info=info)
    assert adjusted_rand_score(truth, fixed.gamma.argmax(1)) == 1.0
    assert fixed.gamma.max(1).min() > 0.9
    first = info["moves"][0]
    assert sorted(first["merge"]) == [0, 2]   # the two alike
    assert first["loglik"][0] == pytest.approx(mixture_loglik(x, mask, ui, u, stuck))
    assert mixture_loglik(x, mask, ui, u, fixed) == pytest.approx(info["moves"][-1]["loglik"][1])
    assert mixture_loglik(x, mask, ui, u, fixed) > first["loglik"][0] + 1.0
    # nothing to gain from the true split: no move is kept, the mixture comes back as it was
    right = fit_linear_mixture(x, mask, ui, u, smoothed_onehot(truth, 3, 0.05), 20)
    info = {}
    assert split_merge(x, mask, ui, u, right, 1e-2, 20, seed=0, tries=6, info=info) is right
    assert info["moves"] == []


def test_prompt_interacted_counts_see_types_that_flip_with_the_prompt():
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.data import synth
    from emdpo_ray.data.records import group_by_user

    # types 0 and 1 of `contextual` mirror each other under every prompt: averaged over
    # prompts their token preferences cancel, so plain counts cannot split them
    recs, _ = synth.generate(users=120, types=2, rankings_per_user=8, seed=4, family="contextual")
    parsed = [parse_record(r, f"s:{i}") for i, r in enumerate(recs)]
    users, ui = group_by_user(parsed)
    truth = {r.user_id: r.true_type for r in parsed}
    ari = {}
    for features in ("tokens", "tokens_by_prompt"):
        g = kmeans_init(parsed, np.asarray(ui), len(users), 2, 0, 0.05, 10, features=features,
                        restarts=4)
        ari[features] = adjusted_rand_score([truth[u] for u in users], g.argmax(1))
    assert ari["tokens"] < 0.3 and ari["tokens_by_prompt"] > 0.6, ari


def _lead_topic_states(recs, dims=16, seed=0):
    """A stand-in for a language model's last state of each prompt: a vector per word, the
    last topic word weighted most and the first least (a causal model's last state reads
    the recent tokens most), plus noise. Which topic comes first is one direction among
    many, and not the one of most variance."""
    import re

    from emdpo_ray.data.synth import ALL_TOPICS

    rng = np.random.default_rng(seed)
    vec = {w: rng.normal(size=dims) for w in sorted(ALL_TOPICS)}
    out = []
    for r in recs:
        topics = [w for w in re.findall(r"\w+", r.prompt.lower()) if w in vec]
        out.append(vec[topics[0]] * 0.3 + vec[topics[1]] + 0.1 * rng.normal(size=dims))
    return np.asarray(out, np.float32)


def test_counts_crossed_with_the_prompts_state_see_what_its_words_as_a_bag_cannot():
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.data import synth
    from emdpo_ray.data.records import group_by_user
    from emdpo_ray.models.features import Representations

    # lead_topic: the preference flips with which of the prompt's two topics comes first,
    # so its words as a bag are the same in both contexts (tokens_by_prompt is blind), but
    # a state that reads them in order is not
    recs, _ = synth.generate(users=120, types=2, rankings_per_user=8, seed=4, family="lead_topic")
    parsed = [parse_record(r, f"s:{i}") for i, r in enumerate(recs)]
    users, ui = group_by_user(parsed)
    truth = [{r.user_id: r.true_type for r in parsed}[u] for u in users]
    states = _lead_topic_states(parsed)
    ari = {}
    for features in ("tokens_by_prompt", "tokens_by_prompt_state"):
        g = kmeans_init(parsed, np.asarray(ui), len(users), 2, 0, 0.05, 10, features=features,
                        restarts=4, reference_features=lambda: Representations(
                            np.zeros((len(parsed), 3, 1), np.float32), states))
        ari[features] = adjusted_rand_score(truth, g.argmax(1))
    assert ari["tokens_by_prompt"] < 0.3 and ari["tokens_by_prompt_state"] > 0.5, ari


def test_response_states_crossed_with_the_prompts_state_need_no_counts():
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.data import synth
    from emdpo_ray.data.records import group_by_user
    from emdpo_ray.models.features import Representations

    # lead_topic again, with the counts nowhere: each response read as a dense vector (the
    # sum of a random vector per word, a stand-in for the reference's pooled states)
    recs, _ = synth.generate(users=120, types=2, rankings_per_user=8, seed=4, family="lead_topic")
    parsed = [parse_record(r, f"s:{i}") for i, r in enumerate(recs)]
    users, ui = group_by_user(parsed)
    truth = [{r.user_id: r.true_type for r in parsed}[u] for u in users]
    counts, _ = response_features(parsed)
    mix = np.random.default_rng(1).normal(size=(counts.shape[-1], counts.shape[-1] + 8))
    reps = Representations((counts @ mix).astype(np.float32), _lead_topic_states(parsed))
    ari, infos = {}, {}
    for features in ("reference", "reference_by_prompt_state"):
        infos[features] = {}
        g = kmeans_init(parsed, np.asarray(ui), len(users), 2, 0, 0.05, 10, features=features,
                        restarts=4, reference_features=lambda: reps, info=infos[features])
        ari[features] = adjusted_rand_score(truth, g.argmax(1))
    assert ari["reference"] < 0.3 and ari["reference_by_prompt_state"] > 0.5, ari
    # `language` (the config's, through initial_gamma) chooses between the two by held-out
    # rankings
    infos["language"] = {}
    g = initial_gamma(load_config(None, ["em.init_features=language"]), 2, parsed,
                      np.asarray(ui), len(users), reference_features=lambda: reps,
                      info=infos["language"])
    assert adjusted_rand_score(truth, g.argmax(1)) > 0.5
    assert infos["language"]["features"] == "reference_by_prompt_state"
    assert set(infos["language"]["heldout_loglik_per_ranking"]) == {
        "reference", "reference_by_prompt_state"}


def test_counts_only_names_exactly_the_starts_that_never_read_the_reference():
    from typing import get_args

    from emdpo_ray.config import EMConfig
    from emdpo_ray.models.features import Representations
    from emdpo_ray.train.start import COUNTS_ONLY, feature_candidates

    recs, ui, _ = _two_opposite_types(8, 5)
    reps = Representations(np.ones((len(recs), 3, 4), np.float32),
                           np.arange(len(recs) * 2, dtype=np.float32).reshape(-1, 2))
    for features in get_args(EMConfig.model_fields["init_features"].annotation):
        asked = []
        cands, _ = feature_candidates(features, recs, ui, 8,
                                      lambda: asked.append(1) or reps)
        for make in cands.values():
            make()
        # the driver asks the workers for the reference's features unless COUNTS_ONLY
        assert bool(asked) == (features not in COUNTS_ONLY), features


def test_integer_counts_and_float32_features_give_the_float64_objective():
    # the matmul runs in x's dtype: integer counts must not truncate theta to integers
    from emdpo_ray.train.linear_mixture import weighted_objective

    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=(5, 3, 4))
    w, theta, mask = rng.random((5, 2)), rng.normal(size=(2, 4)), np.ones((5, 3), bool)
    loss, grad = weighted_objective(x.astype(np.float64), mask, w, theta, 0.1)
    for xx, tol in ((x, 1e-12), (x.astype(np.float32), 1e-5)):
        other, g = weighted_objective(xx, mask, w, theta, 0.1)
        assert other == pytest.approx(loss, rel=tol)
        np.testing.assert_allclose(g, grad, rtol=tol * 10, atol=tol)


def test_parallel_map_runs_side_by_side_and_keeps_the_order():
    import threading

    from emdpo_ray.train.linear_mixture import parallel_map

    # a barrier of two is passed only if both calls run at the same time; in turn it breaks
    barrier = threading.Barrier(2, timeout=10)

    def meet(i):
        barrier.wait()
        return i * i, threading.get_ident()

    out = parallel_map(meet, [3, 1], threads=2)
    assert [v for v, _ in out] == [9, 1] and out[0][1] != out[1][1]
    # one thread: in the caller's, in turn
    assert parallel_map(lambda i: (i, threading.get_ident()), [2, 5], threads=1) == [
        (2, threading.get_ident()), (5, threading.get_ident())]
    assert parallel_map(lambda i: i, [], threads=4) == []


def test_blas_limit_holds_until_the_last_overlapping_holder_leaves():
    from threadpoolctl import threadpool_info, threadpool_limits

    from emdpo_ray.train.linear_mixture import one_blas_thread

    def blas_threads():
        return {d["filepath"]: d["num_threads"] for d in threadpool_info()
                if d["user_api"] == "blas"}

    # holders that overlap without nesting (a fit that ends while another runs), entered and
    # left by hand in one thread: a count set from a pool's thread was not always applied
    # (OpenBLAS 0.3.31), which is why parallel_map's caller sets it
    with threadpool_limits(3, user_api="blas"):
        before = blas_threads()   # NumPy's OpenBLAS at 3 (a solver's own build may stay at 1)
        assert 3 in before.values()
        a, b = one_blas_thread(), one_blas_thread()
        a.__enter__()
        assert set(blas_threads().values()) == {1}
        b.__enter__()
        a.__exit__(None, None, None)
        # a plain threadpool_limits per holder would have restored 3 under b here
        assert set(blas_threads().values()) == {1}
        b.__exit__(None, None, None)
        assert blas_threads() == before


def test_once_computes_once_however_many_threads_ask():
    import threading
    import time

    from emdpo_ray.train.start import once

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
        if len(calls) == 1:
            raise RuntimeError("workers not ready")
        return object()

    get = once(slow)
    with pytest.raises(RuntimeError):   # an error is not kept
        get()
    got = []
    threads = [threading.Thread(target=lambda: got.append(get())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2 and len(got) == 6 and all(g is got[0] for g in got)


def test_the_start_side_by_side_equals_the_start_in_turn(monkeypatch):
    from emdpo_ray.core.estep import smoothed_onehot
    from emdpo_ray.train import linear_mixture
    from emdpo_ray.train.linear_mixture import feature_start, fit_linear_mixture, split_merge

    recs, ui, truth = _two_opposite_types(12, 3)
    x, mask = response_features(recs)
    x = x + np.random.default_rng(1).normal(scale=0.3, size=x.shape).astype(np.float32)
    runs = {}
    for threads in (1, 2):
        info: dict = {}
        mix = feature_start(x, mask, ui, 12, 2, seed=0, refine_iterations=3, restarts=4,
                            info=info, threads=threads)
        runs[threads] = (mix, info)
    (one, i1), (two, i2) = runs[1], runs[2]
    assert i1 == i2 and np.array_equal(one.gamma, two.gamma) and np.array_equal(one.theta, two.theta)

    recs3, ui3, truth3 = _three_types()
    x3, mask3 = response_features(recs3)
    wrong = np.where(truth3 == 0, np.arange(len(truth3)) % 2 * 2, 1)
    stuck = fit_linear_mixture(x3, mask3, ui3, len(truth3), smoothed_onehot(wrong, 3, 0.05), 20)
    moves = []
    for threads in (1, 3):
        info = {}
        fixed = split_merge(x3, mask3, ui3, len(truth3), stuck, 1e-2, 20, seed=0, tries=6,
                            info=info, threads=threads)
        moves.append((info["moves"], fixed.gamma))
    assert moves[0][0] == moves[1][0] and len(moves[0][0]) >= 1
    assert np.array_equal(moves[0][1], moves[1][1])

    # the whole auto start: its five candidates fitted side by side or in turn
    def start(cpus):
        monkeypatch.setattr(linear_mixture, "usable_cpus", lambda: cpus)
        info: dict = {}
        g = kmeans_init(recs, ui, 12, 2, 0, 0.1, 2, features="auto", info=info, restarts=2,
                        reference_features=lambda: _reference_like(recs))
        return g, info

    (g1, info1), (g2, info2) = start(1), start(2)
    per_user = [i.pop(HELDOUT_PER_USER) for i in (info1, info2)]
    assert np.array_equal(*per_user) and np.array_equal(g1, g2) and info1 == info2
    assert set(info1["heldout_loglik_per_ranking"]) == {
        "tokens", "tokens_by_prompt", "tokens_by_prompt_state", "reference", "both"}


def _reference_like(recs):
    from emdpo_ray.models.features import Representations

    rng = np.random.default_rng(3)
    return Representations(rng.normal(size=(len(recs), 3, 4)).astype(np.float32),
                           rng.normal(size=(len(recs), 5)).astype(np.float32))
