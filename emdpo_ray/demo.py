"""Last step of `make demo`: what each type's policy writes, then serve the run, send a few
requests and shut down cleanly.

    python -m emdpo_ray.demo --run runs/demo/run
"""

from __future__ import annotations

import argparse
import os

import numpy as np

# Nucleus sampling for the served examples: the tiny model's long tail holds stray byte tokens
# (half a character, a control byte) that full sampling draws now and then.
TOP_P = 0.9


def typical(rewards: np.ndarray, policy: np.ndarray, names: list[str]) -> dict[str, int]:
    """Per policy: the index of its sample whose true rewards (a row of `rewards` [S, T])
    are nearest the policy's mean over all its samples: one generation shown for a policy
    reads as what it usually writes, neither its best nor its worst."""
    out = {}
    for j, name in enumerate(names):
        idx = np.flatnonzero(policy == j)
        if len(idx):
            d = np.linalg.norm(rewards[idx] - rewards[idx].mean(0), axis=1)
            out[name] = int(idx[np.argmin(d)])
    return out


def printable(text: str) -> str:
    """A generation on one line as a person reads it: line breaks as ' / ', any other control
    character or undecodable byte (U+FFFD) as '?'."""
    text = text.strip().replace("\n", " / ")
    return "".join("?" if ch == "\ufffd" or not ch.isprintable() else ch for ch in text)


def show_generations(rd, console) -> None:
    """One typical generation of every policy on the held-out prompts (MMRA's samples),
    scored by every true type's reward (the mean reward matrix is `emdpo-ray eval`'s, printed
    just before by `make demo`)."""
    from rich.markup import escape
    from rich.table import Table

    from emdpo_ray.data import synth
    from emdpo_ray.utils import read_json

    ev, samples = rd.eval(), rd.mmra_samples()
    meta_file = synth.meta_path(rd.data_path)
    if not ev or "generations" not in ev or not samples or not os.path.exists(meta_file):
        console.print("(no synthetic true rewards: skipping the per-type generations)")
        return
    meta, gen = read_json(meta_file), ev["generations"]
    names = [n for n in gen["policies"] if any(s["policy"] == n for s in samples)]
    keep = [s for s in samples if s["policy"] in names]
    rewards = synth.true_rewards(meta, [s["prompt"] for s in keep], [s["text"] for s in keep]).T
    pick = typical(rewards, np.array([names.index(s["policy"]) for s in keep]), names)
    owner = {p: t for t, p in enumerate(gen["own_policy"]) if p}
    tab = Table(title=("What each policy writes on held-out prompts: a typical sample (its true "
                       "rewards nearest the policy's mean), scored by every true type; bold = "
                       "the type whose own policy it is"), title_justify="left", show_lines=True)
    tab.add_column("policy")
    tab.add_column("prompt -> generation", ratio=1)
    for t in range(rewards.shape[1]):
        tab.add_column(f"type {t}", justify="right")
    for name in names:
        i = pick[name]
        label = name + (f"\n(true type {owner[name]})" if name in owner else "")
        cells = [f"[bold]{r:+.1f}[/bold]" if owner.get(name) == t else f"{r:+.1f}"
                 for t, r in enumerate(rewards[i])]
        text = keep[i]["text"].strip().replace("\n", " / ") or "(empty)"
        tab.add_row(label, escape(f"{keep[i]['prompt']} -> {text[:160]}"), *cells)
    console.print(tab)
    console.print("what each true type wants: " + "   ".join(
        f"type {t}: {synth.describe_type(meta, t)}" for t in range(rewards.shape[1])))


def main(argv: list[str] | None = None) -> int:
    import httpx
    import ray
    from ray import serve
    from rich.console import Console

    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.serve.api import API_KEY_ENV
    from emdpo_ray.serve.app import start
    from emdpo_ray.utils import quiet_ray_logs

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--anonymous", type=int, default=6)
    a = p.parse_args(argv)
    quiet_ray_logs()
    console = Console(width=140)
    rd = RunDir.open(a.run).require_finished()
    show_generations(rd, console)
    url = start(a.run, "127.0.0.1", 0)
    print(f"\nserving {a.run} at {url}/v1")
    known = {}
    for user, post in rd.posteriors().items():
        known.setdefault(int(np.argmax(post)), user)
    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        def ask(user: str | None, prompt: str, seed: int) -> None:
            # one seed per request: the same seed would draw every policy's text from the
            # same random stream, and policies that differ little would look alike
            body = {"prompt": prompt, "max_tokens": 40, "seed": seed, "top_p": TOP_P}
            if user:
                body["user"] = user
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            text = printable(r.json()["choices"][0]["text"])
            print(f"  user={user or '(anonymous)':<12} x-emdpo-type={r.headers['x-emdpo-type']} "
                  f"route={r.headers['x-emdpo-route']:<10} {prompt} -> {text[:100]}")

        print(f"answers sampled at top_p {TOP_P}; known users (routed to their MAP type):")
        for k in sorted(known):
            ask(known[k], "Explain owls.", k)
        print("anonymous users (type drawn from the MMRA weights):")
        for i in range(a.anonymous):
            ask(None, "Tell me about honey.", 100 + i)
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
