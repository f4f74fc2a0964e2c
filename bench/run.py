"""`make bench`: every figure of bench/README.md, measured in one run on this machine.

    .venv/bin/python bench/run.py [--quick]
    .venv/bin/python bench/run.py --load     # only the load figures (needs `make demo`)

Writes bench/results.json (flat keys, numbers) and the table in bench/README.md. Paired
comparisons alternate A B A B and report medians; both sides get the same torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
THREADS = 2


def make_data(path: str, users: int, types: int, per_user: int, responses: int, seed=0):
    from emdpo_ray.data import synth

    synth.write(path, *synth.generate(users=users, types=types, rankings_per_user=per_user,
                                      responses=responses, seed=seed))
    return path


# ---- EM runs (Ray Train + DeepSpeed) ----

def em_run(data: str, k: int, out: str, sets: list[str]) -> dict:
    from emdpo_ray.config import load_config
    from emdpo_ray.train.driver import train

    cfg = load_config(None, ["mmra.enabled=false", f"ray.cpus_per_worker={THREADS}", *sets])
    t = time.perf_counter()
    summary = train(cfg, data, k, out, overwrite=True)
    wall = time.perf_counter() - t
    hist = json.load(open(os.path.join(out, "history.json")))
    return {"wall": wall, "history": hist, "summary": summary}


# ---- TRL side ----

def trl_dpo(base: str, data: str, steps: int, bs: int, rank: int, lr: float, beta: float):
    """TRL DPOTrainer, precompute_ref_log_probs=True, LoRA of the same rank, same pairs."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from emdpo_ray.data.records import load_records

    torch.set_num_threads(THREADS)
    recs = load_records(data)
    ds = Dataset.from_list([{"prompt": r.prompt, "chosen": r.ranked[0], "rejected": r.ranked[1]}
                            for r in recs])
    tok = AutoTokenizer.from_pretrained(base)
    marks = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.setdefault("first", time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            marks["end"] = time.perf_counter()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=bs, max_steps=steps,
                         learning_rate=lr, beta=beta, precompute_ref_log_probs=True,
                         report_to=[], logging_steps=10 ** 6, save_strategy="no",
                         use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="constant",
                         warmup_steps=0, max_length=256, disable_tqdm=True)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                             train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(r=rank, lora_alpha=2 * rank,
                                                    target_modules="all-linear",
                                                    task_type="CAUSAL_LM"),
                             callbacks=[Clock()])
        trainer.train()
    wall = time.perf_counter() - t0
    return {"train_s": marks["end"] - marks["first"], "wall": wall}


# ---- serving ----

def load_figures(url: str, requests: int = 300, concurrency: int = 16) -> dict:
    """Closed-loop load against the demo run: 16 tokens per completion, seeds vary."""
    from emdpo_ray.serve.loadtest import run_load

    out = run_load(url, requests, concurrency, max_tokens=16)
    return {"load_p50_ms": out["p50_ms"], "load_p99_ms": out["p99_ms"],
            "load_errors": out["errors"], "load_throughput_rps": out["throughput_rps"]}


def serving_figures(run: str, n: int, load_only: bool = False) -> dict:
    import httpx
    import ray
    from ray import serve

    from emdpo_ray import serving
    from emdpo_ray.models.decoding import GenRequest
    from emdpo_ray.utils import free_port

    ray.init(address="local", num_cpus=THREADS, include_dashboard=False, log_to_driver=False)
    url = serving.start(run, "127.0.0.1", free_port())
    if load_only:
        out = load_figures(url)
        serve.shutdown()
        ray.shutdown()
        return out
    client = httpx.Client(base_url=url, timeout=60)
    h = serve.get_deployment_handle("PolicyServer", app_name="emdpo")
    from emdpo_ray.models.loading import load_tokenizer
    from emdpo_ray.models.scoring import prompt_token_ids

    tok = load_tokenizer(os.path.join(run, "base_model"))
    ids = prompt_token_ids(tok, ["Explain rivers."], 64)[0]
    body = {"prompt": "Explain rivers.", "max_tokens": 1, "model": "type-0", "temperature": 0}
    for _ in range(5):
        client.post("/v1/completions", json=body)
        h.generate.remote(GenRequest(ids, 0, 1, 0.0)).result()
    http_ms, direct_ms = [], []
    for _ in range(n):  # alternate A B A B
        t = time.perf_counter()
        client.post("/v1/completions", json=body).raise_for_status()
        http_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        h.generate.remote(GenRequest(ids, 0, 1, 0.0)).result()
        direct_ms.append((time.perf_counter() - t) * 1e3)
    over = np.array(http_ms) - np.array(direct_ms)

    import asyncio

    async def burst(method: str, reqs):
        hh = serve.get_deployment_handle("PolicyServer", app_name="emdpo")
        t = time.perf_counter()
        await asyncio.gather(*[getattr(hh, method).remote(r) for r in reqs])
        return time.perf_counter() - t

    reqs = [GenRequest(ids, i % 3, 16, 0.0) for i in range(16)]
    batched, single = [], []
    for _ in range(3):
        batched.append(asyncio.run(burst("generate", reqs)))
        single.append(asyncio.run(burst("generate_one", reqs)))
    loads = load_figures(url)
    serve.shutdown()
    ray.shutdown()
    return {**loads, "router_overhead_ms_p50": float(np.percentile(over, 50)),
            "router_overhead_ms_p99": float(np.percentile(over, 99)),
            "http_ms_p50": float(np.percentile(http_ms, 50)),
            "serve_batched_speedup": statistics.median(single) / statistics.median(batched)}


