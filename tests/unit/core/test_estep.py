"""E-step: hand-worked posteriors, mixing weights and log-likelihood."""

import json
import math

import numpy as np
import pytest

from emdpo_ray.core.estep import bayes_update, converged, e_step, entropy, smoothed_onehot


def test_two_users_two_types_hand_worked():
    """User 0 has records with log P = [-1, -3] and [-2, -2] -> sums [-3, -5];
    user 1 has one record [-4, -1]. eta = [0.5, 0.5].
    gamma_0 = softmax([-3, -5]) = [0.8808, 0.1192]; gamma_1 = softmax([-4, -1]) = [0.0474, 0.9526]
    eta' = [0.4641, 0.5359]
    loglik = log(.5 e^-3 + .5 e^-5) + log(.5 e^-4 + .5 e^-1) = -3.5662 + -1.6445 = -5.2107
    """
    scores = np.array([[-1.0, -3.0], [-2.0, -2.0], [-4.0, -1.0]])
    es = e_step(scores, np.array([0, 0, 1]), 2, np.array([0.5, 0.5]))
    np.testing.assert_allclose(es.gamma, [[0.8808, 0.1192], [0.0474, 0.9526]], atol=1e-4)
    np.testing.assert_allclose(es.eta, [0.4641, 0.5359], atol=1e-4)
    assert es.loglik == pytest.approx(-5.2107, abs=1e-4)


def test_prior_matters_and_log_space_is_stable():
    """Scores of -1e4 would underflow in probability space; log space keeps them."""
    scores = np.array([[-10000.0, -10002.0]])
    es = e_step(scores, np.array([0]), 1, np.array([0.1, 0.9]))
    # posterior ~ [0.1 e^2, 0.9] / Z = [0.7389, 0.9] / 1.6389
    np.testing.assert_allclose(es.gamma[0], [0.4508, 0.5492], atol=1e-4)
    assert np.isfinite(es.loglik)


def test_zero_mixing_weight_gives_zero_posterior():
    es = e_step(np.array([[0.0, 5.0]]), np.array([0]), 1, np.array([1.0, 0.0]))
    np.testing.assert_allclose(es.gamma, [[1.0, 0.0]])


def test_bayes_update_matches_e_step():
    prior = np.log(np.array([0.25, 0.75]))
    recs = np.array([[-1.0, -2.0], [-0.5, -3.0]])
    post = bayes_update(prior, recs)
    es = e_step(recs, np.array([0, 0]), 1, np.exp(prior))
    np.testing.assert_allclose(np.exp(post), es.gamma[0])


def test_smoothing_entropy_and_convergence():
    g = smoothed_onehot(np.array([1, 0]), 3, 0.1)
    np.testing.assert_allclose(g, [[0.05, 0.9, 0.05], [0.9, 0.05, 0.05]])
    assert entropy(np.log(np.full(4, 0.25))) == pytest.approx(math.log(4))
    a = e_step(np.array([[-1.0, -2.0]]), np.array([0]), 1, np.array([0.5, 0.5]))
    assert not converged(None, a, 1e-4, 1e-3)
    assert converged(a, a, 1e-4, 1e-3)


def test_loglik_drop_and_the_driver_warning(caplog):
    import logging

    from emdpo_ray.core.estep import EStep, loglik_drop
    from emdpo_ray.train.driver import warn_if_loglik_fell

    def es(ll):
        return EStep(np.zeros((1, 2)), np.array([0.5, 0.5]), ll)

    assert loglik_drop(None, es(-10.0)) is None
    assert loglik_drop(es(-10.0), es(-9.0)) is None            # rose: fine
    assert loglik_drop(es(-10.0), es(-10.0 - 1e-9)) is None    # noise
    assert loglik_drop(es(-10.0), es(-12.5)) == pytest.approx(2.5)
    said = []
    with caplog.at_level(logging.WARNING, logger="emdpo_ray.train.driver"):
        assert warn_if_loglik_fell(es(-100.0), es(-103.0), 2, said.append) == pytest.approx(3.0)
    assert "iter 2: log-likelihood fell by 3 nats" in caplog.text
    assert said and said[0].startswith("warning: iter 2")
    assert warn_if_loglik_fell(es(-100.0), es(-99.0), 3, said.append) is None and len(said) == 1
    # scored at different reward temperatures, the two are different models' figures
    warn_if_loglik_fell(es(-100.0), es(-103.0), 4, said.append, (0.7, 0.6))
    assert "scale changed too (x0.7 -> x0.6)" in said[-1] and "exact EM" not in said[-1]


