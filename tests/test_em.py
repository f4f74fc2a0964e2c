"""EM-DPO end to end on a real local Ray with real DeepSpeed (CPU, gloo)."""

import json
import os

import numpy as np
import pytest

from emdpo_ray.config import load_config
from emdpo_ray.run.rundir import RunDir
from emdpo_ray.train.driver import train
from emdpo_ray.train.prepare import cached, prepare_data
from emdpo_ray.data.sources import load_records

from conftest import FAST


@pytest.fixture(scope="module")
def finished_run(trained_run):
    return trained_run


def test_recovers_three_types(finished_run):
    run, summary, msgs = finished_run
    assert summary["ari"] >= 0.9, msgs
    hist = RunDir(run).history()
    # every iteration's types were checked on held-out rankings; EM ran to the end unless
    # the check refused an update, and then it ended there with the types it had
    guards = [h["guard"] for h in hist[1:]]
    assert all(g["heldout_loglik_per_ranking"] < 0 for g in guards)
    # by default the E-step scores the rewards as trained (em.reward_temperature=1)
    assert all(h["reward_temperature"] == 1.0 for h in hist[1:])
    assert all(g["temperatures"] is None for g in guards)
    start = hist[0]["start"]
    assert guards[0]["baseline"] == start["heldout_loglik_chosen"] == start[
        "heldout_loglik_by_l2"][start["features"]][str(start["l2"])]
    refused = [i for i, g in enumerate(guards, 1) if not g["accepted"]]
    assert summary["iterations"] == (refused[0] if refused else 2), guards
    if refused:
        assert hist[-1]["ari"] == hist[-2]["ari"]
        assert any("keeping the current types and stopping" in m for m in msgs)


def test_run_directory_contract(finished_run):
    run, summary, _ = finished_run
    post = [json.loads(line) for line in open(os.path.join(run, "posteriors.jsonl"))]
    assert len(post) == 60
    for p in post:
        assert set(p) == {"user_id", "posterior", "log_posterior", "type"}
        assert len(p["posterior"]) == 3 and abs(sum(p["posterior"]) - 1) < 1e-6
        np.testing.assert_allclose(np.exp(p["log_posterior"]), p["posterior"], atol=1e-12)
        assert p["type"] == int(np.argmax(p["posterior"]))
    hist = json.load(open(os.path.join(run, "history.json")))
    assert [h["iteration"] for h in hist] == list(range(summary["iterations"] + 1))  # 0: the start
    assert hist[0]["init"] == "kmeans" and hist[0]["log_likelihood"] < hist[1]["log_likelihood"]
    # the auto start tried token counts (plain and crossed with the prompt) and the workers'
    # reference features, and kept one
    start = hist[0]["start"]
    assert set(start["heldout_loglik_per_ranking"]) == {
        "tokens", "tokens_by_prompt", "tokens_by_prompt_state", "reference", "both"}
    assert start["features"] in start["heldout_loglik_per_ranking"]
    # split-and-merge ran on the kept start: each kept move raised the log-likelihood
    assert all(m["loglik"][1] > m["loglik"][0] + 1.0 for m in start["split_merge"])
    for h in hist[1:]:
        assert np.isfinite(h["log_likelihood"]) and len(h["mixing_weights"]) == 3
        assert {"startup_s", "train_s", "score_s", "estep_s", "fit_wall_s"} <= set(h["timings"])
        assert "type_0/rewards/accuracies" in h["metrics"]
    assert os.path.exists(os.path.join(run, "config.yaml"))
    assert os.path.exists(os.path.join(run, "plots", "em.png"))
    assert os.path.exists(os.path.join(run, "plots", "confusion.png"))
    assert not [f for f in os.listdir(run) if ".partial" in f or f.startswith(".tmp")]


def test_policies_load_with_plain_peft(finished_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, _ = finished_run
    base = AutoModelForCausalLM.from_pretrained(os.path.join(run, "base_model"))
    ids = torch.randint(3, 100, (1, 8))
    ref = base(input_ids=ids).logits.detach().clone()
    outs = []
    for k in range(3):
        d = os.path.join(run, "policies", f"type_{k}")
        assert os.path.exists(os.path.join(d, "adapter_model.safetensors"))
        cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        assert cfg["base_model_name_or_path"].endswith("base_model")
        m = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(os.path.join(run, "base_model")), d)
        outs.append(m(input_ids=ids).logits.detach())
    assert not torch.allclose(outs[0], ref)          # trained away from the reference
    assert not torch.allclose(outs[0], outs[1])      # and differently per type


