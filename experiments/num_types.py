"""`make num-types`: does `emdpo-ray types` find how many types there are?

    .venv/bin/python experiments/num_types.py [--seeds 0,1] [--max-types 6]
        [--runs runs/starts] [--out docs/num_types.json] [--cases FAMILY:K:FEATURES,...]

`linear` with 2, 3 and 4 true types (shares 0.6/0.4, 0.5/0.3/0.2, 0.4/0.3/0.2/0.1) on token
counts, the correct model of those types (3 also crossed with the prompt); `contextual` and
`order` with 3 (the data of `make starts`) on token counts, which cannot see them, on the
counts crossed with the prompt (`tokens_by_prompt`, `contextual`'s correct model), and on
the SFT reference's own states (the references `make starts` trained; run it first). 300
users with 10 rankings of 3 each. Per run: the K chosen, and per K the held-out
log-likelihood per ranking, its gain over K - 1 with the 95% interval, and the ARI of the
K-type split. Writes docs/num_types.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARES = {2: [0.6, 0.4], 3: [0.5, 0.3, 0.2], 4: [0.4, 0.3, 0.2, 0.1]}
CASES = [("linear", 2, "tokens"), ("linear", 3, "tokens"), ("linear", 4, "tokens"),
         ("linear", 3, "tokens_by_prompt"), ("contextual", 3, "tokens"),
         ("contextual", 3, "tokens_by_prompt"), ("contextual", 3, "reference"),
         ("order", 3, "tokens"), ("order", 3, "reference")]


def data_path(runs: str, family: str, k: int, seed: int) -> str:
    """`make starts`' data for 3 types (same generator call), else a file of its own."""
    from emdpo_ray.data import synth

    name = f"{family}-{seed}.jsonl" if k == 3 else f"{family}-k{k}-{seed}.jsonl"
    path = os.path.join(runs, name)
    if not os.path.exists(path):
        synth.write(path, *synth.generate(users=300, types=k, rankings_per_user=10, responses=3,
                                          shares=SHARES[k], seed=seed, family=family))
    return path


def table(results: list[dict]) -> str:
    rows = ["| family | true K | seed | features | K chosen | ARI at K chosen (at the true K) | "
            "held-out log-lik per ranking, K = 1, 2, ... | gain over K - 1 [95% interval] |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        by_k = {x["types"]: x for x in r["rows"]}
        gains = "; ".join(f"{x['types']}: {x['gain_per_ranking']:+.3f} [{x['gain_interval'][0]:+.3f}, "
                          f"{x['gain_interval'][1]:+.3f}]" for x in r["rows"][1:])
        rows.append(f"| {r['family']} | {r['true_types']} | {r['seed']} | {r['features']} | "
                    f"{r['chosen_types']} | {by_k[r['chosen_types']]['ari']:.2f} "
                    f"({by_k[r['true_types']]['ari']:.2f}) | "
                    + ", ".join(f"{x['heldout_loglik_per_ranking']:.3f}" for x in r["rows"])
                    + f" | {gains} |")
    return "\n".join(rows)


HEADER = """# Does `emdpo-ray types` find how many types there are?

`{cmd}` ([`experiments/num_types.py`](../experiments/num_types.py), figures in
[`{json}`]({json})). `emdpo-ray types` fits the start's linear Plackett-Luce mixture for K =
1, 2, ... without a fifth of every user's rankings, each K's first restart the previous K's
split with its worst-fitting type cut in two, and keeps growing K while one more type raises
the held-out log-likelihood per ranking by more than noise (the 95% interval of the gain,
users resampled, above 1e-3 nats: beyond rounding). 300 users with 10 rankings of 3 each;
`linear` with 2, 3 and 4 types (shares 0.6/0.4, 0.5/0.3/0.2, 0.4/0.3/0.2/0.1), `contextual`
and `order` with 3 (the data of `make starts`). Features: token counts (`tokens`, the
correct model of `linear`, blind to `order` and to what `contextual` types flip), the same
crossed with the prompt (`tokens_by_prompt`, train/start.py: the correct model of
`contextual`), or the SFT
reference's own middle-layer states pooled over three parts of each response (`reference`,
not the further-trained copy the start uses). A
random order of 3 scores -1.792 per ranking.

"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--max-types", type=int, default=6)
    p.add_argument("--runs", default=os.path.join(REPO, "runs", "starts"))
    p.add_argument("--out", default=os.path.join(REPO, "docs", "num_types.json"))
    p.add_argument("--cases", default=None, metavar="FAMILY:K:FEATURES,...",
                   help="only these of CASES, e.g. contextual:3:tokens_by_prompt")
    a = p.parse_args()
    cases = CASES if a.cases is None else [
        c for c in CASES if ":".join(map(str, c)) in a.cases.split(",")]
    warnings.filterwarnings("ignore")
    import json

    from emdpo_ray.config import load_config
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.train.num_types import types_report
    from emdpo_ray.utils import atomic_write_json, atomic_write_text

    os.makedirs(a.runs, exist_ok=True)
    results = []
    for seed in map(int, a.seeds.split(",")):
        for family, k, features in cases:
            model = None
            if features == "reference":
                model = os.path.join(a.runs, f"{family}-{seed}-reference")
                if not os.path.isdir(model):
                    raise SystemExit(f"{model} missing: run `python experiments/starts.py "
                                     f"--families {family} --seeds {seed}` first")
            records = load_records(data_path(a.runs, family, k, seed))
            rep = types_report(records, load_config(None, [f"seed={seed}"]), a.max_types, model,
                               features="tokens" if model else features)
            results.append({**rep, "family": family, "true_types": k, "seed": seed,
                            "features": features})
            print(json.dumps({x: results[-1][x] for x in ("family", "true_types", "seed",
                                                           "features", "chosen_types")}),
                  flush=True)
            atomic_write_json(a.out, results)
            cmd = shlex.join(["python", "experiments/num_types.py", *sys.argv[1:]])
            atomic_write_text(a.out[:-5] + ".md", HEADER.format(
                cmd=cmd, json=os.path.basename(a.out)) + table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
