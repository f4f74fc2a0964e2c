"""`make mstep-fit`: how much of the types' preferences do the M-step's policies learn?

From the true labels (`em.init=labels`), two EM iterations per M-step setting on the
`make starts` data (300 users, 10 rankings of 3, shares 0.5/0.3/0.2) and its SFT reference,
the guard's held-out rankings (a fifth of each user's, never trained on) predicted from each
user's other rankings: per ranking, by the type policies (`held-out`), and beside them the
E-step's mixture log-likelihood per ranking of all rankings, four fifths of them trained on
(`all`). Bounds on the same held-out rankings: the true rewards of the user's type
(`oracle`), a linear Plackett-Luce model per type on token counts fitted to the labels
(`tokens, labels`), a uniformly random order (`random`). 95% intervals resample users.

    .venv/bin/python experiments/mstep_fit.py [--family linear] [--seeds 0,1]
        [--settings "default,epochs 6,full fine-tuning"]   (names: SETTINGS below)
        [--json docs/mstep_fit.json]

Needs `make starts` first (its data and reference). Writes docs/mstep_fit.{json,md}, or
--json and the .md beside it; the figures of other seeds already in that file (same family)
are kept, so seeds can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTS = os.path.join(REPO, "runs", "starts")
SETTINGS = {
    "default": [],
    "epochs 6": ["dpo.epochs=6"],
    "learning rate 3e-3": ["dpo.learning_rate=3e-3"],
    "learning rate 3e-4": ["dpo.learning_rate=3e-4"],
    "beta 4": ["dpo.beta=4"],
    "beta 0.25": ["dpo.beta=0.25"],
    "beta 0.1": ["dpo.beta=0.1"],
    "LoRA rank 2": ["model.lora.r=2", "model.lora.alpha=4"],
    "weight decay 1": ["dpo.weight_decay=1.0"],
    "SFT term 0.5": ["dpo.sft_weight=0.5"],
    "full fine-tuning": ["model.finetune=full"],
}


def run_setting(family: str, seed: int, name: str, out: str) -> dict:
    from emdpo_ray.config import load_config
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.driver import train

    data = os.path.join(STARTS, f"{family}-{seed}.jsonl")
    ref = os.path.join(STARTS, f"{family}-{seed}-reference")
    run = os.path.join(out, f"{family}-{seed}-{name.replace(' ', '-')}")
    cfg = load_config(None, ["em.init=labels", "em.max_iterations=2", "em.tol_loglik=0",
                             "em.tol_posterior=0", "mmra.enabled=false", f"seed={seed}",
                             f"model.name_or_path={ref}", "model.sft_epochs=0",
                             *SETTINGS[name]])
    t = time.perf_counter()
    train(cfg, data, 3, run, overwrite=True)
    hist = RunDir(run).history()
    n = sum(1 for _ in open(data))
    return {"setting": name, "seed": seed, "overrides": SETTINGS[name],
            "seconds": round(time.perf_counter() - t),
            "ari": [h["ari"] for h in hist[1:]],
            "all_rankings_per_ranking": [h["log_likelihood"] / n for h in hist[1:]],
            "heldout_per_ranking": [h["guard"]["heldout_loglik_per_ranking"] for h in hist[1:]],
            "heldout_interval": [h["guard"]["interval"] for h in hist[1:]]}


def bounds(family: str, seed: int) -> dict:
    """Held-out log-likelihood per ranking of the oracle, token-count labels fit, random,
    on the guard's held-out rankings (the driver's split: same function, fraction, seed)."""
    import numpy as np
    import torch

    from emdpo_ray.config import load_config
    from emdpo_ray.core.estep import per_ranking_interval, smoothed_onehot
    from emdpo_ray.core.losses import plackett_luce_logp
    from emdpo_ray.data import synth
    from emdpo_ray.data.encode import index_records
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.train import linear_mixture as lm, start

    data = os.path.join(STARTS, f"{family}-{seed}.jsonl")
    cfg = load_config(None, [f"seed={seed}"])
    records = load_records(data)
    index = index_records(records)
    ui, users = index.user_index, index.users
    held = start.heldout_records(ui, cfg.em.guard_holdout, seed)
    meta = json.load(open(data + ".meta.json"))
    n_held = np.bincount(ui[held], minlength=len(users))
    oracle = np.zeros(len(users))
    for r, u in zip(np.array(records, dtype=object)[held], ui[held]):
        rw = synth.true_rewards(meta, [r.prompt] * len(r.responses), r.responses)[r.true_type]
        oracle[u] += float(plackett_luce_logp(torch.tensor(rw[list(r.ranking)])[None])[0])
    labels = np.zeros(len(users), int)
    labels[ui] = [r.true_type for r in records]
    x, mask = start.response_features(records)
    keep = ~held
    mix = lm.fit_linear_mixture(x[keep], mask[keep], ui[keep], len(users),
                                smoothed_onehot(labels, 3, 0.0), 0, 1e-3)
    tok = start.predictive_user_logliks(lm.record_logliks(x, mask, mix.theta), held, ui,
                                        len(users), mix.eta)
    m = len(records[0].responses)
    return {"oracle": float(oracle.sum() / held.sum()),
            "oracle_interval": per_ranking_interval(oracle, n_held),
            "tokens_labels": float(tok.sum() / held.sum()),
            "tokens_labels_interval": per_ranking_interval(tok, n_held),
            "random": -math.log(math.factorial(m)), "heldout_rankings": int(held.sum())}


def table(res: dict, name: str = "mstep_fit.json") -> str:
    seeds = ", ".join(str(a) for a in res["seeds"])
    held = {b["heldout_rankings"] for b in res["bounds"].values()}
    ci = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
    lines = [
        "# How much of the types' preferences do the policies learn?",
        "",
        ("`make mstep-fit`" if name == "mstep_fit.json" else
         f"`python experiments/mstep_fit.py --family {res['family']} --seeds "
         f"{','.join(str(v) for v in res['seeds'])} --settings "
         f"\"{','.join(dict.fromkeys(r['setting'] for r in res['runs']))}\" "
         f"--json docs/{name}`")
        + " ([`experiments/mstep_fit.py`](../experiments/mstep_fit.py), figures in",
        f"[`{name}`]({name})): EM from the true labels, two iterations, on the",
        f"`make starts` data ({res['family']} family, seeds {seeds}: 300 users, 10 rankings of 3)",
        "and its SFT reference, one M-step setting per row (default settings otherwise).",
        f"Log-likelihood per ranking of the {'/'.join(str(h) for h in sorted(held))} held-out",
        "rankings (a fifth of each user's, never trained on), predicted from each user's other",
        "rankings, with the 95% interval of iteration 2's figure (resampling users), beside the",
        "E-step's mixture log-likelihood per ranking of all rankings (four fifths of them",
        "trained on).",
        "",
        "| M-step setting | seed | held-out: iteration 1, 2 [interval] "
        "| all rankings: iteration 1, 2 | ARI: iteration 1, 2 | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(res["runs"], key=lambda r: (list(SETTINGS).index(r["setting"])
                                                if r["setting"] in SETTINGS else 99, r["seed"])):
        f = lambda v: ", ".join(f"{a:.3f}" for a in v)  # noqa: E731
        lines.append(f"| {r['setting']} | {r['seed']} | {f(r['heldout_per_ranking'])} "
                     f"{ci(r['heldout_interval'][-1])} | "
                     f"{f(r['all_rankings_per_ranking'])} | "
                     f"{', '.join(f'{a:.2f}' for a in r['ari'])} | {r['seconds']} |")
    lines += ["", "On the same held-out rankings:", ""]
    for seed, b in res["bounds"].items():
        lines.append(f"- seed {seed}: the true rewards of each user's type {b['oracle']:.3f} "
                     f"{ci(b['oracle_interval'])}, a linear model per type on token counts "
                     f"fitted to the labels {b['tokens_labels']:.3f} "
                     f"{ci(b['tokens_labels_interval'])}, a random order {b['random']:.3f}.")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--family", default="linear")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out", default=os.path.join(REPO, "runs", "mstep-fit"))
    p.add_argument("--json", default=os.path.join(REPO, "docs", "mstep_fit.json"))
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    seeds = [int(v) for v in a.seeds.split(",")]
    if not all(os.path.exists(os.path.join(STARTS, f"{a.family}-{s}-reference")) for s in seeds):
        print("run `make starts` first: this study reuses its data and SFT references",
              file=sys.stderr)
        return 2
    res = {"family": a.family, "seeds": seeds,
           "bounds": {str(s): bounds(a.family, s) for s in seeds}, "runs": []}
    old = json.load(open(a.json)) if os.path.exists(a.json) else None
    if old is not None and old.get("family") == a.family:  # keep the other seeds' figures
        res["seeds"] = sorted(set(old["seeds"]) | set(seeds))
        res["bounds"] = {**{s: b for s, b in old["bounds"].items() if int(s) not in seeds},
                         **res["bounds"]}
        res["runs"] = [r for r in old["runs"] if r["seed"] not in seeds]
    for seed in seeds:
        for name in a.settings.split(","):
            res["runs"].append(run_setting(a.family, seed, name, a.out))
            print(json.dumps(res["runs"][-1]), flush=True)
    from emdpo_ray.utils import atomic_write_json, atomic_write_text

    atomic_write_json(a.json, res)
    atomic_write_text(a.json[:-5] + ".md", table(res, os.path.basename(a.json)))
    print(table(res, os.path.basename(a.json)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
