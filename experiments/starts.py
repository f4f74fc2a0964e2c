"""`make starts`: which start recovers the types, per synthetic family, and what EM adds.

    .venv/bin/python experiments/starts.py [--families linear,contextual,order]
        [--configs auto,language,tokens,reference,labels,auto-types] [--seeds 0,1] [--users 300]
        [--set KEY=VALUE ...] [--runs runs/starts] [--out docs/starts.json]
    .venv/bin/python experiments/starts.py --summary FILE.json [FILE.json ...] \
        [--out docs/starts-summary.json]

Each run: 300 users with 10 rankings of 3 each, three unbalanced types (shares 0.5/0.3/0.2),
up to 3 EM iterations, default settings but for the start (`em.init`, `em.init_features`:
`language`, the language model's features alone, no counts;
`auto-types`: the default start, and K chosen by it, `train --types auto`, not given). Per
iteration the ARI against the true types and the log-likelihood; after EM the held-out
predictive log-likelihood: 4 new rankings per user, drawn from the user's true type, scored
by the mixture (the user's posterior over the learned policies), per ranking; -log 3! = -1.792
is a uniformly random order; the JSON also gives it with the policies' rewards scaled by 0.5
and 0.25 (`heldout_loglik_by_temperature`: does a less confident policy predict better?). The
runs of one family and seed share one SFT reference (the
first run's). Writes docs/starts.json and docs/starts.md.

`--summary` reads the JSON of earlier runs (of the same settings: the files do not record
their `--set`) and writes, per family and start, the start's and final ARI on each seed, their
mean with a 95% t-interval over the seeds, and on how many seeds the final ARI reaches 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "tokens": ["em.init_features=tokens"],
    "reference": ["em.init_features=reference"],
    "auto": ["em.init_features=auto"],
    "language": ["em.init_features=language"],   # the language model's features alone
    "labels": ["em.init=labels"],
    "auto-types": ["em.init_features=auto"],   # and K chosen by the start (--types auto)
}
TYPES = {"auto-types": "auto"}   # configs that do not give train the true K
SHARES = [0.5, 0.3, 0.2]


TEMPERATURES = (1.0, 0.5, 0.25)


def heldout_loglik(run: str, data: str, per_user: int, seed: int) -> dict[float, float]:
    """Mean predictive log-likelihood of new rankings by the run's users (see above), with
    the policies' rewards scaled by each of TEMPERATURES (1: as trained; below 1: less
    confident, which shows whether the policies rank with too much confidence)."""
    from scipy.special import logsumexp

    from emdpo_ray.core.losses import plackett_luce_logp
    from emdpo_ray.data import synth
    from emdpo_ray.data.records import parse_record
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.report.evaluate import policy_rewards
    from emdpo_ray.run.rundir import RunDir

    import torch

    rd = RunDir(run)
    cfg, post = rd.config(), rd.log_posteriors()
    meta = json.load(open(synth.meta_path(data)))
    theta = np.asarray(meta["theta"])
    truth = {r.user_id: r.true_type for r in load_records(data)}
    rng = np.random.default_rng(10_000 + seed)
    recs, users = [], []
    for u in post:
        new = synth.user_records(rng, theta, meta["reward_scale"], truth[u], u, per_user, 3,
                                 meta["family"])
        recs += [parse_record(r, f"heldout:{len(recs) + i}") for i, r in enumerate(new)]
        users += [u] * per_user
    k = len(next(iter(post.values())))
    rewards, mask = policy_rewards(rd, cfg, recs, k)
    rows = {u: [i for i, v in enumerate(users) if v == u] for u in post}
    out = {}
    for t in TEMPERATURES:
        ll = torch.stack([plackett_luce_logp(torch.as_tensor(t * rewards[:, :, j]),
                                             torch.as_tensor(mask))
                          for j in range(k)], 1).double().numpy()            # [n, K]
        out[t] = sum(float(logsumexp(np.asarray(post[u], float) + ll[rows[u]].sum(0)))
                     for u in post) / len(recs)
    return out


def run_one(family: str, config: str, seed: int, users: int, out: str, extra: list[str]) -> dict:
    from emdpo_ray.config import load_config
    from emdpo_ray.data import synth
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.driver import train
    from emdpo_ray.train.sft import default_sft_rate

    data = os.path.join(out, f"{family}-{seed}.jsonl")
    if not os.path.exists(data):
        synth.write(data, *synth.generate(users=users, types=3, rankings_per_user=10,
                                          responses=3, shares=SHARES, seed=seed, family=family))
    run = os.path.join(out, f"{family}-{config}-{seed}")
    shared = os.path.join(out, f"{family}-{seed}-reference")
    # the shared tiny reference is passed as a named model: its start's copy is still
    # trained further as the tiny model's is (em.init_sft_epochs, at the rate of the tiny
    # model these settings build, its width's)
    tiny = load_config(None, [*CONFIGS[config], *extra])
    base = ([f"model.name_or_path={shared}", "model.sft_epochs=0",
             f"em.init_sft_epochs={tiny.start_sft_passes}",
             f"model.sft_learning_rate={default_sft_rate(tiny.model)}"]
            if os.path.isdir(shared) else [])
    cfg = load_config(None, ["em.max_iterations=3", "em.tol_loglik=0", "em.tol_posterior=0",
                             "mmra.enabled=false", f"seed={seed}", *base, *CONFIGS[config],
                             *extra])
    train(cfg, data, TYPES.get(config, 3), run, overwrite=True)
    rd = RunDir(run)
    if not base:
        import shutil

        shutil.copytree(rd.base_model_dir, shared)
    hist = rd.history()
    return {"family": family, "config": config, "seed": seed, "users": users,
            "types": rd.types, "start": hist[0].get("start", {}),
            "ari": [h["ari"] for h in hist],
            "log_likelihood": [h["log_likelihood"] for h in hist],
            "loglik_drops": [h.get("loglik_drop") for h in hist[1:]],
            "guard": [h.get("guard") for h in hist[1:]],
            "reward_temperature": [h.get("reward_temperature") for h in hist[1:]],
            **heldout_figures(heldout_loglik(run, data, 4, seed))}


def heldout_figures(by_temperature: dict[float, float]) -> dict:
    return {"heldout_loglik_per_ranking": by_temperature[1.0],
            "heldout_loglik_by_temperature": {str(t): v for t, v in by_temperature.items()}}


HEADER = """# Which start recovers the types?

