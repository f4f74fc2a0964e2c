"""The sampler behind serving and MMRA (models/decoding.py) draws from the policy's own
distribution: no top-k, no truncation at top_p = 1, each row its own seeded stream."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from emdpo_ray.models.decoding import GenRequest, generate_batch
from emdpo_ray.models.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["abcdefghijklmnopqrstuvwxyz " * 3, "the rivers and tides"], 400)


def _fixed_policy(tok, logits_by_token: dict[int, float]):
    """A 'model' whose next-token distribution is the same known softmax at every step."""
    v = len(tok)
    row = torch.full((v,), float("-inf"))
    for t, x in logits_by_token.items():
        row[t] = x

    def forward(input_ids, attention_mask, position_ids, cache, policies):
        return row.expand(len(input_ids), v).clone(), None

    return forward


def _support(tok, n):
    special = set(tok.all_special_ids)
    return [t for t in range(len(tok)) if t not in special][:n]


def test_single_token_frequencies_match_the_softmax(tok):
    # 60 tokens, logits from 0 down to -3: a top-k of 50 would never draw the last 10
    support = _support(tok, 60)
    logits = np.linspace(0.0, -3.0, len(support))
    p = np.exp(logits) / np.exp(logits).sum()
    n = 12000
    reqs = [GenRequest([tok.bos_token_id], 0, 1, 1.0, 1.0, seed=i) for i in range(n)]
    res = generate_batch(_fixed_policy(tok, dict(zip(support, logits))), tok, reqs)
    drawn = [r.token_ids[0] for r in res]
    counts = np.array([drawn.count(t) for t in support])
    assert counts.sum() == n
    assert counts[-10:].min() > 0  # the tail is sampled
    assert chisquare(counts, n * p).pvalue > 1e-3


def test_temperature_and_top_p_reshape_exactly(tok):
    a, b, c = _support(tok, 3)
    fwd = _fixed_policy(tok, {a: np.log(0.6), b: np.log(0.3), c: np.log(0.1)})
    n = 6000
    # top_p = 0.8: keep the smallest set with mass >= 0.8 -> {a, b}, renormalised (2/3, 1/3)
    res = generate_batch(fwd, tok, [GenRequest([tok.bos_token_id], 0, 1, 1.0, 0.8, seed=i)
                                    for i in range(n)])
    drawn = [r.token_ids[0] for r in res]
    assert drawn.count(c) == 0
    assert chisquare([drawn.count(a), drawn.count(b)], [n * 2 / 3, n / 3]).pvalue > 1e-3
    # temperature 0.5 squares the probabilities: (.36, .09, .01) / .46
    res = generate_batch(fwd, tok, [GenRequest([tok.bos_token_id], 0, 1, 0.5, 1.0, seed=i)
                                    for i in range(n)])
    drawn = [r.token_ids[0] for r in res]
    expect = np.array([0.36, 0.09, 0.01]) / 0.46 * n
    assert chisquare([drawn.count(t) for t in (a, b, c)], expect).pvalue > 1e-3


def test_a_seed_fixes_the_sample_whatever_the_batch(tok):
    support = _support(tok, 20)
    fwd = _fixed_policy(tok, {t: 0.0 for t in support})
    one = generate_batch(fwd, tok, [GenRequest([tok.bos_token_id], 0, 6, 1.0, 1.0, seed=7)])[0]
    many = generate_batch(fwd, tok, [GenRequest([tok.bos_token_id], 0, 6, 1.0, 1.0, seed=s)
                                     for s in (3, 7, 9)])
    assert many[1].token_ids == one.token_ids and len(one.token_ids) == 6
