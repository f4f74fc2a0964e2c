"""Records -> padded token arrays, responses in ranked order (best first).

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
from emdpo_ray.data.records import Record, group_by_user

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


def encode(records: list[Record], tokenizer, cfg: DataConfig) -> Encoded:
    users, user_index = group_by_user(records)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    prompts = tokenizer([r.prompt for r in records], add_special_tokens=False)["input_ids"]
    flat = [y for r in records for y in r.ranked]
    resp_ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    m_max = max(len(r.responses) for r in records)
    t_prompts = t_resp = 0
    seqs: list[list[tuple[list[int], int]]] = []
    pos = 0
    for r, p in zip(records, prompts):
        if len(p) > cfg.max_prompt_tokens:
            p, t_prompts = p[-cfg.max_prompt_tokens:], t_prompts + 1
        row = []
        for _ in r.responses:
            y = resp_ids[pos]
            pos += 1
            if len(y) > cfg.max_response_tokens:
                y, t_resp = y[:cfg.max_response_tokens], t_resp + 1
            prefix = bos + p
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
