"""`make identifiability`: one binary comparison per user does not identify user types; a
ranking of three does; at matched information, what do rankings add?

    .venv/bin/python experiments/identifiability.py [--users 160] [--seeds 0,1]

Two opposite types in equal shares (theta_1 = -theta_0, the linear family). Per user and
seed the same prompts and the same three responses are annotated five ways:

- `binary x1`: one comparison (responses 0 and 1 of the first prompt);
- `binary x3` / `ternary x1`: the first prompt's three pairs compared independently
  (Bradley-Terry), or its three responses ranked once (Plackett-Luce): the same text;
- `binary x12` / `ternary x4`: the same on four prompts.

For each: EM-DPO (K = 2, default start) with the start's and the final ARI, the policies'
pairwise accuracy on their matched type's held-out rankings, the ARI of EM started from the
true labels (`em.init=labels`, seed 0) and the oracle ARI (posteriors from the true rewards:
the best any method can do with these annotations). The population-level check needs no
training: on 4000 fresh annotations of new users (one each), the log-likelihood gain per
annotation of the true two-type mixture over the best single Plackett-Luce model (fitted to
the same annotations): exactly 0 for a binary comparison, where the mixture says 1/2 like
no preference at all, positive for a ranking of three. Writes docs/identifiability.json and
docs/identifiability.png.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("binary", 1), ("binary", 3), ("ternary", 1), ("binary", 12), ("ternary", 4)]
SCALE = 2.0


def theta() -> np.ndarray:
    from emdpo_ray.data import synth

    return np.stack([synth.CANONICAL[0], -synth.CANONICAL[0]])


def annotations(users: int, prompts: int, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(ternary records, binary records of the same texts, meta) for `prompts` per user."""
    from emdpo_ray.data import synth

    th = theta()
    recs, meta = synth.generate(users=users, types=2, rankings_per_user=prompts, responses=3,
                                seed=seed, theta=th, reward_scale=SCALE)
    rng = np.random.default_rng(seed + 5)
    binary = []
    for r in recs:
        rew = synth.true_rewards(meta, [r["prompt"]] * 3, r["responses"])[r["true_type"]]
        for a, b in ((0, 1), (0, 2), (1, 2)):
            a_wins = rng.random() < 1.0 / (1.0 + np.exp(rew[b] - rew[a]))
            binary.append({"user_id": r["user_id"], "prompt": r["prompt"],
                           "chosen": r["responses"][a if a_wins else b],
                           "rejected": r["responses"][b if a_wins else a],
                           "true_type": r["true_type"]})
    return recs, binary, meta


def oracle_ari(records: list[dict], meta: dict) -> float:
    """ARI of the MAP types under the true rewards (equal shares)."""
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.data import synth

    ll: dict[str, np.ndarray] = {}
    truth = {}
    for r in records:
        texts = r["responses"] if "responses" in r else [r["chosen"], r["rejected"]]
        order = r.get("ranking", list(range(len(texts))))
        rew = synth.true_rewards(meta, [r["prompt"]] * len(texts), texts)[:, order]  # [K, m]
        lp = np.zeros(len(rew))
        for j in range(rew.shape[1]):
            rest = rew[:, j:]
            lp += rew[:, j] - np.log(np.exp(rest).sum(1))
        ll[r["user_id"]] = ll.get(r["user_id"], 0.0) + lp
        truth[r["user_id"]] = r["true_type"]
    users = sorted(ll)
    return float(adjusted_rand_score([truth[u] for u in users],
                                     [int(np.argmax(ll[u])) for u in users]))


