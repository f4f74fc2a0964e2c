"""The start's linear mixtures in turn and side by side: `.venv/bin/python bench/start_speed.py`.

The `auto` start (train/start.py) fits five candidate feature sets, each from
`em.init_restarts` starts down an L2 path, then fresh restarts on every ranking and
split-and-merge moves: many independent L-BFGS fits on the driver, which now run side by
side on its CPUs (linear_mixture.parallel_map). Timed alone, on the driver, with no Ray:

- start_parallel_speedup: the start of `make starts`' size (300 users x 10 rankings of 3,
  `order`) in turn (one thread) over side by side (every usable CPU), medians of A B A B;
- start_parallel_speedup_small: the same at the size of em_speed.py's run (90 users x 8
  rankings, the linear family), where each objective is a few small arrays and Python's
  own work, which threads do not share, weighs more.

The reference's features are drawn at random in its shapes (3 x 48 pooled states per
response, a 48-dim prompt state): what a fit costs depends on the shapes, and the workers
that compute the real ones are not started here. Both sides must choose the same start.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from common import record, setup


def timed_starts(family: str, users: int, per_user: int, pairs: int) -> tuple[float, dict]:
    from emdpo_ray.config import Config
    from emdpo_ray.data import synth
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.features import Representations
    from emdpo_ray.train import linear_mixture, start

    path = os.path.join(tempfile.mkdtemp(prefix="emdpo-bench-start-"), "d.jsonl")
    synth.write(path, *synth.generate(users=users, types=3, rankings_per_user=per_user,
                                      responses=3, seed=0, family=family,
                                      shares=[0.5, 0.3, 0.2]))
    recs = load_records(path)
    ids = {u: i for i, u in enumerate(sorted({r.user_id for r in recs}))}
    ui = np.array([ids[r.user_id] for r in recs])
    rng = np.random.default_rng(0)
    rep = Representations(rng.normal(size=(len(recs), 3, 144)).astype(np.float32),
                          rng.normal(size=(len(recs), 48)).astype(np.float32))
    cfg, usable = Config(), linear_mixture.usable_cpus
    em = cfg.em
    cpus = usable()
    times: dict[int, list[float]] = {1: [], cpus: []}
    chosen = {}
    try:
        for _ in range(pairs):
            for n in (1, cpus):   # A B A B: the start's threads are usable_cpus()
                linear_mixture.usable_cpus = lambda n=n: n
                t = time.perf_counter()
                g = start.kmeans_init(recs, ui, len(ids), 3, 0, em.init_smoothing,
                                      em.init_refine_iterations, "auto", lambda: rep, {}, None,
                                      em.init_restarts, cfg.start_l2s, em.init_split_merge)
                times[n].append(time.perf_counter() - t)
                chosen.setdefault(n, g)
    finally:
        linear_mixture.usable_cpus = usable
    if not np.array_equal(chosen[1], chosen[cpus]):
        raise SystemExit("bench/start_speed.py: the start side by side differs from in turn")
    med = {n: statistics.median(v) for n, v in times.items()}
    return med[1] / med[cpus], {"cpus": cpus, "in_turn_s": round(med[1], 2),
                                "side_by_side_s": round(med[cpus], 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="one pair per size")
    a = p.parse_args()
    setup()
    pairs = 1 if a.quick else 3
    big, big_note = timed_starts("order", 300, 10, pairs)
    small, small_note = timed_starts("linear", 90, 8, pairs)
    record({"start_parallel_speedup": big, "start_parallel_speedup_small": small},
           {"start_speed": f"the auto start on {big_note['cpus']} CPUs, medians of "
                           f"{pairs} A B pairs: 300 users {big_note['in_turn_s']}s in turn, "
                           f"{big_note['side_by_side_s']}s side by side; 90 users "
                           f"{small_note['in_turn_s']}s, {small_note['side_by_side_s']}s"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