`make starts` (experiments/starts.py; figures in [`starts.json`](starts.json)): 300 users with
10 rankings of 3 each, three unbalanced types (0.5/0.3/0.2), up to 3 EM iterations, default
settings but for the start. `tokens`: a linear Plackett-Luce mixture on token counts, fitted
from `em.init_restarts` starts (8 before [`start_cost.md`](start_cost.md), 4 since: the same
start at less cost; the k-means split of the users, then random partitions),
each run 5 iterations and the likeliest run on to 20, then its L2 penalty walked down
`em.init_l2` (1e-2, 1e-3, 1e-4); `auto`: the same on token counts, the reference model's
states (middle layer, pooled over the first, middle and last sentences of each response
(by thirds of its tokens before em.init_pooling), from a
copy of the reference given more passes of SFT on the responses, `em.init_sft_epochs`),
or both,
and at the L2 strength, whichever predicts held-out rankings best, or the simplest within
noise of it (the one-standard-error rule; `features, L2 chosen`; why:
[`start_features.md`](start_features.md)), then split-and-merge moves (`em.init_split_merge`
= 6 a round; `moves`: those kept, each raising the start's log-likelihood by more than a
nat). After EM, the final fit (`em.final_epochs` = 4) trains the policies that the
held-out column scores. With the reference's own states (`em.init_sft_epochs=0`, the
default before; written by the code before it, the same as `python experiments/starts.py
--set em.init_sft_epochs=0 --out docs/starts-sft0.json`):
[`starts-sft0.json`](starts-sft0.json). Without split-and-merge and the final fit (the
defaults before them, and before the further-trained copy):
[`starts-nosplitmerge.json`](starts-nosplitmerge.json). Earlier defaults, same data
and references:
the k-means split alone in [`starts-kmeans-only.json`](starts-kmeans-only.json); 8 restarts
of 20 iterations with the reference's states projected to 64 dimensions in
[`starts-dims64.json`](starts-dims64.json); short-run restarts, the last layer's states and
a fixed L2 of 1e-2 in [`starts-l2fixed.json`](starts-l2fixed.json). Guard
(`em.guard_holdout`, default 0.2): a fifth of each user's rankings is never trained on; an
iteration's new types are kept only if its policies predict those rankings better than
the model behind the current types, beyond noise (per held-out ranking: that model vs the new
policies; since `em.guard_level`, the gain paired per user with its 90% interval, kept when
that lies above 0; earlier figures: kept when the new policies' mean was no lower; `stop` =
update refused, EM ends with the current types). Held-out log-likelihood (last
column): 4 new rankings per user from the user's true type, scored by the learned mixture of
policies; a random order scores -1.792. Runs without the guard (`--set em.guard_holdout=0
--configs auto,tokens`, k-means split start) are in [`starts-noguard.json`](starts-noguard.json),
and at a DPO learning rate of 5e-3 in [`starts-lr5e-3.json`](starts-lr5e-3.json).

