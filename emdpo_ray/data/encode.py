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
import itertools
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
    prompt_len: np.ndarray      # [N] int32: tokens before the response (bos/template included)
    length: np.ndarray          # [N, M] int32: real tokens of each row (0: padding response)
    resp_mask: np.ndarray       # [N, M] bool, False for padding responses of short records
    user_index: np.ndarray      # [N] int64
    users: list[str]
    truncated_prompts: int = 0
    truncated_responses: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def masks(self, sel=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """attention_mask and loss_mask [n, M, T] int8 (1 on response tokens, end-of-text
        included), built when asked: at a million records they would double the arrays."""
        pos = np.arange(self.input_ids.shape[2])
        length = self.length[sel][..., None]
        att = (pos < length).astype(np.int8)
        lm = ((pos >= self.prompt_len[sel][:, None, None]) & (pos < length)).astype(np.int8)
        return att, lm

    @property
    def attention_mask(self) -> np.ndarray:
        return self.masks()[0]

    @property
    def loss_mask(self) -> np.ndarray:
        return self.masks()[1]

    def arrays(self, idx: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        sel = slice(None) if idx is None else idx
        att, lm = self.masks(sel)
        return {"input_ids": self.input_ids[sel], "attention_mask": att, "loss_mask": lm,
                "resp_mask": self.resp_mask[sel]}


@dataclass
class RecordIndex:
    """What the driver keeps of the records: who ranked each and how many responses it has
    (the token arrays live on the workers, train/prepare.py)."""
    user_index: np.ndarray      # [N] int64
    users: list[str]
    resp_mask: np.ndarray       # [N, M] bool, False for padding responses of short records

    def __len__(self) -> int:
        return len(self.user_index)


def index_records(records: list[Record]) -> RecordIndex:
    users, user_index = group_by_user(records)
    counts = np.fromiter((len(r.responses) for r in records), np.int64, len(records))
    width = int(counts.max()) if len(counts) else 0
    return RecordIndex(np.asarray(user_index, dtype=np.int64), users,
                       np.arange(width)[None, :] < counts[:, None])


@dataclass
class RecordShard:
    """One worker's share of the records, encoded where it lands: the token arrays of a
    large data set never pass through the driver, and a replaced worker encodes its shard
    again from these same records."""
    records: list[Record]
    tokenizer: object
    cfg: DataConfig
    responses: int              # M of the whole data set: every shard's [n, M] outputs line up

    def encode(self) -> Encoded:
        if not self.records:  # more workers than records
            m = self.responses
            return Encoded(np.zeros((0, m, 1), np.int32), np.zeros(0, np.int32),
                           np.zeros((0, m), np.int32), np.zeros((0, m), bool),
                           np.zeros(0, np.int64), [])
        return encode(self.records, self.tokenizer, self.cfg, self.responses)


def token_ids(tokenizer, texts: list[str], chunk: int = 8192) -> list[np.ndarray]:
    """Token ids (int32 arrays) of many texts, no special tokens, a chunk at a time: a fast
    tokenizer keeps a heavy object per text until its call returns, and Python lists of ids
    cost 36 bytes a token (about 2 GiB for 100k records at once)."""
    flat, offsets = ragged_token_ids(tokenizer, texts, chunk)
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def ragged_token_ids(tokenizer, texts: list[str], chunk: int = 8192):
    """The same as one flat int32 array and offsets [len(texts) + 1]: text i is
    flat[offsets[i]:offsets[i + 1]], with no per-text object at all."""
    parts, lengths = [], []
    for s in range(0, len(texts), chunk):
        ids = tokenizer(texts[s:s + chunk], add_special_tokens=False)["input_ids"]
        lengths += [len(x) for x in ids]
        parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                                 count=sum(lengths[-len(ids):])))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), offsets


def prompt_ids(tokenizer, prompts: list[str | Messages],
               max_tokens: int | None = None) -> list[list[int]]:
    """Prompt tokens (see the module docstring), batched; the last `max_tokens` of them."""
    return [x.tolist() for x in _prompt_ids(tokenizer, prompts, max_tokens)[0]]


def _prompt_ids(tokenizer, prompts: list[str | Messages],
                max_tokens: int | None) -> tuple[list[np.ndarray], int]:
    """(token ids, how many prompts were truncated)."""
    bos = np.asarray([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [],
                     dtype=np.int32)
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
    ids = token_ids(tokenizer, texts)
    cut = sum(max_tokens is not None and len(x) > max_tokens for x in ids)
    if max_tokens is not None:
        ids = [x[-max_tokens:] for x in ids]
    # the template writes its own start-of-turn tokens: no bos in front of it
    return [x if chat else np.concatenate([bos, x]) for x, chat in zip(ids, is_chat)], cut


def encode(records: list[Record], tokenizer, cfg: DataConfig,
           responses: int | None = None) -> Encoded:
    """Token arrays of `records`, `responses` wide (default: the most any record has)."""
    users, user_index = group_by_user(records)
    prompts, t_prompts = _prompt_ids(tokenizer, [r.messages or r.prompt for r in records],
                                     cfg.max_prompt_tokens)
    flat, off = ragged_token_ids(tokenizer, [y for r in records for y in r.ranked])
    r_len = np.diff(off)
    t_resp = int((r_len > cfg.max_response_tokens).sum())
    starts = np.cumsum([0] + [len(r.responses) for r in records])
    # lengths first, so the arrays are allocated once at their final width
    p_len = np.repeat([len(p) for p in prompts], np.diff(starts))
    t_max = int((p_len + np.minimum(r_len, cfg.max_response_tokens)).max()) + 1
    n, m_max = len(records), int(np.diff(starts).max()) if responses is None else responses
    ids = np.full((n, m_max, t_max), tokenizer.pad_token_id, dtype=np.int32)
    length = np.zeros((n, m_max), dtype=np.int32)
    rm = np.zeros((n, m_max), dtype=bool)
    for i, prefix in enumerate(prompts):
        p = len(prefix)
        for j, a in enumerate(range(starts[i], starts[i + 1])):
            y = flat[off[a]:min(off[a + 1], off[a] + cfg.max_response_tokens)]
            end = p + len(y) + 1
            ids[i, j, :p], ids[i, j, p:end - 1], ids[i, j, end - 1] = prefix, y, tokenizer.eos_token_id
            length[i, j] = end
            rm[i, j] = True
    if t_prompts or t_resp:
        log.warning("truncated %d prompts (kept last %d tokens) and %d responses "
                    "(kept first %d tokens)", t_prompts, cfg.max_prompt_tokens, t_resp,
                    cfg.max_response_tokens)
    return Encoded(ids, np.asarray([len(p) for p in prompts], dtype=np.int32), length, rm,
                   np.asarray(user_index, dtype=np.int64), users, t_prompts, t_resp)


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
