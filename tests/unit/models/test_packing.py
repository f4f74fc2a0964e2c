"""Prefix-shared packed rows, worked by hand."""

import numpy as np

from emdpo_ray.models.packing import item_tree, pack_items, packed_rows, tree_mask


def test_pack_items_fills_rows_per_group_in_order():
    lengths = np.array([3, 4, 2, 5, 1])
    groups = np.array([0, 1, 0, 0, 1])
    # group 0: items 0 (3) + 2 (2) = 5 fit in 6, item 3 (5) starts a row; group 1: 1 + 4 = 5
    assert pack_items(lengths, groups, 6) == [[0, 2], [3], [1, 4]]
    # an item longer than the row gets its own
    assert pack_items(np.array([9, 1]), np.array([0, 0]), 4) == [[0], [1]]
    assert pack_items(lengths, groups, 1) == [[0], [2], [3], [1], [4]]


def test_tree_mask_prompt_then_separate_responses_then_next_item():
    # item 0: prompt (2 tokens), response a (2), response b (1); item 1: prompt 1, response 1; pad
    item = np.array([0, 0, 0, 0, 0, 1, 1, -1])
    seg = np.array([0, 0, 1, 1, 2, 0, 1, -1])
    m = tree_mask(item, seg).astype(int)
    want = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],   # response b sees the prompt, not response a
        [0, 0, 0, 0, 0, 1, 0, 0],   # the next item sees nothing of the first
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],   # padding: itself only
    ])
    assert (m == want).all()


def layout():
    """One record: prompt [1, 7], responses [4, 5, 2] and [6, 2], a third slot empty."""
    ids = np.array([[1, 7, 4, 5, 2], [1, 7, 6, 2, 0], [0, 0, 0, 0, 0]])
    att = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    lm = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    return ids, att, lm, np.array([True, True, False])


def test_item_tree_positions_restart_and_first_token_predicted_from_prompt():
    toks, pos, seg, pred, lab, which = item_tree(*layout())
    assert toks.tolist() == [1, 7, 4, 5, 2, 6, 2]
    assert pos.tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert seg.tolist() == [0, 0, 1, 1, 1, 2, 2]
    # token 4 (offset 2) from offset 1; 6 (offset 5) from the prompt's last (1), not from 2
    assert pred.tolist() == [1, 2, 3, 1, 5]
    assert lab.tolist() == [2, 3, 4, 5, 6]
    assert which.tolist() == [0, 0, 0, 1, 1]


def test_item_tree_empty_prompt_leaves_first_tokens_unscored():
    ids, att, lm, resp = layout()
    toks, pos, seg, pred, lab, which = item_tree(ids[:, 2:], att[:, 2:], lm[:, 2:], resp)
    assert toks.tolist() == [4, 5, 2, 6, 2] and pos.tolist() == [0, 1, 2, 0, 1]
    assert pred.tolist() == [0, 1, 3] and lab.tolist() == [1, 2, 4]


def test_packed_rows_two_pairs_one_row_targets_per_pair_and_response():
    ids, att, lm, resp = layout()
    batch = {"input_ids": np.stack([ids, ids]), "attention_mask": np.stack([att, att]),
             "loss_mask": np.stack([lm, lm]), "resp_mask": np.stack([resp, resp])}
    rows = packed_rows(batch, np.array([[0, 1], [1, 1], [0, -1]]), row_tokens=14)
    assert rows["input_ids"].shape == (2, 14) and rows["policy"].tolist() == [1, -1]
    assert rows["input_ids"][0].tolist() == [1, 7, 4, 5, 2, 6, 2] * 2
    assert rows["position_ids"][1, :7].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert rows["attention_mask"][1, 0, 7:, 7:].sum() == 7   # padding sees only itself
    # pair p, response j lands in slot p * 3 + j
    assert rows["target"].tolist() == [0, 0, 0, 1, 1, 3, 3, 3, 4, 4, 6, 6, 6, 7, 7]
    assert rows["pred_pos"][5:10].tolist() == [8, 9, 10, 8, 12]
    assert rows["tok_row"].tolist() == [0] * 10 + [1] * 5
    assert rows["shape"] == (3, 3)