def test_guard_keeps_an_update_only_if_held_out_rankings_are_predicted_better():
    from emdpo_ray.train.driver import guard_check

    # the worked case of test_predictive_loglik_by_hand: log(7/12) = -0.539 per held ranking;
    # pairs whose winner's reward leads by 0, -log 3 and log 3 have probabilities 1/2, 1/4, 3/4
    rewards = np.array([[[0.0, 0.0], [-np.log(3), 0.0]], [[0.0, 0.0], [np.log(3), 0.0]]])
    held, ui, eta = np.array([False, True]), np.array([0, 0]), np.array([0.5, 0.5])
    g, per_user = guard_check(rewards, held, ui, 1, eta, baseline=None, tau=1.0)
    assert g["heldout_loglik_per_ranking"] == pytest.approx(np.log(7 / 12)) and g["accepted"]
    assert per_user == pytest.approx([np.log(7 / 12)])
    assert g["interval"] == pytest.approx([np.log(7 / 12)] * 2)  # one user: nothing to resample
    assert g["temperatures"] is None and g["gain"] is None
    json.dumps(g)  # history.json takes it as is
    # a baseline per ranking only (a run resumed from before per-user figures): the means
    assert guard_check(rewards, held, ui, 1, eta, baseline=-0.6, tau=1.0)[0]["accepted"]
    rejected = guard_check(rewards, held, ui, 1, eta, baseline=-0.5, tau=1.0)[0]
    assert not rejected["accepted"] and rejected["baseline"] == -0.5
    # at temperature 0 every policy ranks at random: log 1/2 per held ranking
    flat = guard_check(rewards, held, ui, 1, eta, baseline=None, tau=1e-12)[0]
    assert flat["heldout_loglik_per_ranking"] == pytest.approx(np.log(0.5))


def test_guard_pairs_the_gain_per_user_and_asks_for_it_beyond_noise():
    from emdpo_ray.train.driver import guard_check

    # two users, each the worked case above: log(7/12) per user, one held ranking each
    rewards = np.array([[[0.0, 0.0], [-np.log(3), 0.0]], [[0.0, 0.0], [np.log(3), 0.0]]] * 2)
    held, ui, eta = np.array([False, True] * 2), np.array([0, 0, 1, 1]), np.array([0.5, 0.5])
    new = np.log(7 / 12)
    # both users gain 0.1: every resample gains 0.1, so the interval is [0.1, 0.1]
    g, _ = guard_check(rewards, held, ui, 2, eta, np.array([new - 0.1, new - 0.1]), 1.0, 0.9)
    assert g["accepted"] and g["gain"] == pytest.approx(0.1)
    assert g["gain_interval"] == pytest.approx([0.1, 0.1])
    assert g["baseline"] == pytest.approx(new - 0.1)
    # gains -0.3 and +0.5: +0.1 on average, but a resample holds the losing user twice with
    # probability 1/4 (-0.3), both users with 1/2 (+0.1), the winner twice with 1/4 (+0.5):
    # the 5th percentile is -0.3, so the gain is within noise and the update is refused
    base = np.array([new + 0.3, new - 0.5])
    g, _ = guard_check(rewards, held, ui, 2, eta, base, 1.0, 0.9)
    assert g["gain"] == pytest.approx(0.1) and g["gain_interval"][0] == pytest.approx(-0.3)
    assert not g["accepted"]
    # level 0 keeps any gain in the mean, as the unpaired rule did
    g, _ = guard_check(rewards, held, ui, 2, eta, base, 1.0, 0.0)
    assert g["accepted"] and g["gain_interval"] == [None, None]
    json.dumps(g)


def test_per_ranking_interval_resamples_users_by_hand():
    from emdpo_ray.core.estep import per_ranking_interval

    # two users with one ranking each, log-likelihoods 0 and -2: a resample holds both twice
    # (per ranking 0 or -2, probability 1/4 each) or one of each (-1, probability 1/2), so
    # the 95% interval runs from -2 to 0
    assert per_ranking_interval(np.array([0.0, -2.0]), np.array([1, 1])) == [-2.0, 0.0]
    # users without rankings are not drawn; equal users leave no uncertainty
    assert per_ranking_interval(np.array([-3.0, 0.0, -3.0]), np.array([2, 0, 2])) == [-1.5, -1.5]
    # a user with two rankings counts for two in the ratio: (-4 + 0) / (2 + 2) on a 50:50 draw
    lo, hi = per_ranking_interval(np.array([-4.0, 0.0]), np.array([2, 2]), level=0.4)
    assert lo == hi == -1.0
