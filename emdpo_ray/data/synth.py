"""Synthetic typed users: the project's own benchmark generator.

    emdpo-ray synth --out data.jsonl --users 120 --types 3 --rankings-per-user 8 --responses 3

Each type is a reward function over text features of a response (length, formality,
hedging, lists, ...). A user's rankings are Plackett-Luce samples (Gumbel-max) from their
type's reward. Every record carries `true_type`; the reward functions go to a sidecar
`<out>.meta.json` so evaluation can score any text under the true rewards.
"""

from __future__ import annotations

import json
import re

import numpy as np

from emdpo_ray.utils import atomic_write_text

TOPICS = [
    "rivers", "volcanoes", "batteries", "bread", "chess", "tides", "bees", "glass", "clouds",
    "bridges", "coffee", "maps", "magnets", "forests", "trains", "music", "salt", "stars",
    "paper", "rain", "gardens", "copper", "ice", "wind",
]
OPENERS = ["Explain", "Tell me about", "Describe", "What should I know about"]
# Topics that never appear in training: prompts for MMRA's L and generation-level evaluation.
HELDOUT_TOPICS = ["lamps", "honey", "sand", "snow", "kites", "clocks", "boats", "cheese",
                  "lakes", "owls", "tea", "rope"]
WORDS = {
    "formal": ["therefore", "furthermore", "consequently", "regarding", "accordingly"],
    "casual": ["yeah", "cool", "gonna", "stuff", "awesome"],
    "hedge": ["maybe", "perhaps", "possibly", "arguably"],
    "direct": ["definitely", "clearly", "certainly", "always"],
    "polite": ["please", "thanks", "kindly"],
}
FILLER = ["the", "is", "a", "of", "and", "it", "in", "how", "works", "part", "made", "many",
          "people", "use", "every", "day", "known", "for", "its", "simple", "form"]
FEATURES = ["length", "formal", "casual", "hedge", "direct", "polite", "list"]

# Canonical type preferences over FEATURES; further types get seeded random directions.
CANONICAL = np.array([
    [-1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0],   # concise and formal
    [1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0],    # detailed and casual
    [0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 1.0],    # hedged lists
    [0.0, 0.0, 0.0, -1.0, 1.0, 1.0, -1.0],   # direct, polite prose
])
_WORD_RE = re.compile(r"[a-z]+")


def text_features(text: str) -> np.ndarray:
    """Feature vector of a response (FEATURES order); works on any text, generated or not."""
    words = _WORD_RE.findall(text.lower())
    f = [len(words) / 10.0]
    for style in ["formal", "casual", "hedge", "direct", "polite"]:
        f.append(float(sum(w in WORDS[style] for w in words)))
    f.append(float(sum(line.lstrip().startswith("-") for line in text.split("\n"))))
    return np.array(f)


def type_rewards(theta: np.ndarray, scale: float, texts: list[str]) -> np.ndarray:
    """True rewards [K, len(texts)] of texts under every type."""
    feats = np.stack([text_features(t) for t in texts])
    return scale * theta @ feats.T


def _response(rng: np.random.Generator, topic: str) -> str:
    n_sent = int(rng.integers(1, 5))
    rates = {s: rng.uniform(0, 0.9) for s in WORDS}
    as_list = rng.random() < 0.35
    sents = []
    for _ in range(n_sent):
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 7))))
        words.insert(int(rng.integers(0, len(words) + 1)), topic)
        for style, p in rates.items():
            if rng.random() < p:
                words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(WORDS[style])))
        s = " ".join(words)
        sents.append(("- " if as_list else "") + s[0].upper() + s[1:] + ".")
    return ("\n" if as_list else " ").join(sents)


def user_records(rng: np.random.Generator, theta: np.ndarray, reward_scale: float, k: int,
                 user_id: str, n: int, responses: int) -> list[dict]:
    """n rankings by one user of type k: Plackett-Luce samples (Gumbel-max) of its reward."""
    out = []
    for _ in range(n):
        topic = str(rng.choice(TOPICS))
        prompt = f"{rng.choice(OPENERS)} {topic}."
        resp: list[str] = []
        while len(resp) < responses:
            r = _response(rng, topic)
            if r not in resp:
                resp.append(r)
        r_true = type_rewards(theta[k:k + 1], reward_scale, resp)[0]
        ranking = np.argsort(-(r_true + rng.gumbel(size=responses)))
        out.append({"user_id": user_id, "prompt": prompt, "responses": resp,
                    "ranking": [int(i) for i in ranking], "true_type": k})
    return out


def make_theta(types: int, seed: int) -> np.ndarray:
    if types <= len(CANONICAL):
        return CANONICAL[:types].copy()
    rng = np.random.default_rng(seed + 7919)
    extra = rng.normal(size=(types - len(CANONICAL), len(FEATURES)))
    return np.concatenate([CANONICAL, extra / np.linalg.norm(extra, axis=1, keepdims=True)])


def generate(users: int = 120, types: int = 3, rankings_per_user: int = 8, responses: int = 3,
             shares: list[float] | None = None, seed: int = 0, reward_scale: float = 2.0,
             theta: np.ndarray | None = None):
    """Records (as dicts) and the generator's metadata (true reward functions).
    `theta` [types, len(FEATURES)] overrides the built-in type preferences."""
    if types < 1 or users < 1 or rankings_per_user < 1 or responses < 2:
        raise ValueError("need users >= 1, types >= 1, rankings-per-user >= 1, responses >= 2")
    if shares is None:
        shares = [1.0 / types] * types
    if len(shares) != types or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"--shares needs {types} non-negative numbers, got {shares}")
    p = np.asarray(shares, dtype=float) / sum(shares)
    rng = np.random.default_rng(seed)
    theta = make_theta(types, seed) if theta is None else np.asarray(theta, dtype=float)
    user_types = rng.choice(types, size=users, p=p)
    records = []
    for u in range(users):
        records += user_records(rng, theta, reward_scale, int(user_types[u]), f"u{u:04d}",
                                rankings_per_user, responses)
    meta = {"generator": "emdpo_ray.data.synth/v1", "features": FEATURES, "theta": theta.tolist(),
            "reward_scale": reward_scale, "shares": p.tolist(), "seed": seed,
            "heldout_prompts": heldout_prompts()}
    return records, meta


def heldout_prompts() -> list[str]:
    """Every opener x held-out topic: prompts no synthetic record uses."""
    return [f"{o} {t}." for t in HELDOUT_TOPICS for o in OPENERS]


def meta_path(data_path: str) -> str:
    return data_path + ".meta.json"


def write(out: str, records: list[dict], meta: dict) -> None:
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(meta_path(out), json.dumps(meta, indent=2))
