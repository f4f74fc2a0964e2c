"""`make start-cost`: what the start's restarts cost and what they buy.

    .venv/bin/python experiments/start_cost.py [--families linear,contextual,order,lead_topic]
        [--types 3] [--seeds 0,1,2] [--restarts 8,4,2] [--layers "middle,embeddings;middle"]
        [--features auto,language] [--l2s "default;1,0.1,0.01"] [--out docs/start_cost.json]

The start alone (`em.init=kmeans`; at the default `em.init_features=auto`, five candidate
feature sets, each a linear Plackett-Luce mixture from `em.init_restarts` starts walked down the L2
path, the chosen one refitted on every record, then split-and-merge), on the data and SFT
references of `make starts` (built here when missing; 300 users, 10 rankings of 3, shares
0.5/0.3/0.2; with `--types 4`, `make num-types`' shares 0.4/0.3/0.2/0.1), once per number
of restarts. The copy's states and the candidates' features are computed once per
family and seed, before any timing, so `seconds` is the start's fits alone, in one process
with nothing else running (in a run the driver's fits share the machine with the workers
training the copy). Per run: the feature set and L2 chosen, ARI of the start against the true
types, its log-likelihood on all rankings before split-and-merge, and its chosen
candidate's held-out log-likelihood per ranking. Each setting against the first of
`--restarts` on the same family and seed: paired differences with 95% t-intervals over
seeds. `--layers`: settings of em.init_layers (`;` between settings), the layers whose
pooled states the copy's features put side by side, each run at every `--restarts`.
`--features`: settings of em.init_features (`,` between them), e.g. `language`, the start
on the language model's features alone (the copy's states, and the same crossed with the
prompt's state), each at its own default L2 path (Config.start_l2s) unless `--l2s` sets
others (`;` between paths, `default` for that one), each run at every `--restarts`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def one(family: str, k: int, seed: int, runs: str, restarts: list[int],
        layers: list[str] = ("middle,embeddings",), features: list[str] = ("auto",),
        l2s: list[str | None] = (None,)) -> dict:
    import torch
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.config import load_config
    from emdpo_ray.data.encode import encode
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.features import reference_representations, sentence_end_ids
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.train import start as st
    from num_types import data_path
    from start_features import prepare, trained_further

    data = data_path(runs, family, k, seed)   # make starts' file for 3 types
    ref = data[:-len(".jsonl")] + "-reference"
    if not (os.path.exists(data) and os.path.isdir(ref)):
        prepare(data, ref, family, seed)
    cfg = load_config(None, [f"seed={seed}"])
    records, meta = load_records(data), json.load(open(data + ".meta.json"))
    tok, model = load_tokenizer(ref, cfg.model), load_base(ref, cfg.model).eval()
    enc = encode(records, tok, cfg.data)
    ui, num_users = enc.user_index, len(enc.users)
    truth = np.zeros(num_users, int)
    truth[ui] = [r.true_type for r in records]
    assert len(meta["shares"]) == k, data
    # the start's copy: the reference trained further, its states pooled by sentence
    copy = trained_further(model, enc.arrays(), cfg.start_sft_passes, seed)
    held = st.heldout_records(ui, cfg.em.guard_holdout, seed)
    out = {"family": family, "seed": seed, "types": k, "runs": []}
    for lay in layers:
        sets = [f"seed={seed}", f"em.init_layers=[{lay}]"]
        reps = reference_representations(copy, enc.arrays(), torch.device("cpu"),
                                         layers=load_config(None, sets).start_layers,
                                         end_ids=sentence_end_ids(tok))
        for feat in features:
            cands, mask = st.feature_candidates(feat, records, ui, num_users, lambda: reps)
            for make in cands.values():   # built (and cached) before any timing
                make()
            for r, path in itertools.product(restarts, l2s):
                c = load_config(None, [*sets, f"em.init_restarts={r}", f"em.init_features={feat}",
                                       *([f"em.init_l2=[{path}]"] if path else [])])
                info: dict = {}
                t = time.perf_counter()
                gamma = st.initial_gamma(c, k, records, ui, num_users, info=info, held=held,
                                         candidates=(cands, mask))
                secs = time.perf_counter() - t
                row = {"layers": lay, "init_features": feat, "restarts": r, "seconds": round(secs, 2),
                       "features": info["features"], "l2": info["l2"],
                       "ari": round(float(adjusted_rand_score(truth, gamma.argmax(1))), 3),
                       "loglik": round(max(info["final_logliks"].values()), 1),
                       "heldout_chosen": round(info["heldout_loglik_chosen"], 4),
                       "split_merge_moves": len(info["split_merge"]),
                       **({"init_l2": path} if path else {})}
                print(family, seed, row, flush=True)
                out["runs"].append(row)
    return out


def setting(r: dict) -> str:
    """A run's settings: its restarts, and its layers and candidates where a run names them."""
    return (f"{r['restarts']}" + (f", layers {r['layers']}" if "layers" in r else "")
            + (f", {r['init_features']}" if r.get("init_features", "auto") != "auto" else "")
            + (f", L2 path {r['init_l2']}" if "init_l2" in r else ""))