def test_mmra_json_from_a_real_run(finished_run):
    run, summary, _ = finished_run
    mm = json.load(open(os.path.join(run, "mmra.json")))
    assert {"L", "regret", "weights", "max_regret", "baselines"} <= set(mm)
    L = np.asarray(mm["L"])
    assert L.shape == (3, 3) and np.isfinite(L).all()
    assert abs(sum(mm["weights"]) - 1) < 1e-6
    assert {"uniform", "eta", "policy_0", "single_dpo"} <= set(mm["baselines"])
    assert mm["max_regret"] <= mm["baselines"]["uniform"]["max_regret"] + 1e-6
    assert summary["mmra"]["weights"] == mm["weights"]


def test_eval_reports_ari_accuracy_and_true_regret(finished_run, synth_data):
    from emdpo_ray.report.evaluate import evaluate_run

    run, summary, _ = finished_run
    out = evaluate_run(run, synth_data, online=True)
    assert out["ari"] == pytest.approx(summary["ari"])
    assert len(out["type_accuracy"]) == 3 and min(out["type_accuracy"]) > 0.6
    assert sorted(out["match"]) == [0, 1, 2]
    assert abs(sum(out["eta"]) - 1) < 1e-6 and abs(sum(out["true_shares"]) - 1) < 1e-6
    on = out["online"]
    for mode in ("ternary", "binary"):
        assert len(on[mode]["feedbacks_to_true_type"]) == 3
        assert all(1 <= n <= on["max_feedbacks"] + 1 for n in on[mode]["feedbacks_to_true_type"])
    # a ranking over three responses carries more evidence about the type than one pair
    assert np.mean(on["ternary"]["feedbacks_to_true_type"]) < np.mean(
        on["binary"]["feedbacks_to_true_type"])
    tr = out["true_regret"]
    assert {"mmra", "uniform", "eta", "policy_0", "single_dpo"} <= set(tr)
    assert all(len(v["regret"]) == 3 for v in tr.values())
    assert all(v["max_regret_ci"][0] <= v["max_regret_ci"][1] for v in tr.values())
    lo, hi = tr["mmra"]["max_regret_minus_uniform_ci"]
    assert lo <= hi and "max_regret_minus_uniform_ci" not in tr["uniform"]


def test_reference_cache_hit_and_invalidation(finished_run, synth_data, tmp_path):
    run, _, _ = finished_run
    cfg = load_config(None, FAST)
    msgs = []
    prepare_data(cfg, load_records(synth_data), RunDir(run), False, msgs.append)
    assert "cache hit" in msgs[0]  # the reference model did not run again
    calls = []
    path = RunDir(run).reference_cache("another-key")
    arr, hit = cached(path, lambda: calls.append(1) or np.zeros((2, 2)))
    assert not hit and calls == [1]
    arr, hit = cached(path, lambda: calls.append(1) or np.zeros((2, 2)))
    assert hit and calls == [1]


def test_fingerprint_changes_with_data_and_model(finished_run, synth_data):
    from emdpo_ray.data.encode import fingerprint
    from emdpo_ray.models.loading import load_tokenizer

    run, _, _ = finished_run
    cfg = load_config(None, FAST)
    recs = load_records(synth_data)
    tok = load_tokenizer(os.path.join(run, "base_model"))
    key = fingerprint(recs, "m", tok, cfg.data)
    assert key == fingerprint(recs, "m", tok, cfg.data)
    assert key != fingerprint(recs[1:], "m", tok, cfg.data)
    assert key != fingerprint(recs, "other-model", tok, cfg.data)
    assert key != fingerprint(recs, "m", tok, cfg.data.model_copy(update={"max_prompt_tokens": 9}))


def test_different_config_on_existing_run_is_refused(finished_run, synth_data):
    from emdpo_ray.run.rundir import RunDirError

    run, _, _ = finished_run
    with pytest.raises(RunDirError, match="different config"):
        train(load_config(None, FAST + ["dpo.beta=0.3"]), synth_data, 3, run)


