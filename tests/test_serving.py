"""Ray Serve over real HTTP: routing, OpenAI compatibility, streaming, auth, bad requests."""

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import yaml

from conftest import KEY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": "Explain rivers.", "max_tokens": 6,
                                                **body})


def test_health_and_models(server):
    _, client, _ = server
    assert client.get("/healthz").json()["status"] == "ok"
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["type-0", "type-1", "type-2"]


def test_known_users_reach_their_map_type(server):
    _, client, run = server
    rows = [json.loads(line) for line in open(os.path.join(run, "posteriors.jsonl"))]
    by_type = {}
    for r in rows:
        by_type.setdefault(r["type"], r["user_id"])
    assert len(by_type) == 3
    for k, user in by_type.items():
        for _ in range(3):
            r = complete(client, user=user)
            assert r.status_code == 200
            assert r.headers["x-emdpo-type"] == str(k)
            assert r.headers["x-emdpo-route"] == "known_user"
            assert r.json()["emdpo_type"] == k and r.json()["model"] == f"type-{k}"


def test_anonymous_requests_follow_mmra_weights(server):
    _, client, _ = server
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: complete(client, user=f"stranger-{i}"), range(40)))
    assert all(r.status_code == 200 for r in rs)
    assert {r.headers["x-emdpo-route"] for r in rs} == {"mmra"}
    counts = Counter(r.headers["x-emdpo-type"] for r in rs)
    assert counts["2"] == 0                      # zero MMRA weight never serves
    assert 8 <= counts["0"] <= 32 and 8 <= counts["1"] <= 32  # ~Binomial(40, 0.5)


