"""`make identifiability`: binary comparisons do not identify user types; rankings of three do.

    .venv/bin/python experiments/identifiability.py [--users 160]

Two opposite types in equal shares (theta_1 = -theta_0): under binary comparisons every pair
has probability 1/2 for the population, exactly as with no preference at all, so one
comparison per user carries no information about the types. A ranking of three responses
does. For 1, 2 and 4 annotations per user (same users), EM-DPO runs on binary and on
ternary data; `type_accuracy` is the mean over true types of the matched learned policy's
pairwise accuracy on that type's held-out rankings. Writes runs/identifiability/result.json
and result.png.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_accuracy(run: str, theta, scale: float, n_per_type: int, seed: int) -> float:
    from emdpo_ray.data import synth
    from emdpo_ray.data.records import parse_record
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.report.evaluate import match_types, policy_rewards
    from emdpo_ray.run.rundir import RunDir

    rd = RunDir(run)
    post = rd.posteriors()
    truth = {r.user_id: r.true_type for r in load_records(os.path.join(run, "data.jsonl"))}
    gamma = np.array(list(post.values()))
    true_types = np.array([truth[u] for u in post])
    match = match_types(true_types, gamma, len(theta))
    cfg = rd.config()
    rng = np.random.default_rng(seed)
    accs = []
    for t in range(len(theta)):
        recs = [parse_record(r, f"heldout:{i}") for i, r in enumerate(
            synth.user_records(rng, theta, scale, t, "h", n_per_type, 3))]
        rewards, mask = policy_rewards(rd, cfg, recs, gamma.shape[1])
        r = rewards[:, :, match[t]]
        pairs = mask[:, 1:]
        accs.append(float(((r[:, :-1] > r[:, 1:]) & pairs).sum() / pairs.sum()))
    return float(np.mean(accs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=160)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "identifiability"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from emdpo_ray.utils import quiet_ray_logs

    quiet_ray_logs()
    import warnings

    warnings.filterwarnings("ignore")
    from emdpo_ray.data import synth
    from emdpo_ray.config import load_config
    from emdpo_ray.train.driver import train
    from emdpo_ray.utils import atomic_write_json

    theta0 = synth.CANONICAL[0]
    theta = np.stack([theta0, -theta0])  # the canonical symmetric case
    scale = 2.0
    per_user = [1, 2, 4]
    result = {"annotations_per_user": per_user, "users": a.users,
              "binary": {"type_accuracy": []}, "ternary": {"type_accuracy": []}}
    os.makedirs(a.out, exist_ok=True)
    for mode, m in (("binary", 2), ("ternary", 3)):
        for n in per_user:
            run = os.path.join(a.out, f"{mode}-{n}")
            os.makedirs(run, exist_ok=True)
            data = os.path.join(a.out, f"{mode}-{n}.jsonl")
            synth.write(data, *synth.generate(users=a.users, types=2, rankings_per_user=n,
                                              responses=m, seed=a.seed + n, theta=theta,
                                              reward_scale=scale))
            cfg = load_config(None, ["em.max_iterations=2", "mmra.enabled=false",
                                     "ray.cpus_per_worker=2", f"seed={a.seed}"])
            summary = train(cfg, data, 2, run, overwrite=True)
            os.replace(data, os.path.join(run, "data.jsonl"))
            acc = held_out_accuracy(run, theta, scale, 150, a.seed + 99)
            result[mode]["type_accuracy"].append(acc)
            print(f"{mode:8s} annotations/user={n}: ari={summary['ari']:.3f} "
                  f"type_accuracy={acc:.3f}", flush=True)
    atomic_write_json(os.path.join(a.out, "result.json"), result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for mode, marker in (("ternary", "o"), ("binary", "s")):
        ax.plot(per_user, result[mode]["type_accuracy"], marker=marker, label=mode)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="annotations per user", ylabel="type accuracy (held-out pairs)",
           xticks=per_user, ylim=(0.3, 1.0), title="two opposite types, equal shares")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "result.png"), dpi=110)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
