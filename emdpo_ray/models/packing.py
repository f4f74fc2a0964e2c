"""Prefix-shared, packed rows: each ranking's prompt is computed once per policy, not once per
response, and several rankings share a row instead of padding to the longest one.

A (record, policy) item becomes one token tree, its prompt followed by each response in turn;
a response attends to the prompt and to itself, never to the other responses, and restarts
its positions where the prompt ends, so each response sees exactly what it would alone. Items
of one policy are packed into rows of up to `row_tokens` tokens (attention cost grows with the
row, so rows stay short); a 4-D mask keeps items apart. Pure numpy: the model sees only ids,
positions, the mask and which hidden state predicts which token.
"""

from __future__ import annotations

import numpy as np

ROW_TOKENS = 256  # packed row length; past it, masked attention costs more than padding saves


def pack_items(lengths: np.ndarray, groups: np.ndarray, row_tokens: int) -> list[list[int]]:
    """Rows of item indices: items of one group, in order, fill a row until the next would
    pass `row_tokens` (an item longer than that gets a row of its own)."""
    rows: list[list[int]] = []
    for g in dict.fromkeys(groups.tolist()):           # groups in order of first appearance
        row, used = [], 0
        for i in np.nonzero(groups == g)[0].tolist():
            if row and used + lengths[i] > row_tokens:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += int(lengths[i])
        rows.append(row)
    return rows


def tree_mask(item: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """[L, L] boolean attention (query, key) of one row: key at or before the query, same
    item, and in the prompt (segment 0) or the query's own response; padding (item -1)
    attends only to itself."""
    q, k = item[:, None], item[None, :]
    sq, sk = segment[:, None], segment[None, :]
    causal = np.tril(np.ones((len(item), len(item)), dtype=bool))
    allowed = causal & (q == k) & (q >= 0) & ((sk == 0) | (sk == sq))
    return allowed | np.eye(len(item), dtype=bool)


def item_tree(ids: np.ndarray, att: np.ndarray, lm: np.ndarray, resp: np.ndarray):
    """One record's token tree from its [m, T] training layout (prompt + response j per row).

    Returns tokens, positions, segments (0 prompt, j + 1 response j), and the scored tokens
    as (predicting offset, token offset, response j): a response's first token is predicted
    from the prompt's last, as in its own row; with an empty prompt it is not scored."""
    real = np.nonzero(resp)[0]
    p = int(att[real[0]].sum() - lm[real[0]].sum())
    toks, pos, seg = [ids[real[0], :p]], [np.arange(p)], [np.zeros(p, dtype=np.int64)]
    pred, lab, which = [], [], []
    off = p
    for j in real.tolist():
        end = int(att[j].sum())
        n = end - p
        toks.append(ids[j, p:end])
        pos.append(np.arange(p, end))
        seg.append(np.full(n, j + 1))
        before = np.arange(off - 1, off + n - 1)
        before[0] = p - 1
        keep = before >= 0
        pred.append(before[keep])
        lab.append(np.arange(off, off + n)[keep])
        which.append(np.full(int(keep.sum()), j))
        off += n
    cat = np.concatenate
    return cat(toks), cat(pos), cat(seg), cat(pred), cat(lab), cat(which)


def packed_rows(batch: dict[str, np.ndarray], pairs: np.ndarray,
                row_tokens: int = ROW_TOKENS) -> dict[str, np.ndarray]:
    """The rows scoring (record, policy) pairs [P, 2] over every real response.

    `tok_row`, `pred_pos`, `label_pos` name each scored token (the hidden state at
    (row, pred) predicts the id at (row, label)); `target` is its slot in the [P, m] output."""
    m = batch["input_ids"].shape[1]
    trees = [item_tree(batch["input_ids"][r], batch["attention_mask"][r],
                       batch["loss_mask"][r], batch["resp_mask"][r]) for r in pairs[:, 0]]
    lengths = np.array([len(t[0]) for t in trees])
    rows = pack_items(lengths, pairs[:, 1], row_tokens)
    width = max(int(lengths[r].sum()) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), 1, width, width), dtype=bool)
    policy = np.array([pairs[r[0], 1] for r in rows], dtype=np.int64)
    scored = []
    for ri, row in enumerate(rows):
        item = np.full(width, -1)
        seg = np.full(width, -1)
        at = 0
        for i in row:
            toks, p, s, pred, lab, which = trees[i]
            n = len(toks)
            ids[ri, at:at + n], pos[ri, at:at + n] = toks, p
            item[at:at + n], seg[at:at + n] = i, s
            scored.append(np.stack([np.full(len(pred), ri), pred + at, lab + at,
                                    i * m + which]))
            at += n
        mask[ri, 0] = tree_mask(item, seg)
    tok = np.concatenate(scored, axis=1)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "policy": policy,
            "tok_row": tok[0], "pred_pos": tok[1], "label_pos": tok[2], "target": tok[3],
            "shape": (len(pairs), m)}
