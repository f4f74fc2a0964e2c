"""ZeRO stages 1-3 on two CPU workers (gloo): the same M-step as ZeRO 0, and a worker killed
under ZeRO-3 resumes from DeepSpeed's partitioned checkpoint (optimizer state included)."""

import os
import threading

import numpy as np
import pytest

from conftest import kill_a_worker_after_a_checkpoint
from emdpo_ray.config import load_config

STEPS = 24


@pytest.fixture(scope="module")
def zero_data(tmp_path_factory):
    from emdpo_ray.data import synth
    from emdpo_ray.data.sources import load_records

    path = str(tmp_path_factory.mktemp("zero") / "d.jsonl")
    synth.write(path, *synth.generate(users=12, types=2, rankings_per_user=3, seed=11))
    return load_records(path)


def _mstep(records, run: str, stage: int, kill: bool = False):
    """One M-step of two policies on fixed soft weights; (scores, adapters, metrics, killed)."""
    from safetensors.torch import load_file

    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.prepare import prepare_data

    cfg = load_config(None, [f"ray.zero_stage={stage}", "ray.num_workers=2",
                             f"dpo.min_steps={STEPS}", "dpo.epochs=0.1",
                             "ray.checkpoint_every_steps=8", "ray.max_failures=1",
                             "dpo.batch_size=4"])
    os.makedirs(run, exist_ok=True)
    rd = RunDir(run)
    n = len(records)
    rng = np.random.default_rng(0)
    w = rng.dirichlet([1.0, 1.0], size=n)
    killed, stop = [], threading.Event()
    with prepare_data(cfg, records, rd) as prep:
        if kill:
            threading.Thread(target=kill_a_worker_after_a_checkpoint,
                             args=(os.path.join(rd.ray_storage(cfg), "fit"), killed, stop),
                             daemon=True).start()
        try:
            res = prep.run_mstep(names=["type_0", "type_1"], num_types=2, weights=w,
                                 score_mask=np.ones((n, 2), dtype=bool), run_name="fit", seed=3)
        finally:
            stop.set()
        restarts = prep.group.restarts
    with res.checkpoint.as_directory() as d:
        adapters = {name: load_file(os.path.join(d, "policies", name, "adapter_model.safetensors"))
                    for name in ("type_0", "type_1")}
    return res.scores(), adapters, res.metrics, killed, restarts


@pytest.fixture(scope="module")
def zero0(ray_local, zero_data, tmp_path_factory):
    return _mstep(zero_data, str(tmp_path_factory.mktemp("z0")), 0)


def _max_diff(a, b):
    sa, pa = a[0], a[1]
    sb, pb = b[0], b[1]
    d = float(np.abs(sa - sb).max())
    for name in pa:
        for key in pa[name]:
            d = max(d, float((pa[name][key] - pb[name][key]).abs().max()))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_like_zero_0(zero0, zero_data, tmp_path, stage):
    out = _mstep(zero_data, str(tmp_path), stage)
    assert out[2]["train/steps"] == STEPS
    assert np.isfinite(out[0]).all()
    # the policies moved away from the reference, and identically under every stage
    assert max(float(v.abs().max()) for k, v in out[1]["type_0"].items() if "lora_B" in k) > 1e-3
    # float32 sums in another order (ZeRO-3's reduce-scatter, scoring batches of whole
    # records), grown by Adam's first steps: far below what training moved (> 1e-3 above)
    assert _max_diff(zero0, out) < 5e-4


@pytest.mark.slow
def test_zero3_worker_killed_resumes_with_its_optimizer_state(zero_data, ray_local, tmp_path):
    clean = _mstep(zero_data, str(tmp_path / "clean"), 3)
    killed = _mstep(zero_data, str(tmp_path / "killed"), 3, kill=True)
    assert killed[3], "no worker was killed"
    assert killed[4] == 1                                   # the group was replaced once
    assert killed[2]["train/resumed_from_step"] >= 8        # from a checkpoint, not step 0
    assert killed[2]["train/restored_optimizer_tensors"] > 0
    # Adam's moments restored: a restart with fresh moments would not end at the same point
    assert _max_diff(clean, killed) < 1e-5


def test_a_group_that_cannot_be_placed_fails_clearly(zero_data, ray_local, tmp_path):
    """Eight 1-CPU ranks on a 3-CPU Ray: a clear error naming what it needs, not a hang,
    and nothing left holding resources."""
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.prepare import prepare_data

    from ray.util import placement_group_table

    cfg = load_config(None, ["ray.num_workers=8", "ray.worker_start_timeout_s=3"])
    with pytest.raises(RuntimeError, match=r"needs 8 x \{'CPU': 1\}.*worker_start_timeout_s"):
        prepare_data(cfg, zero_data, RunDir(str(tmp_path)))
    eight = [p for p in placement_group_table().values() if len(p["bundles"]) == 8]
    assert eight and all(p["state"] == "REMOVED" for p in eight), eight


def test_sft_on_two_workers_is_the_one_worker_sft(zero_data, ray_local, tmp_path):
    """Data-parallel SFT (train/sft.py) draws each batch from all records and sums the ranks'
    gradients over the global token count: the same model as one worker trains."""
    import json

    from safetensors.torch import load_file

    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.prepare import prepare_data

    weights, summaries = {}, {}
    for n in (1, 2):
        run = str(tmp_path / f"w{n}")
        os.makedirs(run)
        rd = RunDir(run)
        cfg = load_config(None, [f"ray.num_workers={n}", "model.tiny.sft_epochs=3"])
        free = ray_local.available_resources().get("CPU", 0)
        with prepare_data(cfg, zero_data, rd) as prep:
            assert prep.group.world == n
        # close() returns with the group's CPUs free again (the next group is sized from them)
        assert ray_local.available_resources().get("CPU", 0) >= free
        weights[n] = load_file(os.path.join(rd.base_model_dir, "model.safetensors"))
        summaries[n] = json.load(open(os.path.join(rd.base_model_dir, "emdpo_sft.json")))
    assert summaries[2]["workers"] == 2 and summaries[2]["steps"] == summaries[1]["steps"]
    assert summaries[2]["loss_last"] < summaries[2]["loss_first"]   # it trained
    np.testing.assert_allclose(summaries[2]["losses"], summaries[1]["losses"], rtol=1e-4)
    # float32 sums in another order, through a few Adam steps
    diff = max(float((w - weights[2][key]).abs().max()) for key, w in weights[1].items())
    assert diff < 1e-4, diff
