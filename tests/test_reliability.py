"""Serving under faults, load and fuzzed requests: Ray Serve over real HTTP on a local Ray.
Each test adds its figures to the session report (runs/reliability/report.json);
`make test-heavy` runs the larger loops (marker `heavy`)."""

import asyncio
import os
import shutil
import signal
import time

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import KEY


def _replica_pids(name: str, app: str = "emdpo") -> list[int]:
    """Ray names a Serve replica's process `ray::ServeReplica:<app>:<deployment>`."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{app}:{name}" in cmd:
            out.append(p.info["pid"])
    return out


async def _fire_through_kill(url: str, pid: int, body: dict, clients: int = 16,
                             timeout: float = 60) -> list:
    """Closed-loop load from `clients` concurrent clients; SIGKILL `pid` once answers are
    flowing, so requests are in flight at the kill whatever the generation length (a
    fixed sleep raced short generations that all ended before it). Each client stops
    sending after the kill; every request's response (or timeout) is returned."""
    killed = asyncio.Event()
    answered = asyncio.Event()
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {KEY}"}) as c:
        async def client(i):
            seed = i
            while not killed.is_set():
                try:
                    r = await c.post("/v1/completions", json={**body, "seed": seed})
                except httpx.TimeoutException as e:
                    r = e
                results.append(r)
                answered.set()
                seed += clients

        async def killer():
            await answered.wait()
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            killed.set()

        await asyncio.gather(killer(), *(client(i) for i in range(clients)))
    return results


def test_policy_replica_killed_mid_flight(server, reliability_report):
    """SIGKILL the policy replica with requests in flight: each request gets its answer
    (the router retries on the replacement) or a 503 with Retry-After; none hangs; Serve
    brings a new replica up."""
    url, client, _ = server
    assert client.post("/v1/completions", json={"prompt": "warm", "max_tokens": 2}).status_code == 200
    before = _replica_pids("PolicyServer")
    assert len(before) == 1, before
    t0 = time.perf_counter()
    results = asyncio.run(_fire_through_kill(url, before[0], {"prompt": "Tell me",
                                                              "max_tokens": 24}))
    n = len(results)
    wall = time.perf_counter() - t0
    hung = [r for r in results if isinstance(r, Exception)]
    assert not hung, hung                      # nothing waited out the client's timeout
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 503}, codes
    for r in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "service_unavailable"
    deadline = time.time() + 90
    while time.time() < deadline:
        r = client.post("/v1/completions", json={"prompt": "back?", "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    after = _replica_pids("PolicyServer")
    assert after and after[0] != before[0]
    retried = sum(int(r.headers.get("x-emdpo-attempts", 1)) > 1 for r in results)
    assert retried or codes.count(503), "the kill hit no request in flight"
    reliability_report("replica_kill", {"requests_sent": n, "requests_failed": codes.count(503),
                                        "requests_hung": 0, "answered_after_retry": retried,
                                        "wall_s": round(wall, 2)})


def _load(server, n, c, report, name):
    from emdpo_ray.serve.loadtest import run_load

    url, _, _ = server
    res = run_load(url, n, c, max_tokens=16, api_key=KEY)
    assert res["errors"] == 0, res["error_samples"]
    assert len(res["statuses"]) == n
    res.pop("statuses")
    report(name, res)
    return res


def test_load_small(server, reliability_report):
    _load(server, 64, 16, reliability_report, "load_small")


@pytest.mark.heavy
def test_load_300_at_16(server, reliability_report):
    _load(server, 300, 16, reliability_report, "load")


# ---- the HTTP API under schemathesis: generated requests from the served OpenAPI schema ----



def _fuzz_api(url: str, examples: int, report) -> dict:
    """Every operation of the served OpenAPI schema, with schemathesis-generated requests."""
    headers = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json", headers=headers).json())
    counts: dict[str, dict] = {}
    for op in (r.ok() for r in schema.get_all_operations()):
        seen = counts.setdefault(f"{op.method.upper()} {op.path}", {})

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(case=op.as_strategy())
        def check(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                # keep decoding short; the max_tokens limit has its own test
                case.body["max_tokens"] = min(case.body["max_tokens"], 8)
            r = case.call(base_url=url, headers=headers, timeout=60)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (case.method, case.formatted_path, case.body, r.text[:300])

        check()
    assert len(counts) >= 6, counts
    report("api_fuzz", {"requests": sum(sum(c.values()) for c in counts.values()),
                        "by_operation": {k: {str(s): n for s, n in v.items()}
                                         for k, v in counts.items()}})
    return counts


def test_api_fuzz_never_answers_5xx(server, reliability_report):
    _fuzz_api(server[0], 15, reliability_report)


@pytest.mark.heavy
def test_api_fuzz_heavy(server, reliability_report):
    _fuzz_api(server[0], 150, reliability_report)


def test_dead_replica_without_retries_gets_503_with_retry_after(server, tmp_path,
                                                                 reliability_report):
    """serve.retries=0: requests on a killed replica fail fast and clearly, none hangs."""
    import yaml
    from ray import serve

    from emdpo_ray.serving import app_builder

    url, client, src = server
    run = tmp_path / "strict"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("ray_results"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["serve"]["retries"] = 0
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    serve.run(app_builder({"run_dir": str(run)}), name="strict", route_prefix="/strict")
    try:
        pids = [p for p in _replica_pids("PolicyServer", app="strict")]
        assert len(pids) == 1

        async def stream():
            async with httpx.AsyncClient(base_url=f"{url}/strict", timeout=60,
                                         headers={"Authorization": f"Bearer {KEY}"}) as c:
                body = {"prompt": "Tell me", "max_tokens": 200, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    return r.status_code, [line async for line in r.aiter_lines() if line]

        async def scenario():
            streamed = asyncio.ensure_future(stream())
            results = await _fire_through_kill(f"{url}/strict", pids[0],
                                               {"prompt": "Tell me", "max_tokens": 24})
            return results, await streamed

        results, (stream_status, events) = asyncio.run(scenario())
        # a stream cut by the kill says so in an error event, then ends; it never hangs
        assert stream_status == 200 and events[-1] == "data: [DONE]", events[-3:]
        if not any('"finish_reason": "' in e for e in events):
            assert '"service_unavailable"' in events[-2], events[-3:]
        assert not [r for r in results if isinstance(r, Exception)]
        n = len(results)
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 503} and 503 in codes, codes
        for r in results:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
                assert "replica died" in r.json()["error"]["message"]
        reliability_report("replica_kill_no_retries", {"requests_sent": n,
                                                       "requests_failed_503": codes.count(503),
                                                       "requests_hung": 0})
    finally:
        serve.delete("strict")