def test_labels_init_uses_true_type(synth_data):
    from emdpo_ray.train.start import initial_gamma
    from emdpo_ray.data.records import group_by_user

    recs = load_records(synth_data)
    users, ui = group_by_user(recs)
    cfg = load_config(None, ["em.init=labels", "em.init_smoothing=0.1"])
    g = initial_gamma(cfg, 3, recs, np.asarray(ui), len(users))
    truth = {r.user_id: r.true_type for r in recs}
    assert [int(x) for x in g.argmax(1)] == [truth[u] for u in users]
    assert g.max() == pytest.approx(0.9)


@pytest.mark.slow
def test_full_finetuning_trains_and_scores(ray_local, tmp_path):
    """model.finetune=full: K full copies and a frozen reference under DeepSpeed."""
    from emdpo_ray.data import synth

    data = str(tmp_path / "d.jsonl")
    synth.write(data, *synth.generate(users=16, types=2, rankings_per_user=4, seed=3))
    run = str(tmp_path / "full")
    # without the guard's holdout the start's per-user figures must still stay out of
    # history.json
    summary = train(load_config(None, ["model.finetune=full", "em.max_iterations=1",
                                       "em.guard_holdout=0",
                                       "dpo.min_steps=5", "dpo.learning_rate=1e-3",
                                       "mmra.num_prompts=2", "mmra.max_new_tokens=6"]),
                    data, 2, run)
    assert summary["iterations"] == 1
    assert "heldout_loglik_chosen" in RunDir(run).history()[0]["start"]
    for k in range(2):
        assert os.path.exists(os.path.join(run, "policies", f"type_{k}", "model.safetensors"))
    mm = json.load(open(os.path.join(run, "mmra.json")))
    assert np.isfinite(np.asarray(mm["L"])).all()


def test_reference_is_a_trained_language_model_built_once(finished_run, synth_data):
    """The default base is fine-tuned on the records before any DPO, and cached."""
    run, _, msgs = finished_run
    sft = json.load(open(os.path.join(run, "base_model", "emdpo_sft.json")))
    assert sft["steps"] > 0 and sft["on"] == "all"
    # from ~log(vocab) nats per token to well below it
    assert sft["loss_last"] < sft["loss_first"] - 1.5, sft
    assert any("SFT reference" in m for m in msgs)
    stamp = os.path.getmtime(os.path.join(run, "base_model", "model.safetensors"))
    again = []
    prepare_data(load_config(None, FAST), load_records(synth_data), RunDir(run), False,
                 again.append)
    assert not any("SFT" in m for m in again)
    assert os.path.getmtime(os.path.join(run, "base_model", "model.safetensors")) == stamp


def test_start_features_come_from_a_copy_of_the_reference_trained_further(finished_run,
                                                                          synth_data):
    """em.init_sft_epochs: the start's states are a further-trained copy's; the base the
    policies train from, and its reference log-probs, are left as they were."""
    from emdpo_ray.train.sft import sft_plans

    run, _, _ = finished_run
    sft = RunDir(run).history()[0]["start"]["features_sft"]
    assert sft["epochs"] == 1.0 and sft["steps"] > 0  # the tiny model's default
    cfg = load_config(None, FAST)
    with prepare_data(cfg, load_records(synth_data), RunDir(run)) as prep:
        ref = prep.reference
        plain = prep.group.response_features()()
        plans, steps, lr = sft_plans(cfg, prep.index.resp_mask, prep.sizes, 1.0)
        further = prep.group.response_features(plans, steps, lr, seed=0)()
        for a, b in zip(further, plain):   # the responses' states and the prompts'
            assert a.shape == b.shape and not np.allclose(a, b, atol=1e-3)
        assert plain.prompts.shape == (len(prep.index.resp_mask), 48)  # the tiny model's width
        for a, b in zip(prep.group.response_features()(), plain):
            np.testing.assert_array_equal(a, b)
        # em.init_pooling=sentences (the driver's default): the same prompts, the responses
        # pooled by their sentences, not by thirds of their tokens
        assert prep.sentence_ends is not None and len(prep.sentence_ends) > 0
        by_sentence = prep.group.response_features(end_ids=prep.sentence_ends)()
        np.testing.assert_array_equal(by_sentence.prompts, plain.prompts)
        assert by_sentence.responses.shape == plain.responses.shape
        assert not np.allclose(by_sentence.responses, plain.responses, atol=1e-3)
        np.testing.assert_array_equal(prep.group.reference_logps(), ref)