def table(results: list[dict]) -> str:
    rows = ["| family | types | seed | restarts, layers | features, L2 | ARI | log-lik, all rankings, "
            "before split-and-merge | held-out log-lik per ranking (chosen) | split-merge moves | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        for r in res["runs"]:
            rows.append(f"| {res['family']} | {res['types']} | {res['seed']} | {setting(r)} | "
                        f"{r['features']}, {r['l2']:g} | {r['ari']:.2f} | {r['loglik']:.0f} | "
                        f"{r['heldout_chosen']:.3f} | {r['split_merge_moves']} | "
                        f"{r['seconds']:.1f} |")
    return "\n".join(rows)


def paired(results: list[dict]) -> str:
    """Per family and setting: mean ARI and seconds, and each minus the first setting's on
    the same seeds (95% t-interval over seeds)."""
    from emdpo_ray.report.seeds import t_interval

    def fmt(v: list[float], digits: int) -> str:
        return f"{v[0]:+.{digits}f} [{v[1]:+.{digits}f}, {v[2]:+.{digits}f}]"

    rows = ["| family | types | restarts, layers | seeds | ARI | minus the first | same features chosen "
            "| seconds | minus the first |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for family, k in dict.fromkeys((r["family"], r["types"]) for r in results):
        runs = [r["runs"] for r in results if (r["family"], r["types"]) == (family, k)]
        if len(runs) < 2 or len(runs[0]) < 2:   # one seed or one setting: nothing to pair
            continue
        for i, run in enumerate(runs[0]):
            ari = [rs[i]["ari"] for rs in runs]
            d_ari = [rs[i]["ari"] - rs[0]["ari"] for rs in runs]
            secs = [rs[i]["seconds"] for rs in runs]
            d_secs = [rs[i]["seconds"] - rs[0]["seconds"] for rs in runs]
            same = sum(rs[i]["features"] == rs[0]["features"] for rs in runs)
            rows.append(f"| {family} | {k} | {setting(run)} | {len(runs)} | "
                        f"{np.mean(ari):.3f} | {fmt(t_interval(d_ari), 3)} | {same} of "
                        f"{len(runs)} | {np.mean(secs):.1f} | {fmt(t_interval(d_secs), 1)} |")
    if len(rows) == 2:
        return ""
    return ("\n\nEach setting against the first on the same family and seed (mean, "
            "paired difference [95% t-interval over seeds]):\n\n" + "\n".join(rows))


def write(out: str, results: list[dict], command: str) -> None:
    from emdpo_ray.utils import atomic_write_json, atomic_write_text

    atomic_write_json(out, results)
    name = os.path.basename(out)
    runs = [r for res in results for r in res["runs"]]
    what = ("layers" if len({r.get("layers") for r in runs}) > 1 else "L2 paths"
            if len({r.get("init_l2") for r in runs}) > 1 else "features"
            if {r.get("init_features", "auto") for r in runs} != {"auto"} else "restarts")
    atomic_write_text(out[:-5] + ".md", (
        f"# What the start's {what} cost and buy\n\n"
        f"`{command}` ([`experiments/start_cost.py`](../experiments/start_cost.py), figures in "
        f"[`{name}`]({name})). " + " ".join(__doc__.split("\n\n")[2].split()) + "\n\n"
        + table(results) + paired(results) + "\n"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--families", default="linear,contextual,order,lead_topic")
    p.add_argument("--types", default="3", help="numbers of types, each a data set per seed")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--restarts", default="8,4,2",
                   help="em.init_restarts settings, the first the one the others are "
                        "compared with")
    p.add_argument("--layers", default="middle,embeddings",
                   help="em.init_layers settings, ';' between them (each run at every "
                        "--restarts)")
    p.add_argument("--features", default="auto",
                   help="em.init_features settings, ',' between them (each run at every "
                        "--layers and --restarts)")
    p.add_argument("--l2s", default="default",
                   help="em.init_l2 settings, ';' between them, each a path ('default': "
                        "Config.start_l2s of its features; each run at every --restarts)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "start_cost.json"))
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    runs = os.path.join(REPO, "runs", "starts")
    restarts = [int(r) for r in a.restarts.split(",")]
    command = shlex.join(["python", "experiments/start_cost.py", *sys.argv[1:]])
    results = []
    for family in a.families.split(","):
        for k in map(int, a.types.split(",")):
            for seed in map(int, a.seeds.split(",")):
                results.append(one(family, k, seed, runs, restarts, a.layers.split(";"),
                                   a.features.split(","),
                                   [None if x == "default" else x for x in a.l2s.split(";")]))
                write(a.out, results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
