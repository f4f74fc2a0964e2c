"""DPO training speed against TRL: `.venv/bin/python bench/trl_dpo.py [--quick]`.

Same tiny default model, same pairs, LoRA rank 8, batch 32, same number of optimizer steps,
precomputed reference log-probs on both sides, A B A B -> dpo_throughput_vs_trl (records/s)
and dpo_wall_vs_trl (start-up included).
"""

import argparse
import os
import statistics
import tempfile
import time

from common import THREADS, em_run, local_ray, make_data, record, setup


def trl_dpo(base: str, data: str, steps: int, bs: int, rank: int, lr: float, beta: float,
            target_modules="all-linear", max_length: int = 256):
    """TRL DPOTrainer, precompute_ref_log_probs=True, LoRA of the same rank, same pairs."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from emdpo_ray.data.sources import load_records

    torch.set_num_threads(THREADS)
    ds = Dataset.from_list([{"prompt": r.prompt, "chosen": r.ranked[0], "rejected": r.ranked[1]}
                            for r in load_records(data)])
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
                         warmup_steps=0, max_length=max_length, disable_tqdm=True)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                             train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(r=rank, lora_alpha=2 * rank,
                                                    target_modules=target_modules,
                                                    task_type="CAUSAL_LM"),
                             callbacks=[Clock()])
        trainer.train()
    return {"train_s": marks["end"] - marks["first"], "wall": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    a = p.parse_args()
    setup()
    from emdpo_ray.run.rundir import RunDir

    tmp = tempfile.mkdtemp(prefix="emdpo-bench-dpo-")
    ray = local_ray()
    users = 40 if a.quick else 90
    pairs = make_data(os.path.join(tmp, "pairs.jsonl"), users * 2, 1, 8, 2)
    steps = 20 if a.quick else 60
    ours, theirs = [], []
    for rep in range(2):  # A B A B
        run = os.path.join(tmp, f"dpo{rep}")
        r = em_run(pairs, 1, run, ["em.max_iterations=1", "em.init=labels", "em.guard_holdout=0",
                                   f"dpo.min_steps={steps}", "dpo.epochs=0.01", "dpo.beta=0.1"])
        tm = r["history"][-1]["timings"]
        ours.append({"rate": steps * 32 / tm["train_s"], "wall": r["wall"]})
        tr = trl_dpo(RunDir(run).base_model_dir, pairs, steps, 32, 8, 5e-3, 0.1)
        theirs.append({"rate": steps * 32 / tr["train_s"], "wall": tr["wall"]})
    ray.shutdown()
    rate_o, rate_t = (statistics.median(x["rate"] for x in s) for s in (ours, theirs))
    wall_o, wall_t = (statistics.median(x["wall"] for x in s) for s in (ours, theirs))
    record({"dpo_throughput_vs_trl": rate_o / rate_t, "dpo_wall_vs_trl": wall_t / wall_o},
           {"dpo": f"records/s ours {rate_o:.0f} vs TRL {rate_t:.0f}; wall (incl. start-up, EM "
                   f"init and scoring on our side) ours {wall_o:.0f}s vs TRL {wall_t:.0f}s"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