def test_mmra_samples_every_policy_on_held_out_prompts_with_intervals(finished_run, synth_data):
    run, _, _ = finished_run
    mm = json.load(open(os.path.join(run, "mmra.json")))
    assert mm["prompt_source"] == "heldout" and mm["sampling"]["exact"]
    samples = RunDir(run).mmra_samples()
    trained = {r.prompt for r in load_records(synth_data)}
    assert not {s["prompt"] for s in samples} & trained
    per = mm["num_prompts"] * mm["samples_per_prompt"]
    counts = {p: sum(s["policy"] == p for s in samples) for p in {s["policy"] for s in samples}}
    assert counts == {p: per for p in ["type_0", "type_1", "type_2", "single_dpo", "reference"]}
    boot = mm["bootstrap"]
    L, ci = np.asarray(mm["L"]), np.asarray(boot["L_ci"])
    assert ci.shape == (3, 5, 2) and boot["replicates"] == 200
    assert ((ci[:, :3, 0] <= L + 1e-9) & (L - 1e-9 <= ci[:, :3, 1])).all()
    w = np.asarray(boot["weights_ci"])
    assert ((w[:, 0] <= np.asarray(mm["weights"]) + 1e-6) &
            (np.asarray(mm["weights"]) - 1e-6 <= w[:, 1])).all()


def test_eval_reward_matrix_of_generations(finished_run, synth_data):
    from emdpo_ray.data import synth
    from emdpo_ray.report.evaluate import evaluate_run

    run, _, _ = finished_run
    out = evaluate_run(run, synth_data)
    gen = out["generations"]
    assert gen["policies"] == ["type_0", "type_1", "type_2", "single_dpo", "reference"]
    R = np.asarray(gen["reward"])
    assert R.shape == (3, 5) and np.asarray(gen["reward_ci"]).shape == (3, 5, 2)
    # one cell by hand: true type 0's mean reward over policy type_1's generations
    meta = json.load(open(synth.meta_path(synth_data)))
    texts = [s["text"] for s in RunDir(run).mmra_samples() if s["policy"] == "type_1"]
    by_hand = synth.type_rewards(np.asarray(meta["theta"])[:1], meta["reward_scale"], texts)
    assert R[0, 1] == pytest.approx(by_hand.mean())
    assert gen["own_policy"] == [f"type_{j}" for j in out["match"]]
    assert gen["types_served"] == sum(gen["own_is_best"])
    assert os.path.exists(os.path.join(run, "plots", "rewards.png"))
    assert json.load(open(os.path.join(run, "eval.json")))["generations"]["reward"] == gen["reward"]
    # the LP's regrets (mmra.json's L) against the true ones of the same generations
    from emdpo_ray.report.generations import regret_fidelity

    fid = gen["regret_fidelity"]
    assert fid == regret_fidelity(RunDir(run).mmra()["L"], R, np.asarray(out["match"]))
    assert fid["pairs"] == 6 and -1 <= fid["pearson"] <= 1



def test_final_fit_trains_the_installed_policies_on_the_final_types(finished_run):
    """After EM, the policies train em.final_epochs more passes on the final types, warm
    from the last M-step; those are the policies installed, and the state records it."""
    import glob

    from safetensors.numpy import load_file

    run, summary, msgs = finished_run
    last = summary["iterations"]
    ff = summary["final_fit"]
    assert ff["after_iteration"] == last and ff["epochs"] == 4.0
    assert json.load(open(os.path.join(run, "state.json")))["final_fit"] == ff
    assert "type_0/rewards/accuracies" in ff["metrics"]
    assert any(m.startswith("final fit: 4 epochs") for m in msgs)

    def adapters(pattern):
        (d,) = glob.glob(os.path.join(run, "ray_results", pattern, "final", "policies"))
        return {j: load_file(os.path.join(d, f"type_{j}", "adapter_model.safetensors"))
                for j in range(3)}

    installed = {j: load_file(os.path.join(run, "policies", f"type_{j}",
                                           "adapter_model.safetensors")) for j in range(3)}
    final, before = adapters(f"final-{last + 1:03d}-*"), adapters(f"mstep-{last:03d}-*")
    for j in range(3):
        for name, w in installed[j].items():
            np.testing.assert_array_equal(w, final[j][name])
        assert any(not np.allclose(w, before[j][name]) for name, w in installed[j].items())


