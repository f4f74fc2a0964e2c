"""MMRA from a run directory: `emdpo-ray mmra --run runs/demo`.

    L_ij = mean over prompts x and samples y ~ pi_j of  log pi_i(y|x) - log pi_ref(y|x)

Held-out prompts (`prompt_pool`) are split over Ray tasks; each task loads the base and the
policies once, samples `mmra.samples_per_prompt` continuations per policy with serving's own
sampler (`models/decoding.py`: the softmax itself, no top-k, top-p 1 unless configured), and
scores every sample, end-of-text included, under every type and the reference in one batched
forward. The driver averages (`estimate_matrix`), solves the LP, bootstraps prompts for
intervals and writes `mmra.json` atomically with the baselines (`mmra_report`).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from emdpo_ray.config import Config
from emdpo_ray.core import mmra
from emdpo_ray.run.ray_runtime import RayRuntime
from emdpo_ray.run.rundir import REFERENCE_NAME, SINGLE_DPO, RunDir

log = logging.getLogger(__name__)


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


def mmra_report(L_full: np.ndarray, k: int, eta, type_weights=None,
                extra: list[str] = ()) -> dict:
    """Weights and regrets of the LP and the baselines; columns K.. of L_full are further
    policies named `extra` (the single-DPO policy, the reference), reported as baselines."""
    L = L_full[:, :k]
    result = mmra.solve(L, type_weights)
    base = mmra.baselines(L, eta, type_weights)
    c = np.ones(k) if type_weights is None else np.asarray(type_weights, float)
    for col, name in enumerate(extra, start=k):
        reg = c * (np.diag(L) - L_full[:, col])
        base[name] = {"regret": reg.tolist(), "max_regret": float(max(0, reg.max()))}
    return {"L": L.tolist(), **result.to_json(), "baselines": base,
            **{f"L_{name}": L_full[:, col].tolist() for col, name in enumerate(extra, start=k)}}


def eval_prompts(prompts: list, n: int, seed: int) -> list:
    """n distinct prompts (texts or conversations), a seeded draw independent of their order
    in the data."""
    distinct = sorted(set(prompts))
    rng = np.random.default_rng(seed + 4242)
    return [distinct[i] for i in rng.permutation(len(distinct))[:n]]


def read_prompts(path: str) -> list[str]:
    """One prompt a line, or JSONL objects with a string 'prompt'; errors name the line."""
    from emdpo_ray.data.records import RecordError
    from emdpo_ray.data.sources import read_bytes

    out = []
    for n, line in enumerate(read_bytes(path).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{n}: not valid JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise RecordError(f"{path}:{n}: prompt: expected a string")
            out.append(obj["prompt"])
        else:
            out.append(line)
    if not out:
        raise RecordError(f"{path}: empty file: no prompts")
    return out


def prompt_pool(cfg: Config, data_path: str) -> tuple[list, str]:
    """(candidate prompts for L, where they come from): `mmra.prompts_file`, else the
    synthetic sidecar's held-out prompts, else (with a warning) the training prompts. For
    conversational data a held-out prompt is one user turn."""
    from emdpo_ray.data.records import RecordError
    from emdpo_ray.data.sources import iter_records, load_records, read_bytes
    from emdpo_ray.data.synth import meta_path

    conversational = next(iter_records(data_path, cfg.data.user_field)).conversational

    def as_data(prompts: list[str]) -> list:
        return [(("user", p),) for p in prompts] if conversational else prompts

    if cfg.mmra.prompts_file:
        return as_data(read_prompts(cfg.mmra.prompts_file)), "prompts_file"
    try:
        meta = json.loads(read_bytes(meta_path(data_path)))
    except (RecordError, OSError, ValueError):
        meta = {}
    if isinstance(meta, dict) and meta.get("heldout_prompts"):
        return as_data(list(meta["heldout_prompts"])), "heldout"
    log.warning("MMRA: no held-out prompts (set mmra.prompts_file); estimating L on training "
                "prompts, where the policies look better than on new ones")
    return [r.messages or r.prompt for r in load_records(data_path, cfg.data.user_field)], \
        "training"


def bootstrap(generator: np.ndarray, logps: np.ndarray, prompt: np.ndarray, num_generators: int,
              type_weights, replicates: int, seed: int, level: float = 0.95) -> dict:
    """Percentile intervals of L, the MMRA weights and max regret, resampling prompts with
    replacement (the samples of one prompt move together)."""
    k = logps.shape[1] - 1
    prompts = np.unique(prompt)
    rows_of = {p: np.flatnonzero(prompt == p) for p in prompts}
    rng = np.random.default_rng(seed)
    Ls, ws, mrs = [], [], []
    for _ in range(replicates):
        rows = np.concatenate([rows_of[p] for p in rng.choice(prompts, size=len(prompts))])
        L = estimate_matrix(generator[rows], logps[rows], num_generators)
        res = mmra.solve(L[:, :k], type_weights)
        Ls.append(L)
        ws.append(res.weights)
        mrs.append(res.max_regret)
    lo, hi = 50 * (1 - level), 50 * (1 + level)

    def ci(x) -> list:
        return np.stack([np.nanpercentile(x, lo, axis=0), np.nanpercentile(x, hi, axis=0)],
                        -1).tolist()

    return {"level": level, "replicates": replicates, "L_ci": ci(np.array(Ls)),
            "weights_ci": ci(np.array(ws)), "max_regret_ci": ci(np.array(mrs))}


def _sample_task(base_path: str, cfg_json: dict, policy_dirs: dict[str, str], k: int,
                 prompts: list, seed: int, threads: int) -> dict:
    import torch

    from emdpo_ray.models.bank import REFERENCE, load_policy_bank
    from emdpo_ray.models.decoding import GenRequest, sample_bank
    from emdpo_ray.data.records import plain_text
    from emdpo_ray.models.scoring import continuation_arrays, pair_logps, prompt_token_ids

    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_json)
    mc = cfg.mmra
    tok, bank = load_policy_bank(base_path, cfg.model, policy_dirs)
    p_ids = prompt_token_ids(tok, prompts, cfg.data.max_prompt_tokens)
    # rows: every prompt x every generator (the policies, then the reference) x every
    # sample, each with its own seed
    gens_of = list(range(len(policy_dirs))) + [REFERENCE]
    rows = [(p, g) for p in range(len(prompts)) for g in range(len(gens_of))
            for _ in range(mc.samples_per_prompt)]
    reqs = [GenRequest(p_ids[p], gens_of[g], cfg.generation_tokens, mc.temperature, mc.top_p,
                       seed * 1_000_003 + i) for i, (p, g) in enumerate(rows)]
    with torch.no_grad():
        gens = sample_bank(bank, tok, reqs)
    # the sampled sequence, end-of-text included when the policy chose it
    conts = [g.token_ids + ([tok.eos_token_id] if g.finish_reason == "stop" else [])
             for g in gens]
    arrays = continuation_arrays([p_ids[p] for p, _ in rows], conts, tok.pad_token_id)
    scorers = list(range(k)) + [REFERENCE]  # every type, then the reference
    pairs = np.array([(r, j) for r in range(len(rows)) for j in scorers])
    with torch.no_grad():
        lp, _, _ = pair_logps(bank.logps, arrays, pairs, torch.device("cpu"))
    lp = lp[:, 0].double().numpy().reshape(len(rows), len(scorers))
    text = [p if isinstance(p, str) else plain_text(p) for p in prompts]
    return {"generator": [g for _, g in rows], "prompt": [text[p] for p, _ in rows],
            "text": [g.text for g in gens], "logps": lp.tolist()}


def estimate_L(rd: RunDir, cfg: Config, k: int, prompts: list):
    """L [K, G] (G: the K types, the single-DPO baseline when present, the reference), the
    samples, and per sample: generator, prompt index and log-probs (for the bootstrap)."""
    rt = RayRuntime(cfg)
    # through the run's storage: a task on another node finds nothing in this node's mirror
    dirs = rd.shared_policy_dirs(k, baselines=True)
    base = rd.shared_base(cfg)
    chunks = [c for c in np.array_split(np.arange(len(prompts)), cfg.ray.num_workers) if len(c)]
    cfg_json = cfg.model_dump(mode="json")
    parts = rt.fan_out(_sample_task, [
        (base, cfg_json, dirs, k, [prompts[i] for i in c], cfg.seed * 7 + n,
         rt.threads) for n, c in enumerate(chunks)])
    gen = np.concatenate([p["generator"] for p in parts]).astype(int)
    lp = np.concatenate([np.asarray(p["logps"]).reshape(-1, k + 1) for p in parts])
    from emdpo_ray.data.records import plain_text

    index = {pr if isinstance(pr, str) else plain_text(pr): i for i, pr in enumerate(prompts)}
    prompt = np.array([index[pr] for p in parts for pr in p["prompt"]])
    names = [*dirs, REFERENCE_NAME]
    samples = [{"policy": names[g], "prompt": pr, "text": t}
               for p in parts for g, pr, t in zip(p["generator"], p["prompt"], p["text"])]
    return estimate_matrix(gen, lp, len(names)), samples, (gen, prompt, lp)


def run_mmra(rd: RunDir, cfg: Config | None = None, progress=None) -> dict:
    rd.require_run()
    cfg = cfg or rd.config()
    mc, k = cfg.mmra, rd.types
    say = progress or (lambda m: None)
    if mc.single_dpo_baseline and not rd.has_baseline(SINGLE_DPO):
        from emdpo_ray.train.baseline import train_single_policy

        say("training the single-DPO baseline (all records, no types)")
        train_single_policy(rd, cfg)
    pool, source = prompt_pool(cfg, rd.data_path)
    prompts = eval_prompts(pool, mc.num_prompts, cfg.seed)
    n_gen = len(rd.policy_dirs(k, baselines=True)) + 1
    say(f"MMRA: sampling {len(prompts) * n_gen * mc.samples_per_prompt} generations "
        f"({len(prompts)} {source} prompts x {n_gen} policies incl. the reference x "
        f"{mc.samples_per_prompt}) and scoring each under every type")
    L_full, samples, (gen, prompt, lp) = estimate_L(rd, cfg, k, prompts)
    out = mmra_report(L_full, k, rd.mixing_weights(), mc.type_weights,
                      extra=[SINGLE_DPO] * rd.has_baseline(SINGLE_DPO) + [REFERENCE_NAME])
    out.update(num_prompts=len(prompts), samples_per_prompt=mc.samples_per_prompt,
               prompt_source=source,
               sampling={"temperature": mc.temperature, "top_p": mc.top_p, "top_k": None,
                         "max_new_tokens": cfg.generation_tokens,
                         "exact": mc.temperature == 1.0 and mc.top_p == 1.0})
    if mc.bootstrap:
        out["bootstrap"] = bootstrap(gen, lp, prompt, L_full.shape[1], mc.type_weights,
                                     mc.bootstrap, cfg.seed + 31)
    rd.write_mmra(out, samples)
    say(f"MMRA weights={np.round(out['weights'], 3).tolist()} "
        f"max_regret={out['max_regret']:.4f} (uniform: {out['baselines']['uniform']['max_regret']:.4f})")
    return out
