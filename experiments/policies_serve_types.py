"""`make policies-serve-types`: does each type's policy write what that type prefers?

    .venv/bin/python experiments/policies_serve_types.py [--seeds 0 1] [--prompts 48]
        [--samples 16] [--set KEY=VALUE] [--reuse]

For each typed set and seed: synthesise users, `emdpo-ray train` with the demo's config
(SFT reference, EM-DPO, MMRA; `--prompts` held-out prompts x `--samples` samples per
policy for MMRA and the evaluation, the demo's 24 x 4 by default), `emdpo-ray eval`; then
read the reward matrix of every policy's generations on held-out prompts under every true
type (report/generations.py).

- `demo`: the project's own three types (the data of `make demo`), equal shares;
- `unseen`: four types in unbalanced shares (0.4, 0.3, 0.2, 0.1) whose preferences are
  seeded random directions over the synthetic features, which the project was never tuned
  on; 160 users;
- `order`, `contextual`, `lead_topic` (not by default): the families of `make starts`, drawn
  as it draws them (300 users, 10 rankings of 3, shares 0.5/0.3/0.2).

Also each type's true regret (in its true reward, against its own policy) when an unknown
user is served by MMRA's mixture, the uniform one, the learned shares (eta), the single-DPO
policy or the reference: the largest over types, with its interval over resampled prompts and
its paired difference from uniform's, and how closely the regrets MMRA solved for (its
estimated log-ratio rewards) track the true ones: their Pearson correlation over every type
and rival policy ("fidelity").

Writes docs/policies_serve_types.json, .md (the README's tables) and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, ".venv", "bin")
SETS = ["demo", "unseen"]
FAMILY_SETS = ["order", "contextual", "lead_topic"]   # as `make starts` draws them


def make_data(name: str, seed: int, path: str) -> int:
    """Write the typed set; returns its number of types."""
    from emdpo_ray.data import synth

    if name in FAMILY_SETS:
        synth.write(path, *synth.generate(users=300, types=3, rankings_per_user=10, seed=seed,
                                          shares=[0.5, 0.3, 0.2], family=name))
        return 3
    if name == "demo":
        synth.write(path, *synth.generate(users=90, types=3, rankings_per_user=8, seed=seed))
        return 3
    rng = np.random.default_rng(2026 + seed)
    theta = rng.normal(size=(4, len(synth.FEATURES)))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    synth.write(path, *synth.generate(users=160, types=4, rankings_per_user=8, seed=seed,
                                      shares=[0.4, 0.3, 0.2, 0.1], theta=theta))
    return 4


def text_quality(run: str) -> dict:
    """Per policy, over its generations: the share of words in the synthetic data's vocabulary
    and the share of generations holding a broken character (U+FFFD or a control character,
    from sampling a partial UTF-8 sequence): how far sampling strays from the data's text."""
    import re

    from emdpo_ray.data import synth

    vocab = (set(synth.FILLER) | synth.ALL_TOPICS
             | {w.lower() for ws in synth.WORDS.values() for w in ws})
    rows = [json.loads(line) for line in open(os.path.join(run, "mmra_samples.jsonl"))]
    out = {}
    for pol in sorted({r["policy"] for r in rows}):
        texts = [r["text"] for r in rows if r["policy"] == pol]
        words = [w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)]
        out[pol] = {"in_vocabulary": float(np.mean([w in vocab for w in words])) if words else 0.0,
                    "broken": float(np.mean([bool(re.search(r"[\ufffd\x00-\x08\x0b-\x1f]", t))
                                             for t in texts]))}
    return out


