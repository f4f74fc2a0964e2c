import json
import os
import shutil
import warnings

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from hypothesis import settings  # noqa: E402

# Property tests: small in `make test`, large in `make test-heavy` (--hypothesis-profile=heavy).
settings.register_profile("default", max_examples=150)
settings.register_profile("heavy", max_examples=3000)
settings.load_profile("default")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray shared by every test that needs one: 3 logical CPUs on this 2-core
    machine, so that the session's Serve app (1 CPU) and a 2-worker M-step fit together."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """Three synthetic types; small enough for the CPU, large enough to identify them."""
    from emdpo_ray.data import synth

    path = str(tmp_path_factory.mktemp("data") / "synth.jsonl")
    records, meta = synth.generate(users=60, types=3, rankings_per_user=8, responses=3, seed=0)
    synth.write(path, records, meta)
    return path


@pytest.fixture(scope="session")
def reliability_report():
    """Figures from the fault, load and fuzz tests, written to runs/reliability/report.json."""
    from emdpo_ray.utils import atomic_write_json

    figures: dict = {}
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "runs", "reliability",
                        "report.json")

    def add(name: str, value):
        figures[name] = value
        old = json.load(open(path)) if os.path.exists(path) else {}
        atomic_write_json(path, {**old, **figures})

    return add


FAST = ["em.max_iterations=2", "mmra.num_prompts=4", "mmra.max_new_tokens=12",
        "mmra.single_dpo_baseline=true"]


@pytest.fixture(scope="session")
def trained_run(ray_local, synth_data, tmp_path_factory):
    """One real EM-DPO run (Ray Train + DeepSpeed on CPU) shared by the EM and serving tests."""
    from emdpo_ray.config import load_config
    from emdpo_ray.train.driver import train

    run = str(tmp_path_factory.mktemp("runs") / "em")
    msgs = []
    summary = train(load_config(None, FAST), synth_data, 3, run, progress=msgs.append)
    return run, summary, msgs


KEY = "test-key"


@pytest.fixture(scope="session")
def server(trained_run, tmp_path_factory):
    """The trained run, copied, with auth on and MMRA weights that give type 2 nothing."""
    import httpx
    import yaml
    from ray import serve

    from emdpo_ray.serve.app import start

    src, _, _ = trained_run
    run = str(tmp_path_factory.mktemp("serve") / "run")
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("ray_results"))
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    cfg["serve"].update(api_key=KEY)
    for d in ("policy", "router"):
        cfg["serve"][d].update(num_replicas=1, ray_actor_options={"num_cpus": 0.5},
                               health_check_period_s=1.0)
    cfg["serve"].update(request_timeout_s=30.0)
    open(os.path.join(run, "config.yaml"), "w").write(yaml.safe_dump(cfg))
    mm = json.load(open(os.path.join(run, "mmra.json")))
    mm["weights"] = [0.5, 0.5, 0.0]
    open(os.path.join(run, "mmra.json"), "w").write(json.dumps(mm))
    url = start(run, "127.0.0.1", 0)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    yield url, client, run
    client.close()
    serve.shutdown()




def kill_a_worker_after_a_checkpoint(fit_glob: str, killed: list, stop) -> None:
    """Wait until every rank has written a mid-M-step checkpoint (`fit_glob` names the
    fit folder), then SIGKILL one resident M-step worker process."""
    import glob
    import signal
    import time

    import psutil

    while not stop.is_set():
        if glob.glob(os.path.join(fit_glob, "step-*", "COMPLETE")):
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "PolicyWorker" in " ".join(p.info["cmdline"] or []):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
        time.sleep(0.02)


def sequence_logps(model, input_ids, attention_mask, loss_mask, **forward_kwargs):
    """The plain reference for scoring: one padded row per response, logits at every
    position. Sum and count of response-token log-probs per row; token t is predicted from
    the logits at t - 1, so the mask is shifted by one. The package scores packed rows
    (models/packing.py); tests check both against each other and against TRL."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    logits = logits[:, :-1].float()
    mask = loss_mask[:, 1:].to(logits.dtype)
    token = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1), mask.sum(-1)
