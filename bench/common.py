"""What every benchmark script shares: data, an EM run, results.json and the README table.

Each script measures one thing and merges its figures into bench/results.json (flat keys,
numbers) and bench/notes.json; the table in bench/README.md is rewritten from both. Paired
comparisons alternate A B A B and report medians; both sides get the same torch threads.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEMO_RUN = os.path.join(REPO, "runs", "demo", "run")
THREADS = 2


def setup() -> None:
    """Quiet logs and the CPU DeepSpeed accelerator, as the CLI does."""
    import warnings

    from emdpo_ray.utils import quiet_ray_logs

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_ray_logs()
    warnings.filterwarnings("ignore")


def local_ray():
    import ray

    ray.init(address="local", num_cpus=THREADS, include_dashboard=False, log_to_driver=False)
    return ray


def make_data(path: str, users: int, types: int, per_user: int, responses: int, seed=0) -> str:
    from emdpo_ray.data import synth

    synth.write(path, *synth.generate(users=users, types=types, rankings_per_user=per_user,
                                      responses=responses, seed=seed))
    return path


def em_run(data: str, k: int, out: str, sets: list[str]) -> dict:
    """`emdpo-ray train` in-process (no MMRA, no final fit: the benches time EM and its
    M-steps; the final fit is one more M-step of the same kind): wall, history, summary."""
    from emdpo_ray.config import load_config
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.driver import train

    cfg = load_config(None, ["mmra.enabled=false", "em.final_epochs=0",
                             f"ray.cpus_per_worker={THREADS}", *sets])
    t = time.perf_counter()
    summary = train(cfg, data, k, out, overwrite=True)
    return {"wall": time.perf_counter() - t, "history": RunDir(out).history(),
            "summary": summary}


def slope(xs, ys) -> float:
    """Log-log slope: 1 is linear scaling."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


TARGETS = [
    ("dpo_throughput_vs_trl", ">= 1.5", "M-step training records/s over TRL DPOTrainer's "
     "(precompute_ref_log_probs, same LoRA rank, model, pairs, batch, steps)"),
    ("dpo_wall_vs_trl", "(report)", "TRL wall / our wall, start-up included"),
    ("dpo_throughput_vs_trl_smollm2", ">= 1.5", "the same on SmolLM2-135M-Instruct (LoRA r8 "
     "q/v, batch 4 pairs)"),
    ("estep_vs_forward_bound_smollm2", ">= 0.7", "E-step scoring on SmolLM2 over a bare "
     "in-process forward"),
    ("smollm2_train_flop_fraction", "(report)", "SmolLM2 training tokens/s x 4N FLOPs over "
     "the measured matmul FLOP/s"),
    ("smollm2_score_flop_fraction", "(report)", "SmolLM2 scoring tokens/s x 2N FLOPs over "
     "the measured matmul FLOP/s"),
    ("estep_records_per_s", "(report)", "E-step scoring records/s inside the M-step"),
    ("estep_vs_forward_bound", ">= 0.7", "E-step scoring over a bare in-process forward"),
    ("em_overhead_fraction", "<= 0.15", "share of EM wall time that is not model compute"),
    ("start_parallel_speedup", "(report)", "the auto start of 300 users x 10 rankings (order), "
     "its fits side by side on every CPU over in turn"),
    ("start_parallel_speedup_small", "(report)", "the same at em_speed's 90 users x 8 "
     "rankings (linear)"),
    ("router_overhead_ms_p50", "<= 3", "HTTP router path minus a direct handle call"),
    ("router_overhead_ms_p99", "(report)", ""),
    ("serve_batched_speedup", ">= 3", "16 concurrent requests over 3 types, batched vs one "
     "at a time"),
    ("load_errors", "== 0", "errors among 300 completions (16 tokens) at 16 in flight, demo run"),
    ("load_p50_ms", "(report)", "latency p50 of that load"),
    ("load_p99_ms", "(report)", "latency p99 of that load"),
    ("load_throughput_rps", "(report)", "completions per second under that load"),
    ("mstep_fixed_cost_s", "<= 2", "per M-step after the first: all but forward/backward "
     "and scoring (resident worker group)"),
    ("scaling_users_slope", "~1", "log-log slope of EM iteration time in users"),
    ("scaling_types_slope", "~1", "log-log slope of EM iteration time in K"),
    ("demo_wall_s", "(report)", "`make demo` after setup"),
    ("prepare_1m_driver_peak_uss_gib", "< 4", "driver's peak private memory reading 1M "
     "synthetic records (10 JSONL shards) and shipping them to 2 worker shards, which encode "
     "them into token arrays themselves"),
    ("prepare_1m_driver_peak_rss_gib", "(report)", "the same as peak RSS, object-store pages "
     "the driver wrote included"),
    ("prepare_1m_s", "(report)", "wall time of that preparation, encoding included"),
    ("prepare_1m_encoder_peak_rss_gib", "(report)", "largest peak RSS of a shard's encoding "
     "process"),
]


def record(figures: dict[str, float], notes: dict[str, str] | None = None) -> None:
    """Merge figures (and notes) into results.json / notes.json and rewrite the table."""
    from emdpo_ray.utils import atomic_write_json, read_json

    res_path, notes_path = os.path.join(HERE, "results.json"), os.path.join(HERE, "notes.json")
    res = read_json(res_path) if os.path.exists(res_path) else {}
    res.update({k: round(float(v), 4) for k, v in figures.items()})
    saved = read_json(notes_path) if os.path.exists(notes_path) else {"notes": {}}
    saved["notes"].update(notes or {})
    saved["machine"] = {"cpus": os.cpu_count(), "machine": platform.machine(),
                        "python": platform.python_version(), "torch_threads": THREADS}
    atomic_write_json(res_path, res)
    atomic_write_json(notes_path, saved)
    _write_table(res, saved["notes"], saved["machine"])
    print(json.dumps(figures, indent=2))


def _write_table(res: dict, notes: dict, machine: dict) -> None:
    rows = "\n".join(f"| `{k}` | {res[k]:.3g} | {t} | {d} |" for k, t, d in TARGETS if k in res)
    path = os.path.join(HERE, "README.md")
    text = open(path, encoding="utf-8").read()
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
    from emdpo_ray.utils import atomic_write_text

    atomic_write_text(path, text)
