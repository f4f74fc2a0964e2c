"""Last step of `make demo`: what each type's policy writes, then serve the run, send a few
requests and shut down cleanly.

    python -m emdpo_ray.demo --run runs/demo/run
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def show_generations(rd, console) -> None:
    """For each true type: one held-out prompt, every policy's sample, and what that type's
    true reward makes of it (from MMRA's samples and `emdpo-ray eval`)."""
    from rich.table import Table

    from emdpo_ray.data import synth
    from emdpo_ray.report import tables
    from emdpo_ray.utils import read_json

    ev, samples = rd.eval(), rd.mmra_samples()
    meta_file = synth.meta_path(rd.data_path)
    if not ev or "generations" not in ev or not samples or not os.path.exists(meta_file):
        console.print("(no synthetic true rewards: skipping the per-type generations)")
        return
    meta, gen = read_json(meta_file), ev["generations"]
    prompt = samples[0]["prompt"]
    first = {}
    for s in samples:
        if s["prompt"] == prompt:
            first.setdefault(s["policy"], s["text"])
    for t, own in enumerate(gen["own_policy"]):
        tab = Table(title=f"True type {t} (own policy: {own}) on the held-out prompt {prompt!r}",
                    title_justify="left", show_lines=False)
        tab.add_column("policy")
        tab.add_column(f"true reward for type {t}", justify="right")
        tab.add_column("generation")
        for name in gen["policies"]:
            if name not in first:
                continue
            text = first[name]
            r = float(synth.true_rewards(meta, [prompt], [text])[t, 0])
            mark = " (own)" if name == own else ""
            tab.add_row(name + mark, f"{r:+.2f}", text.replace("\n", " / ")[:110])
        console.print(tab)
    for tab in tables.evaluation(ev)[1:2]:
        console.print(tab)


def main(argv: list[str] | None = None) -> int:
    import httpx
    import ray
    from ray import serve
    from rich.console import Console

    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.serve.api import API_KEY_ENV
    from emdpo_ray.serve.app import start
    from emdpo_ray.utils import free_port, quiet_ray_logs

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--anonymous", type=int, default=6)
    a = p.parse_args(argv)
    quiet_ray_logs()
    console = Console(width=140)
    rd = RunDir.open(a.run).require_finished()
    show_generations(rd, console)
    url = start(a.run, "127.0.0.1", free_port())
    print(f"\nserving {a.run} at {url}/v1")
    known = {}
    for user, post in rd.posteriors().items():
        known.setdefault(int(np.argmax(post)), user)
    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        def ask(user: str | None, prompt: str) -> None:
            body = {"prompt": prompt, "max_tokens": 24, "seed": 0}
            if user:
                body["user"] = user
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            text = r.json()["choices"][0]["text"].replace("\n", " / ")
            print(f"  user={user or '(anonymous)':<12} x-emdpo-type={r.headers['x-emdpo-type']} "
                  f"route={r.headers['x-emdpo-route']:<10} {text[:80]!r}")

        print("known users (routed to their MAP type):")
        for k in sorted(known):
            ask(known[k], "Explain owls.")
        print("anonymous users (type drawn from the MMRA weights):")
        for _ in range(a.anonymous):
            ask(None, "Tell me about honey.")
    summary = rd.summary()
    print(f"ARI={summary['ari']:.3f} (1 = every user's type recovered)  "
          f"eta={[round(x, 3) for x in summary['mixing_weights']]}  "
          f"MMRA weights={[round(x, 3) for x in rd.mmra_weights()]}")
    serve.shutdown()
    ray.shutdown()
    print("serve shut down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