# ---- bare forward bound for E-step scoring ----

def forward_bound(run: str, data: str, k: int) -> float:
    """Records/s of scoring every record under K policies with no Ray: the same batched
    forward pass, in-process."""
    import torch

    from emdpo_ray.config import load_config
    from emdpo_ray.data.encode import encode
    from emdpo_ray.models.bank import PolicyBank
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.models.scoring import score_pairs
    from emdpo_ray.data.records import load_records

    torch.set_num_threads(THREADS)
    cfg = load_config(os.path.join(run, "config.yaml"))
    base = os.path.join(run, "base_model")
    recs = load_records(data)
    enc = encode(recs, load_tokenizer(base), cfg.data)
    names = [f"type_{j}" for j in range(k)]
    bank = PolicyBank(load_base(base, cfg.model), cfg.model, names,
                      init_from=os.path.join(run, "policies")).eval()
    pairs = np.array([(i, j) for i in range(len(recs)) for j in range(k)])
    ref = np.zeros(enc.resp_mask.shape)
    score_pairs(bank.logps, enc.arrays(), ref, 1.0, pairs[:64], torch.device("cpu"))  # warm-up
    t = time.perf_counter()
    score_pairs(bank.logps, enc.arrays(), ref, 1.0, pairs, torch.device("cpu"))
    return len(recs) / (time.perf_counter() - t)


def one_group_vs_concurrent(run: str, data: str, k: int) -> float:
    """Wall of one M-step fit training K adapters over K concurrent fits of one adapter each
    (each concurrent fit gets 1 CPU; the single fit gets THREADS). > 1: one group wins."""
    from concurrent.futures import ThreadPoolExecutor

    from emdpo_ray.config import load_config
    from emdpo_ray.train.driver import prepare_data
    from emdpo_ray.train.mstep import run_mstep
    from emdpo_ray.data.records import load_records

    cfg = load_config(os.path.join(run, "config.yaml"))
    recs = load_records(data)
    prep = prepare_data(cfg, recs, run, False, lambda m: None)
    gamma = np.load(os.path.join(run, "gamma-001.npy"))[prep.enc.user_index]
    storage = os.path.join(run, "ray_results")

    def fit(names, w, threads, tag):
        return run_mstep(cfg, names=names, num_types=len(names), base_path=prep.base_path,
                         shard_refs=prep.shard_refs, shard_sizes=prep.sizes, weights=w,
                         score_mask=np.ones_like(w, dtype=bool), storage_path=storage,
                         run_name=f"{tag}-{time.time_ns()}", seed=0, threads=threads)

    t = time.perf_counter()
    fit([f"type_{j}" for j in range(k)], gamma, THREADS, "group")
    one = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(lambda j: fit([f"type_{j}"], gamma[:, j:j + 1], 1, f"solo{j}"), range(k)))
    concurrent = time.perf_counter() - t
    return concurrent / one


def slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--load", action="store_true",
                   help="only the load figures, merged into the existing results")
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from emdpo_ray.utils import quiet_ray_logs

    quiet_ray_logs()
    import warnings

    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="emdpo-bench-")
    res: dict[str, float] = {}
    notes: dict[str, str] = {}
    t_all = time.perf_counter()
    if a.load:
        demo = os.path.join(REPO, "runs", "demo", "run")
        if not os.path.exists(os.path.join(demo, "posteriors.jsonl")):
            raise SystemExit("bench/run.py --load: run `make demo` first (it serves runs/demo/run)")
        res = json.load(open(os.path.join(HERE, "results.json")))
        res.update(serving_figures(demo, 0, load_only=True))
        saved = json.load(open(os.path.join(HERE, "notes.json")))
        _write(res, saved["notes"], saved["machine"])
        print(json.dumps(res, indent=2))
        return 0

    # 1. demo wall (make demo after setup)
    t = time.perf_counter()
    subprocess.run(["make", "-s", "demo"], cwd=REPO, check=True, capture_output=True)
    res["demo_wall_s"] = time.perf_counter() - t

    # 2. EM at demo scale: overhead fraction, E-step throughput
    import ray

    users = 40 if a.quick else 90
    data = make_data(os.path.join(tmp, "em.jsonl"), users, 3, 8, 3)
    ray.init(address="local", num_cpus=THREADS, include_dashboard=False, log_to_driver=False)
    em = em_run(data, 3, os.path.join(tmp, "em"), ["em.max_iterations=2"])
    compute = sum(h["timings"]["train_s"] + h["timings"]["score_s"] for h in em["history"])
    res["em_overhead_fraction"] = 1 - compute / em["wall"]
    fits = sum(h["timings"]["fit_wall_s"] for h in em["history"])
    notes["em_overhead_fraction"] = (
        f"of {em['wall']:.0f}s: model compute {compute:.0f}s, Ray Train fit() start/stop "
        f"{fits - compute:.0f}s, the rest init + reference + outputs")
    last = em["history"][-1]["timings"]
    n_rec = users * 8
    res["estep_records_per_s"] = n_rec / last["score_s"]
    res["estep_vs_forward_bound"] = res["estep_records_per_s"] / forward_bound(
        os.path.join(tmp, "em"), data, 3)

    # 2b. K types in one worker group (one fit, K adapters) vs K concurrent fits
    res["k_in_one_fit_speedup"] = one_group_vs_concurrent(os.path.join(tmp, "em"), data, 3)

    # 3. scaling of one EM iteration in users and in K
    base_u = 20 if a.quick else 40
    t_users, t_types = [], []
    for mult in (1, 2, 4):
        d = make_data(os.path.join(tmp, f"u{mult}.jsonl"), base_u * mult, 2, 6, 3, seed=mult)
        r = em_run(d, 2, os.path.join(tmp, f"u{mult}"), ["em.max_iterations=1", "dpo.min_steps=1"])
        t_users.append(r["history"][0]["timings"]["fit_wall_s"])
    for k in (2, 4, 8):
        d = make_data(os.path.join(tmp, f"k{k}.jsonl"), base_u * 2, min(k, 4), 6, 3, seed=k)
        r = em_run(d, k, os.path.join(tmp, f"k{k}"), ["em.max_iterations=1", "dpo.min_steps=1"])
        t_types.append(r["history"][0]["timings"]["fit_wall_s"])
    res["scaling_users_slope"] = slope([1, 2, 4], t_users)
    res["scaling_types_slope"] = slope([2, 4, 8], t_types)
    notes["scaling"] = (f"one EM iteration (fit wall): users x1,2,4 -> "
                        f"{[round(x, 1) for x in t_users]}s; K=2,4,8 -> "
                        f"{[round(x, 1) for x in t_types]}s")

    # 4. DPO throughput vs TRL: same tiny model, same pairs, LoRA r=8, bs 32, same steps
    pairs = make_data(os.path.join(tmp, "pairs.jsonl"), users * 2, 1, 8, 2)
    steps = 20 if a.quick else 60
    ours, theirs = [], []
    for rep in range(2):  # A B A B
        r = em_run(pairs, 1, os.path.join(tmp, f"dpo{rep}"),
                   ["em.max_iterations=1", "em.init=labels", f"dpo.min_steps={steps}",
                    "dpo.epochs=0.01", "dpo.beta=0.1"])
        tm = r["history"][0]["timings"]
        ours.append({"rate": steps * 32 / tm["train_s"], "wall": r["wall"]})
        base = os.path.join(tmp, f"dpo{rep}", "base_model")
        tr = trl_dpo(base, pairs, steps, 32, 8, 5e-3, 0.1)
        theirs.append({"rate": steps * 32 / tr["train_s"], "wall": tr["wall"]})
    res["dpo_throughput_vs_trl"] = statistics.median(o["rate"] for o in ours) / statistics.median(
        t["rate"] for t in theirs)
    res["dpo_wall_vs_trl"] = statistics.median(t["wall"] for t in theirs) / statistics.median(
        o["wall"] for o in ours)
    notes["dpo"] = (f"records/s ours {statistics.median(o['rate'] for o in ours):.0f} vs TRL "
                    f"{statistics.median(t['rate'] for t in theirs):.0f}; wall (incl. start-up, "
                    f"EM init and scoring on our side) ours "
                    f"{statistics.median(o['wall'] for o in ours):.0f}s vs TRL "
                    f"{statistics.median(t['wall'] for t in theirs):.0f}s")
    ray.shutdown()

    # 5. serving: router overhead, batched vs one-at-a-time
    res.update(serving_figures(os.path.join(REPO, "runs", "demo", "run"), 30 if a.quick else 100))

    res["bench_wall_s"] = time.perf_counter() - t_all
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(),
               "python": platform.python_version(), "torch_threads": THREADS}
    _write(res, notes, machine)
    print(json.dumps(res, indent=2))
    return 0


