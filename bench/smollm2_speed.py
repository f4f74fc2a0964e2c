"""M-step speed on SmolLM2-135M-Instruct against TRL: `.venv/bin/python bench/smollm2_speed.py`.

Same model, same pairs, LoRA rank 8 on q/v, batch 4 pairs, same optimizer steps, reference
log-probs precomputed on both sides, same torch threads, A B A B:

- dpo_throughput_vs_trl_smollm2: training records/s, ours (the resident worker group's
  train time) over TRL DPOTrainer's (first step to end);
- estep_vs_forward_bound_smollm2: E-step scoring records/s inside the M-step over a bare
  in-process forward of the same batches on the same model;
- smollm2_train_flop_fraction / smollm2_score_flop_fraction: achieved tokens/s against the
  physical bound, FLOPs per token (4N for a LoRA forward + backward through frozen weights,
  2N for a forward) over this machine's measured float32 matmul throughput.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from common import THREADS, local_ray, make_data, record, setup
from trl_dpo import trl_dpo

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs",
                      "smollm2-lora.yaml")


def matmul_flops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """Measured float32 matmul FLOP/s with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def bare_forward(folder: str, arrays: dict, cfg, per: int) -> float:
    """Records/s of a plain forward (no Ray, no adapters, no DeepSpeed) over the same rows."""
    import torch

    from emdpo_ray.models.bank import token_logps
    from emdpo_ray.models.loading import load_base
    from emdpo_ray.models.packing import packed_rows

    torch.set_num_threads(THREADS)
    model = load_base(folder, cfg.model).eval()
    n = len(arrays["input_ids"])
    pairs = np.stack([np.arange(n), np.zeros(n, int)], 1)

    def forward(chunk):
        rows = {k: torch.as_tensor(v) for k, v in packed_rows(arrays, chunk).items()
                if k not in ("shape", "policy", "target")}
        token_logps(model, **rows)

    with torch.no_grad():
        forward(pairs[:per])
        t = time.perf_counter()
        for s in range(0, n, per):
            forward(pairs[s:s + per])
    return n / (time.perf_counter() - t)


def ours(records, run: str, steps: int) -> dict:
    from emdpo_ray.config import load_config
    from emdpo_ray.data.encode import encode
    from emdpo_ray.models.loading import load_tokenizer
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.prepare import prepare_data

    cfg = load_config(CONFIG, [f"dpo.min_steps={steps}", "dpo.epochs=0.0001",
                               f"ray.cpus_per_worker={THREADS}", "ray.checkpoint_every_steps=0"])
    os.makedirs(run, exist_ok=True)
    n = len(records)
    t = time.perf_counter()
    with prepare_data(cfg, records, RunDir(run)) as prep:
        res = prep.run_mstep(names=["type_0"], num_types=1, weights=np.ones((n, 1)),
                             score_mask=np.ones((n, 1), dtype=bool), run_name="bench", seed=0)
    m = res.metrics
    # the same arrays the workers encoded, here for the bare forward
    arrays = encode(records, load_tokenizer(prep.base_path, cfg.model), cfg.data).arrays()
    att = arrays["attention_mask"]
    return {"rate": steps * cfg.dpo.batch_size / m["time/train_s"],
            "score_rate": n / m["time/score_s"], "wall": time.perf_counter() - t,
            "tokens_per_record": float(att.sum() / n), "arrays": arrays, "cfg": cfg,
            "per": max(1, 512 // att.shape[1])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    a = p.parse_args()
    setup()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from emdpo_ray.config import load_config
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.sources import resolve_named_model

    folder = resolve_named_model(load_config(CONFIG).model)
    tmp = tempfile.mkdtemp(prefix="emdpo-bench-smollm2-")
    ray = local_ray()
    data = make_data(os.path.join(tmp, "pairs.jsonl"), 48, 1, 2, 2)
    records = load_records(data)
    steps = 4 if a.quick else 12
    us, them = [], []
    for rep in range(2):  # A B A B
        us.append(ours(records, os.path.join(tmp, f"ours{rep}"), steps))
        tr = trl_dpo(folder, data, steps, 4, 8, 5e-4, 0.1, target_modules=["q_proj", "v_proj"],
                     max_length=80)
        them.append({"rate": steps * 4 / tr["train_s"], "wall": tr["wall"]})
    ray.shutdown()
    rate_o, rate_t = (statistics.median(x["rate"] for x in s) for s in (us, them))
    score = statistics.median(x["score_rate"] for x in us)
    bare = bare_forward(folder, us[0]["arrays"], us[0]["cfg"], us[0]["per"])
    flops = matmul_flops(THREADS)
    n_params = 134.5e6
    tokens = us[0]["tokens_per_record"]
    train_tok = rate_o * tokens
    score_tok = score * tokens
    record({"dpo_throughput_vs_trl_smollm2": rate_o / rate_t,
            "estep_vs_forward_bound_smollm2": score / bare,
            "smollm2_train_flop_fraction": train_tok * 4 * n_params / flops,
            "smollm2_score_flop_fraction": score_tok * 4 * n_params / 2 / flops},
           {"smollm2": f"records/s ours {rate_o:.2f} vs TRL {rate_t:.2f} ({tokens:.0f} tokens per "
                       f"record: {train_tok:.0f} training tokens/s); scoring {score:.1f} records/s "
                       f"vs bare forward {bare:.1f}; matmul {flops / 1e9:.0f} GFLOP/s, so the "
                       f"bound is {flops / (4 * n_params):.0f} training / "
                       f"{flops / (2 * n_params):.0f} scoring tokens/s"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
