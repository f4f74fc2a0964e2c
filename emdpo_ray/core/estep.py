"""E-step: posteriors over latent user types, in log space (pure functions).

    log gamma_uk = log eta_k + sum_{records of u} log P_k(sigma|x) - logsumexp_k'(...)
    eta_k        = mean_u gamma_uk
    loglik       = sum_u logsumexp_k (log eta_k + sum log P_k)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp


@dataclass
class EStep:
    log_gamma: np.ndarray  # [U, K]
    eta: np.ndarray        # [K]
    loglik: float

    @property
    def gamma(self) -> np.ndarray:
        return np.exp(self.log_gamma)


def user_loglik(record_scores: np.ndarray, user_index: np.ndarray, num_users: int) -> np.ndarray:
    """[U, K]: sum over each user's records of log P_k(sigma|x)."""
    out = np.zeros((num_users, record_scores.shape[1]))
    np.add.at(out, user_index, record_scores)
    return out


def e_step(record_scores: np.ndarray, user_index: np.ndarray, num_users: int,
           eta: np.ndarray) -> EStep:
    """Posteriors from per-record log-likelihoods [N, K] and the prior mixing weights [K]."""
    with np.errstate(divide="ignore"):
        log_eta = np.log(np.asarray(eta, dtype=float))
    joint = log_eta[None, :] + user_loglik(record_scores, user_index, num_users)
    ll_u = logsumexp(joint, axis=1)
    log_gamma = joint - ll_u[:, None]
    return EStep(log_gamma, np.exp(log_gamma).mean(0), float(ll_u.sum()))


def predictive_user_logliks(scores: np.ndarray, held: np.ndarray, user_index: np.ndarray,
                            num_users: int, eta: np.ndarray) -> np.ndarray:
    """[U] log p(held rankings of u | u's other rankings) under a mixture with per-record
    log-likelihoods [N, K]: the type posterior from a user's other rankings predicts the
    held-out ones, as the E-step would predict a user's next ranking."""
    with np.errstate(divide="ignore"):
        log_eta = np.log(np.asarray(eta, float))
    seen = log_eta + user_loglik(np.where(held[:, None], 0.0, scores), user_index, num_users)
    both = log_eta + user_loglik(scores, user_index, num_users)
    return logsumexp(both, 1) - logsumexp(seen, 1)


def reference_loglik(resp_mask: np.ndarray) -> np.ndarray:
    """[N] log-likelihood of each record's ranking when every reward is equal (all policies
    at the reference): a uniformly random order of its m responses, -log m!."""
    from scipy.special import gammaln

    return -gammaln(np.asarray(resp_mask).sum(1) + 1.0)


def bayes_update(log_prior: np.ndarray, record_scores: np.ndarray) -> np.ndarray:
    """Log posterior of one user after records with log-likelihoods [n, K] (online routing)."""
    joint = np.asarray(log_prior, float) + np.asarray(record_scores, float).reshape(-1,
                                                                                    len(log_prior)).sum(0)
    return joint - logsumexp(joint)


def smoothed_onehot(labels: np.ndarray, k: int, smoothing: float) -> np.ndarray:
    """Posteriors (1 - s) on the given type and s spread over the others."""
    g = np.full((len(labels), k), smoothing / max(k - 1, 1))
    g[np.arange(len(labels)), labels] = 1.0 - smoothing if k > 1 else 1.0
    return g


def converged(prev: EStep | None, cur: EStep, tol_loglik: float, tol_posterior: float) -> bool:
    if prev is None:
        return False
    d_ll = abs(cur.loglik - prev.loglik) / max(abs(cur.loglik), 1e-12)
    d_g = float(np.abs(cur.gamma - prev.gamma).max())
    return d_ll < tol_loglik and d_g < tol_posterior


def loglik_drop(prev: EStep | None, cur: EStep, rel_tol: float = 1e-6) -> float | None:
    """Nats the observed-data log-likelihood fell by since the previous iteration, None when
    it did not fall (beyond rel_tol). Exact EM never lowers it; an M-step that fits the
    policies only approximately can."""
    if prev is None:
        return None
    drop = prev.loglik - cur.loglik
    return float(drop) if drop > rel_tol * max(abs(prev.loglik), 1.0) else None


def per_ranking_interval(user_ll: np.ndarray, user_n: np.ndarray, replicates: int = 1000,
                         seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of sum(user_ll) / sum(user_n), a log-likelihood per ranking,
    resampling the users that have rankings (a user's rankings move together: they share
    the user's type)."""
    ll, n = np.asarray(user_ll, float), np.asarray(user_n, float)
    ll, n = ll[n > 0], n[n > 0]
    rng = np.random.default_rng(seed)
    chunk = max(1, 10_000_000 // len(n))  # draws held at once: bounded for a million users
    ratio = np.empty(replicates)
    for s in range(0, replicates, chunk):
        draws = rng.integers(0, len(n), (min(chunk, replicates - s), len(n)))
        ratio[s:s + len(draws)] = ll[draws].sum(1) / n[draws].sum(1)
    return [float(np.percentile(ratio, 50 * (1 - level))),
            float(np.percentile(ratio, 50 * (1 + level)))]


def entropy(log_p: np.ndarray) -> np.ndarray:
    p = np.exp(log_p)
    return -(p * np.where(p > 0, log_p, 0.0)).sum(-1)
