"""Records -> padded token arrays, responses in ranked order (best first).

One prompt format end to end: `prompt_ids` is the only place a prompt becomes tokens, for
training, reference and E-step scoring, MMRA sampling, feedback scoring and serving. A
conversation goes through the model's chat template (with the generation prompt); without a
template, and for plain-text prompts (TRL's standard format, `/v1/completions`), it is
bos + the text's tokens, a conversation's text being its contents one a line.

Truncation rule (counted, never refused): a prompt longer than `data.max_prompt_tokens`
keeps its *last* tokens (the part next to the response); a response longer than
`data.max_response_tokens` keeps its *first* tokens, then end-of-text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from emdpo_ray.config import DataConfig
from emdpo_ray.data.records import Messages, Record, group_by_user, plain_text

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    input_ids: np.ndarray       # [N, M, T] int32, right-padded
    attention_mask: np.ndarray  # [N, M, T] int8
    loss_mask: np.ndarray       # [N, M, T] int8, 1 on response tokens (incl. end-of-text)
    resp_mask: np.ndarray       # [N, M] bool, False for padding responses of short records
    user_index: np.ndarray      # [N] int64
    users: list[str]
    truncated_prompts: int = 0
    truncated_responses: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def arrays(self, idx: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        sel = slice(None) if idx is None else idx
        return {"input_ids": self.input_ids[sel], "attention_mask": self.attention_mask[sel],
                "loss_mask": self.loss_mask[sel], "resp_mask": self.resp_mask[sel]}


def prompt_ids(tokenizer, prompts: list[str | Messages],
               max_tokens: int | None = None) -> list[list[int]]:
    """Prompt tokens (see the module docstring), batched; the last `max_tokens` of them."""
    return _prompt_ids(tokenizer, prompts, max_tokens)[0]


def _prompt_ids(tokenizer, prompts: list[str | Messages],
                max_tokens: int | None) -> tuple[list[list[int]], int]:
    """(token ids, how many prompts were truncated)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    templated = bool(getattr(tokenizer, "chat_template", None))
    texts, is_chat = [], []
    for p in prompts:
        chat = templated and not isinstance(p, str)
        if chat:
            p = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in p],
                                              tokenize=False, add_generation_prompt=True)
        elif not isinstance(p, str):
            p = plain_text(p)
        texts.append(p)
        is_chat.append(chat)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = sum(max_tokens is not None and len(x) > max_tokens for x in ids)
    if max_tokens is not None:
        ids = [x[-max_tokens:] for x in ids]
    # the template writes its own start-of-turn tokens: no bos in front of it
    return [x if chat else bos + x for x, chat in zip(ids, is_chat)], cut


def encode(records: list[Record], tokenizer, cfg: DataConfig) -> Encoded:
    users, user_index = group_by_user(records)
    eos = [tokenizer.eos_token_id]
    prompts, t_prompts = _prompt_ids(tokenizer, [r.messages or r.prompt for r in records],
                                     cfg.max_prompt_tokens)
    flat = [y for r in records for y in r.ranked]
    resp_ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    m_max = max(len(r.responses) for r in records)
    t_resp = 0
    seqs: list[list[tuple[list[int], int]]] = []
    pos = 0
    for r, prefix in zip(records, prompts):
        row = []
        for _ in r.responses:
            y = resp_ids[pos]
            pos += 1
            if len(y) > cfg.max_response_tokens:
                y, t_resp = y[:cfg.max_response_tokens], t_resp + 1
            row.append((prefix + y + eos, len(prefix)))
        seqs.append(row)
    t_max = max(len(s) for row in seqs for s, _ in row)
    n = len(records)
    ids = np.full((n, m_max, t_max), tokenizer.pad_token_id, dtype=np.int32)
    att = np.zeros((n, m_max, t_max), dtype=np.int8)
    lm = np.zeros((n, m_max, t_max), dtype=np.int8)
    rm = np.zeros((n, m_max), dtype=bool)
    for i, row in enumerate(seqs):
        for j, (s, start) in enumerate(row):
            ids[i, j, :len(s)] = s
            att[i, j, :len(s)] = 1
            lm[i, j, start:len(s)] = 1
            rm[i, j] = True
    if t_prompts or t_resp:
        log.warning("truncated %d prompts (kept last %d tokens) and %d responses "
                    "(kept first %d tokens)", t_prompts, cfg.max_prompt_tokens, t_resp,
                    cfg.max_response_tokens)
    return Encoded(ids, att, lm, rm, np.asarray(user_index, dtype=np.int64), users,
                   t_prompts, t_resp)


def fingerprint(records: list[Record], model_id: str, tokenizer, cfg: DataConfig) -> str:
    """Key of everything reference log-probs depend on: data, model, tokenizer, lengths."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt, r.ranked]).encode())
    h.update(model_id.encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(cfg.model_dump_json().encode())
    return h.hexdigest()[:32]


def shard_indices(n: int, num_shards: int) -> list[np.ndarray]:
    """Contiguous, near-equal shards (sizes differ by at most one)."""
    return [a for a in np.array_split(np.arange(n), num_shards)]
