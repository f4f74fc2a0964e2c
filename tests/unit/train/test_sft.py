"""SFT's plan (train/sft.py): which rows, which batches, which rank trains which row."""

import numpy as np

from emdpo_ray.train.sft import rank_plans, sft_batches, sft_rows, sft_steps


def test_rows_all_or_top():
    resp_mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(sft_rows(resp_mask, "all"),
                                  [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]])
    np.testing.assert_array_equal(sft_rows(resp_mask, "top"), [[0, 0], [1, 0]])
    assert sft_steps(5, 2, 1.0) == 3 and sft_steps(5, 2, 0.1) == 1


def test_batches_are_shuffled_epochs_back_to_back():
    b = sft_batches(4, 3, 4, seed=0)      # 12 draws = 3 epochs of 4 rows
    assert b.shape == (4, 3)
    flat = b.reshape(-1)
    for e in range(3):                     # every epoch is a permutation of the rows
        assert sorted(flat[4 * e:4 * e + 4]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(b, sft_batches(4, 3, 4, seed=0))


def test_each_rank_gets_the_batch_rows_of_its_shard_in_local_indices():
    # records 0-2 on rank 0, 3-4 on rank 1; rows are (record, response)
    rows = np.array([[0, 0], [2, 1], [3, 0], [4, 2]])
    batches = np.array([[0, 2], [3, 1]])   # step 0: records 0 and 3; step 1: records 4 and 2
    r0, r1 = rank_plans(rows, batches, [3, 2])
    np.testing.assert_array_equal(r0, [[0, 0, 0], [1, 2, 1]])        # (step, local record, j)
    np.testing.assert_array_equal(r1, [[0, 0, 0], [1, 1, 2]])        # 3 -> 0, 4 -> 1
    # a rank with no row in a step still gets its steps right (it adds zeros that step)
    r0, r1 = rank_plans(rows, np.array([[2, 3], [0, 1]]), [3, 2])
    assert len(r0) == 2 and set(r0[:, 0]) == {1} and set(r1[:, 0]) == {0}


def test_default_rate_is_the_tiny_models_at_its_width_and_a_named_models_otherwise():
    from emdpo_ray.config import load_config
    from emdpo_ray.train.sft import default_sft_rate, sft_plans

    def rate(*overrides):
        return default_sft_rate(load_config(None, list(overrides)).model)

    assert rate() == 5e-3                                  # width 48
    assert rate("model.tiny.hidden_size=96") == 2.5e-3     # twice as wide: half the rate
    assert rate("model.tiny.hidden_size=24") == 1e-2
    assert rate("model.name_or_path=/some/model") == 2e-5  # a named model: its own rate
    mask = np.ones((4, 3), bool)
    cfg = load_config(None, ["model.tiny.hidden_size=96"])
    assert sft_plans(cfg, mask, [4], 1.0)[2] == 2.5e-3
    cfg = load_config(None, ["model.tiny.hidden_size=96", "model.sft_learning_rate=1e-3"])
    assert sft_plans(cfg, mask, [4], 1.0)[2] == 1e-3       # set: used as is
