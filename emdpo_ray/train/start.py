"""Initial posteriors that leave EM's symmetric point (`em.init`).

From near-uniform posteriors every type sees the same weighted data and EM never moves, so
the start must already split users. `kmeans` (default), on per-response features:

1. per-user preference embeddings: the features of the responses, rank-weighted from +1
   (best) to -1 (worst), averaged per user, L2-normalised; k-means (scikit-learn) on them;
2. refinement: a few EM iterations of a mixture of *linear* Plackett-Luce models on the same
   features (a cheap stand-in for the policies, fitted with L-BFGS), which sharpens the
   k-means split before any policy is trained.

The features (`em.init_features`): `tokens`, bag-of-tokens counts (blind to order and to
how a preference depends on the prompt); `tokens_by_prompt`, the counts and beside them the
same counts times the prompt's coordinates on the directions of its words along which
users' preferences co-vary (types whose preference flips with what the prompt is about,
docs/start_features-contextual.md); `tokens_by_prompt_state`, the same with the
reference's last-layer state of the prompt in place of its words (it sees what the words as
a bag cannot, such as their order); `reference`, middle-layer states and token embeddings
(em.init_layers) pooled over the first sentence, the middle sentences and the last sentence
of each response (em.init_pooling; models/features.py) of a copy of the reference
given `em.init_sft_epochs` more passes of SFT on the responses (the workers drop it after):
one more pass carries the order of a response's sentences far better than the reference's
own states (docs/start_features-order-levers.md, docs/start_features-order-passes.md);
`both` (tokens and reference); or `auto`
(default), each of the five tried on 80% of every user's rankings and the one whose mixture
best predicts the other 20% kept (held-out predictive log-likelihood), or the simplest
within noise of it (one-standard-error rule). `reference_by_prompt_state` crosses the
`reference` features with the prompt's state as `tokens_by_prompt_state` crosses the counts;
`language` chooses as `auto` does between it and `reference`: the language model alone, no
counts (docs/start_language.md). It is not among `auto`'s: the widest set (5 x 288), it
costs the start half as much again, and where chosen it predicted held-out rankings worse
than `auto`'s choice.

The linear mixture is fitted from `em.init_restarts` starts (the k-means split, then random
hard partitions), the one of highest log-likelihood kept: k-means settles on the split that
the features make obvious, which on types that flip with the prompt is the wrong one. Its L2
penalty is walked down `em.init_l2` (strongest first, each fit continuing from the last) and
the strength whose mixture best predicts the held-out rankings kept, the strongest within
noise of the best: sparse token counts want a weak penalty, dense reference states a strong
one (docs/start_features.md). Last, split-and-merge moves (`em.init_split_merge`): two
types that look alike are merged and another split in two, kept when the log-likelihood
rises, which frees a type that restarts left empty or holding two types. The candidates,
the restarts on every ranking and the moves are fitted side by side on the driver's CPUs
(linear_mixture.parallel_map), and choose what they would in turn.

`labels` starts from the records' `true_type` (an upper bound for evaluation); `random`
tries `em.restarts` random hard starts, each scored by one M-step and E-step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from emdpo_ray.config import Config
from emdpo_ray.core.estep import (per_ranking_interval, predictive_user_logliks,
                                   smoothed_onehot)
from emdpo_ray.data.records import Record
from emdpo_ray.train.context_features import (TOKEN_PATTERN, reference_by_prompt_state,
                                              tokens_by_prompt, tokens_by_prompt_state)
from emdpo_ray.train.linear_mixture import (feature_start, l2_path, mixture_loglik,
                                            parallel_map, record_logliks, split_merge)

if TYPE_CHECKING:
    from emdpo_ray.models.features import Representations

HELDOUT_PER_USER = "heldout_loglik_per_user"  # the start's `info` key of its [U] figures
T = TypeVar("T")
RESPONSE_WORDS = 2048  # the token counts' vocabulary: the most frequent words of the responses
COUNTS_ONLY = ("tokens", "tokens_by_prompt")  # em.init_features that never read the reference



def response_features(records: list[Record], max_words: int = RESPONSE_WORDS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the `max_words` most frequent words in every response, in ranked order:
    X [N, m, V] and mask [N, m]. Dense for the linear mixture, so the vocabulary is capped:
    a real corpus's long tail would make X [N, m, tens of thousands] and tell few users
    apart."""
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(token_pattern=TOKEN_PATTERN, lowercase=True, max_features=max_words)
    counts = vec.fit_transform([y for r in records for y in r.ranked])   # sparse, one pass
    m = max(len(r.responses) for r in records)
    n_resp = np.array([len(r.responses) for r in records])
    rec = np.repeat(np.arange(len(records)), n_resp)
    pos = np.arange(len(rec)) - np.repeat(np.cumsum(n_resp) - n_resp, n_resp)
    x = np.zeros((len(records), m, counts.shape[1]), np.float32)
    for lo in range(0, counts.shape[0], 4096):  # by blocks: never a second dense copy
        x[rec[lo:lo + 4096], pos[lo:lo + 4096]] = counts[lo:lo + 4096].toarray()
    mask = np.arange(m)[None, :] < n_resp[:, None]
    return x, mask