def test_pinned_type(server):
    _, client, _ = server
    r = complete(client, model="type-2")
    assert r.status_code == 200 and r.headers["x-emdpo-type"] == "2"
    assert r.headers["x-emdpo-route"] == "pinned"


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": 12}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "model": "type-9"}, 404, "model"),
    ({"prompt": "rivers " * 600, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x" * 70000}, 413, None),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, body, status, param):
    _, client, _ = server
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body,
                        headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] == status
    if param:
        assert err["param"] == param
    assert complete(client).status_code == 200


def test_bad_chat_requests(server):
    _, client, _ = server
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot",
                                                                "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_auth(server):
    url, _, _ = server
    assert httpx.get(f"{url}/v1/models").status_code == 401
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_openai_client_completions_chat_and_streaming(server):
    import openai

    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    c = client.completions.create(model="type-1", prompt="Explain tides.", max_tokens=8,
                                  temperature=0)
    assert c.model == "type-1" and isinstance(c.choices[0].text, str)
    assert c.usage.completion_tokens <= 8
    chat = client.chat.completions.create(
        model="type-0", messages=[{"role": "user", "content": "Describe bees."}], max_tokens=6)
    assert chat.choices[0].message.role == "assistant"
    assert chat.model == "type-0"
    parts = list(client.completions.create(model="type-1", prompt="Explain tides.",
                                           max_tokens=8, temperature=0, stream=True))
    streamed = "".join(p.choices[0].text for p in parts)
    assert streamed == c.choices[0].text
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(
        model="type-0", messages=[{"role": "user", "content": "Describe bees."}],
        max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(server):
    _, client, _ = server
    a = complete(client, model="type-0", seed=7, temperature=1.0, max_tokens=10).json()
    b = complete(client, model="type-0", seed=7, temperature=1.0, max_tokens=10).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    text = a["choices"][0]["text"]
    if len(text) > 2:
        stop = text[1:3]
        c = complete(client, model="type-0", seed=7, temperature=1.0, max_tokens=10,
                     stop=[stop]).json()
        assert stop not in c["choices"][0]["text"]
        assert c["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_for_mixed_types_are_batched(server):
    from ray import serve

    _, client, _ = server
    with ThreadPoolExecutor(16) as pool:
        rs = list(pool.map(lambda i: complete(client, model=f"type-{i % 3}", max_tokens=8),
                           range(32)))
    assert all(r.status_code == 200 for r in rs)
    h = serve.get_deployment_handle("PolicyServer", app_name="emdpo")
    assert max(h.batch_sizes.remote().result()) > 1


def test_batched_decoding_matches_each_adapter_alone(trained_run):
    """Rows for different types decoded together give what each type gives alone."""
    from emdpo_ray.config import load_config
    from emdpo_ray.models.decoding import GenRequest, generate_batch, peft_forward
    from emdpo_ray.models.bank import PolicyBank
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.models.scoring import prompt_token_ids

    run, _, _ = trained_run
    cfg = load_config(os.path.join(run, "config.yaml"))
    names = [f"type_{k}" for k in range(3)]
    base = os.path.join(run, "base_model")
    bank = PolicyBank(load_base(base, cfg.model), cfg.model, names,
                      init_from=os.path.join(run, "policies")).eval()
    tok = load_tokenizer(base)
    prompts = prompt_token_ids(tok, ["Explain rivers.", "Tell me about chess.", "Describe ice."], 64)
    reqs = [GenRequest(prompts[i % 3], i % 3, max_tokens=6 + i, temperature=0 if i % 2 else 0.8,
                       seed=i) for i in range(6)]
    fwd = peft_forward(bank.model, names)
    together = generate_batch(fwd, tok, reqs)
    for r, t in zip(reqs, together):
        alone = generate_batch(fwd, tok, [r])[0]
        assert alone.token_ids == t.token_ids
    # greedy rows also match transformers' own generate with that adapter alone
    bank.model.set_adapter("type_1")
    ids = torch.tensor([prompts[1]])
    ref = bank.model.generate(input_ids=ids, max_new_tokens=7, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    want = ref[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in want:
        want = want[:want.index(tok.eos_token_id)]
    assert together[1].token_ids == want[:7]


def test_print_config_is_a_valid_serve_config(trained_run):
    import subprocess
    import sys

    from ray.serve.schema import ServeDeploySchema

    run, _, _ = trained_run
    p = subprocess.run([sys.executable, "-m", "emdpo_ray", "serve", "--run", run,
                        "--print-config"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    ServeDeploySchema.model_validate(cfg)
    zero = subprocess.run([sys.executable, "-m", "emdpo_ray", "serve", "--run", run,
                           "--print-config", "--port", "0"], capture_output=True, text=True)
    assert zero.returncode == 2 and "a Serve config needs a fixed one" in zero.stderr, zero.stderr
    app = cfg["applications"][0]
    assert app["import_path"] == "emdpo_ray.serving:app_builder"
    assert app["args"]["run_dir"] == os.path.abspath(run)
    import importlib

    mod, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(mod), attr))


def test_streams_beside_batches_keep_their_own_adapters(server):
    """A stream decodes in its own thread beside the batched path; both share one PEFT model
    whose per-row adapters are set by hooks, so they must not overlap."""
    import httpx

    url, client, _ = server

    def stream_text(c, model):
        body = {"prompt": "Explain rivers.", "model": model, "max_tokens": 24,
                "temperature": 0, "stream": True}
        out = []
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    assert "error" not in obj, obj
                    out.append(obj["choices"][0]["text"])
        return "".join(out)

    alone_stream = stream_text(client, "type-1")
    alone = [complete(client, model=f"type-{i}", temperature=0, max_tokens=24).json()
             ["choices"][0]["text"] for i in range(3)]
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c2, ThreadPoolExecutor(13) as pool:
        streams = [pool.submit(stream_text, c2, "type-1") for _ in range(3)]
        rs = list(pool.map(lambda i: complete(client, model=f"type-{i % 3}", temperature=0,
                                              max_tokens=24), range(12)))
        texts = [f.result() for f in streams]
    assert [r.status_code for r in rs] == [200] * 12
    assert texts == [alone_stream] * 3
    assert [r.json()["choices"][0]["text"] for r in rs] == [alone[i % 3] for i in range(12)]


def _conversational_shards_serve(url, tmp_path, config, sets, tokenizer_dir, name):
    """A TRL conversational dataset in three Parquet shards trains K = 2; a known user's
    /v1/chat/completions is answered by their type, the prompt rendered as training
    rendered it (the same token count as `prompt_token_ids`)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray import serve

    from emdpo_ray.config import load_config
    from emdpo_ray.data import synth
    from emdpo_ray.models.loading import load_tokenizer
    from emdpo_ray.models.scoring import prompt_token_ids
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.serving import app_builder
    from emdpo_ray.train.driver import train

    recs, _ = synth.generate(users=12, types=2, rankings_per_user=4, seed=7)
    pairs = [{"user_id": r["user_id"], "prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["responses"][r["ranking"][0]]}],
              "rejected": [{"role": "assistant", "content": r["responses"][r["ranking"][-1]]}],
              "true_type": r["true_type"]} for r in recs]
    data = tmp_path / "prefs"
    data.mkdir()
    for s in range(3):
        pq.write_table(pa.Table.from_pylist(pairs[s::3]), data / f"train-{s:05d}.parquet")
    run = str(tmp_path / name)
    cfg = load_config(config, ["em.max_iterations=1", "mmra.enabled=false",
                               "serve.min_confidence=10", *sets,
                               # beside the `server` app on the tests' 2-CPU Ray
                               *[f"serve.{d}.{k}" for d in ("policy", "router") for k in
                                 ("num_replicas=1", "ray_actor_options={num_cpus: 0.25}")]])
    summary = train(cfg, str(data), 2, run)
    assert summary["records"] == len(pairs) and summary["users"] == 12
    serve.run(app_builder({"run_dir": run}), name=name, route_prefix=f"/{name}")
    try:
        user, post = next(iter(RunDir(run).posteriors().items()))
        conversation = [{"role": "user", "content": "Explain owls."}]
        r = httpx.post(f"{url}/{name}/v1/chat/completions", timeout=300, json={
            "messages": conversation, "user": user, "max_tokens": 8, "seed": 0})
        assert r.status_code == 200, r.text
        assert r.headers["x-emdpo-route"] == "known_user"
        assert r.headers["x-emdpo-type"] == str(int(np.argmax(post)))
        out = r.json()
        assert out["choices"][0]["message"]["role"] == "assistant"
        tok = load_tokenizer(tokenizer_dir(run))
        ids = prompt_token_ids(tok, [(("user", "Explain owls."),)], 10 ** 9)[0]
        assert out["usage"]["prompt_tokens"] == len(ids)
        return tok, ids
    finally:
        serve.delete(name)


@pytest.mark.slow
def test_conversational_parquet_shards_train_and_answer_chat_through_the_same_format(
        server, tmp_path):
    """The default model (no chat template: the contents one a line after bos)."""
    from emdpo_ray.run.rundir import RunDir

    url, _, _ = server
    tok, ids = _conversational_shards_serve(
        url, tmp_path, None, ["dpo.min_steps=4", "model.tiny.sft_epochs=1", "em.final_epochs=0"],
        lambda run: RunDir(run).base_model_dir, "conv")
    assert ids[0] == tok.bos_token_id


@pytest.mark.slow
def test_conversational_parquet_shards_on_smollm2_answer_chat_through_its_template(
        server, tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct at smoke size: its chat template renders the conversation in
    training and in /v1/chat/completions alike."""
    from emdpo_ray.config import load_config
    from emdpo_ray.models.sources import resolve_named_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url, _, _ = server
    config = os.path.join(REPO, "jobs", "smollm2-lora.yaml")
    folder = resolve_named_model(load_config(config).model)
    tok, ids = _conversational_shards_serve(
        url, tmp_path, config, ["dpo.min_steps=2", "dpo.epochs=0.05", "dpo.batch_size=2",
                                "ray.cpus_per_worker=1", "em.final_epochs=0"],
        lambda run: folder, "conv-smollm2")
    assert tok.chat_template and tok.decode(ids).startswith("<|im_start|>")
