"""Reward temperature: how confidently the policies rank, fitted on rankings they never
trained on (pure functions).

    log P_tau(sigma | x) = PL(tau * r),   r = beta * (log pi(y|x) - log pi_ref(y|x))

DPO policies can be more confident than their accuracy on new rankings warrants: on the
`contextual` and `order` families, halving their rewards predicted new rankings better
(docs/starts.md; not on `linear`). The E-step's posteriors inherit that confidence, so a user is locked into
the type whose policy was just fitted on them. Like temperature scaling of a classifier
(Guo et al. 2017), one scalar tau, fitted by the held-out predictive log-likelihood, keeps
the policies' ranking order and corrects only how sure they are.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from emdpo_ray.core.estep import predictive_user_logliks

TAU_BOUNDS = (0.02, 4.0)


def ranking_loglik(rewards: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Plackett-Luce log-likelihood [...] of rankings from rewards [..., m] in ranked order
    (best first), scaled by `tau`; NaN marks a missing response (padding at a row's end). A
    row with no response at all (unscored) gives NaN. The numpy twin of
    core/losses.plackett_luce_logp, in float64, for the driver."""
    r = np.asarray(rewards, float) * tau
    real = ~np.isnan(r)
    r = np.where(real, r, -np.inf)
    with np.errstate(invalid="ignore"):
        tail = np.logaddexp.accumulate(r[..., ::-1], axis=-1)[..., ::-1]
        terms = np.where(real, r - tail, 0.0)
    out = terms.sum(-1)
    return np.where(real.any(-1), out, np.nan)


def heldout_objective(rewards: np.ndarray, held: np.ndarray, user_index: np.ndarray,
                      num_users: int, eta: np.ndarray, tau: float,
                      users: np.ndarray | None = None) -> float:
    """sum over `users` (default all) of log p(held rankings | the user's other rankings)
    with every policy's rewards [N, K, m] scaled by tau."""
    per_user = predictive_user_logliks(ranking_loglik(rewards, tau), held, user_index,
                                       num_users, eta)
    return float(per_user.sum() if users is None else per_user[users].sum())


def fit_temperature(rewards: np.ndarray, held: np.ndarray, user_index: np.ndarray,
                    num_users: int, eta: np.ndarray, users: np.ndarray | None = None,
                    bounds: tuple[float, float] = TAU_BOUNDS) -> float:
    """The tau in `bounds` that best predicts the held-out rankings of `users` (default all)
    from their other rankings (a smooth 1-D problem: bounded Brent on log tau)."""
    res = minimize_scalar(
        lambda s: -heldout_objective(rewards, held, user_index, num_users, eta, np.exp(s),
                                     users),
        bounds=np.log(bounds), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(res.x))


def crossfit_temperature(rewards: np.ndarray, held: np.ndarray, user_index: np.ndarray,
                         num_users: int, eta: np.ndarray, seed: int = 0):
    """Per-user held-out log-likelihoods [U] with each half of the users scored at the tau
    fitted on the other half, so the figure the guard compares is not the one tau was
    fitted to maximise; and the two taus."""
    half = np.random.default_rng(seed).permutation(num_users) % 2
    taus = [fit_temperature(rewards, held, user_index, num_users, eta,
                            users=np.flatnonzero(half != h)) for h in (0, 1)]
    per_user = np.empty(num_users)
    for h, tau in enumerate(taus):
        ll = predictive_user_logliks(ranking_loglik(rewards, tau), held, user_index,
                                     num_users, eta)
        per_user[half == h] = ll[half == h]
    return per_user, taus


def types_temperature(history: list[dict]) -> float:
    """The reward scale behind a run's final types: that of the last iteration whose E-step
    was kept (a refused iteration keeps the previous types), 1 when the types are the start's
    (no policy scored them). Feedback while serving is scored at it, so that an online update
    is the same Bayes step as the E-step's."""
    for h in reversed(history):
        if h["iteration"] == 0:
            return 1.0
        if h.get("guard") is None or h["guard"]["accepted"]:
            return float(h.get("reward_temperature", 1.0))
    return 1.0