def _write(res: dict, notes: dict, machine: dict) -> None:
    from emdpo_ray.utils import atomic_write_json

    atomic_write_json(os.path.join(HERE, "results.json"),
                      {k: round(float(v), 4) for k, v in res.items()})
    atomic_write_json(os.path.join(HERE, "notes.json"), {"machine": machine, "notes": notes})
    write_readme(res, notes, machine)


TARGETS = [
    ("dpo_throughput_vs_trl", ">= 1.5", "M-step training records/s over TRL DPOTrainer's "
     "(precompute_ref_log_probs, same LoRA rank, model, pairs, batch, steps)"),
    ("dpo_wall_vs_trl", "(report)", "TRL wall / our wall, start-up included"),
    ("estep_records_per_s", "(report)", "E-step scoring records/s inside the M-step"),
    ("estep_vs_forward_bound", ">= 0.7", "E-step scoring over a bare in-process forward"),
    ("em_overhead_fraction", "<= 0.15", "share of EM wall time that is not model compute"),
    ("router_overhead_ms_p50", "<= 3", "HTTP router path minus a direct handle call"),
    ("router_overhead_ms_p99", "(report)", ""),
    ("serve_batched_speedup", ">= 3", "16 concurrent requests over 3 types, batched vs one "
     "at a time"),
    ("load_errors", "== 0", "errors among 300 completions (16 tokens) at 16 in flight, demo run"),
    ("load_p50_ms", "(report)", "latency p50 of that load"),
    ("load_p99_ms", "(report)", "latency p99 of that load"),
    ("load_throughput_rps", "(report)", "completions per second under that load"),
    ("k_in_one_fit_speedup", "(choice)", "K concurrent one-adapter fits' wall over one fit "
     "training all K adapters: > 1 means one worker group wins here"),
    ("scaling_users_slope", "~1", "log-log slope of EM iteration time in users"),
    ("scaling_types_slope", "~1", "log-log slope of EM iteration time in K"),
    ("demo_wall_s", "(report)", "`make demo` after setup"),
]


def write_readme(res, notes, machine) -> None:
    rows = "\n".join(f"| `{k}` | {res[k]:.3g} | {t} | {d} |" for k, t, d in TARGETS if k in res)
    text = open(os.path.join(HERE, "README.md")).read()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    table = (f"{start}\nMeasured by `make bench` on {machine['cpus']} CPUs "
             f"({machine['machine']}, Python {machine['python']}, torch threads "
             f"{machine['torch_threads']}, no GPU).\n\n| figure | measured | target | what |\n"
             f"| --- | --- | --- | --- |\n{rows}\n\n"
             + "\n".join(f"- {k}: {v}" for k, v in notes.items()) + f"\n{end}")
    if start in text:
        text = text[:text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text += "\n" + table + "\n"
    open(os.path.join(HERE, "README.md"), "w").write(text)


if __name__ == "__main__":
    raise SystemExit(main())
