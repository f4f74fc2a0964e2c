import os
import warnings

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every test that needs one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """Three synthetic types; small enough for the CPU, large enough to identify them."""
    from emdpo_ray import synth

    path = str(tmp_path_factory.mktemp("data") / "synth.jsonl")
    records, meta = synth.generate(users=60, types=3, rankings_per_user=8, responses=3, seed=0)
    synth.write(path, records, meta)
    return path


FAST = ["em.max_iterations=2", "mmra.num_prompts=4", "mmra.max_new_tokens=12",
        "mmra.single_dpo_baseline=true"]


@pytest.fixture(scope="session")
def trained_run(ray_local, synth_data, tmp_path_factory):
    """One real EM-DPO run (Ray Train + DeepSpeed on CPU) shared by the EM and serving tests."""
    from emdpo_ray.config import load_config
    from emdpo_ray.em import train

    run = str(tmp_path_factory.mktemp("runs") / "em")
    msgs = []
    summary = train(load_config(None, FAST), synth_data, 3, run, progress=msgs.append)
    return run, summary, msgs
