"""Token layouts and batched log-probs of responses under any mix of policies.

Shared by training (M-step, reference), MMRA sampling, evaluation and serving (feedback
scores), so every path scores a response exactly as training does.
"""

from __future__ import annotations

import numpy as np
import torch

from emdpo_ray.models.bank import REFERENCE
from emdpo_ray.models.packing import packed_rows


def prompt_token_ids(tokenizer, prompts: list, max_prompt_tokens: int) -> list[list[int]]:
    """Prompt tokens exactly as training sees them (text or conversations; data/encode.py)."""
    from emdpo_ray.data.encode import prompt_ids

    return prompt_ids(tokenizer, prompts, max_prompt_tokens)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r)
        att[i, width - len(r):] = 1
    return ids, att


def continuation_arrays(prompts: list[list[int]], continuations: list[list[int]],
                        pad_id: int) -> dict:
    """Arrays in the training layout ([n, 1, T]) for scoring prompt + continuation."""
    seqs = [p + c for p, c in zip(prompts, continuations)]
    t = max(len(s) for s in seqs)
    n = len(seqs)
    ids = np.full((n, 1, t), pad_id, dtype=np.int64)
    att = np.zeros((n, 1, t), dtype=np.int8)
    lm = np.zeros((n, 1, t), dtype=np.int8)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, 0, :len(s)] = s
        att[i, 0, :len(s)] = 1
        lm[i, 0, len(p):len(s)] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm,
            "resp_mask": np.ones((n, 1), dtype=bool)}


def strip_generation(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Generated ids up to and including the first end-of-text; padding dropped."""
    out = []
    for t in tokens:
        out.append(t)
        if t == eos_id:
            break
    while out and out[-1] == pad_id and pad_id != eos_id:
        out.pop()
    return out


def flat_rows(batch: dict[str, np.ndarray], pairs: np.ndarray, device) -> dict[str, torch.Tensor]:
    """Rows for (record, policy) pairs [P, 2] x every real response; padding columns trimmed."""
    rec, pol = pairs[:, 0], pairs[:, 1]
    m = batch["input_ids"].shape[1]
    resp = batch["resp_mask"][rec]                       # [P, m]
    p_idx, j_idx = np.nonzero(resp)
    r = rec[p_idx]
    att = batch["attention_mask"][r, j_idx]
    t = int(att.sum(-1).max())                          # longest real row in this batch
    return {
        "input_ids": torch.as_tensor(batch["input_ids"][r, j_idx, :t], dtype=torch.long, device=device),
        "attention_mask": torch.as_tensor(att[:, :t], dtype=torch.long, device=device),
        "loss_mask": torch.as_tensor(batch["loss_mask"][r, j_idx, :t], device=device),
        "policy": torch.as_tensor(pol[p_idx], dtype=torch.long),
        "scatter": (torch.as_tensor(p_idx), torch.as_tensor(j_idx)),
        "shape": (len(pairs), m),
    }


def pair_logps(model, batch, pairs, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs [P, m], token counts [P, m] and response mask [P, m].

    `model(input_ids, position_ids, attention_mask, policy, tok_row, pred_pos, label_pos)`
    returns scored-token log-probs of packed rows (`PolicyBank.logps`, or a DeepSpeed engine
    around it)."""
    rows = packed_rows(batch, pairs)
    t = {k: torch.as_tensor(v, device=device) for k, v in rows.items() if k != "shape"}
    lp = model(t["input_ids"], t["position_ids"], t["attention_mask"], t["policy"],
               t["tok_row"], t["pred_pos"], t["label_pos"])
    size = rows["shape"][0] * rows["shape"][1]
    out = lp.new_zeros(size).index_add(0, t["target"], lp).view(rows["shape"])
    cnt = torch.bincount(t["target"], minlength=size).to(lp.dtype).view(rows["shape"])
    mask = torch.as_tensor(batch["resp_mask"][pairs[:, 0]], device=lp.device)
    return out, cnt, mask


def score_pairs(model, arrays, ref_logps, beta, pairs, device, rows_per_batch=512,
                pairs_per_batch: int | None = None, min_batches: int = 0) -> np.ndarray:
    """Implicit rewards [P, m] of each (record, policy) pair's responses in ranked order,
    beta * (log pi - log pi_ref), NaN where a record has fewer responses; no gradients. The
    driver turns them into Plackett-Luce log-likelihoods (core/calibration.ranking_loglik),
    at the reward temperature it fits. `min_batches`: run the first batch again until that
    many forwards ran (ZeRO-3 ranks must run the same number of forwards; the repeats are
    discarded)."""
    m = arrays["input_ids"].shape[1]
    per = pairs_per_batch or max(1, rows_per_batch // m)
    out = np.full((len(pairs), m), np.nan)
    starts = list(range(0, len(pairs), per))
    with torch.no_grad():
        for b in range(max(len(starts), min_batches)):
            s = starts[b] if b < len(starts) else 0
            chunk = pairs[s:s + per]
            lp, _, mask = pair_logps(model, arrays, chunk, device)
            if b < len(starts):
                ref = torch.as_tensor(ref_logps[chunk[:, 0]], device=lp.device)
                r = (beta * (lp.double() - ref.double())).cpu().numpy()
                out[s:s + per] = np.where(mask.cpu().numpy(), r, np.nan)
    return out


def reference_logps(model, arrays, device, rows_per_batch=512) -> np.ndarray:
    """[n, m] reference log-probs of every response (0 where a record has fewer)."""
    n, m = arrays["resp_mask"].shape
    per = max(1, rows_per_batch // m)
    out = np.zeros((n, m))
    with torch.no_grad():
        for s in range(0, n, per):
            idx = np.arange(s, min(n, s + per))
            pairs = np.stack([idx, np.full(len(idx), REFERENCE)], 1)
            lp, _, _ = pair_logps(model, arrays, pairs, device)
            out[idx] = lp.double().cpu().numpy()
    return out