def heldout_records(user_index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """[N] bool: round(fraction * n_u) of each user's records, never all of them."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(user_index), bool)
    for u in np.unique(user_index):
        idx = np.flatnonzero(user_index == u)
        n = min(int(round(fraction * len(idx))), len(idx) - 1)
        held[rng.choice(idx, size=n, replace=False)] = True
    return held


def predictive_loglik(scores: np.ndarray, held: np.ndarray, user_index: np.ndarray,
                      num_users: int, eta: np.ndarray) -> float:
    """sum_u log p(held rankings of u | u's other rankings) (predictive_user_logliks)."""
    return float(predictive_user_logliks(scores, held, user_index, num_users, eta).sum())


def standardized(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Features scaled to mean 0 and variance 1 over the real responses (padding stays 0)."""
    real = x[mask]
    return np.where(mask[..., None], (x - real.mean(0)) / (real.std(0) + 1e-6), 0).astype(np.float32)


def simplest_within_noise(per_user: dict, n_held: np.ndarray, level: float = 0.68,
                          seed: int = 0):
    """The key of `per_user` ({key: [U] held-out log-likelihoods}, keys from simplest to
    most complex) chosen by the one-standard-error rule: the simplest candidate whose
    shortfall from the best, paired per user, is within noise (its `level` interval,
    resampling users, reaches 0). With few held-out rankings the best score alone is a
    noisy choice and, among near-equals, favours the candidate that overfits most."""
    best = max(per_user, key=lambda key: per_user[key].sum())
    for key in per_user:
        lo, _ = per_ranking_interval(per_user[best] - per_user[key], n_held, seed=seed,
                                     level=level)
        if lo <= 0:
            return key
    return best


def choose_features(candidates: dict[str, Callable[[], np.ndarray]], mask: np.ndarray,
                    user_index: np.ndarray, num_users: int, k: int, seed: int,
                    refine_iterations: int, held: np.ndarray,
                    restarts: int = 1, starts: dict | None = None,
                    l2s: tuple[float, ...] = (1e-2,)
                    ) -> tuple[str, float, dict, np.ndarray, np.ndarray]:
    """The candidate (a function giving features [N, m, V], asked for in turn) and L2
    strength (down the path `l2s`, strongest first) whose start, fitted without the `held`
    records, predicts them best, or the simplest (fewest dimensions, then strongest L2)
    within noise of it (simplest_within_noise): (name, l2, {name: {l2: held-out
    log-likelihood per held-out ranking}}, the chosen start's posteriors [U, K], its
    held-out log-likelihood per user [U]); `starts` gets each candidate's restart
    log-likelihoods."""
    keep = ~held
    infos = {name: starts.setdefault(name, {}) if starts is not None else None
             for name in candidates}

    def fit(name: str) -> tuple[int, list]:
        x = candidates[name]()
        mix = feature_start(x[keep], mask[keep], user_index[keep], num_users, k, seed,
                            refine_iterations, restarts, l2s[0], info=infos[name])
        path = l2_path(x[keep], mask[keep], user_index[keep], num_users, mix, list(l2s),
                       refine_iterations)
        return x.shape[-1], [(l2, m, predictive_user_logliks(
            record_logliks(x, mask, m.theta), held, user_index, num_users, m.eta))
            for l2, m in zip(l2s, path)]

    scores: dict[str, dict[float, float]] = {}
    fits: dict[tuple[str, float], tuple[int, np.ndarray, np.ndarray]] = {}
    # side by side: one that waits for the workers' features does not hold up the others
    for name, (dims, path) in zip(candidates, parallel_map(fit, candidates)):
        scores[name] = {}
        for l2, m, per_user in path:
            scores[name][l2] = float(per_user.sum() / max(held.sum(), 1))
            fits[(name, l2)] = (dims, per_user, m.gamma)
    order = sorted(fits, key=lambda key: (fits[key][0], -key[1]))
    chosen, l2 = simplest_within_noise({key: fits[key][1] for key in order},
                                       np.bincount(user_index[held], minlength=num_users),
                                       seed=seed)
    return chosen, l2, scores, fits[(chosen, l2)][2], fits[(chosen, l2)][1]


def once(fn: Callable[[], T]) -> Callable[[], T]:
    """fn() computed at most once, however many threads ask at the same time (the start
    fits its candidates side by side; functools.cache would compute it in each thread that
    asks before the first has it). An error is not kept: the next call tries again."""
    lock, done = threading.Lock(), []

    def get() -> T:
        with lock:
            if not done:
                done.append(fn())
        return done[0]
    return get


def feature_candidates(features: str, records: list[Record], user_index: np.ndarray,
                       num_users: int, reference_features: Callable[[], "Representations"] | None = None,
                       ) -> tuple[dict[str, Callable[[], np.ndarray]], np.ndarray]:
    """The start's candidate feature sets for `em.init_features` (`auto`: five, simplest
    first; `language`: the language model's alone, no counts), each a cached function
    giving [N, m, V], and the response mask [N, m]. The reference model's representations
    (models/features.py's Representations) come from `reference_features()`, asked for only
    when a candidate needs them (the workers may still be computing them)."""
    names = {"auto": ["tokens", "tokens_by_prompt", "tokens_by_prompt_state", "reference",
                      "both"],
             "language": ["reference", "reference_by_prompt_state"]}.get(features, [features])
    x_tok, mask = response_features(records)

    @once
    def reference():
        if reference_features is None:
            raise ValueError(f"em.init_features={features} needs the reference model's features")
        return reference_features()

    @once
    def x_ref() -> np.ndarray:
        return standardized(reference().responses, mask)

    makers = {"tokens": lambda: x_tok, "reference": x_ref,
              "tokens_by_prompt": once(
                  lambda: tokens_by_prompt(records, x_tok, mask, user_index, num_users)),
              "tokens_by_prompt_state": once(
                  lambda: tokens_by_prompt_state(x_tok, mask, reference().prompts, user_index,
                                                 num_users)),
              "reference_by_prompt_state": once(
                  lambda: reference_by_prompt_state(x_ref(), mask, reference().prompts,
                                                    user_index, num_users)),
              "both": lambda: np.concatenate([x_tok, x_ref()], -1)}
    return {n: makers[n] for n in names}, mask


def kmeans_init(records: list[Record], user_index: np.ndarray, num_users: int, k: int,
                seed: int, smoothing: float, refine_iterations: int,
                features: str = "tokens", reference_features: Callable[[], "Representations"] | None = None,
                info: dict | None = None, held: np.ndarray | None = None,
                restarts: int = 1, l2s: tuple[float, ...] = (1e-2,),
                split_merge_tries: int = 0, candidates: tuple | None = None) -> np.ndarray:
    """The `kmeans` start on `features` (tokens, reference, both or auto) with `restarts`
    starts of the linear mixture and its L2 strength chosen down `l2s` (l2_path); the
    reference model's features come from
    `reference_features()` (Representations), called only if needed (the workers may still
    be computing them; the candidates are fitted side by side, so those on token counts go
    on meanwhile). `held` [N] bool: the
    records on which candidates are compared and the chosen one's held-out log-likelihood
    is measured (`info`); by default 20% of each user's. On every record the chosen
    candidate's start, fitted without them, is continued, fresh restarts are run, and the
    likelier of the two kept, then improved by up to `split_merge_tries` split-and-merge
    moves a round (split_merge). `candidates`: feature_candidates' result when the caller
    has built it already (`train --types auto`), so nothing is computed twice."""
    candidates, mask = candidates or feature_candidates(features, records, user_index,
                                                        num_users, reference_features)
    names = list(candidates)
    l2s = tuple(sorted(l2s, reverse=True))
    chosen, l2, gamma = names[0], l2s[0], None
    if held is None:
        held = heldout_records(user_index, 0.2, seed)
    if k > 1 and held.any() and (len(candidates) > 1 or len(l2s) > 1 or info is not None):
        starts: dict = {}
        chosen, l2, scores, gamma, per_user = choose_features(
            candidates, mask, user_index, num_users, k, seed, max(refine_iterations, 1), held,
            restarts, starts, l2s)
        if info is not None:
            info["heldout_loglik_per_ranking"] = {n: max(v.values()) for n, v in scores.items()}
            info["heldout_loglik_chosen"] = scores[chosen][l2]
            # [U], for the guard's paired test; the driver takes it out before history.json
            info[HELDOUT_PER_USER] = per_user
            info["heldout_loglik_by_l2"] = {n: {str(a): b for a, b in v.items()}
                                            for n, v in scores.items()}
            info["restarts"] = starts
    if info is not None:
        info["features"], info["l2"] = chosen, l2
    if k == 1:
        return np.ones((num_users, 1))
    x = candidates[chosen]()
    # On every record: fresh restarts walked down to the chosen L2, and the chosen start
    # (fitted without the held-out rankings) continued; the likelier is kept, since a start
    # fitted on 80% of the rankings may sit in a poorer optimum than the restarts find on all.
    fresh = feature_start(x, mask, user_index, num_users, k, seed, refine_iterations, restarts,
                          l2s[0], threads=None)
    fits = {"fresh": l2_path(x, mask, user_index, num_users, fresh, [a for a in l2s if a >= l2],
                             refine_iterations)[-1]}
    if gamma is not None:
        fits["continued"] = feature_start(x, mask, user_index, num_users, k, seed,
                                          refine_iterations, l2=l2, gamma=gamma)
    lls = {n: mixture_loglik(x, mask, user_index, num_users, m) for n, m in fits.items()}
    kept = max(lls, key=lls.get)
    sm: dict = {}
    mix = split_merge(x, mask, user_index, num_users, fits[kept], l2, refine_iterations, seed,
                      split_merge_tries, sm)
    if info is not None:
        info["final_logliks"], info["final"] = lls, kept
        info["split_merge"] = sm.get("moves", [])
    # Keep the refined split but never start fully certain: the policies get a say.
    return smoothed_onehot(mix.gamma.argmax(1), k, smoothing)


def labels_from_records(records: list[Record], user_index: np.ndarray, num_users: int,
                        k: int) -> np.ndarray:
    out = np.full(num_users, -1)
    for r, u in zip(records, user_index):
        if r.true_type is None:
            raise ValueError(f"{r.source}: true_type: em.init=labels needs it on every record")
        if not 0 <= r.true_type < k:
            raise ValueError(f"{r.source}: true_type: label {r.true_type} out of range for "
                             f"{k} types")
        out[u] = r.true_type
    return out


def initial_gamma(cfg: Config, k: int, records: list[Record], user_index: np.ndarray,
                  num_users: int, restart_fn=None, reference_features=None,
                  info: dict | None = None, held: np.ndarray | None = None,
                  candidates: tuple | None = None) -> np.ndarray:
    """[U, K] starting posteriors; `restart_fn(gamma, r)` scores a random start (log-lik);
    `reference_features()` gives the reference model's features; `info` gets what the
    start chose; `held` are the records its held-out log-likelihood is measured on;
    `candidates`: the kmeans start's feature sets if already built (kmeans_init)."""
    if cfg.em.init == "kmeans":
        return kmeans_init(records, user_index, num_users, k, cfg.seed,
                           cfg.em.init_smoothing, cfg.em.init_refine_iterations,
                           cfg.em.init_features, reference_features, info, held,
                           cfg.em.init_restarts, cfg.start_l2s,
                           cfg.em.init_split_merge, candidates)
    if cfg.em.init == "labels":
        labels = labels_from_records(records, user_index, num_users, k)
        return smoothed_onehot(labels, k, cfg.em.init_smoothing)
    rng = np.random.default_rng(cfg.seed)
    starts = [smoothed_onehot(rng.integers(0, k, num_users), k, cfg.em.init_smoothing)
              for _ in range(cfg.em.restarts)]
    if restart_fn is None or len(starts) == 1:
        return starts[0]
    lls = [restart_fn(g, r) for r, g in enumerate(starts)]
    return starts[int(np.argmax(lls))]
