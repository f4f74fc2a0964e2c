"""Segment pooling of the reference's states (models/features.py), by hand."""

import numpy as np
import torch

from emdpo_ray.models.features import projection, segment_pool


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
