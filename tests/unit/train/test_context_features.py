"""Features crossed with the prompt (train/context_features.py): the covariation of users'
preferences across prompts, its directions, and the crossed counts, by hand."""

import numpy as np
import pytest

from emdpo_ray.data.records import parse_record
from emdpo_ray.train.start import response_features


def test_preference_covariation_by_hand():
    from emdpo_ray.train.context_features import preference_covariation, prompt_directions

    # prompt words A, B; each user one record under each, one feature. Users 0 and 1 prefer
    # it under A and not under B, users 2 and 3 the reverse: over users the preference under
    # each word averages 0, but it co-varies: D[u, A] * D[u, B] = -1 for every user, so
    # M[A, B] = -4; M[A, A] = sum_u D[u, A]^2 = 4, less each record's own product (4 x 1) = 0
    g = np.array([[1, 0], [0, 1]] * 4, float)
    d = np.array([[1], [-1], [1], [-1], [-1], [1], [-1], [1]], float)
    ui = np.repeat(np.arange(4), 2)
    m = preference_covariation(d, g, ui, 4)
    assert np.allclose(m, [[0, -4], [-4, 0]])
    v = prompt_directions(m, 1)[:, 0]          # eigenvalue 4: A against B
    assert np.allclose(np.abs(v), np.sqrt(0.5)) and v[0] == pytest.approx(-v[1])
    # two words that always share a prompt: one record per user, so all of their
    # co-occurrence is a record's product with itself, which says nothing
    g2, d2 = np.ones((3, 2)), np.array([[1.0], [2.0], [-3.0]])
    assert np.allclose(preference_covariation(d2, g2, np.arange(3), 3), 0)


def test_preference_covariation_in_blocks_of_users_matches_its_definition(monkeypatch):
    from emdpo_ray.train import context_features as start

    rng = np.random.default_rng(0)
    n, users, p, f = 40, 7, 5, 3
    g = (rng.random((n, p)) < 0.4).astype(float)
    d, ui = rng.normal(size=(n, f)), rng.integers(0, users, n)
    # the definition, with every tensor whole: D[u, p], centred where u saw p, less each
    # record's own product
    cnt = np.array([[g[ui == u, q].sum() for q in range(p)] for u in range(users)])
    w = g / np.maximum(cnt[ui], 1)
    big = np.zeros((users, p, f))
    np.add.at(big, ui, w[:, :, None] * d[:, None, :])
    mean = big.sum(0) / np.maximum((cnt > 0).sum(0), 1)[:, None]
    c = np.where(cnt[..., None] > 0, big - mean, 0)
    own = w[:, :, None] * (d[:, None, :] - mean)
    want = np.einsum("upf,uqf->pq", c, c) - np.einsum("npf,nqf->pq", own, own)
    monkeypatch.setattr(start, "USER_BLOCK", 3)   # 7 users: blocks of 3, 3 and 1
    assert np.allclose(start.preference_covariation(d, g, ui, users), want)


def test_by_prompt_by_hand():
    from emdpo_ray.train.context_features import by_prompt

    x = np.array([[[1, 0], [0, 2]]], np.float32)          # one record, two responses
    z = np.array([[3, -1]], np.float32)                    # its prompt's two coordinates
    # each count, then it times each coordinate: x_v z_0, x_v z_1 for v = 0, 1
    assert by_prompt(x, z).tolist() == [[[1, 0, 3, -1, 0, 0], [0, 2, 0, 0, 6, -2]]]


def test_tokens_by_prompt_on_prompts_all_alike_is_the_counts():
    from emdpo_ray.train.context_features import tokens_by_prompt

    recs = [parse_record({"user_id": f"u{i % 4}", "prompt": "the same prompt",
                          "responses": ["a b", "c d", "e f"], "ranking": [0, 1, 2]}, f"s:{i}")
            for i in range(12)]
    x, mask = response_features(recs)
    assert np.array_equal(tokens_by_prompt(recs, x, mask, np.arange(12) % 4, 4), x)


def test_state_covariation_by_hand():
    from emdpo_ray.train.context_features import prompt_directions, state_covariation

    # one prompt coordinate, one feature; each user one record at g = +1 and one at -1.
    # Users 0 and 1 prefer the feature where g = +1 and not where g = -1, users 2 and 3 the
    # reverse: D[u] = (1/2)(1 * d_1 + (-1) * d_2) = +1, +1, -1, -1, mean 0, so
    # sum_u D[u]^2 = 4, less each record's own product, (1/2)^2 * d^2 over 8 records = 2
    g = np.array([[1.0], [-1.0]] * 4)
    d = np.array([[1], [-1], [1], [-1], [-1], [1], [-1], [1]], float)
    ui = np.repeat(np.arange(4), 2)
    assert np.allclose(state_covariation(d, g, ui, 4), [[2.0]])
    # a second coordinate the preferences do not follow (the same at both records of a
    # user): D[u, 1] = (1/2)(d_1 + d_2) = 0, so its covariation is minus its records' own
    # products, -(1/2)^2 * 8 = -2; with the first, sum_u D[u, 0] D[u, 1] = 0 and the own
    # products (+-1/2)(1/2) d^2 cancel; the top direction is the first coordinate
    g2 = np.c_[g, np.ones(8)]
    m = state_covariation(d, g2, ui, 4)
    assert np.allclose(m, [[2.0, 0.0], [0.0, -2.0]])
    assert np.allclose(np.abs(prompt_directions(m, 1)[:, 0]), [1, 0])


def test_state_covariation_in_blocks_of_users_matches_its_definition(monkeypatch):
    from emdpo_ray.train import context_features as start

    rng = np.random.default_rng(1)
    n, users, p, f = 40, 7, 4, 3
    g, d, ui = rng.normal(size=(n, p)), rng.normal(size=(n, f)), rng.integers(0, users, n)
    # the definition: D[u, p] = mean over u's records of g[n, p] d[n], centred over users,
    # less each record's own product
    n_u = np.maximum(np.bincount(ui, minlength=users), 1)
    big = np.zeros((users, p, f))
    np.add.at(big, ui, (g / n_u[ui, None])[:, :, None] * d[:, None, :])
    c = big - big.mean(0)
    own = (g / n_u[ui, None])[:, :, None] * d[:, None, :]
    want = np.einsum("upf,uqf->pq", c, c) - np.einsum("npf,nqf->pq", own, own)
    monkeypatch.setattr(start, "USER_BLOCK", 3)
    assert np.allclose(start.state_covariation(d, g, ui, users), want)


def test_whitened_has_unit_variance_and_drops_empty_directions():
    from emdpo_ray.train.context_features import whitened

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3)) * [10.0, 1.0, 0.3]   # variances 100, 1, 0.09: all kept
    # a fourth column that repeats the first: the same direction, no new variance
    w = whitened(np.c_[a, a[:, 0]])
    assert w.shape == (200, 3)
    assert np.allclose(np.cov(w.T), np.eye(3), atol=1e-4) and np.allclose(w.mean(0), 0, atol=1e-5)
    assert whitened(np.ones((5, 4))).shape == (5, 0)   # prompts all alike: no direction
