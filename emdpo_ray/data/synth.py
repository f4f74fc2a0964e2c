"""Synthetic typed users: the project's own benchmark generator.

    emdpo-ray synth --out data.jsonl --users 120 --types 3 --rankings-per-user 8 \
        [--responses 3] [--family linear|contextual|order|lead_topic]

A user's rankings are Plackett-Luce samples (Gumbel-max) from their type's reward. Every
record carries `true_type`; the reward functions go to a sidecar `<out>.meta.json`
(`true_rewards(meta, prompts, texts)` scores any text, generated or not), with prompts on
held-out topics that no record uses. Four families of types:

- `linear`: reward = theta_k . f(y), f = counts of style words, length, list lines. Exactly
  linear in token counts: a bag-of-tokens model is the correct model of these types.
- `contextual`: reward = theta_k[c(x)] . f(y), c(x) = whether the prompt's topic is nature
  or made by people. Types 0 and 1 flip their preference with the context (0 likes formal
  prose about nature and casual prose about made things, 1 the reverse), so averaged over
  prompts their token preferences cancel; type 2 keeps one preference everywhere. Each
  response names its topic once, so no token count follows the context.
- `order`: the responses of a record are the same sentences in different orders (the same
  token counts); reward = theta_k . f(first sentence): what a type wants to read first.
- `lead_topic`: `contextual`'s types, where every prompt names one nature topic and one
  made thing ("Explain rivers and batteries.") and the context is which of the two comes
  first. The prompt's words, as a bag, are the same either way, so the counts crossed with
  the prompt (the exact model of `contextual`) see nothing of it; each response names both
  topics once, in either order.
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
HELDOUT_TOPICS = ["lamps", "honey", "sand", "snow", "kites", "clocks", "boats", "moss",
                  "lakes", "owls", "cheese", "rope"]
# The context of the contextual family: nature (1) or made by people (0).
NATURE = {"rivers", "volcanoes", "tides", "bees", "clouds", "forests", "stars", "rain",
          "gardens", "ice", "wind", "salt", "honey", "sand", "snow", "moss", "lakes", "owls"}
NATURE_TOPICS = [t for t in TOPICS if t in NATURE]
MADE_TOPICS = [t for t in TOPICS if t not in NATURE]
ALL_TOPICS = set(TOPICS) | set(HELDOUT_TOPICS)
FAMILIES = ("linear", "contextual", "order", "lead_topic")
CONTEXTUAL = ("contextual", "lead_topic")   # theta [K, 2, F]: one row per context
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
    """True rewards [K, len(texts)] of texts under every type (linear family)."""
    feats = np.stack([text_features(t) for t in texts])
    return scale * theta @ feats.T


def context(prompt: str) -> int:
    """1 when the prompt's topic is nature, else 0 (contextual family)."""
    return int(any(w in NATURE for w in _WORD_RE.findall(prompt.lower())))


def lead_context(prompt: str) -> int:
    """1 when the first topic the prompt names is nature, else 0 (lead_topic family)."""
    topics = [w for w in _WORD_RE.findall(prompt.lower()) if w in ALL_TOPICS]
    return int(bool(topics) and topics[0] in NATURE)


def first_sentence(text: str) -> str:
    return re.split(r"[.!?\n]", text.strip(), maxsplit=1)[0]


def true_rewards(meta: dict, prompts: list[str], texts: list[str]) -> np.ndarray:
    """True rewards [K, n] of (prompt, text) pairs under every type, any family."""
    theta, scale = np.asarray(meta["theta"], float), meta["reward_scale"]
    family = meta.get("family", "linear")
    if family == "linear":
        return type_rewards(theta, scale, texts)
    if family == "order":
        return type_rewards(theta, scale, [first_sentence(t) for t in texts])
    feats = np.stack([text_features(t) for t in texts])                  # [n, F]
    of = lead_context if family == "lead_topic" else context
    ctx = np.array([of(p) for p in prompts])                             # [n]
    return scale * np.einsum("knf,nf->kn", theta[:, ctx], feats)


