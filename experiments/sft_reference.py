"""`make sft-reference`: how the SFT reference of the default model changes what EM-DPO's
policies know about new users.

    .venv/bin/python experiments/sft_reference.py [CONFIG ...]

A config is a tag then `--set` overrides, e.g. `all-2 model.tiny.sft_epochs=2`. Each trains
EM-DPO (2 iterations, no MMRA) on the tests' synthetic data (60 users, 3 linear types, seed
0), then scores 120 new rankings per true type under every learned policy:

- `heldout_own_best`: how often the type's own (matched) policy gives a new ranking the
  highest Plackett-Luce likelihood (chance 1/3);
- `heldout_own_loglik`: mean log-likelihood of a new ranking under the own policy (a random
  order of 3 is -log 6 = -1.79);
- `online_12`: the share of simulated new users (groups of 12 feedbacks from eta, as the
  server updates them) routed confidently to their own type.

Writes docs/sft_reference.json.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["none model.tiny.sft_epochs=0", "all-2 model.tiny.sft_epochs=2",
           "all-6 model.tiny.sft_epochs=6", "top-6 model.tiny.sft_epochs=6 model.sft_on=top"]


def measure(tag: str, sets: list[str], data: str, out: str) -> dict:
    import torch

    from emdpo_ray.config import load_config
    from emdpo_ray.core.estep import bayes_update, entropy
    from emdpo_ray.core.losses import plackett_luce_logp
    from emdpo_ray.data import synth
    from emdpo_ray.data.records import parse_record
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.report.evaluate import match_types, policy_rewards
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.driver import train

    run = os.path.join(out, tag)
    summary = train(load_config(None, ["em.max_iterations=2", "mmra.enabled=false", *sets]),
                    data, 3, run, overwrite=True)
    rd = RunDir(run)
    cfg, post = rd.config(), rd.posteriors()
    users = sorted(post)
    truth = {r.user_id: r.true_type for r in load_records(data)}
    match = match_types(np.array([truth[u] for u in users]),
                        np.array([post[u] for u in users]), 3)
    meta = json.load(open(synth.meta_path(data)))
    theta = np.asarray(meta["theta"])
    rng = np.random.default_rng(11)
    own_best, own_ll, online = [], [], []
    for t in range(3):
        recs = [parse_record(r, f"new:{i}") for i, r in enumerate(
            synth.user_records(rng, theta, meta["reward_scale"], t, "new", 120, 3))]
        rew, mask = policy_rewards(rd, cfg, recs, 3)
        ll = np.stack([plackett_luce_logp(torch.as_tensor(rew[:, :, j]),
                                          torch.as_tensor(mask)).numpy() for j in range(3)], 1)
        own, others = match[t], [j for j in range(3) if j != match[t]]
        own_best.append(float((ll[:, own] > ll[:, others].max(1)).mean()))
        own_ll.append(float(ll[:, own].mean()))
        hits = 0
        for g in range(10):
            p = np.log(rd.mixing_weights())
            for i in range(12 * g, 12 * g + 12):
                p = bayes_update(p, ll[i])
            hits += int(np.argmax(p) == own and entropy(p) <= cfg.serve.min_confidence)
        online.append(hits / 10)
    return {"config": tag, "sets": sets, "ari": summary["ari"],
            "heldout_own_best": own_best, "heldout_own_loglik": own_ll, "online_12": online}


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    from emdpo_ray.data import synth
    from emdpo_ray.utils import atomic_write_json, quiet_ray_logs

    quiet_ray_logs()
    out = os.path.join(REPO, "runs", "sft-reference")
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "synth.jsonl")
    synth.write(data, *synth.generate(users=60, types=3, rankings_per_user=8, responses=3,
                                      seed=0))
    results = []
    for spec in sys.argv[1:] or DEFAULT:
        tag, *sets = spec.split()
        results.append(measure(tag, sets, data, out))
        print(json.dumps(results[-1]), flush=True)
    atomic_write_json(os.path.join(REPO, "docs", "sft_reference.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