def run_one(name: str, seed: int, out: str, extra: list[str], reuse: bool = False) -> dict:
    data = os.path.join(out, f"{name}-{seed}.jsonl")
    run = os.path.join(out, f"{name}-{seed}")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    k = make_data(name, seed, data)
    if not (reuse and os.path.exists(os.path.join(run, "mmra_samples.jsonl"))):
        subprocess.run([f"{BIN}/emdpo-ray", "train", "--data", data, "--types", str(k), "--out", run,
                        "--config", os.path.join(REPO, "jobs", "demo.yaml"), "--overwrite",
                        "--set", f"seed={seed}", *extra, "--format", "json"],
                       check=True, env=env, capture_output=True)
    p = subprocess.run([f"{BIN}/emdpo-ray", "eval", "--run", run, "--data", data, "--format",
                        "json"], check=True, env=env, capture_output=True, text=True)
    ev = json.loads(p.stdout)
    mmra = json.load(open(os.path.join(run, "mmra.json")))
    gen = ev["generations"]
    return {"set": name, "seed": seed, "types": k, "ari": ev["ari"], "policies": gen["policies"],
            "own_policy": gen["own_policy"], "reward": gen["reward"],
            "reward_ci": gen["reward_ci"], "own_is_best": gen["own_is_best"],
            "own_is_best_separated": gen["own_is_best_separated"],
            "own_minus_reference": gen["own_minus_reference"],
            "own_minus_reference_ci": gen["own_minus_reference_ci"],
            "own_minus_single_dpo": gen["own_minus_single_dpo"],
            "own_minus_single_dpo_ci": gen["own_minus_single_dpo_ci"],
            "own_above_single_dpo_paired": gen["own_above_single_dpo_paired"],
            "margin_over_next_best": gen["margin_over_next_best"],
            "margin_over_next_best_ci": gen["margin_over_next_best_ci"],
            "own_beats_every_rival_paired": gen["own_beats_every_rival_paired"],
            "sampling": mmra["sampling"], "mmra_weights": mmra["weights"],
            # MMRA against simpler ways to serve an unknown user, in the true rewards
            "true_max_regret": {name: {key: v[key] for key in ("max_regret", "max_regret_ci",
                                                               "max_regret_minus_uniform_ci")
                                       if key in v}
                                for name, v in ev["true_regret"].items()
                                if name in ("mmra", "uniform", "eta", "single_dpo", "reference")},
            "regret_fidelity": (gen.get("regret_fidelity") or {}).get("pearson"),
            "text": text_quality(run), "types_served": gen["types_served"]}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        R = np.asarray(r["reward"])
        ax.imshow(R, cmap="RdYlGn", aspect="auto")
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                own = r["policies"][j] == r["own_policy"][i]
                ax.text(j, i, f"{R[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        fontweight="bold" if own else "normal")
            if r["own_policy"][i]:
                j = r["policies"].index(r["own_policy"][i])
                ax.add_patch(plt.Rectangle((j - .5, i - .5), 1, 1, fill=False, lw=2.5))
        ax.set_xticks(range(R.shape[1]), [p.replace("_", "\n") for p in r["policies"]],
                      fontsize=7)
        ax.set_yticks(range(R.shape[0]), [f"true {i}" for i in range(R.shape[0])], fontsize=7)
        ax.set_title(f"{r['set']} (seed {r['seed']}): {r['types_served']}/{R.shape[0]} served",
                     fontsize=9)
    fig.suptitle("mean true reward of each policy's generations on held-out prompts "
                 "(box: the type's own policy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ci(v: float, ci) -> str:
    return f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def tables(results: list[dict]) -> str:
    """The README's two tables: each type served by its own policy, and MMRA's true regret."""
    out = ["| typed set (seed) | ARI | types served (own policy best) | intervals apart (paired) "
           "| own - reference, per true type [95% interval] | own - single DPO, per true type "
           "[95% paired interval] |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        k = r["types"]
        out.append(
            f"| {r['set']} ({r['seed']}) | {r['ari']:.3f} | {r['types_served']} of {k} | "
            f"{sum(r['own_is_best_separated'])} of {k} "
            f"({sum(r['own_beats_every_rival_paired'])} of {k}) | "
            + ", ".join(map(_ci, r["own_minus_reference"], r["own_minus_reference_ci"])) + " | "
            + ", ".join(map(_ci, r["own_minus_single_dpo"], r["own_minus_single_dpo_ci"])) + " |")
    names = ["mmra", "uniform", "eta", "single_dpo", "reference"]
    out += ["", "| typed set (seed) | MMRA weights | MMRA | uniform | eta | single DPO | reference "
            "| MMRA - uniform (paired) | fidelity |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        t = r["true_max_regret"]
        cells = [f"{t[n]['max_regret']:.2f} [{t[n]['max_regret_ci'][0]:.2f}, "
                 f"{t[n]['max_regret_ci'][1]:.2f}]" for n in names]
        diff = t["mmra"]["max_regret"] - t["uniform"]["max_regret"]
        out.append(f"| {r['set']} ({r['seed']}) | "
                   + ", ".join(f"{w:.2f}" for w in r["mmra_weights"]) + " | " + " | ".join(cells)
                   + f" | {_ci(diff, t['mmra']['max_regret_minus_uniform_ci'])} | "
                   + ("-" if r.get("regret_fidelity") is None else f"{r['regret_fidelity']:.2f}")
                   + " |")
    return "\n".join(out) + "\n"


def true_l_bound(R: np.ndarray, policies: list[str], own: list, k: int) -> float | None:
    """The largest true regret of MMRA solved on the true rewards of the same generations
    (in-sample: a bound on what a faithful L could reach); None unless every learned type
    is some true type's own policy."""
    from emdpo_ray.core.mmra import solve

    rows = {policies.index(o): i for i, o in enumerate(own) if o}
    if sorted(rows) != list(range(k)):
        return None
    # row j: the true type whose own policy is j, so the LP's diagonal is its own reward
    return solve(np.array([R[rows[j], :k] for j in range(k)])).max_regret


def compare(files: list[str], labels: list[str]) -> str:
    """One row per setting, typed set and seed, from several runs of this script."""
    out = ["| setting | typed set (seed) | ARI | types served (intervals apart) | own - reference, "
           "mean over types | MMRA - uniform, largest true regret [paired] | fidelity | "
           "largest true regret: MMRA, MMRA solved on the true regrets | "
           "MMRA, worst type: true reward - reference's | type policies' words in the "
           "vocabulary, generations broken |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f, label in zip(files, labels):
        for r in json.load(open(f)):
            t = r["true_max_regret"]
            diff = t["mmra"]["max_regret"] - t["uniform"]["max_regret"]
            own = [v for n, v in r["text"].items() if n.startswith("type_")]
            fid = r.get("regret_fidelity")
            R = np.asarray(r["reward"])
            mix = R[:, :r["types"]] @ np.asarray(r["mmra_weights"])
            worst = (mix - R[:, r["policies"].index("reference")]).min()
            bound = true_l_bound(R, r["policies"], r["own_policy"], r["types"])
            out.append(
                f"| {label} | {r['set']} ({r['seed']}) | {r['ari']:.3f} | {r['types_served']} of "
                f"{r['types']} ({sum(r['own_is_best_separated'])}) | "
                f"{np.mean(r['own_minus_reference']):+.2f} | "
                f"{_ci(diff, t['mmra']['max_regret_minus_uniform_ci'])} | "
                + ("-" if fid is None else f"{fid:.2f}") + f" | {t['mmra']['max_regret']:.2f}, "
                + ("-" if bound is None else f"{bound:.2f}") + f" | {worst:+.2f} | "
                f"{np.mean([v['in_vocabulary'] for v in own]):.2f}, "
                f"{np.mean([v['broken'] for v in own]):.2f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sets", nargs="+", default=SETS, choices=SETS + FAMILY_SETS)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "policies-serve-types"))
    p.add_argument("--prompts", type=int, help="held-out prompts (mmra.num_prompts, of 48)")
    p.add_argument("--samples", type=int, help="samples per prompt and policy")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, as in `emdpo-ray train --set`")
    p.add_argument("--json", default=os.path.join(REPO, "docs", "policies_serve_types.json"),
                   help="where the figures go (the plot goes beside it, .png)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the runs already trained under --out, whatever their settings, and "
                        "only evaluate them again")
    p.add_argument("--compare", nargs="+", metavar="LABEL=JSON",
                   help="print one table over earlier runs' JSON files instead of running")
    a = p.parse_args()
    if a.compare:
        labels, files = zip(*(c.split("=", 1) for c in a.compare))
        print(compare(list(files), list(labels)), end="")
        return 0
    extra = [arg for key, v in (("mmra.num_prompts", a.prompts),
                                ("mmra.samples_per_prompt", a.samples)) if v is not None
             for arg in ("--set", f"{key}={v}")]
    extra += [arg for o in a.overrides for arg in ("--set", o)]
    os.makedirs(a.out, exist_ok=True)
    results = []
    for name in a.sets:
        for seed in a.seeds:
            r = run_one(name, seed, a.out, extra, a.reuse)
            results.append(r)
            print(f"{name} seed {seed}: ARI {r['ari']:.3f}, own policy best for "
                  f"{r['types_served']}/{r['types']} types (intervals apart for "
                  f"{sum(r['own_is_best_separated'])}, paired intervals for "
                  f"{sum(r['own_beats_every_rival_paired'])}), own - reference "
                  f"{np.round(r['own_minus_reference'], 2).tolist()}, own - single DPO "
                  f"{np.round(r['own_minus_single_dpo'], 2).tolist()}; true max regret "
                  + ", ".join(f"{n} {v['max_regret']:.2f}" for n, v in r["true_max_regret"].items()),
                  flush=True)
    from emdpo_ray.utils import atomic_write_json

    from emdpo_ray.utils import atomic_write_text

    atomic_write_json(a.json, results)
    atomic_write_text(os.path.splitext(a.json)[0] + ".md", tables(results))
    plot(results, os.path.splitext(a.json)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
