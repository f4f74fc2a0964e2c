"""Serving speed on the demo run (`make demo` first): `.venv/bin/python bench/serving.py`.

- router_overhead_ms_p50/p99: the HTTP path minus a direct handle call, A B A B;
- serve_batched_speedup: 16 concurrent requests over 3 types, batched vs one at a time;
- load_*: 300 completions of 16 tokens at 16 in flight (`--load` measures only these).
"""

import argparse
import asyncio
import statistics
import time

import numpy as np
from common import DEMO_RUN, local_ray, record, setup


def load_figures(url: str, requests: int = 300, concurrency: int = 16) -> dict:
    from emdpo_ray.serve.loadtest import run_load

    out = run_load(url, requests, concurrency, max_tokens=16)
    return {"load_p50_ms": out["p50_ms"], "load_p99_ms": out["p99_ms"],
            "load_errors": out["errors"], "load_throughput_rps": out["throughput_rps"]}


def overhead_and_batching(url: str, n: int) -> dict:
    import httpx
    from ray import serve

    from emdpo_ray.models.decoding import GenRequest
    from emdpo_ray.models.loading import load_tokenizer
    from emdpo_ray.models.scoring import prompt_token_ids
    from emdpo_ray.run.rundir import RunDir

    rd = RunDir(DEMO_RUN)
    cfg = rd.config()
    tok = load_tokenizer(rd.base_path(cfg), cfg.model)
    ids = prompt_token_ids(tok, ["Explain rivers."], 64)[0]
    client = httpx.Client(base_url=url, timeout=60)
    h = serve.get_deployment_handle("PolicyServer", app_name="emdpo")
    body = {"prompt": "Explain rivers.", "max_tokens": 1, "model": "type-0", "temperature": 0}
    for _ in range(5):
        client.post("/v1/completions", json=body)
        h.generate.remote(GenRequest(ids, 0, 1, 0.0)).result()
    http_ms, direct_ms = [], []
    for _ in range(n):  # alternate A B A B
        t = time.perf_counter()
        client.post("/v1/completions", json=body).raise_for_status()
        http_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        h.generate.remote(GenRequest(ids, 0, 1, 0.0)).result()
        direct_ms.append((time.perf_counter() - t) * 1e3)
    over = np.array(http_ms) - np.array(direct_ms)

    async def burst(method: str, reqs):
        hh = serve.get_deployment_handle("PolicyServer", app_name="emdpo")
        t = time.perf_counter()
        await asyncio.gather(*[getattr(hh, method).remote(r) for r in reqs])
        return time.perf_counter() - t

    reqs = [GenRequest(ids, i % 3, 16, 0.0) for i in range(16)]
    batched, single = [], []
    for _ in range(3):
        batched.append(asyncio.run(burst("generate", reqs)))
        single.append(asyncio.run(burst("generate_one", reqs)))
    return {"router_overhead_ms_p50": float(np.percentile(over, 50)),
            "router_overhead_ms_p99": float(np.percentile(over, 99)),
            "http_ms_p50": float(np.percentile(http_ms, 50)),
            "serve_batched_speedup": statistics.median(single) / statistics.median(batched)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer paired requests")
    p.add_argument("--load", action="store_true", help="only the load figures")
    a = p.parse_args()
    setup()
    from ray import serve

    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.serve.app import start

    if not RunDir(DEMO_RUN).is_finished():
        raise SystemExit("bench/serving.py: run `make demo` first (it trains runs/demo/run)")
    ray = local_ray()
    url = start(DEMO_RUN, "127.0.0.1", 0)
    res = {} if a.load else overhead_and_batching(url, 30 if a.quick else 100)
    res.update(load_figures(url))
    serve.shutdown()
    ray.shutdown()
    record(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
