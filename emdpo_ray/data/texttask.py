"""A real text task for a real model: annotator types over the styles of generated answers.

    python -m emdpo_ray.data.texttask --model smollm2-135m-instruct --out data.jsonl --users 24

Responses are produced by the base model itself from short instructions, each asked in
several styles (a system message per style, sampled decoding), so they differ in length,
lists, hedging and tone. Simulated annotator types rank them with reward functions over
text properties (concise & direct vs detailed & structured, ...); rankings are
Plackett-Luce samples of the annotator's reward, as in the synthetic generator.
"""

from __future__ import annotations

import argparse
import re

import numpy as np

PROMPTS = [
    "Explain why the sky is blue.", "How do I boil an egg?", "What is a black hole?",
    "Why do cats purr?", "How does a bicycle stay upright?", "What causes rain?",
    "How do vaccines work?", "Why is the ocean salty?", "What is photosynthesis?",
    "How do airplanes fly?", "Why do leaves change color?", "What is inflation?",
    "How do magnets work?", "Why do we dream?", "What is a prime number?",
    "How does a refrigerator work?",
]
STYLES = {
    "concise": "Answer in one short sentence.",
    "detailed": "Answer in detail, in several full sentences.",
    "list": "Answer as a bulleted list of three short points starting with '-'.",
    "hedged": "Answer, but express uncertainty with words like maybe and perhaps.",
    "casual": "Answer casually and playfully, like texting a friend!",
}
FEATURES = ["length", "list_lines", "hedges", "casual"]
HEDGES = {"maybe", "perhaps", "might", "possibly", "probably", "likely", "could", "seems"}
CASUAL = {"hey", "yeah", "cool", "gonna", "lol", "super", "awesome", "totally", "kinda"}
TYPES = np.array([
    [-1.0, -0.5, -1.0, 0.0],   # concise and direct
    [1.0, 1.0, 0.0, -0.5],     # detailed and structured
    [0.0, -0.5, 0.5, 1.0],     # casual and tentative
])


def features(text: str) -> np.ndarray:
    words = re.findall(r"[a-z']+", text.lower())
    lines = [ln.strip() for ln in text.split("\n")]
    return np.array([
        len(words) / 20.0,
        float(sum(bool(re.match(r"^([-*\u2022]|\d+[.)])\s", ln)) for ln in lines)),
        float(sum(w in HEDGES for w in words)),
        float(sum(w in CASUAL for w in words) + text.count("!")),
    ])


def generate_pool(model_name: str, prompts: list[str], max_new_tokens: int, seed: int):
    """{prompt: [(style, text), ...]} sampled from the base model, one batched generate."""
    import torch

    from emdpo_ray.config import ModelConfig
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.models.scoring import left_pad

    cfg = ModelConfig(name_or_path=model_name)
    tok = load_tokenizer(model_name, cfg)
    model = load_base(model_name, cfg).eval()
    rows, texts = [], []
    for p in prompts:
        for style, instr in STYLES.items():
            msgs = [{"role": "system", "content": instr}, {"role": "user", "content": p}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            rows.append((p, style))
            texts.append(list(ids))
    ids, att = left_pad(texts, tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=0.8,
                             top_p=0.95, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id)
    pool: dict[str, list[tuple[str, str]]] = {}
    for (p, style), o in zip(rows, out):
        text = tok.decode(o[ids.shape[1]:], skip_special_tokens=True).strip()
        if text and text not in [t for _, t in pool.get(p, [])]:
            pool.setdefault(p, []).append((style, text))
    return pool


def make_records(pool, users: int, types: int, per_user: int, responses: int, seed: int,
                 scale: float = 2.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompts = [p for p, r in pool.items() if len(r) >= responses]
    out = []
    for u in range(users):
        k = u % types
        for _ in range(per_user):
            p = prompts[int(rng.integers(len(prompts)))]
            pick = rng.choice(len(pool[p]), size=responses, replace=False)
            resp = [pool[p][i][1] for i in pick]
            r = scale * np.array([TYPES[k] @ features(t) for t in resp])
            ranking = np.argsort(-(r + rng.gumbel(size=responses)))
            out.append({"user_id": f"a{u:03d}", "prompt": p, "responses": resp,
                        "ranking": [int(i) for i in ranking], "true_type": k})
    return out


def main(argv: list[str] | None = None) -> int:
    import json

    from emdpo_ray.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--types", type=int, default=2)
    ap.add_argument("--rankings-per-user", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    pool = generate_pool(a.model, PROMPTS[:a.prompts], a.max_new_tokens, a.seed)
    recs = make_records(pool, a.users, a.types, a.rankings_per_user, 3, a.seed)
    atomic_write_text(a.out, "".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(recs)} rankings of model-generated responses to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
