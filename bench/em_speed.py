"""Speed of EM itself: `.venv/bin/python bench/em_speed.py [--quick]`.

- em_overhead_fraction: the share of an EM run's wall time that is not model compute;
- estep_records_per_s and estep_vs_forward_bound: scoring inside the M-step against the same
  batched forward in-process with no Ray;
- k_in_one_fit_speedup: one fit training K adapters against K concurrent one-adapter fits;
- scaling_users_slope, scaling_types_slope: one EM iteration in users and in K.
"""

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import THREADS, em_run, local_ray, make_data, record, setup, slope


def forward_bound(run: str, data: str) -> float:
    """Records/s of scoring every record under every policy with no Ray, in-process."""
    import torch

    from emdpo_ray.data.encode import encode
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.scoring import score_pairs
    from emdpo_ray.run.rundir import RunDir

    torch.set_num_threads(THREADS)
    rd = RunDir(run)
    cfg = rd.config()
    tok, bank = rd.load_bank(cfg)
    recs = load_records(data)
    enc = encode(recs, tok, cfg.data)
    k = rd.types
    pairs = np.array([(i, j) for i in range(len(recs)) for j in range(k)])
    ref = np.zeros(enc.resp_mask.shape)
    score_pairs(bank.logps, enc.arrays(), ref, 1.0, pairs[:64], torch.device("cpu"))  # warm-up
    t = time.perf_counter()
    score_pairs(bank.logps, enc.arrays(), ref, 1.0, pairs, torch.device("cpu"))
    return len(recs) / (time.perf_counter() - t)


def one_group_vs_concurrent(run: str, data: str) -> float:
    """K concurrent one-adapter fits (1 CPU each) over one fit of K adapters (THREADS CPUs)."""
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.run.rundir import RunDir, type_name
    from emdpo_ray.train.prepare import prepare_data

    rd = RunDir(run)
    cfg, k = rd.config(), rd.types
    prep = prepare_data(cfg, load_records(data), rd)
    gamma = np.exp(rd.load_log_gamma(rd.state()))[prep.enc.user_index]

    def fit(names, w, threads, tag):
        return prep.run_mstep(names=names, num_types=len(names), weights=w,
                              score_mask=np.ones_like(w, dtype=bool), seed=0, threads=threads,
                              run_name=f"{tag}-{time.time_ns()}")

    t = time.perf_counter()
    fit([type_name(j) for j in range(k)], gamma, THREADS, "group")
    one = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(lambda j: fit([type_name(j)], gamma[:, j:j + 1], 1, f"solo{j}"), range(k)))
    return (time.perf_counter() - t) / one


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    a = p.parse_args()
    setup()
    tmp = tempfile.mkdtemp(prefix="emdpo-bench-em-")
    ray = local_ray()
    res, notes = {}, {}

    users = 40 if a.quick else 90
    data = make_data(os.path.join(tmp, "em.jsonl"), users, 3, 8, 3)
    run = os.path.join(tmp, "em")
    em = em_run(data, 3, run, ["em.max_iterations=2"])
    its = [h for h in em["history"] if h["iteration"] > 0]
    compute = sum(h["timings"]["train_s"] + h["timings"]["score_s"] for h in its)
    fits = sum(h["timings"]["fit_wall_s"] for h in its)
    res["em_overhead_fraction"] = 1 - compute / em["wall"]
    notes["em_overhead_fraction"] = (
        f"of {em['wall']:.0f}s: model compute {compute:.0f}s, Ray Train fit() start/stop "
        f"{fits - compute:.0f}s, the rest init + reference + outputs")
    res["estep_records_per_s"] = users * 8 / em["history"][-1]["timings"]["score_s"]
    res["estep_vs_forward_bound"] = res["estep_records_per_s"] / forward_bound(run, data)
    res["k_in_one_fit_speedup"] = one_group_vs_concurrent(run, data)

    base_u = 20 if a.quick else 40
    t_users, t_types = [], []
    one_iter = ["em.max_iterations=1", "dpo.min_steps=1"]
    for mult in (1, 2, 4):
        d = make_data(os.path.join(tmp, f"u{mult}.jsonl"), base_u * mult, 2, 6, 3, seed=mult)
        r = em_run(d, 2, os.path.join(tmp, f"u{mult}"), one_iter)
        t_users.append(r["history"][-1]["timings"]["fit_wall_s"])
    for k in (2, 4, 8):
        d = make_data(os.path.join(tmp, f"k{k}.jsonl"), base_u * 2, min(k, 4), 6, 3, seed=k)
        r = em_run(d, k, os.path.join(tmp, f"k{k}"), one_iter)
        t_types.append(r["history"][-1]["timings"]["fit_wall_s"])
    res["scaling_users_slope"] = slope([1, 2, 4], t_users)
    res["scaling_types_slope"] = slope([2, 4, 8], t_types)
    notes["scaling"] = (f"one EM iteration (fit wall): users x1,2,4 -> "
                        f"{[round(x, 1) for x in t_users]}s; K=2,4,8 -> "
                        f"{[round(x, 1) for x in t_types]}s")
    ray.shutdown()
    record(res, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
