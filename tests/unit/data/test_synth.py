"""Synthetic families (data/synth.py): what each one's types prefer, and what token counts
can and cannot see of them."""

import numpy as np
import pytest

from emdpo_ray.data import synth


def test_linear_rewards_by_hand():
    # 'therefore' is formal; type 0 (concise, formal): -1 * length/10 + 1 * formal
    r = synth.true_rewards({"theta": synth.CANONICAL[:1].tolist(), "reward_scale": 2.0},
                           ["Explain rivers."], ["Therefore rivers."])
    assert r[0, 0] == pytest.approx(2.0 * (-0.2 + 1.0))


def test_contextual_types_flip_with_the_topic():
    meta = {"theta": synth.make_theta(3, 0, "contextual").tolist(), "reward_scale": 1.0,
            "family": "contextual"}
    text = "Therefore furthermore it is."
    nature, made = "Explain rivers.", "Explain batteries."
    assert synth.context(nature) == 1 and synth.context(made) == 0
    r = synth.true_rewards(meta, [nature, made], [text, text])
    assert r[0, 0] == pytest.approx(-r[0, 1]) and r[0, 0] != 0      # type 0 flips
    assert r[1, 0] == pytest.approx(-r[0, 0])                         # type 1 is its mirror
    assert r[2, 0] == pytest.approx(r[2, 1])                          # type 2 never flips


def test_contextual_responses_name_their_topic_once():
    # one mention per response: no topic word's count grows with length, so token counts
    # carry nothing of the context (the linear family still names it in every sentence)
    recs, _ = synth.generate(users=10, types=3, rankings_per_user=5, seed=2, family="contextual")
    sentences = 0
    for rec in recs:
        topic = rec["prompt"].rstrip(".").split()[-1]
        for r in rec["responses"]:
            assert synth._WORD_RE.findall(r.lower()).count(topic) == 1
            sentences += r.count(".")
    assert sentences > len(recs) * 3  # responses of more than one sentence were drawn
    lin, _ = synth.generate(users=10, types=3, rankings_per_user=5, seed=2)
    assert any(synth._WORD_RE.findall(r["responses"][0].lower())
               .count(r["prompt"].rstrip(".").split()[-1]) > 1 for r in lin)


def test_order_records_share_their_words_and_differ_in_what_comes_first():
    recs, meta = synth.generate(users=6, types=2, rankings_per_user=3, seed=1, family="order")
    for rec in recs:
        words = [sorted(synth._WORD_RE.findall(r.lower())) for r in rec["responses"]]
        assert all(w == words[0] for w in words)
        firsts = {synth.first_sentence(r) for r in rec["responses"]}
        assert len(firsts) >= 2 or len(rec["responses"]) == 1
    lead_formal = "Therefore rivers is. Yeah rivers cool."
    lead_casual = "Yeah rivers cool. Therefore rivers is."
    r = synth.true_rewards(meta, ["p", "p"], [lead_formal, lead_casual])
    assert r[0, 0] > r[0, 1] and r[1, 0] < r[1, 1]  # type 0 wants formal first, type 1 casual


def test_lead_topic_types_flip_with_which_topic_the_prompt_names_first():
    meta = {"theta": synth.make_theta(3, 0, "lead_topic").tolist(), "reward_scale": 1.0,
            "family": "lead_topic"}
    text = "Therefore furthermore it is."
    nature_first, made_first = "Explain rivers and batteries.", "Explain batteries and rivers."
    # the same words as a bag, opposite contexts
    assert sorted(synth._WORD_RE.findall(nature_first)) == sorted(synth._WORD_RE.findall(made_first))
    assert synth.lead_context(nature_first) == 1 and synth.lead_context(made_first) == 0
    r = synth.true_rewards(meta, [nature_first, made_first], [text, text])
    assert r[0, 0] == pytest.approx(-r[0, 1]) and r[0, 0] != 0      # type 0 flips
    assert r[1, 0] == pytest.approx(-r[0, 0])                         # type 1 is its mirror
    assert r[2, 0] == pytest.approx(r[2, 1])                          # type 2 never flips
    assert synth.describe_type(meta, 0).startswith("nature named first: ")


