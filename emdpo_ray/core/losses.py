"""Plackett-Luce DPO: the likelihood every M-step trains on and every E-step scores with.

A ranking sigma of m responses (best first) under implicit rewards r has the Plackett-Luce
likelihood (Plackett 1975; Luce 1959; listwise DPO, Rafailov et al. 2023, appendix A.3)

    log P(sigma) = sum_{j=1}^{m-1} [ r_sigma(j) - log sum_{l>=j} exp r_sigma(l) ]

with r = beta * (log pi(y|x) - log pi_ref(y|x)). For m = 2 it is log sigmoid(r_w - r_l),
the DPO objective. EM-DPO (Chidambaram, Seetharaman & Syrgkanis 2025) weights each record by
the posterior gamma_uk of its user's type.
"""

from __future__ import annotations

import torch

_MASKED = -1e9  # finite stand-in for -inf: exp() underflows to 0 and gradients stay finite


def plackett_luce_logp(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-likelihood [B] of the order of the columns of `rewards` [B, m] (best first).

    `mask` [B, m] (bool) marks real responses in ragged rows; padding sits at the end of a
    row. Computed in float32 with a reverse log-cumsum-exp, so |r| ~ 1e3 does not overflow.
    """
    r = rewards.float()
    if mask is not None:
        mask = mask.bool()
        r = r.masked_fill(~mask, _MASKED)
    # tail[:, j] = log sum_{l >= j} exp r_l
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    terms = r - tail
    if mask is not None:
        terms = terms * mask
    return terms.sum(-1)


def pl_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, weights: torch.Tensor,
                beta: float, mask: torch.Tensor | None = None,
                normalizer: torch.Tensor | float | None = None,
                sft_nll: torch.Tensor | None = None, sft_weight: float = 0.0):
    """Weighted listwise DPO loss and TRL-named metrics.

    policy_logps, ref_logps: [B, m] summed response log-probs, columns in ranked order.
    weights: [B] record weights (gamma of the record's user for this type).
    normalizer: the weight sum the loss is divided by; default this batch's weight sum. The
        M-step passes the dataset-wide mean weight times the batch size, so the batch loss is
        an unbiased estimate of the full objective  -sum_u gamma_uk sum log P / sum gamma_uk|D_u|.
    sft_nll: [B] per-token NLL of the top response, added with `sft_weight`.
    """
    if mask is None:
        mask = torch.ones_like(policy_logps, dtype=torch.bool)
    mask = mask.bool()
    rewards = beta * (policy_logps.float() - ref_logps.float())
    logp = plackett_luce_logp(rewards, mask)
    w = weights.float()
    denom = w.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32)
    denom = denom.clamp_min(1e-12)
    loss = -(w * logp).sum() / denom
    if sft_weight and sft_nll is not None:
        loss = loss + sft_weight * (w * sft_nll.float()).sum() / denom

    with torch.no_grad():
        wn = w / w.sum().clamp_min(1e-12)
        rest = mask[:, 1:].float()
        n_rest = rest.sum(-1).clamp_min(1)
        chosen = rewards[:, 0]
        rejected = (rewards[:, 1:] * rest).sum(-1) / n_rest
        pairs = mask[:, 1:].float()  # adjacent pairs (j, j+1) that both exist
        right = ((rewards[:, :-1] > rewards[:, 1:]).float() * pairs).sum(-1) / pairs.sum(-1).clamp_min(1)
        lp = policy_logps.float()
        metrics = {
            "rewards/chosen": (wn * chosen).sum(),
            "rewards/rejected": (wn * rejected).sum(),
            "rewards/margins": (wn * (chosen - rejected)).sum(),
            "rewards/accuracies": (wn * right).sum(),
            "logps/chosen": (wn * lp[:, 0]).sum(),
            "logps/rejected": (wn * (lp[:, 1:] * rest).sum(-1) / n_rest).sum(),
        }
    return loss, metrics
