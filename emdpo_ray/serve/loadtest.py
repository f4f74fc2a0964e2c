"""Closed-loop HTTP load against a served run: N requests, C in flight, latency percentiles.

    python -m emdpo_ray.serve.loadtest --url http://127.0.0.1:8000 --requests 300 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import numpy as np


async def _run(url: str, n: int, concurrency: int, body: dict, headers: dict, timeout: float):
    import httpx

    lat, statuses, errors = [], [], []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(client):
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t = time.perf_counter()
            try:
                r = await client.post("/v1/completions", json={**body, "seed": i})
                statuses.append(r.status_code)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except Exception as e:  # a timeout or a dropped connection is an error, not a crash
                statuses.append(None)
                errors.append(f"{type(e).__name__}: {e}")
            lat.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                                 limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {"requests": n, "concurrency": concurrency, "errors": len(errors),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_rps": n / wall, "statuses": statuses, "error_samples": errors[:5]}


def run_load(url: str, requests: int = 300, concurrency: int = 16, *, prompt: str = "Tell me",
             max_tokens: int = 16, api_key: str | None = None, timeout: float = 120.0) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0}
    return asyncio.run(_run(url, requests, concurrency, body, headers, timeout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="Tell me")
    a = ap.parse_args()
    out = run_load(a.url, a.requests, a.concurrency, prompt=a.prompt, max_tokens=a.max_tokens,
                   api_key=os.environ.get("EMDPO_API_KEY"))
    out.pop("statuses")
    print(json.dumps(out, indent=2))
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
