"""MMRA from a run directory: `emdpo-ray mmra --run runs/demo`.

    L_ij = mean over prompts x and samples y ~ pi_j of  log pi_i(y|x) - log pi_ref(y|x)

Evaluation prompts are split over Ray tasks; each task loads the base and the policies once,
samples `mmra.samples_per_prompt` continuations per policy in one batched `generate` (PEFT
`adapter_names` per row), and scores every sample under every type and the reference in one
batched forward. The driver averages (`estimate_matrix`), solves the LP and writes
`mmra.json` atomically with the baselines a user would try instead (`mmra_report`).
"""

from __future__ import annotations

import numpy as np

from emdpo_ray.config import Config
from emdpo_ray.core import mmra
from emdpo_ray.run.ray_runtime import RayRuntime
from emdpo_ray.run.rundir import SINGLE_DPO, RunDir


def estimate_matrix(generator: np.ndarray, logps: np.ndarray, num_generators: int) -> np.ndarray:
    """L [K, G] from samples: `generator[s]` drew sample s; `logps[s]` holds its log-prob
    under the K types, then the reference (last column)."""
    k = logps.shape[1] - 1
    ratio = logps[:, :k] - logps[:, k:]  # log pi_i - log pi_ref, per sample and type i
    L = np.full((k, num_generators), np.nan)
    for g in range(num_generators):
        if (generator == g).any():
            L[:, g] = ratio[generator == g].mean(0)
    return L


def mmra_report(L_full: np.ndarray, k: int, eta, type_weights=None) -> dict:
    """Weights and regrets of the LP, the baselines, and the single-DPO policy (column K of
    L_full, when present) as one more baseline."""
    L = L_full[:, :k]
    result = mmra.solve(L, type_weights)
    base = mmra.baselines(L, eta, type_weights)
    single = L_full.shape[1] > k
    if single:
        c = np.ones(k) if type_weights is None else np.asarray(type_weights, float)
        reg = c * (np.diag(L) - L_full[:, k])
        base[SINGLE_DPO] = {"regret": reg.tolist(), "max_regret": float(max(0, reg.max()))}
    return {"L": L.tolist(), **result.to_json(), "baselines": base,
            "L_single_dpo": L_full[:, k].tolist() if single else None}


def eval_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """n distinct prompts, a seeded draw independent of their order in the data."""
    distinct = sorted(set(prompts))
    rng = np.random.default_rng(seed + 4242)
    return [distinct[i] for i in rng.permutation(len(distinct))[:n]]


def _sample_task(base_path: str, cfg_json: dict, policy_dirs: dict[str, str],
                 k: int, prompts: list[str], seed: int, threads: int) -> dict:
    import torch

    from emdpo_ray.models.bank import load_policy_bank
    from emdpo_ray.models.scoring import (continuation_arrays, left_pad, pair_logps,
                                          prompt_token_ids, strip_generation)

    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_json)
    names = list(policy_dirs)
    tok, bank = load_policy_bank(base_path, cfg.model, policy_dirs)
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


def estimate_L(rd: RunDir, cfg: Config, k: int, prompts: list[str]) -> tuple[np.ndarray, list]:
    """L [K, G] (G = K types, plus the single-DPO baseline when present) and the samples."""
    rt = RayRuntime(cfg)
    dirs = rd.policy_dirs(k, baselines=True)
    chunks = [c for c in np.array_split(np.arange(len(prompts)), cfg.ray.num_workers) if len(c)]
    cfg_json = cfg.model_dump(mode="json")
    parts = rt.fan_out(_sample_task, [
        (rd.base_path(cfg), cfg_json, dirs, k, [prompts[i] for i in c],
         cfg.seed * 7 + n, rt.threads) for n, c in enumerate(chunks)])
    gen = np.concatenate([p["generator"] for p in parts]).astype(int)
    lp = np.concatenate([np.asarray(p["logps"]).reshape(-1, k + 1) for p in parts])
    names = list(dirs)
    samples = [{"policy": names[g], "prompt": pr, "text": t}
               for p in parts for g, pr, t in zip(p["generator"], p["prompt"], p["text"])]
    return estimate_matrix(gen, lp, len(names)), samples


def run_mmra(rd: RunDir, cfg: Config | None = None, progress=None) -> dict:
    rd.require_run()
    cfg = cfg or rd.config()
    k = rd.types
    say = progress or (lambda m: None)
    if cfg.mmra.single_dpo_baseline and not rd.has_baseline(SINGLE_DPO):
        from emdpo_ray.train.baseline import train_single_policy

        say("training the single-DPO baseline (all records, no types)")
        train_single_policy(rd, cfg)
    from emdpo_ray.data.records import load_records

    prompts = eval_prompts([r.prompt for r in load_records(rd.data_path)],
                           cfg.mmra.num_prompts, cfg.seed)
    L_full, samples = estimate_L(rd, cfg, k, prompts)
    out = mmra_report(L_full, k, rd.mixing_weights(), cfg.mmra.type_weights)
    out.update(num_prompts=len(prompts), samples_per_prompt=cfg.mmra.samples_per_prompt)
    rd.write_mmra(out, samples)
    say(f"MMRA weights={np.round(out['weights'], 3).tolist()} "
        f"max_regret={out['max_regret']:.4f} (uniform: {out['baselines']['uniform']['max_regret']:.4f})")
    return out