@pytest.mark.slow
def test_cross_fit_run_final_fit_trains_only_the_served_policies(ray_local, tmp_path):
    """em.cross_fit: the fold policies score out of fold during EM; the final fit trains
    and installs the K served ones only."""
    import glob

    from emdpo_ray.data import synth

    data = str(tmp_path / "d.jsonl")
    synth.write(data, *synth.generate(users=16, types=2, rankings_per_user=4, seed=3))
    run = str(tmp_path / "xfit")
    summary = train(load_config(None, ["em.cross_fit=true", "em.max_iterations=1",
                                       "dpo.min_steps=4", "mmra.enabled=false"]), data, 2, run)
    assert summary["final_fit"]["after_iteration"] == 1
    (em_dir,) = glob.glob(os.path.join(run, "ray_results", "mstep-001-*", "final", "policies"))
    (final_dir,) = glob.glob(os.path.join(run, "ray_results", "final-002-*", "final", "policies"))
    assert {"type_0", "f0_type_0", "f1_type_1"} <= set(os.listdir(em_dir))
    assert sorted(d for d in os.listdir(final_dir) if not d.endswith(".md")) == ["type_0",
                                                                                   "type_1"]
    assert sorted(os.listdir(os.path.join(run, "policies"))) == ["type_0", "type_1"]


@pytest.mark.slow
def test_types_auto_chooses_k_from_the_start_and_resumes_with_it(ray_local, synth_data, tmp_path):
    """`train --types auto`: K grown on the start's features, recorded at iteration 0, kept
    by the run directory (identity says auto) and by the resume."""
    run = str(tmp_path / "auto")
    cfg = load_config(None, FAST + ["em.init_features=tokens", "em.max_iterations=1",
                                    "em.final_epochs=0", "mmra.enabled=false",
                                    "dpo.min_steps=5", "em.reward_temperature=fit"])
    msgs = []
    summary = train(cfg, synth_data, "auto", run, progress=msgs.append)
    rd = RunDir(run)
    chosen = rd.history()[0]["start"]["types"]
    rows = chosen["candidates"]["tokens"]["rows"]
    # three linear types: K grew while a type more predicted held-out rankings better, and
    # stopped growing (em.max_types is 6) at the first that did not
    assert chosen["features"] == "tokens" and chosen["chosen_types"] == 3
    assert [r["types"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["gain_interval"][0] > 0 and rows[2]["gain_interval"][0] > 0
    assert rows[3]["gain_interval"][0] <= 1e-3
    assert summary["types"] == rd.types == 3 and rd.identity()["types"] == "auto"
    assert {len(p) for p in rd.posteriors().values()} == {3}
    assert any("types: K=3, grown on tokens features" in m for m in msgs)
    # em.reward_temperature=fit: the E-step scaled the policies' rewards by a factor fitted
    # on the held-out rankings, and the guard scored each half of the users at the other's
    from emdpo_ray.core.calibration import TAU_BOUNDS

    it1 = rd.history()[1]
    assert TAU_BOUNDS[0] <= it1["reward_temperature"] <= TAU_BOUNDS[1]
    assert it1["reward_temperature"] != 1.0 and len(it1["guard"]["temperatures"]) == 2
    assert any("(rewards x" in m for m in msgs)
    # the scale behind the final types is the run's, for serving's feedback and eval
    tau = it1["reward_temperature"] if it1["guard"]["accepted"] else 1.0
    assert summary["reward_temperature"] == rd.reward_temperature() == tau
    again = []
    assert train(cfg, synth_data, "auto", run, progress=again.append)["types"] == 3
    assert any("resuming after iteration 1" in m for m in again)
    assert not any("types: K=" in m for m in again)  # not chosen again


def test_types_must_be_a_number_or_auto(synth_data, tmp_path):
    with pytest.raises(ValueError, match="--types must be a whole number >= 1 or auto, got 'two'"):
        train(load_config(None, []), synth_data, "two", str(tmp_path / "r"))
    with pytest.raises(ValueError, match="em.init=labels takes the types"):
        train(load_config(None, ["em.init=labels"]), synth_data, "auto", str(tmp_path / "r"))
    assert not os.path.exists(tmp_path / "r")  # refused before anything is written