def describe_type(meta: dict, k: int) -> str:
    """What type k's true reward asks for, in words: the features with the largest weights,
    '+' wanted and '-' unwanted (per context for `contextual`, of the first sentence for
    `order`), e.g. '+formal -casual -length'."""
    theta, names = np.asarray(meta["theta"], float)[k], meta.get("features", FEATURES)

    def words(w: np.ndarray) -> str:
        top = [i for i in np.argsort(-np.abs(w)) if abs(w[i]) >= 0.5 * np.abs(w).max() > 0]
        return " ".join(f"{'+' if w[i] > 0 else '-'}{names[i]}" for i in top) or "(no preference)"

    family = meta.get("family", "linear")
    if family == "contextual":
        return f"nature topics: {words(theta[1])}; made things: {words(theta[0])}"
    if family == "lead_topic":
        return f"nature named first: {words(theta[1])}; made thing first: {words(theta[0])}"
    return words(theta) + (" (first sentence)" if family == "order" else "")


def _response(rng: np.random.Generator, topic: str, topic_once: bool = False) -> str:
    """One response. `topic_once` names the topic in the first sentence only: repeated in
    every sentence its count is the number of sentences, so a weight per topic word would be
    a length preference per topic, which token counts could see of the contextual types."""
    n_sent = int(rng.integers(1, 5))
    rates = {s: rng.uniform(0, 0.9) for s in WORDS}
    as_list = rng.random() < 0.35
    sents = []
    for i in range(n_sent):
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 7))))
        if i == 0 or not topic_once:
            words.insert(int(rng.integers(0, len(words) + 1)), topic)
        for style, p in rates.items():
            if rng.random() < p:
                words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(WORDS[style])))
        s = " ".join(words)
        sents.append(("- " if as_list else "") + s[0].upper() + s[1:] + ".")
    return ("\n" if as_list else " ").join(sents)


def _reordered(rng: np.random.Generator, topic: str, responses: int) -> list[str]:
    """`responses` distinct orders of the same sentences (order family)."""
    n_sent = max(3, int(rng.integers(3, 5)))
    while True:
        sents = [s.strip() for s in re.split(r"(?<=\.)\s", _response_n(rng, topic, n_sent))]
        if len(set(sents)) == len(sents):
            break
    out: list[str] = []
    while len(out) < responses:
        r = " ".join(sents[i] for i in rng.permutation(len(sents)))
        if r not in out:
            out.append(r)
    return out


def _response_n(rng: np.random.Generator, topic: str, n_sent: int) -> str:
    """Prose of n_sent sentences, each in one dominant style (order family)."""
    sents = []
    for _ in range(n_sent):
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 6))))
        words.insert(int(rng.integers(0, len(words) + 1)), topic)
        style = str(rng.choice(list(WORDS)))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(WORDS[style])))
        s = " ".join(words)
        sents.append(s[0].upper() + s[1:] + ".")
    return " ".join(sents)


def user_records(rng: np.random.Generator, theta: np.ndarray, reward_scale: float, k: int,
                 user_id: str, n: int, responses: int, family: str = "linear") -> list[dict]:
    """n rankings by one user of type k: Plackett-Luce samples (Gumbel-max) of its reward."""
    out = []
    meta = {"theta": np.asarray(theta)[k:k + 1], "reward_scale": reward_scale, "family": family}
    for _ in range(n):
        topic = str(rng.choice(TOPICS))
        prompt = f"{rng.choice(OPENERS)} {topic}."
        if family == "lead_topic":
            pair = [str(rng.choice(NATURE_TOPICS)), str(rng.choice(MADE_TOPICS))]
            pair = pair[::-1] if rng.random() < 0.5 else pair
            prompt = f"{rng.choice(OPENERS)} {pair[0]} and {pair[1]}."
        resp: list[str] = []
        if family == "order":
            resp = _reordered(rng, topic, responses)
        while len(resp) < responses:
            if family == "lead_topic":  # both topics once, in either order
                topic = " and ".join(pair[::-1] if rng.random() < 0.5 else pair)
            r = _response(rng, topic, topic_once=family in CONTEXTUAL)
            if r not in resp:
                resp.append(r)
        r_true = true_rewards(meta, [prompt] * responses, resp)[0]
        ranking = np.argsort(-(r_true + rng.gumbel(size=responses)))
        out.append({"user_id": user_id, "prompt": prompt, "responses": resp,
                    "ranking": [int(i) for i in ranking], "true_type": k})
    return out


