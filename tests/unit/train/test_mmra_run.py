"""MMRA from a run's samples (train/mmra_run.py): L, the report, the prompts; no Ray."""

import numpy as np
import pytest

from emdpo_ray.train.mmra_run import estimate_matrix, eval_prompts, mmra_report


def test_L_is_the_mean_log_ratio_per_generator():
    # K = 2 types; columns of logps: type 0, type 1, reference
    generator = np.array([0, 0, 1, 2])
    logps = np.array([[-1.0, -3.0, -2.0],    # from policy 0: ratios (1, -1)
                      [-2.0, -2.0, -2.0],    # from policy 0: ratios (0, 0)
                      [-5.0, -1.0, -3.0],    # from policy 1: ratios (-2, 2)
                      [-4.0, -4.0, -3.0]])   # from the single-DPO policy: (-1, -1)
    L = estimate_matrix(generator, logps, 3)
    np.testing.assert_allclose(L, [[0.5, -2.0, -1.0], [-0.5, 2.0, -1.0]])


def test_a_generator_without_samples_is_nan_and_refused_by_the_solver():
    from emdpo_ray.core.mmra import MatrixError

    L = estimate_matrix(np.array([0]), np.array([[-1.0, -1.0, -1.0]]), 2)
    assert np.isnan(L[:, 1]).all()
    with pytest.raises(MatrixError, match="finite"):
        mmra_report(L, 2, [0.5, 0.5], extra=["single_dpo"])


def test_report_by_hand_with_the_single_policy_column():
    # R = diag(L) - L = [[0, 2], [2, 0]]: the 1/2-1/2 mixture has regret 1 for both types
    L_full = np.array([[2.0, 0.0, 1.5], [0.0, 2.0, 0.5]])
    out = mmra_report(L_full, 2, eta=[0.7, 0.3], extra=["single_dpo"])
    np.testing.assert_allclose(out["weights"], [0.5, 0.5], atol=1e-6)
    assert out["max_regret"] == pytest.approx(1.0, abs=1e-6)
    assert out["baselines"]["policy_0"]["max_regret"] == pytest.approx(2.0)
    assert out["baselines"]["eta"]["regret"] == pytest.approx([0.6, 1.4])
    # the single policy: regrets 2 - 1.5 = 0.5 and 2 - 0.5 = 1.5
    assert out["baselines"]["single_dpo"]["regret"] == pytest.approx([0.5, 1.5])
    assert out["L"] == [[2.0, 0.0], [0.0, 2.0]] and out["L_single_dpo"] == [1.5, 0.5]
    assert "L_single_dpo" not in mmra_report(L_full[:, :2], 2, None)


def test_eval_prompts_are_distinct_seeded_and_order_free():
    prompts = ["c", "a", "b", "a", "d", "c"]
    got = eval_prompts(prompts, 3, seed=0)
    assert len(got) == len(set(got)) == 3 and set(got) <= set(prompts)
    assert got == eval_prompts(list(reversed(prompts)), 3, seed=0)
    assert eval_prompts(prompts, 10, seed=0) == eval_prompts(prompts, 4, seed=0)


def _samples(rng, n_prompts=20, per=4, noise=0.5):
    """2 types, 2 generators; type i's log-ratio is +1 on its own policy, -1 on the other."""
    gen, prompt, lp = [], [], []
    for p in range(n_prompts):
        for g in (0, 1):
            for _ in range(per):
                ratio = np.where(np.arange(2) == g, 1.0, -1.0) + noise * rng.normal(size=2)
                gen.append(g)
                prompt.append(p)
                lp.append(np.r_[ratio - 5.0, -5.0])  # ref log-prob -5, types -5 + ratio
    return np.array(gen), np.array(prompt), np.array(lp)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_without_noise():
    from emdpo_ray.train.mmra_run import bootstrap

    gen, prompt, lp = _samples(np.random.default_rng(0))
    L = estimate_matrix(gen, lp, 2)
    b = bootstrap(gen, lp, prompt, 2, None, replicates=100, seed=1)
    ci = np.array(b["L_ci"])
    assert ci.shape == (2, 2, 2) and b["replicates"] == 100
    assert ((ci[..., 0] <= L) & (L <= ci[..., 1])).all()
    assert (ci[..., 1] - ci[..., 0]).max() < 1.0
    w = np.array(b["weights_ci"])
    assert w.shape == (2, 2) and (w[:, 0] <= 0.5 + 1e-6).all() and (w[:, 1] >= 0.5 - 1e-6).all()
    gen, prompt, lp = _samples(np.random.default_rng(0), noise=0.0)
    exact = bootstrap(gen, lp, prompt, 2, None, replicates=20, seed=1)
    np.testing.assert_allclose(np.diff(exact["L_ci"], axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(exact["max_regret_ci"], [1.0, 1.0], atol=1e-6)


def test_prompt_sources(tmp_path):
    from emdpo_ray.config import load_config
    from emdpo_ray.data import synth
    from emdpo_ray.data.records import RecordError
    from emdpo_ray.train.mmra_run import prompt_pool, read_prompts

    data = str(tmp_path / "d.jsonl")
    synth.write(data, *synth.generate(users=3, types=2, rankings_per_user=2, seed=0))
    pool, source = prompt_pool(load_config(None), data)
    trained = {r["prompt"] for r in map(__import__("json").loads, open(data))}
    assert source == "heldout" and pool and not set(pool) & trained
    (tmp_path / "p.txt").write_text("Explain owls.\n\nDescribe rope.\n")
    cfg = load_config(None, [f"mmra.prompts_file={tmp_path / 'p.txt'}"])
    assert prompt_pool(cfg, data) == (["Explain owls.", "Describe rope."], "prompts_file")
    (tmp_path / "q.jsonl").write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(RecordError, match=r"q.jsonl:2: prompt: expected a string"):
        read_prompts(str(tmp_path / "q.jsonl"))
    import os

    os.unlink(synth.meta_path(data))
    pool, source = prompt_pool(load_config(None), data)
    assert source == "training" and set(pool) == trained
