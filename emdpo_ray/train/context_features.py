"""Features that let a preference depend on the prompt, for the start (train/start.py).

A user whose preference flips between two kinds of prompt looks, averaged over prompts,
like a user with no preference: plain token counts cannot tell two such types apart. The
counts crossed with a few coordinates of the prompt can, and the coordinates come without
labels: users' preferences under prompts on one side of a direction co-vary negatively with
their preferences under prompts on the other side, though over all users the flip cancels
(docs/start_features-contextual.md). The prompt is read as its words
(`tokens_by_prompt`) or as the reference's last-layer state of it (`tokens_by_prompt_state`,
which sees what the words as a bag cannot, such as their order;
docs/start_features-lead-topic.md); `reference_by_prompt_state` crosses the reference's
states of the responses, not their counts, with the latter.
"""

from __future__ import annotations

import numpy as np

from emdpo_ray.data.records import Record
from emdpo_ray.train.linear_mixture import rank_weighted

TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"   # words and single punctuation marks

# The prompt-interacted counts: response words and prompt words most documents hold (words
# in over half the prompts, like an opener's, tell no prompt from another), and how many
# directions of the prompt words the counts are crossed with.
PROMPT_WORDS, PROMPT_RESPONSE_WORDS, PROMPT_MAX_DF, PROMPT_DIRECTIONS = 64, 256, 0.5, 4
USER_BLOCK = 1024


def user_blocks(w: np.ndarray, d: np.ndarray, user_index: np.ndarray, num_users: int,
                block: int):
    """Yields (first user, D [b, P, F]) per block of b users: D[u, p] = sum of w[n, p] d[n]
    over user u's records; memory O(block P F), not O(users P F)."""
    for lo in range(0, num_users, block):
        rows = np.flatnonzero((user_index >= lo) & (user_index < lo + block))
        per_user = np.zeros((min(block, num_users - lo), w.shape[1], d.shape[1]))
        np.add.at(per_user, user_index[rows] - lo, w[rows, :, None] * d[rows, None, :])
        yield lo, per_user


def prompt_words(prompts: list[str]) -> np.ndarray:
    """[N, P] 0/1: which of the P (<= PROMPT_WORDS) most frequent informative words each
    prompt holds (in at least 2 prompts and at most PROMPT_MAX_DF of them)."""
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(token_pattern=TOKEN_PATTERN, lowercase=True, binary=True,
                          max_features=PROMPT_WORDS, min_df=2, max_df=PROMPT_MAX_DF)
    try:
        return vec.fit_transform(prompts).toarray().astype(np.float32)
    except ValueError:  # no word passes the bounds (one prompt, or all alike)
        return np.zeros((len(prompts), 0), np.float32)


def preference_covariation(d: np.ndarray, g: np.ndarray, user_index: np.ndarray,
                           num_users: int) -> np.ndarray:
    """[P, P]: how users' preferences co-vary between prompts with word p and with word q.

    d [N, F]: each record's preference vector (its responses' features, rank_weighted);
    g [N, P]: its prompt words. D[u, p] is user u's mean preference under prompts with word p,
    centred over users; M[p, q] = sum_u <D[u, p], D[u, q]>, each record's product with itself
    left out (words of one prompt always co-occur, which says nothing of preferences). Users
    whose preference flips between two groups of prompts make M negative across the groups
    and positive within them, though over all users the flip cancels."""
    cnt = np.zeros((num_users, g.shape[1]))
    np.add.at(cnt, user_index, g)
    w = g / np.maximum(cnt[user_index], 1)                               # [N, P]
    # mean over users of D[u, p], from records: sum_u D[u, p] = sum_n w[n, p] d[n]
    mean = (w.T @ d) / np.maximum((cnt > 0).sum(0), 1)[:, None]         # [P, F]
    m = np.zeros((g.shape[1], g.shape[1]))
    for lo, per_user in user_blocks(w, d, user_index, num_users, USER_BLOCK):
        centred = np.where(cnt[lo:lo + len(per_user), :, None] > 0, per_user - mean, 0)
        m += np.einsum("upf,uqf->pq", centred, centred)
    # each record's own product, sum_n w_np w_nq <d_n - mean_p, d_n - mean_q>, expanded
    e = d @ mean.T                                                       # [N, P]: d_n . mean_p
    own = ((w * (d * d).sum(1, keepdims=True)).T @ w - w.T @ (w * e) - (w * e).T @ w
           + (mean @ mean.T) * (w.T @ w))
    return m - own


def prompt_directions(covariation: np.ndarray, r: int) -> np.ndarray:
    """[P, r]: the top r eigenvectors of preference_covariation, the directions of the
    prompt words along which users' preferences co-vary most."""
    values, vectors = np.linalg.eigh(covariation)
    return vectors[:, np.argsort(-values)[:r]]


