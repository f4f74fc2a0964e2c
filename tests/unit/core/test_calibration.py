import numpy as np
import pytest
import torch

from emdpo_ray.core.calibration import (crossfit_temperature, fit_temperature, ranking_loglik,
                                        types_temperature)
from emdpo_ray.core.estep import predictive_user_logliks
from emdpo_ray.core.losses import plackett_luce_logp


def test_ranking_loglik_by_hand():
    # rewards 2 > 1 > 0 in ranked order: (2 - log(e^2 + e + 1)) + (1 - log(e + 1))
    want = (2 - np.log(np.e ** 2 + np.e + 1)) + (1 - np.log(np.e + 1))
    assert ranking_loglik(np.array([2.0, 1.0, 0.0])) == pytest.approx(want)  # -0.7209
    assert want == pytest.approx(-0.7209, abs=1e-4)
    # temperature 0: a uniformly random order of 3, -log 3!; tau doubles the rewards
    assert ranking_loglik(np.array([2.0, 1.0, 0.0]), 0.0) == pytest.approx(-np.log(6))
    assert ranking_loglik(np.array([1.0, 0.5, 0.0]), 2.0) == pytest.approx(want)
    # a missing third response: log sigmoid(1); nothing scored: NaN
    got = ranking_loglik(np.array([[1.0, 0.0, np.nan], [np.nan] * 3]))
    assert got[0] == pytest.approx(np.log(1 / (1 + np.exp(-1.0)))) and np.isnan(got[1])


def test_ranking_loglik_agrees_with_the_training_loss():
    r = np.random.default_rng(0).normal(size=(50, 4)) * 3
    r[::3, 3] = np.nan  # ragged rows
    mask = ~np.isnan(r)
    want = plackett_luce_logp(torch.as_tensor(np.nan_to_num(r)), torch.as_tensor(mask)).numpy()
    np.testing.assert_allclose(ranking_loglik(r), want, atol=1e-4)


def test_types_temperature_is_that_of_the_last_kept_e_step():
    start = {"iteration": 0}
    kept = lambda it, tau: {"iteration": it, "reward_temperature": tau,  # noqa: E731
                            "guard": {"accepted": True}}
    assert types_temperature([start]) == 1.0  # the start's types: no policy scored them
    assert types_temperature([start, kept(1, 0.5), kept(2, 0.7)]) == 0.7
    refused = {"iteration": 3, "reward_temperature": 0.2, "guard": {"accepted": False}}
    assert types_temperature([start, kept(1, 0.5), kept(2, 0.7), refused]) == 0.7
    assert types_temperature([start, {**refused, "iteration": 1}]) == 1.0
    # no guard (em.guard_holdout=0): every iteration is kept
    assert types_temperature([start, {"iteration": 1, "reward_temperature": 2.0,
                                      "guard": None}]) == 2.0


def overconfident(n_users=300, per_user=10, scale=3.0, seed=0):
    """Rankings drawn from Plackett-Luce with rewards r, scored by one policy whose rewards
    are scale * r: the fitted temperature should undo the scale."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(n_users * per_user, 3))
    order = np.argsort(-(r + rng.gumbel(size=r.shape)), 1)  # Gumbel-max draws a PL ranking
    ranked = np.take_along_axis(r, order, 1)
    ui = np.repeat(np.arange(n_users), per_user)
    held = np.tile(np.arange(per_user) < 2, n_users)
    return scale * ranked[:, None, :], held, ui


def test_fitted_temperature_undoes_overconfidence():
    rewards, held, ui = overconfident(scale=3.0)
    tau = fit_temperature(rewards, held, ui, 300, np.array([1.0]))
    assert tau == pytest.approx(1 / 3, rel=0.15)
    rewards, held, ui = overconfident(scale=0.5, seed=1)
    assert fit_temperature(rewards, held, ui, 300, np.array([1.0])) == pytest.approx(2, rel=0.15)


def test_crossfit_scores_each_half_at_the_other_halfs_temperature():
    rewards, held, ui = overconfident(scale=3.0)
    eta = np.array([1.0])
    per_user, taus = crossfit_temperature(rewards, held, ui, 300, eta, seed=0)
    assert all(t == pytest.approx(1 / 3, rel=0.2) for t in taus) and taus[0] != taus[1]
    half = np.random.default_rng(0).permutation(300) % 2
    for h in (0, 1):
        want = predictive_user_logliks(ranking_loglik(rewards, taus[h]), held, ui, 300, eta)
        np.testing.assert_allclose(per_user[half == h], want[half == h])
    # calibrated, the held-out rankings score better than at the rewards as trained
    as_trained = predictive_user_logliks(ranking_loglik(rewards), held, ui, 300, eta)
    assert per_user.sum() > as_trained.sum()
