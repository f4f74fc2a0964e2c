"""Pooling of the reference's states by part and by sentence (models/features.py), by hand."""

import numpy as np
import torch

from emdpo_ray.models.features import (projection, segment_pool, sentence_end_ids,
                                       sentence_pool)

END = 9   # the token that ends a sentence in these rows


def test_segment_pool_by_hand():
    # states 10, 1, 2, 3, 4 (one dimension); the response is tokens 1-3
    h = torch.tensor([[[10.0], [1.0], [2.0], [3.0], [4.0]]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    torch.testing.assert_close(segment_pool(h, mask, 3), torch.tensor([[1.0, 2.0, 3.0]]))
    # two parts of three tokens: positions 0, 1/3 in the first, 2/3 in the second
    torch.testing.assert_close(segment_pool(h, mask, 2), torch.tensor([[1.5, 3.0]]))
    # one part: the mean; a part with no token is 0
    torch.testing.assert_close(segment_pool(h, mask, 1), torch.tensor([[2.0]]))
    one = torch.tensor([[0, 1, 0, 0, 0]])
    torch.testing.assert_close(segment_pool(h, one, 2), torch.tensor([[1.0, 0.0]]))


def test_order_changes_the_pooled_parts_not_the_mean():
    h = torch.tensor([[[1.0], [2.0], [3.0]], [[3.0], [2.0], [1.0]]])
    mask = torch.ones(2, 3, dtype=torch.long)
    whole = segment_pool(h, mask, 1)
    parts = segment_pool(h, mask, 3)
    torch.testing.assert_close(whole[0], whole[1])
    assert not torch.equal(parts[0], parts[1])


def test_projection_only_for_wide_features():
    assert projection(48, 64) is None
    p = projection(1728, 64, seed=0)
    assert p.shape == (1728, 64) and p.dtype == np.float32
    np.testing.assert_array_equal(p, projection(1728, 64, seed=0))


def test_sentence_pool_by_hand():
    # position t's state has read tokens <= t; positions 1-6 are masked (they predict the
    # response tokens 2-7), and tokens 2, 4 and 6 end sentences: first sentence = positions
    # 1, 2 (the end token read), middle = 3, 4, last = 5, 6
    h = torch.arange(8, dtype=torch.float32).view(1, 8, 1)
    ids = torch.tensor([[END, 1, END, 2, END, 3, END, 7]])   # the prompt's own end (0) is not one
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]])
    torch.testing.assert_close(sentence_pool(h, mask, ids, torch.tensor([END])),
                               torch.tensor([[1.5, 3.5, 5.5]]))
    # two sentences: no middle (0); one sentence: the first alone
    two = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(sentence_pool(h, two, ids, torch.tensor([END])),
                               torch.tensor([[1.5, 0.0, 3.5]]))
    one = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(sentence_pool(h, one, ids, torch.tensor([END])),
                               torch.tensor([[1.5, 0.0, 0.0]]))
    # summed, not averaged: 1 + 2, 3 + 4, 5 + 6
    torch.testing.assert_close(sentence_pool(h, mask, ids, torch.tensor([END]), summed=True),
                               torch.tensor([[3.0, 7.0, 11.0]]))


def test_sentence_pool_follows_the_sentences_not_the_token_count():
    # a long sentence (tokens 1-5) and two short ones, masked positions 0-8; ends at 5, 7, 9.
    # By sentence the opening is the whole long sentence, positions 0-5: (0 + 5 * 1) / 6;
    # by thirds it is positions 0-2 whatever the sentences are.
    ids = torch.tensor([[0, 1, 1, 1, 1, END, 2, END, 3, END]])
    mask = torch.tensor([[1] * 9 + [0]])
    h = torch.tensor([[0.0, 1, 1, 1, 1, 1, 2, 2, 3, 3]]).unsqueeze(-1)
    torch.testing.assert_close(sentence_pool(h, mask, ids, torch.tensor([END])),
                               torch.tensor([[5 / 6, 2.0, 3.0]]))
    torch.testing.assert_close(segment_pool(h, mask, 3), torch.tensor([[2 / 3, 1.0, 7 / 3]]))


class _Vocab:
    """A tokenizer's two methods that sentence_end_ids uses."""
    vocab = {"a": 0, ".": 1, " b": 2, "?": 3, "\u010a": 4, "x!": 5, ".5": 6}
    text = {"\u010a": "\n"}

    def get_vocab(self):
        return self.vocab

    def convert_tokens_to_string(self, tokens):
        return "".join(self.text.get(t, t) for t in tokens)


def test_sentence_end_ids():
    np.testing.assert_array_equal(sentence_end_ids(_Vocab()), [1, 3, 4, 5])
