"""MMRA from a run directory: `emdpo-ray mmra --run runs/demo`.

    L_ij = mean over prompts x and samples y ~ pi_j of  log pi_i(y|x) - log pi_ref(y|x)

Evaluation prompts are split over Ray tasks; each task loads the base and the policies once,
samples `mmra.samples_per_prompt` continuations per policy in one batched `generate` (PEFT
`adapter_names` per row), and scores every sample under every type and the reference in one
batched forward. The driver averages, solves the LP and writes `mmra.json` atomically, with
the baselines a user would try instead.
"""

from __future__ import annotations

import json
import os

import numpy as np

from emdpo_ray import mmra
from emdpo_ray.config import Config, load_config
from emdpo_ray.utils import atomic_write_json, atomic_write_text, read_json


def run_policy_dirs(run_dir: str, k: int) -> dict[str, str]:
    dirs = {f"type_{j}": os.path.join(run_dir, "policies", f"type_{j}") for j in range(k)}
    single = os.path.join(run_dir, "baselines", "single_dpo")
    if os.path.isdir(single):
        dirs["single_dpo"] = single
    return dirs


def base_path_of(run_dir: str, cfg: Config) -> str:
    if cfg.model.name_or_path:
        return cfg.model.name_or_path  # resolved where it is loaded (models._local)
    return os.path.join(run_dir, "base_model")


def _sample_task(base_path: str, cfg_json: dict, policy_dirs: dict[str, str], k: int,
                 prompts: list[str], seed: int, threads: int) -> dict:
    import torch

    from emdpo_ray.models import (PolicyBank, continuation_arrays, left_pad, load_base,
                                  load_tokenizer, prompt_token_ids, strip_generation)
    from emdpo_ray.mstep import pair_logps

    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_json)
    names = list(policy_dirs)
    tok = load_tokenizer(base_path, cfg.model)
    bank = PolicyBank(load_base(base_path, cfg.model), cfg.model, names, init_from=policy_dirs)
    bank.eval()
    s = cfg.mmra.samples_per_prompt
    p_ids = prompt_token_ids(tok, prompts, cfg.data.max_prompt_tokens)
    # rows: every prompt x every generating policy x every sample
    rows = [(p, g) for p in range(len(prompts)) for g in range(len(names)) for _ in range(s)]
    ids, att = left_pad([p_ids[p] for p, _ in rows], tok.pad_token_id)
    torch.manual_seed(seed)
    out = bank.generate(ids, att, [g for _, g in rows], do_sample=True,
                        temperature=cfg.mmra.temperature, top_p=1.0,
                        max_new_tokens=cfg.mmra.max_new_tokens, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id)
    gens = [strip_generation(o[ids.shape[1]:].tolist(), tok.eos_token_id, tok.pad_token_id)
            for o in out]
    keep = [i for i, g in enumerate(gens) if g]  # an empty continuation has no log-prob
    arrays = continuation_arrays([p_ids[rows[i][0]] for i in keep], [gens[i] for i in keep],
                                 tok.pad_token_id)
    scorers = list(range(k)) + [-1]  # every type, then the reference
    pairs = np.array([(r, j) for r in range(len(keep)) for j in scorers])
    with torch.no_grad():
        lp, _, _ = pair_logps(bank.logps, arrays, pairs, torch.device("cpu"))
    lp = lp[:, 0].double().numpy().reshape(len(keep), len(scorers))
    return {"generator": [rows[i][1] for i in keep], "prompt": [prompts[rows[i][0]] for i in keep],
            "text": tok.batch_decode([gens[i] for i in keep], skip_special_tokens=True),
            "logps": lp.tolist()}


def estimate_L(run_dir: str, cfg: Config, k: int, prompts: list[str]) -> tuple[np.ndarray, list]:
    """L [K, G] (G = K types, plus the single-DPO baseline when present) and the samples."""
    import ray

    from emdpo_ray.em import ensure_ray, worker_threads

    ensure_ray(cfg)
    threads = worker_threads(cfg)
    dirs = run_policy_dirs(run_dir, k)
    task = ray.remote(num_cpus=threads)(_sample_task)
    chunks = [c for c in np.array_split(np.arange(len(prompts)), cfg.ray.num_workers) if len(c)]
    futures = [task.remote(base_path_of(run_dir, cfg), cfg.model_dump(mode="json"), dirs, k,
                           [prompts[i] for i in c], cfg.seed * 7 + n, threads)
               for n, c in enumerate(chunks)]
    parts = ray.get(futures)
    gen = np.concatenate([p["generator"] for p in parts]).astype(int)
    lp = np.concatenate([np.asarray(p["logps"]).reshape(-1, k + 1) for p in parts])
    ratio = lp[:, :k] - lp[:, k:]  # log pi_i - log pi_ref, per sample and scoring type i
    names = list(dirs)
    L = np.zeros((k, len(names)))
    for g in range(len(names)):
        L[:, g] = ratio[gen == g].mean(0)
    samples = [{"policy": names[g], "prompt": pr, "text": t}
               for p in parts for g, pr, t in zip(p["generator"], p["prompt"], p["text"])]
    return L, samples


def eval_prompts(data_path: str, n: int, seed: int) -> list[str]:
    from emdpo_ray.records import load_records

    prompts = sorted({r.prompt for r in load_records(data_path)})
    rng = np.random.default_rng(seed + 4242)
    return [prompts[i] for i in rng.permutation(len(prompts))[:n]]


def run_mmra(run_dir: str, cfg: Config | None = None, progress=None) -> dict:
    run_dir = os.path.abspath(run_dir)
    if not os.path.exists(os.path.join(run_dir, "run.json")):
        raise mmra.MatrixError(f"{run_dir}: not an emdpo-ray run directory (no run.json)")
    ident = read_json(os.path.join(run_dir, "run.json"))
    cfg = cfg or load_config(os.path.join(run_dir, "config.yaml"))
    k = ident["types"]
    say = progress or (lambda m: None)
    if cfg.mmra.single_dpo_baseline and not os.path.isdir(
            os.path.join(run_dir, "baselines", "single_dpo")):
        from emdpo_ray.em import train_single_policy

        say("training the single-DPO baseline (all records, no types)")
        train_single_policy(run_dir, cfg)
    prompts = eval_prompts(ident["data"], cfg.mmra.num_prompts, cfg.seed)
    L_full, samples = estimate_L(run_dir, cfg, k, prompts)
    L = L_full[:, :k]
    result = mmra.solve(L, cfg.mmra.type_weights)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    eta = summary.get("mixing_weights")
    base = mmra.baselines(L, eta, cfg.mmra.type_weights)
    if L_full.shape[1] > k:  # the single-DPO policy as one more column
        c = np.ones(k) if cfg.mmra.type_weights is None else np.asarray(cfg.mmra.type_weights)
        reg = c * (np.diag(L) - L_full[:, k])
        base["single_dpo"] = {"regret": reg.tolist(), "max_regret": float(max(0, reg.max()))}
    out = {"L": L.tolist(), **result.to_json(), "baselines": base,
           "L_single_dpo": L_full[:, k].tolist() if L_full.shape[1] > k else None,
           "num_prompts": len(prompts), "samples_per_prompt": cfg.mmra.samples_per_prompt}
    atomic_write_text(os.path.join(run_dir, "mmra_samples.jsonl"),
                      "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_json(os.path.join(run_dir, "mmra.json"), out)
    say(f"MMRA weights={np.round(result.weights, 3).tolist()} "
        f"max_regret={result.max_regret:.4f} (uniform: {base['uniform']['max_regret']:.4f})")
    return out