def by_prompt(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """[N, m, V * (1 + R)]: the counts x [N, m, V], and beside them the same counts times
    each coordinate of the record's prompt, x[n, j, v] * z[n, c] (z [N, R]). A linear model
    on them weighs a response word differently under different prompts, which a preference
    that flips with what the prompt is about needs; plain counts cannot."""
    inter = (x[:, :, :, None] * z[:, None, None, :]).reshape(*x.shape[:2], -1)
    return np.concatenate([x, inter], -1).astype(np.float32)


def frequent_words(x_tok: np.ndarray) -> np.ndarray:
    """The counts of the PROMPT_RESPONSE_WORDS response words most responses hold."""
    return x_tok[..., np.sort(np.argsort(-(x_tok > 0).sum((0, 1)), kind="stable")
                              [:PROMPT_RESPONSE_WORDS])]


def crossed_with_prompt(x: np.ndarray, mask: np.ndarray, g: np.ndarray, covariation,
                        user_index: np.ndarray, num_users: int) -> np.ndarray:
    """by_prompt of the counts x, crossed with each prompt's coordinates g [N, P] on the
    PROMPT_DIRECTIONS prompt_directions of the users' `covariation` (preference_covariation
    or state_covariation), scaled to unit variance."""
    cov = covariation(rank_weighted(x, mask), g, user_index, num_users)
    # no prompt coordinate (all prompts alike): z has no columns, the counts stay
    z = g @ prompt_directions(cov, min(PROMPT_DIRECTIONS, g.shape[1]))
    return by_prompt(x, z / (z.std(0) + 1e-6))


def tokens_by_prompt(records: list[Record], x_tok: np.ndarray, mask: np.ndarray,
                     user_index: np.ndarray, num_users: int) -> np.ndarray:
    """The frequent_words crossed_with_prompt's words (preference_covariation)."""
    return crossed_with_prompt(frequent_words(x_tok), mask,
                               prompt_words([r.prompt for r in records]),
                               preference_covariation, user_index, num_users)


def whitened(g: np.ndarray, rel: float = 1e-4) -> np.ndarray:
    """[N, P'] centred g [N, P] rotated onto its principal axes and scaled to unit variance,
    axes with variance below `rel` of the largest dropped. A direction of the prompt that
    users' preferences follow may carry little of the states' variance; whitened, every
    direction enters the covariation at the same scale (unwhitened, the `lead_topic` start
    falls from 0.99 to 0.52: docs/start_features-lead-topic.md)."""
    c = g - g.mean(0)
    values, vectors = np.linalg.eigh(np.atleast_2d(np.cov(c.T)))
    keep = values > rel * max(values.max(initial=0.0), 1e-12)
    return (c @ (vectors[:, keep] / np.sqrt(values[keep]))).astype(np.float32)


def state_covariation(d: np.ndarray, g: np.ndarray, user_index: np.ndarray,
                      num_users: int) -> np.ndarray:
    """[P, P]: preference_covariation for continuous prompt coordinates g [N, P] (centred).

    D[u, p] = (1 / n_u) sum of g[n, p] d[n] over user u's records: the user's preference
    moment along prompt direction p, which for a user whose preference flips with a property
    that p follows is that preference, signed by the user's type. M = sum_u <D[u, p] -
    mean_p, D[u, q] - mean_q>, each record's product with itself left out."""
    n_u = np.maximum(np.bincount(user_index, minlength=num_users), 1)
    w = g / n_u[user_index, None]                                       # [N, P]
    mean = (w.T @ d) / num_users                                        # [P, F]
    m = -num_users * (mean @ mean.T)
    # at most 2^25 numbers a block (a wide model's P is 192)
    block = max(1, min(USER_BLOCK, (1 << 25) // max(g.shape[1] * d.shape[1], 1)))
    for _, per_user in user_blocks(w, d, user_index, num_users, block):
        m += np.einsum("upf,uqf->pq", per_user, per_user)
    return m - (w * (d * d).sum(1, keepdims=True)).T @ w


def tokens_by_prompt_state(x_tok: np.ndarray, mask: np.ndarray, prompt_states: np.ndarray,
                           user_index: np.ndarray, num_users: int) -> np.ndarray:
    """tokens_by_prompt with the reference's reading of the prompt in place of its words:
    the frequent_words crossed with each prompt's coordinates on the PROMPT_DIRECTIONS
    directions of its whitened last-layer state (models/features.py) along which users'
    preferences co-vary (state_covariation). It sees what the words as a bag cannot, such
    as which of two topics a prompt names first (the `lead_topic` family)."""
    return crossed_with_prompt(frequent_words(x_tok), mask, whitened(prompt_states),
                               state_covariation, user_index, num_users)


def reference_by_prompt_state(x_ref: np.ndarray, mask: np.ndarray, prompt_states: np.ndarray,
                              user_index: np.ndarray, num_users: int) -> np.ndarray:
    """tokens_by_prompt_state with the reference's reading of the responses in place of
    their counts: the start's `reference` features x_ref [N, m, F] crossed with the prompt's
    coordinates on the directions of its whitened state along which users' preferences
    co-vary. The language model alone, no counts on either side: on `contextual` it finds
    the types that counts alone cannot (docs/start_language.md)."""
    return crossed_with_prompt(x_ref, mask, whitened(prompt_states), state_covariation,
                               user_index, num_users)
