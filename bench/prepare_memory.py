"""The driver's memory while preparing a million records: `.venv/bin/python bench/prepare_memory.py`.

100k records of the synthetic family (linear, 10 rankings of 3 per user) are written ten
times with distinct users, as ten JSONL shards in one directory: 1M records. A fresh
process then does what `emdpo-ray train` does on the driver: read and validate every shard
(all-or-nothing), index users, fingerprint the data for the reference cache, and put the
workers' record shards into the object store one at a time; then, as the worker group's
ranks do, one Ray process per shard encodes its records into token arrays (those arrays
never pass through the driver). The driver's private memory (USS, sampled every 20 ms,
through the encoding too) and peak RSS are recorded; RSS also counts the object-store pages
the process wrote into, which are the object store's budget (`object_store_memory`), not
the driver's.

- prepare_1m_driver_peak_uss_gib: peak private memory of the driver (target < 4 GiB)
- prepare_1m_driver_peak_rss_gib, prepare_1m_s: peak RSS, and the wall time
- prepare_1m_encoder_peak_rss_gib: the largest peak RSS of a shard's encoding process
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import record, setup

CHILD = r"""
import json, os, resource, sys, threading, time
import psutil

peak = [0]
stop = threading.Event()

def sample():
    p = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], p.memory_full_info().uss)
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
import ray
from emdpo_ray.config import Config
from emdpo_ray.data.encode import fingerprint, index_records
from emdpo_ray.data.sources import load_records
from emdpo_ray.models.loading import load_tokenizer
from emdpo_ray.train.prepare import ship_shards

data, tok_dir, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = Config()
records = load_records(data)
tokenizer = load_tokenizer(tok_dir)
index = index_records(records)
fingerprint(records, tok_dir, tokenizer, cfg.data)
ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
refs, sizes = ship_shards(records, tokenizer, cfg.data, index.resp_mask.shape[1], workers,
                          ray.put)

@ray.remote
def encode_shard(shard):
    enc = shard.encode()
    enc.arrays()
    return list(enc.input_ids.shape), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

shards = ray.get([encode_shard.remote(r) for r in refs])
stop.set()
print(json.dumps({"records": len(records), "shapes": [s for s, _ in shards],
                  "encoder_rss_gib": max(r for _, r in shards),
                  "uss_gib": peak[0] / 2 ** 30,
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                  "wall_s": time.perf_counter() - t}))
ray.shutdown()
"""


def write_million(out: str, base: int, copies: int) -> int:
    from emdpo_ray.data import synth

    recs, _ = synth.generate(users=base // 10, types=3, rankings_per_user=10, responses=3,
                             seed=0)
    for c in range(copies):
        with open(os.path.join(out, f"part-{c:03d}.jsonl"), "w") as f:
            f.writelines(json.dumps({**r, "user_id": f"c{c}-{r['user_id']}"}) + "\n"
                         for r in recs)
    return len(recs) * copies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", type=int, default=100_000, help="records generated once")
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    setup()
    from emdpo_ray.config import Config
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="emdpo-bench-mem-") as tmp:
        data = os.path.join(tmp, "shards")
        os.makedirs(data)
        n = write_million(data, a.base, a.copies)
        sample = load_records(os.path.join(data, "part-000.jsonl"))
        tok = os.path.join(tmp, "base")
        build_tiny_model([t for r in sample for t in (r.prompt, *r.responses)], tok,
                         Config().model, seed=0)
        out = subprocess.run([sys.executable, "-c", CHILD, data, tok, str(a.workers)],
                             check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
    assert res["records"] == n
    record({"prepare_1m_driver_peak_uss_gib": res["uss_gib"],
            "prepare_1m_driver_peak_rss_gib": res["rss_gib"], "prepare_1m_s": res["wall_s"],
            "prepare_1m_encoder_peak_rss_gib": res["encoder_rss_gib"]},
           {"prepare_memory": f"{n} records in {a.copies} JSONL shards, {a.workers} worker "
                              f"shards encoded where they land (token arrays {res['shapes']}): "
                              f"driver peak private memory {res['uss_gib']:.2f} GiB (RSS "
                              f"{res['rss_gib']:.2f} GiB with the object-store pages it wrote), "
                              f"each encoder's peak RSS at most {res['encoder_rss_gib']:.2f} "
                              f"GiB, {res['wall_s']:.0f}s"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
