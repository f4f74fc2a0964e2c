"""Initial posteriors that leave EM's symmetric point (`em.init`).

From near-uniform posteriors every type sees the same weighted data and EM never moves, so
the start must already split users. `kmeans` (default):

1. per-user preference embeddings: bag-of-tokens of the responses, rank-weighted from +1
   (best) to -1 (worst), averaged per user, L2-normalised; k-means (scikit-learn) on them;
2. refinement: a few EM iterations of a mixture of *linear* Plackett-Luce models on the same
   bag-of-tokens features (a cheap stand-in for the policies, fitted with L-BFGS), which
   sharpens the k-means split before any language model is trained.

`labels` starts from the records' `true_type` (an upper bound for evaluation); `random`
tries `em.restarts` random hard starts, each scored by one M-step and E-step.
"""

from __future__ import annotations

import numpy as np
import torch

from emdpo_ray.config import Config
from emdpo_ray.core.estep import e_step, smoothed_onehot
from emdpo_ray.core.losses import plackett_luce_logp
from emdpo_ray.data.records import Record


def response_features(records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """Token counts of every response in ranked order: X [N, m, V] and mask [N, m]."""
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(token_pattern=r"(?u)\b\w+\b|[^\w\s]", lowercase=True)
    vec.fit([y for r in records for y in r.responses])
    m = max(len(r.responses) for r in records)
    x = np.zeros((len(records), m, len(vec.vocabulary_)), np.float32)
    mask = np.zeros((len(records), m), bool)
    for i, r in enumerate(records):
        counts = vec.transform(r.ranked).toarray()
        x[i, :len(counts)] = counts
        mask[i, :len(counts)] = True
    return x, mask


def preference_embeddings(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray,
                          num_users: int) -> np.ndarray:
    """[U, V]: per-user mean of sum_j c_j x_j, c linear from +1 (best) to -1 (worst)."""
    m_per = mask.sum(1)
    c = np.zeros(mask.shape)
    for i, m in enumerate(m_per):
        c[i, :m] = np.linspace(1.0, -1.0, m)
    per_record = np.einsum("nm,nmv->nv", c, x)
    emb = np.zeros((num_users, x.shape[-1]))
    np.add.at(emb, user_index, per_record)
    return emb / np.maximum(np.bincount(user_index, minlength=num_users), 1)[:, None]


def kmeans_labels(emb: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import normalize

    if k == 1:
        return np.zeros(len(emb), dtype=int)
    return KMeans(n_clusters=k, n_init=20, random_state=seed).fit_predict(normalize(emb))


def linear_pl_mixture(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray, num_users: int,
                      gamma: np.ndarray, iterations: int, l2: float = 1e-2) -> np.ndarray:
    """EM for a mixture of linear Plackett-Luce models r_k = x . theta_k; returns gamma."""
    k = gamma.shape[1]
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    theta = torch.zeros(k, x.shape[-1], requires_grad=True)
    eta = gamma.mean(0)
    for _ in range(iterations):
        w = torch.tensor(gamma[user_index], dtype=torch.float32)
        opt = torch.optim.LBFGS([theta], max_iter=50, line_search_fn="strong_wolfe")

        def scores() -> torch.Tensor:
            r = torch.einsum("nmv,kv->knm", xt, theta)
            return torch.stack([plackett_luce_logp(r[j], mt) for j in range(k)], 1)

        def closure():
            opt.zero_grad()
            loss = -(w * scores()).sum() / len(x) + l2 * (theta ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            es = e_step(scores().double().numpy(), user_index, num_users, eta)
        gamma, eta = es.gamma, es.eta
    return gamma


def kmeans_init(records: list[Record], user_index: np.ndarray, num_users: int, k: int,
                seed: int, smoothing: float, refine_iterations: int) -> np.ndarray:
    x, mask = response_features(records)
    labels = kmeans_labels(preference_embeddings(x, mask, user_index, num_users), k, seed)
    gamma = smoothed_onehot(labels, k, smoothing)
    if refine_iterations and k > 1:
        gamma = linear_pl_mixture(x, mask, user_index, num_users, gamma, refine_iterations)
        # Keep the refined split but never start fully certain: the policies get a say.
        gamma = smoothed_onehot(gamma.argmax(1), k, smoothing)
    return gamma


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
                  num_users: int, restart_fn=None) -> np.ndarray:
    """[U, K] starting posteriors; `restart_fn(gamma, r)` scores a random start (log-lik)."""
    if cfg.em.init == "kmeans":
        return kmeans_init(records, user_index, num_users, k, cfg.seed,
                           cfg.em.init_smoothing, cfg.em.init_refine_iterations)
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
