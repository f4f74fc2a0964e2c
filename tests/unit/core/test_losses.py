"""Plackett-Luce DPO loss: hand-worked numbers, TRL-compatible pairs, stability, weighting."""

import math

import pytest
import torch
import torch.nn.functional as F

from emdpo_ray.core.losses import pl_dpo_loss, plackett_luce_logp


def test_m3_hand_worked():
    """r = [2, 1, 0] (best first):
    log P = (2 - log(e^2 + e + 1)) + (1 - log(e + 1))
          = (2 - log 11.1073) + (1 - log 3.7183) = -0.4076 - 0.3133 = -0.7209
    """
    got = plackett_luce_logp(torch.tensor([[2.0, 1.0, 0.0]]))
    assert got.item() == pytest.approx(-0.7209, abs=1e-4)


def test_m2_is_dpo():
    """r = [1, 0]: log P = log sigmoid(1) = -0.3133, the DPO likelihood."""
    r = torch.tensor([[1.0, 0.0], [0.3, 2.5], [-4.0, 7.0]])
    assert plackett_luce_logp(r)[0].item() == pytest.approx(-0.3133, abs=1e-4)
    torch.testing.assert_close(plackett_luce_logp(r), F.logsigmoid(r[:, 0] - r[:, 1]))


def test_m4_ties():
    """Four equal rewards: P = 1/4 * 1/3 * 1/2, log P = -log 24 = -3.1781."""
    assert plackett_luce_logp(torch.zeros(1, 4)).item() == pytest.approx(-math.log(24), abs=1e-5)


def test_ragged_mask():
    """Row 0: [3, 1, pad] -> log sigmoid(2) = -0.1269; row 1: [0, 0, 0] -> -log 6 = -1.7918."""
    r = torch.tensor([[3.0, 1.0, 123.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    got = plackett_luce_logp(r, mask)
    assert got[0].item() == pytest.approx(-0.1269, abs=1e-4)
    assert got[1].item() == pytest.approx(-math.log(6), abs=1e-5)


def test_extreme_rewards_finite_with_gradients():
    r = torch.tensor([[1e3, -1e3, 5e2], [-1e3, 1e3, 0.0]], requires_grad=True)
    lp = plackett_luce_logp(r, torch.tensor([[True, True, True], [True, True, False]]))
    assert torch.isfinite(lp).all()
    # [1e3, -1e3, 5e2]: second step is log sigmoid(-1500) = -1500
    assert lp[0].item() == pytest.approx(-1500.0, rel=1e-6)
    lp.sum().backward()
    assert torch.isfinite(r.grad).all()


def trl_sigmoid_loss(pc, pr, rc, rr, beta):
    # TRL DPOTrainer, loss_type="sigmoid", f_divergence reverse KL, label_smoothing 0
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def test_pairs_match_trl_sigmoid_loss():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(8, 2, generator=g) * 5, torch.randn(8, 2, generator=g) * 5
    ours, metrics = pl_dpo_loss(pol, ref, torch.ones(8), beta=0.1)
    theirs = trl_sigmoid_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], 0.1)
    torch.testing.assert_close(ours, theirs)
    rc, rr = 0.1 * (pol[:, 0] - ref[:, 0]), 0.1 * (pol[:, 1] - ref[:, 1])
    assert metrics["rewards/chosen"].item() == pytest.approx(rc.mean().item(), abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx((rc - rr).mean().item(), abs=1e-6)
    assert metrics["rewards/accuracies"].item() == pytest.approx((rc > rr).float().mean().item())


def test_zero_weight_removes_record_exactly():
    g = torch.Generator().manual_seed(1)
    pol = torch.randn(4, 3, generator=g, requires_grad=True)
    ref = torch.randn(4, 3, generator=g)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    loss, _ = pl_dpo_loss(pol, ref, w, beta=0.5)
    keep = torch.tensor([0, 2, 3])
    loss_kept, _ = pl_dpo_loss(pol[keep], ref[keep], w[keep], beta=0.5)
    torch.testing.assert_close(loss, loss_kept)
    loss.backward()
    assert torch.all(pol.grad[1] == 0)


def test_weighted_normaliser_and_sft_term():
    """Two records, weights [1, 3], m = 2, beta 1, ref 0, pol rewards [1, 0] and [0, 0]:
    loss = -(1 * log sigmoid(1) + 3 * log sigmoid(0)) / 4 = (0.3133 + 3 * 0.6931) / 4 = 0.5982;
    with normalizer 8 instead of the weight sum 4: 0.2991; sft 0.5 * (1*2 + 3*4) / 4 = 1.75.
    """
    pol = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    w = torch.tensor([1.0, 3.0])
    loss, _ = pl_dpo_loss(pol, torch.zeros(2, 2), w, beta=1.0)
    assert loss.item() == pytest.approx(0.5982, abs=1e-4)
    loss8, _ = pl_dpo_loss(pol, torch.zeros(2, 2), w, beta=1.0, normalizer=8.0)
    assert loss8.item() == pytest.approx(0.2991, abs=1e-4)
    loss_sft, _ = pl_dpo_loss(pol, torch.zeros(2, 2), w, beta=1.0,
                              sft_nll=torch.tensor([2.0, 4.0]), sft_weight=0.5)
    assert loss_sft.item() == pytest.approx(0.5982 + 1.75, abs=1e-4)


def test_accuracy_counts_adjacent_pairs_of_ragged_rows():
    """Row [3, 1, 2]: pairs (3>1) yes, (1>2) no -> 0.5; row [1, 2, pad]: (1>2) no -> 0."""
    pol = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    _, m = pl_dpo_loss(pol, torch.zeros(2, 3), torch.ones(2), beta=1.0, mask=mask)
    assert m["rewards/accuracies"].item() == pytest.approx(0.25)
    assert m["rewards/rejected"].item() == pytest.approx((1.5 + 2.0) / 2)