def test_lead_topic_records_pair_a_nature_topic_with_a_made_one_in_either_order():
    recs, _ = synth.generate(users=20, types=2, rankings_per_user=5, seed=2,
                             family="lead_topic")
    firsts = []
    for rec in recs:
        named = [w for w in synth._WORD_RE.findall(rec["prompt"].lower())
                 if w in synth.ALL_TOPICS]
        assert len(named) == 2 and sum(t in synth.NATURE for t in named) == 1
        firsts.append(synth.lead_context(rec["prompt"]))
        for r in rec["responses"]:  # each response names both topics once
            words = synth._WORD_RE.findall(r.lower())
            assert all(words.count(t) == 1 for t in named)
    assert 0.3 < np.mean(firsts) < 0.7  # both contexts, about equally often
    # its held-out prompts take its form: two held-out topics, each context as often
    held = synth.heldout_prompts("lead_topic")
    assert not {r["prompt"] for r in recs} & set(held)
    assert all(len([w for w in synth._WORD_RE.findall(p.lower()) if w in synth.ALL_TOPICS])
               == 2 for p in held)
    assert np.mean([synth.lead_context(p) for p in held]) == 0.5


def test_meta_names_the_family_and_held_out_prompts_are_never_trained_on():
    recs, meta = synth.generate(users=20, types=2, rankings_per_user=4, seed=0,
                                family="contextual")
    assert meta["family"] == "contextual" and np.asarray(meta["theta"]).shape == (2, 2, 7)
    assert not {r["prompt"] for r in recs} & set(meta["heldout_prompts"])
    ctx = [synth.context(p) for p in meta["heldout_prompts"]]
    assert 0 < sum(ctx) < len(ctx)  # both contexts among the held-out prompts
    with pytest.raises(ValueError, match="--family must be one of"):
        synth.generate(family="spiral")


def _start_ari(family: str) -> float:
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.data.records import group_by_user, parse_record
    from emdpo_ray.train.start import kmeans_init

    recs, _ = synth.generate(users=40, types=2, rankings_per_user=8, seed=3, family=family)
    parsed = [parse_record(r, f"s:{i}") for i, r in enumerate(recs)]
    users, ui = group_by_user(parsed)
    truth = {r.user_id: r.true_type for r in parsed}
    g = kmeans_init(parsed, np.asarray(ui), len(users), 2, seed=0, smoothing=0.05,
                    refine_iterations=10)
    return adjusted_rand_score([truth[u] for u in users], g.argmax(1))


def test_token_counts_separate_linear_types_but_not_contextual_or_order_ones():
    assert _start_ari("linear") > 0.8
    assert _start_ari("contextual") < 0.3
    assert _start_ari("order") < 0.3
    assert _start_ari("lead_topic") < 0.3



def test_describe_type_names_the_strongest_weights():
    from emdpo_ray.data.synth import describe_type

    # canonical type 0: length -1, formal +1, casual -1 (equal weights: all three, by size)
    meta = {"theta": synth.CANONICAL[:1].tolist(), "features": synth.FEATURES}
    assert sorted(describe_type(meta, 0).split()) == ["+formal", "-casual", "-length"]
    # weights under half the largest are left out
    meta = {"theta": [[0.1, 2.0, 0.0, 0.0, -1.5, 0.0, 0.0]], "features": synth.FEATURES}
    assert describe_type(meta, 0) == "+formal -direct"
    order = {"theta": [[0, 0, 1, 0, 0, 0, 0]], "family": "order"}
    assert describe_type(order, 0) == "+casual (first sentence)"
    ctx = {"theta": [[[0, 1, 0, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0, 0]]], "family": "contextual"}
    assert describe_type(ctx, 0) == "nature topics: -formal; made things: +formal"
