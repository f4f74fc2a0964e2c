"""Generation-level evaluation (report/generations.py): the reward matrix and who is served."""

import numpy as np

from emdpo_ray.report.generations import generation_eval, reward_table, served


def test_reward_table_by_hand():
    # 2 true types, 2 policies, 2 prompts; policy 0 always gives (1, 0), policy 1 (0, 2)
    rewards = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    policy = np.array([0, 0, 1, 1])
    prompt = np.array([0, 1, 0, 1])
    mean, ci, reps = reward_table(rewards, policy, prompt, 2, replicates=50)
    np.testing.assert_allclose(mean, [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(ci[..., 0], mean)  # no spread over prompts: no width
    np.testing.assert_allclose(ci[..., 1], mean)
    # policy 0 is 1 on prompt 0 and 3 on prompt 1: mean 2, replicates between 1 and 3
    rewards2 = np.array([[1.0], [3.0]])
    mean2, ci2, _ = reward_table(rewards2, np.array([0, 0]), np.array([0, 1]), 1, replicates=400)
    assert mean2[0, 0] == 2.0 and ci2[0, 0, 0] == 1.0 and ci2[0, 0, 1] == 3.0


def test_served_needs_the_own_policy_on_top():
    mean = np.array([[2.0, 1.0, 0.5], [1.0, 1.5, 1.4]])
    ci = np.stack([mean - 0.2, mean + 0.2], -1)
    s = served(mean, ci, own=np.array([0, 1]), rivals=[0, 1, 2])
    assert s["own_is_best"] == [True, True]
    assert s["own_is_best_separated"] == [True, False]  # 1.5 +- .2 overlaps 1.4 +- .2
    np.testing.assert_allclose(s["margin_over_next_best"], [1.0, 0.1])
    assert served(mean, ci, own=np.array([1, 0]), rivals=[0, 1, 2])["own_is_best"] == [False,
                                                                                      False]


def test_generation_eval_on_texts_scored_by_the_synthetic_rewards():
    # one feature (formal words), type 0 likes it, type 1 dislikes it
    meta = {"theta": [[0, 1, 0, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0, 0]], "reward_scale": 1.0}
    samples = []
    for p in ("Explain owls.", "Describe tea."):
        samples += [{"policy": "type_0", "prompt": p, "text": "therefore furthermore"},
                    {"policy": "type_1", "prompt": p, "text": "yeah cool"},
                    {"policy": "reference", "prompt": p, "text": "therefore cool"}]
    # learned type 1 serves true type 0 and vice versa
    out = generation_eval(samples, meta, np.array([1, 0]), 2,
                          {"uniform": np.array([0.5, 0.5]), "policy_0": np.eye(2)[0]})
    assert out["policies"] == ["type_0", "type_1", "reference"]
    # type_0's texts carry 2 formal words, type_1's none, the reference's one
    np.testing.assert_allclose(out["reward"], [[2.0, 0.0, 1.0], [-2.0, 0.0, -1.0]])
    assert out["own_policy"] == ["type_1", "type_0"]
    assert out["own_is_best"] == [False, False] and out["types_served"] == 0
    assert out["own_minus_reference"] == [-1.0, -1.0]
    assert "own_minus_single_dpo" not in out   # no single-DPO samples, no comparison
    # regret against the own policy: true type 0 owns type_1 (reward 0) and uniform gives it
    # 0.5 * 2 + 0.5 * 0 = 1: regret -1; true type 1 owns type_0 (-2), uniform gives -1: -1
    assert out["true_regret"]["uniform"]["regret"] == [-1.0, -1.0]
    assert out["true_regret"]["policy_0"]["regret"] == [-2.0, 0.0]
    served_right = generation_eval(samples, meta, np.array([0, 1]), 2, {})
    assert served_right["types_served"] == 2 and served_right["own_is_best"] == [True, True]


def test_paired_margins_by_hand():
    from emdpo_ray.report.generations import paired_margins

    # 3 replicates, 1 true type, 3 policies. Prompt difficulty moves every policy together:
    # own (0) is always 1 above policy 1 and 3 above policy 2, though the marginal ranges
    # [0, 2] and [-1, 1] of policies 0 and 1 overlap.
    reps = np.array([[[0.0, -1.0, -3.0]], [[1.0, 0.0, -2.0]], [[2.0, 1.0, -1.0]]])
    out = paired_margins(reps, np.array([0]), [0, 1, 2], level=1.0)
    assert out["margin_over_next_best_ci"] == [[1.0, 1.0]]
    assert out["own_beats_every_rival_paired"] == [True]
    # own policy 1: worse than 0 by 1 on every prompt
    assert paired_margins(reps, np.array([1]), [0, 1, 2], level=1.0)[
        "own_beats_every_rival_paired"] == [False]


def test_own_minus_single_dpo_is_paired_over_prompts():
    from emdpo_ray.report.generations import own_minus

    # 1 true type, policies (own, single_dpo); prompt difficulty moves both together, so the
    # own policy is 0.5 above on every replicate though their ranges [0, 2], [-0.5, 1.5] overlap
    reps = np.array([[[0.0, -0.5]], [[1.0, 0.5]], [[2.0, 1.5]]])
    mean = reps.mean(0)
    out = own_minus(mean, reps, np.array([0]), 1, "single_dpo", level=1.0)
    assert out["own_minus_single_dpo"] == [0.5]
    assert out["own_minus_single_dpo_ci"] == [[0.5, 0.5]]
    assert out["own_above_single_dpo_paired"] == [True]
    # a type without an own policy gets no figure; one below the single policy is not above
    worse = own_minus(mean, reps, np.array([1]), 0, "single_dpo", level=1.0)
    assert worse["own_minus_single_dpo"] == [-0.5] and worse["own_above_single_dpo_paired"] == [False]
    none = own_minus(mean, reps, np.array([-1]), 1, "single_dpo")
    assert none["own_minus_single_dpo"] == [None] and none["own_above_single_dpo_paired"] == [False]


def test_generation_eval_compares_every_own_policy_with_the_single_dpo_policy():
    meta = {"theta": [[0, 1, 0, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0, 0]], "reward_scale": 1.0}
    samples = []
    for p in ("Explain owls.", "Describe tea."):
        samples += [{"policy": "type_0", "prompt": p, "text": "therefore furthermore"},
                    {"policy": "type_1", "prompt": p, "text": "yeah cool"},
                    {"policy": "single_dpo", "prompt": p, "text": "therefore"}]
    out = generation_eval(samples, meta, np.array([0, 1]), 2, {})
    # single_dpo carries one formal word: type 0 gets 2 from its own, 1 from single (+1);
    # type 1 gets 0 from its own, -1 from single (+1); the single policy is no rival for "served"
    assert out["own_minus_single_dpo"] == [1.0, 1.0]
    assert out["own_above_single_dpo_paired"] == [True, True]
    assert out["types_served"] == 2


def test_true_regret_max_and_its_paired_interval_against_uniform_by_hand():
    from emdpo_ray.report.generations import true_regret

    # 2 true types owning policies 0 and 1; two replicates of the [T, P] reward matrix
    reps = np.array([[[2.0, 0.0], [0.0, 2.0]], [[4.0, 0.0], [0.0, 2.0]]])
    mean = reps.mean(0)                                   # [[3, 0], [0, 2]]
    out = true_regret(mean, reps, np.array([0, 1]), 2,
                      {"uniform": np.array([0.5, 0.5]), "policy_0": np.array([1.0, 0.0])}, {},
                      level=1.0)
    # uniform: type 0 loses 3 - 1.5, type 1 loses 2 - 1; per replicate max(1, 1), max(2, 1)
    assert out["uniform"]["regret"] == [1.5, 1.0] and out["uniform"]["max_regret"] == 1.5
    assert out["uniform"]["max_regret_ci"] == [1.0, 2.0]
    assert "max_regret_minus_uniform_ci" not in out["uniform"]
    # policy 0 alone: type 1 loses all of its 2 on both replicates; minus uniform: 1, then 0
    assert out["policy_0"]["regret"] == [0.0, 2.0] and out["policy_0"]["max_regret_ci"] == [2.0, 2.0]
    assert out["policy_0"]["max_regret_minus_uniform_ci"] == [0.0, 1.0]


def test_regret_fidelity_by_hand():
    from emdpo_ray.report.generations import regret_fidelity

    # 2 learned types; true type 0 owns policy 1, true type 1 owns policy 0
    L = np.array([[3.0, 1.0],    # type 0's estimate: policy 1 costs it 2
                  [0.0, 4.0]])   # type 1's estimate: policy 0 costs it 4
    mean = np.array([[0.0, 5.0, 9.0],    # true type 0: own policy 1 (5), policy 0 costs 5
                     [7.0, 6.0, 9.0]])   # true type 1: own policy 0 (7), policy 1 costs 1
    # pairs (estimate, truth): type 0 owns 1: (4 - 0, 5 - 0) = (4, 5); type 1 owns 0:
    # (3 - 1, 7 - 6) = (2, 1); with a third type the correlation is defined
    assert regret_fidelity(L, mean, np.array([1, 0])) is None   # 2 pairs: no correlation
    L3 = np.array([[3.0, 1.0, 0.0], [0.0, 4.0, 1.0], [0.0, 0.0, 2.0]])
    mean3 = np.array([[4.0, 2.0, 1.0], [0.0, 3.0, 3.0], [1.0, 1.0, 1.0]])
    # estimates (type o, policy j): (0,1) 2, (0,2) 3, (1,0) 4, (1,2) 3, (2,0) 2, (2,1) 2
    # truths: 2, 3, 3, 0, 0, 0 -> Pearson of these six pairs
    got = regret_fidelity(L3, mean3, np.array([0, 1, 2]))
    est, true = [2, 3, 4, 3, 2, 2], [2, 3, 3, 0, 0, 0]
    assert got["pairs"] == 6
    np.testing.assert_allclose(got["pearson"], np.corrcoef(est, true)[0, 1])
    # a type with no own policy adds no pair
    assert regret_fidelity(L3, mean3, np.array([0, -1, 2]))["pairs"] == 4