def make_theta(types: int, seed: int, family: str = "linear") -> np.ndarray:
    """[K, F] type preferences ([K, 2, F] for contextual and lead_topic: one row per
    context)."""
    if family in CONTEXTUAL:
        v, w = CANONICAL[0], CANONICAL[2]
        base = np.stack([np.stack([v, -v]), np.stack([-v, v]), np.stack([w, w]),
                         np.stack([CANONICAL[3], -CANONICAL[3]])])
        if types <= len(base):
            return base[:types].copy()
        rng = np.random.default_rng(seed + 7919)
        extra = rng.normal(size=(types - len(base), 2, len(FEATURES)))
        return np.concatenate([base, extra / np.linalg.norm(extra, axis=2, keepdims=True)])
    if family == "order":
        # the style of the first sentence: formal, casual, hedged, direct first
        lead = np.zeros((4, len(FEATURES)))
        for i, style in enumerate(["formal", "casual", "hedge", "direct"]):
            lead[i, FEATURES.index(style)] = 1.0
        if types <= len(lead):
            return lead[:types].copy()
        rng = np.random.default_rng(seed + 7919)
        extra = rng.normal(size=(types - len(lead), len(FEATURES)))
        return np.concatenate([lead, extra / np.linalg.norm(extra, axis=1, keepdims=True)])
    if types <= len(CANONICAL):
        return CANONICAL[:types].copy()
    rng = np.random.default_rng(seed + 7919)
    extra = rng.normal(size=(types - len(CANONICAL), len(FEATURES)))
    return np.concatenate([CANONICAL, extra / np.linalg.norm(extra, axis=1, keepdims=True)])


def generate(users: int = 120, types: int = 3, rankings_per_user: int = 8, responses: int = 3,
             shares: list[float] | None = None, seed: int = 0, reward_scale: float = 2.0,
             theta: np.ndarray | None = None, family: str = "linear"):
    """Records (as dicts) and the generator's metadata (true reward functions).
    `theta` ([types, len(FEATURES)], or [types, 2, len(FEATURES)] for contextual) overrides
    the built-in type preferences."""
    if types < 1 or users < 1 or rankings_per_user < 1 or responses < 2:
        raise ValueError("need users >= 1, types >= 1, rankings-per-user >= 1, responses >= 2")
    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "order" and responses > 6:
        raise ValueError("--family order: at most 6 responses (orders of 3 sentences)")
    if shares is None:
        shares = [1.0 / types] * types
    if len(shares) != types or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"--shares needs {types} non-negative numbers, got {shares}")
    p = np.asarray(shares, dtype=float) / sum(shares)
    rng = np.random.default_rng(seed)
    theta = make_theta(types, seed, family) if theta is None else np.asarray(theta, dtype=float)
    user_types = rng.choice(types, size=users, p=p)
    records = []
    for u in range(users):
        records += user_records(rng, theta, reward_scale, int(user_types[u]), f"u{u:04d}",
                                rankings_per_user, responses, family)
    meta = {"generator": "emdpo_ray.data.synth/v2", "family": family, "features": FEATURES,
            "theta": theta.tolist(),
            "reward_scale": reward_scale, "shares": p.tolist(), "seed": seed,
            "heldout_prompts": heldout_prompts(family)}
    return records, meta


def as_conversation(record: dict) -> dict:
    """The same record in the conversational format (a user turn; assistant answers)."""
    return {**record, "prompt": [{"role": "user", "content": record["prompt"]}],
            "responses": [[{"role": "assistant", "content": r}] for r in record["responses"]]}


def heldout_prompts(family: str = "linear") -> list[str]:
    """Every opener x held-out topic: prompts no synthetic record uses. For `lead_topic`,
    prompts in its own form: each held-out nature topic with a held-out made thing, in both
    orders (both contexts)."""
    if family != "lead_topic":
        return [f"{o} {t}." for t in HELDOUT_TOPICS for o in OPENERS]
    nature = [t for t in HELDOUT_TOPICS if t in NATURE]
    made = [t for t in HELDOUT_TOPICS if t not in NATURE]
    pairs = [(a, b) for a, b in zip(nature, made)] + [(b, a) for a, b in zip(nature, made)]
    return [f"{o} {a} and {b}." for a, b in pairs for o in OPENERS]


def meta_path(data_path: str) -> str:
    return data_path + ".meta.json"


def write(out: str, records: list[dict], meta: dict) -> None:
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(meta_path(out), json.dumps(meta, indent=2))
