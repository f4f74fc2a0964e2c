"""Speed of EM itself: `.venv/bin/python bench/em_speed.py [--quick]`.

- em_overhead_fraction: the share of an EM run's wall time that is not model compute (SFT,
  reference log-probs, M-step training and scoring);
- mstep_fixed_cost_s: per M-step after the first, everything but forward/backward and scoring;
- estep_records_per_s and estep_vs_forward_bound: scoring inside the M-step against the same
  batched forward in-process with no Ray;
- scaling_users_slope, scaling_types_slope: one EM iteration in users and in K.
"""

import argparse
import os
import tempfile
import time

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
    # all three iterations, whatever the guard would decide: this measures speed
    em = em_run(data, 3, run, ["em.max_iterations=3", "em.tol_loglik=0", "em.tol_posterior=0",
                               "em.guard_holdout=0"])
    start = em["history"][0]["timings"]
    its = [h for h in em["history"] if h["iteration"] > 0]
    steps = sum(h["timings"]["train_s"] + h["timings"]["score_s"] for h in its)
    compute = steps + start.get("sft_s", 0) + start.get("reference_s", 0)
    fixed = [h["timings"]["fit_wall_s"] - h["timings"]["train_s"] - h["timings"]["score_s"]
             for h in its]
    res["em_overhead_fraction"] = 1 - compute / em["wall"]
    res["mstep_fixed_cost_s"] = max(fixed[1:])
    notes["em_overhead_fraction"] = (
        f"of {em['wall']:.0f}s: SFT {start.get('sft_s', 0):.0f}s, reference "
        f"{start.get('reference_s', 0):.0f}s, M-step training + scoring {steps:.0f}s; the start "
        f"{start.get('init_s', 0):.0f}s (waiting for the copy's states "
        f"{start.get('init_features_wait_s', 0):.1f}s, the rest its linear mixtures); worker "
        f"group start {start.get('worker_group_start_s', 0):.1f}s; per M-step fixed cost "
        f"{[round(x, 2) for x in fixed]}s")
    res["estep_records_per_s"] = users * 8 / em["history"][-1]["timings"]["score_s"]
    res["estep_vs_forward_bound"] = res["estep_records_per_s"] / forward_bound(run, data)

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
