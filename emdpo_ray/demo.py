"""Last step of `make demo`: serve a run, send a few requests, shut down cleanly.

    python -m emdpo_ray.demo --run runs/demo/run
"""

from __future__ import annotations

import argparse
import os

import numpy as np

def main(argv: list[str] | None = None) -> int:
    import httpx
    import ray
    from ray import serve

    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.serve.api import API_KEY_ENV
    from emdpo_ray.serve.app import start
    from emdpo_ray.utils import free_port, quiet_ray_logs

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--anonymous", type=int, default=6)
    a = p.parse_args(argv)
    quiet_ray_logs()
    rd = RunDir.open(a.run).require_finished()
    url = start(a.run, "127.0.0.1", free_port())
    print(f"serving {a.run} at {url}/v1")
    known = {}
    for user, post in rd.posteriors().items():
        known.setdefault(int(np.argmax(post)), user)
    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        def ask(user: str | None, prompt: str) -> None:
            body = {"prompt": prompt, "max_tokens": 16, "seed": 0}
            if user:
                body["user"] = user
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            text = r.json()["choices"][0]["text"].replace("\n", " ")
            print(f"  user={user or '(anonymous)':<12} x-emdpo-type={r.headers['x-emdpo-type']} "
                  f"route={r.headers['x-emdpo-route']:<10} {text[:60]!r}")

        print("known users (routed to their MAP type):")
        for k in sorted(known):
            ask(known[k], "Explain rivers.")
        print("anonymous users (type drawn from the MMRA weights):")
        for _ in range(a.anonymous):
            ask(None, "Tell me about chess.")
    summary = rd.summary()
    print(f"ARI={summary['ari']}  eta={[round(x, 3) for x in summary['mixing_weights']]}  "
          f"MMRA weights={[round(x, 3) for x in rd.mmra_weights()]}")
    serve.shutdown()
    ray.shutdown()
    print("serve shut down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
