"""Does training the features lift what the start can carry? Reward models with a trained
backbone against the start's linear mixture on frozen states, both given the true labels.

    .venv/bin/python experiments/reward_models.py [--family order] [--seeds 0,1,2,3,4]
        [--epochs 3,6] [--out docs/reward_models-order.json]

The default start (train/start.py) fits one linear Plackett-Luce reward per type on frozen
features: the middle-layer states, pooled over the beginning, middle and end of each
response (models/features.py), of a copy of the SFT reference given one more pass of SFT.
On `order` what those features carry bounds the start: fitted to the true labels of four
fifths of the users, the mixture assigns the rest at ARI 0.72-0.84, below the true rewards'
0.86-0.93 (docs/start_features-order-seeds.md). Here the same heads are trained together
with the copy's weights (one shared backbone, K linear heads: a mixture of reward models),
so the states can learn what the types disagree on. Both are measured the same way, on
`make starts`' data and references (built here when missing): five folds of users (the
folds of start_features.py's `labels, cross-fitted`), each assigned by the models fitted to
the true labels of the other four (the linear mixture at L2 1e-2; ARI over all users), and
the held-out log-likelihood per ranking of each user's rankings under their own type's model
(the true rewards' figure and a random order's beside them). A ceiling for a start on each
kind of feature, not a start.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FOLDS = 5           # start_features.py's cross-fitted folds
BATCH = 32          # records per step
HEAD_LR, BACKBONE_LR = 3e-3, 1e-3


def ranking_logliks(rewards, mask):
    """[n, m, K] rewards in ranked order, [n, m] mask -> [n, K] Plackett-Luce log-likelihoods."""
    import torch

    from emdpo_ray.core.losses import plackett_luce_logp

    return torch.stack([plackett_luce_logp(rewards[..., k], mask)
                        for k in range(rewards.shape[-1])], -1)


def reward_model(backbone, k: int):
    """K linear rewards on the backbone's middle-layer states pooled over three parts of each
    response (the start's features), the backbone trained with them."""
    import torch

    from emdpo_ray.models.bank import REFERENCE
    from emdpo_ray.models.features import SEGMENTS, segment_pool
    from emdpo_ray.models.scoring import flat_rows

    class RewardMixture(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.heads = torch.nn.Linear(SEGMENTS * backbone.config.hidden_size, k, bias=False)
            torch.nn.init.zeros_(self.heads.weight)   # every type starts at a random order

        def forward(self, arrays: dict, idx: np.ndarray):
            rows = flat_rows(arrays, np.stack([idx, np.full(len(idx), REFERENCE)], 1), "cpu")
            states = self.backbone.model(input_ids=rows["input_ids"],
                                         attention_mask=rows["attention_mask"],
                                         output_hidden_states=True).hidden_states
            f = segment_pool(states[len(states) // 2], rows["loss_mask"], SEGMENTS)
            out = torch.zeros(*rows["shape"], k)
            return out.index_put(rows["scatter"], self.heads(f))        # [n, m, K]

    return RewardMixture()


def fit_reward_models(base, arrays, mask, train, gamma_rec, k: int, epochs: float, seed: int):
    """A copy of `base` and K heads trained on the records `train`, each record weighted by
    its user's posterior (here the true labels) as an M-step weights them."""
    import torch

    torch.manual_seed(seed)
    model = reward_model(copy.deepcopy(base).train(), k)
    opt = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": BACKBONE_LR},
                             {"params": model.heads.parameters(), "lr": HEAD_LR}],
                            weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(train) for _ in range(math.ceil(epochs))])
    for s in range(int(epochs * len(train) / BATCH)):
        idx = order[s * BATCH:(s + 1) * BATCH]
        ll = ranking_logliks(model(arrays, idx), torch.as_tensor(mask[idx]))
        loss = -(torch.as_tensor(gamma_rec[idx], dtype=torch.float32) * ll).sum() / len(idx)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def one(family: str, seed: int, runs: str, epochs: list[float]) -> dict:
    import torch
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.config import load_config
    from emdpo_ray.core.calibration import ranking_loglik
    from emdpo_ray.core.estep import e_step, smoothed_onehot
    from emdpo_ray.data import synth
    from emdpo_ray.data.encode import encode
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.features import response_representations
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.train import start as st
    from start_features import (crossfit_scores, oracle_labels, prepare, record_folds,
                                trained_further)

    data = os.path.join(runs, f"{family}-{seed}.jsonl")
    ref = os.path.join(runs, f"{family}-{seed}-reference")
    if not (os.path.exists(data) and os.path.isdir(ref)):
        prepare(data, ref, family, seed)
    cfg = load_config(None, [])
    records, meta = load_records(data), json.load(open(data + ".meta.json"))
    tok, model = load_tokenizer(ref, cfg.model), load_base(ref, cfg.model).eval()
    enc = encode(records, tok, cfg.data)
    arrays, ui, num_users, mask = enc.arrays(), enc.user_index, len(enc.users), enc.resp_mask
    truth = np.zeros(num_users, int)
    truth[ui] = [r.true_type for r in records]
    k = len(meta["shares"])
    gamma = smoothed_onehot(truth, k, 0.05)
    fold = record_folds(ui, num_users, FOLDS)
    further = trained_further(model, arrays, cfg.start_sft_passes, seed)   # the start's copy
    x = st.standardized(response_representations(further, arrays, torch.device("cpu"),
                                                 dims=1 << 16), mask)

    def measured(scores: np.ndarray, seconds: float) -> dict:
        labels = e_step(scores, ui, num_users, gamma.mean(0)).gamma.argmax(1)
        own = scores[np.arange(len(records)), truth[ui]]
        return {"ari": round(float(adjusted_rand_score(truth, labels)), 3),
                "heldout_loglik_per_ranking": round(float(own.mean()), 4),
                "seconds": round(seconds, 1)}

    t = time.perf_counter()
    scores = crossfit_scores(x, mask, ui, num_users, gamma, FOLDS, 1e-2)
    rows = [{"model": "linear on frozen states", **measured(scores, time.perf_counter() - t)}]
    for ep in epochs:
        t, scores = time.perf_counter(), np.zeros((len(records), k))
        for f in range(FOLDS):
            rm = fit_reward_models(further, arrays, mask, np.flatnonzero(fold != f), gamma[ui],
                                   k, ep, seed)
            test = np.flatnonzero(fold == f)
            with torch.no_grad():
                for s in range(0, len(test), 128):
                    b = test[s:s + 128]
                    scores[b] = ranking_logliks(rm(arrays, b), torch.as_tensor(mask[b])).numpy()
        rows.append({"model": f"trained backbone, {ep:g} epochs",
                     **measured(scores, time.perf_counter() - t)})
    true_r = np.array([synth.true_rewards(meta, [r.prompt] * len(r.ranked), r.ranked)[truth[u]]
                       for r, u in zip(records, ui)])
    out = {"family": family, "seed": seed, "rows": rows,
           "oracle_ari": round(float(adjusted_rand_score(
               truth, oracle_labels(records, ui, num_users, meta))), 3),
           "true_rewards_loglik_per_ranking": round(float(ranking_loglik(true_r).mean()), 4),
           "random_loglik_per_ranking": round(-math.log(math.factorial(mask.shape[1])), 4)}
    print(json.dumps(out), flush=True)
    return out


def page(results: list[dict], command: str) -> str:
    from emdpo_ray.report.seeds import t_interval

    lines = ["# Reward models with a trained backbone vs the start's linear mixture", "",
             f"`{command}` ([`experiments/reward_models.py`](../experiments/reward_models.py)).",
             "Labels cross-fitted: each fifth of the users assigned by models fitted to the "
             "true labels of the other four fifths; log-likelihood of each user's rankings "
             "under their own type's model, out of fold.", "",
             "| family | seed | oracle ARI | model | ARI | held-out log-lik per ranking | "
             "true rewards, random | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['family']} | {r['seed']} | {r['oracle_ari']:.2f} | "
                         f"{row['model']} | {row['ari']:.2f} | "
                         f"{row['heldout_loglik_per_ranking']:.3f} | "
                         f"{r['true_rewards_loglik_per_ranking']:.3f}, "
                         f"{r['random_loglik_per_ranking']:.3f} | {row['seconds']:.0f} |")
    lines += ["", "Over seeds (mean and 95% t-interval; difference paired by seed, against the "
              "linear mixture on frozen states):", "",
              "| model | ARI | difference | held-out log-lik per ranking | difference |",
              "| --- | --- | --- | --- | --- |"]
    models = [row["model"] for row in results[0]["rows"]]

    def of(m, key):
        return [next(x[key] for x in r["rows"] if x["model"] == m) for r in results]

    def fmt(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    for m in models:
        cells = []
        for key in ("ari", "heldout_loglik_per_ranking"):
            a, b = np.asarray(of(m, key)), np.asarray(of(models[0], key))
            cells += [fmt(t_interval(a)), "" if m == models[0] else fmt(t_interval(a - b))]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--family", default="order")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--epochs", default="3,6")
    p.add_argument("--runs", default=os.path.join(REPO, "runs", "starts"))
    p.add_argument("--out", default=os.path.join(REPO, "docs", "reward_models-order.json"))
    a = p.parse_args()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = [one(a.family, int(s), a.runs, [float(e) for e in a.epochs.split(",")])
               for s in a.seeds.split(",")]
    from emdpo_ray.utils import atomic_write_json, atomic_write_text

    atomic_write_json(a.out, results)
    command = "python experiments/reward_models.py " + " ".join(sys.argv[1:])
    atomic_write_text(a.out.removesuffix(".json") + ".md", page(results, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
