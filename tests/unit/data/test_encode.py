"""Records -> token arrays (data/encode.py): layout, masks, truncation, shards."""

import numpy as np
import pytest

from emdpo_ray.config import DataConfig
from emdpo_ray.data.encode import (RecordShard, encode, fingerprint, index_records,
                                   shard_indices)
from emdpo_ray.data.records import parse_record
from emdpo_ray.models.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["a b c d e f g h", "tides rivers chess", "yes no maybe"] * 4, 300)


def _recs():
    return [parse_record({"user_id": "u1", "prompt": "a b", "responses": ["c", "d e", "f"],
                          "ranking": [2, 0, 1]}, "t:1"),
            parse_record({"user_id": "u0", "prompt": "g", "chosen": "h", "rejected": "a"},
                         "t:2"),
            parse_record({"user_id": "u1", "prompt": "b", "chosen": "c", "rejected": "d"},
                         "t:3")]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_layout_is_bos_prompt_response_eos_in_ranked_order(tok):
    enc = encode(_recs(), tok, DataConfig())
    assert enc.input_ids.shape[:2] == (3, 3)
    p = [tok.bos_token_id] + _ids(tok, "a b")
    for j, text in enumerate(["f", "c", "d e"]):  # ranking [2, 0, 1]: best first
        y = _ids(tok, text) + [tok.eos_token_id]
        n = len(p) + len(y)
        assert enc.input_ids[0, j, :n].tolist() == p + y
        assert enc.attention_mask[0, j].tolist() == [1] * n + [0] * (enc.input_ids.shape[2] - n)
        # loss on the response and its end-of-text only
        assert enc.loss_mask[0, j, :n].tolist() == [0] * len(p) + [1] * len(y)
    assert enc.resp_mask.tolist() == [[True, True, True], [True, True, False],
                                      [True, True, False]]


def test_users_are_indexed_in_first_seen_order(tok):
    enc = encode(_recs(), tok, DataConfig())
    assert enc.users == ["u1", "u0"]
    assert enc.user_index.tolist() == [0, 1, 0]


def test_the_driver_index_matches_the_encoding(tok):
    enc, index = encode(_recs(), tok, DataConfig()), index_records(_recs())
    assert index.users == enc.users and len(index) == len(enc)
    np.testing.assert_array_equal(index.user_index, enc.user_index)
    np.testing.assert_array_equal(index.resp_mask, enc.resp_mask)


def test_a_shard_encodes_as_its_rows_of_the_whole(tok):
    whole = encode(_recs(), tok, DataConfig())
    # the last two records (pairs) alone, padded to the data set's 3 responses
    part = RecordShard(_recs()[1:], tok, DataConfig(), responses=3).encode()
    assert part.input_ids.shape[1] == 3
    t = part.input_ids.shape[2]  # its own token width: only as long as its longest row
    assert t <= whole.input_ids.shape[2]
    np.testing.assert_array_equal(part.input_ids, whole.input_ids[1:, :, :t])
    np.testing.assert_array_equal(part.resp_mask, whole.resp_mask[1:])
    np.testing.assert_array_equal(part.loss_mask, whole.loss_mask[1:, :, :t])
    empty = RecordShard([], tok, DataConfig(), responses=3).encode()
    assert empty.arrays()["input_ids"].shape[:2] == (0, 3)


def test_truncation_keeps_the_prompt_end_and_the_response_start(tok):
    rec = parse_record({"user_id": "u", "prompt": "a b c d e f g h", "chosen": "tides rivers chess",
                        "rejected": "yes"}, "t:1")
    cfg = DataConfig(max_prompt_tokens=2, max_response_tokens=1)
    enc = encode([rec], tok, cfg)
    assert (enc.truncated_prompts, enc.truncated_responses) == (1, 1)
    p = _ids(tok, "a b c d e f g h")[-2:]
    y = _ids(tok, "tides rivers chess")[:1]
    row = [tok.bos_token_id] + p + y + [tok.eos_token_id]
    assert enc.input_ids[0, 0, :len(row)].tolist() == row


def test_fingerprint_follows_the_ranking_not_just_the_text(tok):
    recs = _recs()
    flipped = parse_record({"user_id": "u0", "prompt": "g", "chosen": "a", "rejected": "h"},
                           "t:2")
    cfg = DataConfig()
    assert fingerprint(recs, "m", tok, cfg) != fingerprint([recs[0], flipped, recs[2]], "m",
                                                           tok, cfg)


def test_shards_are_contiguous_and_near_equal():
    shards = shard_indices(7, 3)
    assert [s.tolist() for s in shards] == [[0, 1, 2], [3, 4], [5, 6]]
    assert np.concatenate(shard_indices(5, 5)).tolist() == [0, 1, 2, 3, 4]
