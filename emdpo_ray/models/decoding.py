"""Batched sampling for serving: rows for different types, temperatures and lengths decode
together in one forward per token (PEFT `adapter_names` per row, shared KV cache).

Each row keeps its own temperature, top-p, token budget, stop strings and seeded generator,
so batching never changes what a request gets back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenRequest:
    prompt_ids: list[int]
    policy: int                       # index into the policy bank (type k)
    max_tokens: int = 32
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenResult:
    token_ids: list[int]
    text: str
    finish_reason: str                # "stop" (end-of-text or a stop string) or "length"


def _top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row nucleus filter: keep the smallest set of tokens with mass >= top_p."""
    sorted_logits, idx = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs          # mass strictly before each token
    drop = before >= top_p[:, None]
    drop[:, 0] = False  # the likeliest token always stays (top_p may round to 0 in float32)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def _apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate_batch(forward, tokenizer, reqs: list[GenRequest],
                   on_token=None) -> list[GenResult]:
    """Decode every request; `forward(input_ids, attention_mask, position_ids, cache, rows)`
    returns (logits of the last position, new cache). `on_token(row, text_so_far)` streams."""
    b = len(reqs)
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.full((b, width), pad, dtype=torch.long)
    att = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt_ids):] = torch.as_tensor(r.prompt_ids)
        att[i, width - len(r.prompt_ids):] = 1
    temps = torch.tensor([max(r.temperature, 1e-6) for r in reqs])
    greedy = torch.tensor([r.temperature == 0 for r in reqs])
    top_p = torch.tensor([r.top_p for r in reqs])
    gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in reqs]
    out: list[list[int]] = [[] for _ in reqs]
    texts = [""] * b
    done = [False] * b
    reason = ["length"] * b
    policies = [r.policy for r in reqs]
    cache = None
    step_ids, pos = ids, (att.cumsum(-1) - 1).clamp_min(0)
    emitted = [0] * b
    holdback = [max((len(x) for x in r.stop), default=1) - 1 for r in reqs]

    def flush(i: int, final: bool) -> None:
        # Stream only text that can no longer change: not a partial UTF-8 character and
        # not the possible start of a stop string.
        if on_token is None:
            return
        safe = len(texts[i]) if final else len(texts[i]) - holdback[i]
        bad = texts[i].find("\ufffd", emitted[i])
        if bad >= 0 and not final:
            safe = min(safe, bad)
        if safe > emitted[i]:
            on_token(i, texts[i][emitted[i]:safe])
            emitted[i] = safe

    for _ in range(max(r.max_tokens for r in reqs)):
        logits, cache = forward(step_ids, att, pos, cache, policies)
        logits = logits.float() / temps[:, None]
        logits = _top_p_filter(logits, top_p)
        probs = logits.softmax(-1)
        nxt = torch.empty(b, dtype=torch.long)
        for i in range(b):
            if greedy[i]:
                nxt[i] = logits[i].argmax()
            else:
                nxt[i] = torch.multinomial(probs[i], 1, generator=gens[i])[0]
        for i, r in enumerate(reqs):
            if done[i]:
                nxt[i] = pad
                continue
            t = int(nxt[i])
            if t == eos:
                done[i], reason[i] = True, "stop"
            else:
                out[i].append(t)
                text = tokenizer.decode(out[i], skip_special_tokens=True)
                texts[i], stopped = _apply_stop(text, r.stop)
                if stopped:
                    done[i], reason[i] = True, "stop"
                elif len(out[i]) >= r.max_tokens:
                    done[i] = True
            flush(i, done[i])
        if all(done):
            break
        step_ids = nxt[:, None]
        att = torch.cat([att, torch.ones((b, 1), dtype=att.dtype)], 1)
        pos = pos[:, -1:] + 1
    return [GenResult(o, t, f) for o, t, f in zip(out, texts, reason)]


def _cache(out):
    # transformers 5 names the KV cache `cache` (formerly `past_key_values`)
    return out["cache"] if "cache" in out else out["past_key_values"]


def peft_forward(model, names: list[str]):
    """`forward` for generate_batch over a PEFT model holding the adapters `names`."""

    def fwd(input_ids, attention_mask, position_ids, cache, policies):
        o = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  cache=cache, use_cache=True,
                  adapter_names=[names[p] if p >= 0 else "__base__" for p in policies])
        return o.logits[:, -1], _cache(o)

    return fwd


def plain_forward(model):
    def fwd(input_ids, attention_mask, position_ids, cache, policies):
        o = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  cache=cache, use_cache=True)
        return o.logits[:, -1], _cache(o)

    return fwd


def sample_bank(bank, tokenizer, reqs: list[GenRequest]) -> list[GenResult]:
    """`generate_batch` over a PolicyBank: every row from its own policy (`req.policy`, or
    -1 for the reference). LoRA banks decode all rows together; full fine-tuned banks
    decode one group per policy. The sampler serving uses, so samples match what is served."""
    if bank.kind == "lora":
        return generate_batch(peft_forward(bank.model, bank.names), tokenizer, reqs)
    out: list[GenResult | None] = [None] * len(reqs)
    for p in sorted({r.policy for r in reqs}):
        rows = [i for i, r in enumerate(reqs) if r.policy == p]
        model = bank.reference if p < 0 else bank.policies[p]
        for i, res in zip(rows, generate_batch(plain_forward(model), tokenizer,
                                               [reqs[i] for i in rows])):
            out[i] = res
    return out