"""


def header(out: str, argv: list[str]) -> str:
    """`make starts`'s header for docs/starts.json; for any other file, the command that wrote
    it (the columns are those of starts.md)."""
    if os.path.abspath(out) == os.path.join(REPO, "docs", "starts.json"):
        return HEADER
    name = os.path.basename(out)
    cmd = shlex.join(["python", "experiments/starts.py", *argv])
    return (f"# Which start recovers the types? ({name[:-5]})\n\n`{cmd}` (figures in "
            f"[`{name}`]({name}); columns as in [`starts.md`](starts.md)).\n\n")


def table(results: list[dict]) -> str:
    rows = ["| family | start | seed | features, L2 chosen | moves | ARI: start, iter 1, 2, 3 | "
            "guard: held-out log-lik per ranking, model behind the types vs new policies "
            "[95% interval], gain paired per user [90% interval] | "
            "held-out log-lik per ranking | log-lik falls |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        falls = [d for d in r["loglik_drops"] if d]
        checks = [g for g in r.get("guard", []) if g]
        guard = "; ".join(("-" if g["baseline"] is None else f"{g['baseline']:.3f}")
                          + f" vs {g['heldout_loglik_per_ranking']:.3f}"
                          + (" [{:.3f}, {:.3f}]".format(*g["interval"]) if "interval" in g else "")
                          + (" at rewards x{:.2f}/{:.2f}".format(*g["temperatures"])
                             if g.get("temperatures") else "")
                          + (", gain {:+.3f} [{:+.3f}, {:+.3f}]".format(g["gain"], *g["gain_interval"])
                             if (g.get("gain_interval") or [None])[0] is not None else "")
                          + ("" if g["accepted"] else " stop") for g in checks) or "off"
        moves = r["start"].get("split_merge")
        k = f" (K={r['types']})" if r["config"] in TYPES else ""
        rows.append(f"| {r['family']} | {r['config']}{k} | {r['seed']} | "
                    f"{r['start'].get('features', '-')}, {r['start'].get('l2', '-')} | "
                    f"{'-' if moves is None else len(moves)} | "
                    + ", ".join(f"{a:.2f}" for a in r["ari"]) + f" | {guard}"
                    + f" | {r['heldout_loglik_per_ranking']:.3f} | "
                    + (", ".join(f"{d:.0f}" for d in falls) if falls else "none") + " |")
    return "\n".join(rows)


def summarize(results: list[dict], bar: float = 0.8) -> list[dict]:
    """Per (family, config), in order of first appearance: the start's and final ARI by seed,
    their mean and t-interval over seeds, and the seeds whose final ARI reaches `bar`."""
    from emdpo_ray.report.seeds import t_interval

    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        runs = groups.setdefault((r["family"], r["config"]), {})
        if r["seed"] in runs:
            raise ValueError(f"{r['family']} {r['config']} seed {r['seed']} appears twice")
        runs[r["seed"]] = r
    out = []
    for (family, config), runs in groups.items():
        seeds = sorted(runs)
        start = [runs[s]["ari"][0] for s in seeds]
        final = [runs[s]["ari"][-1] for s in seeds]
        out.append({"family": family, "config": config, "seeds": seeds,
                    "features": [(runs[s].get("start") or {}).get("features") for s in seeds],
                    "loglik_falls": sum(sum(1 for d in runs[s].get("loglik_drops", [])
                                            if d) for s in seeds),
                    "start_ari": start, "final_ari": final,
                    "start_ari_mean_interval": t_interval(start),
                    "final_ari_mean_interval": t_interval(final),
                    "bar": bar, "seeds_reaching_bar": [s for s, a in zip(seeds, final)
                                                       if a >= bar]})
    return out


def summary_table(rows: list[dict]) -> str:
    def mean_ci(m: list[float]) -> str:
        return f"{m[0]:.2f}" + ("" if m[1] != m[1] else f" [{m[1]:.2f}, {m[2]:.2f}]")

    def by_seed(values: list[float], bar: float) -> str:
        # a value just under the bar that two decimals would round up to it gets three
        return ", ".join(f"{a:.3f}" if a < bar <= round(a, 2) else f"{a:.2f}" for a in values)

    lines = ["| family | start | seeds | features chosen | ARI of the start, by seed | "
             "final ARI, by seed | start: mean [95% t-interval] | final: mean [95% t-interval] "
             "| final >= bar | log-lik falls |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        chosen = sorted({f for f in r.get("features", []) if f}) or ["-"]
        lines.append(f"| {r['family']} | {r['config']} | {', '.join(map(str, r['seeds']))} | "
                     + ", ".join(chosen) + " | "
                     + by_seed(r["start_ari"], r["bar"]) + " | "
                     + by_seed(r["final_ari"], r["bar"]) + " | "
                     + f"{mean_ci(r['start_ari_mean_interval'])} | "
                     + f"{mean_ci(r['final_ari_mean_interval'])} | "
                     + f"{len(r['seeds_reaching_bar'])} of {len(r['seeds'])} (>= {r['bar']}"
                     + (f": {', '.join(map(str, r['seeds_reaching_bar']))}"
                        if 0 < len(r["seeds_reaching_bar"]) < len(r["seeds"]) else "") + ") | "
                     + f"{r.get('loglik_falls', '-')} |")
    return "\n".join(lines)


def write_summary(files: list[str], out: str, argv: list[str]) -> None:
    from emdpo_ray.utils import atomic_write_json, atomic_write_text

    results = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            results += json.load(fh)
    rows = summarize(results)
    atomic_write_json(out, rows)
    name, cmd = os.path.basename(out), shlex.join(["python", "experiments/starts.py", *argv])
    links = ", ".join(f"[`{os.path.basename(f)}`]({os.path.relpath(f, os.path.dirname(out))})"
                      for f in files)
    atomic_write_text(out[:-5] + ".md",
                      f"# Type recovery over seeds ({name[:-5]})\n\n`{cmd}` (figures in "
                      f"[`{name}`]({name}); from {links}). ARI against the true types: of the "
                      "start, and after EM (final). The interval is Student's t over the seeds: "
                      "with few seeds, wide (with two it can pass 1, the most ARI can be).\n\n"
                      + summary_table(rows) + "\n")
    print(summary_table(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--families", default="linear,contextual,order")
    p.add_argument("--configs", default="auto")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    p.add_argument("--out", default=None,
                   help="docs/starts.json, or docs/starts-summary.json with --summary")
    p.add_argument("--summary", nargs="+", metavar="FILE.json",
                   help="summarise earlier runs' JSON over seeds instead of running")
    p.add_argument("--runs", default=os.path.join(REPO, "runs", "starts"),
                   help="data, references and runs (another folder for another model: the "
                        "runs of one family and seed share the first run's reference)")
    a = p.parse_args()
    if a.summary:
        write_summary(a.summary, a.out or os.path.join(REPO, "docs", "starts-summary.json"),
                      sys.argv[1:])
        return 0
    a.out = a.out or os.path.join(REPO, "docs", "starts.json")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    from emdpo_ray.utils import atomic_write_json, atomic_write_text, quiet_ray_logs

    quiet_ray_logs()
    out = a.runs
    os.makedirs(out, exist_ok=True)
    results = []
    for family in a.families.split(","):
        for seed in map(int, a.seeds.split(",")):
            for config in a.configs.split(","):
                results.append(run_one(family, config, seed, a.users, out, a.set))
                print(json.dumps(results[-1]), flush=True)
                atomic_write_json(a.out, results)
                atomic_write_text(a.out[:-5] + ".md",
                                  header(a.out, sys.argv[1:]) + table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