def population_gain(responses: int, n: int = 4000, seed: int = 123) -> float:
    """Per-annotation log-likelihood of fresh single annotations under the true mixture
    minus under the best single linear Plackett-Luce model on the same features."""
    import torch

    from emdpo_ray.core.losses import plackett_luce_logp
    from emdpo_ray.data import synth

    th = theta()
    rng = np.random.default_rng(seed)
    feats = []
    for i in range(n):
        k = int(rng.integers(2))
        r = synth.user_records(rng, th, SCALE, k, f"p{i}", 1, 3)[0]
        f = np.stack([synth.text_features(t) for t in r["responses"]])
        if responses == 2:  # one Bradley-Terry comparison of responses 0 and 1
            d = SCALE * th[k] @ (f[0] - f[1])
            feats.append(f[[0, 1] if rng.random() < 1 / (1 + np.exp(-d)) else [1, 0]])
        else:               # the ranking of all three (Plackett-Luce, drawn by synth)
            feats.append(f[r["ranking"]])
    x = torch.tensor(np.stack(feats), dtype=torch.float64)              # [n, m, F] ranked
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    per_type = torch.stack([plackett_luce_logp(SCALE * x @ torch.tensor(t), mask) for t in th])
    mix = torch.logsumexp(per_type + np.log(0.5), 0).mean()
    w = torch.zeros(x.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -plackett_luce_logp(x @ w, mask).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        single = plackett_luce_logp(x @ w, mask).mean()
    return float(mix - single)


def train_case(records: list[dict], out: str, name: str, seed: int, overrides=()) -> dict:
    from emdpo_ray.config import load_config
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.driver import train

    data = os.path.join(out, f"{name}.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    run = os.path.join(out, name)
    cfg = load_config(None, ["em.max_iterations=3", "mmra.enabled=false", f"seed={seed}",
                             *overrides])
    train(cfg, data, 2, run, overwrite=True)
    hist = RunDir(run).history()
    return {"run": run, "data": data, "start_ari": hist[0]["ari"], "final_ari": hist[-1]["ari"]}


def held_out_accuracy(run: str, data: str, n_per_type: int, seed: int) -> float:
    """Mean over true types of the matched policy's pairwise accuracy on new rankings."""
    from emdpo_ray.data import synth
    from emdpo_ray.data.records import parse_record
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.report.evaluate import match_types, policy_rewards
    from emdpo_ray.run.rundir import RunDir

    rd = RunDir(run)
    post = rd.posteriors()
    truth = {r.user_id: r.true_type for r in load_records(data)}
    gamma = np.array(list(post.values()))
    match = match_types(np.array([truth[u] for u in post]), gamma, 2)
    rng = np.random.default_rng(seed)
    accs = []
    for t in range(2):
        recs = [parse_record(r, f"heldout:{i}") for i, r in enumerate(
            synth.user_records(rng, theta(), SCALE, t, "h", n_per_type, 3))]
        rewards, mask = policy_rewards(rd, rd.config(), recs, 2)
        r = rewards[:, :, match[t]]
        pairs = mask[:, 1:]
        accs.append(float(((r[:, :-1] > r[:, 1:]) & pairs).sum() / pairs.sum()))
    return float(np.mean(accs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=160)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--labels-seeds", default="0")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "identifiability"))
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    from emdpo_ray.report.seeds import t_interval
    from emdpo_ray.utils import atomic_write_json, quiet_ray_logs

    quiet_ray_logs()
    os.makedirs(a.out, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    labels_seeds = {int(s) for s in a.labels_seeds.split(",") if s}
    runs = []
    for seed in seeds:
        for prompts in (1, 4):
            ternary, binary, meta = annotations(a.users, prompts, seed)
            first_pair = [b for i, b in enumerate(binary) if i % (3 * prompts) == 0]
            data = {("ternary", prompts): ternary, ("binary", 3 * prompts): binary}
            if prompts == 1:
                data[("binary", 1)] = first_pair
            for (mode, n), recs in data.items():
                name = f"{mode}-x{n}-seed{seed}"
                row = {"mode": mode, "per_user": n, "seed": seed,
                       "oracle_ari": oracle_ari(recs, meta)}
                res = train_case(recs, a.out, name, seed)
                row.update(start_ari=res["start_ari"], final_ari=res["final_ari"],
                           type_accuracy=held_out_accuracy(res["run"], res["data"], 150,
                                                           seed + 99))
                if seed in labels_seeds:
                    row["labels_final_ari"] = train_case(recs, a.out, name + "-labels", seed,
                                                         ["em.init=labels"])["final_ari"]
                runs.append(row)
                print(json.dumps(row), flush=True)
    summary = []
    for mode, n in CASES:
        rows = [r for r in runs if r["mode"] == mode and r["per_user"] == n]
        summary.append({"case": f"{mode} x{n}", **{
            key: t_interval([r.get(key) for r in rows])
            for key in ("start_ari", "final_ari", "oracle_ari", "type_accuracy",
                        "labels_final_ari")}})
    result = {"users": a.users, "seeds": seeds, "cases": summary, "runs": runs,
              "population_gain_per_annotation": {"binary": population_gain(2),
                                                 "ternary": population_gain(3)}}
    atomic_write_json(os.path.join(REPO, "docs", "identifiability.json"), result)
    plot(summary, os.path.join(REPO, "docs", "identifiability.png"), len(seeds))
    print(json.dumps(result["population_gain_per_annotation"]))
    return 0


def plot(summary: list[dict], path: str, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = np.arange(len(summary))
    for off, key, label, color in ((-0.2, "start_ari", "start", "#9ecae1"),
                                   (0.0, "final_ari", "after EM", "#08519c"),
                                   (0.2, "oracle_ari", "oracle (true rewards)", "#999999")):
        mean = np.array([s[key][0] for s in summary])
        lo = np.array([s[key][1] for s in summary])
        hi = np.array([s[key][2] for s in summary])
        err = None if np.isnan(lo).all() else np.vstack([mean - lo, hi - mean])
        ax.bar(xs + off, mean, 0.2, yerr=err, label=label, color=color, capsize=2)
    ax.set_xticks(xs, [s["case"] for s in summary])
    ax.axhline(0, color="black", lw=0.6)
    ax.set(ylabel="type recovery (ARI)", ylim=(-0.1, 1.05),
           title="two opposite types, equal shares (" + (
               f"{n_seeds} seeds, 95% intervals)" if n_seeds > 1 else "one seed)"))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
